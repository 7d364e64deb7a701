"""Checkpoints: the arcface-tf2 layout loads into our model; our runs resume and reload."""

from __future__ import annotations

import numpy as np
import pytest

from tests.exporter.conftest import FACES, tiny_config

pytestmark = [
    pytest.mark.export,
    # TF's EagerTensor.__array__ predates numpy 2's copy keyword; harmless, and once per variable here
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
]
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from exporter.backbones import build_backbone, build_embedding_model, embedding_head  # noqa: E402
from exporter.checkpoints import load_embedding_model, load_run, save_arcface_tf2_layout  # noqa: E402
from exporter.images import face_files, load_faces  # noqa: E402
from exporter.margins import MarginHead  # noqa: E402


def arcface_tf2_training_model(cfg, num_classes: int) -> keras.Model:
    """arcface-tf2's ArcFaceModel(training=True) built as that project builds it, in Keras.

    Input 'input_image' -> backbone (one nested layer) -> nested functional 'OutputLayer' -> with an
    Input 'label', a nested 'ArcHead' model holding the margin layer and its 'weights' variable.
    """
    size = cfg.input_size
    x = inputs = keras.Input([size, size, 3], name="input_image")
    backbone = build_backbone(cfg.backbone, size, cfg.alpha)
    x = backbone(x)
    embds = embedding_head(backbone.output.shape, cfg.embedding_size, 0.5, 5e-4)(x)
    labels = keras.Input([], name="label", dtype="int32")
    head_in, head_label = keras.Input(embds.shape[1:]), keras.Input([], dtype="int32")
    arc = MarginHead(num_classes, scale=64, angular_margin=0.5, name="ArcMarginPenaltyLogists")
    arc_head = keras.Model((head_in, head_label), arc([head_in, head_label]), name="ArcHead")
    return keras.Model((inputs, labels), arc_head((embds, labels)), name="arcface_model")


def randomise(model: keras.Model, seed: int = 0) -> None:
    """Non-default values everywhere (BN statistics included), so a missed variable shows."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        shape = tuple(variable.shape)
        if "moving_variance" in variable.path:
            variable.assign(rng.uniform(0.5, 1.5, shape).astype(np.float32))
        else:
            variable.assign((rng.normal(size=shape) * 0.05).astype(np.float32))


def test_arcface_tf2_checkpoint_round_trip(tmp_path):
    cfg = tiny_config(tmp_path, "name=arc_mbv2")
    theirs = arcface_tf2_training_model(cfg, num_classes=7)
    randomise(theirs)
    ckpt_dir = tmp_path / "checkpoints" / "arc_mbv2"
    prefix = save_arcface_tf2_layout(theirs, ckpt_dir / "e_2_b_40.ckpt")
    tf.compat.v1.train.update_checkpoint_state(str(ckpt_dir), prefix)  # what save_weights records

    reader = tf.train.load_checkpoint(prefix)
    keys = reader.get_variable_to_shape_map()
    # the Keras 2 names: backbone, OutputLayer and ArcHead are the model's layers with weights 0, 1, 2
    assert "layer_with_weights-0/layer_with_weights-0/kernel/.ATTRIBUTES/VARIABLE_VALUE" in keys
    assert any(k.startswith("layer_with_weights-0/") and "/depthwise_kernel/" in k for k in keys)
    assert "layer_with_weights-2/layer_with_weights-0/weights/.ATTRIBUTES/VARIABLE_VALUE" in keys

    yaml = tmp_path / "arc_mbv2.yaml"
    yaml.write_text("sub_name: arc_mbv2\nbackbone_type: MobileNetV2\nembd_shape: 128\nhead_type: ArcHead\n")
    cfg_loaded, ours = load_embedding_model(ckpt_dir, config=yaml, overrides=["alpha=0.35"])
    assert (cfg_loaded.mean, cfg_loaded.std) == (0.0, 255.0)  # arcface-tf2 feeds RGB / 255

    faces = load_faces(face_files(FACES, 4)).astype(np.float32) / 255.0
    backbone = next(layer for layer in theirs.layers if layer.name.startswith("mobilenetv2"))
    their_embedding = theirs.get_layer("OutputLayer")(backbone(faces, training=False), training=False)
    np.testing.assert_allclose(np.asarray(ours(faces, training=False)), np.asarray(their_embedding),
                               rtol=1e-5, atol=1e-5)


def test_wrong_backbone_is_refused(tmp_path):
    cfg = tiny_config(tmp_path)
    model = build_embedding_model(cfg)
    prefix = save_arcface_tf2_layout(model, tmp_path / "m.ckpt")
    from exporter.checkpoints import CheckpointError

    with pytest.raises(CheckpointError):
        load_embedding_model(prefix, overrides=["alpha=0.5", "embedding_size=128"])


def test_run_resumes_and_reloads(tiny_run, tmp_path):
    from exporter.train import train

    summary = (tiny_run / "train_summary.json").read_text()
    assert '"steps": 6' in summary
    # resuming a finished run is a no-op; asking for more epochs continues from the checkpoint
    cfg = tiny_config(tiny_run.parent, "name=tiny", "epochs=3", "mode=custom")
    train(cfg)
    assert '"steps": 9' in (tiny_run / "train_summary.json").read_text()

    cfg_loaded, model = load_run(tiny_run)
    faces = load_faces(face_files(FACES, 3)).astype(np.float32)
    x = (faces - cfg_loaded.mean) / cfg_loaded.std
    again = build_embedding_model(cfg_loaded, imagenet_weights=False)
    tf.train.Checkpoint(embedding=again).restore(tf.train.latest_checkpoint(str(tiny_run / "checkpoints"))).expect_partial()
    np.testing.assert_allclose(np.asarray(model(x, training=False)), np.asarray(again(x, training=False)), atol=1e-5)


@pytest.mark.parametrize("yaml_lines, overrides, expected", [
    ("", [], (0.0, 255.0)),  # arcface-tf2's own configs have no mean/std: its RGB / 255
    ("mean: 127.5\nstd: 127.5\n", [], (127.5, 127.5)),  # a YAML that says so is obeyed
    ("mean: 127.5\nstd: 127.5\n", ["mean=0", "std=1"], (0.0, 1.0)),  # overrides beat the YAML
    ("std: 128\n", [], (0.0, 128.0)),  # each key on its own
])
def test_arcface_tf2_normalisation_rule(tmp_path, yaml_lines, overrides, expected):
    """For arcface-tf2 checkpoints 0/255 is the default, never a silent replacement of the YAML's values."""
    cfg = tiny_config(tmp_path)
    prefix = save_arcface_tf2_layout(build_embedding_model(cfg), tmp_path / "m.ckpt")
    yaml = tmp_path / "arc.yaml"
    yaml.write_text("backbone_type: MobileNetV2\nembd_shape: 128\nalpha: 0.35\n" + yaml_lines)
    loaded, _ = load_embedding_model(prefix, config=yaml, overrides=overrides)
    assert (loaded.mean, loaded.std) == expected
