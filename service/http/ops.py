"""What operators need: liveness, readiness (with a real inference), Prometheus metrics."""

from __future__ import annotations

import time

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..access.policy import Permission, Principal
from ..errors import ErrorCode, ServiceError
from ..faces.pipeline import embed_crops
from ..faces.quality import quality_in_force
from ..gallery.api import CollectionDamaged
from ..gallery.openset import GalleryCounts, IdentifyThreshold
from ..state import ServiceState
from .deps import StateDep, allow, resolve_principal
from .payload import StrictRoute
from .schemas import CollectionThreshold, ErrorResponse, ModelStatus, ReadyResponse, ReadyStatus

router = APIRouter(route_class=StrictRoute, tags=["operations"])
PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})  # never need the API key (load balancers, orchestrators)


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict:
    """The process is up and its event loop answers. Never needs the API key. `version`: the service's
    version (clients check its major version against theirs)."""
    return {"status": "ok", "version": __version__}


@router.get("/readyz", response_model=ReadyResponse | ReadyStatus, summary="Readiness",
            responses={503: {"model": ErrorResponse, "description": "`model_not_ready`, `gallery_loading` or "
                             "`gallery_unavailable`: not ready (yet)"}})
async def readyz(request: Request, state: StateDep) -> ReadyResponse | ReadyStatus:
    """Ready when the model is loaded, a real inference succeeds (at most one per
    FACE_READYZ_CACHE_MS; polls in between get the last result) and the gallery index is loaded;
    reports the providers in use. While the index loads: 503 `gallery_loading` (status "loading").
    Never needs the API key, but with keys in use only requests that carry a valid one get the details
    (model, thresholds, gallery size, and each collection in the key's scope with its own threshold):
    the others get the bare status (`{"status": "ready"}`, or the error code)."""
    principal = await resolve_principal(request, state)
    detailed = principal is not None
    load_state = state.galleries.load_state
    if load_state != "ready":
        code = ErrorCode.gallery_loading if load_state == "loading" else ErrorCode.gallery_unavailable
        if not detailed:
            raise ServiceError(code, f"gallery index {load_state}", status=load_state)
        stats = await run_in_threadpool(state.galleries.stats)
        error = state.galleries.load_error
        raise ServiceError(code, f"gallery index {load_state}" + (f": {error}" if error else ""),
                           status=load_state, gallery=stats.as_dict())

    async def check() -> float:
        started = time.perf_counter()
        for served in state.models:  # every served model answers a real inference
            h, w = served.contract.input_size
            vector = await embed_crops(state, np.full((1, h, w, 3), 128, dtype=np.uint8), served)
            if not np.isfinite(vector).all():
                raise RuntimeError(f"model {served.name!r} returned non-finite values")
        return (time.perf_counter() - started) * 1000

    elapsed = await state.readiness.inference_ms(check)
    if not detailed:
        return ReadyStatus(status="ready")
    assert principal is not None
    stats = await run_in_threadpool(state.galleries.stats)
    identify = await run_in_threadpool(_default_threshold, state)
    collections = await run_in_threadpool(_collection_thresholds, state, principal)
    return ReadyResponse(
        status="ready", model_id=state.contract.model_id, model_path=str(state.model.path),
        providers=state.model.providers, embedding_size=state.contract.embedding_size,
        verify_threshold=state.verify_threshold, identify_threshold=identify.threshold,
        identify_threshold_source=identify.source, identify_fpir=identify.fpir_target,
        impostor_tail=None if identify.tail is None else {
            "source": identify.tail_source, "measured_on": identify.tail.source, "pairs": identify.tail.pairs,
            "far_min": identify.tail.far[-1], "extrapolated": identify.extrapolated},
        quality=quality_in_force(state.quality_model, state.settings.enroll_min_quality, state.quality_source),
        inference_ms=round(elapsed, 3), gallery=stats.as_dict(), collections=collections,
        default_model=state.models.default.name,
        models={served.name: ModelStatus(**served.describe()) for served in state.models},
    )


def _default_threshold(state: ServiceState) -> IdentifyThreshold:
    try:
        return state.open_set_threshold(state.default_gallery)
    except CollectionDamaged:  # its size is not known: an empty one's (its `collections` entry says damaged)
        return state.decision_for(GalleryCounts(0, 0, 0))


def _collection_thresholds(state: ServiceState, principal: Principal) -> dict[str, CollectionThreshold]:
    out = {}
    for info in state.galleries.list_collections():
        if principal.may_touch(info.name):
            name = state.models.name_of(info.model_id)
            decision = state.decision_for(GalleryCounts(info.identities, info.faces, info.counted_faces),
                                          served=state.models.get(name) if name is not None else None,
                                          fpir=info.identify_fpir)
            out[info.name] = CollectionThreshold(identities=info.identities, faces=info.faces,
                                                 identify_threshold=decision.threshold, damaged=info.damaged)
    return out


@router.get("/metrics", summary="Prometheus metrics", dependencies=[allow(Permission.admin)],
            response_class=PlainTextResponse,
            responses={200: {"description": "Prometheus text exposition format", "content": {"text/plain": {}}}})
async def metrics(state: StateDep) -> Response:
    stats = await run_in_threadpool(state.galleries.stats)
    state.metrics.gallery_identities.set(stats.identities)
    state.metrics.gallery_faces.set(stats.faces)
    state.metrics.collections_damaged.set(stats.extra.get("collections_damaged", 0))
    state.metrics.search_fallbacks.update(stats.extra)
    state.metrics.snapshot_writers.update(stats.extra)
    state.metrics.database_memory.update(stats.extra)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
