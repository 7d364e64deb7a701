"""Reading aligned face crops without TensorFlow (export parity, evaluation, embed)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image


def load_faces(paths: Iterable[str | Path], size: int = 112) -> np.ndarray:
    """Aligned face files -> N x size x size x 3 uint8 RGB."""
    faces = []
    for path in paths:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BILINEAR)
            faces.append(np.asarray(img, dtype=np.uint8))
    return np.stack(faces)


def face_files(root: str | Path, limit: int | None = None) -> list[Path]:
    """Image files under a folder (recursively), sorted, optionally the first ``limit``."""
    files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp"))
    return files[:limit] if limit else files
