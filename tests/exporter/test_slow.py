"""The full CLI path on the fixture identities with real learning (slow: minutes on a 2-core CPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.exporter.conftest import TINY, TRAIN_FACES, write_pairs
from tests.server import REPO

pytestmark = [pytest.mark.slow, pytest.mark.export]
pytest.importorskip("tensorflow")


def cli(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "exporter", *args], cwd=REPO, capture_output=True, text=True,
                         timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_train_export_evaluate_embed_learns(tmp_path):
    data = tmp_path / "lfw-like"
    data.mkdir()
    (data / "images").symlink_to(TRAIN_FACES, target_is_directory=True)
    pairs = write_pairs(data / "pairs.txt", TRAIN_FACES)

    overrides = [o for o in TINY if not o.startswith(("steps_per_epoch", "epochs", "learning_rate", "warmup"))]
    trained = cli("train", f"train_dir={TRAIN_FACES}", f"output_root={tmp_path}", "name=slow", *overrides,
                  "epochs=40", "steps_per_epoch=3", "learning_rate=0.05", "warmup_epochs=2", "augment=false")
    run_dir = trained["run_dir"]
    assert trained["summary"]["steps"] == 120

    before = cli("evaluate", run_dir, "--pairs", str(pairs), "-o", str(tmp_path / "tf.json"))
    exported = cli("export", run_dir, "-o", str(tmp_path / "m.onnx"), "--threshold-from", str(tmp_path / "tf.json"))
    assert exported["parity_fp32"]["min_cosine"] >= 0.99999
    after = cli("evaluate", str(tmp_path / "m.onnx"), "--pairs", str(pairs), "--write-threshold",
                "--roc", str(tmp_path / "roc.png"))
    # the ONNX model scores as its TF source (within 0.1 point), and it has learned its training faces
    assert abs(after["accuracy_mean"] - before["accuracy_mean"]) <= 0.001
    assert after["accuracy_mean"] >= 0.9

    embedded = cli("embed", str(tmp_path / "m.onnx"), str(TRAIN_FACES), "-o", str(tmp_path / "e.npy"))
    emb = np.load(tmp_path / "e.npy")
    assert emb.shape == (24, 128) and embedded["count"] == 24
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
