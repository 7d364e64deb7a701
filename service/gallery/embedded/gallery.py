"""The gallery keeps the durable store and the HNSW index consistent.

Writes (enroll, delete) take the write side of a readers-writer lock: commit to the store first,
then update the index, then acknowledge. Searches take the read side and run concurrently. If an
index update fails after the store committed, the index is marked dirty: it is never snapshotted
and the maintenance thread rebuilds it from the store.

Start-up (``open_store`` then ``load``, the latter in the background in the server): the data dir
is locked, then the index comes from a verified snapshot plus a replay of what changed in the store
since (faces added: store ids not in the snapshot; faces erased: snapshot labels no longer in the
store), or, on any doubt about the snapshot, is rebuilt from the store. A maintenance thread writes
snapshots periodically, so a restart after ``kill -9`` replays minutes of changes, not the gallery.

Erasing: a deleted face is marked deleted in the index, its vector zeroed in the snapshot file on
disk (and in every snapshot written later), and removed from SQLite (``secure_delete``, WAL
truncated). Deleted slots stay in the graph as tombstones (never reused: index.py says why) until
the graph is compacted, when tombstones dominate.

Writes never wait long for maintenance: a compaction builds the next graph off the lock and replays
the writes made meanwhile (``_compact``); a snapshot holds the read lock only to fork the process
that writes it (``snapshot``, index.py).

Identity scoring (max-over-faces, oversampled top-k with widening) is search.py's, shared with the
postgres backend; this module only says which faces are nearest and whose they are.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...model.calibration import FACES_COUNTED_PER_IDENTITY, counted_faces
from ..api import DEFAULT_COLLECTION, Actor
from ..crops import CropCipher
from ..results import (
    Among,
    EnrollResult,
    FacesDeleted,
    IdentityDetails,
    IdentityRecord,
    IdentityUpdate,
    MergeResult,
    MoveResult,
    TooManyFacesForCollection,
    UpdateResult,
    count_changes,
    deletions,
)
from ..search import GalleryModelMismatch, Hit, Match, check_model, score_among, search_identities
from .index import BackgroundSave, HnswIndex, SnapshotWriterStuck
from .lock import DataDirLock, usable_data_dir
from .snapshot import Layout, SnapshotFiles, SnapshotInvalid, read_layout
from .sqlite import is_storage_full
from .store import Room, Store, StoreDamaged, as_damaged

log = logging.getLogger(__name__)

# free space a snapshot leaves the store at least (or a twentieth of the snapshot, if more): a snapshot
# that would take the data dir's last bytes is skipped, so enrollments are not refused while it is written
SNAPSHOT_RESERVE_BYTES = 1 << 20

__all__ = ["Gallery", "GalleryLoading", "GalleryModelMismatch", "GalleryOptions", "Match", "ReadWriteLock"]


class _LoadCancelled(Exception):
    """close() was called while the index was still loading."""



def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class GalleryLoading(RuntimeError):
    """The index is still being loaded (or could not be): searches and writes must wait."""

    def __init__(self, message: str, failed: bool = False) -> None:
        super().__init__(message)
        self.failed = failed


@dataclass
class GalleryOptions:
    """Background maintenance: periodic snapshots and compaction of deleted slots."""

    snapshot_interval_s: float = 60.0   # 0 disables periodic snapshots (close still writes one)
    snapshot_min_changes: int = 1       # writes since the last snapshot needed to write another
    compact_tombstone_ratio: float = 0.5  # compact when this share of the graph is deleted slots ...
    compact_min_tombstones: int = 1000    # ... and there are at least this many
    # False: no thread of its own; the owner calls maintain() (EmbeddedGalleries: one thread for every
    # open collection)
    maintenance_thread: bool = True
    # a forked snapshot writer still running this long after its fork is killed (1M faces take ~1-10 s);
    # the next snapshot is then written in-process (under the read lock). Maintenance rounds never
    # wait for a writer; snapshot() (close, tools) waits at most this long
    snapshot_timeout_s: float = 600.0


class ReadWriteLock:
    """Many readers or one writer, in order of arrival: each reader or writer takes a ticket and goes
    when it is first in line (readers in a row go together). A writer that writes again the moment it
    is done (a retention sweep erasing face after face, an import) gets a new ticket behind whoever
    came meanwhile, so no write or search starves; a waiting writer holds back the readers after it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._next_ticket = 0  # the ticket the next arrival takes
        self._serving = 0  # the ticket that may go next (once the lock allows it)

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            while ticket != self._serving or self._writer:
                self._cond.wait()
            self._readers += 1
            self._serving += 1
            self._cond.notify_all()  # a reader next in line goes too
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            while ticket != self._serving or self._writer or self._readers:
                self._cond.wait()
            self._writer = True
            self._serving += 1
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass
class _SnapshotWriting:
    """A snapshot started and not yet in place: its writer (None: saved in-process), its meta, the
    changes it covers, when it began (perf_counter), its seconds under the read lock, and when its
    writer is killed (monotonic)."""

    saving: BackgroundSave | None
    meta: dict
    changes: int
    started: float
    locked_s: float
    deadline: float
    size: int  # the bytes the finished file must have (hnswlib's save does not report a short write)
    fd: int | None = None  # the unnamed file it is written to (SnapshotFiles.unnamed); None: the named temp
    file: Path = Path()  # where it is written and read until put in place (SnapshotFiles.writing_path)

    def close(self) -> None:
        """Drop the unnamed file (its last descriptor here; a writer still running keeps its own)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Gallery:
    STORE_FILE = "gallery.sqlite3"
    INDEX_FILE = "index.hnsw"
    INDEX_META_FILE = "index.json"
    COMPACTION_CHUNK = 1000  # faces copied per hold of the read lock (get_items holds the GIL: ~40 ms)
    COMPACTION_CATCH_UP_ROUNDS = 5  # replays off the lock before the last one, under the write lock ...
    COMPACTION_FINAL_CHANGES = 100  # ... which comes as soon as at most this many writes are left

    def __init__(self, data_dir: Path, model_id: str, dim: int, m: int = 16, ef_construction: int = 200,
                 ef_search: int | str = "auto", options: GalleryOptions | None = None,
                 name: str = DEFAULT_COLLECTION) -> None:
        self.data_dir = Path(data_dir)
        self.name = name  # the collection it holds, as its audit entries name it
        self.model_id = model_id
        self.dim = dim
        self.options = options or GalleryOptions()
        self._lock = ReadWriteLock()
        self._index = HnswIndex(dim, m, ef_construction, ef_search)
        self._label_identity: dict[int, str] = {}
        self.identity_count = 0  # kept in memory so /identify need not count rows
        self.counted_faces = 0  # sum of min(faces, FACES_COUNTED_PER_IDENTITY) per identity: sizes n_eff
        self.store: Store | None = None
        self.dir_lock = DataDirLock(self.data_dir)  # EmbeddedGalleries shares its own with the default collection
        self._files = SnapshotFiles(self.data_dir, self.INDEX_FILE, self.INDEX_META_FILE)
        self._snapshot_meta: dict | None = None  # meta of the snapshot file on disk, if valid
        self._snapshot_layout: Layout | None = None
        self._erased_since_save: list[int] | None = None  # while a snapshot is being written
        self._snapshot_mutex = threading.Lock()
        self._ready = threading.Event()
        self._load_error: str | None = None
        self._load_damaged: str | None = None  # the load found the store damaged: StoreDamaged's message
        self._opened_stamp: tuple[int, int, int] | None = None  # the store file as open_store found it
        self._loader: threading.Thread | None = None
        self._dirty = False  # the index does not mirror the store: never snapshot it
        self._changes = 0  # writes since the last snapshot
        self._last_snapshot = time.monotonic()
        self._stop = threading.Event()
        self._maintainer: threading.Thread | None = None
        self._maintenance_mutex = threading.Lock()
        # writes made while a compaction builds the next graph: (labels, vectors) added, (labels, None) erased
        self._change_log: list[tuple[np.ndarray, np.ndarray | None]] | None = None
        # test hook, a real code path: called after each chunk a compaction copied, holding no lock
        self.compaction_hook: Callable[[], None] | None = None
        self._fork_snapshots = True  # False after a stuck writer was killed: the next one is written in-process
        self._writing: _SnapshotWriting | None = None  # a snapshot whose writer a maintenance round started
        self.snapshot_writers_killed = 0  # forked writers killed past options.snapshot_timeout_s (/metrics)
        # seals kept crops (keep_crops collections); set by whoever makes the gallery (open.make_gallery)
        self.crop_cipher: CropCipher | None = None

    @property
    def _live_store(self) -> Store:
        """The store, which exists between open_store() and close()."""
        if self.store is None:
            raise RuntimeError("the gallery store is not open")
        return self.store

    # --- lifecycle ---------------------------------------------------------------------------
    def open(self) -> None:
        """Open and load in the calling thread (tools, tests); the server uses open_store + start_loading."""
        self.open_store()
        self.load()

    def open_store(self) -> None:
        """Lock the data dir, open the store, check the model. Fast; raises DataDirLocked or
        GalleryModelMismatch."""
        usable_data_dir(self.data_dir)
        self.dir_lock.acquire()
        try:
            self._opened_stamp = _file_stamp(self.data_dir / self.STORE_FILE)
            self.store = Store(self.data_dir / self.STORE_FILE)
            self._check_model()
            self.store.checkpoint()  # a crash may have left erased rows in the WAL ...
            self._files.remove_temporaries()  # ... or a half-written snapshot holding erased faces
        except BaseException as exc:
            if self.store is not None:
                self.store.close()
                self.store = None
            self.dir_lock.release()
            # a page of it SQLite finds damaged (the file opened as a database)
            if (damage := as_damaged(self.data_dir / self.STORE_FILE, exc)) is not None and damage is not exc:
                raise damage from exc
            raise

    def _check_model(self) -> None:
        stored_model = self._live_store.get_meta("model_id")
        stored_dim = self._live_store.get_meta("embedding_size")
        check_model(stored_model, int(stored_dim) if stored_dim else None, self.model_id, self.dim,
                    str(self.data_dir))
        if stored_model is None:
            self._live_store.set_meta("model_id", self.model_id)
            self._live_store.set_meta("embedding_size", str(self.dim))

    def start_loading(self) -> None:
        """Load the index in a background thread; until it is done searches and writes raise GalleryLoading."""
        self._loader = threading.Thread(target=self._load_in_background, name="gallery-load", daemon=True)
        self._loader.start()

    def _load_in_background(self) -> None:
        try:
            self.load()
        except _LoadCancelled:
            log.info("gallery load cancelled by shutdown")
        except Exception as exc:  # noqa: BLE001 - reported by /readyz and the log
            self._load_error = f"{type(exc).__name__}: {exc}"
            if (damage := as_damaged(self.data_dir / self.STORE_FILE, exc)) is None:
                log.exception("gallery could not be loaded")
            else:  # the operator's to restore, not a bug: no stack (EmbeddedGalleries logs the collection damaged)
                self._load_damaged = str(damage)
                log.warning("gallery index not loaded: its store is damaged",
                            extra={"collection": self.name, "reason": self._load_damaged})

    def load(self) -> None:
        with self._lock.write():
            self._load_index()
        self._ready.set()
        if self.options.snapshot_interval_s > 0 and self.options.maintenance_thread:
            self._maintainer = threading.Thread(target=self._maintain, name="gallery-maintenance", daemon=True)
            self._maintainer.start()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def load_state(self) -> str:
        """"ready", "loading" or "failed" (then ``load_error`` says why)."""
        return "ready" if self._ready.is_set() else "failed" if self._load_error else "loading"

    @property
    def load_error(self) -> str | None:
        return self._load_error

    @property
    def load_damage(self) -> StoreDamaged | None:
        """What the background load found damaged (its uses raise it), if it did."""
        return StoreDamaged(self._load_damaged) if self._load_damaged is not None else None

    def store_replaced(self) -> bool:
        """The store file is not the one opened (restored from a backup since): another inode, size or
        modification time. Meant for a gallery whose load found it damaged, which writes nothing to it."""
        return self._opened_stamp is not None and _file_stamp(self.data_dir / self.STORE_FILE) != self._opened_stamp

    def _require_ready(self) -> None:
        if not self._ready.is_set():
            if self._load_damaged:
                raise StoreDamaged(self._load_damaged)
            if self._load_error:
                raise GalleryLoading(f"the gallery index could not be loaded: {self._load_error}", failed=True)
            raise GalleryLoading("the gallery index is loading; retry shortly")

    def _load_index(self) -> None:
        started = time.perf_counter()
        store_ids, identities = self._live_store.face_labels()
        source, replayed = "rebuilt", {"added": 0, "erased": 0}
        meta = self._files.read_meta()
        if meta and meta.get("model_id") == self.model_id and meta.get("dim") == self.dim:
            try:
                replayed = self._load_snapshot(meta, store_ids)
                source = "snapshot"
            except (SnapshotInvalid, RuntimeError, ValueError, OSError, KeyError, TypeError):
                log.warning("index snapshot unusable; rebuilding from the store", exc_info=True)
        elif self._files.index.exists():
            log.warning("index snapshot without a valid meta; rebuilding from the store")
        if source == "rebuilt":
            self._rebuild(store_ids)
        self._label_identity = dict(zip(store_ids.tolist(), identities))
        self.identity_count = self._live_store.counts()[0]
        self.counted_faces = self._live_store.counted_faces(FACES_COUNTED_PER_IDENTITY)
        # a rebuilt index, or a replayed one, is worth a snapshot soon: the next crash then replays less
        self._changes = len(store_ids) if source == "rebuilt" else replayed["added"] + replayed["erased"]
        log.info(
            "gallery index ready",
            extra={"source": source, "faces": len(store_ids), "generation": self._live_store.generation,
                   "replayed_added": replayed["added"], "replayed_erased": replayed["erased"],
                   "seconds": round(time.perf_counter() - started, 3)},
        )

    def _load_snapshot(self, meta: dict, store_ids: np.ndarray) -> dict:
        """Verify, load, then replay the store's changes since the snapshot was written."""
        self._files.verify(meta)  # before hnswlib touches the file: it does not survive bad input
        layout = read_layout(self._files.index, self.dim)
        self._files.invalidate()  # should loading crash the process, the next start rebuilds
        snapshot_live = layout.live_labels()
        self._index.load(self._files.index, live=len(snapshot_live))
        erased = np.setdiff1d(snapshot_live, store_ids)  # deleted from the store since the snapshot
        added = np.setdiff1d(store_ids, snapshot_live)   # enrolled since the snapshot
        self._index.erase(erased.tolist())
        for start in range(0, len(added), 10_000):
            part = added[start:start + 10_000]
            self._index.add(self._live_store.embeddings_of(part), part)
        meta = self._files.scrub(layout, meta, erased.tolist(), self.dim)
        self._files.write_meta(meta)  # verified and loaded: the file is a valid base again
        self._snapshot_meta, self._snapshot_layout = meta, layout
        return {"added": len(added), "erased": len(erased)}

    def _forget_snapshot(self) -> None:
        """Drop the snapshot's meta (the file on disk no longer counts) and what is known of it."""
        self._files.invalidate()
        self._snapshot_meta = self._snapshot_layout = None

    def _rebuild(self, store_ids: np.ndarray | None = None) -> None:
        """A fresh index from every face in the store (caller holds the write lock)."""
        self._forget_snapshot()
        count = len(store_ids) if store_ids is not None else self._live_store.counts()[1]
        self._index.build_empty(capacity=max(1024, int(count * 1.25)))
        for ids, vectors, _ in self._live_store.iter_faces():
            if self._stop.is_set():
                raise _LoadCancelled
            self._index.add(vectors, ids)
        self._dirty = False

    def close(self, snapshot: bool = True) -> None:
        """Stop maintenance, write an index snapshot for a fast next start (unless ``snapshot`` is
        False: a collection about to be erased), close the store, unlock."""
        if self.store is None:
            return
        self._stop.set()  # also cancels a load still running (a rebuild stops between chunks)
        if self._loader is not None:
            self._loader.join()
        if self._maintainer is not None:
            self._maintainer.join()
        if self._ready.is_set() and snapshot:
            self.snapshot()
        else:
            self._abandon_snapshot()
        with self._lock.write():
            self.store.close()
            self.store = None
        self.dir_lock.release()

    # --- snapshots and maintenance -----------------------------------------------------------
    def snapshot(self) -> bool:
        """Write the index to disk (durably, with checksums) and wait for it. Skipped while the index
        is dirty.

        The read side of the lock is held only to fork the process (index.py: the child writes the
        graph as it was at the fork; searches go on, writes wait for the fork only); deleted vectors
        are zeroed, the file fsynced and checksummed without the lock, and faces erased meanwhile are
        zeroed in the new file before it is put in place (under the write side, a few fsyncs). Where
        the process cannot fork, or its last forked writer was stuck, hnswlib saves under the read
        lock. A snapshot the maintenance round started (``_snapshot_step``) is finished first."""
        with self._snapshot_mutex:
            if self._writing is not None:
                self._finish_snapshot(block=True)
            if not self._start_snapshot():
                return False
            return self._finish_snapshot(block=True) is True

    def _snapshot_step(self, block: bool) -> None:
        """The maintenance round's part: start a snapshot, or see whether the one started in an
        earlier round is written (then put it in place). Unless ``block``, never waiting for the
        child: a stuck child does not hold up the other collections the maintenance thread serves
        (it is killed once past options.snapshot_timeout_s)."""
        with self._snapshot_mutex:
            if self._writing is None and not self._start_snapshot():
                return
            self._finish_snapshot(block)

    def _start_snapshot(self) -> bool:
        """Fork the writer (or save in-process) under the read lock; False if skipped or failed
        (caller holds _snapshot_mutex)."""
        started = time.perf_counter()
        with self._lock.read():
            if self._dirty:
                log.warning("index snapshot skipped: the index is being repaired")
                return False
            meta = {"generation": self._live_store.generation, "model_id": self.model_id, "dim": self.dim,
                    "faces": self._index.live, "max_face_id": max(self._label_identity, default=0)}
            changes = self._changes
            size = self._index.file_size()
            free = shutil.disk_usage(self.data_dir).free
            if free < size + max(SNAPSHOT_RESERVE_BYTES, size // 20):  # keep room for the store's writes
                log.warning("index snapshot skipped: not enough free space in the data dir; the previous one "
                            "is kept and the store stays the truth", extra={
                                "collection": self.name, "data_dir": str(self.data_dir),
                                "free_mb": round(free / 2**20, 1), "snapshot_mb": round(size / 2**20, 1)})
                self._last_snapshot = time.monotonic()  # again at the next interval
                return False
            # written to a file with no name until it is put in place: a kill -9 meanwhile leaves nothing
            # of it, though it holds the faces erased after its save until then (install zeroes them)
            fd = self._files.unnamed()
            writing = _SnapshotWriting(None, meta, changes, started, 0.0,
                                       time.monotonic() + self.options.snapshot_timeout_s, size,
                                       fd, self._files.writing_path(fd))
            if self._fork_snapshots:
                try:
                    writing.saving = self._index.save_in_background(writing.file, keep=writing.fd)
                except OSError:
                    log.warning("could not fork to write the index snapshot; writing it under the lock",
                                exc_info=True)
            try:
                if writing.saving is None:
                    self._index.save(writing.file)
            except Exception:  # noqa: BLE001 - the store is the truth; the next start rebuilds
                log.warning("could not save the index", exc_info=True)
                writing.close()
                self._files.remove_temporaries()
                self._last_snapshot = time.monotonic()  # retry at the next interval, not every tick
                return False
            self._erased_since_save = []  # writers append from now on (they wait for this lock)
            writing.locked_s = time.perf_counter() - started
            self._writing = writing
        return True

    def _finish_snapshot(self, block: bool) -> bool | None:
        """The snapshot in progress: None while its writer still runs (``block`` False), else True
        once it is in place, False if it failed (caller holds _snapshot_mutex)."""
        writing = self._writing
        assert writing is not None
        tmp = writing.file
        installing = False
        try:
            if writing.saving is not None:
                timeout = self.options.snapshot_timeout_s
                if block:
                    writing.saving.wait(max(0.0, writing.deadline - time.monotonic()))
                elif not writing.saving.poll(writing.deadline, timeout):
                    return None
            self._writing = None
            meta, layout = self._files.prepare(tmp, writing.meta, self.dim, writing.size)
            with self._lock.write():
                erased, self._erased_since_save = self._erased_since_save or [], None
                installing = True
                meta = self._files.install(tmp, meta, layout, erased, self.dim, writing.fd)
                self._snapshot_meta, self._snapshot_layout = meta, layout
                self._changes -= writing.changes
        except Exception as exc:  # noqa: BLE001
            self._writing = None
            if isinstance(exc, SnapshotWriterStuck):
                self._writer_stuck(exc)
            elif is_storage_full(exc):  # filled while it was written: said as the skipped ones are, no stack
                log.warning("index snapshot not written: the data dir filled up while it was written; the "
                            "store stays the truth", extra={"collection": self.name, "data_dir": str(self.data_dir)})
            else:
                log.warning("could not write index snapshot", exc_info=True)
            with self._lock.write():
                self._erased_since_save = None
                if installing:  # the file in place may be half replaced: it no longer counts
                    self._forget_snapshot()
                # else the previous snapshot is untouched (and scrubbed of every erase): still a base
            self._files.remove_temporaries()  # the named temp (or the unnamed file's name), a meta half written
            self._last_snapshot = time.monotonic()
            return False
        finally:
            if self._writing is None:  # done with it, put in place or not: its descriptor goes
                writing.close()
        self._last_snapshot = time.monotonic()
        self._fork_snapshots = True
        log.info("index snapshot written", extra={"collection": self.name, "generation": meta["generation"],
                                                  "faces": meta["faces"],
                                                  "seconds": round(time.perf_counter() - writing.started, 3),
                                                  "read_lock_seconds": round(writing.locked_s, 3)})
        return True

    def _abandon_snapshot(self) -> None:
        """Kill the writer of a snapshot in progress and drop its file (a collection being erased)."""
        with self._snapshot_mutex:
            writing, self._writing = self._writing, None
            if writing is None:
                return
            if writing.saving is not None:
                writing.saving.kill()
            writing.close()
            with self._lock.write():
                self._erased_since_save = None
            self._files.remove_temporaries()

    def _writer_stuck(self, exc: SnapshotWriterStuck) -> None:
        """A forked writer ran past options.snapshot_timeout_s (BackgroundSave.wait killed it): counted,
        logged; the next snapshot (at the next interval, or at close) is written in-process."""
        self.snapshot_writers_killed += 1
        self._fork_snapshots = False
        log.error("snapshot writer stuck; killed",
                  extra={"collection": self.name, "data_dir": str(self.data_dir), "pid": exc.pid,
                         "timeout_s": self.options.snapshot_timeout_s, "killed_total": self.snapshot_writers_killed,
                         "next_snapshot": "in-process"})

    def _maintain(self) -> None:
        tick = min(1.0, self.options.snapshot_interval_s)
        while not self._stop.wait(tick):
            try:
                self.maintain(wait=False)
            except Exception:  # noqa: BLE001 - keep maintaining; the store stays the truth
                log.exception("gallery maintenance failed")

    def maintain(self, force_snapshot: bool = False, wait: bool = True) -> None:
        """One round: repair a dirty index, compact tombstones, snapshot if due. Rounds do not overlap.
        ``wait`` False (the maintenance threads): a snapshot's writer is forked and left running; a
        later round puts its file in place."""
        with self._maintenance_mutex:
            if self._dirty:
                with self._lock.write():
                    log.warning("rebuilding the index from the store after a failed update")
                    self._rebuild()
                    self._changes += 1
            if self._compaction_due():
                self._compact()
            due = (time.monotonic() - self._last_snapshot >= self.options.snapshot_interval_s
                   and self._changes >= self.options.snapshot_min_changes)
            if force_snapshot:
                self.snapshot()
            elif due or self._writing is not None:
                self._snapshot_step(block=wait)

    def _compaction_due(self) -> bool:
        tombstones = self._index.tombstones
        return (tombstones >= self.options.compact_min_tombstones
                and tombstones > self.options.compact_tombstone_ratio * self._index.count)

    def _compact(self) -> bool:
        """Rebuild the graph from the live faces without stalling writes: the live labels are listed
        and the change log opened under the read lock; their vectors are copied chunk by chunk (the
        read lock per chunk) into a fresh graph built with no lock held; the writes made meanwhile
        (the change log) are replayed into it, off the lock until few are left, the last of them
        under the write lock, which then swaps the graphs. A face erased meanwhile is either not
        copied (erased before its chunk) or marked deleted by the replay: it is never searchable in
        the new graph, and snapshots are only ever taken of the graph in use."""
        started = time.perf_counter()
        with self._lock.read():
            if self._dirty:
                return False
            tombstones = self._index.tombstones
            labels = np.fromiter(self._label_identity.keys(), dtype=np.int64, count=len(self._label_identity))
            self._change_log = []  # writers append from now on (they wait for this lock)
        try:
            fresh = self._index.spawn(capacity=max(1024, int(len(labels) * 1.25)))
            not_copied: set[int] = set()  # listed, then erased before their chunk was copied
            for start in range(0, len(labels), self.COMPACTION_CHUNK):
                part = labels[start:start + self.COMPACTION_CHUNK]
                with self._lock.read():
                    if self._dirty or self._stop.is_set():
                        return False  # the repair rebuilds from the store; close() wants the thread back
                    live = np.fromiter((int(label) in self._label_identity for label in part), bool, len(part))
                    not_copied.update(part[~live].tolist())
                    part = part[live]
                    vectors = self._index.vectors_of(part)
                fresh.add(vectors, part)  # no lock: the fresh graph is this thread's alone
                if self.compaction_hook is not None:
                    self.compaction_hook()
            for _ in range(self.COMPACTION_CATCH_UP_ROUNDS):  # replay off the lock while writes go on
                with self._lock.read():
                    changes, self._change_log = self._change_log, []
                self._replay(fresh, changes, not_copied)
                if len(changes) <= self.COMPACTION_FINAL_CHANGES:
                    break
            with self._lock.write():
                changes, self._change_log = self._change_log, None
                if self._dirty:
                    return False
                locked = time.perf_counter()
                self._replay(fresh, changes, not_copied)
                self._index.adopt(fresh)
                self._changes += 1
                locked_s = time.perf_counter() - locked
        finally:
            if self._change_log is not None:
                with self._lock.read():
                    self._change_log = None
        log.info("index compacted", extra={"tombstones_removed": tombstones, "live": self._index.live,
                                           "seconds": round(time.perf_counter() - started, 3),
                                           "replayed_under_write_lock": len(changes),
                                           "write_lock_seconds": round(locked_s, 3)})
        return True

    @staticmethod
    def _replay(fresh: HnswIndex, changes: list[tuple[np.ndarray, np.ndarray | None]], not_copied: set[int]) -> None:
        """Apply logged writes to the graph a compaction builds: adds (labels, vectors), erasures
        (labels, None); a label erased before its chunk was copied is not in it."""
        for labels, vectors in changes:
            if vectors is not None:
                fresh.add(vectors, labels)
            else:
                fresh.erase([label for label in labels.tolist() if label not in not_copied])

    def _log_change(self, labels: np.ndarray | list[int], vectors: np.ndarray | None = None) -> None:
        """Record a write for the compaction in progress, if any (caller holds the write lock)."""
        if self._change_log is not None:
            self._change_log.append((np.asarray(labels, dtype=np.int64), vectors))

    # --- writes ------------------------------------------------------------------------------
    def _check_vectors(self, embeddings: np.ndarray) -> np.ndarray:
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim or not np.isfinite(embeddings).all():
            raise ValueError(f"embeddings must be finite and of shape (n, {self.dim}), not {embeddings.shape}")
        return embeddings

    def _index_update(self, what: str, update: Callable[[], object]) -> None:
        """Run an index mutation after the store committed; a failure leaves the write durable and
        marks the index dirty (never snapshotted; rebuilt from the store by the maintenance thread)."""
        try:
            update()
        except Exception:  # noqa: BLE001
            self._dirty = True
            log.exception("index update failed after the store committed; index marked dirty", extra={"op": what})
        self._changes += 1

    def _erase(self, labels: list[int]) -> None:
        """Erase faces already deleted from the store: from the index, the snapshot file, the WAL."""
        if not labels:
            return
        self._index_update("erase", lambda: self._index.erase(labels))
        self._log_change(labels)
        for label in labels:
            self._label_identity.pop(label, None)
        if self._erased_since_save is not None:  # a snapshot saved before this erase is being written
            self._erased_since_save.extend(labels)
        if self._snapshot_meta is not None and self._snapshot_layout is not None:
            try:
                self._snapshot_meta = self._files.scrub(self._snapshot_layout, self._snapshot_meta, labels, self.dim)
            except Exception:  # noqa: BLE001 - cannot scrub: drop the snapshot rather than keep the vector
                log.warning("could not scrub the index snapshot; removing it", exc_info=True)
                self._forget_snapshot()
                self._files.index.unlink(missing_ok=True)
        if not self._live_store.checkpoint():
            log.warning("WAL checkpoint not done after a delete (busy, or a full disk); the next one truncates it")

    def enroll(self, identity_id: str, embeddings: np.ndarray, metadata: dict | None = None,
               replace: bool = False, max_faces: int | None = None, actor: Actor | None = None,
               crops: list[bytes] | None = None, enrolled_at: list[float] | None = None,
               collection_limit: int | None = None) -> EnrollResult:
        """Add faces to an identity (created if new), or with ``replace`` swap its faces for these;
        TooManyFacesForIdentity (nothing written) if it would hold more than ``max_faces``, and
        TooManyFacesForCollection if the collection would hold more than ``collection_limit`` (its
        face count is exact under the write lock). ``actor``: the audit entry is committed with the
        faces; ``crops`` (one per face) are sealed and stored with them."""
        embeddings = self._check_vectors(embeddings)
        self._require_ready()
        seal = None if crops is None or self.crop_cipher is None else self.crop_cipher.sealer(self.name)
        with self._lock.write():
            room = None if collection_limit is None else Room(self.name, self.face_count, collection_limit)
            added = self._live_store.add_faces(identity_id, embeddings, metadata, replace, max_faces, actor, self.name,
                                               crops, seal, enrolled_at, room)
            before = added.face_count - len(added.face_ids) + len(added.removed)
            self.counted_faces += counted_faces(added.face_count) - counted_faces(before)
            # committed: from here on the enrollment is durable; the index follows the store
            self._erase(added.removed)
            self._index_update("add", lambda: self._index.add(embeddings, np.asarray(added.face_ids, dtype=np.int64)))
            self._log_change(added.face_ids, embeddings)
            self._label_identity.update((fid, identity_id) for fid in added.face_ids)
            self.identity_count += added.created
        return EnrollResult(added.face_ids, added.created, len(added.removed), added.face_count)

    def import_identities(self, items: list[tuple[str, np.ndarray, dict | None]],
                          actor: Actor | None = None,
                          enrolled_at: list[list[float] | None] | None = None,
                          collection_limit: int | None = None,
                          created_at: list[float | None] | None = None) -> list[list[int]]:
        """Bulk-add new identities (all or none; an existing id aborts the import, and so does a
        collection that would hold more than ``collection_limit`` faces). Returns face ids."""
        items = [(i, self._check_vectors(e), m) for i, e, m in items]
        self._require_ready()
        with self._lock.write():
            adding = sum(len(e) for _, e, _ in items)
            if collection_limit is not None and self.face_count + adding > collection_limit:
                raise TooManyFacesForCollection(self.name, self.face_count, adding, collection_limit)
            face_ids = self._live_store.add_new_identities(items, actor, self.name, enrolled_at, created_at)
            labels = np.asarray([f for ids in face_ids for f in ids], dtype=np.int64)
            if len(labels):
                vectors = np.concatenate([emb for _, emb, _ in items])
                self._index_update("import", lambda: self._index.add(vectors, labels))
                self._log_change(labels, vectors)
            for (identity_id, _, _), ids in zip(items, face_ids):
                self._label_identity.update((fid, identity_id) for fid in ids)
                self.counted_faces += counted_faces(len(ids))
            self.identity_count += len(items)
        return face_ids

    def delete(self, identity_id: str, actor: Actor | None = None) -> int | None:
        """Erase an identity from store and index. Returns the number of faces, None if unknown."""
        self._require_ready()
        with self._lock.write():
            face_ids = self._live_store.delete_identity(identity_id, actor, self.name)
            if face_ids is None:
                return None
            self._erase(face_ids)
            self.identity_count -= 1
            self.counted_faces -= counted_faces(len(face_ids))
        return len(face_ids)

    # --- faces changing identity, or erased one by one (gallery hygiene) ----------------------
    # A face keeps its id (the index label) and its vector: only the label -> identity map changes,
    # under the write lock, after the store committed. Snapshots hold vectors by label, never the map:
    # a load builds the map from the store (_load_index), so a moved face is its new identity's after
    # any restart, whatever snapshot is on disk.
    def merge_identities(self, source_id: str, target_id: str, max_faces: int | None = None,
                         actor: Actor | None = None) -> MergeResult:
        self._require_ready()
        with self._lock.write():
            moved, before = self._live_store.merge_identities(source_id, target_id, max_faces, actor, self.name)
            after = before + len(moved)
            self._label_identity.update((fid, target_id) for fid in moved)
            self.identity_count -= 1
            self.counted_faces += counted_faces(after) - counted_faces(before) - counted_faces(len(moved))
            self._changes += 1
        return MergeResult(target_id, len(moved), after)

    def update_identity(self, identity_id: str, update: IdentityUpdate, actor: Actor | None = None) -> UpdateResult:
        """A rename moves every face label to the new id, as a merge does; metadata lives in the store only."""
        self._require_ready()
        with self._lock.write():
            result = self._live_store.update_identity(identity_id, update, actor, self.name)
            if result.renamed_from is not None:
                new_id = result.details.record.identity_id
                self._label_identity.update((face.face_id, new_id) for face in result.details.faces)
                self._changes += 1
        return result

    def move_face(self, face_id: int, target_id: str, max_faces: int | None = None,
                  actor: Actor | None = None) -> MoveResult:
        self._require_ready()
        with self._lock.write():
            source_id, source_before, target_before, created = self._live_store.move_face(
                face_id, target_id, max_faces, actor, self.name)
            self._label_identity[face_id] = target_id
            self.identity_count += int(created) - int(source_before == 1)
            self.counted_faces += (counted_faces(source_before - 1) - counted_faces(source_before)
                                   + counted_faces(target_before + 1) - counted_faces(target_before))
            self._changes += 1
        return MoveResult(face_id, source_id, target_id, created, source_before == 1)

    def delete_faces(self, face_ids: list[int], actor: Actor | None = None) -> FacesDeleted:
        """Erase faces as delete() erases an identity's: store (secure_delete, one transaction), index,
        snapshot, WAL (one scrub and one checkpoint for them all)."""
        self._require_ready()
        with self._lock.write():
            erased, missing = self._live_store.delete_faces(face_ids, actor, self.name)
            self._erase([face_id for face_id, _, _ in erased])
            for before, after in count_changes(erased).values():
                self.identity_count -= int(after == 0)
                self.counted_faces += counted_faces(after) - counted_faces(before)
        return FacesDeleted(deletions(erased), missing)

    # --- reads -------------------------------------------------------------------------------
    def search(self, probes: np.ndarray, top_k: int, ef: int | None = None) -> list[list[Match]]:
        """For each probe, up to top_k identities, best first, scored max-over-faces (search.py).
        ``ef``: another search breadth than the gallery's; hnswlib's ef belongs to the whole index, so
        such a search holds the write lock (other searches wait for it: hygiene scans ask in batches)."""
        self._require_ready()
        probes = np.atleast_2d(np.asarray(probes, dtype=np.float32))
        if ef is not None and ef != self._index.ef:
            with self._lock.write():
                return search_identities(lambda p, k: self._nearest(p, k, ef), probes, top_k,
                                         max_faces=self._index.live)
        with self._lock.read():  # the labels stay those of the index for the whole search
            return search_identities(self._nearest, probes, top_k, max_faces=self._index.live)

    def _nearest(self, probes: np.ndarray, k: int, ef: int | None = None) -> list[list[Hit]]:
        """The k nearest live faces of each probe, named (caller holds the read lock). A label
        without an identity cannot happen under the lock; it would come back as None (skipped)."""
        labels, sims = self._index.search(probes, k, self._live_faces, ef)
        names = self._label_identity
        return [[(label, names.get(label), sim) for label, sim in zip(row_labels, row_sims)]
                for row_labels, row_sims in zip(labels.tolist(), sims.tolist())]

    def _live_faces(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every live face (labels, vectors) from the store, in chunks: the index's exact search scans
        them when its graph cannot answer (caller holds the read lock: the store matches the index)."""
        return ((ids, vectors) for ids, vectors, _ in self._live_store.iter_faces())

    def identity_embeddings(self, identity_id: str) -> np.ndarray | None:
        return self._live_store.identity_embeddings(identity_id)

    def get_identity(self, identity_id: str) -> IdentityDetails | None:
        return self._live_store.get_identity(identity_id)

    def list_identities(self, limit: int, after: str | None, prefix: str | None = None) -> list[IdentityRecord]:
        return self._live_store.list_identities(limit, after, prefix)

    def expired_faces(self, enrolled_before: float, limit: int) -> list[int]:
        return self._live_store.expired_faces(enrolled_before, limit)

    def oldest_enrollment(self) -> float | None:
        return self._live_store.oldest_enrollment()

    def face_crop(self, face_id: int) -> bytes | None:
        return self._live_store.face_crop(face_id)

    def iter_crops(self, after_face_id: int = 0, limit: int = 256) -> list[tuple[int, str, bytes]]:
        return self._live_store.iter_crops(after_face_id, limit)

    def crop_count(self) -> int:
        return self._live_store.crop_count()
    def face_embeddings(self, face_ids: list[int]) -> dict[int, tuple[str, np.ndarray]]:
        return self._live_store.face_embeddings(face_ids)

    def iter_faces(self, batch: int = 4096) -> Iterator[tuple[list[int], list[str], np.ndarray]]:
        return self._live_store.faces_by_identity(batch)

    def identity_crops(self, identity_ids: list[str]) -> dict[str, list[tuple[int, bytes | None, float]]]:
        return self._live_store.identity_crops(identity_ids)

    def search_among(self, probes: np.ndarray, identity_ids: list[str], top_k: int) -> Among:
        """Exact, from the store (its own snapshot: no index lock needed)."""
        faces = self._live_store.identity_faces(identity_ids)
        return Among(score_among(probes, faces, top_k), {name: len(ids) for name, (ids, _) in faces.items()})

    @property
    def face_count(self) -> int:
        """Live enrolled faces (in memory; /identify sizes its threshold by it)."""
        return self._index.live

    def stats(self) -> dict[str, int]:
        """Counts (all ints: /readyz shows them as they are); answers while the index is loading (its figures are then 0)."""
        identities, faces = self._live_store.counts()
        ready = self._ready.is_set()
        return {"identities": identities, "faces": faces, "index_live": self._index.live if ready else 0,
                "index_capacity": self._index.capacity if ready else 0,
                "index_tombstones": self._index.tombstones if ready else 0,
                "index_dirty": int(self._dirty), "index_loading": int(not ready),
                **{f"index_search_{kind}": count for kind, count in self._index.fallbacks.items()},
                "snapshot_writers_killed": self.snapshot_writers_killed,
                "generation": self._live_store.generation}
