"""The catalog of the embedded backend: ``<data_dir>/catalog.sqlite3`` holds the collections (name,
model, created), the aliases (a second name of a collection), the API keys (hashes only) and the
audit entries of catalog changes (collections created or deleted, aliases set or deleted, keys
created or revoked, and the trail of each deleted collection).

It is not under the data-dir lock: another process (``python -m service keys create`` while the
server runs) writes it too, SQLite's own locking serialises the writers (WAL, ``BEGIN IMMEDIATE``,
a busy timeout). ``synchronous=FULL``: an acknowledged change survives a crash; ``secure_delete``.

A catalog file SQLite cannot read as a database, or whose pages it finds damaged where a read or a
write meets them, raises ``CatalogDamaged`` naming the file (503 ``catalog_damaged``; at start-up, a
refusal): nothing more is written to it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from ...jobs import store as jobs
from ..api import (
    COLLECTION_SETTINGS,
    DEFAULT_COLLECTION,
    Actor,
    AliasInfo,
    AliasNotFound,
    AuditEntry,
    AuditQuery,
    CatalogDamaged,
    CollectionExists,
    CollectionInUse,
    CollectionNotFound,
    KeyExists,
    StoredKey,
    updated_settings,
)
from . import audit
from .lock import usable_data_dir
from .sqlite import checkpoint, write_transaction
from .store import StoreDamaged, as_damaged, connect

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

# collections and aliases share one namespace: each write checks the other table inside its own
# BEGIN IMMEDIATE transaction, so two writers (the server, the CLI) cannot both take a name
ALIASES_SCHEMA = """
CREATE TABLE IF NOT EXISTS aliases (
    name       TEXT PRIMARY KEY,
    collection TEXT NOT NULL,  -- a name in collections; deleting that collection is refused meanwhile
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS aliases_by_collection ON aliases(collection);
"""
# kept crops: the crop key's check value (crops.py), stored with the first keep_crops collection
CROPS_SCHEMA = """
CREATE TABLE IF NOT EXISTS crop_key_check (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    value BLOB NOT NULL
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
        self.path = usable_data_dir(data_dir) / self.FILE
        with self._contained():
            self._conn = connect(self.path)
            try:
                self._conn.executescript(SCHEMA + audit.SCHEMA + ALIASES_SCHEMA + CROPS_SCHEMA
                                         + ";\n".join(jobs.schema("TEXT", "REAL", "INTEGER", "jobs")) + ";")
                self._add_keep_crops_column()
                self._add_dim_column()
                self._add_setting_columns()
            except BaseException:
                self._conn.close()
                raise
        self._mutex = threading.Lock()  # one connection: one statement or transaction at a time

    @contextmanager
    def _contained(self) -> Iterator[None]:
        """What says the file is damaged (or no database) raised as CatalogDamaged naming it."""
        try:
            yield
        except (sqlite3.DatabaseError, StoreDamaged) as exc:
            if (damage := as_damaged(self.path, exc)) is None:
                raise
            raise CatalogDamaged(str(damage)) from exc

    def _add_keep_crops_column(self) -> None:
        """A catalog from before kept crops gets the collections' keep_crops column (0 for all)."""
        def has_it() -> bool:
            return any(r[1] == "keep_crops" for r in self._conn.execute("PRAGMA table_info(collections)"))

        if not has_it():
            try:
                self._conn.execute("ALTER TABLE collections ADD COLUMN keep_crops INTEGER NOT NULL DEFAULT 0")
            except sqlite3.OperationalError:  # another process added it meanwhile
                if not has_it():
                    raise

    def _add_dim_column(self) -> None:
        """Catalogs made before collections were pinned to a model's dimension get the column (NULL:
        the collection's store says; see EmbeddedGalleries._pin)."""
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(collections)")}
        if "dim" not in columns:
            with suppress(sqlite3.OperationalError):  # another process added it first
                self._conn.execute("ALTER TABLE collections ADD COLUMN dim INTEGER")

    def _add_setting_columns(self) -> None:
        """Catalogs made before a collection setting (COLLECTION_SETTINGS) get its column (NULL: the
        default: faces kept until deleted, no face limit, the service's FPIR)."""
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(collections)")}
        for column, kind in (("retention_days", "REAL"), ("max_faces", "INTEGER"), ("identify_fpir", "REAL")):
            if column not in columns:
                with suppress(sqlite3.OperationalError):  # another process added it first
                    self._conn.execute(f"ALTER TABLE collections ADD COLUMN {column} {kind}")

    def close(self) -> None:
        with self._mutex:
            checkpoint(self._conn)
            self._conn.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._contained(), self._mutex, write_transaction(self._conn) as conn:
            yield conn

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._contained(), self._mutex:
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

    def add_collection(self, name: str, model_id: str, actor: Actor | None, keep_crops: bool = False,
                       check_value: bytes | None = None, dim: int | None = None,
                       settings: dict[str, Any] | None = None) -> float:
        """``check_value``: the crop key's, stored with the collection unless one is stored already;
        ``settings``: COLLECTION_SETTINGS given a value (the others NULL)."""
        settings = {k: v for k, v in (settings or {}).items() if v is not None}
        now = time.time()
        try:
            with self._write() as conn:
                if conn.execute("SELECT 1 FROM aliases WHERE name = ?", (name,)).fetchone():
                    raise CollectionExists(name)  # an alias has the name
                conn.execute(f"INSERT INTO collections(name, model_id, created_at, keep_crops, dim, {', '.join(COLLECTION_SETTINGS)}) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (name, model_id, now, int(keep_crops), dim,
                                                                 *(settings.get(k) for k in COLLECTION_SETTINGS)))
                if check_value is not None:
                    conn.execute("INSERT OR IGNORE INTO crop_key_check(id, value) VALUES (1, ?)", (check_value,))
                audit.record(conn, now, "collection.created", actor or Actor(), name, None,
                             {"model_id": model_id, "dim": dim, "keep_crops": bool(keep_crops), **settings})
        except sqlite3.IntegrityError as exc:
            raise CollectionExists(name) from exc
        return now

    def drop_collection(self, name: str, trail: list[audit.Row], actor: Actor | None, details: dict) -> bool:
        """In one transaction: remove the row, keep the collection's audit ``trail`` and record
        collection.deleted. False if there was no row (deleted meanwhile, by another call)."""
        with self._write() as conn:
            pointing, keys = _aliases_to(conn, name), _keys_naming(conn, name)
            if pointing or keys:
                raise CollectionInUse(name, pointing, keys)
            if not conn.execute("DELETE FROM collections WHERE name = ?", (name,)).rowcount:
                return False
            audit.insert(conn, trail)
            audit.record(conn, time.time(), "collection.deleted", actor or Actor(), name, None, details)
        return True

    def retentions(self) -> dict[str, float]:
        """name -> retention in days, of the collections that have one."""
        return {name: float(days) for name, days in self._read(
            "SELECT name, retention_days FROM collections WHERE retention_days IS NOT NULL ORDER BY name")}

    def settings(self) -> dict[str, dict[str, Any]]:
        """name -> its COLLECTION_SETTINGS (None: the default), for every collection."""
        return {row[0]: dict(zip(COLLECTION_SETTINGS, row[1:])) for row in self._read(
            f"SELECT name, {', '.join(COLLECTION_SETTINGS)} FROM collections")}

    def update_settings(self, name: str, changes: dict[str, Any], actor: Actor | None) -> None:
        """Galleries.update_collection: the changed settings and collection.updated, in one transaction."""
        columns = [k for k in COLLECTION_SETTINGS if k in changes]
        with self._write() as conn:
            row = conn.execute(f"SELECT {', '.join(COLLECTION_SETTINGS)} FROM collections WHERE name = ?",
                               (name,)).fetchone()
            if row is None:
                raise CollectionNotFound(name)
            details = updated_settings(dict(zip(COLLECTION_SETTINGS, row)), changes)
            if details:
                conn.execute(f"UPDATE collections SET {', '.join(f'{k} = ?' for k in columns)} WHERE name = ?",
                             (*(changes[k] for k in columns), name))
                audit.record(conn, time.time(), "collection.updated", actor or Actor(), name, None, details)

    # --- aliases -----------------------------------------------------------------------------
    def set_alias(self, name: str, collection: str, actor: Actor | None) -> AliasInfo:
        """Create or re-point, in one transaction with its audit record."""
        now = time.time()
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM collections WHERE name = ?", (name,)).fetchone():
                raise CollectionExists(name)
            if not conn.execute("SELECT 1 FROM collections WHERE name = ?", (collection,)).fetchone():
                raise CollectionNotFound(collection)
            job = conn.execute(jobs.NEWEST_MIGRATION_INTO.format(table="jobs", param="?"), (collection,)).fetchone()
            if job is not None and job[1] != "done":
                raise jobs.MigrationUnfinished(collection, job[0], job[1])
            row = conn.execute("SELECT collection FROM aliases WHERE name = ?", (name,)).fetchone()
            conn.execute("INSERT INTO aliases(name, collection, updated_at) VALUES (?, ?, ?) ON CONFLICT (name) "
                         "DO UPDATE SET collection = excluded.collection, updated_at = excluded.updated_at",
                         (name, collection, now))
            audit.record(conn, now, "alias.set", actor or Actor(), collection, None,
                         {"alias": name, "collection": collection, "previous": row[0] if row else None})
        return AliasInfo(name, collection, now)

    def delete_alias(self, name: str, actor: Actor | None) -> AliasInfo:
        now = time.time()
        with self._write() as conn:
            row = conn.execute("SELECT collection, updated_at FROM aliases WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise AliasNotFound(name)
            conn.execute("DELETE FROM aliases WHERE name = ?", (name,))
            audit.record(conn, now, "alias.deleted", actor or Actor(), row[0], None,
                         {"alias": name, "collection": row[0]})
        return AliasInfo(name, row[0], row[1])

    def aliases(self) -> list[AliasInfo]:
        return [AliasInfo(*r) for r in self._read("SELECT name, collection, updated_at FROM aliases ORDER BY name")]

    def aliases_to(self, collection: str) -> list[str]:
        with self._contained(), self._mutex:
            return _aliases_to(self._conn, collection)

    def keys_naming(self, collection: str) -> list[str]:
        with self._contained(), self._mutex:
            return _keys_naming(self._conn, collection)

    def crop_collections(self) -> set[str]:
        """The collections that keep crops."""
        return {r[0] for r in self._read("SELECT name FROM collections WHERE keep_crops != 0")}

    def crop_key_check(self) -> bytes | None:
        rows = self._read("SELECT value FROM crop_key_check WHERE id = 1")
        return bytes(rows[0][0]) if rows else None

    # --- keys --------------------------------------------------------------------------------
    def add_key(self, key: StoredKey, actor: Actor | None) -> None:
        try:
            with self._write() as conn:
                for name in key.collections or ():  # in this transaction: a delete cannot slip in (drop_collection)
                    if name != DEFAULT_COLLECTION and not conn.execute(
                            "SELECT 1 FROM collections WHERE name = ?", (name,)).fetchone():
                        raise CollectionNotFound(name)
                conn.execute(
                    f"INSERT INTO keys({_KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (key.key_id, key.secret_hash, key.role,
                     json.dumps(list(key.collections)) if key.collections is not None else None, key.note,
                     key.created_at, key.expires_at, key.revoked_at, key.last_used_at, key.rate_limit_rps,
                     key.rate_limit_faces_per_s))
                audit.record(conn, time.time(), "key.created", actor or Actor(), None, None, {
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
            if changed:  # revoking a revoked key changes nothing: no entry
                audit.record(conn, now, "key.revoked", actor or Actor(), None, None, {"key": key_id, "role": row[2]})
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
        with self._contained(), self._mutex:
            return audit.query(self._conn, audit.CATALOG_SOURCE, query)

    def prune_audit(self, before: float) -> int:
        with self._contained(), self._mutex:
            return audit.prune(self._conn, before)

    # --- jobs (service/jobs/store.py: one queued-or-running job per source collection, by the index) ----
    def create_job(self, job: jobs.JobRecord) -> None:
        try:
            with self._write() as conn:
                conn.execute(f"INSERT INTO jobs({jobs.SQL_COLUMNS}) VALUES ({', '.join('?' * len(jobs.COLUMNS))})",
                             job.row())
        except sqlite3.IntegrityError as exc:
            raise jobs.JobRunning(job.collection) from exc

    def get_job(self, job_id: str) -> jobs.JobRecord | None:
        rows = self._read(f"SELECT {jobs.SQL_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,))
        return jobs.JobRecord.from_row(rows[0]) if rows else None

    def list_jobs(self, collection: str | None = None, state: str | None = None,
                  limit: int = 100, kind: str | None = None) -> list[jobs.JobRecord]:
        where, args = ([] if state == "creating" else ["state != 'creating'"]), []
        if collection is not None:
            where.append('"collection" = ?')
            args.append(collection)
        if state is not None:
            where.append("state = ?")
            args.append(state)
        if kind is not None:
            where.append('"kind" = ?')
            args.append(kind)
        rows = self._read(f"SELECT {jobs.SQL_COLUMNS} FROM jobs WHERE {' AND '.join(where)} "
                          "ORDER BY created_at DESC, job_id DESC LIMIT ?", (*args, int(limit)))
        return [jobs.JobRecord.from_row(r) for r in rows]

    def update_job(self, job_id: str, changes: dict, expect_state: tuple[str, ...] | None = None,
                   expect_heartbeat: float | None | bool = False, audit_as: tuple[str, Actor] | None = None,
                   expect_owner: str | None | bool = False) -> bool:
        values = jobs.to_db(changes)
        where: list[str] = ["job_id = ?"]
        args: list[object] = [job_id]
        if expect_state is not None:
            where.append(f"state IN ({', '.join('?' * len(expect_state))})")
            args.extend(expect_state)
        if expect_heartbeat is not False:
            where.append("heartbeat IS ?")
            args.append(expect_heartbeat)
        if expect_owner is not False:
            where.append('"owner" IS ?')
            args.append(expect_owner)
        sets = ", ".join(f'"{name}" = ?' for name in values)
        try:
            with self._write() as conn:
                row = conn.execute('SELECT "collection", "into", "kind" FROM jobs WHERE job_id = ?', (job_id,)).fetchone()
                changed = conn.execute(f"UPDATE jobs SET {sets} WHERE {' AND '.join(where)}",
                                       (*values.values(), *args)).rowcount
                if changed and audit_as is not None and row is not None:
                    audit.record(conn, time.time(), audit_as[0], audit_as[1], row[0], None,
                                 {"job": job_id, "kind": row[2], "into": row[1], "state": changes.get("state")})
        except sqlite3.IntegrityError as exc:  # back to queued/running while another job of it is active
            raise jobs.JobRunning(job_id) from exc
        return bool(changed)

    def delete_job(self, job_id: str) -> None:
        """Remove a job row that never started (a POST whose target collection could not be created)."""
        with self._write() as conn:
            conn.execute("DELETE FROM jobs WHERE job_id = ? AND state = 'creating'", (job_id,))


def _aliases_to(conn: sqlite3.Connection, collection: str) -> list[str]:
    return [r[0] for r in conn.execute("SELECT name FROM aliases WHERE collection = ? ORDER BY name", (collection,))]


def _keys_naming(conn: sqlite3.Connection, collection: str) -> list[str]:
    """The live keys (neither revoked nor expired) whose scope names ``collection``."""
    rows = conn.execute("SELECT key_id, collections FROM keys WHERE collections IS NOT NULL AND revoked_at IS NULL "
                        "AND (expires_at IS NULL OR expires_at > ?) ORDER BY key_id", (time.time(),))
    return [key_id for key_id, names in rows if collection in json.loads(names)]
