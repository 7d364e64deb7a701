"""The CLI's help works without TensorFlow being imported."""

from __future__ import annotations

import subprocess
import sys

import pytest

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
    from exporter.__main__ import parse_args

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
