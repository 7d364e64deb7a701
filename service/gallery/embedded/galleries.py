"""The embedded backend's collections, keys and audit trail (:class:`EmbeddedGalleries`).

Layout of the data dir::

    gallery.sqlite3, index.hnsw, index.json   the "default" collection: today's gallery, where it was
    collections/<name>/...                      every other collection: a gallery of its own
    catalog.sqlite3                             collections, keys, catalog audit (catalog.py)

Each collection is a :class:`Gallery` with all of its guarantees (its own store, index, snapshots,
data-dir lock, erasure). A collection other than ``default`` is opened on first use and closed
again (snapshot written, store closed, index memory freed) after ``idle_s`` without use; none has a
thread of its own: ONE maintenance thread drives every open collection's ``maintain()`` and closes
the idle ones. A collection in use (a request between ``_acquire`` and ``_release``) is never
closed or erased under it.

Deleting a collection: no new use may start, the uses in flight finish, its gallery is closed
without a snapshot; then one catalog transaction drops its row, copies its audit trail into the
catalog's and records collection.deleted; then its files are erased (rows deleted with
secure_delete, WAL truncated, every file overwritten with zeros and removed). A crash between the
two leaves a directory without a catalog row: the next start erases it the same way.

A damaged collection (a store file SQLite cannot read, found on opening it or on a read) is contained:
its uses raise ``CollectionDamaged`` (503 ``collection_damaged``), it is listed with ``damaged`` set,
the first discovery is logged naming the file (by a server; a command's error says it), nothing is
written to it, and every other collection serves on. It may still be deleted (its files erased, its
unreadable audit trail with them); restored files are used again on its next use (one whose index
load found the damage is closed and opened again once its store file is replaced). The
default collection too: the service is ready without it (``load_state``), its unkeyed requests are
refused, and the data dir's lock is held by this object from ``open()`` to ``close()``, shared with
the default collection's gallery, so a second server is refused whether or not that store opens. A
catalog that cannot be read raises ``CatalogDamaged`` (catalog.py): a refusal at start-up, 503
``catalog_damaged`` for the requests that meet the damage later.

Without ``open()``/``start()`` only the catalog is used (keys, audit, collection listing): what the
CLI does beside a running server, which holds the data dir's lock.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np

from ...jobs.store import JobRecord
from ...model.calibration import FACES_COUNTED_PER_IDENTITY
from ..api import (
    DEFAULT_COLLECTION,
    Actor,
    AliasInfo,
    AuditEntry,
    AuditQuery,
    CatalogDamaged,
    CollectionDamaged,
    CollectionInfo,
    CollectionInUse,
    CollectionNotFound,
    CollectionProtected,
    EnrollResult,
    GalleryBackend,
    GalleryStats,
    IdentityDetails,
    IdentityRecord,
    Match,
    ReadTarget,
    StoredKey,
    valid_collection_name,
)
from ..crops import CropCipher, CropsUnavailable
from ..results import Among, FacesDeleted, IdentityUpdate, MergeResult, MoveResult, UpdateResult
from ..search import check_served
from . import audit
from .backend import EmbeddedGallery
from .catalog import Catalog
from .gallery import Gallery, ReadWriteLock
from .lock import DataDirLock, usable_data_dir
from .snapshot import fsync_dir
from .store import (
    StoreDamaged,
    as_damaged,
    connect,
    count_counted_faces,
    count_rows,
    erase_rows,
    expired_face_ids,
    has_age_index,
    oldest_face_time,
)

log = logging.getLogger(__name__)

# what a damaged store raises, among other failures: noted_damage tells which
MAYBE_DAMAGE = (StoreDamaged, sqlite3.DatabaseError)

_T = TypeVar("_T")
# (directory, collection name, model id, dim) -> a Gallery of that collection's model, not opened
GalleryFactory = Callable[[Path, str, str, int], Gallery]


@dataclass
class _Entry:
    """An open (or opening, or closing) collection."""

    gallery: Gallery | None = None
    backend: EmbeddedGallery | None = None  # the gallery behind the backend interface (set with gallery)
    refs: int = 0  # uses in flight (requests, a maintenance round): never closed while > 0
    last_used: float = field(default_factory=time.monotonic)
    deleted: bool = False
    load_deadline: float = float("-inf")  # uses wait for its index until then (monotonic), then GalleryLoading
    lifecycle: threading.Lock = field(default_factory=threading.Lock)  # held to open or close it


def erase_directory(path: Path) -> None:
    """Erase a collection's files: rows deleted (secure_delete) and the WAL truncated, then every file
    overwritten with zeros, synced and removed, then the directories."""
    if not path.exists():
        return
    store = path / Gallery.STORE_FILE
    if store.exists():
        try:
            conn = connect(store)
            try:
                erase_rows(conn)
            finally:
                conn.close()
        except (sqlite3.Error, StoreDamaged) as exc:  # a damaged store: overwriting its bytes erases it all the same
            log.warning("could not delete the rows of an erased collection; overwriting its files",
                        extra={"reason": f"{type(exc).__name__}: {exc}"})
    files = sorted((p for p in path.rglob("*") if p.is_file() or p.is_symlink()), reverse=True)
    for file in files:
        if file.is_file() and not file.is_symlink():
            try:
                out = open(file, "r+b")  # noqa: SIM115 - closed below
            except FileNotFoundError:  # gone meanwhile (SQLite removes a WAL file at its last close)
                continue
            with out:
                size = os.fstat(out.fileno()).st_size
                zeros = bytes(1 << 20)
                for _ in range(0, size, len(zeros)):
                    out.write(zeros[:min(len(zeros), size - out.tell())])
                out.flush()
                os.fsync(out.fileno())
        file.unlink(missing_ok=True)
    for directory in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        directory.rmdir()
    if path.exists():
        path.rmdir()
    fsync_dir(path.parent)


class EmbeddedGalleries:
    """Collections, keys and audit of the embedded backend (module docstring)."""

    backend = "embedded"
    COLLECTIONS_DIR = "collections"
    LOAD_WAIT_S = 2.0  # a request waits this long for a collection's index to load, then 503 gallery_loading

    def __init__(self, data_dir: Path, model_id: str, dim: int, make: GalleryFactory, idle_s: float = 300.0,
                 snapshot_interval_s: float = 60.0, served: dict[str, int] | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.model_id = model_id  # the default model: new collections are pinned to it unless told otherwise
        self.dim = dim
        self.served = served or {model_id: dim}  # every served model (model id -> dim): open() checks the pins
        self._make = make
        self.idle_s = idle_s
        self.snapshot_interval_s = snapshot_interval_s  # 0: collections snapshot only when closed
        self._catalog_opened: Catalog | None = None
        self._catalog_mutex = threading.Lock()
        self._mutex = threading.Condition(threading.Lock())  # guards _entries, _known and every _Entry's refs/deleted
        self._entries: dict[str, _Entry] = {}
        self._known: dict[str, float] = {}  # collection -> created_at (its incarnation, for handles)
        self._pins: dict[str, tuple[str, int]] = {}  # collection -> (model id, dim) it is pinned to
        self._deleting: set[str] = set()  # being deleted: unknown to new handles and uses
        self._shape = threading.RLock()  # creates and deletes vs reads of every collection's files
        self._stop = threading.Event()
        self._maintainer: threading.Thread | None = None
        self._writers_killed_closed = 0  # stuck snapshot writers killed by galleries closed since (stats)
        self._opened = False
        self._crop_names: set[str] = set()  # the collections that keep crops (guarded by _mutex, like _known)
        self._settings: dict[str, dict[str, Any]] = {}  # collection -> its COLLECTION_SETTINGS (guarded by _mutex)
        self.crop_cipher: CropCipher | None = None  # seals kept crops; set by open.make_gallery
        self._fences: dict[str, ReadWriteLock] = {}  # collection -> its write fence (write_fence), guarded by _mutex
        self._damaged: set[str] = set()  # collections found damaged and logged so (guarded by _mutex)
        # the data dir's lock, held from open() to close() whether or not the default store opens (its
        # gallery shares it): one process per data dir
        self._dir_lock = DataDirLock(self.data_dir)
        self._serving = False  # start()ed: a server, which logs the damage it contains (a command raises it)

    # --- lifecycle -----------------------------------------------------------------------------
    @property
    def _catalog(self) -> Catalog:
        with self._catalog_mutex:
            if self._catalog_opened is None:
                catalog = Catalog(self.data_dir)
                try:
                    catalog.ensure_collection(DEFAULT_COLLECTION, self.model_id, self.dim)
                except CatalogDamaged:  # its pages damaged: the service will not start on it
                    with suppress(sqlite3.Error):
                        catalog.close()
                    raise
                self._catalog_opened = catalog
            return self._catalog_opened

    def open(self) -> None:
        self._open(background=False)

    def start(self) -> None:
        self._open(background=True)

    def _open(self, background: bool) -> None:
        self._serving = background
        usable_data_dir(self.data_dir)
        self._dir_lock.acquire()  # a second server stops here
        try:
            default = self._opened_default(background)
        except BaseException:
            self._dir_lock.release()
            raise
        with self._mutex:
            self._entries[DEFAULT_COLLECTION] = _Entry(
                gallery=default, backend=EmbeddedGallery(default) if default is not None else None)
            self._refresh_known()
        self._stop.clear()
        self._maintainer = threading.Thread(target=self._maintain, name="collections-maintenance", daemon=True)
        self._maintainer.start()
        self._opened = True

    def _opened_default(self, background: bool) -> Gallery | None:
        """The default collection's gallery, loading (``background``) or loaded, once the catalog's pins
        are checked and left-over directories erased; None when its store is damaged (contained as any
        collection's: its uses are refused, collection_damaged, and it is opened again on its next use)."""
        gallery = self._gallery(DEFAULT_COLLECTION)
        default: Gallery | None = gallery
        try:
            gallery.open_store()
        except StoreDamaged as exc:
            self.noted_damage(DEFAULT_COLLECTION, exc)
            default = None
        try:
            pins = self._catalog.pins()
            check_served([(name, *self._pin_of(name, pins)) for name in sorted(pins)], self.served, str(self.data_dir))
            self._sweep()
            if default is not None and background:
                default.start_loading()  # a damaged page it reads: default.load_damage
            elif default is not None:
                try:
                    default.load()
                except MAYBE_DAMAGE as exc:
                    if not self.noted_damage(DEFAULT_COLLECTION, exc):
                        raise
                    default.close()
                    default = None
        except BaseException:
            if default is not None:
                default.close()
            raise
        return default

    def _gallery(self, name: str) -> Gallery:
        """A gallery of the collection, not opened; the default one's shares the data dir's lock."""
        gallery = self._make(self._directory(name), name, *self.pin(name))
        if name == DEFAULT_COLLECTION:
            gallery.dir_lock = self._dir_lock
        return gallery

    def _sweep(self) -> None:
        """Erase the collection directories the catalog does not know (a crash during a delete)."""
        root = self.data_dir / self.COLLECTIONS_DIR
        if not root.is_dir():
            return
        known = self._catalog.collections()
        for path in root.iterdir():
            if path.is_dir() and not path.is_symlink() and path.name not in known:
                log.warning("erasing a collection left behind by an interrupted delete", extra={"collection": path.name})
                erase_directory(path)

    def close(self) -> None:
        self._stop.set()
        if self._maintainer is not None:
            self._maintainer.join()
            self._maintainer = None
        with self._mutex:
            entries, self._entries = self._entries, {}
            self._known = {}
        for entry in entries.values():
            with entry.lifecycle:
                with self._mutex:
                    gallery, entry.gallery, entry.backend = entry.gallery, None, None
                if gallery is not None:
                    gallery.close()
                    self._closed(gallery)
        with self._catalog_mutex:
            if self._catalog_opened is not None:
                self._catalog_opened.close()
                self._catalog_opened = None
        if self._opened:
            self._dir_lock.release()
        self._opened = False

    @property
    def load_state(self) -> str:
        """The default collection's, as readiness follows it; "ready" when it is damaged (the others
        serve; its uses are refused, collection_damaged, and /readyz lists it damaged)."""
        entry = self._entries.get(DEFAULT_COLLECTION)
        if entry is None:
            return "loading"  # not opened yet
        default = entry.gallery
        return "ready" if default is None or default.load_damage is not None else default.load_state

    @property
    def load_error(self) -> str | None:
        entry = self._entries.get(DEFAULT_COLLECTION)
        default = entry.gallery if entry is not None else None
        return default.load_error if default is not None and default.load_damage is None else None

    # --- using a collection ----------------------------------------------------------------------
    def _refresh_known(self) -> None:
        """Re-read the collections from the catalog (caller holds _mutex)."""
        self._known = {name: created for name, (_, created) in self._catalog.collections().items()
                       if name not in self._deleting}
        self._crop_names = self._catalog.crop_collections()
        self._settings = self._catalog.settings()
        pins = self._catalog.pins()
        self._pins = {name: self._pin_of(name, pins) for name in self._known}

    def _incarnation(self, name: str) -> float:
        with self._mutex:
            if name not in self._known:
                self._refresh_known()
            if name not in self._known:
                raise CollectionNotFound(name)
            return self._known[name]

    def _directory(self, name: str) -> Path:
        return self.data_dir if name == DEFAULT_COLLECTION else self.data_dir / self.COLLECTIONS_DIR / name

    def _acquire(self, name: str, incarnation: float) -> tuple[_Entry, EmbeddedGallery]:
        """The collection's gallery for one use, opened if need be (a collection just opened: waits
        up to LOAD_WAIT_S for its index, then the gallery's own GalleryLoading); it is neither closed
        nor erased until ``_release(entry)``. The common case (open, loaded) takes the mutex once."""
        with self._mutex:
            if self._known.get(name) != incarnation:
                raise CollectionNotFound(name)  # deleted since the handle was made (or never existed)
            entry = self._entries.get(name)
            if entry is None:
                entry = self._entries[name] = _Entry()
            entry.refs += 1
            # not None: not closed under this use (the closer and delete detach it only at refs == 0)
            backend = entry.backend
        try:
            if backend is not None and backend.gallery.load_damage is not None and backend.gallery.store_replaced():
                backend = self._reopen_restored(entry, backend.gallery)
            if backend is None:
                with entry.lifecycle:  # a close or a delete in progress finishes first
                    if entry.deleted:
                        raise CollectionNotFound(name)
                    if entry.gallery is None:
                        gallery = self._gallery(name)
                        gallery.open_store()
                        self.readable(name)  # its files restored, if it was found damaged
                        gallery.start_loading()
                        entry.load_deadline = time.monotonic() + self.LOAD_WAIT_S
                        with self._mutex:
                            entry.gallery, entry.backend = gallery, EmbeddedGallery(gallery)
                    backend = cast(EmbeddedGallery, entry.backend)
            # a collection just opened on use: a small one is ready within milliseconds, a big one gets
            # GalleryLoading (503 gallery_loading) after LOAD_WAIT_S. The default collection, loaded at
            # start-up behind /readyz, never waits: as before collections, 503 at once while it loads.
            gallery = backend.gallery
            while not gallery.ready and gallery.load_error is None and time.monotonic() < entry.load_deadline:
                time.sleep(0.005)
            if (damage := gallery.load_damage) is not None:  # every use refused, reads of its store too
                raise damage
        except BaseException:
            self._release(entry)
            raise
        return entry, backend

    def _reopen_restored(self, entry: _Entry, gallery: Gallery) -> EmbeddedGallery | None:
        """A gallery whose index load found its store damaged, and whose store file was replaced since
        (restored from a backup): closed, so that this use opens the restored files (None), unless
        another use holds it (it stays, that use's answer is collection_damaged, the next one reopens)."""
        with entry.lifecycle:
            with self._mutex:
                if entry.gallery is not gallery or entry.refs != 1:
                    return entry.backend
                entry.gallery, entry.backend = None, None
            gallery.close(snapshot=False)
            self._closed(gallery)
        log.info("collection files replaced: opened again", extra={"collection": gallery.name})
        return None

    def _release(self, entry: _Entry) -> None:
        with self._mutex:
            entry.refs -= 1
            entry.last_used = time.monotonic()
            if entry.deleted:
                self._mutex.notify_all()  # delete_collection waits for the uses in flight

    def collection(self, name: str) -> GalleryBackend:
        handle = _CollectionHandle(self, name, self._incarnation(name))
        with self._mutex:
            handle.keep_crops = name in self._crop_names
        return handle

    def setting(self, name: str, key: str) -> Any:
        """One of the collection's COLLECTION_SETTINGS as the catalog has it now (None: the default)."""
        with self._mutex:
            return self._settings.get(name, {}).get(key)

    def open_collections(self) -> list[str]:
        """The collections whose gallery is open now (the default one always, once opened)."""
        with self._mutex:
            return sorted(name for name, entry in self._entries.items() if entry.gallery is not None)

    # --- maintenance ---------------------------------------------------------------------------
    def _maintain(self) -> None:
        tick = min(1.0, self.idle_s / 4, self.snapshot_interval_s or 1.0)
        while not self._stop.wait(max(tick, 0.05)):
            try:
                self.maintain()
            except Exception:  # noqa: BLE001 - keep maintaining; each store stays the truth
                log.exception("collections maintenance failed")

    def maintain(self) -> None:
        """One round: each open, loaded collection's own maintenance (repair, compaction, snapshot when
        due), then the idle ones closed."""
        if self.snapshot_interval_s > 0:
            with self._mutex:
                busy = [(name, e) for name, e in self._entries.items() if e.gallery is not None and e.gallery.ready]
                for _, entry in busy:
                    entry.refs += 1  # not closed under the round; not "used" either (last_used kept)
            try:
                for name, entry in busy:
                    if entry.gallery is not None:
                        try:
                            entry.gallery.maintain(wait=False)  # never waits for a snapshot writer
                        except Exception:  # noqa: BLE001
                            log.exception("collection maintenance failed", extra={"collection": name})
            finally:
                with self._mutex:
                    for _, entry in busy:
                        entry.refs -= 1
                    self._mutex.notify_all()
        self._close_idle()

    def _close_idle(self) -> None:
        now = time.monotonic()
        with self._mutex:
            idle = [(name, e) for name, e in self._entries.items()
                    if name != DEFAULT_COLLECTION and e.refs == 0 and now - e.last_used >= self.idle_s]
        for name, entry in idle:
            if not entry.lifecycle.acquire(blocking=False):
                continue  # being opened or deleted
            try:
                with self._mutex:  # checked again under both locks: a use that began meanwhile keeps it
                    if entry.refs or time.monotonic() - entry.last_used < self.idle_s or entry.deleted:
                        continue
                    gallery, entry.gallery, entry.backend = entry.gallery, None, None
                # the entry stays listed while its gallery closes: a use arriving now waits for the
                # lifecycle lock, then opens it again (a second entry would find the directory locked)
                if gallery is not None:
                    gallery.close()
                    self._closed(gallery)
                    log.info("idle collection closed", extra={"collection": name})
                with self._mutex:
                    if entry.refs == 0 and entry.gallery is None and self._entries.get(name) is entry:
                        del self._entries[name]
            finally:
                entry.lifecycle.release()

    # --- collections ---------------------------------------------------------------------------
    def create_collection(self, name: str, actor: Actor | None = None, keep_crops: bool = False,
                          model_id: str | None = None, dim: int | None = None,
                          retention_days: float | None = None, max_faces: int | None = None,
                          identify_fpir: float | None = None) -> CollectionInfo:
        model_id, dim = model_id or self.model_id, dim or self.dim
        settings: dict[str, Any] = {"retention_days": retention_days, "max_faces": max_faces, "identify_fpir": identify_fpir}
        if not valid_collection_name(name):
            raise ValueError(f"invalid collection name {name!r}: lower-case letters, digits, '-' and '_', "
                             "starting with a letter or digit, at most 63 characters")
        check_value = None
        if keep_crops:
            if self.crop_cipher is None:
                raise CropsUnavailable("a keep_crops collection needs the crop key (FACE_CROP_KEY_FILE)")
            if self._catalog.crop_key_check() is None:
                check_value = self.crop_cipher.check_value()
        with self._shape:
            directory = self._directory(name)
            created_at = self._catalog.add_collection(name, model_id, actor, keep_crops,
                                                      check_value, dim, settings)  # CollectionExists
            if directory.exists():  # left by a delete whose erasure failed: never part of the new one
                erase_directory(directory)
            with self._mutex:
                self._known[name] = created_at
                if keep_crops:
                    self._crop_names.add(name)
                else:
                    self._crop_names.discard(name)
                self._pins[name] = (model_id, dim)
                self._settings[name] = settings
        return CollectionInfo(name, model_id, created_at, 0, 0, 0, keep_crops=keep_crops, dim=dim, **settings)

    def delete_collection(self, name: str, actor: Actor | None = None) -> CollectionInfo:
        if name == DEFAULT_COLLECTION:
            raise CollectionProtected(f"the {DEFAULT_COLLECTION!r} collection cannot be deleted")
        with self._shape:
            info = self.collection_info(name)  # CollectionNotFound
            pointing, keys = self._catalog.aliases_to(name), self._catalog.keys_naming(name)  # and again in
            if pointing or keys:  # the catalog's transaction
                raise CollectionInUse(name, pointing, keys)
            with self._mutex:
                self._deleting.add(name)
                self._known.pop(name, None)  # no new handle or use from here on
                entry = self._entries.get(name)
                if entry is not None:
                    entry.deleted = True
                    while entry.refs:  # uses in flight finish first
                        self._mutex.wait()
            try:
                if entry is not None:
                    with entry.lifecycle:
                        with self._mutex:
                            gallery, entry.gallery, entry.backend = entry.gallery, None, None
                        if gallery is not None:
                            gallery.close(snapshot=False)
                            self._closed(gallery)
                directory = self._directory(name)
                store = directory / Gallery.STORE_FILE
                trail: list[audit.Row] = []
                identities = faces = 0
                details: dict[str, Any] = {}
                if store.exists():
                    try:
                        with self._peek(store) as conn:
                            trail = audit.all_rows(conn)
                            identities, faces = count_rows(conn)
                    except MAYBE_DAMAGE as exc:  # its trail is lost with its faces
                        if not self.noted_damage(name, exc):
                            raise
                        details["damaged"] = True
                details = {"identities": identities, "faces": faces, **details}
                if not self._catalog.drop_collection(name, trail, actor, details):
                    raise CollectionNotFound(name)
            except BaseException:
                with self._mutex:
                    self._entries.pop(name, None)
                    self._deleting.discard(name)
                    self._refresh_known()  # still in the catalog unless the drop committed
                raise
            try:
                erase_directory(directory)  # a crash before this ends: the next start erases it (_sweep)
            finally:
                with self._mutex:
                    if self._entries.get(name) is entry:
                        self._entries.pop(name, None)
                    self._deleting.discard(name)
                    self._damaged.discard(name)
        log.info("collection deleted", extra={"collection": name, **details})
        return CollectionInfo(name, info.model_id, info.created_at, identities, faces, info.counted_faces,
                              keep_crops=info.keep_crops, dim=info.dim)

    @contextmanager
    def _peek(self, store: Path) -> Iterator[sqlite3.Connection]:
        """A connection of its own to a collection's store, open or not (WAL: beside its writer)."""
        conn = connect(store)
        try:
            yield conn
        finally:
            conn.close()

    def _info(self, name: str, model_id: str, created_at: float) -> CollectionInfo:
        dim = self.pin(name)[1]
        with self._mutex:
            entry = self._entries.get(name)
            gallery = entry.gallery if entry is not None else None
            if gallery is not None and gallery.ready:
                return CollectionInfo(name, model_id, created_at, gallery.identity_count, gallery.face_count,
                                      gallery.counted_faces, dim=dim)
        if gallery is not None and (damage := gallery.load_damage) is not None:  # open, its load stopped by it
            self.noted_damage(name, damage)
            return CollectionInfo(name, model_id, created_at, 0, 0, 0, dim=dim, damaged=True)
        store = self._directory(name) / Gallery.STORE_FILE
        if not store.exists():
            return CollectionInfo(name, model_id, created_at, 0, 0, 0, dim=dim)
        try:
            with self._peek(store) as conn:
                try:
                    identities, faces = count_rows(conn)
                    counted = count_counted_faces(conn, FACES_COUNTED_PER_IDENTITY)
                except sqlite3.OperationalError:  # a store not written yet (no tables)
                    identities = faces = counted = 0
        except MAYBE_DAMAGE as exc:
            if not self.noted_damage(name, exc):
                raise
            return CollectionInfo(name, model_id, created_at, 0, 0, 0, dim=dim, damaged=True)
        self.readable(name)
        return CollectionInfo(name, model_id, created_at, identities, faces, counted, dim=dim)

    def noted_damage(self, name: str, exc: BaseException) -> bool:
        """Whether ``exc`` says the collection's store is damaged; the first time it does, logged with the
        file and what to do (each use of the collection is refused 503 collection_damaged meanwhile)."""
        if (damage := as_damaged(self._directory(name) / Gallery.STORE_FILE, exc)) is None:
            return False
        with self._mutex:
            first = name not in self._damaged
            self._damaged.add(name)
        if first and self._serving:  # a command says it in its error line instead
            log.error("collection damaged: not served until its files are restored from a backup (or it is "
                      "deleted); the other collections serve on", extra={"collection": name, "reason": str(damage)})
        return True

    def readable(self, name: str) -> None:
        """The collection's store was counted whole again (its files restored): logged if it was damaged,
        and a later damage is logged again."""
        if name in self._damaged:
            with self._mutex:
                if name not in self._damaged:
                    return
                self._damaged.discard(name)
            log.warning("collection readable again", extra={"collection": name})

    def pin(self, name: str) -> tuple[str, int]:
        """(model id, dim) the collection is pinned to, as known since its handle was made."""
        with self._mutex:
            pinned = self._pins.get(name)
        return pinned if pinned is not None else self._pin_of(name)

    def _pin_of(self, name: str, pins: dict[str, tuple[str, int | None]] | None = None) -> tuple[str, int]:
        """(model id, dim) of a collection from the catalog (``pins``: read already); a dim the catalog
        lacks (recorded before it stored one) is the collection store's, else the default model's."""
        model_id, dim = (self._catalog.pins() if pins is None else pins).get(name, (self.model_id, self.dim))
        if dim is None:
            dim = self.dim if model_id == self.model_id else self._stored_dim(name)
        return model_id, int(dim)

    def _stored_dim(self, name: str) -> int:
        store = self._directory(name) / Gallery.STORE_FILE
        if store.exists():
            # a damaged store: the default model's dim (its uses are refused anyway, collection_damaged)
            with suppress(*MAYBE_DAMAGE), self._peek(store) as conn:
                row = conn.execute("SELECT value FROM meta WHERE key = 'embedding_size'").fetchone()
                if row is not None:
                    return int(row[0])
        return self.dim

    def _peek_read(self, name: str, read: Callable[[sqlite3.Connection], _T], empty: _T) -> _T:
        """``read`` of the collection's store beside whoever has it open (WAL), without opening the
        collection; ``empty`` when it has no store, or one not written yet (no tables)."""
        store = self._directory(name) / Gallery.STORE_FILE
        if not store.exists():
            return empty
        with self._peek(store) as conn:
            try:
                return read(conn)
            except sqlite3.OperationalError:
                return empty

    def peek_expired(self, name: str, enrolled_before: float, limit: int) -> list[int] | None:
        """The collection's expired faces read from its store, or None when the store has no faces_by_age
        yet (a scan of every face: open the collection instead)."""
        def read(conn: sqlite3.Connection) -> list[int] | None:
            return expired_face_ids(conn, enrolled_before, limit) if has_age_index(conn) else None

        none: list[int] | None = []
        return self._peek_read(name, read, none)

    def peek_oldest(self, name: str) -> float | None:
        """When the collection's oldest face was enrolled, read from its store; None: no face."""
        return self._peek_read(name, oldest_face_time, None)

    def list_collections(self) -> list[CollectionInfo]:
        with self._shape:
            rows = self._catalog.collections()
            keeping = self._catalog.crop_collections()
            settings = self._catalog.settings()
            order = sorted(rows, key=lambda n: (n != DEFAULT_COLLECTION, n))
            return [replace(self._info(name, *rows[name]), keep_crops=name in keeping, **settings.get(name, {}))
                    for name in order]

    def collection_info(self, name: str) -> CollectionInfo:
        with self._shape:
            row = self._catalog.collections().get(name)
            if row is None:
                raise CollectionNotFound(name)
            return replace(self._info(name, *row), keep_crops=name in self._catalog.crop_collections(),
                           **self._catalog.settings().get(name, {}))

    def update_collection(self, name: str, changes: dict[str, Any], actor: Actor | None = None) -> CollectionInfo:
        with self._shape:
            self._catalog.update_settings(name, changes, actor)  # CollectionNotFound
            with self._mutex:
                self._settings = self._catalog.settings()
        return self.collection_info(name)

    def retentions(self) -> dict[str, float]:
        return self._catalog.retentions()

    # --- keys ----------------------------------------------------------------------------------
    def add_key(self, key: StoredKey, actor: Actor | None = None) -> None:
        self._catalog.add_key(key, actor)

    def list_keys(self) -> list[StoredKey]:
        return self._catalog.list_keys()

    def get_key(self, key_id: str) -> StoredKey | None:
        return self._catalog.get_key(key_id)

    def revoke_key(self, key_id: str, actor: Actor | None = None) -> StoredKey | None:
        return self._catalog.revoke_key(key_id, actor)

    def touch_keys(self, used: dict[str, float]) -> None:
        self._catalog.touch_keys(used)

    def has_keys(self) -> bool:
        return self._catalog.has_keys()

    # --- audit ---------------------------------------------------------------------------------
    def _stores(self, collection: str | None) -> Iterator[tuple[str, Path]]:
        names = [DEFAULT_COLLECTION, *self._catalog.collections()]
        for name in dict.fromkeys(names):
            store = self._directory(name) / Gallery.STORE_FILE
            if (collection is None or collection == name) and store.exists():
                yield name, store

    def audit(self, query: AuditQuery) -> list[AuditEntry]:
        if query.cursor is not None:
            audit.parse_cursor(query.cursor)  # InvalidAuditCursor for a cursor this backend did not make
        with self._shape:
            pages = [self._catalog.audit(query)]
            for name, store in self._stores(query.collection):
                try:
                    with self._peek(store) as conn:
                        try:
                            pages.append(audit.query(conn, name, query))
                        except sqlite3.OperationalError:  # a store from before the audit table, not opened since
                            continue
                except MAYBE_DAMAGE as exc:  # not a page left out unsaid: 503
                    if self.noted_damage(name, exc):
                        raise CollectionDamaged(name, str(exc)) from exc
                    raise
        return audit.merge(pages, query.limit)

    def prune_audit(self, before: float) -> int:
        with self._shape:
            pruned = self._catalog.prune_audit(before)
            for name, store in self._stores(None):
                try:
                    with self._peek(store) as conn:
                        with suppress(sqlite3.OperationalError):
                            pruned += audit.prune(conn, before)
                except MAYBE_DAMAGE as exc:  # the others are pruned all the same
                    if not self.noted_damage(name, exc):
                        raise
        return pruned

    # --- the whole -----------------------------------------------------------------------------
    def stats(self) -> GalleryStats:
        """The default collection's figures (what /readyz showed before collections), and how many
        collections there are and are open."""
        try:
            stats = self.collection(DEFAULT_COLLECTION).stats()
        except CollectionDamaged:  # its counts are not known: 0 (/readyz lists it damaged)
            stats = GalleryStats(self.backend, 0, 0, 0)
        with self._mutex:
            damaged = len(self._damaged)
        extra = {**stats.extra, "collections": len(self._catalog.collections()),
                 "collections_open": len(self.open_collections()), "collections_damaged": damaged,
                 "snapshot_writers_killed": self._snapshot_writers_killed()}
        return GalleryStats(self.backend, stats.identities, stats.faces, stats.index_live, extra)

    def read_targets(self) -> list[ReadTarget]:
        return []

    # --- aliases (in the catalog: the CLI sets them beside a running server) -------------------
    def set_alias(self, name: str, collection: str, actor: Actor | None = None) -> AliasInfo:
        if not valid_collection_name(name):
            raise ValueError(f"invalid alias name {name!r}: lower-case letters, digits, '-' and '_', "
                             "starting with a letter or digit, at most 63 characters")
        return self._catalog.set_alias(name, collection, actor)

    def delete_alias(self, name: str, actor: Actor | None = None) -> AliasInfo:
        return self._catalog.delete_alias(name, actor)

    def list_aliases(self) -> list[AliasInfo]:
        return self._catalog.aliases()

    def resolve(self, name: str) -> str:
        for alias in self._catalog.aliases():
            if alias.name == name:
                return alias.collection
        if name not in self._catalog.collections():
            raise CollectionNotFound(name)
        return name

    def _closed(self, gallery: Gallery) -> None:
        """Keep what a closed gallery counted (its stuck snapshot writers) for stats()."""
        with self._mutex:
            self._writers_killed_closed += gallery.snapshot_writers_killed

    def _snapshot_writers_killed(self) -> int:
        """Stuck snapshot writers killed since start, by every collection, open or closed since."""
        with self._mutex:
            return self._writers_killed_closed + sum(
                e.gallery.snapshot_writers_killed for e in self._entries.values() if e.gallery is not None)
    # --- kept crops ----------------------------------------------------------------------------
    def crop_key_check(self) -> bytes | None:
        return self._catalog.crop_key_check()
    # --- jobs (in the catalog: the CLI's in-process migration and the server share them) -------
    def create_job(self, job: JobRecord) -> None:
        self._catalog.create_job(job)

    def get_job(self, job_id: str) -> JobRecord | None:
        return self._catalog.get_job(job_id)

    def list_jobs(self, collection: str | None = None, state: str | None = None, limit: int = 100,
                  kind: str | None = None) -> list[JobRecord]:
        return self._catalog.list_jobs(collection, state, limit, kind)

    def update_job(self, job_id: str, changes: dict, expect_state: tuple[str, ...] | None = None,
                   expect_heartbeat: float | None | bool = False, audit_as: tuple[str, Actor] | None = None,
                   expect_owner: str | None | bool = False) -> bool:
        return self._catalog.update_job(job_id, changes, expect_state, expect_heartbeat, audit_as, expect_owner)

    def delete_job(self, job_id: str) -> None:
        self._catalog.delete_job(job_id)

    def fence(self, name: str) -> ReadWriteLock:
        """The collection's write fence (``GalleryBackend.write_fence``): writes hold its read side,
        the migration's final pass its write side. By name, kept while the process runs, so a
        collection closed when idle and opened again keeps its fence."""
        with self._mutex:
            return self._fences.setdefault(name, ReadWriteLock())


class _CollectionHandle:
    """One collection of :class:`EmbeddedGalleries` behind the backend interface: cheap, made per
    request; each call uses the collection's gallery (opened if idle) through EmbeddedGallery."""

    backend = "embedded"

    def __init__(self, owner: EmbeddedGalleries, name: str, incarnation: float) -> None:
        self._owner = owner
        self.name = name
        self.model_id, self.dim = owner.pin(name)  # the model the collection is pinned to
        self._incarnation = incarnation
        self.keep_crops = False  # set by EmbeddedGalleries.collection from the catalog

    def _run(self, call: Callable[[EmbeddedGallery], _T]) -> _T:
        owner = self._owner
        try:
            entry, gallery = owner._acquire(self.name, self._incarnation)  # noqa: SLF001 - its own handle
            try:
                return call(gallery)
            finally:
                owner._release(entry)  # noqa: SLF001
        except MAYBE_DAMAGE as exc:  # found on opening it, or on a read
            if owner.noted_damage(self.name, exc):
                raise CollectionDamaged(self.name, str(exc)) from exc
            raise

    def _write(self, call: Callable[[EmbeddedGallery], _T]) -> _T:
        """A write: ``_run`` holding the shared side of the collection's write fence."""
        with self._owner.fence(self.name).read():
            return self._run(call)

    @property
    def identify_fpir(self) -> float | None:
        """The collection's setting now (the default collection's handle lives as long as the service)."""
        return cast(float | None, self._owner.setting(self.name, "identify_fpir"))

    @property
    def identity_count(self) -> int:
        return self._run(lambda g: g.identity_count)

    @property
    def face_count(self) -> int:
        return self._run(lambda g: g.face_count)

    @property
    def counted_faces(self) -> int:
        return self._run(lambda g: g.counted_faces)

    @property
    def load_state(self) -> str:
        return self._run(lambda g: g.load_state)

    @property
    def load_error(self) -> str | None:
        return self._run(lambda g: g.load_error)

    def open(self) -> None:
        """Nothing to do: the collection opens on use; EmbeddedGalleries opens and closes it."""

    def start(self) -> None:
        """As open()."""

    def close(self) -> None:
        """Nothing to do: EmbeddedGalleries closes the collection when idle, or when it closes."""

    def enroll(self, identity_id: str, embeddings: np.ndarray, metadata: dict | None = None,
               replace: bool = False, max_faces: int | None = None, actor: Actor | None = None,
               crops: list[bytes] | None = None, enrolled_at: list[float] | None = None) -> EnrollResult:
        # the collection's face limit as it is when the write runs (Gallery.enroll checks it under its lock)
        return self._write(lambda g: g.enroll(identity_id, embeddings, metadata, replace, max_faces, actor, crops,
                                              enrolled_at, self._owner.setting(self.name, "max_faces")))

    def import_identities(self, items: list[tuple[str, np.ndarray, dict | None]],
                          actor: Actor | None = None,
                          enrolled_at: list[list[float] | None] | None = None,
                          created_at: list[float | None] | None = None) -> list[list[int]]:
        return self._write(lambda g: g.import_identities(items, actor, enrolled_at,
                                                         self._owner.setting(self.name, "max_faces"), created_at))

    def delete(self, identity_id: str, actor: Actor | None = None) -> int | None:
        return self._write(lambda g: g.delete(identity_id, actor))

    def search(self, probes: np.ndarray, top_k: int, ef: int | None = None) -> list[list[Match]]:
        return self._run(lambda g: g.search(probes, top_k, ef))

    def identity_embeddings(self, identity_id: str) -> np.ndarray | None:
        return self._run(lambda g: g.identity_embeddings(identity_id))

    def get_identity(self, identity_id: str) -> IdentityDetails | None:
        return self._run(lambda g: g.get_identity(identity_id))

    def list_identities(self, limit: int, after: str | None, prefix: str | None = None) -> list[IdentityRecord]:
        return self._run(lambda g: g.list_identities(limit, after, prefix))

    def stats(self) -> GalleryStats:
        return self._run(lambda g: g.stats())

    def read_targets(self) -> list[ReadTarget]:
        return []

    def merge_identities(self, source_id: str, target_id: str, max_faces: int | None = None,
                         actor: Actor | None = None) -> MergeResult:
        return self._write(lambda g: g.merge_identities(source_id, target_id, max_faces, actor))

    def update_identity(self, identity_id: str, update: IdentityUpdate, actor: Actor | None = None) -> UpdateResult:
        return self._write(lambda g: g.update_identity(identity_id, update, actor))

    def move_face(self, face_id: int, target_id: str, max_faces: int | None = None,
                  actor: Actor | None = None) -> MoveResult:
        return self._write(lambda g: g.move_face(face_id, target_id, max_faces, actor))

    def delete_faces(self, face_ids: list[int], actor: Actor | None = None) -> FacesDeleted:
        return self._write(lambda g: g.delete_faces(face_ids, actor))

    def expired_faces(self, enrolled_before: float, limit: int) -> list[int]:
        """Read from the store without opening the collection (a sweep every few seconds must not load an idle
        collection's index), unless the store predates faces_by_age: opened, it gets the index."""
        found = self._owner.peek_expired(self.name, enrolled_before, limit)
        return found if found is not None else self._run(lambda g: g.expired_faces(enrolled_before, limit))

    def oldest_enrollment(self) -> float | None:
        return self._owner.peek_oldest(self.name)  # an idle collection is not opened for it

    def face_crop(self, face_id: int) -> bytes | None:
        return self._run(lambda g: g.face_crop(face_id))

    def iter_crops(self, after_face_id: int = 0, limit: int = 256) -> list[tuple[int, str, bytes]]:
        return self._run(lambda g: g.iter_crops(after_face_id, limit))

    def crop_count(self) -> int:
        return self._run(lambda g: g.crop_count())
    def face_embeddings(self, face_ids: list[int]) -> dict[int, tuple[str, np.ndarray]]:
        return self._run(lambda g: g.face_embeddings(face_ids))

    def iter_faces(self, batch: int = 4096) -> Iterator[tuple[list[int], list[str], np.ndarray]]:
        """The collection stays open (acquired) for the whole iteration."""
        owner = self._owner
        entry, gallery = owner._acquire(self.name, self._incarnation)  # noqa: SLF001 - its own handle
        try:
            yield from gallery.iter_faces(batch)
        finally:
            owner._release(entry)  # noqa: SLF001

    @contextmanager
    def write_fence(self) -> Iterator[None]:
        with self._owner.fence(self.name).write():
            yield

    @contextmanager
    def read_floor(self) -> Iterator[None]:
        yield  # one process reads what is committed

    def identity_crops(self, identity_ids: list[str]) -> dict[str, list[tuple[int, bytes | None, float]]]:
        return self._run(lambda g: g.identity_crops(identity_ids))

    def search_among(self, probes: np.ndarray, identity_ids: list[str], top_k: int) -> Among:
        return self._run(lambda g: g.search_among(probes, identity_ids, top_k))
