"""Training configuration: a YAML file, then ``key=value`` overrides from the command line.

Every field has a default, so a YAML file only needs what differs. Unknown keys are an error (a
typo in a config should not silently train the wrong model).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

REPO = Path(__file__).resolve().parents[1]

# The arcface-tf2 project's names for the same settings, accepted so its configs load unchanged.
ARCFACE_TF2_ALIASES = {
    "sub_name": "name",
    "backbone_type": "backbone",
    "embd_shape": "embedding_size",
    "head_type": "head",
    "base_lr": "learning_rate",
    "w_decay": "weight_decay",
    "train_dataset": "train_tfrecord",
}
# arcface-tf2 keys with no effect here (is_ccrop has none there either)
ARCFACE_TF2_IGNORED = {"is_ccrop", "binary_img", "num_classes", "num_samples", "test_dataset", "save_steps"}
HEAD_ALIASES = {"archead": "arcface", "normhead": "softmax"}


class ConfigError(ValueError):
    """A configuration file or override is invalid."""


Backbone = Literal["MobileNetV2", "ResNet50"]
Head = Literal["arcface", "subcenter", "cosface", "softmax"]


class TrainConfig(BaseModel):
    """Everything that defines a training run. Each field's description is its ``--help`` line."""

    # str fields accept YAML numbers (model_version=1.0 means "1.0"); assignments are checked too
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True,
                              protected_namespaces=())

    name: str = Field("arc_mbv2", description="run name: outputs go to <output_root>/<name>")
    # --- model
    backbone: Backbone = Field("MobileNetV2", description="MobileNetV2 or ResNet50 (Keras applications)")
    alpha: float = Field(1.0, description="MobileNetV2 width multiplier (0.35 keeps CI fast)")
    input_size: int = Field(112, description="square aligned crop")
    embedding_size: int = Field(512, description="output width of the embedding")
    dropout: float = Field(0.5, description="in the embedding head, before Flatten (arcface-tf2's OutputLayer)")
    weight_decay: float = Field(5e-4, description="L2 on the embedding Dense and the margin head weights")
    backbone_weight_decay: float = Field(0.0, description="decoupled decay on backbone kernels (optimizer weight_decay)")
    imagenet_weights: str | None = Field(None, description="local .h5 of ImageNet weights (no download ever)")
    # --- margin head (one layer: ArcFace, sub-center ArcFace, CosFace or normalised softmax)
    head: Head = Field("arcface", description="arcface | subcenter | cosface | softmax")
    scale: float = Field(64.0, description="logit scale s")
    margin: float = Field(0.5, description="angular margin m (ArcFace) or cosine margin (CosFace)")
    subcenters: int = Field(1, description="K sub-centres per class (sub-center ArcFace uses 3)")
    easy_margin: bool = Field(False, description="apply the margin only where cos > 0 instead of the pi fallback")
    # --- input normalisation, applied to 0..255 RGB pixels: (x - mean) / std; written to the contract
    mean: float = Field(127.5, description="per-channel mean subtracted from 0..255 RGB pixels "
                        "(arcface-tf2 models: 0)")
    std: float = Field(127.5, description="divisor after the mean (arcface-tf2 models: 255)")
    # --- data
    train_dir: str | None = Field(None, description="folder per identity of aligned crops")
    train_tfrecord: str | None = Field(None, description="or an arcface-tf2 TFRecord (binary or online layout)")
    min_images_per_identity: int = Field(1, description="train_dir identities with fewer images are left out")
    augment: bool = Field(True, description="resize, random crop, flip, colour jitter")
    resize_to: int = Field(128, description="random crop comes from this size")
    saturation: tuple[float, float] = Field((0.6, 1.4), description="random saturation factor range (low, high)")
    brightness: float = Field(0.125, description="max delta as a fraction of the 0..255 range")
    shuffle_buffer: int = Field(10000, description="shuffle buffer of a TFRecord, in records (train_dir shuffles every file)")
    # --- optimisation
    mode: Literal["fit", "custom"] = Field("fit", description="fit (Keras fit) or custom (tf.GradientTape loop)")
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="sgd or adam")
    learning_rate: float = Field(0.1, description="peak learning rate (after warm-up)")
    momentum: float = Field(0.9, description="SGD momentum")
    nesterov: bool = Field(True, description="Nesterov momentum (SGD)")
    lr_schedule: Literal["cosine", "step", "constant"] = Field("cosine", description="cosine | step | constant")
    warmup_epochs: float = Field(1.0, description="linear warm-up from 1% of learning_rate (cosine schedule)")
    lr_steps: tuple[float, ...] = Field((), description="step schedule: epochs where lr is divided by 10")
    batch_size: int = Field(64, description="images per training step")
    epochs: int = Field(10, description="passes of steps_per_epoch steps")
    steps_per_epoch: int | None = Field(None, description="default: one pass over the data")
    max_steps: int | None = Field(None, description="stop early (CI); None = epochs * steps_per_epoch")
    label_smoothing: float = Field(0.0, description="of the margin loss's one-hot targets")
    bn_recalibration_steps: int = Field(50, description="after training: re-estimate BN statistics on clean "
                                        "images (0: off)")
    seed: int = Field(1234, description="Keras/NumPy/TF random seed")
    # --- outputs
    output_root: str = Field("runs", description="relative to the repo root unless absolute")
    checkpoint_every_steps: int = Field(0, description="0: at each epoch end only")
    keep_checkpoints: int = Field(3, description="training checkpoints kept")
    tensorboard: bool = Field(True, description="write TensorBoard logs to <run>/logs")
    verbose: int = Field(1, description="0 silent, 1 progress bar, 2 one line per epoch")
    model_name: str = Field("", description='face.model_name written at export; default "arcface-<backbone>-<name>"')
    model_version: str = Field("0.1.0", description="face.model_version written at export")

    @field_validator("head", "optimizer", mode="before")
    @classmethod
    def _lower(cls, value: Any, info: ValidationInfo) -> Any:
        """Names are case-insensitive; arcface-tf2's head names (ArcHead, NormHead) map to ours."""
        if not isinstance(value, str):
            return value
        value = value.lower()
        return HEAD_ALIASES.get(value, value) if info.field_name == "head" else value

    @field_validator("saturation", "lr_steps", mode="before")
    @classmethod
    def _float_list(cls, value: Any) -> Any:
        """``lr_steps=3,6`` on the command line; a single number is a one-element list."""
        if isinstance(value, str):
            return [float(v) for v in value.split(",") if v.strip()]
        if isinstance(value, (int, float)):
            return [value]
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.std == 0:
            raise ValueError("std must not be 0")
        if self.head == "subcenter" and self.subcenters < 2:
            self.subcenters = 3  # sub-center ArcFace without sub-centres is plain ArcFace
        return self

    @property
    def output_dir(self) -> Path:
        root = Path(self.output_root)
        if not root.is_absolute():
            root = REPO / root
        return root / self.name

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-safe values (tuples as lists)."""
        return self.model_dump(mode="json")

    def export_model_name(self) -> str:
        return self.model_name or f"arcface-{self.backbone.lower()}-{self.name}"


def _normalised(key: str, value: Any, data: dict[str, Any]) -> None:
    """Put one YAML/CLI setting into ``data`` under its TrainConfig name (aliases and ignored keys resolved)."""
    key = ARCFACE_TF2_ALIASES.get(key, key)
    if key in ARCFACE_TF2_IGNORED:
        return
    if key not in TrainConfig.model_fields:
        raise ConfigError(f"unknown config key {key!r} (known: {', '.join(sorted(TrainConfig.model_fields))})")
    data[key] = value


def _describe(exc: ValidationError) -> str:
    """pydantic's errors as one line: ``key: what is wrong (got value)``."""
    parts = []
    for error in exc.errors():
        message = error["msg"].removeprefix("Value error, ")
        where = ".".join(str(p) for p in error["loc"])
        parts.append(f"{where}: {message} (got {error['input']!r})" if where else message)
    return "; ".join(parts)


def config_items(path: str | Path | None, overrides: list[str] | None) -> Iterator[tuple[str, Any]]:
    """(key, value) of each setting of the YAML file (optional), then of each ``key=value`` override
    (values parsed as YAML: lists as [a, b]), in that order: later ones win."""
    if path:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        yield from loaded.items()
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        yield key.strip(), yaml.safe_load(raw) if raw.strip() else None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                defaults: dict[str, Any] | None = None) -> TrainConfig:
    """A config from a YAML file (optional) with ``key=value`` overrides applied on top.

    Precedence, lowest first: TrainConfig's defaults, ``defaults`` (a source's own conventions, e.g.
    arcface-tf2's 0/255 normalisation), the YAML file, the overrides (values parsed as YAML).
    """
    data: dict[str, Any] = {}
    for key, value in itertools.chain((defaults or {}).items(), config_items(path, overrides)):
        _normalised(key, value, data)
    try:
        return TrainConfig(**data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_describe(exc)}" if path else _describe(exc)) from exc


def save_config(cfg: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def field_help(model: type[BaseModel] = TrainConfig) -> str:
    """One line per config key of ``model`` with its default and description, for ``--help``."""
    lines = []
    for name, field in model.model_fields.items():
        default = field.get_default(call_default_factory=True)
        lines.append(f"  {name} (default {default!r}){': ' + field.description if field.description else ''}")
    return "\n".join(lines)
