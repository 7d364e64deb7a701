"""HNSW search breadth (``ef``) from the gallery's size, for both backends.

An HNSW search keeps the ``ef`` best candidates it has seen; recall@1 against exact search falls as
the graph grows at a fixed ``ef``. On 128-d SFace-like vectors (bench.gallery_backends, M 16,
ef_construction 200) ef 128 finds the exact nearest identity for 100% of probes at 100k faces but
only ~91% at 1M, and a search costs about linearly in ``ef``. So ``auto`` (the default) widens the
search with the gallery instead of paying the 1M price on a 10k gallery:
``ef = EF_BASE * (faces / BASE_FACES) ** EF_GROWTH``, never below ``EF_BASE``, rounded up to a
multiple of 16 (so the value does not change on every enrollment), at most ``EF_MAX``. Either way the
search asks for at least ``k`` candidates (both hnswlib and pgvector need ``ef >= k`` to return ``k``).
"""

from __future__ import annotations

import math
from typing import Literal

AUTO: Literal["auto"] = "auto"
EF_BASE = 128         # 100% recall@1 up to 100k faces (bench/results/gallery_backends_100000.json)
BASE_FACES = 100_000
# 1M faces at ef 128 miss 9.2% (identity) / 19.6% (face) of exact top-1s; at 100k the miss rate fell
# ~15x from ef 40 to 128 (miss ~ ef^-2.3): 0.99 at 1M then needs ef ~335 (identity) / ~470 (face).
# 0.6 gives 512 at 1M. An estimate until the 1M sweep (bench/README.md) is run on an idle machine.
EF_GROWTH = 0.6
EF_MAX = 1000         # pgvector's upper bound for hnsw.ef_search


def auto_ef(faces: int) -> int:
    """The ``auto`` search breadth for a gallery of ``faces`` live faces."""
    if faces <= BASE_FACES:
        return EF_BASE
    ef = EF_BASE * (faces / BASE_FACES) ** EF_GROWTH
    return min(EF_MAX, 16 * math.ceil(ef / 16))


def search_ef(setting: int | str, faces: int, k: int = 0) -> int:
    """The ef to search with: the setting (a number, or ``auto`` = :func:`auto_ef`), at least ``k``."""
    ef = auto_ef(faces) if setting == AUTO else int(setting)
    return max(ef, k)
