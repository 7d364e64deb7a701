"""The long fuzzing run (``scripts/fuzz``: schemathesis against the real server, both gallery backends),
as a ``slow`` test: minutes, randomised, and its first run installs schemathesis into a virtualenv of its
own. CI runs the in-suite version instead: test_hostile_sweep.py (every route of the same OpenAPI
document, both backends, in seconds)."""

from __future__ import annotations

import subprocess

import pytest

from harness.server import REPO


@pytest.mark.slow
def test_schemathesis_finds_nothing_on_either_backend(tmp_path):
    run = subprocess.run([str(REPO / "scripts" / "fuzz"), "--seconds", "120", "--seed", "1",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert run.stdout.count("0 traceback(s)") == 2 and "fuzz: nothing found" in run.stdout
