"""The gallery on PostgreSQL + pgvector: many stateless replicas on one database.

PostgreSQL is the truth for identities, faces and embeddings, and pgvector's HNSW index (cosine) in
the same database finds nearest faces. So a committed enrollment is searchable by every replica at
once, and a committed delete is gone from every search that starts after it (the heap's visibility
rules filter the index's answers). A replica holds no gallery rows in memory: only the number of
identities it last read, inside the transaction of its last search or write.

* Schema: versioned migrations (:data:`MIGRATIONS`) applied at start-up in one transaction under a
  PostgreSQL advisory lock, so replicas starting together apply each exactly once; the same
  transaction checks the model-id guard in ``meta`` and refuses another model before changing anything.
* Writes: one transaction each; the identity row is upserted first (``INSERT .. ON CONFLICT DO UPDATE``)
  which also locks it, so two replicas enrolling the same new id at once end with one identity
  holding both faces, and a replace or delete cannot interleave with another write to that identity.
* Counts: ``counters`` holds per-slot deltas (16 slots, a random one per write, so writers on many
  replicas rarely wait for each other) of identities, faces and counted faces (each identity's faces
  up to ``FACES_COUNTED_PER_IDENTITY``, which sizes the open-set threshold); their sum is exact and
  cheap to read. A write to an identity holds its row lock, so it knows the identity's face count
  before and after, and the face cap (``max_faces``) is checked inside the same transaction.
* Faults: a lost or refused connection raises :class:`GalleryUnavailable` (the API answers 503
  ``database_unavailable``: nothing was stored); one lost while a write's COMMIT was in flight raises
  :class:`WriteOutcomeUnknown` (503 ``write_outcome_unknown``: stored or not, read it back; see
  ``_transaction``). The pools check connections before lending them and reconnect by themselves.
  A primary that stops answering without closing its connections (a paused VM, a partition: its
  statement_timeout never fires): the pools' checks and the key ring's reads have client-side deadlines
  (``Pool._check``, ``_key_read``), and over TCP its connections have keepalives and a tcp_user_timeout.
* Pools: writes and reads have a pool each (FACE_DATABASE_POOL_SIZE, FACE_DATABASE_READ_POOL_SIZE), so
  writes stuck behind a lock never starve searches. A pool whose connections are all lent out while
  the database answers raises :class:`GalleryBusy` (503 ``overloaded`` with ``Retry-After``).
* Collections (:class:`PostgresGalleries`, one :class:`PostgresGallery` each): rows of the same tables
  marked by a collection id, under the one HNSW index; a search filtered to a small collection is
  exact (see PostgresGallery on the filtered-search trap). Counters are per collection. Keys and the
  audit trail live in the same schema; each change writes its audit row in its own transaction.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from functools import partial, wraps
from typing import TYPE_CHECKING, Any, TypeVar, cast

import numpy as np
import psycopg
from pgvector import Vector
from pgvector.psycopg import register_vector
from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from ...jobs import store as jobs
from ...model.calibration import FACES_COUNTED_PER_IDENTITY, counted_faces
from ..api import (
    COLLECTION_SETTINGS,
    DEFAULT_COLLECTION,
    MAX_ROW_ID,
    Actor,
    AliasInfo,
    AliasNotFound,
    AuditEntry,
    AuditQuery,
    CatalogDamaged,
    CollectionDamaged,
    CollectionExists,
    CollectionInfo,
    CollectionInUse,
    CollectionNotFound,
    CollectionProtected,
    GalleryBusy,
    GalleryStats,
    GalleryUnavailable,
    IdentityExists,
    InvalidAuditCursor,
    KeyExists,
    ReadTarget,
    StorageFull,
    StoredKey,
    WriteConflict,
    WriteOutcomeUnknown,
    face_times,
    identity_created_at,
    updated_settings,
    valid_collection_name,
)
from ..crops import CropCipher, CropsUnavailable
from ..ef import AUTO, search_ef
from ..identity_ids import id_range
from ..results import (
    Among,
    EnrollResult,
    FaceNotFound,
    FaceRecord,
    FacesDeleted,
    IdentityDetails,
    IdentityNotFound,
    IdentityRecord,
    IdentityUpdate,
    MergeResult,
    MoveResult,
    TooManyFacesForCollection,
    TooManyFacesForIdentity,
    UpdateResult,
    count_changes,
    deletions,
    plan_update,
)
from ..search import Hit, Match, check_served, search_identities
from . import consistency
from .memory import COLLECTION_INDEX_PREFIX, HNSW_INDEX_PREFIX, buffer_fit, check_buffer_fit
from .standbys import DAMAGED_DATA, WATCHDOG, Standby, Standbys, with_keepalives

if TYPE_CHECKING:
    from ...config import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

# one advisory-lock key for the whole database: it also serialises CREATE EXTENSION across schemas
MIGRATION_LOCK_KEY = 0x66616365_67616C  # "facegal"
# another key for building the HNSW index: a migration waiting for its lock must not hold up (or
# deadlock with) a CREATE INDEX CONCURRENTLY, which waits for every open transaction to end
INDEX_LOCK_KEY = MIGRATION_LOCK_KEY + 1
# and one for taking a name (collections and aliases share one namespace): held to the end of the
# transaction that creates a collection or sets an alias, so two replicas cannot both take a name
NAMESPACE_LOCK_KEY = MIGRATION_LOCK_KEY + 2
INDEX_LOCK_POLL_S = 0.05
COLLECTION_INDEX_RETRY_S = 300.0  # a collection's own index whose build failed is tried again after this
COUNTER_SLOTS = 16
DEFAULT_COLLECTION_ID = 1  # the collection "default": migration 3 gives today's rows to it
MAX_EF_SEARCH = 1000  # pgvector's upper bound for hnsw.ef_search
# while the database is failing, requests wait this long for a connection instead of the full timeout,
# so a burst of gallery requests during an outage cannot hold every worker thread (and stall /embed)
FAILING_TIMEOUT_S = 0.25
# the pool's check of a connection before lending it waits for the server as long as its caller waits for
# a connection, but never less than this: a loaded server that answers late must not lose good connections
CHECK_MIN_S = 1.0
# the connection of the one_snapshot() block the current thread is in, and the galleries it is of
_snapshot: ContextVar[tuple[PostgresGalleries, psycopg.Connection] | None] = ContextVar("face_snapshot", default=None)


class _OwnersMoved(Exception):
    """A face changed identity while its owner was being locked (PostgresGallery._lock_owners)."""


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]  # {dim}, {m}, {ef_construction} are filled in


# Append only: a released migration is never edited, a change is a new version.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "identities, faces, pgvector HNSW index, counters", (
        """CREATE TABLE identities (
               identity_id text COLLATE "C" PRIMARY KEY,  -- byte order, as SQLite: keyset pages
               metadata    text NOT NULL DEFAULT '{{}}',  -- JSON text: jsonb cannot hold the NUL escape
               created_at  double precision NOT NULL,
               updated_at  double precision NOT NULL)""",
        """CREATE TABLE faces (
               face_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
               identity_id text COLLATE "C" NOT NULL REFERENCES identities(identity_id) ON DELETE CASCADE,
               embedding   vector({dim}) NOT NULL,
               created_at  double precision NOT NULL)""",
        "CREATE INDEX faces_by_identity ON faces(identity_id)",
        """CREATE INDEX faces_embedding_hnsw ON faces USING hnsw (embedding vector_cosine_ops)
               WITH (m = {m}, ef_construction = {ef_construction})""",
        """CREATE TABLE counters (
               slot       int PRIMARY KEY,
               identities bigint NOT NULL DEFAULT 0,
               faces      bigint NOT NULL DEFAULT 0)""",
        f"INSERT INTO counters(slot) SELECT generate_series(0, {COUNTER_SLOTS - 1})",
    )),
    # filled (and refilled whenever FACES_COUNTED_PER_IDENTITY changes) by migrate(): see recount
    Migration(2, "counted faces (each identity's faces up to a cap) in the counters", (
        "ALTER TABLE counters ADD COLUMN counted_faces bigint NOT NULL DEFAULT 0",
    )),
    # today's rows become the collection "default" (id 1: the first of a new identity column)
    Migration(3, "collections (today's gallery becomes 'default'), api keys, audit trail", (
        """CREATE TABLE collections (
               collection_id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
               name          text COLLATE "C" NOT NULL UNIQUE,
               model_id      text NOT NULL,
               created_at    double precision NOT NULL)""",
        f"""INSERT INTO collections(collection_id, name, model_id, created_at)
               SELECT {DEFAULT_COLLECTION_ID}, 'default', value, extract(epoch FROM now()) FROM meta WHERE key = 'model_id'""",
        "SELECT setval(pg_get_serial_sequence('collections', 'collection_id'), 1)",
        "ALTER TABLE faces DROP CONSTRAINT faces_identity_id_fkey",
        "ALTER TABLE identities DROP CONSTRAINT identities_pkey",
        # a constant default adds the column without rewriting the table; dropped again at once
        f"""ALTER TABLE identities ADD COLUMN collection_id bigint NOT NULL DEFAULT {DEFAULT_COLLECTION_ID}
               REFERENCES collections(collection_id)""",
        "ALTER TABLE identities ALTER COLUMN collection_id DROP DEFAULT",
        "ALTER TABLE identities ADD PRIMARY KEY (collection_id, identity_id)",
        f"ALTER TABLE faces ADD COLUMN collection_id bigint NOT NULL DEFAULT {DEFAULT_COLLECTION_ID}",
        "ALTER TABLE faces ALTER COLUMN collection_id DROP DEFAULT",
        """ALTER TABLE faces ADD FOREIGN KEY (collection_id, identity_id)
               REFERENCES identities(collection_id, identity_id) ON DELETE CASCADE""",
        "DROP INDEX faces_by_identity",
        # a collection's faces, an identity's faces: the exact search of a small collection starts here
        "CREATE INDEX faces_by_identity ON faces(collection_id, identity_id)",
        f"""ALTER TABLE counters ADD COLUMN collection_id bigint NOT NULL DEFAULT {DEFAULT_COLLECTION_ID}
               REFERENCES collections(collection_id) ON DELETE CASCADE""",
        "ALTER TABLE counters ALTER COLUMN collection_id DROP DEFAULT",
        "ALTER TABLE counters DROP CONSTRAINT counters_pkey",
        "ALTER TABLE counters ADD PRIMARY KEY (collection_id, slot)",
        """CREATE TABLE api_keys (
               key_id                 text COLLATE "C" PRIMARY KEY,
               secret_hash            text NOT NULL,
               role                   text NOT NULL,
               collections            text[],  -- NULL: every collection
               note                   text,
               created_at             double precision NOT NULL,
               expires_at             double precision,
               revoked_at             double precision,
               last_used_at           double precision,
               rate_limit_rps         double precision,
               rate_limit_faces_per_s double precision)""",
        # no foreign keys: a collection's (and a key's) records outlive it
        """CREATE TABLE audit (
               entry_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
               at          double precision NOT NULL,
               action      text NOT NULL,
               key_id      text,
               client      text,
               request_id  text,
               collection  text,
               identity_id text,
               details     jsonb NOT NULL DEFAULT '{{}}')""",
        "CREATE INDEX audit_by_at ON audit(at)",
        "CREATE INDEX audit_by_collection ON audit(collection, at)",
    )),
    # kept crops (issue 22): sealed blobs (crops.py), erased with their face by the cascade in the
    # face's own DELETE (an identity's, a replace's, a collection's)
    Migration(4, "kept face crops (collections.keep_crops, face_crops)", (
        "ALTER TABLE collections ADD COLUMN keep_crops boolean NOT NULL DEFAULT false",
        """CREATE TABLE face_crops (
               collection_id bigint NOT NULL,
               face_id       bigint PRIMARY KEY REFERENCES faces(face_id) ON DELETE CASCADE,
               blob          bytea NOT NULL)""",
        "CREATE INDEX face_crops_by_collection ON face_crops(collection_id, face_id)",
    )),
    # the runner applies each missing version in version order, whichever order they were written in
    Migration(5, "aliases: second names of collections, re-pointed atomically", (
        # no ON DELETE: a collection an alias points to cannot be deleted (collection_in_use)
        """CREATE TABLE aliases (
               name          text COLLATE "C" PRIMARY KEY,
               collection_id bigint NOT NULL REFERENCES collections(collection_id),
               updated_at    double precision NOT NULL)""",
        "CREATE INDEX aliases_by_collection ON aliases(collection_id)",
    )),
    # several models: a collection is pinned to its model's dimension, and faces of every dimension
    # share the table: the column loses its fixed dimension (no rewrite: the values are unchanged) and
    # the one HNSW index becomes one partial expression index per dimension (hnsw_index_name), which
    # ensure_index builds CONCURRENTLY after the migration (searches are exact meanwhile)
    Migration(6, "collections pinned to a model's dimension; faces of several dimensions, an HNSW index each", (
        "ALTER TABLE collections ADD COLUMN dim int",
        "UPDATE collections SET dim = (SELECT value::int FROM meta WHERE key = 'embedding_size')",
        "ALTER TABLE collections ALTER COLUMN dim SET NOT NULL",
        "DROP INDEX IF EXISTS faces_embedding_hnsw",
        "ALTER TABLE faces ALTER COLUMN embedding TYPE vector",
    )),
    # jobs (service/jobs): a partial UNIQUE index keeps one queued-or-running job per source collection
    Migration(7, "face_jobs: background jobs (migrating a collection to another model)",
              jobs.schema("text", "double precision", "boolean", "face_jobs")),
    # retention (gallery/retention.py): each face erased this long after its enrollment; the sweep
    # finds the oldest faces of a collection by the index
    Migration(8, "collection retention (collections.retention_days), faces by enrollment time", (
        "ALTER TABLE collections ADD COLUMN retention_days double precision",
        "CREATE INDEX faces_by_age ON faces(collection_id, created_at)",
    )),
    # a collection's face limit (enroll and import refuse to pass it) and its own identify FPIR
    Migration(9, "collection settings: max_faces, identify_fpir", (
        "ALTER TABLE collections ADD COLUMN max_faces bigint",
        "ALTER TABLE collections ADD COLUMN identify_fpir double precision",
    )),
)
CROP_KEY_CHECK_KEY = "crop_key_check"  # in meta: the crop key's check value (base64), crops.check_crop_key
COUNTED_CAP_KEY = "counted_faces_cap"  # in meta: the FACES_COUNTED_PER_IDENTITY the counters hold


def hnsw_index_name(dim: int) -> str:
    """The HNSW index of the faces of one dimension (a partial expression index: migration 6)."""
    return f"{HNSW_INDEX_PREFIX}{int(dim)}"


def collection_index_name(collection_id: int) -> str:
    """The HNSW index of one collection's faces, which a collection sharing the table gets once it holds
    ``collection_index_min_faces`` (PostgresGalleries.build_collection_index)."""
    return f"{COLLECTION_INDEX_PREFIX}{int(collection_id)}"


@dataclass(frozen=True)
class PostgresOptions:
    url: str
    schema: str = "face_gallery"
    pool_size: int = 8  # write connections
    read_pool_size: int = 8  # read connections (to the primary)
    timeout_s: float = 5.0
    statement_timeout_ms: int = 15000
    hnsw_m: int = 16
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int | str = AUTO  # a number, or "auto": from the gallery size (ef.py)
    iterative_scan: str = "relaxed_order"
    exact_search_max_faces: int = 10000  # a collection sharing the table this small is searched exactly (PostgresGallery)
    collection_index_min_faces: int = 20000  # a collection sharing the table this large gets an index of its own (0: never)
    maintenance_work_mem: str = "512MB"  # for building the HNSW index in one pass
    read_urls: tuple[str, ...] = ()  # streaming-replication standbys for reads (standbys.py)
    read_wait_ms: float = 100.0
    max_lag_ms: float = 5000.0
    lag_check_ms: float = 1000.0

    @classmethod
    def from_settings(cls, settings: Settings) -> PostgresOptions:
        if settings.database_url is None:
            raise ValueError("the postgres gallery needs database_url")
        return cls(url=settings.database_url.get_secret_value(), schema=settings.database_schema,
                   pool_size=settings.database_pool_size, read_pool_size=settings.database_read_pool_size,
                   timeout_s=settings.database_timeout_s,
                   statement_timeout_ms=settings.database_statement_timeout_ms, hnsw_m=settings.hnsw_m,
                   hnsw_ef_construction=settings.hnsw_ef_construction, hnsw_ef_search=settings.hnsw_ef_search,
                   iterative_scan=settings.database_iterative_scan,
                   exact_search_max_faces=settings.database_exact_search_max_faces,
                   collection_index_min_faces=settings.database_collection_index_min_faces,
                   read_urls=settings.read_urls(),
                   read_wait_ms=settings.database_read_wait_ms, max_lag_ms=settings.database_max_lag_ms,
                   lag_check_ms=settings.database_lag_check_ms)

    def connect_kwargs(self) -> dict:
        options = f"-c search_path={self.schema},public -c statement_timeout={self.statement_timeout_ms}"
        return {"options": options, "connect_timeout": max(1, math.ceil(self.timeout_s)), "autocommit": True}

    @property
    def connect_url(self) -> str:
        """The primary's URL with TCP keepalives and a ``tcp_user_timeout`` (those it sets are kept), as
        the standbys': a connection to a primary that stopped answering (a partition, a paused VM) ends
        in seconds, not after TCP's retransmissions (about 15 minutes)."""
        return with_keepalives(self.url)

    @property
    def read_deadline_s(self) -> float:
        """How long a short read may go unanswered before its connection is cut: the server ends it by
        its statement timeout, so past this too the server is not answering."""
        return self.statement_timeout_ms / 1000 + self.timeout_s

    @property
    def where(self) -> str:
        return _where(self.url, self.schema)


def _endpoint(url: str) -> str:
    """A database as a short label (metrics): host, port and database name, never the password."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "?"
    return f"{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"


def _where(url: str, schema: str) -> str:
    """A database, for messages and metrics: host and database name, never the password."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return f"schema {schema}"
    return f"postgresql database {info.get('dbname', '?')!r} on {info.get('host', 'localhost')} (schema {schema})"


WRITE_FENCE = "face-write-fence"  # collection_lock_key's kind of a collection's write fence


def collection_lock_key(kind: str, schema: str, collection_id: int) -> int:
    """An advisory lock of one collection: a signed 64-bit hash of ``kind``, the schema and the
    collection id (advisory locks are database-wide; schemas share a database)."""
    digest = hashlib.blake2b(f"{kind}:{schema}:{collection_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


# a transaction the database aborted for the sake of concurrent ones (SQLSTATE class 40: psycopg makes
# a deadlock's victim no TransactionRollback): nothing of it was stored, and the database answers
CONFLICTS = (psycopg.errors.TransactionRollback, psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)


@contextmanager
def _unavailable_on_connection_errors(where: str) -> Iterator[None]:
    try:
        yield
    except PoolTimeout as exc:
        raise GalleryUnavailable(f"no connection to {where} within the timeout") from exc
    except psycopg.errors.DiskFull as exc:  # the database answers; its disk does not take the write
        raise StorageFull(f"{where}: {str(exc).strip()[:200]}") from exc
    except CONFLICTS as exc:  # the database answers: a deadlock's victim
        raise WriteConflict(f"{where}: {type(exc).__name__}: {str(exc).strip()[:200]}") from exc
    except psycopg.OperationalError as exc:  # connection lost or refused, server shutting down, timeout
        raise GalleryUnavailable(f"{where}: {type(exc).__name__}: {str(exc).strip()[:200]}") from exc


CONFLICT_ATTEMPTS = 3  # runs of a write the database keeps aborting to break deadlocks, in all


def rerun_on_conflict(write: F) -> F:
    """A write the database aborted to break a deadlock (WriteConflict: nothing of it was stored) is run
    again, up to CONFLICT_ATTEMPTS runs in all, after a short random pause (the other side goes on
    meanwhile). Writes take their rows in id order, so deadlocks come only from outside the service."""
    @wraps(write)
    def run(*args: Any, **kwargs: Any) -> Any:
        for attempt in range(1, CONFLICT_ATTEMPTS + 1):
            try:
                return write(*args, **kwargs)
            except WriteConflict as exc:
                if attempt == CONFLICT_ATTEMPTS:
                    raise
                log.info("write aborted to break a deadlock; run again",
                         extra={"write": write.__name__, "attempt": attempt, "error": str(exc)[:200]})
                time.sleep(random.uniform(0.01, 0.05) * attempt)
        raise AssertionError("unreachable")
    return cast(F, run)


class Pool:
    """One connection pool to one PostgreSQL server: the primary's writes, the primary's reads, or a
    standby's reads. It tells a database that cannot be reached (GalleryUnavailable) from a pool whose
    every connection is lent out while the database answers (GalleryBusy), and while the database is
    failing waits only FAILING_TIMEOUT_S for a connection."""

    def __init__(self, name: str, url: str, options: PostgresOptions, size: int, where: str) -> None:
        self.name = name
        self.url = url
        self.options = options
        self.size = size
        self.where = where
        self.pool: ConnectionPool | None = None
        self.failing = False  # the last call failed for want of a connection
        self.in_use = 0  # connections lent out now (the pool's own size counts reconnection attempts too)
        self._lock = threading.Lock()
        self._waiting = threading.local()  # how long the connection() call of this thread waits

    def open(self, wait: bool = True, timeout_s: float | None = None) -> None:
        pool = ConnectionPool(
            self.url, min_size=1, max_size=self.size, kwargs=self.options.connect_kwargs(), configure=register_vector,
            check=self._check, timeout=self.options.timeout_s, open=False, name=self.name,
        )
        try:
            with _unavailable_on_connection_errors(self.where):
                pool.open(wait=wait, timeout=self.options.timeout_s)
        except GalleryUnavailable:
            pool.close()
            raise
        self.pool = pool

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def busy(self) -> bool:
        """Every connection the pool may open is lent out to a caller (so the database did answer)."""
        return self.in_use >= self.size

    def _check(self, conn: psycopg.Connection) -> None:
        """The pool's check of an idle connection before it lends it (an empty statement), cut when the
        server does not answer within the caller's wait for a connection (CHECK_MIN_S at least): a server
        that stopped answering (a paused VM, a partition) would hold the check, and the request, until it
        answered again. The pool then discards the connection and the caller gets none (PoolTimeout)."""
        waits = getattr(self._waiting, "timeout_s", self.options.timeout_s)
        with WATCHDOG.within(conn, max(waits, CHECK_MIN_S)):
            ConnectionPool.check_connection(conn)

    @contextmanager
    def connection(self, timeout_s: float | None = None) -> Iterator[psycopg.Connection]:
        """A pooled connection (autocommit: each statement commits unless in a transaction block).
        Connection errors, here or in the caller's block, raise GalleryUnavailable; no connection
        within the timeout while every one is lent out raises GalleryBusy."""
        if self.pool is None:
            raise RuntimeError("the gallery is not open")
        timeout = FAILING_TIMEOUT_S if self.failing else timeout_s or self.options.timeout_s
        self._waiting.timeout_s = timeout
        try:
            with self.pool.connection(timeout=timeout) as conn:
                with self._lock:
                    self.in_use += 1
                try:
                    yield conn
                finally:
                    with self._lock:
                        self.in_use -= 1
        except PoolTimeout as exc:
            if self.busy():  # the database answers: its connections are all held by slow calls
                raise GalleryBusy(f"all {self.size} {self.name} connections to {self.where} are in use") from exc
            self._failed()
            raise GalleryUnavailable(f"no connection to {self.where} within the timeout") from exc
        except psycopg.errors.DiskFull as exc:  # the database answers (the pool is not failing): a full disk
            raise StorageFull(f"{self.where}: {str(exc).strip()[:200]}") from exc
        except CONFLICTS as exc:  # the database answers: a deadlock's victim
            raise WriteConflict(f"{self.where}: {type(exc).__name__}: {str(exc).strip()[:200]}") from exc
        except psycopg.OperationalError as exc:  # connection lost or refused, server shutting down, timeout
            self._failed()
            raise GalleryUnavailable(f"{self.where}: {type(exc).__name__}: {str(exc).strip()[:200]}") from exc
        if self.failing:
            log.info("gallery database available again", extra={"where": self.where, "pool": self.name})
        self.failing = False

    def _failed(self) -> None:
        if not self.failing:
            log.warning("gallery database unavailable", extra={"where": self.where, "pool": self.name})
        self.failing = True


def migrate(conn: psycopg.Connection, options: PostgresOptions, model_id: str, dim: int,
            migrations: tuple[Migration, ...] | None = None, served: dict[str, int] | None = None) -> list[int | str]:
    """Bring the schema up to date and check the model guard; returns the versions applied now.

    Everything runs in one transaction under an advisory lock: a second replica starting at the same
    moment waits, then finds the work done. The guard runs first: a collection pinned to a model that is
    not ``served`` (model id -> dim; None: ``model_id`` alone) refuses the start before anything changes.
    Migrations are applied by version, each once: steps of other branches may land in any order.
    """
    schema = sql.Identifier(options.schema)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
        conn.execute(sql.SQL("SET LOCAL search_path = {}, public").format(schema))
        conn.execute("CREATE TABLE IF NOT EXISTS meta (key text PRIMARY KEY, value text NOT NULL)")
        conn.execute("""CREATE TABLE IF NOT EXISTS schema_migrations (
                            version int PRIMARY KEY, description text NOT NULL,
                            applied_at timestamptz NOT NULL DEFAULT now())""")
        meta: dict[str, str] = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        check_served(_pins(conn, meta, done), served or {model_id: dim}, options.where)
        if "model_id" not in meta:  # a new database: its first collection ("default") is the default model's
            conn.execute("INSERT INTO meta(key, value) VALUES ('model_id', %s), ('embedding_size', %s)",
                         (model_id, str(dim)))
        applied: list[int | str] = []
        for migration in sorted(MIGRATIONS if migrations is None else migrations, key=lambda m: m.version):
            if migration.version in done:
                continue
            for statement in migration.statements:
                conn.execute(statement.format(dim=int(dim), m=int(options.hnsw_m),
                                              ef_construction=int(options.hnsw_ef_construction)))
            conn.execute("INSERT INTO schema_migrations(version, description) VALUES (%s, %s)",
                         (migration.version, migration.description))
            applied.append(migration.version)
        if meta.get(COUNTED_CAP_KEY) != str(FACES_COUNTED_PER_IDENTITY):
            _recount(conn)
            applied.append(f"counted faces recounted (cap {FACES_COUNTED_PER_IDENTITY})")
    return applied


def _pins(conn: psycopg.Connection, meta: dict[str, str], done: set[int]) -> list[tuple[str, str, int]]:
    """(collection, model id, dim) of every stored collection, at whichever version the schema is: before
    migration 3 the gallery (the future "default") is meta's model; before 6 every collection has meta's dim."""
    if "model_id" not in meta:
        return []
    meta_dim = int(meta.get("embedding_size", 0))
    if 3 not in done:
        return [(DEFAULT_COLLECTION, meta["model_id"], meta_dim)]
    column = "dim" if 6 in done else "NULL::int"
    return [(name, model, int(d) if d is not None else meta_dim) for name, model, d in conn.execute(
        f"SELECT name, model_id, {column} FROM collections ORDER BY name").fetchall()]


def _recount(conn: psycopg.Connection) -> None:
    """Set each collection's counted faces from the faces themselves, for the cap in force (inside
    migrate's transaction and advisory lock: writers of another version cannot be mid-write on a new column)."""
    conn.execute("LOCK TABLE counters IN EXCLUSIVE MODE")  # a running replica's writes wait
    conn.execute("UPDATE counters SET counted_faces = 0")
    conn.execute("UPDATE counters AS k SET counted_faces = c.counted FROM "
                 "(SELECT collection_id, sum(LEAST(n, %s)) AS counted FROM "
                 " (SELECT collection_id, count(*) AS n FROM faces GROUP BY collection_id, identity_id) AS per_identity "
                 " GROUP BY collection_id) AS c WHERE k.collection_id = c.collection_id AND k.slot = 0",
                 (FACES_COUNTED_PER_IDENTITY,))
    conn.execute("INSERT INTO meta(key, value) VALUES (%s, %s) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                 (COUNTED_CAP_KEY, str(FACES_COUNTED_PER_IDENTITY)))


def _claim_name(conn: psycopg.Connection, name: str) -> None:
    """In a transaction about to create a collection: take the namespace lock (set_alias takes it too)
    and refuse a name an alias has."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (NAMESPACE_LOCK_KEY,))
    if conn.execute("SELECT 1 FROM aliases WHERE name = %s", (name,)).fetchone():
        raise CollectionExists(name)


def _audit(conn: psycopg.Connection, actor: Actor | None, action: str, at: float, collection: str | None = None,
           identity_id: str | None = None, details: dict | None = None) -> None:
    """The audit record of a change, in the change's own transaction. Identity writes without an
    actor (tools, tests) are not recorded; collection and key changes always are."""
    _audit_each(conn, actor, action, at, collection, [(identity_id, details or {})])


def _audit_each(conn: psycopg.Connection, actor: Actor | None, action: str, at: float, collection: str | None,
                records: list[tuple[str | None, dict]]) -> None:
    """One audit record per (identity id, details) of a change, in one pipelined batch (as _audit)."""
    if actor is None:
        if not action.startswith(("collection.", "key.", "alias.")):
            return
        actor = Actor()
    rows = [(at, action, actor.key_id, actor.client, actor.request_id, collection, identity_id,
             Jsonb(actor.recorded(details))) for identity_id, details in records]
    sql = ("INSERT INTO audit(at, action, key_id, client, request_id, collection, identity_id, details) "
           "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)")
    if len(rows) == 1:  # every write's one record: no pipeline to set up
        conn.execute(sql, rows[0])
    else:
        with conn.cursor() as cur:
            cur.executemany(sql, rows)


KEY_COLUMNS = ("key_id, secret_hash, role, collections, note, created_at, expires_at, revoked_at, last_used_at, "
               "rate_limit_rps, rate_limit_faces_per_s")


def _key(row: tuple[Any, ...]) -> StoredKey:
    return StoredKey(row[0], row[1], row[2], None if row[3] is None else tuple(row[3]), *row[4:])


def _collection_info(row: tuple[Any, ...]) -> CollectionInfo:
    return CollectionInfo(row[0], row[1], float(row[2]), int(row[3]), int(row[4]), int(row[5]), keep_crops=bool(row[6]),
                          dim=int(row[7]), **_settings(row[8:]))


def _settings(values: Sequence[Any]) -> dict[str, Any]:
    """COLLECTION_SETTINGS from a row's columns in that order (numerics as Python numbers)."""
    days, most, fpir = values
    return {"retention_days": None if days is None else float(days), "max_faces": None if most is None else int(most),
            "identify_fpir": None if fpir is None else float(fpir)}


COLLECTIONS_SQL = """SELECT c.name, c.model_id, c.created_at, COALESCE(sum(k.identities), 0), COALESCE(sum(k.faces), 0),
                            COALESCE(sum(k.counted_faces), 0), c.keep_crops, c.dim, c.retention_days, c.max_faces,
                            c.identify_fpir
                     FROM collections c LEFT JOIN counters k USING (collection_id) {where}
                     GROUP BY c.collection_id ORDER BY c.name"""


def _collection_exists(conn: psycopg.Connection, collection_id: int) -> bool:
    """Asked by a collection's index build under the index lock: a collection deleted since its build was
    asked for (its drop found no index, or ran before this build got the lock) gets none, not an orphan
    index that only the next start would drop. Deleted later, its drop waits for this build's lock."""
    return bool(_one(conn.execute("SELECT EXISTS (SELECT 1 FROM collections WHERE collection_id = %s)",
                                  (collection_id,)))[0])


class PostgresGalleries:
    """The postgres backend as the service opens it (:class:`service.gallery.api.Galleries`): the
    pools, migrations and standbys, the collections (a :class:`PostgresGallery` each, made on demand
    and kept for their counts), the keys and the audit trail, all in one database schema.

    Collections, keys and audit are read on the primary (its read pool), never on a standby: a key
    revoked on another replica is refused at once, and a collection created a moment ago exists."""

    backend = "postgres"
    # the database holds the index: nothing to load in the background
    load_state = "ready"
    load_error = None

    def __init__(self, options: PostgresOptions, model_id: str, dim: int, served: dict[str, int] | None = None) -> None:
        self.options = options
        self.model_id = model_id  # the default model: new collections are pinned to it unless told otherwise
        self.dim = dim
        self.served = served or {model_id: dim}  # every served model (model id -> dim): open() checks the pins
        # writes and reads on the primary have pools of their own: writes stuck behind a lock cannot
        # take the connections that searches and lookups need
        self._writes = Pool("writes", options.connect_url, options, options.pool_size, options.where)
        self._reads = Pool("reads", options.connect_url, options, options.read_pool_size, options.where)
        self._standbys = None if not options.read_urls else Standbys(
            [Standby(_endpoint(url), url, Pool(f"standby{i}", with_keepalives(url), options, options.read_pool_size,
                                                            _where(url, options.schema)), options.connect_kwargs(),
                     options.schema)
             for i, url in enumerate(options.read_urls)],
            options.connect_url, options.connect_kwargs(), max_lag_s=options.max_lag_ms / 1000,
            wait_s=options.read_wait_ms / 1000, check_interval_s=options.lag_check_ms / 1000,
            timeout_s=options.timeout_s, statement_timeout_s=options.statement_timeout_ms / 1000)
        self.default = PostgresGallery(self, DEFAULT_COLLECTION, DEFAULT_COLLECTION_ID)
        self.crop_cipher: CropCipher | None = None  # seals kept crops; set by open.make_gallery
        self._collections: dict[str, PostgresGallery] = {DEFAULT_COLLECTION: self.default}
        self._lock = threading.Lock()
        # collections' own HNSW indexes being built in the background (build_collection_index)
        self._building: set[int] = set()
        self._build_failed: dict[int, float] = {}  # when a build last failed (monotonic): retried after a while
        self._build_threads: list[threading.Thread] = []
        self._build_conns: dict[int, psycopg.Connection] = {}
        self._closing = False
        self._damaged: set[str] = set()  # collections whose reads found damaged data, logged once each

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self.open()

    def damage_error(self, name: str, exc: BaseException) -> CollectionDamaged:
        """A collection's statement that PostgreSQL refused for damaged data (XX001, XX002): the first
        time for that collection, logged with the database's words (its own log has the relation)."""
        reason = self._damage_reason(exc)
        with self._lock:
            first = name not in self._damaged
            self._damaged.add(name)
        if first:
            log.error("collection damaged: PostgreSQL found its data damaged; restore the database from a backup "
                      "(or repair it: REINDEX for an index); the other collections serve on",
                      extra={"collection": name, "reason": reason})
        return CollectionDamaged(name, reason)

    def open(self) -> None:
        """Migrate under the advisory lock, check the model, then open the connection pools."""
        started = time.perf_counter()
        with _unavailable_on_connection_errors(self.options.where):
            with psycopg.connect(self.options.connect_url, **self.options.connect_kwargs()) as conn:
                applied: list[int | str] = list(migrate(conn, self.options, self.model_id, self.dim, served=self.served))
                self._warn_if_index_differs(conn)
                pinned = _one(conn.execute("SELECT model_id, dim FROM collections WHERE collection_id = %s",
                                           (DEFAULT_COLLECTION_ID,)))
                self.default.model_id, self.default.dim = pinned[0], int(pinned[1])
                self.default.prepare_sql()
        try:
            self._writes.open()
            self._reads.open()
            if self._standbys is not None:
                self._standbys.open()
        except GalleryUnavailable:
            self.close()
            raise
        for dim in self.ensure_index():
            applied.append(f"hnsw index of {dim}-d faces built")
        self.drop_orphan_collection_indexes()
        stats = self.stats()
        self.default.stats()  # its counts, for the first search's plan
        with self._read_connection() as conn:
            fit = check_buffer_fit(conn, self.options.schema, self.options.where)
        log.info("postgres gallery ready", extra={
            "where": self.options.where, "migrations_applied": applied, "identities": stats.identities,
            "faces": stats.faces, "collections": stats.extra.get("collections"), **(fit.fields() if fit else {}),
            "seconds": round(time.perf_counter() - started, 3)})

    def close(self) -> None:
        with self._lock:
            self._closing = True
        for conn in list(self._build_conns.values()):  # a build cut short leaves an invalid index: the next drops it
            conn.cancel_safe()
        for thread in list(self._build_threads):
            thread.join(10)
        if self._standbys is not None:
            self._standbys.close()
        self._writes.close()
        self._reads.close()

    # --- the HNSW index: built in one pass after a large load -------------------------------------
    def _warn_if_index_differs(self, conn: psycopg.Connection) -> None:
        """m and ef_construction shape the index when it is built; a changed setting needs a REINDEX."""
        row = conn.execute(
            "SELECT c.reloptions FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relname LIKE 'faces\\_embedding\\_hnsw\\_%%' LIMIT 1",
            (self.options.schema,)).fetchone()
        built = dict(opt.split("=", 1) for opt in (row[0] or [])) if row else {}
        wanted = {"m": str(self.options.hnsw_m), "ef_construction": str(self.options.hnsw_ef_construction)}
        if built and built != wanted:
            log.warning("the pgvector index was built with other HNSW parameters; REINDEX to apply the settings",
                        extra={"built": built, "settings": wanted})

    def _index_state(self, conn: psycopg.Connection, name: str) -> bool | None:
        """True: the index ``name`` (an HNSW index of a dimension, or of a collection) is valid; False: a
        failed concurrent build left it invalid; None: absent."""
        row = conn.execute(
            "SELECT x.indisvalid FROM pg_index x JOIN pg_class c ON c.oid = x.indexrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
            (self.options.schema, name)).fetchone()
        return None if row is None else bool(row[0])

    def ensure_index(self, dims: list[int] | None = None) -> list[int]:
        """Build the HNSW index of each dimension (``dims``; None: every collection's) that is missing (a
        bulk load that did not finish, migration 6, a collection of a new model); the dimensions built.

        CONCURRENTLY, so searches and writes on other replicas go on meanwhile; under a session
        advisory lock, so replicas starting together build it once.
        """
        if dims is None:
            with self._read_connection() as conn:
                dims = [int(r[0]) for r in conn.execute("SELECT DISTINCT dim FROM collections ORDER BY dim")]
        return [dim for dim in dims if self._ensure_index(dim)]

    def _ensure_index(self, dim: int) -> bool:
        # a partial expression index: the faces of this dimension, cast to a typed vector (what HNSW
        # needs); a search uses it with the same cast and predicate (PostgresGallery.hnsw_sql)
        with self._connection() as conn:
            return self._build_hnsw(conn, hnsw_index_name(dim), dim,
                                    sql.SQL("vector_dims(embedding) = {}").format(sql.Literal(int(dim))), {"dim": dim})

    def _build_hnsw(self, conn: psycopg.Connection, index: str, dim: int, where: sql.Composable, about: dict,
                    level: int = logging.WARNING, wanted: Callable[[psycopg.Connection], bool] | None = None) -> bool:
        """Build the HNSW index ``index`` of the faces ``where`` says (cast to ``dim``), CONCURRENTLY, unless
        it is there and valid (a failed build's invalid one is dropped first); True if it built it.
        ``wanted``: asked once the lock is held, when no drop can be under way; False builds nothing."""
        name = sql.Identifier(index)
        if self._index_state(conn, index):
            return False
        with self._index_lock(conn) as locked:
            if not locked:
                return False
            try:
                state = self._index_state(conn, index)
                if state or (wanted is not None and not wanted(conn)):
                    return False
                started = time.perf_counter()
                # after a bulk load, or at start-up when one did not finish (searches are exact meanwhile); a
                # collection's own one (INFO: its searches stay as they were until it is there)
                log.log(level, "building the pgvector HNSW index", extra={"where": self.options.where, "index": index,
                                                                      **about, "was": "invalid" if state is False else "missing"})
                conn.execute("SET statement_timeout = 0")
                conn.execute(sql.SQL("SET maintenance_work_mem = {}").format(sql.Literal(self.options.maintenance_work_mem)))
                if state is False:
                    conn.execute(sql.SQL("DROP INDEX CONCURRENTLY {}").format(name))
                create = sql.SQL(
                    "CREATE INDEX CONCURRENTLY {} ON faces USING hnsw ((embedding::vector({})) vector_cosine_ops) "
                    "WITH (m = {}, ef_construction = {}) WHERE {}").format(
                        name, sql.Literal(int(dim)), sql.Literal(int(self.options.hnsw_m)),
                        sql.Literal(int(self.options.hnsw_ef_construction)), where)
                try:
                    conn.execute(create)
                except (psycopg.errors.DiskFull, psycopg.errors.OutOfMemory) as exc:
                    # a parallel build (a table past min_parallel_table_scan_size) puts its graph in
                    # maintenance_work_mem of dynamic shared memory, i.e. a file in /dev/shm, which a
                    # container gets 64 MB of unless told otherwise (docker's --shm-size): build it
                    # with one process instead (slower, in the backend's own memory) than not at all
                    log.warning("the parallel HNSW build could not get its shared memory; building with one process "
                                "(give the database more /dev/shm: docker compose shm_size)",
                                extra={"where": self.options.where, "index": index, **about,
                                       "error": str(exc).strip()[:200]})
                    conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(name))  # the invalid one left
                    conn.execute("SET max_parallel_maintenance_workers = 0")
                    conn.execute(create)
                log.info("pgvector HNSW index built", extra={"index": index, **about,
                                                             "seconds": round(time.perf_counter() - started, 1)})
                return True
            finally:
                conn.execute("RESET statement_timeout")
                conn.execute("RESET maintenance_work_mem")
                conn.execute("RESET max_parallel_maintenance_workers")

    @contextmanager
    def _index_lock(self, conn: psycopg.Connection) -> Iterator[bool]:
        """The index builds' (and drops') session advisory lock on ``conn``, polled, never waited for inside
        a statement: a CREATE INDEX CONCURRENTLY of another replica waits for every transaction open when
        it starts, a blocked lock request among them (deadlock). False: the galleries are closing (given up)."""
        while not _one(conn.execute("SELECT pg_try_advisory_lock(%s)", (INDEX_LOCK_KEY,)))[0]:
            if self._closing:
                yield False
                return
            time.sleep(INDEX_LOCK_POLL_S)
        try:
            yield True
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (INDEX_LOCK_KEY,))

    # --- an HNSW index of a collection's own (a big collection sharing the table) ------------------
    def build_collection_index(self, collection_id: int, dim: int) -> None:
        """In the background, build the HNSW index of one collection's faces (collection_index_name):
        once per collection at a time in this process; replicas asking together build it once (the
        advisory lock of _build_hnsw). Searches go on exactly meanwhile; each replica's next search of
        the collection sees the index (COUNTS_SQL) and uses it (PostgresGallery._plan)."""
        with self._lock:
            failed = self._build_failed.get(collection_id)
            if (self._closing or collection_id in self._building
                    or (failed is not None and time.monotonic() - failed < COLLECTION_INDEX_RETRY_S)):
                return
            self._building.add(collection_id)
        thread = threading.Thread(target=self._build_collection_index, args=(collection_id, dim), daemon=True,
                                  name=f"face-collection-index-{collection_id}")
        self._keep_thread(thread)
        thread.start()

    def _keep_thread(self, thread: threading.Thread) -> None:
        """A build or drop thread, for close() to wait for (the finished ones are let go)."""
        with self._lock:
            self._build_threads = [t for t in self._build_threads if t.is_alive()] + [thread]

    def _build_collection_index(self, collection_id: int, dim: int) -> None:
        index = collection_index_name(collection_id)
        try:
            with psycopg.connect(self.options.connect_url, **self.options.connect_kwargs()) as conn:
                self._build_conns[collection_id] = conn
                try:
                    if self._closing:
                        return
                    if self._build_hnsw(conn, index, dim, sql.SQL("collection_id = {}").format(
                            sql.Literal(int(collection_id))), {"collection_id": collection_id}, logging.INFO,
                            wanted=lambda c: _collection_exists(c, collection_id)):
                        # the planner uses the partial index only once it knows how many rows its predicate
                        # holds: an auto-analyze waits for a tenth of the table to change, which a
                        # collection of a few % of it never makes
                        conn.execute("ANALYZE faces")
                finally:
                    self._build_conns.pop(collection_id, None)
        except psycopg.Error as exc:
            with self._lock:
                self._build_failed[collection_id] = time.monotonic()
            if not self._closing:
                log.warning("could not build a collection's own HNSW index; its searches stay exact",
                            extra={"where": self.options.where, "collection_id": collection_id,
                                   "error": f"{type(exc).__name__}: {str(exc).strip()[:200]}"})
        finally:
            with self._lock:
                self._building.discard(collection_id)

    def drop_orphan_collection_indexes(self) -> None:
        """Collections' own indexes whose collection is gone (its drop failed, or the replica that deleted
        it stopped before dropping it): dropped, each like _drop_collection_index."""
        with self._read_connection() as conn:
            ids = [int(r[0]) for r in conn.execute(
                "SELECT substr(c.relname, length(%(prefix)s) + 1)::bigint FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %(schema)s AND c.relkind = 'i' "
                "AND c.relname ~ ('^' || %(prefix)s || '[0-9]+$') AND NOT EXISTS (SELECT 1 FROM collections k "
                "WHERE k.collection_id = substr(c.relname, length(%(prefix)s) + 1)::bigint)",
                {"prefix": COLLECTION_INDEX_PREFIX, "schema": self.options.schema})]
        for collection_id in ids:
            self._drop_collection_index(collection_id)

    def _drop_collection_index(self, collection_id: int) -> None:
        """After a collection's rows are deleted: its own index, if it had one (never used again: ids are
        not reused), dropped in the background (CONCURRENTLY, under the index builds' advisory lock: a
        drop beside a build deadlocks), so the delete never waits for another replica's build; a failure
        is only logged (the next start's drop_orphan_collection_indexes tries again). A build of it in
        this process is cancelled first."""
        building = self._build_conns.get(collection_id)
        if building is not None:
            building.cancel_safe()
        if self._closing:
            return
        thread = threading.Thread(target=self._drop_index, args=(collection_index_name(collection_id),),
                                  daemon=True, name=f"face-collection-index-drop-{collection_id}")
        self._keep_thread(thread)
        thread.start()

    def _drop_index(self, index: str) -> None:
        try:
            with psycopg.connect(self.options.connect_url, **self.options.connect_kwargs()) as conn, \
                    self._index_lock(conn) as locked:
                if locked:
                    conn.execute("SET statement_timeout = 0")
                    conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(index)))
        except psycopg.Error as exc:
            log.warning("could not drop a deleted collection's own HNSW index",
                        extra={"where": self.options.where, "index": index,
                               "error": f"{type(exc).__name__}: {str(exc).strip()[:200]}"})

    @contextmanager
    def index_built_after(self, dim: int | None = None) -> Iterator[None]:
        """For a large import: drop the HNSW index, load, then build it in one pass, which is far faster
        than inserting into it face by face. Meanwhile searches are exact (sequential scans): correct,
        but slow on a large gallery. If the process dies before the end, the next start builds it (as
        does a replica that starts during the load: then the rest of the load goes into the index)."""
        dim = self.dim if dim is None else dim  # the index of the loaded collection's dimension
        with self._transaction() as conn:
            conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(hnsw_index_name(dim))))
        try:
            yield
        finally:
            self.ensure_index([dim])

    def _damage_reason(self, exc: BaseException) -> str:
        return f"{self.options.where}: {type(exc).__name__}: {str(exc).strip()[:300]}"

    # --- connections -------------------------------------------------------------------------
    # Each raises data PostgreSQL finds damaged as CatalogDamaged (503 catalog_damaged, not a 500): the
    # catalog's tables (collections, aliases, keys, jobs, audit) are what the backend reads itself; a
    # collection's own uses (PostgresGallery._contained) make it CollectionDamaged instead.
    @contextmanager
    def _catalog_contained(self) -> Iterator[None]:
        try:
            yield
        except DAMAGED_DATA as exc:
            raise CatalogDamaged(self._damage_reason(exc)) from exc

    @contextmanager
    def _damaged_as(self, name: str) -> Iterator[None]:
        """Damage met while working on collection ``name``'s rows is that collection's (CollectionDamaged)."""
        try:
            yield
        except CatalogDamaged as exc:
            raise self.damage_error(name, exc.__cause__ or exc) from exc.__cause__

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        """A connection of the write pool (on the primary)."""
        with self._catalog_contained(), self._writes.connection() as conn:
            yield conn

    @contextmanager
    def _transaction(self, committed: Callable[[psycopg.Connection], None] | None = None
                     ) -> Iterator[psycopg.Connection]:
        """A transaction on a connection of the write pool (on the primary). With standbys, the WAL
        position after its commit becomes the request's consistency token (consistency.py).
        ``committed``: run on the connection once the transaction has committed.

        Every write commits here. A connection that fails before the COMMIT is sent leaves nothing
        stored (PostgreSQL rolls the transaction back): GalleryUnavailable, which a client may retry.
        One that fails once the COMMIT is sent and before its answer came (or while reading the WAL
        position after it) leaves the write stored or not, unknowably here: WriteOutcomeUnknown,
        which nothing runs again (rerun_on_conflict reruns WriteConflict only)."""
        with self._connection() as conn:
            committing = False
            try:
                with conn.transaction():
                    yield conn
                    committing = True  # the block is done: leaving the transaction sends the COMMIT
            except psycopg.OperationalError as exc:
                # the database's own answer to the COMMIT (a deadlock's victim, a full disk) rolled it back
                if committing and not isinstance(exc, (*CONFLICTS, psycopg.errors.DiskFull)):
                    raise WriteOutcomeUnknown(f"{self.options.where}: the connection failed while the write was "
                                              f"committed: {type(exc).__name__}: {str(exc).strip()[:200]}") from exc
                raise
            if committed is not None:
                committed(conn)
            if self._standbys is not None:
                try:
                    lsn = _wal_position(conn)
                except psycopg.OperationalError as exc:
                    raise WriteOutcomeUnknown(f"{self.options.where}: the write committed; the connection failed "
                                              f"before its WAL position was read: {type(exc).__name__}: "
                                              f"{str(exc).strip()[:200]}") from exc
                consistency.note_write(lsn)

    @contextmanager
    def one_snapshot(self) -> Iterator[None]:
        """The block's reads (this thread's, of these galleries) in one REPEATABLE READ READ ONLY
        transaction on one connection of the primary's read pool, never on a standby: they see the
        database as of the block's first read, whatever other replicas commit meanwhile (an export that
        pages through a collection while they serve). Writes are not in it (they use the write pool)."""
        with self._read_connection() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            token = _snapshot.set((self, conn))
            try:
                yield
            finally:
                _snapshot.reset(token)

    def _snapshot_connection(self) -> psycopg.Connection | None:
        held = _snapshot.get()
        return held[1] if held is not None and held[0] is self else None

    @contextmanager
    def _read_connection(self) -> Iterator[psycopg.Connection]:
        """A connection of the primary's read pool (the one_snapshot() block's, in one)."""
        if (held := self._snapshot_connection()) is not None:
            with self._catalog_contained():
                yield held
            return
        with self._catalog_contained(), self._reads.connection() as conn:
            yield conn

    @contextmanager
    def _read_transaction(self) -> Iterator[psycopg.Connection]:
        with self._read_connection() as conn, conn.transaction():
            yield conn

    def _read(self, body: Callable[[psycopg.Connection], T], transaction: bool = True) -> T:
        """``body`` (reads only) on a standby in rotation that has what this request must see, else on
        the primary's read pool (standbys.py); in a transaction unless ``body`` makes its own."""
        def run(conn: psycopg.Connection) -> T:
            if not transaction:
                return body(conn)
            with conn.transaction():
                return body(conn)

        with self._catalog_contained():
            if (held := self._snapshot_connection()) is not None:
                return run(held)
            if self._standbys is None:
                with self._reads.connection() as conn:
                    return run(conn)
            return self._standbys.read(run, self._reads)

    # --- collections -------------------------------------------------------------------------
    def collection(self, name: str) -> PostgresGallery:
        """The collection's gallery. "default" always exists (no query); another name is looked up on
        the primary (one indexed read), so a collection deleted by another replica is gone here too."""
        if name == DEFAULT_COLLECTION:
            return self.default
        if not valid_collection_name(name):
            raise CollectionNotFound(name)
        with self._read_connection() as conn:
            row = conn.execute("SELECT collection_id, model_id, dim, keep_crops, identify_fpir FROM collections "
                               "WHERE name = %s", (name,)).fetchone()
        with self._lock:
            if row is None:
                self._collections.pop(name, None)
                raise CollectionNotFound(name)
            handle = self._collections.get(name)
            fresh = handle is None or handle.collection_id != int(row[0])  # deleted and created again
            if fresh:
                handle = self._collections[name] = PostgresGallery(self, name, int(row[0]), row[1], int(row[2]))
        assert handle is not None
        handle.keep_crops = bool(row[3])
        handle.identify_fpir = None if row[4] is None else float(row[4])
        if fresh:
            handle.stats()  # its counts, for the first search's plan
        return handle

    def create_collection(self, name: str, actor: Actor | None = None, keep_crops: bool = False,
                          model_id: str | None = None, dim: int | None = None,
                          retention_days: float | None = None, max_faces: int | None = None,
                          identify_fpir: float | None = None) -> CollectionInfo:
        """A collection pinned to ``model_id`` (None: the default model); the first of a new dimension
        gets that dimension's HNSW index, built before this returns."""
        settings: dict[str, Any] = {"retention_days": retention_days, "max_faces": max_faces, "identify_fpir": identify_fpir}
        if not valid_collection_name(name):
            raise ValueError(f"invalid collection name {name!r} (lower-case letters, digits, '-' and '_', "
                             "starting with a letter or digit, at most 63)")
        if keep_crops and self.crop_cipher is None:
            raise CropsUnavailable("a keep_crops collection needs the crop key (FACE_CROP_KEY_FILE)")
        model_id, dim = model_id or self.model_id, int(dim or self.dim)
        now = time.time()
        with self._transaction() as conn:
            _claim_name(conn, name)  # CollectionExists when an alias has it
            row = conn.execute(f"INSERT INTO collections(name, model_id, created_at, keep_crops, dim, "
                               f"{', '.join(COLLECTION_SETTINGS)}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
                               "ON CONFLICT (name) DO NOTHING RETURNING collection_id",
                               (name, model_id, now, keep_crops, dim, retention_days, max_faces, identify_fpir)).fetchone()
            if row is None:
                raise CollectionExists(name)
            if keep_crops and self.crop_cipher is not None:  # the first one stores the key check value
                conn.execute("INSERT INTO meta(key, value) VALUES (%s, %s) ON CONFLICT (key) DO NOTHING",
                             (CROP_KEY_CHECK_KEY, base64.b64encode(self.crop_cipher.check_value()).decode("ascii")))
            conn.execute("INSERT INTO counters(collection_id, slot) SELECT %s, generate_series(0, %s)",
                         (row[0], COUNTER_SLOTS - 1))
            _audit(conn, actor, "collection.created", now, collection=name,
                   details={"model_id": model_id, "dim": dim, "keep_crops": bool(keep_crops),
                            **{k: v for k, v in settings.items() if v is not None}})
        try:
            self.ensure_index([dim])
        except GalleryUnavailable as exc:  # the collection is stored: a retry must not be invited
            raise WriteOutcomeUnknown(f"collection {name!r} created; its index not checked: {exc}") from exc
        return CollectionInfo(name, model_id, now, 0, 0, 0, keep_crops=keep_crops, dim=dim, **settings)

    @rerun_on_conflict
    def delete_collection(self, name: str, actor: Actor | None = None) -> CollectionInfo:
        """Erase every face and identity of the collection and the collection, in one transaction
        (the rows are deleted as an identity's are: later searches never see them)."""
        if name == DEFAULT_COLLECTION:
            raise CollectionProtected(f"the collection {DEFAULT_COLLECTION!r} always exists: delete its identities instead")
        now = time.time()
        with self._damaged_as(name), self._transaction() as conn:
            row = self._fenced(conn, name, "collection_id, model_id, created_at, dim, keep_crops")
            if row is None:
                raise CollectionNotFound(name)
            collection_id = row[0]
            pointing = [r[0] for r in conn.execute("SELECT name FROM aliases WHERE collection_id = %s ORDER BY name",
                                                    (collection_id,))]
            # the row is locked: a key naming it (add_key holds it FOR KEY SHARE) is committed or waits for us
            keys = [r[0] for r in conn.execute(
                "SELECT key_id FROM api_keys WHERE %s = ANY(collections) AND revoked_at IS NULL "
                "AND (expires_at IS NULL OR expires_at > %s) ORDER BY key_id", (name, now))]
            if pointing or keys:
                raise CollectionInUse(name, pointing, keys)
            counted = int(_one(conn.execute("SELECT COALESCE(sum(counted_faces), 0) FROM counters "
                                            "WHERE collection_id = %s", (collection_id,)))[0])
            faces = conn.execute("DELETE FROM faces WHERE collection_id = %s", (collection_id,)).rowcount
            identities = conn.execute("DELETE FROM identities WHERE collection_id = %s", (collection_id,)).rowcount
            conn.execute("DELETE FROM collections WHERE collection_id = %s", (collection_id,))  # its counters go with it
            _audit(conn, actor, "collection.deleted", now, collection=name,
                   details={"identities": identities, "faces": faces})
        with self._lock:
            self._collections.pop(name, None)
        self._drop_collection_index(int(collection_id))
        return CollectionInfo(name, row[1], float(row[2]), identities, faces, counted, keep_crops=bool(row[4]),
                              dim=int(row[3]))

    def _fenced(self, conn: psycopg.Connection, name: str, columns: str) -> tuple[Any, ...] | None:
        """The named collection's ``columns``, its row locked (FOR UPDATE) and its write fence held
        exclusively to the end of the transaction; None if there is no such collection. The fence
        waits for the collection's writes in flight, on every replica (each holds the fence's shared
        side to its commit), and holds new ones back until this transaction ends: they then find what it
        made (_writing: a deleted collection is CollectionNotFound). The fence first, then the row: a
        write holding the shared side may wait for the row (its foreign key's KEY SHARE)."""
        while True:
            found = conn.execute("SELECT collection_id FROM collections WHERE name = %s", (name,)).fetchone()
            if found is None:
                return None
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (collection_lock_key(WRITE_FENCE, self.options.schema,
                                                                                  found[0]),))
            row = conn.execute(f"SELECT collection_id, {columns} FROM collections WHERE name = %s FOR UPDATE",
                               (name,)).fetchone()
            if row is None or row[0] == found[0]:
                return None if row is None else row[1:]
            # deleted and made anew under that name meanwhile: the new one's fence (the old one's is moot)

    def list_collections(self) -> list[CollectionInfo]:
        with self._read_connection() as conn:
            rows = conn.execute(COLLECTIONS_SQL.format(where="")).fetchall()
        return [_collection_info(r) for r in rows]

    def collection_info(self, name: str) -> CollectionInfo:
        with self._read_connection() as conn:
            row = conn.execute(COLLECTIONS_SQL.format(where="WHERE c.name = %s"), (name,)).fetchone()
        if row is None:
            raise CollectionNotFound(name)
        return _collection_info(row)

    @rerun_on_conflict
    def update_collection(self, name: str, changes: dict[str, Any], actor: Actor | None = None) -> CollectionInfo:
        columns = [k for k in COLLECTION_SETTINGS if k in changes]
        with self._transaction() as conn:
            # a new max_faces waits for the writes in flight (they may have read none) and holds back new
            # ones until it is in: every write after it counts against it the faces of every write before
            if "max_faces" in changes:
                row = self._fenced(conn, name, ", ".join(COLLECTION_SETTINGS))
            else:
                row = conn.execute(f"SELECT {', '.join(COLLECTION_SETTINGS)} FROM collections WHERE name = %s "
                                   "FOR UPDATE", (name,)).fetchone()
            if row is None:
                raise CollectionNotFound(name)
            details = updated_settings(_settings(row), changes)
            if details:
                conn.execute(f"UPDATE collections SET {', '.join(f'{k} = %s' for k in columns)} WHERE name = %s",
                             (*(changes[k] for k in columns), name))
                _audit(conn, actor, "collection.updated", time.time(), collection=name, details=details)
        return self.collection_info(name)

    def retentions(self) -> dict[str, float]:
        with self._read_connection() as conn:
            rows = conn.execute("SELECT name, retention_days FROM collections WHERE retention_days IS NOT NULL "
                                "ORDER BY name").fetchall()
        return {name: float(days) for name, days in rows}

    # --- keys: always read on the primary, never cached here ----------------------------------------
    def add_key(self, key: StoredKey, actor: Actor | None = None) -> None:
        with self._transaction() as conn:
            if key.collections:  # held to the commit: a delete of one waits, then finds this key (delete_collection)
                found = {r[0] for r in conn.execute("SELECT name FROM collections WHERE name = ANY(%s) FOR KEY SHARE",
                                                    (list(key.collections),))}
                for name in key.collections:
                    if name not in found:
                        raise CollectionNotFound(name)
            row = conn.execute(
                f"INSERT INTO api_keys({KEY_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (key_id) DO NOTHING RETURNING key_id",
                (key.key_id, key.secret_hash, key.role, None if key.collections is None else list(key.collections),
                 key.note, key.created_at, key.expires_at, key.revoked_at, key.last_used_at, key.rate_limit_rps,
                 key.rate_limit_faces_per_s)).fetchone()
            if row is None:
                raise KeyExists(f"a key with id {key.key_id!r} is already stored")
            _audit(conn, actor, "key.created", time.time(), details={
                "key": key.key_id, "role": key.role,
                "collections": None if key.collections is None else list(key.collections),
                "note": key.note, "expires_at": key.expires_at})

    @contextmanager
    def _key_read(self) -> Iterator[psycopg.Connection]:
        """A connection of the primary's read pool for one read of the keys, cut past its read deadline:
        the key ring reads here for requests (a key not in its cache, whether any key exists), and
        answers from its last read when this fails (keyring.py)."""
        with self._read_connection() as conn, WATCHDOG.within(conn, self.options.read_deadline_s):
            yield conn

    def list_keys(self) -> list[StoredKey]:
        with self._key_read() as conn:
            rows = conn.execute(f"SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at, key_id").fetchall()
        return [_key(r) for r in rows]

    def get_key(self, key_id: str) -> StoredKey | None:
        with self._key_read() as conn:
            row = conn.execute(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE key_id = %s", (key_id,)).fetchone()
        return None if row is None else _key(row)

    def revoke_key(self, key_id: str, actor: Actor | None = None) -> StoredKey | None:
        """Revoked at once for every replica (they read keys on the primary); a key already revoked
        keeps its first revocation time and is not audited again."""
        now = time.time()
        with self._transaction() as conn:
            row = conn.execute(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE key_id = %s FOR UPDATE", (key_id,)).fetchone()
            if row is None:
                return None
            key = _key(row)
            if key.revoked_at is not None:
                return key
            conn.execute("UPDATE api_keys SET revoked_at = %s WHERE key_id = %s", (now, key_id))
            _audit(conn, actor, "key.revoked", now, details={"key": key_id, "role": key.role})
        return replace(key, revoked_at=now)

    def touch_keys(self, used: dict[str, float]) -> None:
        if not used:
            return
        ids, times = list(used), [float(used[k]) for k in used]
        with self._connection() as conn:  # one statement: autocommit
            conn.execute("UPDATE api_keys AS k SET last_used_at = GREATEST(COALESCE(k.last_used_at, 0), u.at) "
                         "FROM unnest(%s::text[], %s::float8[]) AS u(key_id, at) WHERE k.key_id = u.key_id",
                         (ids, times))

    def has_keys(self) -> bool:
        with self._key_read() as conn:
            return bool(_one(conn.execute(
                "SELECT EXISTS (SELECT 1 FROM api_keys WHERE revoked_at IS NULL "
                "AND (expires_at IS NULL OR expires_at > %s))", (time.time(),)))[0])

    # --- audit ---------------------------------------------------------------------------------
    def audit(self, query: AuditQuery) -> list[AuditEntry]:
        """Newest first (by entry id: the order the records were written in); ``cursor`` is the last
        entry id of the previous page."""
        where: list[sql.Composable] = []
        params: list[Any] = []
        for column, value in (("collection", query.collection), ("identity_id", query.identity_id),
                              ("key_id", query.key_id)):
            if value is not None:
                where.append(sql.SQL("{} = %s").format(sql.Identifier(column)))
                params.append(value)
        if query.since is not None:
            where.append(sql.SQL("at >= %s"))
            params.append(query.since)
        if query.until is not None:
            where.append(sql.SQL("at < %s"))
            params.append(query.until)
        if query.cursor is not None:
            try:
                cursor = int(query.cursor)
            except ValueError:
                raise InvalidAuditCursor(query.cursor) from None
            if not 0 < cursor <= MAX_ROW_ID:  # an entry_id is a positive bigint
                raise InvalidAuditCursor(query.cursor)
            where.append(sql.SQL("entry_id < %s"))
            params.append(cursor)
        statement = sql.SQL(
            "SELECT entry_id, at, action, key_id, client, request_id, collection, identity_id, details FROM audit "
            "{} ORDER BY entry_id DESC LIMIT %s").format(
                sql.SQL("WHERE ") + sql.SQL(" AND ").join(where) if where else sql.SQL(""))
        with self._read_connection() as conn:
            rows = conn.execute(statement, [*params, max(0, int(query.limit))]).fetchall()
        return [AuditEntry(entry_id=str(r[0]), at=float(r[1]), action=r[2], key_id=r[3], client=r[4], request_id=r[5],
                           collection=r[6], identity_id=r[7], details=dict(r[8])) for r in rows]

    def prune_audit(self, before: float) -> int:
        with self._connection() as conn:
            return int(conn.execute("DELETE FROM audit WHERE at < %s", (before,)).rowcount)

    # --- the whole -----------------------------------------------------------------------------
    def stats(self) -> GalleryStats:
        """Counts over every collection, as the primary has them, and the primary's shared_buffers against
        the HNSW indexes (memory.py: left out when the server would not say)."""
        with self._read_connection() as conn:
            identities, faces, collections = (int(v) for v in _one(conn.execute(
                "SELECT COALESCE(sum(identities), 0), COALESCE(sum(faces), 0), count(DISTINCT collection_id) "
                "FROM counters")))
            try:
                memory = buffer_fit(conn, self.options.schema).counters()
            except psycopg.Error:
                memory = {}  # a diagnostic: the counts still answer (open() logged why)
        with self._lock:
            damaged = len(self._damaged)
        return GalleryStats(backend=self.backend, identities=identities, faces=faces, index_live=faces,
                            extra={"collections": collections, "collections_damaged": damaged, **memory})

    def read_targets(self) -> list[ReadTarget]:
        return [] if self._standbys is None else self._standbys.targets()

    # --- aliases: read on the primary (the service caches them for at most a second) -------------
    def set_alias(self, name: str, collection: str, actor: Actor | None = None) -> AliasInfo:
        """One upsert: every request after the commit reads the new target; audited in it."""
        if not valid_collection_name(name):
            raise ValueError(f"invalid alias name {name!r} (lower-case letters, digits, '-' and '_', "
                             "starting with a letter or digit, at most 63)")
        now = time.time()
        try:
            with self._transaction() as conn:
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (NAMESPACE_LOCK_KEY,))
                if conn.execute("SELECT 1 FROM collections WHERE name = %s", (name,)).fetchone():
                    raise CollectionExists(name)
                target = conn.execute("SELECT collection_id FROM collections WHERE name = %s FOR KEY SHARE",
                                      (collection,)).fetchone()
                if target is None:
                    raise CollectionNotFound(collection)
                job = conn.execute(jobs.NEWEST_MIGRATION_INTO.format(table="face_jobs", param="%s"),
                                   (collection,)).fetchone()
                if job is not None and job[1] != "done":
                    raise jobs.MigrationUnfinished(collection, job[0], job[1])
                previous = conn.execute("SELECT c.name FROM aliases a JOIN collections c USING (collection_id) "
                                        "WHERE a.name = %s", (name,)).fetchone()
                conn.execute("INSERT INTO aliases(name, collection_id, updated_at) VALUES (%s, %s, %s) "
                             "ON CONFLICT (name) DO UPDATE SET collection_id = EXCLUDED.collection_id, "
                             "updated_at = EXCLUDED.updated_at", (name, target[0], now))
                _audit(conn, actor, "alias.set", now, collection=collection, details={
                    "alias": name, "collection": collection, "previous": previous[0] if previous else None})
        except psycopg.errors.ForeignKeyViolation as exc:  # the target was deleted meanwhile
            raise CollectionNotFound(collection) from exc
        return AliasInfo(name, collection, now)

    def delete_alias(self, name: str, actor: Actor | None = None) -> AliasInfo:
        now = time.time()
        with self._transaction() as conn:
            row = conn.execute("DELETE FROM aliases a USING collections c WHERE a.name = %s "
                               "AND c.collection_id = a.collection_id RETURNING c.name, a.updated_at", (name,)).fetchone()
            if row is None:
                raise AliasNotFound(name)
            _audit(conn, actor, "alias.deleted", now, collection=row[0], details={"alias": name, "collection": row[0]})
        return AliasInfo(name, row[0], float(row[1]))

    def list_aliases(self) -> list[AliasInfo]:
        with self._read_connection() as conn:
            rows = conn.execute("SELECT a.name, c.name, a.updated_at FROM aliases a JOIN collections c "
                                "USING (collection_id) ORDER BY a.name").fetchall()
        return [AliasInfo(r[0], r[1], float(r[2])) for r in rows]

    def resolve(self, name: str) -> str:
        with self._read_connection() as conn:
            row = conn.execute("SELECT c.name FROM aliases a JOIN collections c USING (collection_id) WHERE a.name = %s "
                               "UNION ALL SELECT name FROM collections WHERE name = %s LIMIT 1", (name, name)).fetchone()
        if row is None:
            raise CollectionNotFound(name)
        return str(row[0])
    # --- kept crops ----------------------------------------------------------------------------
    def crop_key_check(self) -> bytes | None:
        with self._read_connection() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = %s", (CROP_KEY_CHECK_KEY,)).fetchone()
        return None if row is None else base64.b64decode(row[0])
    # --- jobs (face_jobs, migration 7; service/jobs/store.py) -----------------------------------
    def create_job(self, job: jobs.JobRecord) -> None:
        try:
            with self._transaction() as conn:
                conn.execute(f"INSERT INTO face_jobs({jobs.SQL_COLUMNS}) VALUES "
                             f"({', '.join(['%s'] * len(jobs.COLUMNS))})", job.row())
        except psycopg.errors.UniqueViolation as exc:
            raise jobs.JobRunning(job.collection) from exc

    def get_job(self, job_id: str) -> jobs.JobRecord | None:
        with self._read_connection() as conn:
            row = conn.execute(f"SELECT {jobs.SQL_COLUMNS} FROM face_jobs WHERE job_id = %s", (job_id,)).fetchone()
        return None if row is None else jobs.JobRecord.from_row(row)

    def list_jobs(self, collection: str | None = None, state: str | None = None,
                  limit: int = 100, kind: str | None = None) -> list[jobs.JobRecord]:
        where, args = ([] if state == "creating" else ["state != 'creating'"]), []
        if collection is not None:
            where.append('"collection" = %s')
            args.append(collection)
        if state is not None:
            where.append("state = %s")
            args.append(state)
        if kind is not None:
            where.append('"kind" = %s')
            args.append(kind)
        with self._read_connection() as conn:
            rows = conn.execute(f"SELECT {jobs.SQL_COLUMNS} FROM face_jobs WHERE {' AND '.join(where)} "
                                "ORDER BY created_at DESC, job_id DESC LIMIT %s", (*args, int(limit))).fetchall()
        return [jobs.JobRecord.from_row(r) for r in rows]

    def update_job(self, job_id: str, changes: dict, expect_state: tuple[str, ...] | None = None,
                   expect_heartbeat: float | None | bool = False, audit_as: tuple[str, Actor] | None = None,
                   expect_owner: str | None | bool = False) -> bool:
        """A conditional UPDATE: with ``expect_heartbeat`` only the replica that read that heartbeat
        wins a claim (the others change no row)."""
        values = jobs.to_db(changes)
        where: list[str] = ["job_id = %s"]
        args: list[Any] = [job_id]
        if expect_state is not None:
            where.append("state = ANY(%s)")
            args.append(list(expect_state))
        if expect_heartbeat is not False:
            where.append("heartbeat IS NOT DISTINCT FROM %s")
            args.append(expect_heartbeat)
        if expect_owner is not False:
            where.append('"owner" IS NOT DISTINCT FROM %s')
            args.append(expect_owner)
        sets = ", ".join(f'"{name}" = %s' for name in values)
        now = time.time()
        try:
            with self._transaction() as conn:
                row = conn.execute(f'UPDATE face_jobs SET {sets} WHERE {" AND ".join(where)} RETURNING "collection", "into", "kind"',
                                   (*values.values(), *args)).fetchone()
                if row is not None and audit_as is not None:
                    _audit(conn, audit_as[1], audit_as[0], now, row[0], None,
                           {"job": job_id, "kind": row[2], "into": row[1], "state": changes.get("state")})
        except psycopg.errors.UniqueViolation as exc:
            raise jobs.JobRunning(job_id) from exc
        return row is not None

    def delete_job(self, job_id: str) -> None:
        with self._transaction() as conn:
            conn.execute("DELETE FROM face_jobs WHERE job_id = %s AND state = 'creating'", (job_id,))


# a collection's counts, the faces of its dimension in the table (what its HNSW index holds: every
# collection's of that dimension), and whether the collection still exists
COUNTS_SQL = ("SELECT COALESCE(sum(identities) FILTER (WHERE collection_id = %(c)s), 0), "
              "COALESCE(sum(faces) FILTER (WHERE collection_id = %(c)s), 0), "
              "COALESCE(sum(counted_faces) FILTER (WHERE collection_id = %(c)s), 0), "
              "COALESCE(sum(faces) FILTER (WHERE collection_id IN (SELECT collection_id FROM collections WHERE dim = "
              "(SELECT dim FROM collections WHERE collection_id = %(c)s))), 0), "
              "EXISTS (SELECT 1 FROM collections WHERE collection_id = %(c)s), "
              # whether the collection has a valid HNSW index of its own (collection_index_name), here
              "EXISTS (SELECT 1 FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid WHERE x.indrelid = "
              f"'faces'::regclass AND x.indisvalid AND i.relname = '{COLLECTION_INDEX_PREFIX}' || %(c)s::bigint), "
              # its identify_fpir: the threshold of a search follows the setting as that search read it
              "(SELECT identify_fpir FROM collections WHERE collection_id = %(c)s) "
              "FROM counters")
# /identify among: each listed identity's best face for one probe (the lower face id on a tie), through
# faces_by_identity; the ranking across identities is made in Python (a few hundred rows)
AMONG_SQL = ("SELECT DISTINCT ON (identity_id) identity_id, face_id, 1 - (embedding <=> %(p)b) AS score FROM faces "
             "WHERE collection_id = %(c)s AND identity_id = ANY(%(ids)s) ORDER BY identity_id, score DESC, face_id")
# exact: the collection's faces through faces_by_identity, scored and sorted (ORDER BY the score, not
# the distance operator, so the planner cannot pick the HNSW index)
EXACT_SQL = ("SELECT face_id, identity_id, 1 - (embedding <=> %(p)b) AS score FROM faces "
             "WHERE collection_id = %(c)s ORDER BY score DESC LIMIT %(k)s")
# the index of the collection's dimension (hnsw_index_name): its cast and its predicate; {dim} filled in
HNSW_SQL = ("SELECT face_id, identity_id, 1 - (embedding <=> %(p)b) FROM faces "
            "WHERE collection_id = %(c)s AND vector_dims(embedding) = {dim} "
            "ORDER BY embedding::vector({dim}) <=> %(p)b LIMIT %(k)s")
# a collection's own index (collection_index_name): the planner uses a partial index only when the query's
# WHERE implies its predicate, so the collection id is a literal (a statement per collection); and without
# the dimension test (its faces all have its pinned dimension), with which the planner multiplied the two
# selectivities, expected a few rows and walked the shared index (bench/pg_collection_index.py)
OWN_HNSW_SQL = ("SELECT face_id, identity_id, 1 - (embedding <=> %(p)b) FROM faces WHERE collection_id = {c} "
                "ORDER BY embedding::vector({dim}) <=> %(p)b LIMIT %(k)s")
PGVECTOR_MAX_SCAN_TUPLES = 20000  # pgvector's default hnsw.max_scan_tuples
MAX_SCAN_TUPLES = 2_000_000
SHARED_EF_FACTOR = 2
# under this share of the table a collection is searched exactly whatever its size: measured at 100k
# faces (bench/collections_filtered.py), a filtered HNSW walk at a 5% share took 25x the time of the
# exact scan and still missed the exact answer for 5-10% of probes
HNSW_MIN_SHARE = 0.1


@dataclass(frozen=True)
class SearchPlan:
    """How one search scans for a collection (see PostgresGallery._plan)."""

    exact: bool
    iterative_scan: str
    ef_search: int
    max_scan_tuples: int
    own_index: bool = False  # through the collection's own HNSW index (OWN_HNSW_SQL)


def _wal_position(conn: psycopg.Connection) -> int:
    """The primary's current WAL position (``conn``: a primary's)."""
    return consistency.parse_lsn(_one(conn.execute("SELECT pg_current_wal_lsn()::text"))[0])


@contextmanager
def _reads_after(lsn: int) -> Iterator[None]:
    """The reads of the block (this thread) see ``lsn`` at least (consistency.py)."""
    token = consistency.begin(consistency.ReadAfter(required=lsn))
    try:
        yield
    finally:
        consistency.end(token)


class PostgresGallery:
    """One collection of a :class:`PostgresGalleries` (the gallery backend the API serves): its
    identities and faces are the rows with its collection id; it shares the pools and the HNSW index
    of the whole table.

    Search and the filtered-search trap: the HNSW index holds every collection's faces, and a scan
    filtered to a small collection finds few of its faces among the nearest of the whole table. So a
    collection that shares the table and has at most ``exact_search_max_faces`` faces, or less than
    HNSW_MIN_SHARE of the table, is searched exactly (its rows through ``faces_by_identity``: a few
    milliseconds at 10k faces), and a larger one by an iterative HNSW scan with ef_search and
    ``hnsw.max_scan_tuples`` widened by its share of the table. A collection alone in the table searches
    as one gallery always did. A collection that reaches ``collection_index_min_faces`` while it holds at
    most half the table gets an HNSW index of its own (a partial index of its faces, built in the
    background: PostgresGalleries.build_collection_index) and is searched through it from then on:
    2.5 ms instead of 8 ms exact for 30k faces beside 1M (bench/pg_collection_index.py).
    """

    backend = "postgres"
    # the database holds the index: nothing to load in the background
    load_state = "ready"
    load_error = None

    def __init__(self, galleries: PostgresGalleries, name: str, collection_id: int, model_id: str | None = None,
                 dim: int | None = None) -> None:
        self.galleries = galleries
        self.name = name
        self.collection_id = collection_id
        # the model the collection is pinned to (the default collection's is read when the galleries open)
        self.model_id = model_id or galleries.model_id
        self.dim = int(dim or galleries.dim)
        self.prepare_sql()
        self._identity_count = 0
        self._face_count = 0
        self._counted_faces = 0
        self._table_faces = 0  # every collection's faces: the size of the HNSW index
        self._counts_as_of = -math.inf
        self._counts_lock = threading.Lock()
        self._own_index = False  # a valid HNSW index of its own (collection_index_name), as the last counts said
        self.keep_crops = False  # the collection's setting, as PostgresGalleries.collection read it
        # likewise, and as the last search or write read it (COUNTS_SQL): the default collection's handle
        # lives as long as the service, and its threshold follows a change made on any replica
        self.identify_fpir: float | None = None

    @property
    def options(self) -> PostgresOptions:
        return self.galleries.options

    @property
    def identity_count(self) -> int:
        return self._identity_count

    @property
    def face_count(self) -> int:
        return self._face_count

    @property
    def counted_faces(self) -> int:
        return self._counted_faces

    # the collection lives as long as the PostgresGalleries that opened it
    def open(self) -> None:
        pass

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass

    def prepare_sql(self) -> None:
        """The kNN statements of this collection's dimension (the shared HNSW index's cast and predicate)
        and of its own index (its id and the cast)."""
        self.hnsw_sql = HNSW_SQL.format(dim=int(self.dim))
        self.own_sql = OWN_HNSW_SQL.format(dim=int(self.dim), c=int(self.collection_id))

    def index_built_after(self) -> AbstractContextManager[None]:
        return self.galleries.index_built_after(self.dim)

    # the collection's own uses of the pools: data PostgreSQL finds damaged (XX001 data_corrupted, XX002
    # index_corrupted: a disk fault, a bad restore), which the pools' uses raise as CatalogDamaged, is
    # CollectionDamaged, 503 collection_damaged, not a 500
    def _contained(self) -> AbstractContextManager[None]:
        return self.galleries._damaged_as(self.name)  # noqa: SLF001 - its own backend

    @contextmanager
    def _transaction(self, committed: Callable[[psycopg.Connection], None] | None = None
                     ) -> Iterator[psycopg.Connection]:
        with self._contained(), self.galleries._transaction(committed) as conn:  # noqa: SLF001 - its own backend
            yield conn

    @contextmanager
    def _read_connection(self) -> Iterator[psycopg.Connection]:
        with self._contained(), self.galleries._read_connection() as conn:  # noqa: SLF001
            yield conn

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        with self._contained(), self.galleries._connection() as conn:  # noqa: SLF001
            yield conn

    @contextmanager
    def one_snapshot(self) -> Iterator[None]:
        """The block's reads of this collection (this thread's) as of one moment (PostgresGalleries.one_snapshot)."""
        with self._contained(), self.galleries.one_snapshot():
            yield

    def _read(self, body: Callable[[psycopg.Connection], T], transaction: bool = True) -> T:
        with self._contained():
            return self.galleries._read(body, transaction)  # noqa: SLF001

    def _count(self, conn: psycopg.Connection, identities: int, faces: int, counted: int) -> None:
        """Record this write's deltas in a random counter slot of the collection (_writing reads the
        totals once the write has committed)."""
        if identities or faces or counted:
            conn.execute("UPDATE counters SET identities = identities + %s, faces = faces + %s, "
                         "counted_faces = counted_faces + %s WHERE collection_id = %s AND slot = %s",
                         (identities, faces, counted, self.collection_id, random.randrange(COUNTER_SLOTS)))

    def _counts_after_commit(self, conn: psycopg.Connection) -> None:
        """After a write's commit, on its connection: the collection's counts, with every write committed
        before this read in them. (Read inside the transaction, they missed a write on another slot that
        committed between that read and this commit: the counts kept were those of the write that
        committed last, one write short, until the next search.) The write is acknowledged whatever this
        read meets: the next search or write reads them again."""
        as_of = time.monotonic()
        try:
            row = _one(conn.execute(COUNTS_SQL, {"c": self.collection_id}))
            self._read_counts(row, as_of)
        except (psycopg.Error, GalleryUnavailable, CollectionNotFound) as exc:  # the database gone, or the collection deleted since
            log.info("counts not read after a write", extra={"collection": self.name, "error": repr(exc)})

    def _read_counts(self, row: tuple[Any, ...], as_of: float) -> None:
        """Keep the counts of a COUNTS_SQL row that shows the collection as of ``as_of`` (monotonic:
        a read's start, a write's commit) unless newer ones are kept already (a search that started
        before a write committed may end after it); CollectionNotFound if the collection is gone."""
        if not row[4] and not self._exists_on_primary():
            raise CollectionNotFound(self.name)
        with self._counts_lock:
            if as_of >= self._counts_as_of:
                self._counts_as_of = as_of
                self._identity_count, self._face_count, self._counted_faces, self._table_faces = (
                    int(v) for v in row[:4])
                self._own_index = bool(row[5])
                self.identify_fpir = None if row[6] is None else float(row[6])
        minimum = self.options.collection_index_min_faces
        # past the minimum and at most half the table (the shared index serves a bigger one well: a scan
        # widened at most twofold)
        if minimum and not self._own_index and minimum <= self._face_count <= self._table_faces // 2:
            self.galleries.build_collection_index(self.collection_id, self.dim)  # in the background, once

    def _exists_on_primary(self) -> bool:
        """Whether the collection exists, asked of the primary (a standby may not have its creation yet)."""
        if self.galleries._standbys is None:  # noqa: SLF001 - the read was on the primary already
            return False
        with self._read_connection() as conn:
            return conn.execute("SELECT 1 FROM collections WHERE collection_id = %s",
                                (self.collection_id,)).fetchone() is not None

    @contextmanager
    def _writing(self, recount: bool = True) -> Iterator[psycopg.Connection]:
        """A write transaction on the collection: a foreign key that fails because the collection was
        deleted (by this replica or another) is CollectionNotFound. ``recount``: the write may change the
        counts, which are read once it has committed (_counts_after_commit)."""
        try:
            with self._transaction(self._counts_after_commit if recount else None) as conn:
                # the shared side of the collection's write fence (write_fence, and a collection's delete or
                # new max_faces), released at commit; then whether the collection is still there (read once
                # the fence is had: a delete that held it has committed)
                with conn.pipeline():
                    conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (self.fence_key,))
                    exists = conn.execute("SELECT 1 FROM collections WHERE collection_id = %s", (self.collection_id,))
                if exists.fetchone() is None:
                    raise CollectionNotFound(self.name)
                yield conn
        except psycopg.errors.ForeignKeyViolation as exc:
            raise CollectionNotFound(self.name) from exc

    # --- writes ------------------------------------------------------------------------------
    @staticmethod
    def _vectors(embeddings: np.ndarray) -> list[np.ndarray]:
        return [np.ascontiguousarray(v, dtype=np.float32) for v in np.atleast_2d(embeddings)]

    def _insert_faces(self, conn: psycopg.Connection, identity_id: str, vectors: list[np.ndarray], now: float,
                      enrolled_at: list[float] | None = None) -> list[int]:
        """Insert the identity's faces (enrolled at ``now``, or each at its ``enrolled_at``); their face ids
        in the same order."""
        if not vectors:
            return []
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO faces(collection_id, identity_id, embedding, created_at) VALUES (%s, %s, %b, %s) "
                "RETURNING face_id",
                [(self.collection_id, identity_id, v, at) for v, at in zip(vectors, face_times(now, enrolled_at,
                                                                                                len(vectors)))],
                returning=True,
            )
            face_ids = []
            while True:
                face_ids.append(_one(cur)[0])
                if not cur.nextset():
                    break
        return face_ids

    def _insert_crops(self, conn: psycopg.Connection, face_ids: list[int], crops: list[bytes]) -> None:
        """The faces' crops, sealed to this collection and their face ids (inside the faces' transaction)."""
        cipher = self.galleries.crop_cipher
        if cipher is None:
            raise CropsUnavailable("crops given but no crop key configured (FACE_CROP_KEY_FILE)")
        if len(crops) != len(face_ids):
            raise ValueError(f"{len(crops)} crops for {len(face_ids)} faces")
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO face_crops(collection_id, face_id, blob) VALUES (%s, %s, %s)",
                            [(self.collection_id, face_id, cipher.seal(self.name, face_id, crop))
                             for face_id, crop in zip(face_ids, crops)])

    @rerun_on_conflict
    def enroll(self, identity_id: str, embeddings: np.ndarray, metadata: dict | None = None,
               replace: bool = False, max_faces: int | None = None, actor: Actor | None = None,
               crops: list[bytes] | None = None, enrolled_at: list[float] | None = None) -> EnrollResult:
        """Append (or with ``replace`` swap) faces of an identity, creating it if new; one transaction,
        its audit record included (and ``crops``, sealed). Over ``max_faces`` faces: TooManyFacesForIdentity, and the
        transaction rolls back."""
        vectors = self._vectors(embeddings)
        now = time.time()
        with self._writing() as conn:
            # the upsert creates the identity or locks its row: concurrent writers of one id queue here
            created = _one(conn.execute(
                """INSERT INTO identities AS i (collection_id, identity_id, metadata, created_at, updated_at)
                   VALUES (%(c)s, %(id)s, COALESCE(%(meta)s::text, '{}'), %(now)s, %(now)s)
                   ON CONFLICT (collection_id, identity_id) DO UPDATE
                   SET metadata = COALESCE(%(meta)s::text, i.metadata), updated_at = EXCLUDED.updated_at
                   RETURNING (xmax = 0)""",
                {"c": self.collection_id, "id": identity_id,
                 "meta": json.dumps(metadata) if metadata is not None else None, "now": now},
            ))[0]
            # the identity's row is locked: no other write to it can change its count before commit
            before = 0 if created else int(_one(conn.execute(
                "SELECT count(*) FROM faces WHERE collection_id = %s AND identity_id = %s",
                (self.collection_id, identity_id)))[0])
            kept = 0 if replace else before
            if max_faces is not None and kept + len(vectors) > max_faces:
                raise TooManyFacesForIdentity(identity_id, kept, len(vectors), max_faces)
            removed = 0
            if replace and not created:
                removed = conn.execute("DELETE FROM faces WHERE collection_id = %s AND identity_id = %s",
                                       (self.collection_id, identity_id)).rowcount
            face_ids = self._insert_faces(conn, identity_id, vectors, now, enrolled_at)
            if crops is not None:
                self._insert_crops(conn, face_ids, crops)
            # last, so that writers into a limited collection queue for the commit only, not the inserts
            self._check_room(conn, len(face_ids) - removed)
            after = before - removed + len(face_ids)
            self._count(conn, int(created), len(face_ids) - removed, counted_faces(after) - counted_faces(before))
            action = "identity.created" if created else "identity.replaced" if replace else "identity.appended"
            _audit(conn, actor, action, now, self.name, identity_id,
                   {"faces_added": len(face_ids), "faces_removed": removed, "face_count": after})
        return EnrollResult(face_ids, bool(created), removed, after)

    @rerun_on_conflict
    def import_identities(self, items: list[tuple[str, np.ndarray, dict | None]],
                          actor: Actor | None = None,
                          enrolled_at: list[list[float] | None] | None = None,
                          created_at: list[float | None] | None = None) -> list[list[int]]:
        """New identities only, all in one transaction (an audit record each); an existing id aborts
        it (IdentityExists). ``created_at``: per identity (None: now), as a gallery file keeps it."""
        now = time.time()
        flat: list[tuple[str, np.ndarray, float]] = []
        for n, (identity_id, emb, _) in enumerate(items):
            vectors = self._vectors(emb)
            times = face_times(now, None if enrolled_at is None else enrolled_at[n], len(vectors))
            flat += [(identity_id, v, at) for v, at in zip(vectors, times)]
        try:
            with self._writing() as conn:
                # COPY, not INSERTs (1M faces: ~1 min instead of ~25): face ids are taken from the
                # identity sequence first (COPY writes given values into an identity column)
                ids = [int(r[0]) for r in conn.execute(
                    "SELECT nextval(pg_get_serial_sequence('faces', 'face_id')) FROM generate_series(1, %s)",
                    (len(flat),)).fetchall()]
                with conn.cursor() as cur:
                    with cur.copy("COPY identities (collection_id, identity_id, metadata, created_at, updated_at) "
                                  "FROM STDIN") as copy:
                        # in id order: two imports of shared new ids wait for each other's rows in one
                        # order (one is refused, IdentityExists), never in two (a deadlock)
                        for n in sorted(range(len(items)), key=lambda n: items[n][0]):
                            identity_id, _, metadata = items[n]
                            copy.write_row((self.collection_id, identity_id, json.dumps(metadata or {}),
                                            identity_created_at(now, created_at, n), now))
                    with cur.copy("COPY faces (face_id, collection_id, identity_id, embedding, created_at) FROM STDIN "
                                  "WITH (FORMAT BINARY)") as copy:
                        copy.set_types(["int8", "int8", "text", "vector", "float8"])
                        for face_id, (identity_id, vector, at) in zip(ids, flat):
                            copy.write_row((face_id, self.collection_id, identity_id, vector, at))
                    if actor is not None:
                        with cur.copy("COPY audit (at, action, key_id, client, request_id, collection, identity_id, "
                                      "details) FROM STDIN") as copy:
                            for identity_id, emb, _ in items:
                                copy.write_row((now, "identity.imported", actor.key_id, actor.client, actor.request_id,
                                                self.name, identity_id,
                                                json.dumps(actor.recorded({"faces": len(np.atleast_2d(emb))}))))
                self._check_room(conn, len(flat))
                it = iter(ids)
                face_ids = [[next(it) for _ in range(len(np.atleast_2d(emb)))] for _, emb, _ in items]
                self._count(conn, len(items), len(flat), sum(counted_faces(len(ids)) for ids in face_ids))
        except psycopg.errors.UniqueViolation as exc:
            raise IdentityExists(f"an identity of the import is already enrolled: {exc.diag.message_detail}") from exc
        return face_ids

    @rerun_on_conflict
    def delete(self, identity_id: str, actor: Actor | None = None) -> int | None:
        """Erase an identity and its faces in one transaction (with its audit record); None if it is
        not enrolled."""
        now = time.time()
        faces: int | None = None
        with self._writing() as conn:
            # lock the identity first so a concurrent enroll of it waits (and then creates it anew)
            if conn.execute("SELECT 1 FROM identities WHERE collection_id = %s AND identity_id = %s FOR UPDATE",
                            (self.collection_id, identity_id)).fetchone() is not None:
                faces = conn.execute("DELETE FROM faces WHERE collection_id = %s AND identity_id = %s",
                                     (self.collection_id, identity_id)).rowcount
                conn.execute("DELETE FROM identities WHERE collection_id = %s AND identity_id = %s",
                             (self.collection_id, identity_id))
                self._count(conn, -1, -faces, -counted_faces(faces))
                _audit(conn, actor, "identity.deleted", now, self.name, identity_id, {"faces_deleted": faces})
        return faces

    # --- faces changing identity, or erased one by one (gallery hygiene) ----------------------
    # Each is one transaction with its audit record. The identity rows it touches are locked first,
    # in id order (two merges of the same pair in opposite directions cannot deadlock), so an enroll
    # into the target waits for the merge and then counts the merged faces against its max_faces.
    def _lock_identity(self, conn: psycopg.Connection, identity_id: str) -> bool:
        return conn.execute("SELECT 1 FROM identities WHERE collection_id = %s AND identity_id = %s FOR UPDATE",
                            (self.collection_id, identity_id)).fetchone() is not None

    def _faces_of(self, conn: psycopg.Connection, identity_id: str) -> int:
        return int(_one(conn.execute("SELECT count(*) FROM faces WHERE collection_id = %s AND identity_id = %s",
                                     (self.collection_id, identity_id)))[0])

    def _face_owner(self, conn: psycopg.Connection, face_id: int) -> str:
        row = conn.execute("SELECT identity_id FROM faces WHERE collection_id = %s AND face_id = %s",
                           (self.collection_id, face_id)).fetchone()
        if row is None:
            raise FaceNotFound(face_id)
        return str(row[0])

    @rerun_on_conflict
    def merge_identities(self, source_id: str, target_id: str, max_faces: int | None = None,
                         actor: Actor | None = None) -> MergeResult:
        if source_id == target_id:
            raise ValueError(f"cannot merge identity {source_id!r} into itself")
        now = time.time()
        with self._writing() as conn:
            for identity_id in sorted((source_id, target_id)):
                if not self._lock_identity(conn, identity_id):
                    raise IdentityNotFound(identity_id)
            moving, before = self._faces_of(conn, source_id), self._faces_of(conn, target_id)
            if max_faces is not None and before + moving > max_faces:
                raise TooManyFacesForIdentity(target_id, before, moving, max_faces)
            conn.execute("UPDATE faces SET identity_id = %s WHERE collection_id = %s AND identity_id = %s",
                         (target_id, self.collection_id, source_id))
            conn.execute("DELETE FROM identities WHERE collection_id = %s AND identity_id = %s",
                         (self.collection_id, source_id))
            conn.execute("UPDATE identities SET updated_at = %s WHERE collection_id = %s AND identity_id = %s",
                         (now, self.collection_id, target_id))
            after = before + moving
            self._count(conn, -1, 0, counted_faces(after) - counted_faces(before) - counted_faces(moving))
            _audit(conn, actor, "identity.merged", now, self.name, target_id,
                   {"merged_from": source_id, "faces_moved": moving, "face_count": after})
        return MergeResult(target_id, moving, after)

    @rerun_on_conflict
    def update_identity(self, identity_id: str, update: IdentityUpdate, actor: Actor | None = None) -> UpdateResult:
        now = time.time()
        with self._writing(recount=False) as conn:  # a rename keeps the counts
            # a rename holds both ids, taken in id order as moves and merges take theirs (else a move of one
            # of its faces to the new id, holding that id and waiting for the old, deadlocks with it): a
            # new id that sorts first is claimed (its row inserted, filled below) before the old is locked
            claimed = (self._claim(conn, update.new_id, "{}", now, now)
                       if update.new_id is not None and update.new_id < identity_id else None)
            row = conn.execute("SELECT metadata, created_at, updated_at FROM identities WHERE collection_id = %s "
                               "AND identity_id = %s FOR UPDATE", (self.collection_id, identity_id)).fetchone()
            if row is None:
                raise IdentityNotFound(identity_id)
            plan = plan_update(identity_id, update, row[0], row[2])
            if plan is None:  # nothing to write: the transaction changed nothing
                return UpdateResult(cast(IdentityDetails, self._details(conn, identity_id)), None, [], False)
            target = plan.target
            if plan.renamed_from is not None:
                # the new row first (the faces' foreign key needs it): taken already is IdentityExists
                if claimed is None:
                    claimed = self._claim(conn, target, json.dumps(plan.metadata), row[1], now)
                elif claimed:
                    conn.execute("UPDATE identities SET metadata = %s, created_at = %s WHERE collection_id = %s "
                                 "AND identity_id = %s", (json.dumps(plan.metadata), row[1], self.collection_id, target))
                if not claimed:
                    raise IdentityExists(f"identity {target!r} is already enrolled")
                conn.execute("UPDATE faces SET identity_id = %s WHERE collection_id = %s AND identity_id = %s",
                             (target, self.collection_id, identity_id))
                conn.execute("DELETE FROM identities WHERE collection_id = %s AND identity_id = %s",
                             (self.collection_id, identity_id))
            else:
                conn.execute("UPDATE identities SET metadata = %s, updated_at = %s WHERE collection_id = %s "
                             "AND identity_id = %s", (json.dumps(plan.metadata), now, self.collection_id, identity_id))
            result = plan.result(cast(IdentityDetails, self._details(conn, target)))
            _audit(conn, actor, "identity.updated", now, self.name, target, result.audit_details())
        return result

    def _claim(self, conn: psycopg.Connection, identity_id: str, metadata: str, created_at: float, now: float) -> bool:
        """Insert the identity's row; False if it is enrolled already (nothing inserted)."""
        return conn.execute(
            "INSERT INTO identities (collection_id, identity_id, metadata, created_at, updated_at) "
            "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (collection_id, identity_id) DO NOTHING RETURNING 1",
            (self.collection_id, identity_id, metadata, created_at, now)).fetchone() is not None

    @rerun_on_conflict
    def move_face(self, face_id: int, target_id: str, max_faces: int | None = None,
                  actor: Actor | None = None) -> MoveResult:
        now = time.time()
        with self._writing() as conn:
            source_id, created = self._lock_move(conn, face_id, target_id, now)
            source_before, target_before = self._faces_of(conn, source_id), self._faces_of(conn, target_id)
            if max_faces is not None and target_before + 1 > max_faces:
                raise TooManyFacesForIdentity(target_id, target_before, 1, max_faces)
            conn.execute("UPDATE faces SET identity_id = %s WHERE collection_id = %s AND face_id = %s",
                         (target_id, self.collection_id, face_id))
            source_deleted = source_before == 1
            if source_deleted:
                conn.execute("DELETE FROM identities WHERE collection_id = %s AND identity_id = %s",
                             (self.collection_id, source_id))
            else:
                conn.execute("UPDATE identities SET updated_at = %s WHERE collection_id = %s AND identity_id = %s",
                             (now, self.collection_id, source_id))
            self._count(conn, int(created) - int(source_deleted), 0,
                                 counted_faces(source_before - 1) - counted_faces(source_before)
                                 + counted_faces(target_before + 1) - counted_faces(target_before))
            _audit(conn, actor, "face.moved", now, self.name, target_id,
                   {"face_id": face_id, "from": source_id, "to": target_id, "target_created": created,
                    "source_deleted": source_deleted, "face_count": target_before + 1})
        return MoveResult(face_id, source_id, target_id, created, source_deleted)

    def _lock_move(self, conn: psycopg.Connection, face_id: int, target_id: str, now: float) -> tuple[str, bool]:
        """Lock the face's owner and the target (made if missing, as enroll does), in id order; the owner
        and whether the target was made. The owner is read, then locked, then read again: a face moved
        meanwhile, or an owner deleted while the lock waited (and perhaps made anew: not that statement's
        to lock, as _lock_owners says), rolls the savepoint back, which releases those locks, and the
        round starts over."""
        while True:
            try:
                with conn.transaction():  # a savepoint
                    source_id = self._face_owner(conn, face_id)
                    if source_id == target_id:
                        raise ValueError(f"face {face_id} already belongs to identity {target_id!r}")
                    created = source_locked = False
                    for identity_id in sorted((source_id, target_id)):
                        if identity_id == target_id:  # created if missing, locked either way
                            created = bool(_one(conn.execute(
                                """INSERT INTO identities AS i (collection_id, identity_id, metadata, created_at,
                                   updated_at) VALUES (%(c)s, %(id)s, '{}', %(now)s, %(now)s)
                                   ON CONFLICT (collection_id, identity_id) DO UPDATE SET updated_at = EXCLUDED.updated_at
                                   RETURNING (xmax = 0)""", {"c": self.collection_id, "id": target_id, "now": now}))[0])
                        else:
                            source_locked = self._lock_identity(conn, source_id)
                    if not source_locked or self._face_owner(conn, face_id) != source_id:
                        raise _OwnersMoved
                return source_id, created
            except _OwnersMoved:
                continue

    def _lock_owners(self, conn: psycopg.Connection, face_ids: list[int]) -> dict[int, str]:
        """face id -> identity id of those of ``face_ids`` that exist, with every such identity locked. The
        identities are locked in one statement in id order (as merges lock theirs: no deadlock), then the
        owners read again; a face whose owner the lock did not return rolls the savepoint back, which
        releases those locks, and the round starts over. Such a face moved to another identity meanwhile,
        or its identity was deleted while the lock waited for it and made anew since under the same id:
        the lock skips a deleted row, and the new one is not that statement's to see. (Taken as locked by
        its id, that identity's faces would be erased unlocked: its count read stale, then the identity
        deleted as emptied with the faces moved into it meanwhile, ON DELETE CASCADE.)"""
        def owners() -> dict[int, str]:
            return {int(f): str(i) for f, i in conn.execute(
                "SELECT face_id, identity_id FROM faces WHERE collection_id = %s AND face_id = ANY(%s)",
                (self.collection_id, face_ids)).fetchall()}

        while True:
            try:
                with conn.transaction():  # a savepoint
                    locked = {str(r[0]) for r in conn.execute(
                        "SELECT identity_id FROM identities WHERE collection_id = %s "
                        "AND identity_id = ANY(%s) ORDER BY identity_id FOR UPDATE",
                        (self.collection_id, sorted(set(owners().values())))).fetchall()}
                    now_found = owners()  # faces deleted meanwhile are simply gone
                    if not set(now_found.values()) <= locked:
                        raise _OwnersMoved
                return now_found
            except _OwnersMoved:
                continue

    @rerun_on_conflict
    def delete_faces(self, face_ids: list[int], actor: Actor | None = None) -> FacesDeleted:
        now = time.time()
        asked = sorted({int(f) for f in face_ids})
        with self._writing() as conn:
            owners = self._lock_owners(conn, asked)
            counts = {str(i): int(n) for i, n in conn.execute(
                "SELECT identity_id, count(*) FROM faces WHERE collection_id = %s AND identity_id = ANY(%s) "
                "GROUP BY identity_id", (self.collection_id, sorted(set(owners.values())))).fetchall()}
            erased: list[tuple[int, str, int]] = []
            for face_id in sorted(owners):
                before = counts[owners[face_id]]
                counts[owners[face_id]] = before - 1
                erased.append((face_id, owners[face_id], before))
            if erased:
                conn.execute("DELETE FROM faces WHERE collection_id = %s AND face_id = ANY(%s)",
                             (self.collection_id, sorted(owners)))
                emptied = sorted(i for i, n in counts.items() if n == 0)
                conn.execute("DELETE FROM identities WHERE collection_id = %s AND identity_id = ANY(%s)",
                             (self.collection_id, emptied))
                conn.execute("UPDATE identities SET updated_at = %s WHERE collection_id = %s AND identity_id = ANY(%s)",
                             (now, self.collection_id, sorted(i for i, n in counts.items() if n > 0)))
                changes = count_changes(erased).values()
                self._count(conn, -len(emptied), -len(erased),
                            sum(counted_faces(after) - counted_faces(before) for before, after in changes))
                _audit_each(conn, actor, "face.deleted", now, self.name, [
                    (identity, {"face_id": face_id, "face_count": before - 1, "identity_deleted": before == 1})
                    for face_id, identity, before in erased])
        return FacesDeleted(deletions(erased), [f for f in asked if f not in owners])

    # --- reads -------------------------------------------------------------------------------
    def _plan(self, k: int, ef_search: int | None = None) -> SearchPlan:
        """How to find k nearest faces, from the counts of this replica's last search or write (this
        search reads them again in the same round trip as its kNN)."""
        shared = self._face_count < self._table_faces  # other collections' faces are in the index too
        if shared and self._own_index:  # an index of its own: searched as a gallery alone in its table
            ef = search_ef(self.options.hnsw_ef_search if ef_search is None else ef_search, self._face_count, k)
            return SearchPlan(False, self.options.iterative_scan, min(MAX_EF_SEARCH, ef), PGVECTOR_MAX_SCAN_TUPLES,
                              own_index=True)
        if shared and (self._face_count <= self.options.exact_search_max_faces
                       or self._face_count < HNSW_MIN_SHARE * self._table_faces):
            return SearchPlan(True, "off", 0, PGVECTOR_MAX_SCAN_TUPLES)
        scan = self.options.iterative_scan
        tuples = PGVECTOR_MAX_SCAN_TUPLES
        if shared:
            # a filtered scan passes about k * table / collection tuples before it has k of them:
            # iterative (never "off"), and allowed 4 times that
            scan = "relaxed_order" if scan == "off" else scan
            tuples = min(MAX_SCAN_TUPLES, max(tuples, math.ceil(4 * k * self._table_faces / max(1, self._face_count))))
        # without iterative scans an HNSW scan returns at most ef_search rows, so at least k; "auto"
        # widens with the index (ef.py), which holds the whole table
        # (``ef_search``: the caller's breadth instead of the setting, as a hygiene scan asks)
        ef = search_ef(self.options.hnsw_ef_search if ef_search is None else ef_search, self._table_faces, k)
        if shared:  # the first batch of the walk holds about SHARED_EF_FACTOR * k faces of the collection
            ef = max(ef, math.ceil(SHARED_EF_FACTOR * k * self._table_faces / max(1, self._face_count)))
        return SearchPlan(False, scan, min(MAX_EF_SEARCH, ef), tuples)

    def _nearest(self, conn: psycopg.Connection, probes: np.ndarray, k: int,
                 ef: int | None = None) -> list[list[Hit]]:
        """Up to k nearest faces of each probe, in one round trip: a pipeline that sets the scan mode
        and ef, reads the counts and runs one kNN per probe, ended by one Sync, so it is one implicit
        transaction (the connection is in autocommit) and set_config(.., true) lasts for exactly it.
        (``conn.transaction()`` here would cost three more round trips: psycopg syncs after BEGIN and
        before and after COMMIT.) The results are read once they have all come back."""
        plan = self._plan(k, ef)
        as_of = time.monotonic()
        with conn.pipeline():
            counts = conn.execute(
                "SELECT set_config('hnsw.iterative_scan', %(scan)s, true), set_config('hnsw.ef_search', %(ef)s, true), "
                "set_config('hnsw.max_scan_tuples', %(tuples)s, true), k.* FROM (" + COUNTS_SQL + ") AS k",
                {"scan": plan.iterative_scan, "ef": str(max(1, plan.ef_search)), "tuples": str(plan.max_scan_tuples),
                 "c": self.collection_id})
            statement = EXACT_SQL if plan.exact else self.own_sql if plan.own_index else self.hnsw_sql
            scans = [conn.execute(statement, {"p": probe, "c": self.collection_id, "k": k}) for probe in probes]
        self._read_counts(_one(counts)[3:], as_of)
        return [[(int(f), i, float(s)) for f, i, s in scan.fetchall()] for scan in scans]

    def search(self, probes: np.ndarray, top_k: int, ef: int | None = None) -> list[list[Match]]:
        """For each probe, up to top_k identities of this collection, best first, scored max-over-faces
        (search.py). One round trip for all probes; a probe whose nearest faces belong to too few
        identities widens in another (rare). ``ef``: hnsw.ef_search for this search (SET LOCAL, as
        always) instead of the setting."""
        vectors = np.ascontiguousarray(np.atleast_2d(probes), dtype=np.float32)
        return self._read(
            lambda conn: search_identities(lambda p, k: self._nearest(conn, p, k, ef), vectors, top_k),
            transaction=False)

    def identity_embeddings(self, identity_id: str) -> np.ndarray | None:
        def body(conn: psycopg.Connection) -> list[tuple[Any, ...]] | None:
            if conn.execute("SELECT 1 FROM identities WHERE collection_id = %s AND identity_id = %s",
                            (self.collection_id, identity_id)).fetchone() is None:
                return None
            return conn.execute("SELECT embedding FROM faces WHERE collection_id = %s AND identity_id = %s "
                                "ORDER BY face_id", (self.collection_id, identity_id)).fetchall()

        rows = self._read(body)
        if rows is None:
            return None
        if not rows:
            return np.zeros((0, 0), np.float32)
        return np.stack([_as_array(r[0]) for r in rows])

    def get_identity(self, identity_id: str) -> IdentityDetails | None:
        return self._read(lambda conn: self._details(conn, identity_id))

    def _details(self, conn: psycopg.Connection, identity_id: str) -> IdentityDetails | None:
        row = conn.execute("SELECT identity_id, metadata, created_at, updated_at FROM identities "
                           "WHERE collection_id = %s AND identity_id = %s", (self.collection_id, identity_id)).fetchone()
        if row is None:
            return None
        faces = conn.execute("SELECT face_id, created_at FROM faces WHERE collection_id = %s AND identity_id = %s "
                             "ORDER BY face_id", (self.collection_id, identity_id)).fetchall()
        record = IdentityRecord(row[0], json.loads(row[1]), len(faces), row[2], row[3])
        return IdentityDetails(record, [FaceRecord(int(f), float(t)) for f, t in faces])

    def list_identities(self, limit: int, after: str | None, prefix: str | None = None) -> list[IdentityRecord]:
        """Keyset pagination by identity id: stable under concurrent inserts and deletes; ``prefix``: a
        range of the primary key (identity_ids.id_range), as a page without one."""
        low, inclusive, high = id_range(None if after is None else _before_nul(after),
                                        None if prefix is None else _before_nul(prefix))
        rows = self._read(lambda conn: conn.execute(
            "SELECT i.identity_id, i.metadata, i.created_at, i.updated_at, "
            "(SELECT count(*) FROM faces f WHERE f.collection_id = i.collection_id AND f.identity_id = i.identity_id) "
            f"FROM identities i WHERE i.collection_id = %s AND i.identity_id {'>=' if inclusive else '>'} %s"
            f"{'' if high is None else ' AND i.identity_id < %s'} ORDER BY i.identity_id LIMIT %s",
            (self.collection_id, low, *(() if high is None else (high,)), limit),
        ).fetchall())
        return [IdentityRecord(r[0], json.loads(r[1]), int(r[4]), r[2], r[3]) for r in rows]

    def stats(self) -> GalleryStats:
        """Counts as the primary has them (/readyz and /metrics follow the primary, which writes need)."""
        as_of = time.monotonic()
        with self._read_connection() as conn:
            self._read_counts(_one(conn.execute(COUNTS_SQL, {"c": self.collection_id})), as_of)
        return GalleryStats(backend=self.backend, identities=self._identity_count, faces=self._face_count,
                            index_live=self._face_count)

    def read_targets(self) -> list[ReadTarget]:
        return self.galleries.read_targets()

    # --- retention ---------------------------------------------------------------------------
    def expired_faces(self, enrolled_before: float, limit: int) -> list[int]:
        with self._read_connection() as conn:  # the primary: what the sweep erases next (faces_by_age)
            rows = conn.execute("SELECT face_id FROM faces WHERE collection_id = %s AND created_at < %s "
                                "ORDER BY created_at, face_id LIMIT %s",
                                (self.collection_id, float(enrolled_before), int(limit))).fetchall()
        return [int(r[0]) for r in rows]

    def oldest_enrollment(self) -> float | None:
        with self._read_connection() as conn:  # the primary, by faces_by_age
            row = conn.execute("SELECT min(created_at) FROM faces WHERE collection_id = %s",
                               (self.collection_id,)).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    # --- kept crops ----------------------------------------------------------------------------
    def face_crop(self, face_id: int) -> bytes | None:
        row = self._read(lambda conn: conn.execute(
            "SELECT blob FROM face_crops WHERE collection_id = %s AND face_id = %s",
            (self.collection_id, int(face_id))).fetchone())
        return None if row is None else bytes(row[0])

    def iter_crops(self, after_face_id: int = 0, limit: int = 256) -> list[tuple[int, str, bytes]]:
        rows = self._read(lambda conn: conn.execute(
            "SELECT c.face_id, f.identity_id, c.blob FROM face_crops c JOIN faces f USING (face_id) "
            "WHERE c.collection_id = %s AND c.face_id > %s ORDER BY c.face_id LIMIT %s",
            (self.collection_id, int(after_face_id), int(limit))).fetchall())
        return [(int(r[0]), r[1], bytes(r[2])) for r in rows]

    def crop_count(self) -> int:
        row = self._read(lambda conn: _one(conn.execute(
            "SELECT count(*) FROM face_crops WHERE collection_id = %s", (self.collection_id,))))
        return int(row[0])
    def face_embeddings(self, face_ids: list[int]) -> dict[int, tuple[str, np.ndarray]]:
        """face id -> (identity id, embedding) for the given ids of this collection (others absent)."""
        ids = sorted({int(i) for i in face_ids})
        if not ids:
            return {}
        rows = self._read(lambda conn: conn.execute(
            "SELECT face_id, identity_id, embedding FROM faces WHERE collection_id = %s AND face_id = ANY(%s)",
            (self.collection_id, ids)).fetchall(), transaction=False)
        return {int(f): (i, _as_array(e)) for f, i, e in rows}

    def iter_faces(self, batch: int = 4096) -> Iterator[tuple[list[int], list[str], np.ndarray]]:
        """Every face of the collection, ordered by identity id then face id, in keyset pages (each page
        its own read: a scan is advisory, not one snapshot)."""
        after: tuple[str, int] = ("", -1)
        while True:
            rows = self._read(partial(self._faces_page, after=after, batch=batch), transaction=False)
            if not rows:
                return
            yield [int(r[0]) for r in rows], [r[1] for r in rows], np.stack([_as_array(r[2]) for r in rows])
            after = (rows[-1][1], int(rows[-1][0]))

    def _faces_page(self, conn: psycopg.Connection, after: tuple[str, int], batch: int) -> list[tuple[Any, ...]]:
        # identity_id >= ... walks faces_by_identity (collection_id, identity_id) from the last identity;
        # the face order within an identity is an incremental sort of its few rows
        return conn.execute(
            "SELECT face_id, identity_id, embedding FROM faces WHERE collection_id = %(c)s AND identity_id >= %(i)s "
            "AND (identity_id > %(i)s OR face_id > %(f)s) ORDER BY identity_id, face_id LIMIT %(n)s",
            {"c": self.collection_id, "i": after[0], "f": after[1], "n": batch}).fetchall()

    def _check_room(self, conn: psycopg.Connection, adding: int) -> None:
        """A write that adds ``adding`` faces net, called in its transaction after its rows are written and
        before its counters are: with a max_faces, it takes the collection's quota lock (writes that add
        faces to it queue there, on every replica, until their commit) and sums the counters, which then
        hold every other adding write's faces (committed: each held the lock to its commit) and none of
        this one's; over the limit: TooManyFacesForCollection (the transaction rolls back). Taken last, the
        lock covers the counters, the audit row and the commit, not the inserts (the HNSW index's). A
        write adding no net face never waits. Deadlock-free: a writer waiting here holds no counters row,
        and the holder needs no lock a waiter has (its identity rows are its own, taken before)."""
        if adding <= 0:
            return
        row = conn.execute("SELECT max_faces FROM collections WHERE collection_id = %s", (self.collection_id,)).fetchone()
        if row is None or row[0] is None:
            return
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._lock_key("face-quota"),))
        faces = int(_one(conn.execute("SELECT COALESCE(sum(faces), 0) FROM counters WHERE collection_id = %s",
                                      (self.collection_id,)))[0])
        if faces + adding > int(row[0]):
            raise TooManyFacesForCollection(self.name, faces, adding, int(row[0]))

    def _lock_key(self, kind: str) -> int:
        return collection_lock_key(kind, self.options.schema, self.collection_id)

    @property
    def fence_key(self) -> int:
        """The advisory lock of the collection's write fence."""
        return self._lock_key(WRITE_FENCE)

    @contextmanager
    def write_fence(self) -> Iterator[None]:
        """The exclusive side of the write fence (api.GalleryBackend.write_fence): a session advisory
        lock on a write-pool connection (autocommit), held for the block. Writes on every replica take
        the shared side in their transaction (``_writing``), so it waits for those in flight, and
        PostgreSQL queues a new shared request behind the waiting exclusive one (no starvation).
        With standbys, the block's reads must see every write committed before the lock was had: they
        go to a standby that has replayed the primary's WAL position of that moment, else the primary
        (consistency.py), never to one that lags."""
        with self._connection() as conn:
            conn.execute("SELECT pg_advisory_lock(%s)", (self.fence_key,))
            try:
                with self._floor_from(conn):
                    yield
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (self.fence_key,))

    @contextmanager
    def read_floor(self) -> Iterator[None]:
        """api.GalleryBackend.read_floor: with standbys, the primary's WAL position now is the floor of
        the block's reads (and its writes raise it: consistency.note_write), as in ``write_fence``; the
        connection that read it is back in its pool before the block."""
        if self.galleries._standbys is None:  # noqa: SLF001
            yield
            return
        with self._connection() as conn:
            lsn = _wal_position(conn)
        with _reads_after(lsn):
            yield

    @contextmanager
    def _floor_from(self, conn: psycopg.Connection) -> Iterator[None]:
        """With standbys: reads in the block see the primary's WAL position as read on ``conn`` now."""
        if self.galleries._standbys is None:  # noqa: SLF001
            yield
            return
        with _reads_after(_wal_position(conn)):
            yield

    def identity_crops(self, identity_ids: list[str]) -> dict[str, list[tuple[int, bytes | None, float]]]:
        """identity id -> [(face id, sealed crop or None, enrolled at)] in face-id order: one query for all of them
        (faces_by_identity, then the crops' primary key), on the primary's reads or a standby that has
        what this request must see; one statement, so each identity's faces and crops are one snapshot."""
        rows = self._read(lambda conn: conn.execute(
            "SELECT f.identity_id, f.face_id, c.blob, f.created_at FROM faces f LEFT JOIN face_crops c "
            "ON c.collection_id = f.collection_id AND c.face_id = f.face_id "
            "WHERE f.collection_id = %s AND f.identity_id = ANY(%s) ORDER BY f.identity_id, f.face_id",
            (self.collection_id, sorted(set(identity_ids)))).fetchall(), transaction=False)
        out: dict[str, list[tuple[int, bytes | None, float]]] = {}
        for identity_id, face_id, blob, created_at in rows:
            out.setdefault(identity_id, []).append((int(face_id), None if blob is None else bytes(blob),
                                                    float(created_at)))
        return out

    def search_among(self, probes: np.ndarray, identity_ids: list[str], top_k: int) -> Among:
        """Scored in SQL (AMONG_SQL: each identity's best face, through faces_by_identity), so only
        (identity, face, score) rows come back, never vectors; one pipeline, one snapshot, with the
        collection's counts read as a search reads them (its identify_fpir included)."""
        vectors = np.ascontiguousarray(np.atleast_2d(probes), dtype=np.float32)
        ids = sorted(set(identity_ids))

        def body(conn: psycopg.Connection) -> tuple[list[tuple[Any, ...]], list[list[tuple[Any, ...]]]]:
            as_of = time.monotonic()
            with conn.pipeline():
                counts = conn.execute(COUNTS_SQL, {"c": self.collection_id})
                sizes = conn.execute("SELECT identity_id, count(*) FROM faces WHERE collection_id = %s "
                                     "AND identity_id = ANY(%s) GROUP BY identity_id", (self.collection_id, ids))
                scans = [conn.execute(AMONG_SQL, {"p": probe, "c": self.collection_id, "ids": ids})
                         for probe in vectors if len(probe)]
            self._read_counts(_one(counts), as_of)
            return sizes.fetchall(), [scan.fetchall() for scan in scans]

        sizes, scans = self._read(body, transaction=False)
        matches = [sorted((Match(str(i), float(score), int(f)) for i, f, score in rows),
                          key=lambda m: (-m.score, m.face_id))[:top_k] for rows in scans]
        return Among(matches, {str(i): int(n) for i, n in sizes})


def _before_nul(cursor: str) -> str:
    """PostgreSQL text cannot hold NUL. No identity id contains one (the API refuses control
    characters), so the ids after "a\0..." are exactly the ids after "a"."""
    return cursor.split("\x00", 1)[0]


def _one(cursor: psycopg.Cursor[Any]) -> tuple[Any, ...]:
    """The row of a query that always returns one (an aggregate, RETURNING); psycopg types it optional."""
    row = cursor.fetchone()
    if row is None:
        raise RuntimeError("the query returned no row")
    return row


def _as_array(value: object) -> np.ndarray:
    return value.to_numpy() if isinstance(value, Vector) else np.asarray(value, dtype=np.float32)
