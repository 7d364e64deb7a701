"""Data pipelines: labels remapped to 0..N-1 for folders and arcface-tf2 TFRecords."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from tests.exporter.conftest import TRAIN_FACES, tiny_config

pytestmark = pytest.mark.export
tf = pytest.importorskip("tensorflow")

from exporter.data import folder_dataset, scan_folder, tfrecord_dataset, write_arcface_tfrecord  # noqa: E402


@pytest.fixture
def odd_folder(tmp_path):
    """Identity folders named like real data: non-contiguous numbers, mixed names, one too small."""
    sources = sorted(p for p in TRAIN_FACES.iterdir() if p.is_dir())
    names = ["10177", "2", "zeta", "Alpha"]
    for name, src in zip(names, sources):
        shutil.copytree(src, tmp_path / name)
    (tmp_path / "single").mkdir()
    shutil.copy(next(sources[0].iterdir()), tmp_path / "single" / "x.jpg")
    (tmp_path / "notes.txt").write_text("not an identity")
    return tmp_path


def test_folder_labels_are_remapped_in_sorted_order(odd_folder):
    files = scan_folder(odd_folder, min_images=2)
    assert files.class_names == sorted(["10177", "2", "zeta", "Alpha"])  # 'single' has < 2 images
    assert sorted(set(files.labels.tolist())) == [0, 1, 2, 3]
    for path, label in zip(files.paths, files.labels):
        assert f"/{files.class_names[label]}/" in path


def test_folder_dataset_batches(odd_folder, tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("r"), f"train_dir={odd_folder}", "min_images_per_identity=2")
    ds, files = folder_dataset(cfg, training=True)
    inputs, labels = next(iter(ds))
    assert inputs["input_image"].shape == (8, 112, 112, 3)
    assert np.array_equal(inputs["label"].numpy(), labels.numpy())
    x = inputs["input_image"].numpy()
    assert -1.0 - 1e-6 <= x.min() and x.max() <= 1.0 + 1e-6  # (x - 127.5) / 127.5
    assert set(labels.numpy().tolist()) <= set(range(files.num_classes))


@pytest.mark.parametrize("binary", [True, False])
def test_tfrecord_source_ids_are_remapped(odd_folder, tmp_path, binary):
    files = scan_folder(odd_folder, min_images=2)
    source_ids = [85741, 7, 1000, 42]  # as arcface-tf2 records store them: arbitrary ids
    record = write_arcface_tfrecord(files, tmp_path / "train.tfrecord", binary=binary, source_ids=source_ids)
    cfg = tiny_config(tmp_path, f"train_tfrecord={record}", "augment=false", "batch_size=4")
    ds, mapping = tfrecord_dataset(cfg, training=False)
    assert mapping.class_names == ["7", "42", "1000", "85741"]
    got = np.concatenate([labels.numpy() for _, labels in ds])
    expected = [mapping.class_names.index(str(source_ids[label])) for label in files.labels]
    assert got.tolist() == expected


def test_online_tfrecord_without_filename_loads(odd_folder, tmp_path):
    """arcface-tf2's convert_train_tfrecord.py (online layout) writes exactly these two features."""
    files = scan_folder(odd_folder, min_images=2)
    record = tmp_path / "online.tfrecord"
    with tf.io.TFRecordWriter(str(record)) as writer:
        for path, label in zip(files.paths, files.labels):
            feature = {
                "image/source_id": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label) * 10])),
                "image/img_path": tf.train.Feature(bytes_list=tf.train.BytesList(value=[path.encode()])),
            }
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    cfg = tiny_config(tmp_path, f"train_tfrecord={record}", "augment=false", "batch_size=4")
    ds, mapping = tfrecord_dataset(cfg, training=False)
    assert mapping.class_names == ["0", "10", "20", "30"]
    batches = list(ds)
    got = np.concatenate([labels.numpy() for _, labels in batches])
    assert got.tolist() == files.labels.tolist()
    first = batches[0][0]["input_image"].numpy()
    assert first.shape == (4, 112, 112, 3) and first.std() > 0.05  # real pixels, not an empty image
