"""The CLI's help works without TensorFlow being imported."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.server import REPO


@pytest.mark.parametrize("command", [[], ["train"], ["export"], ["evaluate"], ["embed"]])
def test_help(command):
    out = subprocess.run([sys.executable, "-m", "exporter", *command, "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout
    if command == ["train"]:
        assert "learning_rate" in out.stdout and "backbone" in out.stdout


def test_bad_override_is_a_clean_error():
    out = subprocess.run([sys.executable, "-m", "exporter", "train", "no_such_key=1"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "unknown config key" in out.stderr and "Traceback" not in out.stderr
