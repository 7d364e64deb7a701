"""What operators need: liveness, readiness (with a real inference), Prometheus metrics."""

from __future__ import annotations

import time

import numpy as np
from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from ..deps import ApiKey, StateDep
from ..schemas import ReadyResponse

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict:
    """The process is up and its event loop answers. Never needs the API key."""
    return {"status": "ok"}


@router.get("/readyz", response_model=ReadyResponse, summary="Readiness")
async def readyz(state: StateDep) -> ReadyResponse:
    """Ready when the model is loaded and a real inference succeeds; reports the providers in use."""
    h, w = state.contract.input_size
    face = np.full((1, h, w, 3), 128, dtype=np.uint8)
    started = time.perf_counter()
    vector = await state.batcher.embed(face)
    elapsed = (time.perf_counter() - started) * 1000
    if not np.isfinite(vector).all():
        raise RuntimeError("the model returned non-finite values")
    stats = await run_in_threadpool(state.gallery.stats)
    return ReadyResponse(
        status="ready", model_id=state.contract.model_id, model_path=str(state.model.path),
        providers=state.model.providers, embedding_size=state.contract.embedding_size,
        verify_threshold=state.verify_threshold, identify_threshold=state.identify_threshold,
        inference_ms=round(elapsed, 3), gallery=stats.as_dict(),
    )


@router.get("/metrics", summary="Prometheus metrics", dependencies=[ApiKey])
async def metrics(state: StateDep) -> Response:
    stats = await run_in_threadpool(state.gallery.stats)
    state.metrics.gallery_identities.set(stats.identities)
    state.metrics.gallery_faces.set(stats.faces)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
