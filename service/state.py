"""What the app holds while it runs: settings, model, batcher, gallery, metrics."""

from __future__ import annotations

from dataclasses import dataclass

from .config import Settings
from .detection import AlignmentTemplate, FaceDetector
from .gallery.api import GalleryBackend
from .metrics import Metrics
from .model.batcher import DynamicBatcher
from .model.contract import FaceContract
from .model.runtime import EmbeddingModel


@dataclass
class ServiceState:
    settings: Settings
    model: EmbeddingModel
    batcher: DynamicBatcher
    gallery: GalleryBackend
    metrics: Metrics
    # photos: None when the model's alignment has no template here (then only aligned crops are served)
    detector: FaceDetector | None = None
    template: AlignmentTemplate | None = None

    @property
    def contract(self) -> FaceContract:
        return self.model.contract

    @property
    def verify_threshold(self) -> float:
        if self.settings.verify_threshold is not None:
            return self.settings.verify_threshold
        return self.contract.threshold

    @property
    def identify_threshold(self) -> float:
        # 1:N needs a stricter threshold than 1:1; fall back to the verify one only if nothing better
        if self.settings.identify_threshold is not None:
            return self.settings.identify_threshold
        if self.contract.identify_threshold is not None:
            return self.contract.identify_threshold
        return self.verify_threshold
