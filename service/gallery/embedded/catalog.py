"""The catalog of the embedded backend: ``<data_dir>/catalog.sqlite3`` holds the collections (name,
model, created), the API keys (hashes only) and the audit entries of catalog changes (collections
created or deleted, keys created or revoked, and the trail of each deleted collection).

It is not under the data-dir lock: another process (``python -m service keys create`` while the
server runs) writes it too, SQLite's own locking serialises the writers (WAL, ``BEGIN IMMEDIATE``,
a busy timeout). ``synchronous=FULL``: an acknowledged change survives a crash; ``secure_delete``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from ..api import Actor, AuditEntry, AuditQuery, CollectionExists, KeyExists, StoredKey
from . import audit
from .store import connect

SCHEMA = """
CREATE TABLE IF NOT EXISTS collections (
    name       TEXT PRIMARY KEY,
    model_id   TEXT NOT NULL,
    created_at REAL NOT NULL,
    dim        INTEGER  -- the model's embedding size (NULL in catalogs from before: the store's meta says)
);
CREATE TABLE IF NOT EXISTS keys (
    key_id                 TEXT PRIMARY KEY,
    secret_hash            TEXT NOT NULL,
    role                   TEXT NOT NULL,
    collections            TEXT,  -- JSON list; NULL: every collection
    note                   TEXT,
    created_at             REAL NOT NULL,
    expires_at             REAL,
    revoked_at             REAL,
    last_used_at           REAL,
    rate_limit_rps         REAL,
    rate_limit_faces_per_s REAL
);
"""

_KEY_COLUMNS = ("key_id, secret_hash, role, collections, note, created_at, expires_at, revoked_at, last_used_at, "
                "rate_limit_rps, rate_limit_faces_per_s")


def _key(row: tuple) -> StoredKey:
    collections = json.loads(row[3]) if row[3] is not None else None
    return StoredKey(row[0], row[1], row[2], tuple(collections) if collections is not None else None, *row[4:])


class Catalog:
    FILE = "catalog.sqlite3"

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / self.FILE
        self._conn = connect(self.path)
        self._conn.executescript(SCHEMA + audit.SCHEMA)
        self._add_dim_column()
        self._mutex = threading.Lock()  # one connection: one statement or transaction at a time

    def _add_dim_column(self) -> None:
        """Catalogs made before collections were pinned to a model's dimension get the column (NULL:
        the collection's store says; see EmbeddedGalleries._pin)."""
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(collections)")}
        if "dim" not in columns:
            with suppress(sqlite3.OperationalError):  # another process added it first
                self._conn.execute("ALTER TABLE collections ADD COLUMN dim INTEGER")

    def close(self) -> None:
        with self._mutex:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._conn.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._mutex:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._mutex:
            return self._conn.execute(sql, args).fetchall()

    # --- collections -------------------------------------------------------------------------
    def collections(self) -> dict[str, tuple[str, float]]:
        """name -> (model id, created at)."""
        return {name: (model, created) for name, model, created in self._read(
            "SELECT name, model_id, created_at FROM collections ORDER BY name")}

    def pins(self) -> dict[str, tuple[str, int | None]]:
        """name -> (model id, dimension) each collection is pinned to (dimension None: recorded before
        catalogs stored it; the collection's store has it)."""
        return {name: (model, dim) for name, model, dim in self._read("SELECT name, model_id, dim FROM collections")}

    def ensure_collection(self, name: str, model_id: str, dim: int | None = None) -> None:
        """Record a collection that exists without having been created (the default one)."""
        with self._write() as conn:
            conn.execute("INSERT OR IGNORE INTO collections(name, model_id, created_at, dim) VALUES (?, ?, ?, ?)",
                         (name, model_id, time.time(), dim))

    def add_collection(self, name: str, model_id: str, actor: Actor | None, dim: int | None = None) -> float:
        now = time.time()
        try:
            with self._write() as conn:
                conn.execute("INSERT INTO collections(name, model_id, created_at, dim) VALUES (?, ?, ?, ?)",
                             (name, model_id, now, dim))
                if actor is not None:
                    audit.record(conn, now, "collection.created", actor, name, None, {})
        except sqlite3.IntegrityError as exc:
            raise CollectionExists(name) from exc
        return now

    def drop_collection(self, name: str, trail: list[audit.Row], actor: Actor | None, details: dict) -> bool:
        """In one transaction: remove the row, keep the collection's audit ``trail`` and record
        collection.deleted. False if there was no row (deleted meanwhile, by another call)."""
        with self._write() as conn:
            if not conn.execute("DELETE FROM collections WHERE name = ?", (name,)).rowcount:
                return False
            audit.insert(conn, trail)
            if actor is not None:
                audit.record(conn, time.time(), "collection.deleted", actor, name, None, details)
        return True

    # --- keys --------------------------------------------------------------------------------
    def add_key(self, key: StoredKey, actor: Actor | None) -> None:
        try:
            with self._write() as conn:
                conn.execute(
                    f"INSERT INTO keys({_KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (key.key_id, key.secret_hash, key.role,
                     json.dumps(list(key.collections)) if key.collections is not None else None, key.note,
                     key.created_at, key.expires_at, key.revoked_at, key.last_used_at, key.rate_limit_rps,
                     key.rate_limit_faces_per_s))
                if actor is not None:
                    audit.record(conn, time.time(), "key.created", actor, None, None, {
                        "key": key.key_id, "role": key.role,
                        "collections": list(key.collections) if key.collections is not None else None,
                        "note": key.note, "expires_at": key.expires_at})
        except sqlite3.IntegrityError as exc:
            raise KeyExists(key.key_id) from exc

    def list_keys(self) -> list[StoredKey]:
        return [_key(r) for r in self._read(f"SELECT {_KEY_COLUMNS} FROM keys ORDER BY created_at, key_id")]

    def get_key(self, key_id: str) -> StoredKey | None:
        rows = self._read(f"SELECT {_KEY_COLUMNS} FROM keys WHERE key_id = ?", (key_id,))
        return _key(rows[0]) if rows else None

    def revoke_key(self, key_id: str, actor: Actor | None) -> StoredKey | None:
        now = time.time()
        with self._write() as conn:
            changed = conn.execute("UPDATE keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                                   (now, key_id)).rowcount
            row = conn.execute(f"SELECT {_KEY_COLUMNS} FROM keys WHERE key_id = ?", (key_id,)).fetchone()
            if row is None:
                return None
            if actor is not None and changed:  # revoking a revoked key changes nothing: no entry
                audit.record(conn, now, "key.revoked", actor, None, None, {"key": key_id, "role": row[2]})
        return _key(row)

    def touch_keys(self, used: dict[str, float]) -> None:
        if not used:
            return
        with self._write() as conn:
            conn.executemany(
                "UPDATE keys SET last_used_at = MAX(COALESCE(last_used_at, 0), ?) WHERE key_id = ?",
                [(at, key_id) for key_id, at in used.items()])

    def has_keys(self) -> bool:
        return bool(self._read(
            "SELECT 1 FROM keys WHERE revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?) LIMIT 1",
            (time.time(),)))

    # --- audit -------------------------------------------------------------------------------
    def audit(self, query: AuditQuery) -> list[tuple[tuple[float, str, int], AuditEntry]]:
        with self._mutex:
            return audit.query(self._conn, audit.CATALOG_SOURCE, query)

    def prune_audit(self, before: float) -> int:
        with self._mutex:
            return audit.prune(self._conn, before)
