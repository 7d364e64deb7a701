"""The data path from image bytes to embeddings, in one direction:

bytes -> header + decode + validate (``images``, one policy for crops and photos)
      -> photos: detect -> select -> align (``detection.PhotoAligner``)
      -> batcher -> session (``model``) -> raw outputs -> normalised embeddings + each face's quality
         (``quality``: size and pose from the landmarks, sharpness and exposure from the crop,
         the raw output's norm from the model, combined with the contract's fitted ``face.quality``;
         a few small aligned crops, decoded on the event loop, have their crop parts measured there
         while the model runs on them, where they cost the request no time on a host with a core to
         spare; photos and larger batches are measured in the thread pool with their decode).

Every image of a request is decoded (and its faces found) before any is embedded, so a bad image
fails its own request with a clear code and never reaches the batch other requests share.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from starlette.concurrency import run_in_threadpool

from ..errors import ErrorCode, ServiceError
from ..model.batcher import InferenceTimeout, Overloaded
from ..model.preprocess import l2_normalise
from ..model.registry import ServedModel
from ..state import ServiceState
from .detection import DetectedFace, PhotoAligner
from .images import ImageHeader, aligned_crop, image_errors, read_header
from .quality import Quality, assess, crop_parts, photo_parts, raw_norms

log = logging.getLogger(__name__)

# Aligned crops this small are decoded on the event loop: a crop's size is checked from its header
# before any pixel is decoded (images.aligned_crop), so this is at most a few 112x112 decodes
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
    blockiness: list[float | None] = field(default_factory=list)  # a photo's, measured before the warp
    parts: list[dict[str, float | None]] = field(default_factory=list)  # quality parts measured so far
    quality: list[Quality] = field(default_factory=list)  # set once embedded (the model's part needs it)

    def add(self, crop: np.ndarray, index: int, face: DetectedFace | None = None,
            blockiness: float | None = None) -> None:
        """One face: its crop, and for a photo's face where it was and the photo's blockiness around it
        (measured before the alignment's warp; an aligned crop's is measured on the crop)."""
        self.crops.append(crop)
        self.image_index.append(index)
        self.located.append(face)
        self.blockiness.append(blockiness)

    def measure(self) -> list[dict[str, float | None]]:
        """Each face's quality parts but the model's (size and pose from the landmarks, sharpness and
        exposure from the crop), measured once: not in ``add``, so that a request measures them while
        the model runs (``embed_images``)."""
        for i in range(len(self.parts), len(self.crops)):
            face = self.located[i]
            self.parts.append({**(photo_parts(face) if face is not None else {}),
                               **crop_parts(self.crops[i], self.blockiness[i])})
        return self.parts

    def assess(self, state: ServiceState, norms: np.ndarray, served: ServedModel | None = None) -> None:
        """Each face's quality, from its parts and the model's output norm (``served``: the model that
        embedded them; None: the default one)."""
        model = served.quality_model if served is not None else state.quality_model
        self.quality = [assess({**parts, "norm": float(norm)}, model) for parts, norm in zip(self.measure(), norms)]

    def qualities(self, setting: float | None, requested: float | None = None, force: bool = False) -> list[dict]:
        """JSON-ready ``quality`` objects parallel to the crops, each judged against its score limit
        (``Quality.limit``: FACE_ENROLL_MIN_QUALITY ``setting``, else the model's default; ``requested``)."""
        return [q.as_dict(q.limit(setting, requested, force)) for q in self.quality]

    def refuse_low_quality(self, setting: float | None, requested: float | None = None, force: bool = False) -> None:
        """``low_quality`` (422) for the first face below its score limit or outside a part's limits,
        saying which limits it missed and by how much. ``force`` without ``requested`` checks nothing."""
        if force and requested is None:
            return
        for face, (quality, index) in enumerate(zip(self.quality, self.image_index)):
            reasons = quality.failures(quality.limit(setting, requested, force))
            if force:  # an admin's lowered limit is on the score alone
                reasons = [r for r in reasons if r["part"] == "score"]
            if reasons:
                log.info("face refused: low quality", extra={"index": index, "face": face, "reasons": reasons,
                                                             "score": quality.score})
                missed = ", ".join(f"{r['part']} {r['value']:g} (limit {r['limit']:g})" for r in reasons)
                raise ServiceError(ErrorCode.low_quality, f"the face of image {index} is not good enough to "
                                   f"enroll: {missed}", index=index, face=face, reasons=reasons)

    @property
    def from_photos(self) -> bool:
        return any(face is not None for face in self.located)

    def locations(self) -> list[dict | None] | None:
        """JSON-ready face locations parallel to the crops; None when no image was a photo."""
        if not self.from_photos:
            return None
        return [None if face is None else {"image_index": index, **face.as_dict()}
                for index, face in zip(self.image_index, self.located)]


def photo_aligner(state: ServiceState, index: int, served: ServedModel | None = None) -> PhotoAligner:
    """The service's photo path (``detection.PhotoAligner``): its detector and the template of the
    model's alignment (``served``; None: the default model), the process-wide decode budget, detection
    metrics. Crops-only models refuse photos here."""
    served = served or state.models.default
    if state.detector is None or served.template is None:
        raise ServiceError(
            ErrorCode.photo_not_supported,
            f"the model's alignment {served.contract.alignment!r} has no template here; send aligned crops",
            index=index,
        )
    return PhotoAligner(state.detector, served.template, state.decode_budget, state.metrics.observe_detection)


def read_image_header(state: ServiceState, data: bytes, index: int) -> ImageHeader:
    """The one header parse of an upload (limits checked, nothing decoded)."""
    settings = state.settings
    with image_errors(index):
        return read_header(data, max_pixels=settings.max_image_pixels, max_bytes=settings.max_image_bytes,
                           formats=settings.image_formats)


@contextmanager
def decoded_photo(state: ServiceState, data: bytes, index: int,
                  served: ServedModel | None = None) -> Iterator[tuple[np.ndarray, list[DetectedFace]]]:
    """Photo bytes -> (upright RGB array, every face in it), valid inside the ``with``: the decode's
    estimated memory is reserved in the process-wide budget (``decode_budget``) until then. No face
    is an empty list, not an error."""
    aligner = photo_aligner(state, index, served)
    with aligner.faces(read_image_header(state, data, index), index) as found:
        yield found


def decode_faces(
    state: ServiceState, blobs: list[bytes], image_type: ImageType = "aligned", multi_face: MultiFace = "largest",
    first_index: int = 0, served: ServedModel | None = None,
) -> FaceBatch:
    """The faces of ``blobs`` as ``served``'s input crops (None: the default model's)."""
    settings = state.settings
    size = (served or state.models.default).contract.input_size
    batch = FaceBatch()
    for offset, blob in enumerate(blobs):
        index = first_index + offset
        header = read_image_header(state, blob, index)
        # auto: a header declaring exactly the model's input size (as viewed) is an aligned crop
        if image_type == "aligned" or (image_type == "auto" and header.upright_size == tuple(size)):
            with image_errors(index):
                batch.add(aligned_crop(header, size), index)
            continue
        for aligned in photo_aligner(state, index, served).aligned(header, index, multi_face):
            batch.add(aligned.crop, index, aligned.face, aligned.blockiness)
    if len(batch.crops) > settings.max_faces_per_request:
        raise ServiceError(
            ErrorCode.too_many_faces,
            f"the photos hold {len(batch.crops)} faces; the limit is {settings.max_faces_per_request}",
            limit=settings.max_faces_per_request,
        )
    return batch


def _decode_measured(state: ServiceState, blobs: list[bytes], image_type: ImageType, multi_face: MultiFace,
                     first_index: int, served: ServedModel | None) -> FaceBatch:
    faces = decode_faces(state, blobs, image_type, multi_face, first_index, served)
    faces.measure()
    return faces


async def embed_images(
    state: ServiceState, blobs: list[bytes], image_type: ImageType = "aligned", multi_face: MultiFace = "largest",
    first_index: int = 0, served: ServedModel | None = None,
) -> tuple[np.ndarray, FaceBatch]:
    """Embeddings of every face in ``blobs`` (one per aligned image; per photo, what the policy picks),
    made by ``served`` (None: the default model; a collection's route passes its collection's model)."""
    if image_type == "aligned" and sum(len(blob) for blob in blobs) <= INLINE_DECODE_BYTES:
        faces = decode_faces(state, blobs, image_type, multi_face, first_index, served)
    else:  # photos and larger crops: decoded and measured in the pool
        faces = await run_in_threadpool(_decode_measured, state, blobs, image_type, multi_face, first_index, served)
    # a few small crops decoded here are measured here too, while the model runs
    raw = await embed_raw(state, np.stack(faces.crops), served, meanwhile=faces.measure)
    faces.assess(state, raw_norms(raw), served)
    return l2_normalise(raw), faces


async def embed_crops(state: ServiceState, crops: np.ndarray, served: ServedModel | None = None) -> np.ndarray:
    """Aligned crops -> L2-normalised embeddings (``embed_raw``, normalised)."""
    return l2_normalise(await embed_raw(state, crops, served))


async def embed_raw(state: ServiceState, crops: np.ndarray, served: ServedModel | None = None,
                    meanwhile: Callable[[], object] | None = None) -> np.ndarray:
    """Aligned crops -> the model's raw outputs through its batcher (``served``; None: the default
    model's); its deadline and queue bound become ``inference_timeout`` (504) and ``overloaded`` (503)
    instead of a request that never returns. ``meanwhile``: the request's work done while the model
    runs (``DynamicBatcher.embed``)."""
    batcher = served.batcher if served is not None else state.batcher
    try:
        return await batcher.embed(crops, meanwhile=meanwhile)
    except InferenceTimeout as exc:
        raise ServiceError(ErrorCode.inference_timeout, f"the model did not answer in time: {exc}",
                           timeout_ms=state.settings.inference_timeout_ms) from exc
    except Overloaded as exc:
        raise ServiceError(ErrorCode.overloaded, f"the service is overloaded, retry later: {exc}") from exc
