"""What operators need: liveness, readiness (with a real inference), Prometheus metrics."""

from __future__ import annotations

import time
from typing import Any

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


@router.get("/readyz", response_model=ReadyResponse | ReadyStatus, summary="Readiness", response_model_exclude_unset=True,
            responses={503: {"model": ErrorResponse, "description": "`model_not_ready`, `gallery_loading` or "
                             "`gallery_unavailable`: not ready (yet)"}})
async def readyz(request: Request, state: StateDep) -> ReadyResponse | ReadyStatus:
    """Ready when the model is loaded, a real inference succeeds (at most one per
    FACE_READYZ_CACHE_MS; polls in between get the last result) and the gallery index is loaded;
    reports the providers in use. While the index loads: 503 `gallery_loading` (status "loading").
    Never needs the API key, but with keys in use only requests that carry a valid one get the details
    (model, thresholds, and each collection in the key's scope with its size and its own threshold):
    the others get the bare status (`{"status": "ready"}`, or the error code). The totals over every
    collection (`gallery`) and the default collection's `identify_threshold*` and `impostor_tail` are
    for an unscoped key only (left out for a scoped one: they would tell it of collections outside its scope)."""
    principal = await resolve_principal(request, state)
    if principal is not None and principal.unusable is not None:  # a scoped admin key: as no key
        principal = None
    detailed = principal is not None
    whole = principal is not None and principal.collections is None  # the totals over every collection
    load_state = state.galleries.load_state
    if load_state != "ready":
        code = ErrorCode.gallery_loading if load_state == "loading" else ErrorCode.gallery_unavailable
        if not detailed:
            raise ServiceError(code, f"gallery index {load_state}", status=load_state)
        error = state.galleries.load_error
        whole_gallery: dict[str, Any] = {}
        if whole:
            whole_gallery["gallery"] = (await run_in_threadpool(state.galleries.stats)).as_dict()
        raise ServiceError(code, f"gallery index {load_state}" + (f": {error}" if error else ""),
                           status=load_state, **whole_gallery)

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
    collections = await run_in_threadpool(_collection_thresholds, state, principal)
    totals: dict[str, Any] = {}
    if whole:  # a scoped key learns nothing of the collections outside its scope: sizes are in `collections`
        stats = await run_in_threadpool(state.galleries.stats)
        identify = await run_in_threadpool(_default_threshold, state)
        totals = {"gallery": stats.as_dict(), "identify_threshold": identify.threshold,
                  "identify_threshold_source": identify.source, "identify_fpir": identify.fpir_target,
                  "impostor_tail": None if identify.tail is None else {
                      "source": identify.tail_source, "measured_on": identify.tail.source,
                      "pairs": identify.tail.pairs, "far_min": identify.tail.far[-1],
                      "extrapolated": identify.extrapolated}}
    return ReadyResponse(
        status="ready", model_id=state.contract.model_id, model_path=str(state.model.path),
        providers=state.model.providers, embedding_size=state.contract.embedding_size,
        verify_threshold=state.verify_threshold,
        quality=quality_in_force(state.quality_model, state.settings.enroll_min_quality, state.quality_source),
        inference_ms=round(elapsed, 3), collections=collections, default_model=state.models.default.name,
        models={served.name: ModelStatus(**served.describe()) for served in state.models}, **totals,
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
