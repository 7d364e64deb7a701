"""The durable store: the source of truth for identities, faces and embeddings (SQLite, WAL).

``synchronous=FULL`` makes every committed transaction survive a crash of the process (and of the
machine): an enrollment is acknowledged only after its commit returns. Every write transaction
bumps ``generation``, which tells whether an index snapshot on disk is still current.

Erasing: ``secure_delete`` makes SQLite overwrite deleted rows with zeros, and ``checkpoint`` (run
after every delete) moves the WAL into the database and truncates it, so an erased embedding is
left neither in the database file nor in the WAL.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np

from ..api import Actor, IdentityExists, face_times, identity_created_at
from ..crops import CropsUnavailable, Sealer
from ..identity_ids import id_range
from ..results import (
    FaceNotFound,
    FaceRecord,
    IdentityDetails,
    IdentityNotFound,
    IdentityRecord,
    IdentityUpdate,
    TooManyFacesForCollection,
    TooManyFacesForIdentity,
    UpdateResult,
    plan_update,
)
from . import audit
from .sqlite import checkpoint, is_damaged, write_transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS identities (
    identity_id TEXT PRIMARY KEY,
    metadata    TEXT NOT NULL DEFAULT '{}',
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS faces (
    face_id     INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: it is the index label
    identity_id TEXT NOT NULL REFERENCES identities(identity_id) ON DELETE CASCADE,
    embedding   BLOB NOT NULL,
    created_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS faces_by_identity ON faces(identity_id);
-- the oldest faces first: a collection's retention sweep (gallery/retention.py)
CREATE INDEX IF NOT EXISTS faces_by_age ON faces(created_at);
-- kept crops (keep_crops collections): sealed blobs (crops.py), gone with their face (the cascade runs
-- in the face's own DELETE; secure_delete zeroes them)
CREATE TABLE IF NOT EXISTS crops (
    face_id INTEGER PRIMARY KEY REFERENCES faces(face_id) ON DELETE CASCADE,
    blob    BLOB NOT NULL
);
"""


AGE_INDEX = "faces_by_age"


def expired_face_ids(conn: sqlite3.Connection, enrolled_before: float, limit: int) -> list[int]:
    """Up to ``limit`` faces enrolled before ``enrolled_before``, oldest first (by faces_by_age)."""
    return [int(r[0]) for r in conn.execute(
        "SELECT face_id FROM faces WHERE created_at < ? ORDER BY created_at, face_id LIMIT ?",
        (float(enrolled_before), int(limit)))]


def oldest_face_time(conn: sqlite3.Connection) -> float | None:
    """When the store's oldest face was enrolled (by faces_by_age); None: no face."""
    row = conn.execute("SELECT min(created_at) FROM faces").fetchone()
    return None if row is None or row[0] is None else float(row[0])


def has_age_index(conn: sqlite3.Connection) -> bool:
    """Whether the store has faces_by_age (made when this version first opens it)."""
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = ?", (AGE_INDEX,)).fetchone() \
        is not None


class _NothingToDelete(Exception):
    pass


class _Unchanged(Exception):
    pass


@dataclass(frozen=True)
class Room:
    """The collection's faces and its max_faces, for a write to check inside its transaction (the
    caller's count is exact: it holds the collection's write lock)."""

    collection: str
    faces: int
    limit: int


@dataclass(frozen=True)
class AddedFaces:
    """What :meth:`Store.add_faces` committed."""

    face_ids: list[int]  # the new faces, in the order given
    removed: list[int]  # face ids dropped by replace=True (the index must erase them)
    created: bool  # the identity did not exist before
    face_count: int  # the identity's faces after this transaction


class Store:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = self._connect()
        self._writer.executescript(SCHEMA + audit.SCHEMA)
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []  # every thread's reader, closed with the store
        self._readers_lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        return connect(self.path)

    def _reader(self) -> sqlite3.Connection:
        # one connection per thread: WAL lets readers run beside the writer
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def close(self) -> None:
        """Checkpoint, then close every connection: the writer and each thread's reader (left to the
        threads' locals, a reader closed whenever its thread's local went, and SQLite removed the WAL
        file then: under a collection delete listing the files, once)."""
        self.checkpoint()
        with self._readers_lock:
            readers, self._readers = self._readers, []
        for reader in readers:
            reader.close()
        self._writer.close()

    def checkpoint(self) -> bool:
        """Copy the WAL into the database and truncate it to zero bytes; False if readers kept it busy
        or the disk is full (the WAL is kept whole, and copied by a later checkpoint or the next open)."""
        return checkpoint(self._writer)

    # --- meta (get_meta/set_meta on the writer's connection: at open, before any other thread) --
    def get_meta(self, key: str) -> str | None:
        row = self._writer.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self._writer.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    @property
    def generation(self) -> int:
        """Read through this thread's reader connection, never the writer's: /readyz asks without the
        gallery lock, and a statement left open on the writer's connection fails its next COMMIT or
        WAL checkpoint ('database table is locked')."""
        row = self._reader().execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return int(row[0]) if row else 0

    def _bump(self, conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO meta(key, value) VALUES ('generation', '1') "
            "ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1"
        )

    # --- writes (the caller serialises them) -------------------------------------------------
    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction that bumps the generation; committed on exit, rolled back on error."""
        with write_transaction(self._writer) as conn:
            yield conn
            self._bump(conn)

    @staticmethod
    def _insert_identity(conn: sqlite3.Connection, identity_id: str, metadata: dict | None, now: float,
                         created_at: float | None = None) -> None:
        conn.execute(
            "INSERT INTO identities(identity_id, metadata, created_at, updated_at) VALUES (?, ?, ?, ?)",
            (identity_id, json.dumps(metadata or {}), now if created_at is None else created_at, now),
        )

    @staticmethod
    def _insert_faces(conn: sqlite3.Connection, identity_id: str, embeddings: np.ndarray, now: float,
                      enrolled_at: list[float] | None = None) -> list[int]:
        """``enrolled_at``: each face's enrollment time (None: ``now``), kept by a migration or an import."""
        times = face_times(now, enrolled_at, len(embeddings))
        # an INSERT's cursor always has a lastrowid (None is only for statements that insert nothing)
        return [
            cast(int, conn.execute(
                "INSERT INTO faces(identity_id, embedding, created_at) VALUES (?, ?, ?)",
                (identity_id, vector.tobytes(), at),
            ).lastrowid)
            for vector, at in zip(embeddings.astype(np.float32), times)
        ]

    def add_faces(
        self, identity_id: str, embeddings: np.ndarray, metadata: dict | None, replace: bool,
        max_faces: int | None = None, actor: Actor | None = None, collection: str | None = None,
        crops: list[bytes] | None = None, seal: Sealer | None = None, enrolled_at: list[float] | None = None,
        room: Room | None = None,
    ) -> AddedFaces:
        """Insert faces (creating the identity if new, dropping its faces first with ``replace``);
        refused (TooManyFacesForIdentity, nothing written) if the identity would hold more than
        ``max_faces``, counted inside the write's own transaction. With an ``actor`` the audit entry
        (identity.created / appended / replaced, naming ``collection``) is written in that transaction."""
        now = time.time()
        removed: list[int] = []
        with self._transaction() as conn:
            created = conn.execute("SELECT 1 FROM identities WHERE identity_id = ?", (identity_id,)).fetchone() is None
            if max_faces is not None:
                existing = 0 if created or replace else int(conn.execute(
                    "SELECT COUNT(*) FROM faces WHERE identity_id = ?", (identity_id,)).fetchone()[0])
                if existing + len(embeddings) > max_faces:
                    raise TooManyFacesForIdentity(identity_id, existing, len(embeddings), max_faces)
            if created:
                self._insert_identity(conn, identity_id, metadata, now)
            else:
                if metadata is not None:
                    conn.execute("UPDATE identities SET metadata = ? WHERE identity_id = ?", (json.dumps(metadata), identity_id))
                conn.execute("UPDATE identities SET updated_at = ? WHERE identity_id = ?", (now, identity_id))
                if replace:
                    removed = [r[0] for r in conn.execute("SELECT face_id FROM faces WHERE identity_id = ?", (identity_id,))]
                    conn.execute("DELETE FROM faces WHERE identity_id = ?", (identity_id,))
            # a write that adds no net face (a replace by as many or fewer) is never refused, even over the limit
            if room is not None and len(embeddings) > len(removed) and room.faces - len(removed) + len(embeddings) > room.limit:
                raise TooManyFacesForCollection(room.collection, room.faces - len(removed), len(embeddings), room.limit)
            face_ids = self._insert_faces(conn, identity_id, embeddings, now, enrolled_at)
            if crops is not None:
                self._insert_crops(conn, face_ids, crops, seal)
            face_count = conn.execute("SELECT COUNT(*) FROM faces WHERE identity_id = ?", (identity_id,)).fetchone()[0]
            if actor is not None:
                action = "identity.created" if created else "identity.replaced" if replace else "identity.appended"
                audit.record(conn, now, action, actor, collection, identity_id,
                             {"faces_added": len(face_ids), "faces_removed": len(removed), "face_count": int(face_count)})
        return AddedFaces(face_ids, removed, created, int(face_count))

    @staticmethod
    def _insert_crops(conn: sqlite3.Connection, face_ids: list[int], crops: list[bytes], seal: Sealer | None) -> None:
        """The faces' crops, sealed to their face ids (inside the faces' transaction)."""
        if seal is None:
            raise CropsUnavailable("crops given but no crop key configured (FACE_CROP_KEY_FILE)")
        if len(crops) != len(face_ids):
            raise ValueError(f"{len(crops)} crops for {len(face_ids)} faces")
        conn.executemany("INSERT INTO crops(face_id, blob) VALUES (?, ?)",
                         [(face_id, seal(face_id, crop)) for face_id, crop in zip(face_ids, crops)])

    def add_new_identities(self, items: list[tuple[str, np.ndarray, dict | None]], actor: Actor | None = None,
                           collection: str | None = None,
                           enrolled_at: list[list[float] | None] | None = None,
                           created_at: list[float | None] | None = None) -> list[list[int]]:
        """Bulk import of identities that must not exist yet, in one transaction (one fsync), with an
        identity.imported audit entry per identity in it when there is an ``actor``. ``created_at``: per
        identity, when it was created (None: now; a gallery file keeps it); updated_at is now."""
        now = time.time()
        with self._transaction() as conn:
            all_ids = []
            for n, (identity_id, embeddings, metadata) in enumerate(items):
                self._insert_identity(conn, identity_id, metadata, now, identity_created_at(now, created_at, n))
                all_ids.append(self._insert_faces(conn, identity_id, embeddings, now,
                                                  None if enrolled_at is None else enrolled_at[n]))
                if actor is not None:
                    audit.record(conn, now, "identity.imported", actor, collection, identity_id,
                                 {"faces": len(all_ids[-1])})
        return all_ids

    def delete_identity(self, identity_id: str, actor: Actor | None = None,
                        collection: str | None = None) -> list[int] | None:
        """Remove an identity and its faces; returns their face ids, or None if it did not exist. With
        an ``actor``, the identity.deleted audit entry is written in the same transaction."""
        try:
            with self._transaction() as conn:
                face_ids = [r[0] for r in conn.execute("SELECT face_id FROM faces WHERE identity_id = ?", (identity_id,))]
                conn.execute("DELETE FROM faces WHERE identity_id = ?", (identity_id,))
                if not conn.execute("DELETE FROM identities WHERE identity_id = ?", (identity_id,)).rowcount:
                    raise _NothingToDelete  # rolls the transaction back: generation untouched
                if actor is not None:
                    audit.record(conn, time.time(), "identity.deleted", actor, collection, identity_id,
                                 {"faces_deleted": len(face_ids)})
        except _NothingToDelete:
            return None
        return face_ids

    # --- faces changing identity, or erased one by one (gallery hygiene) ----------------------
    @staticmethod
    def _face_count(conn: sqlite3.Connection, identity_id: str) -> int:
        return int(conn.execute("SELECT COUNT(*) FROM faces WHERE identity_id = ?", (identity_id,)).fetchone()[0])

    def merge_identities(self, source_id: str, target_id: str, max_faces: int | None = None,
                         actor: Actor | None = None, collection: str | None = None) -> tuple[list[int], int]:
        """Give every face of the source to the target and delete the source, in one transaction with
        its identity.merged audit entry; returns the moved face ids and the target's faces before.
        IdentityNotFound, ValueError (same id), TooManyFacesForIdentity: nothing written."""
        if source_id == target_id:
            raise ValueError(f"cannot merge identity {source_id!r} into itself")
        now = time.time()
        with self._transaction() as conn:
            for identity_id in (source_id, target_id):
                if conn.execute("SELECT 1 FROM identities WHERE identity_id = ?", (identity_id,)).fetchone() is None:
                    raise IdentityNotFound(identity_id)
            moved = [r[0] for r in conn.execute(
                "SELECT face_id FROM faces WHERE identity_id = ? ORDER BY face_id", (source_id,))]
            before = self._face_count(conn, target_id)
            if max_faces is not None and before + len(moved) > max_faces:
                raise TooManyFacesForIdentity(target_id, before, len(moved), max_faces)
            conn.execute("UPDATE faces SET identity_id = ? WHERE identity_id = ?", (target_id, source_id))
            conn.execute("DELETE FROM identities WHERE identity_id = ?", (source_id,))
            conn.execute("UPDATE identities SET updated_at = ? WHERE identity_id = ?", (now, target_id))
            if actor is not None:
                audit.record(conn, now, "identity.merged", actor, collection, target_id,
                             {"merged_from": source_id, "faces_moved": len(moved), "face_count": before + len(moved)})
        return moved, before

    def update_identity(self, identity_id: str, update: IdentityUpdate, actor: Actor | None = None,
                        collection: str | None = None) -> UpdateResult:
        """Rename and/or set the metadata (GalleryBackend.update_identity), in one transaction with its
        identity.updated audit entry; nothing to change rolls back (no generation bump, no entry)."""
        now = time.time()
        try:
            with self._transaction() as conn:
                row = conn.execute("SELECT metadata, created_at, updated_at FROM identities WHERE identity_id = ?",
                                   (identity_id,)).fetchone()
                if row is None:
                    raise IdentityNotFound(identity_id)
                plan = plan_update(identity_id, update, row[0], row[2])
                if plan is None:
                    raise _Unchanged
                target = plan.target
                if plan.renamed_from is not None:
                    if conn.execute("SELECT 1 FROM identities WHERE identity_id = ?", (target,)).fetchone() is not None:
                        raise IdentityExists(f"identity {target!r} is already enrolled")
                    conn.execute("INSERT INTO identities(identity_id, metadata, created_at, updated_at) VALUES (?, ?, ?, ?)",
                                 (target, json.dumps(plan.metadata), row[1], now))
                    conn.execute("UPDATE faces SET identity_id = ? WHERE identity_id = ?", (target, identity_id))
                    conn.execute("DELETE FROM identities WHERE identity_id = ?", (identity_id,))
                else:
                    conn.execute("UPDATE identities SET metadata = ?, updated_at = ? WHERE identity_id = ?",
                                 (json.dumps(plan.metadata), now, identity_id))
                result = plan.result(cast(IdentityDetails, self._details(conn, target)))
                if actor is not None:
                    audit.record(conn, now, "identity.updated", actor, collection, target, result.audit_details())
        except _Unchanged:
            found = self.get_identity(identity_id)
            if found is None:  # cannot happen: the writer is serialised by the caller
                raise IdentityNotFound(identity_id) from None
            return UpdateResult(found, None, [], False)
        return result

    def move_face(self, face_id: int, target_id: str, max_faces: int | None = None, actor: Actor | None = None,
                  collection: str | None = None) -> tuple[str, int, int, bool]:
        """Give one face to the target (created, metadata {}, if missing) and delete its source identity
        if this was its last face, in one transaction with its face.moved audit entry. Returns the
        source identity, the source's and the target's faces before, and whether the target was created."""
        now = time.time()
        with self._transaction() as conn:
            row = conn.execute("SELECT identity_id FROM faces WHERE face_id = ?", (face_id,)).fetchone()
            if row is None:
                raise FaceNotFound(face_id)
            source_id = str(row[0])
            if source_id == target_id:
                raise ValueError(f"face {face_id} already belongs to identity {target_id!r}")
            created = conn.execute("SELECT 1 FROM identities WHERE identity_id = ?", (target_id,)).fetchone() is None
            source_before = self._face_count(conn, source_id)
            target_before = 0 if created else self._face_count(conn, target_id)
            if max_faces is not None and target_before + 1 > max_faces:
                raise TooManyFacesForIdentity(target_id, target_before, 1, max_faces)
            if created:
                self._insert_identity(conn, target_id, None, now)
            conn.execute("UPDATE faces SET identity_id = ? WHERE face_id = ?", (target_id, face_id))
            conn.execute("UPDATE identities SET updated_at = ? WHERE identity_id IN (?, ?)", (now, source_id, target_id))
            source_deleted = source_before == 1
            if source_deleted:
                conn.execute("DELETE FROM identities WHERE identity_id = ?", (source_id,))
            if actor is not None:
                audit.record(conn, now, "face.moved", actor, collection, target_id,
                             {"face_id": face_id, "from": source_id, "to": target_id, "target_created": created,
                              "source_deleted": source_deleted, "face_count": target_before + 1})
        return source_id, source_before, target_before, created

    def delete_faces(self, face_ids: list[int], actor: Actor | None = None,
                     collection: str | None = None) -> tuple[list[tuple[int, str, int]], list[int]]:
        """Remove faces (and each identity left with none), in one transaction with a face.deleted audit
        entry per face; returns (face id, identity, that identity's faces just before it), in ascending
        face id order, and the ids not found. The caller erases them from the index, snapshot and WAL
        (Gallery._erase)."""
        now = time.time()
        erased: list[tuple[int, str, int]] = []
        missing: list[int] = []
        with self._transaction() as conn:
            counts: dict[str, int] = {}
            for face_id in sorted(set(face_ids)):
                row = conn.execute("SELECT identity_id FROM faces WHERE face_id = ?", (face_id,)).fetchone()
                if row is None:
                    missing.append(face_id)
                    continue
                identity_id = str(row[0])
                before = counts[identity_id] if identity_id in counts else self._face_count(conn, identity_id)
                counts[identity_id] = before - 1
                conn.execute("DELETE FROM faces WHERE face_id = ?", (face_id,))
                erased.append((face_id, identity_id, before))
                if actor is not None:
                    audit.record(conn, now, "face.deleted", actor, collection, identity_id,
                                 {"face_id": face_id, "face_count": before - 1, "identity_deleted": before == 1})
            for identity_id, left in counts.items():
                if left == 0:
                    conn.execute("DELETE FROM identities WHERE identity_id = ?", (identity_id,))
                else:
                    conn.execute("UPDATE identities SET updated_at = ? WHERE identity_id = ?", (now, identity_id))
        return erased, missing

    # --- reads -------------------------------------------------------------------------------
    def expired_faces(self, enrolled_before: float, limit: int) -> list[int]:
        return expired_face_ids(self._reader(), enrolled_before, limit)

    def oldest_enrollment(self) -> float | None:
        return oldest_face_time(self._reader())

    def iter_faces(self, batch: int = 10_000) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
        """All faces in id order, in chunks of (face ids, embeddings, identity ids)."""
        conn = self._reader()
        last = -1
        while True:
            rows = conn.execute(
                "SELECT face_id, identity_id, embedding FROM faces WHERE face_id > ? ORDER BY face_id LIMIT ?",
                (last, batch),
            ).fetchall()
            if not rows:
                return
            ids = np.array([r[0] for r in rows], dtype=np.int64)
            # one buffer for the chunk: a frombuffer per row costs more than the query (the exact search scans this)
            vectors = np.frombuffer(bytearray().join(r[2] for r in rows), dtype=np.float32).reshape(len(rows), -1)
            yield ids, vectors, [r[1] for r in rows]
            last = rows[-1][0]

    def face_labels(self) -> tuple[np.ndarray, list[str]]:
        """Every face id (ascending) and its identity: what the index's label map is built from."""
        rows = self._reader().execute("SELECT face_id, identity_id FROM faces ORDER BY face_id").fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)), [r[1] for r in rows]

    def embeddings_of(self, face_ids: np.ndarray, batch: int = 500) -> np.ndarray:
        """Embeddings of the given faces, in the given order (all must exist)."""
        conn = self._reader()
        out: dict[int, np.ndarray] = {}
        ids = [int(i) for i in face_ids]
        for start in range(0, len(ids), batch):
            part = ids[start:start + batch]
            marks = ",".join("?" * len(part))
            for face_id, blob in conn.execute(f"SELECT face_id, embedding FROM faces WHERE face_id IN ({marks})", part):
                out[face_id] = np.frombuffer(blob, dtype=np.float32)
        return np.stack([out[i] for i in ids]) if ids else np.zeros((0, 0), np.float32)

    def identity_embeddings(self, identity_id: str) -> np.ndarray | None:
        conn = self._reader()
        if conn.execute("SELECT 1 FROM identities WHERE identity_id = ?", (identity_id,)).fetchone() is None:
            return None
        rows = conn.execute("SELECT embedding FROM faces WHERE identity_id = ? ORDER BY face_id", (identity_id,)).fetchall()
        return np.stack([np.frombuffer(r[0], dtype=np.float32) for r in rows]) if rows else np.zeros((0, 0), np.float32)

    def get_identity(self, identity_id: str) -> IdentityDetails | None:
        return self._details(self._reader(), identity_id)

    @staticmethod
    def _details(conn: sqlite3.Connection, identity_id: str) -> IdentityDetails | None:
        row = conn.execute(
            "SELECT identity_id, metadata, created_at, updated_at FROM identities WHERE identity_id = ?", (identity_id,)
        ).fetchone()
        if row is None:
            return None
        faces = conn.execute(
            "SELECT face_id, created_at FROM faces WHERE identity_id = ? ORDER BY face_id", (identity_id,)
        ).fetchall()
        record = IdentityRecord(row[0], json.loads(row[1]), len(faces), row[2], row[3])
        return IdentityDetails(record, [FaceRecord(int(f), float(t)) for f, t in faces])

    def list_identities(self, limit: int, after: str | None, prefix: str | None = None) -> list[IdentityRecord]:
        """Keyset pagination by identity id: stable under concurrent inserts and deletes; ``prefix``: a
        range of the id index (identity_ids.id_range), as a page without one."""
        low, inclusive, high = id_range(after, prefix)
        rows = self._reader().execute(
            "SELECT i.identity_id, i.metadata, i.created_at, i.updated_at, "
            "(SELECT COUNT(*) FROM faces f WHERE f.identity_id = i.identity_id) "
            f"FROM identities i WHERE i.identity_id {'>=' if inclusive else '>'} ?"
            f"{'' if high is None else ' AND i.identity_id < ?'} ORDER BY i.identity_id LIMIT ?",
            (low, *(() if high is None else (high,)), limit),
        ).fetchall()
        return [IdentityRecord(r[0], json.loads(r[1]), r[4], r[2], r[3]) for r in rows]

    def face_crop(self, face_id: int) -> bytes | None:
        row = self._reader().execute("SELECT blob FROM crops WHERE face_id = ?", (int(face_id),)).fetchone()
        return bytes(row[0]) if row else None

    def iter_crops(self, after_face_id: int = 0, limit: int = 256) -> list[tuple[int, str, bytes]]:
        rows = self._reader().execute(
            "SELECT c.face_id, f.identity_id, c.blob FROM crops c JOIN faces f USING (face_id) "
            "WHERE c.face_id > ? ORDER BY c.face_id LIMIT ?", (int(after_face_id), int(limit))).fetchall()
        return [(int(r[0]), r[1], bytes(r[2])) for r in rows]

    def crop_count(self) -> int:
        return int(self._reader().execute("SELECT COUNT(*) FROM crops").fetchone()[0])

    def counts(self) -> tuple[int, int]:
        return count_rows(self._reader())

    def counted_faces(self, cap: int) -> int:
        return count_counted_faces(self._reader(), cap)

    def face_embeddings(self, face_ids: list[int], batch: int = 500) -> dict[int, tuple[str, np.ndarray]]:
        """face id -> (identity id, embedding) for the given ids that exist (others are absent)."""
        conn = self._reader()
        out: dict[int, tuple[str, np.ndarray]] = {}
        ids = sorted({int(i) for i in face_ids})
        for start in range(0, len(ids), batch):
            part = ids[start:start + batch]
            marks = ",".join("?" * len(part))
            for face_id, identity_id, blob in conn.execute(
                    f"SELECT face_id, identity_id, embedding FROM faces WHERE face_id IN ({marks})", part):
                out[int(face_id)] = (identity_id, np.frombuffer(blob, dtype=np.float32))
        return out

    def identity_crops(self, identity_ids: list[str], batch: int = 500) -> dict[str, list[tuple[int, bytes | None, float]]]:
        """identity id -> [(face id, sealed crop or None, enrolled at)] in face-id order, for the ids that
        exist; one SELECT per ``batch`` identities (each identity's rows come from one statement: one snapshot)."""
        conn = self._reader()
        out: dict[str, list[tuple[int, bytes | None, float]]] = {}
        ids = sorted(set(identity_ids))
        for start in range(0, len(ids), batch):
            part = ids[start:start + batch]
            marks = ",".join("?" * len(part))
            for identity_id, face_id, blob, created_at in conn.execute(
                    f"SELECT f.identity_id, f.face_id, c.blob, f.created_at FROM faces f LEFT JOIN crops c USING (face_id) "
                    f"WHERE f.identity_id IN ({marks}) ORDER BY f.identity_id, f.face_id", part):
                out.setdefault(identity_id, []).append((int(face_id), None if blob is None else bytes(blob),
                                                        float(created_at)))
        return out

    def identity_faces(self, identity_ids: list[str], batch: int = 500) -> dict[str, tuple[list[int], np.ndarray]]:
        """identity id -> (face ids, vectors) in face-id order, for the ids that exist; one SELECT per ``batch``
        identities (each identity's rows come from one statement: one snapshot)."""
        conn = self._reader()
        rows: dict[str, tuple[list[int], list[bytes]]] = {}
        ids = sorted(set(identity_ids))
        for start in range(0, len(ids), batch):
            part = ids[start:start + batch]
            for identity_id, face_id, blob in conn.execute(
                    f"SELECT identity_id, face_id, embedding FROM faces WHERE identity_id IN ({','.join('?' * len(part))}) "
                    "ORDER BY identity_id, face_id", part):
                face_ids, blobs = rows.setdefault(identity_id, ([], []))
                face_ids.append(int(face_id))
                blobs.append(blob)
        return {i: (f, np.frombuffer(b"".join(b), dtype=np.float32).reshape(len(f), -1)) for i, (f, b) in rows.items()}

    def faces_by_identity(self, batch: int = 4096) -> Iterator[tuple[list[int], list[str], np.ndarray]]:
        """Every face as (face ids, identity ids, embeddings), ordered by identity id then face id, in
        batches (keyset pages on the faces_by_identity index; each page is its own read)."""
        conn = self._reader()
        after: tuple[str, int] = ("", -1)
        while True:
            rows = conn.execute(
                "SELECT face_id, identity_id, embedding FROM faces WHERE (identity_id, face_id) > (?, ?) "
                "ORDER BY identity_id, face_id LIMIT ?", (*after, batch)).fetchall()
            if not rows:
                return
            vectors = np.frombuffer(bytearray().join(r[2] for r in rows), dtype=np.float32).reshape(len(rows), -1)
            yield [int(r[0]) for r in rows], [r[1] for r in rows], vectors
            after = (rows[-1][1], int(rows[-1][0]))


class StoreDamaged(RuntimeError):
    """A store file (a collection's gallery.sqlite3, the catalog) that SQLite cannot read as a database:
    a bad restore, a partial copy, a disk fault. Nothing is written to it; the service will not start on
    it (starting would answer as if its faces were gone)."""


def connect(path: Path) -> sqlite3.Connection:
    """A connection to a store file as Store makes them (WAL, synchronous=FULL, secure_delete);
    ``StoreDamaged`` for a file SQLite cannot read as a database."""
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA secure_delete=ON")
    except sqlite3.DatabaseError as exc:
        conn.close()
        if (damage := as_damaged(path, exc)) is None:
            raise
        raise damage from exc
    return conn


def damaged_message(path: Path | str, exc: BaseException) -> str:
    return (f"{path} is not a SQLite database, or a damaged one ({exc}): restore the data dir from a backup "
            "(python -m service backup makes one); nothing was written to it")


def as_damaged(path: Path, exc: BaseException) -> StoreDamaged | None:
    """``exc`` as the StoreDamaged of the file at ``path`` (itself when it is one already); None when it
    says nothing of damage."""
    if isinstance(exc, StoreDamaged):
        return exc
    return StoreDamaged(damaged_message(path, exc)) if is_damaged(exc) else None


def damaged_files(data_dir: Path) -> list[Path]:
    """The SQLite files of a data dir (the catalog, each collection's store) that SQLite cannot read
    whole (``PRAGMA quick_check``: seconds a GB), sorted; nothing is written to them."""
    found = []
    for path in sorted(Path(data_dir).rglob("*.sqlite3")):
        try:
            conn = sqlite3.connect(path, timeout=30)
            try:
                whole = conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"
            finally:
                conn.close()
        except sqlite3.DatabaseError:
            whole = False
        if not whole:
            found.append(path)
    return found


def damage_in(data_dir: Path, exc: BaseException) -> StoreDamaged:
    """The StoreDamaged of damage SQLite reported (``exc``) where no one store was being opened (a
    start-up read of the catalog's keys, a command's): named by the files of ``data_dir`` found damaged."""
    files = damaged_files(data_dir)
    return StoreDamaged(damaged_message(", ".join(map(str, files)) if files else f"a database in {data_dir}", exc))


def count_rows(conn: sqlite3.Connection) -> tuple[int, int]:
    """(identities, faces) of a store."""
    identities = conn.execute("SELECT COUNT(*) FROM identities").fetchone()[0]
    faces = conn.execute("SELECT COUNT(*) FROM faces").fetchone()[0]
    return int(identities), int(faces)


def count_counted_faces(conn: sqlite3.Connection, cap: int) -> int:
    """Sum over identities of min(their faces, cap): what sizes the open-set threshold."""
    row = conn.execute(
        "SELECT COALESCE(SUM(MIN(n, ?)), 0) FROM (SELECT COUNT(*) AS n FROM faces GROUP BY identity_id)",
        (cap,)).fetchone()
    return int(row[0])


def erase_rows(conn: sqlite3.Connection) -> None:
    """Delete every identity, face and audit entry (secure_delete zeroes them) and truncate the WAL:
    the first step of erasing a whole collection."""
    with write_transaction(conn):
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        for table in ("crops", "faces", "identities", "audit", "meta"):
            if table in tables or table != "crops":  # a store from before kept crops has no crops table
                conn.execute(f"DELETE FROM {table}")
    checkpoint(conn)
