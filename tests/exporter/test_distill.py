"""Distillation, for real and small: the default model teaches a tiny MobileNetV2 on the fixture faces
(crops, and photos through the service's detector), which then exports with parity and is evaluated
next to its teacher."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.exporter.conftest import FIXTURES, TRAIN_FACES, write_pairs

pytestmark = [pytest.mark.export,
              pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")]
tf = pytest.importorskip("tensorflow")

TINY = ["backbone=MobileNetV2", "alpha=0.35", "batch_size=8", "views=1", "verbose=0", "warmup_steps=0",
        "learning_rate=0.001", "model_name=distilled-ci", "model_version=ci"]


def tiny(tmp, *overrides):
    from exporter.distill import load_distill_config

    return load_distill_config(None, [f"output_root={tmp}", f"crops=[{TRAIN_FACES}]", *TINY, *overrides])


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """4 real steps; crops plus the fixture photos aligned by YuNet; teacher = the default model."""
    from exporter.distill import distill

    root = tmp_path_factory.mktemp("distill")
    cfg = tiny(root, "name=student", "steps=4", "checkpoint_every=2", f"photos=[{FIXTURES / 'photos'}]")
    return distill(cfg)


def test_teacher_cache_holds_the_teachers_answers(student):
    from exporter.config import REPO
    from exporter.evaluate import OnnxEmbedder
    from service.model.prepare import default_model

    cache = student.run_dir / "teacher_cache"
    views = np.load(next(cache.glob("views-*.npy")))
    targets = np.load(next(cache.glob("targets-*.npy")))
    meta = json.loads(next(cache.glob("cache-*.json")).read_text())
    # 24 crops + the photos YuNet found a face in; clean + 1 augmented view, each mirrored
    assert views.shape[0] == meta["images"] > 24 and views.shape[1] == 4 == meta["views_per_image"]
    assert targets.shape == (views.shape[0], 4, 128)
    np.testing.assert_array_equal(views[:, 2], views[:, 0, :, ::-1])  # view 2 is the mirror of view 0
    assert not np.array_equal(views[:, 1], views[:, 0])  # the augmented view differs
    teacher = OnnxEmbedder(default_model(REPO / ".cache" / "models"))
    expected = np.asarray(teacher(views[:5].reshape(-1, 112, 112, 3)), np.float64)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(targets[:5].reshape(-1, 128), expected, atol=1e-5)
    assert (student.run_dir / "logs" / "distill").is_dir()  # TensorBoard
    assert student.steps == 4 and np.isfinite(student.final_loss)


def test_student_exports_with_parity_and_is_evaluated_next_to_teacher(student, tmp_path):
    from exporter.config import REPO
    from exporter.evaluate import EvaluateOptions, OnnxEmbedder, evaluate_model, plot_report, write_report
    from exporter.export import ExportOptions, export_model
    from service.model.contract import read_contract
    from service.model.prepare import default_model

    out = export_model(student.run_dir, tmp_path / "student.onnx", ExportOptions(threshold=0.3))
    assert out["parity_fp32"]["min_cosine"] >= 0.99999
    contract = read_contract(out["onnx"])
    assert contract.model_id == "distilled-ci@ci" and contract.embedding_size == 128  # the teacher's width
    pairs = write_pairs(tmp_path / "pairs.txt", TRAIN_FACES)
    options = EvaluateOptions(images=TRAIN_FACES, flip=False)
    teacher = evaluate_model(OnnxEmbedder(default_model(REPO / ".cache" / "models")), pairs, options)
    write_report(teacher, tmp_path / "teacher.json")
    theirs = evaluate_model(OnnxEmbedder(out["onnx"]), pairs, options)
    plot_report(theirs, tmp_path / "roc.png", compare=[str(tmp_path / "teacher.json")])
    assert teacher.accuracy_mean > 0.9 and 0.0 <= theirs.accuracy_mean <= 1.0
    assert (tmp_path / "roc.png").stat().st_size > 0


def test_resume_projection_and_arcface(tmp_path):
    """A student narrower than the teacher trains through a projection; with labels, an ArcFace term;
    rerunning with more steps resumes from the checkpoint and reuses the teacher cache."""
    from exporter.distill import distill

    first = distill(tiny(tmp_path, "name=narrow", "steps=2", "embedding_size=64", "arcface_weight=0.5",
                         "checkpoint_every=1"))
    cache = sorted((first.run_dir / "teacher_cache").glob("views-*.npy"))
    stamp = cache[0].stat().st_mtime_ns
    again = distill(tiny(tmp_path, "name=narrow", "steps=3", "embedding_size=64", "arcface_weight=0.5",
                         "checkpoint_every=1"))
    assert again.steps == 3 and again.seconds < first.seconds * 3
    assert sorted((again.run_dir / "teacher_cache").glob("views-*.npy")) == cache
    assert cache[0].stat().st_mtime_ns == stamp  # not recomputed
    from exporter.checkpoints import load_run

    cfg, model = load_run(again.run_dir)
    assert cfg.embedding_size == 64 and model.output_shape == (None, 64)


def test_relational_loss_known_answer():
    from exporter.distill import relational_loss

    a = tf.math.l2_normalize(tf.constant([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), axis=1)
    assert float(relational_loss(a, a)) == pytest.approx(0.0, abs=1e-7)
    b = tf.constant([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])  # every pair similar
    # off-diagonal cosines of a: 0, s, s (s = 1/sqrt 2), each twice; of b: all 1
    s = 2 ** -0.5
    expected = 2 * ((1 - 0) ** 2 + 2 * (1 - s) ** 2) / 6
    assert float(relational_loss(a, b)) == pytest.approx(expected, rel=1e-5)


def test_bad_config_is_a_clean_error(tmp_path):
    import subprocess
    import sys

    from tests.server import REPO

    out = subprocess.run([sys.executable, "-m", "exporter", "distill", "views=-1", "no_such_key=1"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "no_such_key" in out.stderr and "Traceback" not in out.stderr


def test_shipped_distill_configs_load():
    from exporter.config import REPO
    from exporter.distill import load_distill_config

    configs = sorted((REPO / "exporter" / "configs" / "distill").glob("*.yaml"))
    assert configs
    for path in configs:
        cfg = load_distill_config(path)
        assert cfg.crops and cfg.steps > 0
