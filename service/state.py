"""What the app holds while it runs: settings, model, batcher, galleries (collections, keys, audit), metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

from .access.keyring import KeyRing
from .access.keys import load_pepper
from .access.limits import Limits
from .config import Settings
from .errors import ErrorCode, ServiceError
from .faces.detection import AlignmentTemplate, FaceDetector
from .faces.quality import QualityModel
from .gallery.aliases import AliasMap
from .gallery.api import DEFAULT_COLLECTION, Galleries, GalleryBackend
from .gallery.openset import GalleryCounts, GalleryTail, IdentifyThreshold
from .jobs.runner import JobRunner
from .jobs.shadow import ShadowMap
from .model.batcher import DynamicBatcher
from .model.contract import FaceContract
from .model.registry import DEFAULT_MODEL_NAME, ModelRegistry, ServedModel
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
    # every served model by name (FACE_MODELS); model, batcher and template above are the default one's.
    # None: the one model above, served as `default` (tools, tests)
    models: ModelRegistry = field(default=None, repr=False)  # type: ignore[assignment]
    decode_budget: DecodeBudget = field(init=False)  # made from the settings
    readiness: ReadinessProbe = field(init=False)  # made from the settings
    # face quality: the data dir's refit (python -m service calibrate --quality), else the contract's
    quality_model: QualityModel | None = field(init=False)
    quality_source: str | None = field(init=False)
    default_gallery: GalleryBackend = field(init=False)  # the `default` collection (unprefixed routes)
    keyring: KeyRing = field(init=False)  # API keys -> principals (service/access)
    limits: Limits = field(init=False)  # requests and faces per second per key (service/access/limits.py)
    aliases: AliasMap = field(init=False)  # alias -> collection, at most FACE_ALIAS_CACHE_S old (gallery/aliases.py)
    jobs: JobRunner | None = field(default=None, init=False)  # the job thread (service/jobs/runner.py), once started
    shadow: ShadowMap = field(init=False)  # migrated collections whose /identify also runs on the new one (jobs/shadow.py)

    def __post_init__(self) -> None:
        s = self.settings
        self.limits = Limits.from_rates(s.rate_limit_rps, s.rate_limit_faces_per_s, s.rate_limit_burst_s)
        self.decode_budget = DecodeBudget(s.decode_memory_mb * MB, s.max_decode_mb * MB, s.decode_wait_ms / 1000)
        self.readiness = ReadinessProbe(s.readyz_cache_ms / 1000)
        if self.models is None:
            self.models = ModelRegistry([ServedModel(DEFAULT_MODEL_NAME, self.model, self.batcher, s, self.template,
                                                     default=True)])
        self.quality_model = self.models.default.quality_model
        self.quality_source = self.models.default.quality_source
        if self.galleries is None:  # calibrate, decode-only tools: no gallery, no requests
            return
        self.default_gallery = self.galleries.collection(DEFAULT_COLLECTION)
        self.keyring = KeyRing(self.galleries, s.api_key.get_secret_value() if s.api_key else None,
                               load_pepper(s), s.key_cache_s)
        self.aliases = AliasMap(self.galleries, s.alias_cache_s)
        self.shadow = ShadowMap(self.metrics, s.shadow_queue)

    @property
    def contract(self) -> FaceContract:
        return self.model.contract

    @property
    def verify_threshold(self) -> float:
        return self.models.default.verify_threshold

    def served_for(self, gallery: GalleryBackend) -> ServedModel:
        """The served model a collection is pinned to (its model id): what embeds its probes and photos
        and whose thresholds decide for it. 404 ``model_not_found`` when this replica does not serve it
        (a collection made by a replica configured with another model)."""
        try:
            return self.models.by_model_id(gallery.model_id)
        except KeyError:
            raise ServiceError(ErrorCode.model_not_found, f"collection {gallery.name!r} is pinned to model "
                               f"{gallery.model_id!r}, which this service does not serve",
                               collection=gallery.name, model_id=gallery.model_id) from None

    def model_named(self, name: str | None) -> ServedModel:
        """The served model of that name (None: the default); 404 ``model_not_found``."""
        if name is None:
            return self.models.default
        try:
            return self.models.get(name)
        except KeyError:
            raise ServiceError(ErrorCode.model_not_found, f"no model named {name!r} is served",
                               model=name, served=self.models.names()) from None

    def identify_threshold(self, gallery: GalleryBackend) -> float:
        """The 1:N threshold in force now for that collection's size (see ``service.gallery.openset``)."""
        return self.open_set_threshold(gallery).threshold

    @property
    def gallery_tail(self) -> GalleryTail:
        """The default model's gallery calibration, from `python -m service calibrate`."""
        return self.models.default.gallery_tail

    def open_set_threshold(self, gallery: GalleryBackend, requested: float | None = None) -> IdentifyThreshold:
        """The 1:N decision for one collection: it follows that collection's own size, never the others',
        and its own model's impostor tail."""
        return self.served_for(gallery).decision_for(
            GalleryCounts(gallery.identity_count, gallery.face_count, gallery.counted_faces), requested,
            gallery.identify_fpir)

    def decision_for(self, counts: GalleryCounts, requested: float | None = None,
                     served: ServedModel | None = None, fpir: float | None = None) -> IdentifyThreshold:
        # 1:N needs a stricter threshold than 1:1, rising with gallery size; see service.gallery.openset
        return (served or self.models.default).decision_for(counts, requested, fpir)
