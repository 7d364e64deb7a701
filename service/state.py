"""What the app holds while it runs: settings, model, batcher, gallery, metrics."""

from __future__ import annotations

from dataclasses import dataclass

from .config import Settings
from .decode_budget import MB, DecodeBudget
from .readiness import ReadinessProbe
from .detection import AlignmentTemplate, FaceDetector
from .gallery import Gallery
from .metrics import Metrics
from .model.batcher import DynamicBatcher
from .model.contract import FaceContract
from .model.runtime import EmbeddingModel


@dataclass
class ServiceState:
    settings: Settings
    model: EmbeddingModel
    batcher: DynamicBatcher
    gallery: Gallery
    metrics: Metrics
    # photos: None when the model's alignment has no template here (then only aligned crops are served)
    detector: FaceDetector | None = None
    template: AlignmentTemplate | None = None
    decode_budget: DecodeBudget | None = None  # None: made from the settings
    readiness: ReadinessProbe | None = None  # None: made from the settings

    def __post_init__(self) -> None:
        if self.decode_budget is None:
            s = self.settings
            self.decode_budget = DecodeBudget(s.decode_memory_mb * MB, s.max_decode_mb * MB, s.decode_wait_ms / 1000)
        if self.readiness is None:
            self.readiness = ReadinessProbe(self.settings.readyz_cache_ms / 1000)

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
