"""Distillation: train a TF2 student to reproduce the embeddings of any ONNX face model (the teacher).

The teacher is any ONNX file the service can load: it is run by :class:`exporter.evaluate.OnnxEmbedder`
(on service.model.session.FaceSession) and preprocessed purely from its ``face.*`` contract, so nothing
here knows SFace or any other model.
The student is the exporter's own embedding model (ResNet-50 or MobileNetV2 + arcface-tf2's head),
so the run directory it writes exports with ``python -m exporter export RUN`` and evaluates with
``evaluate`` like any trained run.

Data: aligned 112x112 crops in any folder tree (labels, if wanted, are the parent folder names), and
optionally photos, which go through the service's own detection and alignment (YuNet, ArcFace
template) first. Unlabelled crops are enough.

Teacher targets are computed ONCE per run and cached (``<run>/teacher_cache/``), not every epoch:
each image gets ``1 + views`` fixed views (the clean crop and ``views`` random augmentations:
similarity jitter like an alignment error, colour, grey, blur), each also mirrored, and the teacher
embeds every one. The student then trains on exactly the views the teacher saw, so the target is
the teacher's answer for that very image ("consistent" function matching, Beyer et al. 2022), and
the cached pool makes the augmentation cost nothing per step.

Losses (weights in :class:`DistillConfig`):
  * ``cosine``: 1 - cos(student, teacher), through a linear projection when the widths differ (the
    projection is a training aid; the exported model is the student embedding itself);
  * ``relational``: mean squared difference of the two batch cosine-similarity matrices (the
    pairwise structure, which is what verification uses), off the diagonal;
  * ``arcface``: an ArcFace head on the student embedding where labels exist (0 = off).

Checkpoints (``tf.train.Checkpoint``, key ``embedding`` as :mod:`exporter.train` uses) every
``checkpoint_every`` steps: rerunning the same command resumes; ``export`` reads the latest
checkpoint if the run was stopped before it finished. TensorBoard logs in ``<run>/logs``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.model.preprocess import l2_normalise

from .config import REPO, ConfigError, TrainConfig, config_items, load_config, save_config
from .images import face_files

if TYPE_CHECKING:
    import tensorflow as tf

    from .evaluate import Embedder

log = logging.getLogger(__name__)

CACHE_DIR = "teacher_cache"
DISTILL_CONFIG_FILE = "distill.yaml"
DEFAULT_MODEL_CACHE = REPO / ".cache" / "models"


class DistillConfig(BaseModel):
    """A distillation run. Every field is a YAML key and a ``key=value`` override."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str = Field("distill_mbv2", description="run name: outputs go to <output_root>/<name>")
    output_root: str = Field("runs", description="relative to the repo root unless absolute")
    # --- teacher
    teacher: str | None = Field(None, description="ONNX teacher (file or folder with model.onnx); "
                                "empty: the service's default model")
    model_cache_dir: str = Field(str(DEFAULT_MODEL_CACHE), description="where the default model is prepared")
    # --- data
    crops: list[str] = Field(default_factory=list, description="folders of aligned crops (searched recursively)")
    photos: list[str] = Field(default_factory=list,
                              description="folders of photos: detected and aligned by the service's YuNet first")
    limit_images: int | None = Field(None, description="use only the first N images (CI)")
    views: int = Field(3, ge=0, description="augmented views per image cached with their teacher "
                       "embeddings, besides the clean crop; every view also mirrored")
    jitter_scale: float = Field(0.08, ge=0, description="views: max relative scale change")
    jitter_rotate: float = Field(10.0, ge=0, description="views: max rotation, degrees")
    jitter_shift: float = Field(0.06, ge=0, description="views: max shift, fraction of the crop")
    colour: float = Field(0.3, ge=0, description="views: max brightness/contrast/saturation change")
    grey_probability: float = Field(0.15, ge=0, le=1, description="views: probability of a grey view")
    blur_probability: float = Field(0.15, ge=0, le=1, description="views: probability of a blurred view")
    # --- student (the exporter's embedding model)
    backbone: Literal["MobileNetV2", "ResNet50"] = Field("MobileNetV2", description="student backbone")
    alpha: float = Field(1.0, gt=0, description="MobileNetV2 width multiplier")
    embedding_size: int | None = Field(None, description="student width; empty: the teacher's (no projection)")
    dropout: float = Field(0.0, ge=0, lt=1, description="in the embedding head")
    bn_momentum: float = Field(0.9, gt=0, lt=1, description="backbone BatchNorm momentum (short runs: 0.9)")
    mean: float = Field(127.5, description="student input normalisation (x - mean) / std, into its contract")
    std: float = Field(127.5, description="see mean")
    model_name: str = Field("", description="face.model_name of the exported student")
    model_version: str = Field("0.1.0", description="face.model_version of the exported student")
    # --- losses
    cosine_weight: float = Field(1.0, ge=0, description="weight of 1 - cos(student, teacher)")
    relational_weight: float = Field(1.0, ge=0, description="weight of the batch similarity-matrix MSE")
    arcface_weight: float = Field(0.0, ge=0, description="weight of an ArcFace head on folder labels (0: off)")
    arcface_scale: float = Field(32.0, gt=0, description="ArcFace logit scale")
    arcface_margin: float = Field(0.3, ge=0, description="ArcFace angular margin")
    # --- optimisation
    batch_size: int = Field(64, ge=2)
    steps: int = Field(3000, ge=1, description="total optimiser steps")
    learning_rate: float = Field(2e-3, gt=0, description="peak learning rate (AdamW, cosine decay)")
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(1e-4, ge=0, description="decoupled decay on kernels")
    seed: int = 1234
    checkpoint_every: int = Field(200, ge=1, description="steps between checkpoints")
    keep_checkpoints: int = Field(3, ge=1)
    tensorboard: bool = True
    verbose: int = Field(1, description="0 silent, 1 progress bar")

    @property
    def output_dir(self) -> Path:
        root = Path(self.output_root)
        return (root if root.is_absolute() else REPO / root) / self.name


def load_distill_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DistillConfig:
    """YAML file (optional) plus ``key=value`` overrides (values parsed as YAML: lists as [a, b])."""
    data = dict(config_items(path, overrides))
    for key in ("crops", "photos"):
        if isinstance(data.get(key), str):
            data[key] = [data[key]]
    try:
        return DistillConfig(**data)
    except ValidationError as exc:
        raise ConfigError(str(exc)) from exc


# --- data ---------------------------------------------------------------------------------------------

@dataclass
class FaceSet:
    """Aligned crops in memory (N x S x S x 3 uint8 RGB), where each came from, and folder labels."""

    faces: np.ndarray
    sources: list[str]
    labels: np.ndarray
    class_names: list[str]


def _resize(face: np.ndarray, size: int) -> np.ndarray:
    import cv2

    return face if face.shape[0] == size else cv2.resize(face, (size, size), interpolation=cv2.INTER_AREA)


def load_crops(folders: list[str], size: int) -> tuple[list[np.ndarray], list[str]]:
    from .images import load_faces

    paths = [p for folder in folders for p in face_files(folder)]
    faces = [load_faces([p], size)[0] for p in paths]
    return faces, [str(p) for p in paths]


def align_photos(folders: list[str], size: int) -> tuple[list[np.ndarray], list[str]]:
    """Photos -> the largest face of each, aligned by the service's detector and template."""
    from service.faces.detection.align import detect_and_align
    from service.faces.detection.detector import YuNetDetector
    from service.faces.detection.errors import PhotoError
    from service.faces.images import decode_photo

    detector = YuNetDetector()
    faces, sources = [], []
    for folder in folders:
        for path in face_files(folder):
            try:
                aligned = detect_and_align(decode_photo(path.read_bytes()), detector, "largest")
            except PhotoError as exc:
                log.info("skipped photo", extra={"path": str(path), "reason": type(exc).__name__})
                continue
            faces.append(_resize(aligned[0].crop, size))
            sources.append(str(path))
    log.info("aligned %d faces from photos", len(faces))
    return faces, sources


def load_face_set(cfg: DistillConfig, size: int) -> FaceSet:
    faces, sources = load_crops(cfg.crops, size)
    if cfg.photos:
        more, more_sources = align_photos(cfg.photos, size)
        faces += more
        sources += more_sources
    if cfg.limit_images:
        faces, sources = faces[:cfg.limit_images], sources[:cfg.limit_images]
    if not faces:
        raise ConfigError("no training faces: set crops (folders of aligned crops) and/or photos")
    names = [Path(s).parent.name for s in sources]
    class_names = sorted(set(names))
    index = {n: i for i, n in enumerate(class_names)}
    return FaceSet(np.stack(faces), sources, np.asarray([index[n] for n in names], np.int32), class_names)


def augment_view(face: np.ndarray, rng: np.random.Generator, cfg: DistillConfig) -> np.ndarray:
    """One random view: similarity jitter (an alignment error), colour, sometimes grey or blurred."""
    import cv2

    size = face.shape[0]
    angle = rng.uniform(-cfg.jitter_rotate, cfg.jitter_rotate)
    scale = 1.0 + rng.uniform(-cfg.jitter_scale, cfg.jitter_scale)
    matrix = cv2.getRotationMatrix2D((size / 2, size / 2), angle, scale)
    matrix[:, 2] += rng.uniform(-cfg.jitter_shift, cfg.jitter_shift, 2) * size
    out = cv2.warpAffine(face, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)
    x = out.astype(np.float32)
    grey = x @ np.asarray([0.299, 0.587, 0.114], np.float32)
    saturation = 1.0 + rng.uniform(-cfg.colour, cfg.colour)
    x = grey[..., None] + saturation * (x - grey[..., None])
    contrast = 1.0 + rng.uniform(-cfg.colour, cfg.colour)
    x = (x - x.mean()) * contrast + x.mean() + rng.uniform(-cfg.colour, cfg.colour) * 100.0
    if rng.random() < cfg.grey_probability:
        x = np.repeat((x @ np.asarray([0.299, 0.587, 0.114], np.float32))[..., None], 3, axis=2)
    out = np.clip(x, 0, 255).astype(np.uint8)
    if rng.random() < cfg.blur_probability:
        out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.6, 1.6))
    return out


@dataclass
class TeacherCache:
    """Every cached view (N x V x S x S x 3 uint8, memory-mapped) and the teacher's embedding of each."""

    views: np.ndarray
    targets: np.ndarray  # N x V x D float32, L2-normalised
    teacher_id: str


def _cache_key(cfg: DistillConfig, sources: list[str], teacher: Path, size: int) -> str:
    h = hashlib.sha256()
    for part in [str(teacher), str(teacher.stat().st_size), str(size), str(cfg.views), str(cfg.seed),
                 cfg.model_dump_json(include={"jitter_scale", "jitter_rotate", "jitter_shift", "colour",
                                              "grey_probability", "blur_probability"}), *sources]:
        h.update(part.encode())
    return h.hexdigest()[:16]


def build_teacher_cache(cfg: DistillConfig, data: FaceSet, teacher: Embedder, teacher_path: Path, cache_dir: Path,
                        batch_size: int = 64, teacher_batch: int = 32) -> TeacherCache:
    """Make (or reuse) the views and their teacher embeddings; the one pass of the teacher per run."""
    size = data.faces.shape[1]
    key = _cache_key(cfg, data.sources, teacher_path, size)
    views_path, targets_path = cache_dir / f"views-{key}.npy", cache_dir / f"targets-{key}.npy"
    if views_path.exists() and targets_path.exists():
        log.info("teacher cache %s reused", key)
        return TeacherCache(np.load(views_path, mmap_mode="r"), np.load(targets_path), teacher.label)
    cache_dir.mkdir(parents=True, exist_ok=True)
    n, per_image = len(data.faces), 2 * (1 + cfg.views)
    tmp_views = cache_dir / f"views-{key}.tmp.npy"
    views = np.lib.format.open_memmap(tmp_views, mode="w+", dtype=np.uint8, shape=(n, per_image, size, size, 3))
    targets = None
    rng = np.random.default_rng(cfg.seed)
    start = time.monotonic()
    teacher_size = teacher.input_size
    for lo in range(0, n, batch_size):
        batch: list[list[np.ndarray]] = []
        for face in data.faces[lo:lo + batch_size]:
            clean = [face] + [augment_view(face, rng, cfg) for _ in range(cfg.views)]
            batch.append(clean + [np.ascontiguousarray(v[:, ::-1]) for v in clean])
        block = np.asarray(batch)  # b x V x S x S x 3
        views[lo:lo + len(block)] = block
        flat = block.reshape(-1, size, size, 3)
        if teacher_size != size:
            flat = np.stack([_resize(f, teacher_size) for f in flat])
        # the teacher sees at most teacher_batch faces at a time: onnxruntime's arena grows with the
        # batch (SFace at 512 faces a call held ~10 GB)
        emb = np.concatenate([np.asarray(teacher(flat[i:i + teacher_batch]), np.float32)
                              for i in range(0, len(flat), teacher_batch)])
        emb = l2_normalise(emb)
        if targets is None:
            targets = np.zeros((n, per_image, emb.shape[1]), np.float32)
        targets[lo:lo + len(block)] = emb.reshape(len(block), per_image, -1)
        log.info("teacher cache: %d / %d images (%.0fs)", min(lo + batch_size, n), n, time.monotonic() - start)
    if targets is None:
        raise ValueError("no faces to make a teacher cache of")
    views.flush()
    del views
    np.save(targets_path, targets)
    tmp_views.replace(views_path)  # last: a cache is complete when both files exist
    (cache_dir / f"cache-{key}.json").write_text(json.dumps(
        {"teacher": teacher.label, "teacher_path": str(teacher_path), "images": n, "views_per_image": per_image,
         "seconds": round(time.monotonic() - start, 1)}, indent=1) + "\n")
    return TeacherCache(np.load(views_path, mmap_mode="r"), targets, teacher.label)


# --- student and losses -----------------------------------------------------------------------------

def student_config(cfg: DistillConfig, teacher_dim: int) -> TrainConfig:
    """The student's TrainConfig: what ``export``/``evaluate`` read back from the run directory."""
    return load_config(None, [
        f"name={cfg.name}", f"backbone={cfg.backbone}", f"alpha={cfg.alpha}",
        f"embedding_size={cfg.embedding_size or teacher_dim}", f"dropout={cfg.dropout}", "weight_decay=0",
        f"mean={cfg.mean}", f"std={cfg.std}", f"output_root={cfg.output_root}",
        f"model_name={cfg.model_name or f'distilled-{cfg.backbone.lower()}-{cfg.name}'}",
        f"model_version={cfg.model_version}", "augment=false",
    ])


def relational_loss(student: tf.Tensor, teacher: tf.Tensor) -> tf.Tensor:
    """Mean squared difference of the off-diagonal batch cosine matrices (inputs L2-normalised)."""
    import tensorflow as tf

    diff = tf.matmul(student, student, transpose_b=True) - tf.matmul(teacher, teacher, transpose_b=True)
    n = tf.cast(tf.shape(student)[0], tf.float32)
    return tf.reduce_sum(tf.square(diff)) / tf.maximum(n * (n - 1.0), 1.0)  # the diagonal is 0 - 0


class _StopOnSignal:
    """SIGTERM/SIGINT ask the loop to stop after the current step (checkpoint and weights are then saved),
    so a run can be cut to fit a time budget and still export."""

    def __init__(self) -> None:
        import signal

        self.requested = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no signal handling
                pass

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        log.info("stop requested (signal %d): finishing the current step", signum)

    def restore(self) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class DistillResult:
    run_dir: Path
    steps: int
    seconds: float
    final_loss: float
    teacher: str


def distill(cfg: DistillConfig, resume: bool = True) -> DistillResult:
    """Run a distillation per ``cfg``; returns where the student is (a run directory ``export`` reads)."""
    import keras
    import tensorflow as tf

    from service.model.prepare import resolve_model_path

    from .backbones import build_embedding_model
    from .checkpoints import CHECKPOINT_DIR, save_run
    from .evaluate import OnnxEmbedder
    from .margins import margin_head
    from .train import tensorboard_available

    keras.utils.set_random_seed(cfg.seed)
    run_dir = cfg.output_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / DISTILL_CONFIG_FILE).write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))

    teacher_path = resolve_model_path(Path(cfg.teacher) if cfg.teacher else None, Path(cfg.model_cache_dir))
    teacher = OnnxEmbedder(teacher_path)
    student_size = 112
    data = load_face_set(cfg, student_size)
    log.info("distilling %s into %s: %d faces, %d folders", teacher.label, cfg.backbone, len(data.faces),
             len(data.class_names))
    cache = build_teacher_cache(cfg, data, teacher, teacher_path, run_dir / CACHE_DIR)
    teacher_dim = cache.targets.shape[2]

    scfg = student_config(cfg, teacher_dim)
    save_config(scfg, run_dir / "config.yaml")
    student = build_embedding_model(scfg, imagenet_weights=False)
    for layer in student.get_layer(index=1).layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = cfg.bn_momentum
    projection = (keras.layers.Dense(teacher_dim, use_bias=False, name="projection")
                  if scfg.embedding_size != teacher_dim else None)
    if projection is not None:
        projection.build((None, scfg.embedding_size))
    head = None
    if cfg.arcface_weight > 0:
        head = margin_head("arcface", len(data.class_names), scale=cfg.arcface_scale, margin=cfg.arcface_margin)
        head.build((None, scfg.embedding_size))

    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=cfg.learning_rate * 0.01 if cfg.warmup_steps else cfg.learning_rate,
        decay_steps=max(cfg.steps - cfg.warmup_steps, 1), alpha=0.01,
        warmup_target=cfg.learning_rate if cfg.warmup_steps else None, warmup_steps=cfg.warmup_steps)
    optimizer = keras.optimizers.AdamW(schedule, weight_decay=cfg.weight_decay or None)
    if cfg.weight_decay:
        optimizer.exclude_from_weight_decay(var_names=["gamma", "beta", "bias", "moving"])
    variables = student.trainable_variables + (projection.trainable_variables if projection else []) + (
        head.trainable_variables if head else [])

    step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    parts = {"embedding": student, "optimizer": optimizer, "step": step}
    if projection is not None:
        parts["projection"] = projection
    if head is not None:
        parts["head"] = head
    checkpoint = tf.train.Checkpoint(**parts)
    manager = tf.train.CheckpointManager(checkpoint, str(run_dir / CHECKPOINT_DIR), max_to_keep=cfg.keep_checkpoints)
    stale = run_dir / "embedding.weights.h5"  # export prefers final weights to checkpoints:
    if stale.exists():  # weights from an earlier stop must not shadow what this session trains
        stale.unlink()
    if resume and manager.latest_checkpoint:
        optimizer.build(variables)
        checkpoint.restore(manager.latest_checkpoint)
        log.info("resumed from %s at step %d", manager.latest_checkpoint, int(step.numpy()))

    @tf.function
    def train_step(images: tf.Tensor, targets: tf.Tensor,
                   labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
        with tf.GradientTape() as tape:
            raw = student((tf.cast(images, tf.float32) - cfg.mean) / cfg.std, training=True)
            mapped = projection(raw) if projection is not None else raw
            s = tf.math.l2_normalize(mapped, axis=1)
            cos = tf.reduce_sum(s * targets, axis=1)
            cosine = tf.reduce_mean(1.0 - cos)
            relational = relational_loss(s, targets)
            loss = cfg.cosine_weight * cosine + cfg.relational_weight * relational
            if head is not None:
                logits = head([raw, labels])
                arc = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))
                loss += cfg.arcface_weight * arc
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(grads, variables))
        return loss, cosine, relational, tf.reduce_mean(cos)

    writer = None
    if cfg.tensorboard and tensorboard_available():
        writer = tf.summary.create_file_writer(str(run_dir / "logs" / "distill"))
    rng = np.random.default_rng(cfg.seed + int(step.numpy()))  # a resumed run draws new batches
    n, per_image = cache.targets.shape[:2]
    progbar = keras.utils.Progbar(cfg.steps, verbose=cfg.verbose, stateful_metrics=["mean_cos"])
    start, loss = time.monotonic(), float("nan")
    stop = _StopOnSignal()
    while int(step.numpy()) < cfg.steps and not stop.requested:
        images_idx = np.sort(rng.choice(n, size=min(cfg.batch_size, n), replace=False))
        views_idx = rng.integers(0, per_image, size=len(images_idx))
        images = np.asarray(cache.views[images_idx, views_idx])
        targets = cache.targets[images_idx, views_idx]
        out = train_step(tf.constant(images), tf.constant(targets), tf.constant(data.labels[images_idx]))
        loss, cosine, relational, mean_cos = (float(v) for v in out)
        if not math.isfinite(loss):
            raise FloatingPointError(f"distillation loss is {loss} at step {int(step.numpy())}")
        step.assign_add(1)
        current = int(step.numpy())
        progbar.update(current, [("loss", loss), ("cosine", cosine), ("relational", relational),
                                 ("mean_cos", mean_cos)])
        if writer is not None and (current % 10 == 0 or current == cfg.steps):
            with writer.as_default():
                for name, value in (("loss", loss), ("cosine_loss", cosine), ("relational_loss", relational),
                                    ("mean_cosine", mean_cos)):
                    tf.summary.scalar(name, value, step=current)
                tf.summary.scalar("learning_rate", schedule(current - 1), step=current)
        if current % cfg.checkpoint_every == 0 or current == cfg.steps:
            manager.save(checkpoint_number=current)
            log.info("checkpoint at step %d", current, extra={"step": current, "loss": loss, "mean_cos": mean_cos})
    stop.restore()
    elapsed = time.monotonic() - start
    if stop.requested:  # a stopped run keeps its exact last step, exportable like a finished one
        manager.save(checkpoint_number=int(step.numpy()))
        log.info("stopped by signal at step %d of %d", int(step.numpy()), cfg.steps)
    save_run(run_dir, scfg, student, data.class_names)
    summary = {"name": cfg.name, "teacher": cache.teacher_id, "teacher_path": str(teacher_path),
               "steps": int(step.numpy()), "steps_planned": cfg.steps, "stopped_early": stop.requested,
               "seconds_this_session": round(elapsed, 1), "images": int(n),
               "views_per_image": int(per_image), "final_loss": loss}
    (run_dir / "distill_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return DistillResult(run_dir, int(step.numpy()), elapsed, loss, cache.teacher_id)
