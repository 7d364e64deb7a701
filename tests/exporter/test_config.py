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


def test_values_are_typed_as_on_the_command_line():
    """YAML/CLI values reach their field's type: lists from commas or one number, case-insensitive names,
    numbers as strings where a string is meant, empty as None."""
    cfg = load_config(None, ["lr_steps=4", "saturation=0.5,1.5", "head=NormHead", "optimizer=Adam",
                             "model_version=1.0", "max_steps=", "learning_rate=1e-3", "epochs=3.0"])
    assert cfg.lr_steps == (4.0,) and cfg.saturation == (0.5, 1.5)
    assert (cfg.head, cfg.optimizer, cfg.model_version, cfg.max_steps) == ("softmax", "adam", "1.0", None)
    assert cfg.learning_rate == 1e-3 and cfg.epochs == 3 and isinstance(cfg.epochs, int)
    assert load_config(None, ["head=subcenter"]).subcenters == 3  # sub-center ArcFace gets its 3 centres


@pytest.mark.parametrize("override", ["std=0", "epochs=many", "saturation=0.5", "nesterov=perhaps", "epochs=2.5"])
def test_values_of_the_wrong_type_are_refused(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


def test_assignments_are_checked():
    from pydantic import ValidationError

    cfg = load_config()
    cfg.tensorboard = False  # what train() does without the tensorboard package
    with pytest.raises(ValidationError):
        cfg.backbone = "VGG16"


def test_saved_config_loads_back_equal(tmp_path):
    from exporter.config import save_config

    cfg = load_config(None, ["name=x", "lr_schedule=step", "lr_steps=3,6", "train_dir=/data", "alpha=0.35"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_help_lists_every_key_with_its_default_and_description():
    from exporter.config import TrainConfig, field_help

    lines = field_help().splitlines()
    assert len(lines) == len(TrainConfig.model_fields)
    for line, (name, field) in zip(lines, TrainConfig.model_fields.items()):
        assert field.description, f"{name} has no description"
        assert line == f"  {name} (default {field.default!r}): {field.description}"
    assert "  lr_steps (default ()): step schedule: epochs where lr is divided by 10" in lines
