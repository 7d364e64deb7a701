"""Training configuration: a YAML file, then ``key=value`` overrides from the command line.

Every field has a default, so a YAML file only needs what differs. Unknown keys are an error (a
typo in a config should not silently train the wrong model).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

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


@dataclass
class TrainConfig:
    """Everything that defines a training run. Field comments are the ``--help`` of each key."""

    name: str = "arc_mbv2"  # run name: outputs go to <output_root>/<name>
    # --- model
    backbone: str = "MobileNetV2"  # MobileNetV2 or ResNet50 (Keras applications)
    alpha: float = 1.0  # MobileNetV2 width multiplier (0.35 keeps CI fast)
    input_size: int = 112  # square aligned crop
    embedding_size: int = 512  # output width of the embedding
    dropout: float = 0.5  # in the embedding head, before Flatten (arcface-tf2's OutputLayer)
    weight_decay: float = 5e-4  # L2 on the embedding Dense and the margin head weights
    backbone_weight_decay: float = 0.0  # decoupled decay on backbone kernels (optimizer weight_decay)
    imagenet_weights: str | None = None  # local .h5 of ImageNet weights (no download ever)
    # --- margin head (one layer: ArcFace, sub-center ArcFace, CosFace or normalised softmax)
    head: str = "arcface"  # arcface | subcenter | cosface | softmax
    scale: float = 64.0  # logit scale s
    margin: float = 0.5  # angular margin m (ArcFace) or cosine margin (CosFace)
    subcenters: int = 1  # K sub-centres per class (sub-center ArcFace uses 3)
    easy_margin: bool = False  # apply the margin only where cos > 0 instead of the pi fallback
    # --- input normalisation, applied to 0..255 RGB pixels: (x - mean) / std; written to the contract
    mean: float = 127.5  # per-channel mean subtracted from 0..255 RGB pixels (arcface-tf2 models: 0)
    std: float = 127.5  # divisor after the mean (arcface-tf2 models: 255)
    # --- data
    train_dir: str | None = None  # folder per identity of aligned crops
    train_tfrecord: str | None = None  # or an arcface-tf2 TFRecord (binary or online layout)
    min_images_per_identity: int = 1
    augment: bool = True  # resize, random crop, flip, colour jitter
    resize_to: int = 128  # random crop comes from this size
    saturation: tuple[float, float] = (0.6, 1.4)
    brightness: float = 0.125  # max delta as a fraction of the 0..255 range
    shuffle_buffer: int = 10000
    # --- optimisation
    mode: str = "fit"  # fit (Keras fit) or custom (tf.GradientTape loop)
    optimizer: str = "sgd"  # sgd or adam
    learning_rate: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    lr_schedule: str = "cosine"  # cosine | step | constant
    warmup_epochs: float = 1.0
    lr_steps: tuple[float, ...] = ()  # step schedule: epochs where lr is divided by 10
    batch_size: int = 64
    epochs: int = 10
    steps_per_epoch: int | None = None  # default: one pass over the data
    max_steps: int | None = None  # stop early (CI); None = epochs * steps_per_epoch
    label_smoothing: float = 0.0
    bn_recalibration_steps: int = 50  # after training: re-estimate BN statistics on clean images (0: off)
    seed: int = 1234
    # --- outputs
    output_root: str = "runs"  # relative to the repo root unless absolute
    checkpoint_every_steps: int = 0  # 0: at each epoch end only
    keep_checkpoints: int = 3
    tensorboard: bool = True
    verbose: int = 1  # 0 silent, 1 progress bar, 2 one line per epoch
    model_name: str = ""  # face.model_name written at export; default "arcface-<backbone>-<name>"
    model_version: str = "0.1.0"

    @property
    def output_dir(self) -> Path:
        root = Path(self.output_root)
        if not root.is_absolute():
            root = REPO / root
        return root / self.name

    def validate(self) -> TrainConfig:
        if self.backbone not in ("MobileNetV2", "ResNet50"):
            raise ConfigError(f"backbone must be MobileNetV2 or ResNet50, got {self.backbone!r}")
        if self.head not in ("arcface", "subcenter", "cosface", "softmax"):
            raise ConfigError(f"head must be arcface, subcenter, cosface or softmax, got {self.head!r}")
        if self.mode not in ("fit", "custom"):
            raise ConfigError(f"mode must be fit or custom, got {self.mode!r}")
        if self.optimizer not in ("sgd", "adam"):
            raise ConfigError(f"optimizer must be sgd or adam, got {self.optimizer!r}")
        if self.lr_schedule not in ("cosine", "step", "constant"):
            raise ConfigError(f"lr_schedule must be cosine, step or constant, got {self.lr_schedule!r}")
        if self.std == 0:
            raise ConfigError("std must not be 0")
        if self.head == "subcenter" and self.subcenters < 2:
            self.subcenters = 3  # sub-center ArcFace without sub-centres is plain ArcFace
        return self

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    def export_model_name(self) -> str:
        return self.model_name or f"arcface-{self.backbone.lower()}-{self.name}"


def _coerce(name: str, value: Any) -> Any:
    """Bring a YAML/CLI value to the field's type."""
    default = next(f for f in fields(TrainConfig) if f.name == name).default
    if name in ("saturation", "lr_steps"):
        if isinstance(value, str):
            value = [float(v) for v in value.split(",") if v.strip()]
        return tuple(float(v) for v in value)
    if value is None:
        return None
    if isinstance(default, bool):
        if isinstance(value, str):
            return value.lower() in ("1", "true", "yes", "on")
        return bool(value)
    if isinstance(default, int) and not isinstance(default, bool):
        return int(value)
    if isinstance(default, float):
        return float(value)
    if name in ("steps_per_epoch", "max_steps"):
        return int(value)
    return value


def _apply(cfg: TrainConfig, key: str, value: Any) -> None:
    key = ARCFACE_TF2_ALIASES.get(key, key)
    if key in ARCFACE_TF2_IGNORED:
        return
    known = {f.name for f in fields(TrainConfig)}
    if key not in known:
        raise ConfigError(f"unknown config key {key!r} (known: {', '.join(sorted(known))})")
    if key == "head" and isinstance(value, str):
        value = HEAD_ALIASES.get(value.lower(), value.lower())
    if key == "optimizer" and isinstance(value, str):
        value = value.lower()
    setattr(cfg, key, _coerce(key, value))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                defaults: dict[str, Any] | None = None) -> TrainConfig:
    """A config from a YAML file (optional) with ``key=value`` overrides applied on top.

    Precedence, lowest first: TrainConfig's defaults, ``defaults`` (a source's own conventions, e.g.
    arcface-tf2's 0/255 normalisation), the YAML file, the overrides.
    """
    cfg = TrainConfig()
    for key, value in (defaults or {}).items():
        _apply(cfg, key, value)
    if path:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        for key, value in data.items():
            _apply(cfg, key, value)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        _apply(cfg, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return cfg.validate()


def save_config(cfg: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def field_help() -> str:
    """One line per config key with its default, for ``--help``."""
    import inspect

    source = inspect.getsource(TrainConfig)
    comments = {}
    for line in source.splitlines():
        stripped = line.strip()
        if ":" in stripped and "#" in stripped and not stripped.startswith("#"):
            name = stripped.split(":", 1)[0].strip()
            comments[name] = stripped.split("#", 1)[1].strip()
    lines = []
    for f in fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  {f.name} (default {default!r}){': ' + comments[f.name] if f.name in comments else ''}")
    return "\n".join(lines)
