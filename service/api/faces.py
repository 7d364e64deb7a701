"""Embed, verify, identify: the routes that only read the gallery."""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from ..deps import ApiKey, StateDep
from ..errors import ErrorCode, ServiceError
from ..payload import body_docs, read_payload
from ..pipeline import embed_images
from ..schemas import (
    Candidate, EmbedRequest, EmbedResponse, ErrorResponse, IdentifyRequest, IdentifyResponse, ProbeResult,
    VerifyRequest, VerifyResponse,
)

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 415, 422)}
router = APIRouter(tags=["faces"], dependencies=[ApiKey], responses=ERRORS)


@router.post("/embed", response_model=EmbedResponse, openapi_extra=body_docs(EmbedRequest, ("images",)),
             summary="Embed aligned faces")
async def embed(request: Request, state: StateDep) -> EmbedResponse:
    """One or many aligned 112x112 faces in, one L2-normalised embedding per face out."""
    _, images = await read_payload(request, EmbedRequest, ("images",), max_images=state.settings.max_faces_per_request)
    vectors = await embed_images(state, images["images"])
    return EmbedResponse(model_id=state.contract.model_id, dimension=vectors.shape[1], embeddings=vectors.tolist())


@router.post("/verify", response_model=VerifyResponse,
             openapi_extra=body_docs(VerifyRequest, (), ("image_a", "image_b")), summary="Same person?")
async def verify(request: Request, state: StateDep) -> VerifyResponse:
    """Face vs face (`image_a` + `image_b`) or face vs enrolled identity (`image_a` + `identity_id`).

    Against an identity the similarity is the best over its enrolled faces. The decision uses the
    request's `threshold`, else the service's, else the model's calibrated 1:1 threshold.
    """
    payload, images = await read_payload(request, VerifyRequest, (), ("image_a", "image_b"), max_images=2)
    if (payload.image_b is None) == (payload.identity_id is None):
        raise ServiceError(ErrorCode.invalid_request, "give exactly one of image_b or identity_id")
    threshold = payload.threshold if payload.threshold is not None else state.verify_threshold
    if payload.identity_id is not None:
        enrolled = await run_in_threadpool(state.gallery.identity_embeddings, payload.identity_id)
        if enrolled is None or len(enrolled) == 0:
            raise ServiceError(ErrorCode.identity_not_found, f"identity {payload.identity_id!r} is not enrolled",
                               identity_id=payload.identity_id)
        probe = await embed_images(state, images["image_a"])
        similarity = float(np.max(enrolled @ probe[0]))
    else:
        pair = await embed_images(state, images["image_a"] + images["image_b"])
        similarity = float(pair[0] @ pair[1])
    return VerifyResponse(similarity=similarity, threshold=threshold, match=similarity >= threshold,
                          model_id=state.contract.model_id, identity_id=payload.identity_id)


@router.post("/identify", response_model=IdentifyResponse, openapi_extra=body_docs(IdentifyRequest, ("images",)),
             summary="Who is this? (open set)")
async def identify(request: Request, state: StateDep) -> IdentifyResponse:
    """Top-k enrolled identities per probe face. Open set: when the best score is below the
    threshold the probe is `unknown` (`identity_id: null`), with the candidates still listed.

    The default threshold is the 1:N one (stricter than the 1:1 verify threshold: with more
    identities to match, an unknown face is more likely to resemble one of them by chance).
    """
    payload, images = await read_payload(request, IdentifyRequest, ("images",),
                                         max_images=state.settings.max_faces_per_request)
    if payload.top_k > state.settings.max_top_k:
        raise ServiceError(ErrorCode.invalid_request, f"top_k may be at most {state.settings.max_top_k}")
    threshold = payload.threshold if payload.threshold is not None else state.identify_threshold
    probes = await embed_images(state, images["images"])
    matches = await run_in_threadpool(state.gallery.search, probes, payload.top_k)
    results = []
    for candidates in matches:
        best = candidates[0] if candidates else None
        known = best is not None and best.score >= threshold
        results.append(ProbeResult(
            identity_id=best.identity_id if known else None,
            known=known,
            score=best.score if best else None,
            candidates=[Candidate(identity_id=m.identity_id, score=m.score, face_id=m.face_id) for m in candidates],
        ))
    return IdentifyResponse(results=results, threshold=threshold, gallery_identities=state.gallery.identity_count,
                            model_id=state.contract.model_id)
