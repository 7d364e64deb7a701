"""The gallery keeps the durable store and the HNSW index consistent.

Writes (enroll, delete) take the write side of a readers-writer lock: commit to the store first,
then update the index, then acknowledge. A crash between the two loses nothing, because at start-up
the index is only reused from a snapshot whose ``generation`` equals the store's; otherwise it is
rebuilt from the store. Searches take the read side and run concurrently.

Identity scoring: an identity's score for a probe is the highest cosine similarity between the
probe and any of that identity's enrolled faces (max-over-faces). The index is asked for more faces
than ``top_k`` so that identities with many faces cannot crowd out the others.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .index import HnswIndex, read_snapshot_meta, write_snapshot_meta
from .store import IdentityRecord, Store

log = logging.getLogger(__name__)

OVERSAMPLE = 4  # faces fetched per wanted identity, before grouping by identity


class GalleryModelMismatch(RuntimeError):
    """The gallery on disk holds embeddings of another model."""


@dataclass
class Match:
    identity_id: str
    score: float
    face_id: int


class ReadWriteLock:
    """Many readers or one writer; a waiting writer blocks new readers so writes cannot starve."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self):
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def write(self):
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class Gallery:
    STORE_FILE = "gallery.sqlite3"
    INDEX_FILE = "index.hnsw"
    INDEX_META_FILE = "index.json"

    def __init__(self, data_dir: Path, model_id: str, dim: int, m: int = 16, ef_construction: int = 200,
                 ef_search: int = 128) -> None:
        self.data_dir = Path(data_dir)
        self.model_id = model_id
        self.dim = dim
        self._lock = ReadWriteLock()
        self._index = HnswIndex(dim, m, ef_construction, ef_search)
        self._label_identity: dict[int, str] = {}
        self.identity_count = 0  # kept in memory so /identify need not count rows
        self.store: Store | None = None

    # --- lifecycle ---------------------------------------------------------------------------
    def open(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.data_dir / self.STORE_FILE)
        stored_model = self.store.get_meta("model_id")
        stored_dim = self.store.get_meta("embedding_size")
        if stored_model is None:
            self.store.set_meta("model_id", self.model_id)
            self.store.set_meta("embedding_size", str(self.dim))
        elif stored_model != self.model_id or int(stored_dim or 0) != self.dim:
            self.store.close()
            raise GalleryModelMismatch(
                f"the gallery in {self.data_dir} holds {stored_dim}-d embeddings of model {stored_model!r}; "
                f"the loaded model is {self.model_id!r} ({self.dim}-d). Embeddings of different models "
                "are not comparable: use another data dir, or re-enroll with the new model."
            )
        self._load_index()

    def _load_index(self) -> None:
        started = time.perf_counter()
        generation = self.store.generation
        _, face_count = self.store.counts()
        meta = read_snapshot_meta(self.data_dir / self.INDEX_META_FILE)
        snapshot = self.data_dir / self.INDEX_FILE
        source = "rebuilt"
        if (meta and meta.get("generation") == generation and meta.get("model_id") == self.model_id
                and snapshot.exists()):
            try:
                self._index.load(snapshot, face_count)
                source = "snapshot"
            except (RuntimeError, ValueError):
                log.warning("index snapshot unreadable; rebuilding", exc_info=True)
        if source == "rebuilt":
            self._index.build_empty(capacity=max(1024, int(face_count * 1.25)))
        self._label_identity = {}
        self.identity_count = self.store.counts()[0]
        for ids, vectors, identities in self.store.iter_faces():
            if source == "rebuilt":
                self._index.add(vectors, ids)
            self._label_identity.update(zip(ids.tolist(), identities))
        # a snapshot is only valid for the generation it was written at; drop it so a crash cannot
        # leave an older snapshot that happens to look current
        (self.data_dir / self.INDEX_META_FILE).unlink(missing_ok=True)
        log.info(
            "gallery index ready",
            extra={"source": source, "faces": face_count, "generation": generation,
                   "seconds": round(time.perf_counter() - started, 3)},
        )

    def close(self) -> None:
        """Write an index snapshot for a fast next start, then close the store."""
        if self.store is None:
            return
        with self._lock.write():
            try:
                self._index.save(self.data_dir / self.INDEX_FILE)
                write_snapshot_meta(
                    self.data_dir / self.INDEX_META_FILE,
                    {"generation": self.store.generation, "model_id": self.model_id, "faces": self._index.live},
                )
            except Exception:  # noqa: BLE001 - the store is the truth; next start rebuilds
                log.warning("could not write index snapshot", exc_info=True)
            self.store.close()
            self.store = None

    # --- writes ------------------------------------------------------------------------------
    def enroll(self, identity_id: str, embeddings: np.ndarray, metadata: dict | None = None,
               replace: bool = False) -> tuple[list[int], bool, int]:
        """Add faces to an identity (created if new). Returns (face ids, created, faces removed)."""
        with self._lock.write():
            face_ids, removed, created = self.store.add_faces(identity_id, embeddings, metadata, replace)
            # committed: from here on the enrollment is durable; the index follows the store
            if removed:
                self._index.mark_deleted(removed)
                for label in removed:
                    self._label_identity.pop(label, None)
            self._index.add(embeddings, np.asarray(face_ids, dtype=np.int64))
            self._label_identity.update((fid, identity_id) for fid in face_ids)
            self.identity_count += created
        return face_ids, created, len(removed)

    def import_identities(self, items: list[tuple[str, np.ndarray, dict | None]]) -> list[list[int]]:
        """Bulk-add new identities (all or none; an existing id aborts the import). Returns face ids."""
        with self._lock.write():
            face_ids = self.store.add_new_identities(items)
            labels = np.asarray([f for ids in face_ids for f in ids], dtype=np.int64)
            if len(labels):
                self._index.add(np.concatenate([emb for _, emb, _ in items]).astype(np.float32), labels)
            for (identity_id, _, _), ids in zip(items, face_ids):
                self._label_identity.update((fid, identity_id) for fid in ids)
            self.identity_count += len(items)
        return face_ids

    def delete(self, identity_id: str) -> int | None:
        """Erase an identity from store and index. Returns the number of faces, None if unknown."""
        with self._lock.write():
            face_ids = self.store.delete_identity(identity_id)
            if face_ids is None:
                return None
            self._index.mark_deleted(face_ids)
            for label in face_ids:
                self._label_identity.pop(label, None)
            self.identity_count -= 1
        return len(face_ids)

    # --- reads -------------------------------------------------------------------------------
    def search(self, probes: np.ndarray, top_k: int) -> list[list[Match]]:
        """For each probe, up to top_k identities, best first, scored max-over-faces."""
        results: list[list[Match]] = []
        with self._lock.read():
            live = self._index.live
            want = min(live, top_k * OVERSAMPLE)
            labels, sims = self._index.search(probes, want)
            for row in range(len(probes)):
                best = self._group(labels[row], sims[row])
                # rare: few identities own all the nearest faces; widen the search for this probe
                k = want
                while len(best) < top_k and k < live:
                    k = min(live, k * 4)
                    wide_labels, wide_sims = self._index.search(probes[row : row + 1], k)
                    best = self._group(wide_labels[0], wide_sims[0])
                results.append(best[:top_k])
        return results

    def _group(self, labels: np.ndarray, sims: np.ndarray) -> list[Match]:
        best: dict[str, Match] = {}
        for label, sim in zip(labels.tolist(), sims.tolist()):
            identity = self._label_identity.get(label)
            if identity is None:  # deleted between the index search and now cannot happen under
                continue  # the read lock, but a label without an identity must never be returned
            if identity not in best or sim > best[identity].score:
                best[identity] = Match(identity, float(sim), label)
        return sorted(best.values(), key=lambda m: m.score, reverse=True)

    def identity_embeddings(self, identity_id: str) -> np.ndarray | None:
        return self.store.identity_embeddings(identity_id)

    def get_identity(self, identity_id: str) -> tuple[IdentityRecord, list[tuple[int, float]]] | None:
        return self.store.get_identity(identity_id)

    def list_identities(self, limit: int, after: str | None) -> list[IdentityRecord]:
        return self.store.list_identities(limit, after)

    @property
    def face_count(self) -> int:
        """Live enrolled faces (in memory; /identify sizes its threshold by it)."""
        return self._index.live

    def stats(self) -> dict:
        identities, faces = self.store.counts()
        return {"identities": identities, "faces": faces, "index_live": self._index.live,
                "index_capacity": self._index.capacity, "generation": self.store.generation}
