"""service/model/preprocess.py: the norms every embedding and quality score is made from."""

from __future__ import annotations

import numpy as np
import pytest

from service.model.preprocess import l2_normalise, row_norms


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows", [1, 3, 64, 1000])
def test_row_norms_are_numpys_norms_bit_for_bit(dtype: type, rows: int) -> None:
    # embeddings already stored were normalised with np.linalg.norm: the same bits, not merely close
    rng = np.random.default_rng(rows)
    x = (rng.standard_normal((rows, 128)) * rng.uniform(0.01, 40.0, size=(rows, 1))).astype(dtype)
    assert np.array_equal(row_norms(x), np.linalg.norm(x, axis=1))
    assert np.array_equal(row_norms(x, keepdims=True), np.linalg.norm(x, axis=1, keepdims=True))
    expected = (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    assert np.array_equal(l2_normalise(x), expected)


def test_a_zero_row_stays_zero() -> None:
    x = np.zeros((2, 8), dtype=np.float32)
    x[1, 0] = 3.0
    out = l2_normalise(x)
    assert out.dtype == np.float32
    assert np.array_equal(out[0], np.zeros(8, dtype=np.float32)) and out[1, 0] == 1.0
