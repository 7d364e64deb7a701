"""The models the service serves (``FACE_MODELS`` / repeated ``--model NAME=PATH``), each behind a name.

A :class:`ServedModel` is everything that belongs to one model: its ONNX session (``EmbeddingModel``),
its own batcher, its contract, the photo template of its alignment, its face quality (the data dir's
refit for its model id, else the contract's), its gallery calibration (``GalleryTail``, keyed by model
id) and the thresholds that follow from them. :class:`ModelRegistry` holds them in configuration order;
the first is the default (the unprefixed ``/embed``, a collection created without ``model``).

A collection is pinned to one model id (``GalleryBackend.model_id``): ``registry.by_model_id`` finds
the served model that embeds for it; the galleries refuse to open when a stored collection is pinned
to a model no longer served (``service.gallery.search.check_served``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..config import MODEL_NAME_PATTERN, ModelConfigError, parse_model_specs
from ..faces.quality import QualityModel, gallery_quality
from ..gallery.openset import GalleryCounts, GalleryTail, IdentifyThreshold, ThresholdInputs, choose_tail
from ..gallery.openset import identify_threshold as _identify_threshold
from .batcher import DynamicBatcher
from .contract import FaceContract
from .runtime import EmbeddingModel

if TYPE_CHECKING:
    from ..config import Settings
    from ..faces.detection import AlignmentTemplate

DEFAULT_MODEL_NAME = "default"  # the name of the one model of FACE_MODEL / --model PATH
__all__ = ["DEFAULT_MODEL_NAME", "MODEL_NAME_PATTERN", "ModelConfigError", "ModelRegistry", "ServedModel",
           "parse_model_specs"]


@dataclass
class ServedModel:
    """One served model: session, batcher, contract, photo template, quality and thresholds."""

    name: str
    model: EmbeddingModel
    batcher: DynamicBatcher
    settings: Settings = field(repr=False)
    template: AlignmentTemplate | None = None  # None: this model's alignment has no template (crops only)
    default: bool = False  # the default model: FACE_VERIFY_THRESHOLD / FACE_IDENTIFY_THRESHOLD apply to it
    quality_model: QualityModel | None = field(init=False, repr=False)
    quality_source: str | None = field(init=False)  # "gallery", "model", None: no fitted quality
    _gallery_tail: GalleryTail | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        refit = gallery_quality(self.settings.data_dir, self.contract.model_id)
        self.quality_model = refit if refit is not None else self.contract.quality
        self.quality_source = "gallery" if refit is not None else "model" if self.contract.quality else None

    @property
    def contract(self) -> FaceContract:
        return self.model.contract

    @property
    def model_id(self) -> str:
        return self.contract.model_id

    @property
    def dim(self) -> int:
        return self.contract.embedding_size

    @property
    def verify_threshold(self) -> float:
        """FACE_VERIFY_THRESHOLD for the default model (a cosine fitted to one model means nothing for
        another), else the contract's calibrated 1:1 threshold."""
        if self.default and self.settings.verify_threshold is not None:
            return self.settings.verify_threshold
        return self.contract.threshold

    @property
    def gallery_tail(self) -> GalleryTail:
        if self._gallery_tail is None:  # the gallery's own calibration for this model id
            self._gallery_tail = GalleryTail(self.settings.data_dir, self.model_id)
        return self._gallery_tail

    def decision_for(self, counts: GalleryCounts, requested: float | None = None,
                     fpir: float | None = None) -> IdentifyThreshold:
        """The 1:N decision for a collection of this model with these counts (service.gallery.openset);
        ``fpir``: the collection's own target (its identify_fpir), over FACE_IDENTIFY_FPIR and a fixed
        FACE_IDENTIFY_THRESHOLD alike (a request's threshold still overrides it)."""
        tail, source = choose_tail(self.gallery_tail.current(), self.contract.impostor_tail)
        fixed = self.settings.identify_threshold if self.default and fpir is None else None
        inputs = ThresholdInputs(fixed=fixed, fpir=self.settings.identify_fpir if fpir is None else fpir,
                                 model_identify=self.contract.identify_threshold, verify=self.verify_threshold)
        return _identify_threshold(inputs, counts, tail, source, requested)

    def describe(self) -> dict:
        """What /readyz shows of it (with where its impostor tail and quality come from: this data dir's
        calibration of it, ``gallery``, or its contract, ``model``)."""
        _, tail_source = choose_tail(self.gallery_tail.current(), self.contract.impostor_tail)
        return {"model_id": self.model_id, "dim": self.dim,
                "provider": self.model.providers[0] if self.model.providers else None,
                "ready": self.batcher is not None and bool(self.model.providers), "default": self.default,
                "impostor_tail_source": tail_source, "quality_source": self.quality_source}


class ModelRegistry:
    """The served models by name, in configuration order; the first is the default."""

    def __init__(self, models: Iterable[ServedModel]) -> None:
        self._by_name: dict[str, ServedModel] = {}
        by_id: dict[str, str] = {}
        for served in models:
            if served.name in self._by_name:
                raise ModelConfigError(f"model name {served.name!r} is given twice")
            if served.model_id in by_id:
                raise ModelConfigError(f"models {by_id[served.model_id]!r} and {served.name!r} are the same model "
                                       f"({served.model_id}): serve it once")
            self._by_name[served.name] = served
            by_id[served.model_id] = served.name
        if not self._by_name:
            raise ModelConfigError("no model to serve")
        self._by_id = {model_id: self._by_name[name] for model_id, name in by_id.items()}
        self.default = next(iter(self._by_name.values()))

    def get(self, name: str) -> ServedModel:
        """The model served under ``name``; KeyError if none is."""
        return self._by_name[name]

    def by_model_id(self, model_id: str) -> ServedModel:
        """The served model with that model id; KeyError if none is."""
        return self._by_id[model_id]

    def name_of(self, model_id: str) -> str | None:
        served = self._by_id.get(model_id)
        return served.name if served is not None else None

    def names(self) -> list[str]:
        return list(self._by_name)

    def model_ids(self) -> dict[str, int]:
        """model id -> dimension of every served model."""
        return {served.model_id: served.dim for served in self}

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(list(self._by_name.values()))

    def __len__(self) -> int:
        return len(self._by_name)

    async def close(self) -> None:
        """Stop every batcher, then release every session."""
        for served in self:
            await served.batcher.stop()
        for served in self:
            served.model.finalize()
