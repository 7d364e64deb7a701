"""Training input: a folder per identity, or the arcface-tf2 TFRecord layout, as a tf.data pipeline.

Labels are always remapped to ``0..N-1`` (sorted identity names for folders, sorted source ids for
TFRecords), whatever the folder names or ids are, so the margin head has exactly N classes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from .config import TrainConfig

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
# arcface-tf2's TFRecord feature names
SOURCE_ID = "image/source_id"
FILENAME = "image/filename"
ENCODED = "image/encoded"
IMG_PATH = "image/img_path"


@dataclass
class LabelledFiles:
    """Image paths, their labels 0..N-1, and the identity each label stands for."""

    paths: list[str]
    labels: np.ndarray
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def scan_folder(root: str | Path, min_images: int = 1) -> LabelledFiles:
    """``root/<identity>/<image>`` -> files with labels remapped to 0..N-1 in sorted identity order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"training folder {root} does not exist")
    per_identity = {}
    for identity_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(str(f) for f in identity_dir.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if len(files) >= min_images:
            per_identity[identity_dir.name] = files
    if not per_identity:
        raise ValueError(f"no identity folders with >= {min_images} images under {root}")
    class_names = sorted(per_identity)
    paths, labels = [], []
    for label, name in enumerate(class_names):
        paths += per_identity[name]
        labels += [label] * len(per_identity[name])
    log.info("%s: %d images of %d identities", root, len(paths), len(class_names))
    return LabelledFiles(paths, np.asarray(labels, dtype=np.int32), class_names)


def decode_image(data: tf.Tensor, size: int) -> tf.Tensor:
    """Encoded bytes -> size x size x 3 float32 in 0..255 (RGB)."""
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    image = tf.cast(image, tf.float32)
    image = tf.image.resize(image, (size, size)) if image.shape[0] != size else image
    image.set_shape((size, size, 3))
    return image


def augment_image(image: tf.Tensor, size: int, resize_to: int, saturation: tuple[float, float],
                  brightness: float) -> tf.Tensor:
    """arcface-tf2's transform: resize larger -> random crop -> flip -> saturation -> brightness."""
    image = tf.image.resize(image, (resize_to, resize_to))
    image = tf.image.random_crop(image, (size, size, 3))
    image = tf.image.random_flip_left_right(image)
    image = tf.image.random_saturation(image, saturation[0], saturation[1])
    image = tf.image.random_brightness(image, brightness * 255.0)
    return tf.clip_by_value(image, 0.0, 255.0)


def normalise(image: tf.Tensor, mean: float, std: float) -> tf.Tensor:
    """0..255 pixels -> the model's input range; the same (x - mean) / std goes into the contract."""
    return (image - mean) / std


def _finish(ds: tf.data.Dataset, cfg: TrainConfig, training: bool) -> tf.data.Dataset:
    size = cfg.input_size

    def transform(image: tf.Tensor, label: tf.Tensor) -> tuple[dict[str, tf.Tensor], tf.Tensor]:
        if training and cfg.augment:
            image = augment_image(image, size, cfg.resize_to, cfg.saturation, cfg.brightness)
        return {"input_image": normalise(image, cfg.mean, cfg.std), "label": label}, label

    ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE)
    if training:
        ds = ds.repeat()
    ds = ds.batch(cfg.batch_size, drop_remainder=training)
    return ds.prefetch(tf.data.AUTOTUNE)


def folder_dataset(cfg: TrainConfig, training: bool = True) -> tuple[tf.data.Dataset, LabelledFiles]:
    """A folder per identity -> ((images, labels), labels) batches; infinite when training."""
    if not cfg.train_dir:
        raise ValueError("folder_dataset needs train_dir (a folder per identity) in the config")
    files = scan_folder(cfg.train_dir, cfg.min_images_per_identity)
    ds = tf.data.Dataset.from_tensor_slices((files.paths, files.labels))
    if training:
        # shuffle file names (cheap) before decoding, reshuffled every epoch
        ds = ds.shuffle(len(files.paths), seed=cfg.seed, reshuffle_each_iteration=True)

    def load(path: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return decode_image(tf.io.read_file(path), cfg.input_size), label

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)
    return _finish(ds, cfg, training), files


# --- arcface-tf2 TFRecords -------------------------------------------------------------------------

def write_arcface_tfrecord(files: LabelledFiles, out_path: str | Path, binary: bool = True,
                           source_ids: list[int] | None = None) -> Path:
    """Write files in arcface-tf2's layout (binary: JPEG bytes inside; else the path, read at load time).

    ``source_ids`` lets callers (and tests) store arbitrary, non-contiguous ids, as real data has.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    ids = source_ids or list(range(files.num_classes))
    with tf.io.TFRecordWriter(str(out_path)) as writer:
        for path, label in zip(files.paths, files.labels):
            feature = {
                SOURCE_ID: tf.train.Feature(int64_list=tf.train.Int64List(value=[ids[int(label)]])),
                FILENAME: tf.train.Feature(bytes_list=tf.train.BytesList(value=[Path(path).name.encode()])),
            }
            key, payload = (ENCODED, Path(path).read_bytes()) if binary else (IMG_PATH, str(path).encode())
            feature[key] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[payload]))
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    return out_path


# Only the label and one of the image features are required: arcface-tf2's online converter
# (convert_train_tfrecord.py) writes image/source_id and image/img_path and no image/filename.
_FEATURES = {
    SOURCE_ID: tf.io.FixedLenFeature([], tf.int64),
    FILENAME: tf.io.FixedLenFeature([], tf.string, default_value=""),
    ENCODED: tf.io.FixedLenFeature([], tf.string, default_value=""),
    IMG_PATH: tf.io.FixedLenFeature([], tf.string, default_value=""),
}


def tfrecord_source_ids(path: str | Path) -> list[int]:
    """The sorted distinct source ids of a TFRecord (one pass over the ids only)."""
    ids = set()
    spec = {SOURCE_ID: tf.io.FixedLenFeature([], tf.int64)}
    for batch in tf.data.TFRecordDataset(str(path)).batch(4096).map(
            lambda x: tf.io.parse_example(x, spec)[SOURCE_ID]):
        ids.update(batch.numpy().tolist())
    return sorted(ids)


def tfrecord_dataset(cfg: TrainConfig, training: bool = True) -> tuple[tf.data.Dataset, LabelledFiles]:
    """An arcface-tf2 TFRecord (binary or online) -> batches with labels remapped to 0..N-1."""
    path = str(cfg.train_tfrecord)
    source_ids = tfrecord_source_ids(path)
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(source_ids, tf.int64),
                                            tf.range(len(source_ids), dtype=tf.int64)), default_value=-1)
    ds = tf.data.TFRecordDataset(path)
    if training:
        ds = ds.shuffle(cfg.shuffle_buffer, seed=cfg.seed, reshuffle_each_iteration=True)

    def parse(record: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        example = tf.io.parse_single_example(record, _FEATURES)
        data = tf.cond(tf.strings.length(example[ENCODED]) > 0, lambda: example[ENCODED],
                       lambda: tf.io.read_file(example[IMG_PATH]))
        label = tf.cast(table.lookup(example[SOURCE_ID]), tf.int32)
        return decode_image(data, cfg.input_size), label

    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE)
    # only the class list is known without a full pass; paths stay empty for TFRecords
    files = LabelledFiles([], np.zeros(0, np.int32), [str(i) for i in source_ids])
    return _finish(ds, cfg, training), files


def count_tfrecord(path: str | Path) -> int:
    return sum(1 for _ in tf.data.TFRecordDataset(str(path)))


def training_dataset(cfg: TrainConfig) -> tuple[tf.data.Dataset, LabelledFiles, int]:
    """The configured training input, its label mapping and its number of examples."""
    if cfg.train_tfrecord:
        ds, files = tfrecord_dataset(cfg, training=True)
        return ds, files, count_tfrecord(cfg.train_tfrecord)
    if cfg.train_dir:
        ds, files = folder_dataset(cfg, training=True)
        return ds, files, len(files.paths)
    raise ValueError("set train_dir (folder per identity) or train_tfrecord in the config")
