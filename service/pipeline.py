"""The data path from image bytes to embeddings, in one direction:

bytes -> decode + validate (``images``; photos: ``detection``: detect -> select -> align)
      -> batcher -> session (``model``) -> normalised embeddings.

Every image of a request is decoded (and its faces found) before any is embedded, so a bad image
fails its own request with a clear code and never reaches the batch other requests share.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import Image
from starlette.concurrency import run_in_threadpool

from .detection import AlignedFace, DetectedFace, PhotoError, align_face, select_faces
from .detection.photos import decode_cost, load_upright, open_header, photo_to_rgb
from .errors import ErrorCode, ServiceError
from .images import decode_aligned_face
from .model.batcher import InferenceTimeout, Overloaded
from .state import ServiceState

# Aligned crops this small are decoded on the event loop: a crop's size is checked from its header
# before any pixel is decoded (decode_aligned_face), so this is at most a few 112x112 decodes
# (~0.1-0.5 ms), less than the thread pool's round trip it saves. Photos always go to the pool.
INLINE_DECODE_BYTES = 32 * 1024

ImageType = Literal["aligned", "photo", "auto"]
MultiFace = Literal["largest", "center", "all"]


@dataclass
class FaceBatch:
    """The faces of one request, ready for the model: crops, and where each came from."""

    crops: list[np.ndarray] = field(default_factory=list)  # HxWx3 uint8 RGB, the model's input size
    image_index: list[int] = field(default_factory=list)  # request image of each crop
    located: list[DetectedFace | None] = field(default_factory=list)  # None: the image was an aligned crop

    def add(self, crop: np.ndarray, index: int, face: DetectedFace | None = None) -> None:
        self.crops.append(crop)
        self.image_index.append(index)
        self.located.append(face)

    @property
    def from_photos(self) -> bool:
        return any(face is not None for face in self.located)

    def locations(self) -> list[dict | None] | None:
        """JSON-ready face locations parallel to the crops; None when no image was a photo."""
        if not self.from_photos:
            return None
        return [None if face is None else {"image_index": index, **face.as_dict()}
                for index, face in zip(self.image_index, self.located)]


def _is_aligned_size(data: bytes, size: tuple[int, int]) -> bool:
    """For ``auto``: does the header declare exactly the model's input size? (No pixels decoded; an
    unreadable header goes down the aligned path, which reports what is wrong with it.)"""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return (img.height, img.width) == tuple(size)
    except Exception:  # noqa: BLE001 - any failure here is reported properly by the aligned path
        return True


@contextmanager
def decoded_photo(state: ServiceState, data: bytes, index: int) -> Iterator[tuple[np.ndarray, list[DetectedFace]]]:
    """Photo bytes -> (upright RGB array, every face in it), valid inside the ``with``: the decode's
    estimated memory is reserved in the process-wide budget (``decode_budget``) until then. No face
    is an empty list, not an error."""
    if state.detector is None or state.template is None:
        raise ServiceError(
            ErrorCode.photo_not_supported,
            f"the model's alignment {state.contract.alignment!r} has no template here; send aligned crops",
            index=index,
        )
    settings = state.settings
    try:
        header = [open_header(data, max_pixels=settings.max_image_pixels, max_bytes=settings.max_image_bytes)]
    except PhotoError as exc:
        raise exc.for_image(index) from exc
    with state.decode_budget.reserve(decode_cost(header[0]), index):
        try:
            # popped into the call so that no reference here keeps the decoded image alive while
            # photo_to_rgb converts it (the estimate assumes it is freed)
            rgb = photo_to_rgb(load_upright(header.pop()))
        except PhotoError as exc:
            raise exc.for_image(index) from exc
        started = time.perf_counter()
        faces = state.detector.detect(rgb)
        state.metrics.observe_detection(len(faces), time.perf_counter() - started)
        yield rgb, faces


def align_photo(state: ServiceState, data: bytes, index: int, multi_face: MultiFace) -> list[AlignedFace]:
    with decoded_photo(state, data, index) as (rgb, faces):
        try:
            chosen = select_faces(faces, multi_face, rgb.shape)
        except PhotoError as exc:  # no face
            raise exc.for_image(index) from exc
        return [AlignedFace(face=face, crop=align_face(rgb, face, state.template)) for face in chosen]  # type: ignore[arg-type]  # set with the detector


def decode_faces(
    state: ServiceState, blobs: list[bytes], image_type: ImageType = "aligned", multi_face: MultiFace = "largest",
    first_index: int = 0,
) -> FaceBatch:
    settings = state.settings
    size = state.contract.input_size
    batch = FaceBatch()
    for offset, blob in enumerate(blobs):
        index = first_index + offset
        if image_type == "aligned" or (image_type == "auto" and _is_aligned_size(blob, size)):
            batch.add(decode_aligned_face(blob, index, size, settings.max_image_bytes, settings.max_image_pixels),
                      index)
            continue
        for aligned in align_photo(state, blob, index, multi_face):
            batch.add(aligned.crop, index, aligned.face)
    if len(batch.crops) > settings.max_faces_per_request:
        raise ServiceError(
            ErrorCode.too_many_faces,
            f"the photos hold {len(batch.crops)} faces; the limit is {settings.max_faces_per_request}",
            limit=settings.max_faces_per_request,
        )
    return batch


async def embed_images(
    state: ServiceState, blobs: list[bytes], image_type: ImageType = "aligned", multi_face: MultiFace = "largest",
    first_index: int = 0,
) -> tuple[np.ndarray, FaceBatch]:
    """Embeddings of every face in ``blobs`` (one per aligned image; per photo, what the policy picks)."""
    if image_type == "aligned" and sum(len(blob) for blob in blobs) <= INLINE_DECODE_BYTES:
        faces = decode_faces(state, blobs, image_type, multi_face, first_index)
    else:
        faces = await run_in_threadpool(decode_faces, state, blobs, image_type, multi_face, first_index)
    vectors = await embed_crops(state, np.stack(faces.crops))
    return vectors, faces


async def embed_crops(state: ServiceState, crops: np.ndarray) -> np.ndarray:
    """Aligned crops -> embeddings through the shared batcher; its deadline and queue bound become
    ``inference_timeout`` (504) and ``overloaded`` (503) instead of a request that never returns."""
    try:
        return await state.batcher.embed(crops)
    except InferenceTimeout as exc:
        raise ServiceError(ErrorCode.inference_timeout, f"the model did not answer in time: {exc}",
                           timeout_ms=state.settings.inference_timeout_ms) from exc
    except Overloaded as exc:
        raise ServiceError(ErrorCode.overloaded, f"the service is overloaded, retry later: {exc}") from exc
