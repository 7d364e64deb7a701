"""Embeddings given by the client instead of images (/verify, /identify, /enroll).

For clients that embed on the edge or re-query cached vectors. A vector is only comparable with the
gallery when the same model made it, so the request must name the served model (``model_id``) and
every vector must have the model's dimension; non-finite vectors and vectors too short to have a
direction are refused. Accepted vectors are L2-normalised here, exactly as the model's outputs are,
and then go the rest of the data path (gallery -> response) like embeddings of images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ErrorCode, ServiceError
from ..faces.pipeline import FaceBatch, ImageType, MultiFace, embed_images
from ..model.preprocess import unit_direction
from ..model.registry import ServedModel
from ..state import ServiceState
from .schemas import EnrollRequest, IdentifyRequest, VerifyRequest


@dataclass(frozen=True)
class FaceSource:
    """The faces of one request: image bytes, or client vectors, never both."""

    images: list[bytes] | None = None
    embeddings: list[list[float]] | None = None
    model_id: str | None = None  # the model the client says made ``embeddings``
    image_type: ImageType = "aligned"
    multi_face: MultiFace = "largest"


def exactly_one(images_given: bool, embeddings_given: bool, images: str, embeddings: str) -> None:
    if images_given == embeddings_given:
        raise ServiceError(ErrorCode.invalid_request, f"give exactly one of {images} or {embeddings}")


def check_model(state: ServiceState, model_id: str | None, model: ServedModel | None = None) -> None:
    """The request's ``model_id`` must be the model that embeds for the request's collection (``model``,
    the one it is pinned to; None: the default model). Checked whenever given."""
    served = (model or state.models.default).model_id
    if model_id != served:
        given = "no model_id" if model_id is None else f"model_id {model_id!r}"
        raise ServiceError(ErrorCode.model_mismatch,
                           f"embeddings need the served model's id: {given} given, this service serves {served!r}",
                           expected=served, given=model_id)


def normalise(rows: list[list[float]], dimension: int, first_index: int = 0) -> np.ndarray:
    """Client vectors -> float32 unit rows; refuses wrong lengths, NaN/inf and (near-)zero vectors."""
    out = np.empty((len(rows), dimension), dtype=np.float32)
    for offset, row in enumerate(rows):
        index = first_index + offset
        if len(row) != dimension:
            raise ServiceError(ErrorCode.wrong_dimension,
                               f"embedding {index} has {len(row)} values; the model's dimension is {dimension}",
                               index=index, expected=dimension, given=len(row))
        vector = np.asarray(row, dtype=np.float64)
        if not np.isfinite(vector).all():
            raise ServiceError(ErrorCode.invalid_embedding, f"embedding {index} has NaN or infinite values",
                               index=index)
        unit, norm = unit_direction(vector)
        if unit is None:
            raise ServiceError(ErrorCode.invalid_embedding,
                               f"embedding {index} has norm {norm:.3g}; it cannot be normalised", index=index)
        out[offset] = unit
    return out


def read_vectors(state: ServiceState, rows: list[list[float]], model_id: str | None, first_index: int = 0,
                 model: ServedModel | None = None) -> np.ndarray:
    model = model or state.models.default
    check_model(state, model_id, model)
    limit = state.settings.max_faces_per_request
    if len(rows) > limit:
        raise ServiceError(ErrorCode.too_many_faces, f"{len(rows)} embeddings in one request; the limit is {limit}",
                           limit=limit)
    return normalise(rows, model.dim, first_index)


async def source_vectors(state: ServiceState, source: FaceSource,
                         model: ServedModel | None = None) -> tuple[np.ndarray, FaceBatch]:
    """Embeddings for the request's faces: ``model``'s (the collection's; None: the default) for images,
    the client's (checked against it) otherwise. The FaceBatch says which request item each vector came
    from (no locations for client vectors)."""
    if source.embeddings is None:
        if source.model_id is not None:
            check_model(state, source.model_id, model)
        return await embed_images(state, source.images or [], source.image_type, source.multi_face, served=model)
    vectors = read_vectors(state, source.embeddings, source.model_id, model=model)
    faces = FaceBatch(image_index=list(range(len(vectors))), located=[None] * len(vectors))
    return vectors, faces


def list_source(payload: IdentifyRequest | EnrollRequest, images: dict[str, list[bytes]]) -> FaceSource:
    """/identify and /enroll: ``images`` or ``embeddings``, exactly one."""
    exactly_one(payload.images is not None, payload.embeddings is not None, "images", "embeddings")
    return FaceSource(images=images.get("images"), embeddings=payload.embeddings, model_id=payload.model_id,
                      image_type=payload.image_type, multi_face=payload.multi_face)


def verify_source(payload: VerifyRequest, images: dict[str, list[bytes]]) -> FaceSource:
    """/verify: face a, and face b or an identity; both faces as images or both as embeddings."""
    by_embedding = payload.embedding_a is not None or payload.embedding_b is not None
    exactly_one(payload.image_a is not None or payload.image_b is not None, by_embedding,
                "image_a/image_b", "embedding_a/embedding_b")
    first, second = ((payload.embedding_a, payload.embedding_b) if by_embedding
                     else (payload.image_a, payload.image_b))
    if first is None:
        raise ServiceError(ErrorCode.invalid_request, "give image_a (or embedding_a)")
    if (second is None) == (payload.identity_id is None):
        raise ServiceError(ErrorCode.invalid_request,
                           "give exactly one of image_b (embedding_b with embedding_a) or identity_id")
    if by_embedding:
        vectors = [v for v in (payload.embedding_a, payload.embedding_b) if v is not None]
        return FaceSource(embeddings=vectors, model_id=payload.model_id)
    return FaceSource(images=images.get("image_a", []) + images.get("image_b", []), model_id=payload.model_id,
                      image_type=payload.image_type, multi_face=payload.multi_face)
