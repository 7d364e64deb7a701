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
# Measured at 1M (bench/results/gallery_backends_1000000.json, idle 2-core CPU, M 16, ef_construction 200):
# recall@1 of the identity, embedded / pgvector: ef 256 0.981 / 0.995, ef 384 0.996 / 0.999, ef 512
# 0.998 / 1.000; of the face: ef 384 0.974 / 0.986, ef 512 0.985 / 0.996, ef 768 0.995 / 0.999.
# /identify answers identities, so auto aims at the identity: 0.477 gives 384 at 1M (>= 0.99 on both
# backends, embedded p99 2.0 ms); face-level 0.99 at 1M takes ef ~640 (FACE_HNSW_EF_SEARCH=640).
# Three more 1M galleries (bench/results/gallery_search_1000000_seed*.json, 4,000 probes each): identity
# recall@1 at ef 384 0.9948-0.9952, at 448 0.9975-0.9978.
EF_GROWTH = 0.477
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
