"""The gallery backend interface, its typed results, and the semantics shared by every backend.

Two backends implement :class:`GalleryBackend`:

* **embedded** (``FACE_DATABASE_URL`` unset, the default): the SQLite store + hnswlib index in the
  data dir (:class:`service.gallery.embedded.gallery.Gallery`), adapted by :class:`EmbeddedGallery`.
* **postgres** (``FACE_DATABASE_URL`` set): PostgreSQL holds identities, faces and embeddings, and
  pgvector's HNSW index in the same database finds nearest faces (:mod:`service.gallery.postgres.backend`).
  Replicas keep no gallery rows in memory, so many of them can serve one database.

What every backend means by the same call (the contract the shared tests check on both):

* ``enroll(id, faces, metadata, replace, max_faces)``: one atomic write. A new id is created; for an
  existing id the faces are appended (``replace=False``) or replace all its faces (``replace=True``);
  given ``metadata`` replaces the stored metadata, ``None`` keeps it. Acknowledged = committed
  (durable). If the identity would then hold more than ``max_faces`` faces, counted inside the
  write (concurrent appends cannot overshoot), nothing is written: :class:`TooManyFacesForIdentity`.
* ``counted_faces``: the sum over identities of min(faces, ``FACES_COUNTED_PER_IDENTITY``), kept as
  cheaply and as consistently as ``face_count``: it sizes the open-set threshold (calibration.py).
* ``import_identities(items)``: all new ids in one transaction; an existing id aborts it all
  (:class:`IdentityExists`).
* ``delete(id)``: the identity and its faces are erased; no search that starts after the call
  returns can return them. ``delete_faces(face_ids)`` erases faces with the same guarantee, in one
  transaction.
* ``merge_identities``/``move_face``: faces change identity in one transaction, keeping their ids
  and vectors (nothing is re-embedded or re-indexed); an identity left without faces is deleted.
  ``update_identity`` renames an identity the same way and/or sets its metadata.
* ``search(probes, top_k)``: per probe, up to ``top_k`` identities, best first, each scored by its
  best face (max-over-faces), with oversampling so that an identity with many faces cannot crowd
  the others out (:func:`search_identities`).
* Kept crops (a ``keep_crops`` collection, crops.py): ``enroll(..., crops=)`` seals one encoded crop per
  face inside the faces' transaction (bound to collection + face id); a face's crop goes in the same
  transaction as the face (delete, replace, the collection's delete), with the same erasure
  guarantee as its vector; ``face_crop`` / ``iter_crops`` return sealed blobs, never plaintext.
* The gallery belongs to one model: opening it with another model id or dimension raises
  :class:`GalleryModelMismatch` (:func:`check_model`). Each collection is pinned to its model (the one
  it was created with: ``GalleryBackend.model_id``/``dim``, ``CollectionInfo.model_id``/``dim``);
  ``Galleries.model_id``/``dim`` are the default model's, for collections created without one.

Collections (:class:`Galleries`, what a backend opens): a backend holds named collections, each a
gallery of its own behind :class:`GalleryBackend` (``galleries.collection(name)``). Identity ids are
unique per collection; a search in one never returns another's faces; each has its own counts (the
open-set threshold follows them). ``default`` always exists and cannot be deleted. Deleting a
collection erases it as deleting each of its identities would (nothing left in any file, snapshot or
table). Keys (:class:`StoredKey`, hashes only) and the audit trail (:class:`AuditEntry`) live in the
same database: every change made through a backend with an :class:`Actor` writes its audit record
in the transaction of the change itself, so an acknowledged change always has its record.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from .results import (
    Among,
    EnrollResult,
    FaceNotFound,
    FaceRecord,
    FacesDeleted,
    IdentityChanged,
    IdentityDetails,
    IdentityNotFound,
    IdentityRecord,
    IdentityUpdate,
    MergeResult,
    MoveResult,
    TooManyFacesForCollection,
    TooManyFacesForIdentity,
    UpdateResult,
)
from .search import GalleryModelMismatch, Match, check_model, group_by_identity, search_identities

if TYPE_CHECKING:
    from ..jobs.store import JobRecord
    from .crops import CropCipher

log = logging.getLogger(__name__)

__all__ = [
    "COLLECTION_NAME_PATTERN", "COLLECTION_SETTINGS", "DEFAULT_COLLECTION", "Actor", "updated_settings",
    "AliasInfo", "AliasNotFound", "CollectionInUse", "AuditEntry", "AuditQuery", "CollectionExists",
    "CollectionInfo", "CollectionNotFound", "CollectionProtected", "Galleries", "KeyExists", "StoredKey",
    "valid_collection_name",
    "EnrollResult", "FaceRecord", "GalleryBackend", "GalleryBusy", "WriteConflict", "GalleryModelMismatch", "GalleryStats",
    "GalleryUnavailable", "WriteOutcomeUnknown", "StorageFull",
    "IdentityDetails", "IdentityExists", "IdentityRecord", "Match", "ReadTarget",
    "TooManyFacesForCollection", "TooManyFacesForIdentity", "check_model", "group_by_identity", "search_identities",
    "FaceNotFound", "IdentityChanged", "IdentityNotFound", "IdentityUpdate", "MergeResult", "MoveResult", "UpdateResult",
]


class GalleryUnavailable(RuntimeError):
    """The gallery's database cannot be reached now, and nothing of the request's writes was stored (a
    transaction whose connection fails before its COMMIT is rolled back): it may be retried later."""


class WriteOutcomeUnknown(GalleryUnavailable):
    """A write's connection to the database failed while its COMMIT was in flight, or once it had
    committed but before the request could be answered: the database may have stored it or not, and
    this replica cannot tell. Never run again here (running it again could store it twice: an enroll
    appends); the API answers 503 ``write_outcome_unknown``, and the client reads the write back."""


class GalleryBusy(GalleryUnavailable):
    """The database answers, but every connection this replica may open to it is in use (slow writes,
    a burst): the request may be retried shortly (the API answers 503 ``overloaded``)."""


class WriteConflict(GalleryBusy):
    """The database aborted a write to break a deadlock with concurrent writes (or as a serialization
    failure): nothing of it was stored. The backend runs it again a few times; past those, the API
    answers 503 ``overloaded`` (retry shortly)."""


class StorageFull(RuntimeError):
    """The gallery's disk is full (the data dir's, or the database's): nothing of the write was stored,
    what was stored before is intact, and the write may be retried once space is freed."""


class CollectionDamaged(RuntimeError):
    """A collection whose stored data cannot be read: its embedded store is a file SQLite finds damaged,
    or no database (a bad restore, a partial copy, a disk fault). Its requests are answered 503
    ``collection_damaged`` and nothing is written to it; the other collections serve on. The operator
    restores its files from a backup, or deletes the collection. ``reason`` names the file: for the log,
    never for a client."""

    def __init__(self, collection: str, reason: str) -> None:
        super().__init__(f"collection {collection!r} cannot be read: {reason}")
        self.collection = collection
        self.reason = reason


class CatalogDamaged(RuntimeError):
    """The catalog (the collections, aliases and keys, and the audit of their changes) cannot be read
    where a request needs it: its embedded file is one SQLite finds damaged, or PostgreSQL finds those
    tables' data damaged (a disk fault, a bad restore). Answered 503 ``catalog_damaged``; what needs no
    catalog read (the FACE_API_KEY admin, a key read before, the collections' own data) serves on. The
    message names the file or relation: for the log (a start-up refusal, a command's error), never for
    a client."""


class IdentityExists(ValueError):
    """An import, or a rename, named an identity that is already enrolled (nothing was written)."""


# --- collections, keys, audit --------------------------------------------------------------------

DEFAULT_COLLECTION = "default"
# lower-case letters, digits, '-' and '_', starting with a letter or digit: safe as a URL segment, a
# directory name and a SQL value alike
COLLECTION_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
_COLLECTION_NAME = re.compile(COLLECTION_NAME_PATTERN)


def face_times(now: float, enrolled_at: list[float] | None, faces: int) -> list[float]:
    """Each new face's enrollment time: ``now``, or the one given per face (a migration keeps the
    source's); a count that does not match is the caller's bug, refused before anything is written."""
    if enrolled_at is None:
        return [now] * faces
    if len(enrolled_at) != faces:
        raise ValueError(f"{len(enrolled_at)} enrollment times for {faces} faces")
    return [float(t) for t in enrolled_at]


def identity_created_at(now: float, created_at: list[float | None] | None, n: int) -> float:
    """The ``n``-th imported identity's created_at: the one given (a gallery file keeps it), else ``now``."""
    given = None if created_at is None else created_at[n]
    return now if given is None else float(given)


def valid_collection_name(name: str) -> bool:
    return bool(_COLLECTION_NAME.fullmatch(name))


class CollectionNotFound(LookupError):
    """No collection of that name (never created, or deleted)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no collection named {name!r}")
        self.name = name


class CollectionExists(ValueError):
    """A collection of that name already exists."""

    def __init__(self, name: str) -> None:
        super().__init__(f"a collection named {name!r} already exists")
        self.name = name


class CollectionProtected(ValueError):
    """The ``default`` collection always exists: it cannot be deleted (empty it instead)."""


class KeyExists(ValueError):
    """A key with that id is already stored."""


class AliasNotFound(LookupError):
    """No alias of that name."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no alias named {name!r}")
        self.name = name


class CollectionInUse(ValueError):
    """The collection cannot be deleted: aliases point to it (re-point or delete them first), or live
    keys (neither revoked nor expired) name it in their scope (revoke them first: else a collection made
    later under the same name would be theirs)."""

    def __init__(self, name: str, aliases: list[str], keys: list[str] | None = None) -> None:
        what = [f"the target of alias(es) {', '.join(aliases)}"] if aliases else []
        what += [f"in the scope of live key(s) {', '.join(keys)}"] if keys else []
        super().__init__(f"collection {name!r} is {' and '.join(what)}")
        self.name = name
        self.aliases = aliases
        self.keys = keys or []


@dataclass(frozen=True)
class AliasInfo:
    """A second name of a collection (``PUT /aliases/{name}``): every collection route accepts it."""

    name: str
    collection: str  # the collection it points to now
    updated_at: float  # when it was last set (created or re-pointed)


@dataclass(frozen=True)
class Actor:
    """Who makes a change, as its audit record names them: never a secret."""

    key_id: str | None = None  # None: open mode (no keys configured)
    client: str | None = None  # the client's address
    request_id: str | None = None  # the X-Request-ID of the request (None: the CLI)
    via: str = "api"  # "api", "cli" or "retention" (the collection's retention sweep: gallery/retention.py)

    def recorded(self, details: dict) -> dict:
        """``details`` as the audit entry records them (both backends): a change made other than
        through the API says how (``via``)."""
        return details if self.via == "api" else {**details, "via": self.via}


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    model_id: str
    created_at: float
    identities: int
    faces: int
    counted_faces: int  # sizes the collection's open-set threshold, like GalleryBackend.counted_faces
    keep_crops: bool = False  # each face enrolled from an image keeps its aligned crop, encrypted (crops.py)
    dim: int = 0  # the embedding size of its model (model_id): each collection is pinned to one model
    retention_days: float | None = None  # each face is erased this long after it was enrolled (None: kept)
    max_faces: int | None = None  # a write that would leave it more faces is refused (None: no limit)
    identify_fpir: float | None = None  # its open-set threshold's target FPIR (None: FACE_IDENTIFY_FPIR)
    damaged: bool = False  # its stored data cannot be read (CollectionDamaged): its counts are 0, not known


# what an admin sets per collection (POST /collections, PATCH /collections/{name}); None: the default
COLLECTION_SETTINGS = ("retention_days", "max_faces", "identify_fpir")


def updated_settings(stored: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """collection.updated's details: each setting ``changes`` gives another value than ``stored``, with
    its ``previous_`` one; empty when nothing differs (nothing is written then)."""
    details: dict[str, Any] = {}
    for key in COLLECTION_SETTINGS:
        if key in changes and changes[key] != stored.get(key):
            details |= {key: changes[key], f"previous_{key}": stored.get(key)}
    return details


@dataclass(frozen=True)
class StoredKey:
    """An API key as stored: the hash of its secret, never the secret (access/keys.py makes both)."""

    key_id: str
    secret_hash: str
    role: str  # "admin", "write", "read" or "embed" (access/policy.py)
    collections: tuple[str, ...] | None  # the collections it may touch; None: all
    note: str | None
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None
    last_used_at: float | None = None
    rate_limit_rps: float | None = None  # per-key overrides of FACE_RATE_LIMIT_RPS / _FACES_PER_S
    rate_limit_faces_per_s: float | None = None


@dataclass(frozen=True)
class AuditEntry:
    """One recorded change. ``action``: identity.created | identity.appended | identity.replaced |
    identity.deleted | identity.imported | identity.merged | face.moved | face.deleted |
    collection.created | collection.updated | collection.deleted | key.created | key.revoked | alias.set |
    alias.deleted.
    ``details``: counts and names only, never an image or an embedding."""

    entry_id: str  # opaque, unique; the cursor of the next page is the last entry's id
    at: float
    action: str
    key_id: str | None
    client: str | None
    request_id: str | None
    collection: str | None
    identity_id: str | None
    details: dict


@dataclass(frozen=True)
class AuditQuery:
    """Newest first; every given filter must hold. ``cursor``: the entry_id of the previous page's
    last entry (entries strictly older than it follow)."""

    collection: str | None = None
    identity_id: str | None = None
    key_id: str | None = None
    since: float | None = None  # at >= since
    until: float | None = None  # at < until
    limit: int = 100
    cursor: str | None = None


# the largest row id either store holds (SQLite's INTEGER, PostgreSQL's bigint): face ids and audit
# entries are numbered from 1 to it, and a larger number in a request is refused before it reaches them
MAX_ROW_ID = 2**63 - 1


class InvalidAuditCursor(ValueError):
    """An audit cursor this backend did not make (not a ``next_cursor`` it returned)."""

    def __init__(self, cursor: str) -> None:
        super().__init__(f"not an audit cursor: {cursor[:40]!r}; pass the next_cursor of the previous page")


@dataclass(frozen=True)
class GalleryStats:
    backend: str
    identities: int
    faces: int
    index_live: int  # faces the vector index can return (equals ``faces`` when consistent)
    extra: dict[str, int] = field(default_factory=dict)  # backend-specific counters

    def as_dict(self) -> dict[str, int]:
        """Numbers only, for /readyz and metrics."""
        numbers = {k: v for k, v in asdict(self).items() if k not in ("backend", "extra")}
        return {**numbers, **self.extra}


@dataclass(frozen=True)
class ReadTarget:
    """A database that reads go to (the PostgreSQL primary, or a standby), as /metrics shows it."""

    name: str
    role: str  # "primary" or "standby"
    in_rotation: bool
    lag_s: float | None  # None: unknown (not reached yet, or down)
    reads: int  # reads served
    behind: int = 0  # reads with a token it had not replayed in time (served by the primary instead)
    failures: int = 0  # reads or checks that could not reach it
    # a standby's shared_buffers_bytes (and huge_pages 1/0) as its last connection read them (memory.py);
    # the primary's are in the gallery's stats()
    memory: dict[str, int] = field(default_factory=dict)


@runtime_checkable
class GalleryBackend(Protocol):
    """What the service needs from a gallery; see the module docstring for the shared semantics."""

    backend: str
    model_id: str
    dim: int
    name: str  # the collection's name

    @property
    def identity_count(self) -> int:
        """Identities in the gallery, as of the last search or write on this replica (no extra query)."""

    @property
    def face_count(self) -> int:
        """Faces in the gallery, as cheaply known as identity_count."""

    @property
    def counted_faces(self) -> int:
        """Sum over identities of min(faces, FACES_COUNTED_PER_IDENTITY), known as cheaply as
        face_count (sizes the open-set threshold)."""

    @property
    def load_state(self) -> str:
        """"loading" while the backend prepares its index in the background, "ready", or "failed"."""

    @property
    def load_error(self) -> str | None: ...

    def open(self) -> None: ...

    def start(self) -> None:
        """Open for serving: like open(), but a backend with a slow start (the embedded index) may
        finish in the background, answering ``load_state`` "loading" meanwhile."""

    def close(self) -> None: ...

    def enroll(self, identity_id: str, embeddings: np.ndarray, metadata: dict | None = None,
               replace: bool = False, max_faces: int | None = None, actor: Actor | None = None,
               crops: list[bytes] | None = None, enrolled_at: list[float] | None = None) -> EnrollResult:
        """``actor``: the audit record (identity.created / appended / replaced) is written in the same
        transaction; None writes none (tools and tests that are not a request). ``crops``: one encoded
        aligned crop per embedding (crops.encode_crop), sealed with the crop key and stored in the same
        transaction as the faces (crops.CropsUnavailable without a key: nothing written).
        ``enrolled_at``: one Unix time per embedding, when each face was first enrolled (None: now): a
        migration keeps the source's, so that the collection's retention counts from the first enrollment."""

    def import_identities(self, items: list[tuple[str, np.ndarray, dict | None]],
                          actor: Actor | None = None,
                          enrolled_at: list[list[float] | None] | None = None,
                          created_at: list[float | None] | None = None) -> list[list[int]]:
        """``enrolled_at``: per item, each face's enrollment time (None: now), as ``enroll``'s;
        ``created_at``: per item, when the identity was created (None: now; a gallery file keeps it)."""

    def delete(self, identity_id: str, actor: Actor | None = None) -> int | None: ...

    def search(self, probes: np.ndarray, top_k: int, ef: int | None = None) -> list[list[Match]]:
        """``ef``: the HNSW search breadth for this search instead of the gallery's (FACE_HNSW_EF_SEARCH);
        hygiene scans use a narrower one (duplicates.SCAN_EF); never below what k needs."""
        ...

    def identity_embeddings(self, identity_id: str) -> np.ndarray | None: ...

    def get_identity(self, identity_id: str) -> IdentityDetails | None: ...

    def list_identities(self, limit: int, after: str | None, prefix: str | None = None) -> list[IdentityRecord]:
        """Up to ``limit`` identities after ``after`` in id order (keyset pages); with ``prefix`` only the
        ids that start with it (a range of the id index: a page costs what an unfiltered one does)."""

    def stats(self) -> GalleryStats: ...

    def read_targets(self) -> list[ReadTarget]:
        """Where reads go and how each is doing; empty when reads have no choice (no standbys)."""

    # gallery hygiene: one transaction each, audited in it (see the module docstring for the counts)
    def merge_identities(self, source_id: str, target_id: str, max_faces: int | None = None,
                         actor: Actor | None = None) -> MergeResult:
        """Every face of ``source_id`` becomes ``target_id``'s (face ids kept), then the source is
        deleted; the target's metadata is kept. IdentityNotFound for a missing source or target,
        ValueError when they are the same, TooManyFacesForIdentity when the target would hold more
        than ``max_faces`` (nothing written). Audit: identity.merged on the target."""

    def update_identity(self, identity_id: str, update: IdentityUpdate, actor: Actor | None = None) -> UpdateResult:
        """Rename the identity (``update.new_id``: its faces keep their ids, vectors, enrollment times
        and crops; it keeps ``created_at``) and/or set its metadata (``update.metadata`` makes it from
        the stored one), in one transaction with its identity.updated audit entry (on the new id:
        ``renamed_from``, ``metadata_keys``, ``face_count``). IdentityNotFound, IdentityExists (the new
        id is enrolled), IdentityChanged (``update.expected_updated_at`` is not the stored one): nothing
        written. Nothing to change: nothing written, no audit entry."""

    def move_face(self, face_id: int, target_id: str, max_faces: int | None = None,
                  actor: Actor | None = None) -> MoveResult:
        """The face (same id) becomes ``target_id``'s, which is created (metadata {}) if missing; its
        source identity is deleted when this was its last face. FaceNotFound for a face not in this
        collection. Audit: face.moved."""

    def delete_faces(self, face_ids: list[int], actor: Actor | None = None) -> FacesDeleted:
        """Erase faces as ``delete`` erases an identity's faces, all in one transaction (each identity
        left with no face is deleted with them); ids not in this collection come back in ``not_found``
        (``raise_if_missing()``: FaceNotFound, for one face asked by id). Audit: face.deleted per face."""

    def expired_faces(self, enrolled_before: float, limit: int) -> list[int]:
        """Up to ``limit`` ids of faces enrolled before ``enrolled_before`` (Unix time), oldest first:
        what the collection's retention erases next (gallery/retention.py). An index on the enrollment
        time answers it; read on the primary."""

    def oldest_enrollment(self) -> float | None:
        """When the collection's oldest face was enrolled (Unix time; None: it holds none): when its
        retention next erases one (gallery/retention.py). The same index answers it; on the primary."""

    # kept crops (keep_crops collections; sealed blobs, opened with crops.CropCipher.open)
    keep_crops: bool  # the collection keeps the aligned crop of each face enrolled from an image

    @property
    def identify_fpir(self) -> float | None:
        """The collection's own FPIR target for /identify (None: FACE_IDENTIFY_FPIR): embedded, the
        catalog's now; PostgreSQL, as the last search or write of this replica read it (a change made
        on another replica is in force from this one's next search)."""

    def face_crop(self, face_id: int) -> bytes | None:
        """The sealed crop of a face of this collection; None if the face has none (or does not exist)."""

    def iter_crops(self, after_face_id: int = 0, limit: int = 256) -> list[tuple[int, str, bytes]]:
        """Up to ``limit`` (face id, identity id, sealed crop) with face id > ``after_face_id``, by face id:
        pages through every kept crop (the migration job)."""

    def crop_count(self) -> int:
        """Kept crops in the collection."""
    def face_embeddings(self, face_ids: list[int]) -> dict[int, tuple[str, np.ndarray]]:
        """face id -> (identity id, its vector), for the ids that exist in this collection (others are
        absent from the dict)."""

    def iter_faces(self, batch: int = 4096) -> Iterator[tuple[list[int], list[str], np.ndarray]]:
        """Every face of the collection as (face ids, identity ids, vectors [n, dim] float32), ordered by
        identity id then face id, in batches; not one consistent read (a hygiene scan is advisory)."""

    def write_fence(self) -> AbstractContextManager[None]:
        """The exclusive side of the collection's write fence, held for the block: every write to the
        collection (enroll, import, delete, merge, move, delete_face) holds the shared side for its
        transaction, so the block starts once the writes in flight have committed and no write starts
        until it ends, in this process and (PostgreSQL: an advisory lock) on every replica. Reads and
        searches never touch it. The migration's final pass and its ``done`` flip (jobs/migrate.py)."""
        ...

    def read_floor(self) -> AbstractContextManager[None]:
        """Reads made in the block (on this thread) see every write committed before it began, and the
        block's own writes: PostgreSQL with standbys takes the primary's WAL position as the floor of a
        read (consistency.py: a standby that has replayed it, else the primary), as ``write_fence`` does;
        the embedded backend reads what is committed anyway. For work without a client's token (the
        migration job's passes, its start's check), which would otherwise read any standby in rotation."""
        ...

    def identity_crops(self, identity_ids: list[str]) -> dict[str, list[tuple[int, bytes | None, float]]]:
        """identity id -> its faces in face-id order, each (face id, sealed crop or None when the face has
        none, when it was enrolled), for the ids that exist (others are absent): the migration's batched
        read, a few queries for many identities instead of one per face; each identity's faces and crops
        are one read."""
        ...

    def search_among(self, probes: np.ndarray, identity_ids: list[str], top_k: int) -> Among:
        """/identify ``among``: each probe scored exactly against every face of these identities (max over
        faces, a tie to the lower face id), per probe up to ``top_k`` of them best first, and each one's
        face count (ids not enrolled are absent from both); one read for all (one snapshot)."""
        ...


@runtime_checkable
class Galleries(Protocol):
    """A backend as the service opens it: its collections, keys and audit trail (module docstring)."""

    backend: str
    model_id: str
    dim: int

    @property
    def load_state(self) -> str:
        """"loading", "ready" or "failed", for the backend as a whole (the default collection's index
        on the embedded backend)."""

    @property
    def load_error(self) -> str | None: ...

    def open(self) -> None: ...

    def start(self) -> None: ...

    def close(self) -> None: ...

    # collections
    def collection(self, name: str) -> GalleryBackend:
        """The collection's gallery; CollectionNotFound if there is none of that name. Cheap: call it
        per request (an idle embedded collection is opened on first use, closed when idle again)."""

    def create_collection(self, name: str, actor: Actor | None = None, keep_crops: bool = False,
                          model_id: str | None = None, dim: int | None = None,
                          retention_days: float | None = None, max_faces: int | None = None,
                          identify_fpir: float | None = None) -> CollectionInfo:
        """CollectionExists if taken (by a collection or an alias); ValueError for an invalid name.
        Audited (collection.created: model_id, dim, keep_crops), with or without an ``actor``
        (collection and key changes always are; identity writes only with one). ``keep_crops``:
        needs the crop key (crops.CropsUnavailable without one); the first such collection stores
        the key check value in the same transaction.
        The collection is pinned to ``model_id`` with embeddings of ``dim`` values (None: the default
        model's, ``self.model_id``/``self.dim``); its GalleryBackend has them as ``model_id``/``dim``.
        ``retention_days``: each face is erased that long after its enrollment (retention.py; None: kept);
        ``max_faces``: an enroll or import that would leave it more faces is refused whole
        (TooManyFacesForCollection), counted inside the write; ``identify_fpir``: the target of its
        open-set threshold (None: the service's)."""

    def delete_collection(self, name: str, actor: Actor | None = None) -> CollectionInfo:
        """Erase every identity and face of it; CollectionNotFound, CollectionProtected for default,
        CollectionInUse while an alias points to it or a live key names it (checked in the delete's
        transaction: ``add_key`` checks its scope's collections in its own, so neither slips past the
        other). Audited (collection.deleted, with the counts
        erased); its earlier audit entries are kept."""

    def list_collections(self) -> list[CollectionInfo]: ...

    def update_collection(self, name: str, changes: dict[str, Any], actor: Actor | None = None) -> CollectionInfo:
        """Set some of the collection's COLLECTION_SETTINGS (``changes``: name -> value, None: the
        default); CollectionNotFound. Audited (collection.updated: each changed setting and its
        ``previous_`` value) in the same transaction, unless nothing differs (nothing written)."""

    def retentions(self) -> dict[str, float]:
        """name -> retention in days, for each collection that has one (the sweep's list: one cheap read)."""

    def collection_info(self, name: str) -> CollectionInfo: ...

    # keys
    def add_key(self, key: StoredKey, actor: Actor | None = None) -> None:
        """KeyExists if the id is taken. Audited (key.created: role, scope, note; never the hash)."""

    def list_keys(self) -> list[StoredKey]:
        """Every key, revoked and expired ones included, oldest first."""

    def get_key(self, key_id: str) -> StoredKey | None: ...

    def revoke_key(self, key_id: str, actor: Actor | None = None) -> StoredKey | None:
        """Sets revoked_at (the row stays, for the audit trail); None if unknown. Audited (key.revoked)."""

    def touch_keys(self, used: dict[str, float]) -> None:
        """Record last use (key id -> time), in one write, batched by the caller."""

    def has_keys(self) -> bool:
        """Whether any key is stored that is neither revoked nor expired (open mode when not)."""

    # audit
    def audit(self, query: AuditQuery) -> list[AuditEntry]:
        """Up to ``query.limit`` entries, newest first."""

    def prune_audit(self, before: float) -> int:
        """Delete entries older than ``before`` (retention); returns how many."""

    # the whole
    def stats(self) -> GalleryStats: ...

    def read_targets(self) -> list[ReadTarget]: ...

    # aliases: one namespace with the collections (an alias cannot take a collection's name, nor the
    # other way round); read on the primary, so a re-point on one replica is seen by all
    def set_alias(self, name: str, collection: str, actor: Actor | None = None) -> AliasInfo:
        """Point ``name`` at ``collection`` (create or re-point), in one atomic write with its audit
        record (alias.set, details {"collection", "previous"}). CollectionNotFound for a missing target,
        CollectionExists when ``name`` is a collection's, ValueError for an invalid name,
        jobs.store.MigrationUnfinished when the target is the new collection of a migration not done
        (read in the same write)."""

    def delete_alias(self, name: str, actor: Actor | None = None) -> AliasInfo:
        """Remove the alias (alias.deleted, audited); AliasNotFound. The collection is untouched."""

    def list_aliases(self) -> list[AliasInfo]:
        """Every alias, by name."""

    def resolve(self, name: str) -> str:
        """The collection ``name`` means: an alias's target, a collection's own name; CollectionNotFound
        when it is neither."""
    # kept crops
    crop_cipher: CropCipher | None  # FACE_CROP_KEY_FILE's cipher (crops.py); None: no key configured

    def crop_key_check(self) -> bytes | None:
        """The crop key's check value, stored with the first keep_crops collection (crops.check_crop_key)."""
    # jobs (service/jobs/store.py): one queued-or-running job per source collection, kept by the store
    def create_job(self, job: JobRecord) -> None:
        """Store a new job row; jobs.JobRunning when a job of ``job.collection`` is active already."""

    def get_job(self, job_id: str) -> JobRecord | None: ...

    def list_jobs(self, collection: str | None = None, state: str | None = None, limit: int = 100,
                  kind: str | None = None) -> list[JobRecord]:
        """Newest first (rows still being created are listed only when ``state`` is "creating"); ``kind``: of
        that kind only (what looks for migrations: scans, many more rows, would crowd them out of ``limit``)."""

    def update_job(self, job_id: str, changes: dict, expect_state: tuple[str, ...] | None = None,
                   expect_heartbeat: float | None | bool = False, audit_as: tuple[str, Actor] | None = None,
                   expect_owner: str | None | bool = False) -> bool:
        """Change the row's ``changes`` (store.UPDATABLE) if it is in ``expect_state`` and holds
        ``expect_heartbeat`` and ``expect_owner`` (False: any); whether it changed. ``audit_as``: (action,
        actor) recorded in the same transaction. jobs.JobRunning when it would make a second active job of
        a collection. A runner writes its job with ``expect_owner``: once the job was resumed and taken by
        another runner (or taken over as stale), the first one's late writes change nothing."""

    def delete_job(self, job_id: str) -> None:
        """Remove a job row still being created (its POST failed): nothing else is ever deleted."""
