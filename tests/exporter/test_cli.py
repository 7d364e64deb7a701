"""The CLI's help works without TensorFlow being imported."""

from __future__ import annotations

import subprocess
import sys

import pytest

from exporter.__main__ import parse_args
from tests.server import REPO


@pytest.mark.parametrize("command", [[], ["train"], ["distill"], ["export"], ["evaluate"], ["embed"]])
def test_help(command):
    out = subprocess.run([sys.executable, "-m", "exporter", *command, "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout
    if command == ["train"]:
        assert "learning_rate" in out.stdout and "backbone" in out.stdout
    if command == ["distill"]:
        assert "relational_weight" in out.stdout and "teacher" in out.stdout


def test_bad_override_is_a_clean_error():
    out = subprocess.run([sys.executable, "-m", "exporter", "train", "no_such_key=1"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "unknown config key" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("command", [
    ["export", "no/such/ckpt", "-o", "out.onnx", "mean=0", "std=255"],
    ["export", "no/such/ckpt", "mean=0", "-o", "out.onnx", "std=255"],
    ["evaluate", "no/such/ckpt", "--pairs", "no/pairs.txt", "--no-flip", "mean=0", "std=255"],
])
def test_overrides_after_options(command):
    """KEY=VALUE overrides may come after (or between) options, as users type them."""
    args = parse_args(command)
    assert args.overrides == ["mean=0", "std=255"]
    assert args.source if command[0] == "export" else args.model
    out = subprocess.run([sys.executable, "-m", "exporter", *command], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert "unrecognized arguments" not in out.stderr
    assert out.returncode == 2 and "Traceback" not in out.stderr  # the missing checkpoint, cleanly


def test_stray_words_are_still_an_error():
    out = subprocess.run([sys.executable, "-m", "exporter", "export", "a", "-o", "x.onnx", "notakeyvalue"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "unrecognized arguments: notakeyvalue" in out.stderr


def test_export_flags_build_the_options_with_the_same_defaults():
    """Every ExportOptions field that is a flag comes from it; no flags give ExportOptions' own defaults."""
    from exporter.__main__ import _options
    from exporter.export import ExportOptions

    assert _options(ExportOptions, parse_args(["export", "run", "-o", "m.onnx"])) == ExportOptions()
    args = parse_args(["export", "run", "-o", "m.onnx", "--config", "c.yaml", "--threshold", "0.4",
                       "--threshold-from", "e.json", "--calibrate-pairs", "p.txt", "--identify-threshold", "0.5",
                       "--parity-faces", "faces", "--parity-count", "8", "--min-cosine", "0.9", "--fp16",
                       "--fp16-min-cosine", "0.8", "--opset", "18", "--input-name", "data", "--model-name", "m",
                       "--model-version", "2", "mean=0"])
    assert _options(ExportOptions, args) == ExportOptions(
        config="c.yaml", overrides=["mean=0"], threshold=0.4, threshold_from="e.json", calibrate_pairs="p.txt",
        identify_threshold=0.5, parity_faces="faces", parity_count=8, min_cosine=0.9, fp16=True,
        fp16_min_cosine=0.8, opset=18, input_name="data", model_name="m", model_version="2")


def test_evaluate_flags_build_the_options_with_the_same_defaults():
    from exporter.__main__ import _options
    from exporter.evaluate import EvaluateOptions

    assert _options(EvaluateOptions, parse_args(["evaluate", "m.onnx", "--pairs", "p.txt"])) == EvaluateOptions()
    args = parse_args(["evaluate", "m.onnx", "--pairs", "p.txt", "--images", "img", "--batch-size", "8",
                       "--label", "x", "--limit-folds", "2", "--no-flip", "--flip-mode", "raw"])
    assert _options(EvaluateOptions, args) == EvaluateOptions(images="img", batch_size=8, label="x", limit_folds=2,
                                                              flip=False, flip_mode="raw")
