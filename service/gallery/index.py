"""The HNSW cosine index (hnswlib): derived from the store, never the source of truth.

hnswlib is not safe for inserts or deletes during queries, so the gallery wraps every mutation in
the write side of a readers-writer lock. ``ef`` is not saved with an index: it is set after every
load or build.
"""

from __future__ import annotations

import json
from pathlib import Path

import hnswlib
import numpy as np


class HnswIndex:
    def __init__(self, dim: int, m: int, ef_construction: int, ef_search: int) -> None:
        self.dim = dim
        self.m = m
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self._index: hnswlib.Index | None = None
        self.live = 0  # elements not marked deleted

    def build_empty(self, capacity: int = 1024) -> None:
        index = hnswlib.Index(space="cosine", dim=self.dim)
        index.init_index(max_elements=max(capacity, 16), M=self.m, ef_construction=self.ef_construction,
                         allow_replace_deleted=False)
        index.set_ef(self.ef_search)
        self._index, self.live = index, 0

    def load(self, path: Path, live: int) -> None:
        """Load a snapshot the caller has checked is current; ``live`` is the store's face count."""
        index = hnswlib.Index(space="cosine", dim=self.dim)
        index.load_index(str(path), max_elements=0)
        if index.get_current_count() < live:
            raise ValueError(f"snapshot holds {index.get_current_count()} elements, the store {live}")
        index.set_ef(self.ef_search)
        self._index, self.live = index, live

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        self._index.save_index(str(tmp))
        tmp.replace(path)

    def add(self, vectors: np.ndarray, labels: np.ndarray) -> None:
        if len(labels) == 0:
            return
        needed = self._index.get_current_count() + len(labels)
        capacity = self._index.get_max_elements()
        if needed > capacity:
            self._index.resize_index(max(needed, capacity * 2))
        self._index.add_items(vectors, labels)
        self.live += len(labels)

    def mark_deleted(self, labels: list[int]) -> None:
        for label in labels:
            self._index.mark_deleted(int(label))
        self.live -= len(labels)

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Labels and cosine similarities (not distances) of the k nearest live elements."""
        k = min(k, self.live)
        if k == 0:
            return np.zeros((len(vectors), 0), np.int64), np.zeros((len(vectors), 0), np.float32)
        labels, distances = self._index.knn_query(vectors, k=k)
        return labels.astype(np.int64), (1.0 - distances).astype(np.float32)

    @property
    def capacity(self) -> int:
        return self._index.get_max_elements()


def write_snapshot_meta(path: Path, meta: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(meta))
    tmp.replace(path)


def read_snapshot_meta(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
