"""The benchmarks live in the project's packages: every ``bench`` module imports from the project
root with a clean environment, touches no ``sys.path`` and imports nothing from ``tests`` (what the
two share is in ``harness``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from harness.server import REPO

PROBE = """
import importlib, json, pkgutil, sys
import bench
before = list(sys.path)
names = sorted(m.name for m in pkgutil.iter_modules(bench.__path__, "bench."))
for name in names:
    importlib.import_module(name)
print(json.dumps({"modules": names, "path_changed": sys.path != before,
                  "tests_imported": sorted(m for m in sys.modules if m == "tests" or m.startswith("tests."))}))
"""


def test_every_bench_module_imports_without_path_edits_or_tests():
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "bench.detect_align" in result["modules"] and len(result["modules"]) >= 10
    assert not result["path_changed"] and result["tests_imported"] == []
