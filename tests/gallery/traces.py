"""Look for a vector's bytes in every file of a directory (exact float32 bytes or within float rounding)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

WINDOW = 8  # consecutive float32 values: 32 bytes


def _near(data: bytes, vector: np.ndarray, tol: float) -> bool:
    for align in range(4):
        usable = (len(data) - align) // 4
        if usable < WINDOW:
            continue
        floats = np.frombuffer(data, dtype=np.float32, count=usable, offset=align)
        with np.errstate(invalid="ignore"):
            starts = np.flatnonzero(np.abs(floats[: usable - WINDOW + 1] - vector[0]) <= tol)
            for s in starts:
                if np.all(np.abs(floats[s:s + WINDOW] - vector[:WINDOW]) <= tol):
                    return True
    return False


def find_vector(directory: Path, vector: np.ndarray, tol: float = 1e-6) -> list[str]:
    """Files under ``directory`` holding the vector's first 8 values: its exact bytes, or, each value
    within ``tol``, the vector or its unit-length copy (what hnswlib stores for cosine)."""
    return [path.name for path in sorted(Path(directory).rglob("*")) if path.is_file() and holds_vector(path, vector, tol)]


def holds_vector(path: Path, vector: np.ndarray, tol: float = 1e-6) -> bool:
    """Whether the file ``path`` holds the vector (as ``find_vector`` looks for it)."""
    vector = np.asarray(vector, dtype=np.float32)
    unit = (vector / np.linalg.norm(vector)).astype(np.float32)
    data = Path(path).read_bytes()
    return vector[:WINDOW].tobytes() in data or _near(data, vector, tol) or _near(data, unit, tol)
