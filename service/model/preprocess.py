"""Aligned RGB uint8 faces -> the model's input tensor, driven only by the model's contract."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # a type only: contract.py imports faces.quality, which uses row_norms below
    from .contract import FaceContract


def preprocess(faces: np.ndarray, contract: FaceContract) -> np.ndarray:
    """``faces``: N x H x W x 3 uint8 RGB -> float32 tensor in the model's layout and normalisation."""
    if faces.ndim != 4 or faces.shape[-1] != 3:
        raise ValueError(f"expected N x H x W x 3 faces, got shape {faces.shape}")
    x = faces.astype(np.float32)
    if contract.color == "BGR":
        x = x[..., ::-1]
    mean = np.asarray(contract.mean, dtype=np.float32)
    std = np.asarray(contract.std, dtype=np.float32)
    if mean.any() or (std != 1).any():
        x = (x - mean) / std
    if contract.layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x)


def row_norms(x: np.ndarray, keepdims: bool = False) -> np.ndarray:
    """Each row's L2 norm: the arithmetic ``np.linalg.norm(x, axis=1)`` does for real input (the sum of
    squares along the row, then its square root), bit for bit, without its argument checks: those
    cost more than the sum itself for the one or few rows of a request (a test holds them equal)."""
    squares: np.ndarray = np.add.reduce(x * x, axis=1, keepdims=keepdims)  # type: ignore[call-overload]  # bool keepdims
    return np.sqrt(squares)


# Below this norm a vector has no reliable direction (and no model emits one): a client's (http/vectors)
# or a gallery file's (cli/gallery) is refused rather than float noise blown up to a unit vector that
# matches someone at random.
MIN_NORM = 1e-6


def unit_direction(vector: np.ndarray) -> tuple[np.ndarray | None, float]:
    """A finite vector's direction as a float64 unit vector, and its norm (inf for huge vectors: only
    compared, never divided by); None for the direction below MIN_NORM. Scaled by the largest magnitude
    first, so that the norm neither overflows (values up to 1.8e308 are finite: their norm is not; in
    float32, values near 3e38) nor underflows."""
    wide = np.asarray(vector, dtype=np.float64)
    peak = float(np.max(np.abs(wide)))
    scaled = wide / peak if peak > 0 else wide
    scaled_norm = float(np.linalg.norm(scaled))  # 1 .. sqrt(dimension) unless the vector is zero
    norm = peak * scaled_norm
    return (None if norm < MIN_NORM else scaled / scaled_norm), norm


def l2_normalise(embeddings: np.ndarray) -> np.ndarray:
    norms = row_norms(np.asarray(embeddings), keepdims=True)
    return (embeddings / np.maximum(norms, 1e-12)).astype(np.float32)
