"""Embed and detect: faces in, vectors and boxes out; no gallery (the `embed` permission)."""

from __future__ import annotations

import base64
from typing import Any

import cv2
import numpy as np
from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from ..access.policy import Permission
from ..errors import ErrorCode, ServiceError
from ..faces.detection import align_face
from ..faces.images import blockiness
from ..faces.pipeline import FaceBatch, decoded_photo, embed_images, embed_raw
from ..faces.quality import raw_norms
from ..model.registry import ServedModel
from ..state import ServiceState
from .deps import StateDep, allow
from .payload import StrictRoute, body_docs, json_response, read_payload
from .schemas import (
    DetectedImage,
    DetectRequest,
    DetectResponse,
    EmbedRequest,
    EmbedResponse,
    ErrorResponse,
)

ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 415, 422)}
router = APIRouter(route_class=StrictRoute, tags=["faces"], dependencies=[allow(Permission.embed)], responses=ERRORS)


@router.post("/embed", response_model=EmbedResponse, openapi_extra=body_docs(EmbedRequest, ("images",)),
             summary="Embed faces")
async def embed(request: Request, state: StateDep) -> Response:
    """One or many faces in, one L2-normalised embedding per face out.

    Aligned crops give one embedding each. Photos give one (`multi_face: largest` or `center`) or one
    per face (`all`), with `faces` saying where each was found.
    """
    payload, images = await read_payload(request, EmbedRequest, ("images",),
                                         max_images=state.settings.max_faces_per_request)
    served = requested_model(request, state, payload.model)
    vectors, faces = await embed_images(state, images["images"], payload.image_type, payload.multi_face,
                                        served=served)
    return json_response(EmbedResponse(model_id=served.model_id, model=served.name, dimension=vectors.shape[1],
                                       embeddings=vectors.tolist(), faces=faces.locations(),
                                       quality=faces.qualities(state.settings.enroll_min_quality)))


def requested_model(request: Request, state: ServiceState, name: str | None) -> ServedModel:
    """The model a request names (body `model`, else the `model` query parameter; neither: the
    default); 404 ``model_not_found``. /embed, /detect and /cluster."""
    query = request.query_params.get("model")
    if name is not None and query is not None and name != query:
        raise ServiceError(ErrorCode.invalid_request, "give `model` once: the body and the query name different models")
    return state.model_named(name if name is not None else query)


@router.post("/detect", response_model=DetectResponse, openapi_extra=body_docs(DetectRequest, ("images",)),
             summary="Find faces in photos")
async def detect(request: Request, state: StateDep) -> DetectResponse:
    """Every face in each photo: box, 5 landmarks, score, highest score first; optionally the crop
    each face would be embedded from (aligned to the model's template, base64 PNG). A photo without
    faces has an empty list here (only the embedding routes refuse it with `no_face`)."""
    payload, images = await read_payload(request, DetectRequest, ("images",),
                                         max_images=state.settings.max_faces_per_request)
    served = requested_model(request, state, payload.model)
    results, batch = await run_in_threadpool(_detect_all, state, images["images"], payload.return_crops, served)
    if batch.crops:  # the quality's model-based part needs each face's embedding
        batch.assess(state, raw_norms(await embed_raw(state, np.stack(batch.crops), served)), served)
        items = [face for image in results for face in image["faces"]]
        for item, quality in zip(items, batch.qualities(state.settings.enroll_min_quality)):
            item["quality"] = quality
    return DetectResponse(detector=state.detector.name, alignment=served.template.name,
                          model=served.name, model_id=served.model_id,
                          images=[DetectedImage(**image) for image in results])


def _detect_all(state: ServiceState, blobs: list[bytes], return_crops: bool,
                served: ServedModel) -> tuple[list[dict], FaceBatch]:
    results = []
    batch = FaceBatch()
    for index, blob in enumerate(blobs):
        with decoded_photo(state, blob, index, served) as (rgb, found):
            faces = []
            for face in found:
                item = {"image_index": index, **face.as_dict()}
                aligned = align_face(rgb, face, served.template)  # type: ignore[arg-type]
                batch.add(aligned, index, face, blockiness(rgb, face.box))
                if return_crops:
                    crop = cv2.cvtColor(aligned, cv2.COLOR_RGB2BGR)
                    item["crop"] = base64.b64encode(cv2.imencode(".png", crop)[1].tobytes()).decode()
                faces.append(item)
            results.append({"width": rgb.shape[1], "height": rgb.shape[0], "faces": faces})
    batch.measure()  # the quality's parts here in the pool, not on the event loop
    return results, batch
