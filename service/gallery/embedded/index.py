"""The HNSW cosine index (hnswlib): derived from the store, never the source of truth.

hnswlib is not safe for inserts or deletes during queries, so the gallery wraps every mutation in
the write side of a readers-writer lock. ``ef`` is not saved with an index: it is set after every
load or build, and (setting ``auto``, ef.py) again whenever the number of live faces moves it.

Erasing: ``mark_deleted`` keeps a face's vector in the graph (hnswlib still routes through deleted
elements) and keeps its slot as a tombstone that every search walks through. New faces always get new
slots: a compaction (gallery.py, with ``spawn``/``adopt``) rebuilds the graph from the live elements
when tombstones dominate, and snapshots zero the vectors of deleted elements in the file
(snapshot.py), so a deleted vector stays in process memory at most until the graph is compacted,
never on disk.

Deleted slots are not reused (hnswlib's ``replace_deleted``): a replaced slot gets the new vector and
new outgoing links (``updatePoint``), but its incoming links are only those its old neighbours keep
after re-pruning, and they were chosen for the old vector. A face put in a slot far from its old
occupant can end with no incoming link at all: no search reaches it, and /identify with its own photo
answers another identity (the soak's churn of 80 people did that at 216 faces, ef 128:
tests/fixtures/index/soak_churn_trace.npz). An ordinary insert links the new element both ways.
(Overwriting a vector in memory at delete time, by updating the element with another vector before
marking it deleted, costs an hnswlib ``updatePoint`` per face: deleting a 10-face identity took
255 ms under the write lock instead of 28 ms, bench.tombstones.)
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import hnswlib
import numpy as np

from ..ef import search_ef

# (labels, vectors) chunks of every live face: what an exact search scans
FaceChunks = Iterable[tuple[np.ndarray, np.ndarray]]
# how a search answered when hnswlib alone could not (counted in ``fallbacks``, shown on /metrics):
# "capped": asked for more faces than are live, k lowered to the live count; "exact": hnswlib could not
# return k faces (a graph walk does not reach every element: clustered faces, deleted slots), so the
# live faces were scanned instead
FALLBACKS = ("capped", "exact")


def _libc_prctl() -> Callable[..., int] | None:
    """libc's prctl, looked up in the parent: a forked child must not call dlopen (another thread may
    have held the dynamic loader's lock at the fork, and the child would wait for it forever)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _libc_prctl()


def _die_with_parent(parent: int) -> None:
    """Linux: SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the prctl
        os._exit(1)


def _max_fd() -> int:
    try:
        return int(os.sysconf("SC_OPEN_MAX"))
    except (OSError, ValueError):
        return 65536


class SnapshotWriterStuck(RuntimeError):
    """The forked snapshot writer ran past its time and was killed (a child of a process with many
    threads can block forever on a lock another thread held at the fork)."""

    def __init__(self, pid: int, timeout: float) -> None:
        super().__init__(f"the snapshot writer (pid {pid}) ran past {timeout:g}s; killed")
        self.pid = pid
        self.timeout = timeout


class BackgroundSave:
    """A child process writing a snapshot file (``HnswIndex.save_in_background``)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def wait(self, timeout: float) -> None:
        """Wait (no lock needed) for the child; raises RuntimeError if it failed, SnapshotWriterStuck
        if it ran past ``timeout`` (then it is killed and reaped)."""
        deadline = time.monotonic() + timeout
        while not self.poll(deadline, timeout):
            time.sleep(0.02)

    def poll(self, deadline: float, timeout: float) -> bool:
        """True once the child has written the file, False while it runs; raises RuntimeError if it
        failed, SnapshotWriterStuck (``timeout``: the figure for the message) once past ``deadline``
        (time.monotonic), killing and reaping it first."""
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if not pid:
            if time.monotonic() <= deadline:
                return False
            self.kill()
            raise SnapshotWriterStuck(self.pid, timeout)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"the snapshot writer (pid {self.pid}) failed: {os.waitstatus_to_exitcode(status)}")
        return True

    def kill(self) -> None:
        """SIGKILL the child and reap it (it may have exited already)."""
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


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
        self.fallbacks = dict.fromkeys(FALLBACKS, 0)  # searches answered by each fallback, since start
        self._fallbacks_lock = threading.Lock()  # searches run concurrently (read side of the gallery lock)

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
        index.init_index(max_elements=max(capacity, 16), M=self.m, ef_construction=self.ef_construction)
        return index

    def load(self, path: Path, live: int) -> None:
        """Load a verified snapshot; ``live`` is the number of its elements not marked deleted."""
        index = hnswlib.Index(space="cosine", dim=self.dim)
        index.load_index(str(path), max_elements=0)
        self._index, self.live, self._ef = index, live, 0
        self._apply_ef()

    def save(self, path: Path) -> None:
        self._live_index.save_index(str(path))

    def file_size(self) -> int:
        """The bytes ``save`` writes (hnswlib's own count; milliseconds at 1M faces). hnswlib's save
        reports no write error: a file of another size is one it could not finish (a full disk)."""
        return int(self._live_index.index_file_size())

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
        capacity = self._live_index.get_max_elements()
        if self.count + len(labels) > capacity:  # every face gets a new slot (module docstring)
            self._live_index.resize_index(max(self.count + len(labels), capacity * 2))
        self._live_index.add_items(vectors, labels)
        self.live += len(labels)
        self._apply_ef()

    def erase(self, labels: list[int]) -> None:
        """Mark live elements deleted: never returned again; their slots stay until a compaction."""
        for label in labels:
            self._live_index.mark_deleted(int(label))
        self.live -= len(labels)
        self._apply_ef()

    # --- compaction and snapshots off the gallery's lock (gallery.py) ---------------------------
    def spawn(self, capacity: int) -> HnswIndex:
        """An empty index with the same parameters: a compaction builds the next graph in it,
        off the gallery's lock (nothing else sees it until ``adopt``)."""
        other = HnswIndex(self.dim, self.m, self.ef_construction, self.ef_search)
        other.build_empty(capacity)
        return other

    def vectors_of(self, labels: np.ndarray) -> np.ndarray:
        """The stored (unit-length) vectors of live elements (caller holds the read lock)."""
        return np.asarray(self._live_index.get_items(labels), dtype=np.float32)

    def adopt(self, other: HnswIndex) -> None:
        """Swap in the graph ``other`` built (caller holds the write lock)."""
        self._index, self.live, self._ef = other._live_index, other.live, 0
        self._apply_ef()

    def save_in_background(self, path: Path, keep: int | None = None) -> BackgroundSave:
        """Write the graph as it is now to ``path`` from a forked child process, and return at once.

        The child sees the process's memory as it was at the fork (copy-on-write: the parent's later
        writes never reach it), so the caller holds the read lock for the fork only (milliseconds),
        not for the whole save (seconds at 1M faces, with the GIL held too). The child closes every
        inherited descriptor (the data-dir lock, the listening socket, SQLite) and dies with its
        parent, so a killed server's child can neither keep the data dir locked nor outlive it; it
        runs nothing but hnswlib's save and ``os._exit``. ``keep``: the one inherited descriptor it
        keeps (the unnamed file ``path`` opens). Raises OSError when it cannot fork."""
        index = self._live_index
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the child: no Python clean-up, no logging, no other thread exists here
            code = 1
            try:
                _die_with_parent(parent)
                if keep is None:
                    os.closerange(3, _max_fd())
                else:
                    os.closerange(3, keep)
                    os.closerange(keep + 1, _max_fd())
                index.save_index(str(path))
                code = 0
            finally:
                os._exit(code)
        return BackgroundSave(pid)

    def search(self, vectors: np.ndarray, k: int,
               live_faces: Callable[[], FaceChunks] | None = None, ef: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Labels and cosine similarities (not distances) of the k nearest live elements, nearest first.

        Never more than the live count (``capped``). hnswlib raises when its graph walk cannot find k
        live elements, which happens when k is (nearly) all of them: few identities with many faces,
        deleted slots. A larger ``ef`` does not help there (hnswlib already searches with ef >= k and
        still misses elements the walk never reaches), so the search scans ``live_faces`` (exact); it
        is only ever asked that near the whole gallery, where a scan costs about what the walk did.

        ``ef``: search with this breadth instead of the gallery's (hnswlib's ef is the whole index's,
        so the caller holds the write lock: no other search runs meanwhile); the gallery's is restored."""
        if ef is not None and ef != self._ef:
            self._live_index.set_ef(ef)
            try:
                return self.search(vectors, k, live_faces)
            finally:
                self._live_index.set_ef(self._ef)
        if k > self.live:
            k = self.live
            self._fell_back("capped")
        if k == 0:
            return np.zeros((len(vectors), 0), np.int64), np.zeros((len(vectors), 0), np.float32)
        try:
            labels, distances = self._live_index.knn_query(vectors, k=k)
        except RuntimeError:
            if live_faces is None:
                raise
            self._fell_back("exact")
            return exact_nearest(vectors, k, live_faces())
        return labels.astype(np.int64), (1.0 - distances).astype(np.float32)

    def _fell_back(self, kind: str) -> None:
        with self._fallbacks_lock:
            self.fallbacks[kind] += 1

    @property
    def capacity(self) -> int:
        return self._index.get_max_elements() if self._index is not None else 0




def exact_nearest(probes: np.ndarray, k: int, faces: FaceChunks) -> tuple[np.ndarray, np.ndarray]:
    """The k most cosine-similar faces of each probe by scanning every (labels, vectors) chunk, keeping a
    running top k (memory: one chunk, not the gallery). Like ``HnswIndex.search``'s answer: labels and
    similarities, nearest first; fewer than k columns if the chunks hold fewer faces."""
    probes = np.asarray(probes, dtype=np.float32)
    probes = probes / np.maximum(np.linalg.norm(probes, axis=1, keepdims=True), np.finfo(np.float32).tiny)
    best_labels = np.zeros((len(probes), 0), np.int64)
    best_sims = np.zeros((len(probes), 0), np.float32)
    for labels, vectors in faces:
        vectors = np.asarray(vectors, dtype=np.float32)
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), np.finfo(np.float32).tiny)
        sims = np.concatenate([best_sims, probes @ vectors.T], axis=1)
        names = np.concatenate([best_labels, np.broadcast_to(np.asarray(labels, np.int64), (len(probes), len(labels)))],
                               axis=1)
        if sims.shape[1] > k:
            keep = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            sims, names = np.take_along_axis(sims, keep, axis=1), np.take_along_axis(names, keep, axis=1)
        best_sims, best_labels = sims, names
    order = np.argsort(-best_sims, axis=1, kind="stable")
    return np.take_along_axis(best_labels, order, axis=1), np.take_along_axis(best_sims, order, axis=1)
