"""The verification protocol on synthetic scores with known answers (no TensorFlow needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from exporter.evaluate import (
    EvaluateOptions,
    best_threshold,
    evaluate_model,
    kfold_accuracy,
    plot_report,
    read_pairs,
    roc_curve,
    tar_at_far,
    write_report,
)
from tests.exporter.conftest import TRAIN_FACES, write_pairs

REPORT_KEYS = ["model", "source", "pairs", "n_pairs", "n_images", "n_folds", "embed_seconds", "ms_per_image",
               "accuracy_mean", "accuracy_std", "accuracy_flip_mean", "accuracy_flip_std", "flip_mode",
               "best_threshold", "tar_at_far", "impostor_tail", "results", "quality"]


def test_best_threshold_separable():
    scores = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    same = np.array([0, 0, 0, 1, 1, 1], bool)
    threshold, accuracy = best_threshold(scores, same)
    assert accuracy == 1.0 and threshold == pytest.approx(0.5)


def test_best_threshold_with_known_errors_and_ties():
    # one positive below every negative: best is 5/6 with the split between 0.3 and 0.7
    scores = np.array([0.05, 0.2, 0.2, 0.3, 0.8, 0.9])
    same = np.array([1, 0, 0, 0, 1, 1], bool)
    threshold, accuracy = best_threshold(scores, same)
    assert accuracy == pytest.approx(5 / 6) and threshold == pytest.approx(0.55)
    # all scores equal: no split inside the ties, so everything one side
    threshold, accuracy = best_threshold(np.full(4, 0.5), np.array([1, 1, 1, 0], bool))
    assert accuracy == 0.75 and threshold < 0.5


def test_kfold_known_answer():
    # 10 folds x 20 pairs; positives at 0.6, negatives at 0.2, except fold 3 where two negatives score 0.9
    fold = np.repeat(np.arange(10), 20)
    same = np.tile(np.r_[np.ones(10), np.zeros(10)].astype(bool), 10)
    scores = np.where(same, 0.6, 0.2)
    scores[3 * 20 + 10] = scores[3 * 20 + 11] = 0.9
    report = kfold_accuracy(scores, same, fold)
    accs = np.ones(10)
    accs[3] = 18 / 20
    assert report["fold_accuracies"] == pytest.approx(accs.tolist())
    assert report["accuracy_mean"] == pytest.approx(accs.mean())
    assert report["accuracy_std"] == pytest.approx(accs.std())
    assert all(0.2 < t < 0.6 for t in report["fold_thresholds"])


def test_tar_at_far():
    rng = np.random.default_rng(0)
    negatives = rng.uniform(0, 0.5, 3000)
    negatives[:3] = [0.95, 0.9, 0.85]  # the three hardest impostors
    positives = np.r_[np.full(900, 0.92), np.full(100, 0.6)]
    scores = np.r_[positives, negatives]
    same = np.r_[np.ones(1000), np.zeros(3000)].astype(bool)
    at_1e3 = tar_at_far(scores, same, 1e-3)  # 3 false accepts allowed: threshold at the 4th, < 0.5
    assert at_1e3["tar"] == 1.0 and at_1e3["far_actual"] == pytest.approx(1e-3) and at_1e3["resolved"]
    at_1e4 = tar_at_far(scores, same, 1e-4)  # zero allowed: threshold at 0.95
    assert at_1e4["tar"] == 0.0 and at_1e4["far_actual"] == 0.0 and not at_1e4["resolved"]
    far, tar = roc_curve(scores, same)
    assert far[-1] == 1.0 and tar[-1] == 1.0 and np.all(np.diff(far) >= 0)


def test_evaluate_end_to_end_known_answer(tmp_path, monkeypatch):
    pairs = write_pairs(tmp_path / "pairs.txt", TRAIN_FACES, folds=2)
    protocol = read_pairs(pairs, TRAIN_FACES)
    assert len(protocol.same) == 24 and protocol.n_folds == 2 and protocol.same.sum() == 12
    identities = sorted(p.name for p in TRAIN_FACES.iterdir() if p.is_dir())

    # one-hot embedding per identity: every same pair scores 1, every different pair 0
    import exporter.evaluate as evaluate

    def fake_load(paths, size):
        return np.stack([np.full((size, size, 3), identities.index(p.parent.name), np.uint8) for p in paths])

    monkeypatch.setattr(evaluate, "load_faces", fake_load)

    class OneHot:
        input_size, label = 112, "one-hot"

        def __call__(self, faces):
            return np.eye(len(identities), dtype=np.float32)[faces[:, 0, 0, 0]]

    report = evaluate_model(OneHot(), pairs, EvaluateOptions(images=TRAIN_FACES), source="fake")
    assert report.accuracy_mean == 1.0 and report.accuracy_flip_mean == 1.0
    assert 0.0 < report.best_threshold < 1.0
    assert report.tar_at_far["0.001"].tar == 1.0
    assert list(report.to_dict()) == REPORT_KEYS  # the JSON's layout, as before evaluate returned a report
    assert not list(tmp_path.glob("*.json")) and not list(tmp_path.glob("*.png"))  # evaluating writes nothing
    write_report(report, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(report.to_dict()))
    assert json.loads((tmp_path / "r.json").read_text())["n_pairs"] == 24
    assert plot_report(report, tmp_path / "roc.png").stat().st_size > 1000

    quick = evaluate_model(OneHot(), pairs, EvaluateOptions(images=TRAIN_FACES, flip=False, limit_folds=1))
    plot_report(quick, tmp_path / "both.png", compare=[str(tmp_path / "r.json")])
    assert (tmp_path / "both.png").exists()
    assert quick.accuracy_mean == 1.0 and quick.accuracy_flip_mean is None and quick.n_pairs == 12
    assert quick.source == "<in memory>" and "flip" not in quick.to_dict()["results"]


def test_flip_modes(default_model):
    """'normalised' sums unit embeddings (ours); 'raw' sums raw ones as arcface-tf2's evaluation does."""
    from exporter.evaluate import OnnxEmbedder, embed_paths
    from exporter.images import face_files, load_faces

    embedder = OnnxEmbedder(default_model)
    paths = face_files(TRAIN_FACES, 6)
    faces = load_faces(paths)
    raw = np.asarray(embedder(faces), np.float64)
    mirrored = np.asarray(embedder(np.ascontiguousarray(faces[:, :, ::-1])), np.float64)

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    _, ours = embed_paths(embedder, paths, flip=True, flip_mode="normalised")
    _, theirs = embed_paths(embedder, paths, flip=True, flip_mode="raw")
    np.testing.assert_allclose(ours, unit(unit(raw) + unit(mirrored)), atol=1e-5)
    np.testing.assert_allclose(theirs, unit(raw + mirrored), atol=1e-5)
    # SFace's raw norms differ between an image and its mirror, so the two modes really differ
    assert np.abs(ours - theirs).max() > 1e-4
    with pytest.raises(ValueError):
        embed_paths(embedder, paths, flip=True, flip_mode="sum")


def test_cli_writes_the_report_plot_and_threshold(default_model, tmp_path, capsys):
    """`evaluate` returns a report; the CLI writes what was asked: JSON (= what it prints), ROC plot, and the
    calibrated threshold into the ONNX model's contract."""
    import shutil

    from exporter.__main__ import main
    from service.model.contract import read_contract

    model = shutil.copy(default_model, tmp_path / "model.onnx")
    pairs = write_pairs(tmp_path / "pairs.txt", TRAIN_FACES)
    assert main(["evaluate", str(model), "--pairs", str(pairs), "--images", str(TRAIN_FACES), "--no-flip",
                 "-o", str(tmp_path / "out" / "eval.json"), "--roc", str(tmp_path / "roc.png"),
                 "--write-threshold", "--label", "sface"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / "out" / "eval.json").read_text()) == printed
    assert list(printed) == [*REPORT_KEYS, "roc_png", "threshold_written"]
    assert printed["model"] == "sface" and printed["source"] == str(model) and printed["threshold_written"] == str(model)
    assert (tmp_path / "roc.png").stat().st_size > 1000
    contract = read_contract(model)
    assert contract.threshold == printed["best_threshold"]
    assert contract.extra["face.threshold_source"] == f"10-fold:{tmp_path.name}"
    # 6 people give too few impostor pairs for a tail: none measured, so the model keeps the one it had
    assert printed["impostor_tail"] is None
    assert contract.impostor_tail.to_dict() == read_contract(default_model).impostor_tail.to_dict()
    # nor for a face quality (it needs 1,000 impostor pairs for FMR 1e-3): the model keeps its own
    assert printed["quality"] is None and contract.quality == read_contract(default_model).quality


def test_a_fitted_quality_is_written_into_the_contract(default_model, tmp_path):
    """What `evaluate --write-threshold` writes when the protocol fitted a quality: face.quality."""
    import shutil

    from exporter.evaluate import write_threshold_into
    from service.model.contract import read_contract

    model = shutil.copy(default_model, tmp_path / "model.onnx")
    shipped = read_contract(default_model).quality
    changed = dict(json.loads(shipped.to_json()), min_score=0.5)
    write_threshold_into(model, 0.3, "test", None, changed)
    written = read_contract(model).quality
    assert written is not None and written.min_score == 0.5 and written.photo == shipped.photo


def test_cli_refuses_to_write_a_threshold_into_a_tf_source_before_evaluating(tmp_path):
    from exporter.__main__ import main

    pairs = write_pairs(tmp_path / "pairs.txt", TRAIN_FACES)
    with pytest.raises(ValueError, match="needs an ONNX model"):
        main(["evaluate", str(tmp_path / "no-such-run"), "--pairs", str(pairs), "--write-threshold"])
