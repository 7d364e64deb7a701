"""The HNSW cosine index (hnswlib): derived from the store, never the source of truth.

hnswlib is not safe for inserts or deletes during queries, so the gallery wraps every mutation in
the write side of a readers-writer lock. ``ef`` is not saved with an index: it is set after every
load or build, and (setting ``auto``, ef.py) again whenever the number of live faces moves it.

Erasing: ``mark_deleted`` keeps a face's vector in the graph (hnswlib still routes through deleted
elements) and keeps its slot as a tombstone that every search walks through. New faces reuse deleted
slots (``allow_replace_deleted``: the old vector is overwritten), ``compact`` rebuilds the graph from
the live elements when tombstones dominate, and snapshots zero the vectors of deleted elements in the
file (snapshot.py), so a deleted vector stays in process memory at most until its slot is reused or
the graph compacted, never on disk. (Overwriting it in memory at delete time, by updating the
element with another vector before marking it deleted, costs an hnswlib ``updatePoint`` per face:
deleting a 10-face identity took 255 ms under the write lock instead of 28 ms, bench.tombstones.)
"""

from __future__ import annotations

from pathlib import Path

import hnswlib
import numpy as np

from .ef import search_ef


class HnswIndex:
    def __init__(self, dim: int, m: int, ef_construction: int, ef_search: int | str) -> None:
        self.dim = dim
        self.m = m
        self.ef_construction = ef_construction
        self.ef_search = ef_search  # a number, or "auto": from the live count (ef.py)
        self._ef = 0  # the ef the index searches with now
        self._index: hnswlib.Index | None = None
        self.live = 0  # elements not marked deleted
        # test hook, a real code path: the next add raises this (as a failed resize or add would)
        self.fail_next_add: Exception | None = None

    def build_empty(self, capacity: int = 1024) -> None:
        self._index, self.live, self._ef = self._new(capacity), 0, 0
        self._apply_ef()

    def _apply_ef(self) -> None:
        """Set ef for the current live count (callers hold the write lock: no search runs meanwhile).
        hnswlib searches with max(ef, k) itself, so ef depends on the gallery size only."""
        ef = search_ef(self.ef_search, self.live)
        if ef != self._ef and self._index is not None:
            self._index.set_ef(ef)
            self._ef = ef

    @property
    def _live_index(self) -> hnswlib.Index:
        """The hnswlib graph, which exists once build_empty() or load() has run."""
        if self._index is None:
            raise RuntimeError("the index is neither built nor loaded")
        return self._index

    @property
    def ef(self) -> int:
        return self._ef

    def _new(self, capacity: int) -> hnswlib.Index:
        index = hnswlib.Index(space="cosine", dim=self.dim)
        index.init_index(max_elements=max(capacity, 16), M=self.m, ef_construction=self.ef_construction,
                         allow_replace_deleted=True)
        return index

    def load(self, path: Path, live: int) -> None:
        """Load a verified snapshot; ``live`` is the number of its elements not marked deleted."""
        index = hnswlib.Index(space="cosine", dim=self.dim)
        index.load_index(str(path), max_elements=0, allow_replace_deleted=True)
        self._index, self.live, self._ef = index, live, 0
        self._apply_ef()

    def save(self, path: Path) -> None:
        self._live_index.save_index(str(path))

    @property
    def count(self) -> int:
        """Elements in the graph, tombstones included."""
        return self._index.get_current_count() if self._index is not None else 0

    @property
    def tombstones(self) -> int:
        return self.count - self.live

    def add(self, vectors: np.ndarray, labels: np.ndarray) -> None:
        if len(labels) == 0:
            return
        if self.fail_next_add is not None:
            error, self.fail_next_add = self.fail_next_add, None
            raise error
        new_slots = max(0, len(labels) - self.tombstones)  # deleted slots are reused first
        capacity = self._live_index.get_max_elements()
        if self.count + new_slots > capacity:
            self._live_index.resize_index(max(self.count + new_slots, capacity * 2))
        self._live_index.add_items(vectors, labels, replace_deleted=True)
        self.live += len(labels)
        self._apply_ef()

    def erase(self, labels: list[int]) -> None:
        """Mark live elements deleted: never returned again; their slots are reused by later adds."""
        for label in labels:
            self._live_index.mark_deleted(int(label))
        self.live -= len(labels)
        self._apply_ef()

    def compact(self, labels: np.ndarray) -> None:
        """Rebuild the graph from the live elements ``labels`` only: no tombstones, no deleted data."""
        labels = np.asarray(labels, dtype=np.int64)
        fresh = self._new(max(1024, int(len(labels) * 1.25)))
        for start in range(0, len(labels), 10_000):
            part = labels[start:start + 10_000]
            fresh.add_items(np.asarray(self._live_index.get_items(part), dtype=np.float32), part)
        self._index, self.live, self._ef = fresh, len(labels), 0
        self._apply_ef()

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Labels and cosine similarities (not distances) of the k nearest live elements."""
        k = min(k, self.live)
        if k == 0:
            return np.zeros((len(vectors), 0), np.int64), np.zeros((len(vectors), 0), np.float32)
        labels, distances = self._live_index.knn_query(vectors, k=k)
        return labels.astype(np.int64), (1.0 - distances).astype(np.float32)

    def exact(self, vectors: np.ndarray, k: int, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Like ``search``, by comparing with every one of ``labels`` (the live elements): for when
        the graph search cannot find k live elements (k near the live count, or a graph mostly of
        deleted slots before compaction: hnswlib then raises)."""
        k = min(k, len(labels))
        stored = np.asarray(self._live_index.get_items(labels), dtype=np.float32)
        stored /= np.maximum(np.linalg.norm(stored, axis=1, keepdims=True), 1e-12)
        queries = np.asarray(vectors, dtype=np.float32)
        sims = (queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)) @ stored.T
        top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        return np.asarray(labels, dtype=np.int64)[top], np.take_along_axis(sims, top, axis=1)

    @property
    def capacity(self) -> int:
        return self._index.get_max_elements() if self._index is not None else 0


