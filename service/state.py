"""What the app holds while it runs: settings, model, batcher, galleries (collections, keys, audit), metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

from .access.keyring import KeyRing
from .access.keys import load_pepper
from .access.limits import Limits
from .config import Settings
from .faces.detection import AlignmentTemplate, FaceDetector
from .faces.quality import QualityModel, gallery_quality
from .gallery.aliases import AliasMap
from .gallery.api import DEFAULT_COLLECTION, Galleries, GalleryBackend
from .gallery.openset import GalleryCounts, GalleryTail, IdentifyThreshold, ThresholdInputs, choose_tail
from .gallery.openset import identify_threshold as _identify_threshold
from .model.batcher import DynamicBatcher
from .model.contract import FaceContract
from .model.runtime import EmbeddingModel
from .ops.decode_budget import MB, DecodeBudget
from .ops.metrics import Metrics
from .ops.readiness import ReadinessProbe


@dataclass
class ServiceState:
    settings: Settings
    model: EmbeddingModel
    batcher: DynamicBatcher
    galleries: Galleries
    metrics: Metrics
    # photos: None when the model's alignment has no template here (then only aligned crops are served)
    detector: FaceDetector | None = None
    template: AlignmentTemplate | None = None
    _gallery_tail: GalleryTail | None = field(default=None, repr=False)
    decode_budget: DecodeBudget = field(init=False)  # made from the settings
    readiness: ReadinessProbe = field(init=False)  # made from the settings
    # face quality: the data dir's refit (python -m service calibrate --quality), else the contract's
    quality_model: QualityModel | None = field(init=False)
    quality_source: str = field(init=False)
    default_gallery: GalleryBackend = field(init=False)  # the `default` collection (unprefixed routes)
    keyring: KeyRing = field(init=False)  # API keys -> principals (service/access)
    limits: Limits = field(init=False)  # requests and faces per second per key (service/access/limits.py)
    aliases: AliasMap = field(init=False)  # alias -> collection, at most FACE_ALIAS_CACHE_S old (gallery/aliases.py)

    def __post_init__(self) -> None:
        s = self.settings
        self.limits = Limits.from_rates(s.rate_limit_rps, s.rate_limit_faces_per_s, s.rate_limit_burst_s)
        self.decode_budget = DecodeBudget(s.decode_memory_mb * MB, s.max_decode_mb * MB, s.decode_wait_ms / 1000)
        self.readiness = ReadinessProbe(s.readyz_cache_ms / 1000)
        refit = gallery_quality(s.data_dir, self.contract.model_id)
        self.quality_model = refit if refit is not None else self.contract.quality
        self.quality_source = "gallery" if refit is not None else "model"
        if self.galleries is None:  # calibrate, decode-only tools: no gallery, no requests
            return
        self.default_gallery = self.galleries.collection(DEFAULT_COLLECTION)
        self.keyring = KeyRing(self.galleries, s.api_key.get_secret_value() if s.api_key else None,
                               load_pepper(s), s.key_cache_s)
        self.aliases = AliasMap(self.galleries, s.alias_cache_s)

    @property
    def contract(self) -> FaceContract:
        return self.model.contract

    @property
    def verify_threshold(self) -> float:
        if self.settings.verify_threshold is not None:
            return self.settings.verify_threshold
        return self.contract.threshold

    def identify_threshold(self, gallery: GalleryBackend) -> float:
        """The 1:N threshold in force now for that collection's size (see ``service.gallery.openset``)."""
        return self.open_set_threshold(gallery).threshold

    @property
    def gallery_tail(self) -> GalleryTail:
        if self._gallery_tail is None:  # the gallery's own calibration, from `python -m service calibrate`
            self._gallery_tail = GalleryTail(self.settings.data_dir, self.contract.model_id)
        return self._gallery_tail

    def open_set_threshold(self, gallery: GalleryBackend, requested: float | None = None) -> IdentifyThreshold:
        """The 1:N decision for one collection: it follows that collection's own size, never the others'."""
        return self.decision_for(GalleryCounts(gallery.identity_count, gallery.face_count, gallery.counted_faces),
                                 requested)

    def decision_for(self, counts: GalleryCounts, requested: float | None = None) -> IdentifyThreshold:
        # 1:N needs a stricter threshold than 1:1, rising with gallery size; see service.gallery.openset
        tail, source = choose_tail(self.gallery_tail.current(), self.contract.impostor_tail)
        inputs = ThresholdInputs(fixed=self.settings.identify_threshold, fpir=self.settings.identify_fpir,
                                 model_identify=self.contract.identify_threshold, verify=self.verify_threshold)
        return _identify_threshold(inputs, counts, tail, source, requested)
