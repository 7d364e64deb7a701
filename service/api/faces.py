"""Embed, verify, identify: the routes that only read the gallery."""

from __future__ import annotations

import base64

import cv2
import numpy as np
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from ..deps import ApiKey, StateDep
from ..errors import ErrorCode, ServiceError
from ..payload import body_docs, read_payload
from ..detection import align_face
from ..pipeline import decoded_photo, embed_images
from ..schemas import (
    Candidate, DetectedImage, DetectRequest, DetectResponse, EmbedRequest, EmbedResponse, ErrorResponse,
    IdentifyRequest, IdentifyResponse, ProbeResult, VerifyRequest, VerifyResponse,
)
from ..state import ServiceState

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 415, 422)}
router = APIRouter(tags=["faces"], dependencies=[ApiKey], responses=ERRORS)


@router.post("/embed", response_model=EmbedResponse, openapi_extra=body_docs(EmbedRequest, ("images",)),
             summary="Embed faces")
async def embed(request: Request, state: StateDep) -> EmbedResponse:
    """One or many faces in, one L2-normalised embedding per face out.

    Aligned crops give one embedding each. Photos give one (`multi_face: largest` or `center`) or one
    per face (`all`), with `faces` saying where each was found.
    """
    payload, images = await read_payload(request, EmbedRequest, ("images",),
                                         max_images=state.settings.max_faces_per_request)
    vectors, faces = await embed_images(state, images["images"], payload.image_type, payload.multi_face)
    return EmbedResponse(model_id=state.contract.model_id, dimension=vectors.shape[1], embeddings=vectors.tolist(),
                         faces=faces.locations())


@router.post("/verify", response_model=VerifyResponse,
             openapi_extra=body_docs(VerifyRequest, (), ("image_a", "image_b")), summary="Same person?")
async def verify(request: Request, state: StateDep) -> VerifyResponse:
    """Face vs face (`image_a` + `image_b`) or face vs enrolled identity (`image_a` + `identity_id`).

    Against an identity the similarity is the best over its enrolled faces. The decision uses the
    request's `threshold`, else the service's, else the model's calibrated 1:1 threshold. Photos:
    the face `multi_face` picks (`largest` or `center`) is compared, and `face_a`/`face_b` say where.
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
        probe, faces = await embed_images(state, images["image_a"], payload.image_type, payload.multi_face)
        similarity = float(np.max(enrolled @ probe[0]))
    else:
        probe, faces = await embed_images(state, images["image_a"] + images["image_b"], payload.image_type,
                                          payload.multi_face)
        similarity = float(probe[0] @ probe[1])
    located = faces.locations() or [None, None]
    return VerifyResponse(similarity=similarity, threshold=threshold, match=similarity >= threshold,
                          model_id=state.contract.model_id, identity_id=payload.identity_id,
                          face_a=located[0], face_b=located[1] if len(located) > 1 else None)


@router.post("/identify", response_model=IdentifyResponse, openapi_extra=body_docs(IdentifyRequest, ("images",)),
             summary="Who is this? (open set)")
async def identify(request: Request, state: StateDep) -> IdentifyResponse:
    """Top-k enrolled identities per probe face. Open set: when the best score is below the
    threshold the probe is `unknown` (`identity_id: null`), with the candidates still listed.

    Photos with `multi_face: all` give one result per face found, each with its `image_index` and
    `face` box. The default threshold is the 1:N one (stricter than the 1:1 verify threshold: with more
    identities to match, an unknown face is more likely to resemble one of them by chance).
    """
    payload, images = await read_payload(request, IdentifyRequest, ("images",),
                                         max_images=state.settings.max_faces_per_request)
    if payload.top_k > state.settings.max_top_k:
        raise ServiceError(ErrorCode.invalid_request, f"top_k may be at most {state.settings.max_top_k}")
    threshold = payload.threshold if payload.threshold is not None else state.identify_threshold
    probes, faces = await embed_images(state, images["images"], payload.image_type, payload.multi_face)
    matches = await run_in_threadpool(state.gallery.search, probes, payload.top_k)
    located = faces.locations() or [None] * len(matches)
    results = []
    for candidates, image_index, face in zip(matches, faces.image_index, located):
        best = candidates[0] if candidates else None
        known = best is not None and best.score >= threshold
        results.append(ProbeResult(
            image_index=image_index,
            face=face,
            identity_id=best.identity_id if known else None,
            known=known,
            score=best.score if best else None,
            candidates=[Candidate(identity_id=m.identity_id, score=m.score, face_id=m.face_id) for m in candidates],
        ))
    return IdentifyResponse(results=results, threshold=threshold, gallery_identities=state.gallery.identity_count,
                            model_id=state.contract.model_id)


@router.post("/detect", response_model=DetectResponse, openapi_extra=body_docs(DetectRequest, ("images",)),
             summary="Find faces in photos")
async def detect(request: Request, state: StateDep) -> DetectResponse:
    """Every face in each photo: box, 5 landmarks, score, highest score first; optionally the crop
    each face would be embedded from (aligned to the model's template, base64 PNG). A photo without
    faces has an empty list here (only the embedding routes refuse it with `no_face`)."""
    payload, images = await read_payload(request, DetectRequest, ("images",),
                                         max_images=state.settings.max_faces_per_request)
    results = await run_in_threadpool(_detect_all, state, images["images"], payload.return_crops)
    return DetectResponse(detector=state.detector.name, alignment=state.template.name, images=results)


def _detect_all(state: ServiceState, blobs: list[bytes], return_crops: bool) -> list[DetectedImage]:
    results = []
    for index, blob in enumerate(blobs):
        with decoded_photo(state, blob, index) as (rgb, found):
            faces = []
            for face in found:
                item = {"image_index": index, **face.as_dict()}
                if return_crops:
                    crop = cv2.cvtColor(align_face(rgb, face, state.template), cv2.COLOR_RGB2BGR)
                    item["crop"] = base64.b64encode(cv2.imencode(".png", crop)[1].tobytes()).decode()
                faces.append(item)
            results.append(DetectedImage(width=rgb.shape[1], height=rgb.shape[0], faces=faces))
    return results
