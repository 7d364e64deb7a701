"""The photo path the service runs, from an image header to aligned crops, in one object that needs
no ``ServiceState``: the endpoints call it (``service.faces.pipeline``) and ``bench/detect_align.py`` times
it, so the benchmark measures the code that serves requests.

    header -> [reserve decode memory] -> decode + colour policy (``images``) -> detect (YuNet)
           -> select (multi-face policy) + align (``align.align_faces``)

Errors leave as the API's ``ServiceError`` for the request's image ``index``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np

from ...ops.decode_budget import DecodeBudget
from ..images import ImageHeader, image_errors
from .align import ARCFACE_112, AlignedFace, AlignmentTemplate, MultiFacePolicy, align_faces
from .detector import DetectedFace, FaceDetector


@dataclass(frozen=True)
class PhotoAligner:
    detector: FaceDetector
    template: AlignmentTemplate = ARCFACE_112
    budget: DecodeBudget | None = None  # None: no memory reservation (tools, benchmarks of one photo at a time)
    on_detect: Callable[[int, float], None] | None = None  # (faces found, seconds): the service's metrics

    @contextmanager
    def pixels(self, header: ImageHeader, index: int) -> Iterator[np.ndarray]:
        """The upright RGB array of a photo, valid inside the ``with``: its estimated decode memory is
        reserved in the budget until then."""
        with self.budget.reserve(header.cost, index) if self.budget is not None else nullcontext():
            with image_errors(index):
                rgb = header.to_rgb()
            yield rgb

    def detect(self, rgb: np.ndarray) -> list[DetectedFace]:
        """Every face in the photo, highest score first; none is an empty list, not an error."""
        started = time.perf_counter()
        faces = self.detector.detect(rgb)
        if self.on_detect is not None:
            self.on_detect(len(faces), time.perf_counter() - started)
        return faces

    def align(self, rgb: np.ndarray, faces: list[DetectedFace], policy: MultiFacePolicy,
              index: int) -> list[AlignedFace]:
        """The faces the policy selects, aligned to the template; none is ``no_face``."""
        with image_errors(index):
            return align_faces(rgb, faces, policy, self.template)

    @contextmanager
    def faces(self, header: ImageHeader, index: int) -> Iterator[tuple[np.ndarray, list[DetectedFace]]]:
        """(upright RGB array, every face in it), valid inside the ``with`` (what ``/detect`` reports)."""
        with self.pixels(header, index) as rgb:
            yield rgb, self.detect(rgb)

    def aligned(self, header: ImageHeader, index: int, policy: MultiFacePolicy) -> list[AlignedFace]:
        """The crops the embedding routes embed: decode, detect, select, align."""
        with self.pixels(header, index) as rgb:
            return self.align(rgb, self.detect(rgb), policy, index)
