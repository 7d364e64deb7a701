"""Shared fixtures for the exporter tests: a tiny real training run on the fixture identities."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TRAIN_FACES = FIXTURES / "train"
FACES = FIXTURES / "faces"

# MobileNetV2 at width 0.35 with a 128-d embedding: a few seconds a step on a 2-core CI box
TINY = ["backbone=MobileNetV2", "alpha=0.35", "embedding_size=128", "batch_size=8", "steps_per_epoch=3",
        "epochs=2", "learning_rate=0.01", "warmup_epochs=0", "scale=16", "margin=0.2", "verbose=0",
        "dropout=0.0", "model_name=arcface-mbv2-ci", "model_version=ci", "bn_recalibration_steps=3"]


def tiny_config(tmp: Path, *overrides: str):
    from exporter.config import load_config

    return load_config(None, [f"train_dir={TRAIN_FACES}", f"output_root={tmp}", *TINY, *overrides])


def write_pairs(path: Path, images: Path, folds: int = 2) -> Path:
    """A pairs.txt in the LFW format over a folder of identities (same pairs first, then different)."""
    identities = sorted(p.name for p in images.iterdir() if p.is_dir())
    same = [(name, 1, 2) for name in identities] + [(name, 3, 4) for name in identities]
    diff = [(identities[i], 1, identities[(i + 1) % len(identities)], 2) for i in range(len(identities))]
    diff += [(identities[i], 3, identities[(i + 2) % len(identities)], 4) for i in range(len(identities))]
    per_fold = len(same) // folds
    lines = [f"{folds}\t{per_fold}"]
    for k in range(folds):
        lines += ["\t".join(map(str, p)) for p in same[k * per_fold:(k + 1) * per_fold]]
        lines += ["\t".join(map(str, p)) for p in diff[k * per_fold:(k + 1) * per_fold]]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A MobileNetV2 ArcFace trained for 6 real steps on tests/fixtures/train (shared by the tests)."""
    pytest.importorskip("tensorflow")
    from exporter.train import train

    root = tmp_path_factory.mktemp("runs")
    return train(tiny_config(root, "name=tiny"))
