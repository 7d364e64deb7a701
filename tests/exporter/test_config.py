"""Config: YAML, CLI overrides, arcface-tf2 config compatibility (no TensorFlow needed)."""

from __future__ import annotations

import pytest

from exporter.config import REPO, ConfigError, load_config


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nbackbone: ResNet50\nbatch_size: 32\nsaturation: [0.5, 1.5]\n")
    cfg = load_config(path, ["batch_size=8", "nesterov=false", "lr_steps=3,6"])
    assert (cfg.name, cfg.backbone, cfg.batch_size, cfg.nesterov) == ("x", "ResNet50", 8, False)
    assert cfg.saturation == (0.5, 1.5) and cfg.lr_steps == (3.0, 6.0)


def test_arcface_tf2_config_keys_are_understood(tmp_path):
    path = tmp_path / "arc_mbv2.yaml"
    path.write_text(
        "batch_size: 128\ninput_size: 112\nembd_shape: 512\nsub_name: 'arc_mbv2'\nbackbone_type: 'MobileNetV2'\n"
        "head_type: ArcHead\nis_ccrop: False\ntrain_dataset: './data/ms1m_bin.tfrecord'\nbinary_img: True\n"
        "num_classes: 85742\nnum_samples: 5822653\nepochs: 5\nbase_lr: 0.01\nw_decay: !!float 5e-4\nsave_steps: 1000\n")
    cfg = load_config(path)
    assert (cfg.name, cfg.backbone, cfg.head, cfg.embedding_size) == ("arc_mbv2", "MobileNetV2", "arcface", 512)
    assert cfg.learning_rate == 0.01 and cfg.train_tfrecord.endswith("ms1m_bin.tfrecord")


@pytest.mark.parametrize("override", ["no_such_key=1", "backbone=VGG16", "head=triplet", "justtext"])
def test_bad_settings_are_refused(override):
    with pytest.raises(ConfigError):
        load_config(None, [override])


def test_shipped_configs_load():
    configs = sorted((REPO / "exporter" / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)
