"""The gallery backend interface, its typed results, and the semantics shared by every backend.

Two backends implement :class:`GalleryBackend`:

* **embedded** (``FACE_DATABASE_URL`` unset, the default): the SQLite store + hnswlib index in the
  data dir (:class:`service.gallery.gallery.Gallery`), adapted by :class:`EmbeddedGallery`.
* **postgres** (``FACE_DATABASE_URL`` set): PostgreSQL holds identities, faces and embeddings, and
  pgvector's HNSW index in the same database finds nearest faces (:mod:`service.gallery.postgres`).
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
  returns can return them.
* ``search(probes, top_k)``: per probe, up to ``top_k`` identities, best first, each scored by its
  best face (max-over-faces), with oversampling so that an identity with many faces cannot crowd
  the others out (:func:`search_identities`).
* The gallery belongs to one model: opening it with another model id or dimension raises
  :class:`GalleryModelMismatch` (:func:`check_model`).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from .gallery import Gallery, GalleryOptions
from .results import EnrollResult, FaceRecord, IdentityDetails, IdentityRecord, TooManyFacesForIdentity
from .search import GalleryModelMismatch, Match, check_model, group_by_identity, search_identities

if TYPE_CHECKING:
    from ..config import Settings

log = logging.getLogger(__name__)

__all__ = [
    "EnrollResult", "FaceRecord", "GalleryBackend", "GalleryBusy", "GalleryModelMismatch", "GalleryStats",
    "GalleryUnavailable", "IdentityDetails", "IdentityExists", "IdentityRecord", "Match", "ReadTarget", "EmbeddedGallery",
    "TooManyFacesForIdentity", "check_model", "group_by_identity", "open_gallery", "search_identities",
]


class GalleryUnavailable(RuntimeError):
    """The gallery's database cannot be reached now; the request may be retried later."""


class GalleryBusy(GalleryUnavailable):
    """The database answers, but every connection this replica may open to it is in use (slow writes,
    a burst): the request may be retried shortly (the API answers 503 ``overloaded``)."""


class IdentityExists(ValueError):
    """An import named an identity that is already enrolled (the import changed nothing)."""


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


@runtime_checkable
class GalleryBackend(Protocol):
    """What the service needs from a gallery; see the module docstring for the shared semantics."""

    backend: str
    model_id: str
    dim: int

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
               replace: bool = False, max_faces: int | None = None) -> EnrollResult: ...

    def import_identities(self, items: list[tuple[str, np.ndarray, dict | None]]) -> list[list[int]]: ...

    def delete(self, identity_id: str) -> int | None: ...

    def search(self, probes: np.ndarray, top_k: int) -> list[list[Match]]: ...

    def identity_embeddings(self, identity_id: str) -> np.ndarray | None: ...

    def get_identity(self, identity_id: str) -> IdentityDetails | None: ...

    def list_identities(self, limit: int, after: str | None) -> list[IdentityRecord]: ...

    def stats(self) -> GalleryStats: ...

    def read_targets(self) -> list[ReadTarget]:
        """Where reads go and how each is doing; empty when reads have no choice (no standbys)."""


# --- the embedded backend, adapted -----------------------------------------------------------

class EmbeddedGallery:
    """Today's embedded gallery (SQLite + hnswlib in the data dir) behind the backend interface.

    It delegates every call to :class:`Gallery` unchanged and only turns its results into the
    interface's types; its own guarantees (generation-checked snapshots, rebuild after a crash,
    readers-writer lock) stay where they are.
    """

    backend = "embedded"

    def __init__(self, gallery: Gallery) -> None:
        self.gallery = gallery
        self.model_id = gallery.model_id
        self.dim = gallery.dim

    @property
    def identity_count(self) -> int:
        return self.gallery.identity_count

    @property
    def face_count(self) -> int:
        return self.gallery.face_count

    @property
    def counted_faces(self) -> int:
        return self.gallery.counted_faces

    @property
    def load_state(self) -> str:
        return self.gallery.load_state

    @property
    def load_error(self) -> str | None:
        return self.gallery.load_error

    def open(self) -> None:
        self.gallery.open()

    def start(self) -> None:
        self.gallery.open_store()  # locks the data dir: a second server stops here
        self.gallery.start_loading()  # the index loads in the background: /readyz says "loading"

    def close(self) -> None:
        self.gallery.close()

    def enroll(self, identity_id: str, embeddings: np.ndarray, metadata: dict | None = None,
               replace: bool = False, max_faces: int | None = None) -> EnrollResult:
        return self.gallery.enroll(identity_id, embeddings, metadata, replace, max_faces)

    def import_identities(self, items: list[tuple[str, np.ndarray, dict | None]]) -> list[list[int]]:
        import sqlite3

        try:
            return self.gallery.import_identities(items)
        except sqlite3.IntegrityError as exc:
            raise IdentityExists(f"an identity of the import is already enrolled: {exc}") from exc

    def delete(self, identity_id: str) -> int | None:
        return self.gallery.delete(identity_id)

    def search(self, probes: np.ndarray, top_k: int) -> list[list[Match]]:
        return self.gallery.search(probes, top_k)

    def identity_embeddings(self, identity_id: str) -> np.ndarray | None:
        return self.gallery.identity_embeddings(identity_id)

    def get_identity(self, identity_id: str) -> IdentityDetails | None:
        return self.gallery.get_identity(identity_id)

    def list_identities(self, limit: int, after: str | None) -> list[IdentityRecord]:
        return self.gallery.list_identities(limit, after)

    def stats(self) -> GalleryStats:
        extra = self.gallery.stats()  # a fresh dict of ints: the core counts are taken out of it
        core = {k: extra.pop(k) for k in ("identities", "faces", "index_live")}
        return GalleryStats(backend=self.backend, **core, extra=extra)

    def read_targets(self) -> list[ReadTarget]:
        return []


# --- the factory ---------------------------------------------------------------------------------

def make_gallery(settings: Settings, model_id: str, dim: int, data_dir: Path | None = None) -> GalleryBackend:
    """The backend ``settings`` choose (not opened): postgres when a database URL is set, else embedded."""
    if settings.database_url is not None:
        from .postgres import PostgresGallery, PostgresOptions  # psycopg is only imported when used

        return PostgresGallery(PostgresOptions.from_settings(settings), model_id, dim)
    gallery = Gallery(data_dir or settings.data_dir, model_id, dim, m=settings.hnsw_m,
                      ef_construction=settings.hnsw_ef_construction, ef_search=settings.hnsw_ef_search,
                      options=GalleryOptions(snapshot_interval_s=settings.snapshot_interval_s,
                                             snapshot_min_changes=settings.snapshot_min_changes,
                                             compact_tombstone_ratio=settings.compact_tombstone_ratio,
                                             compact_min_tombstones=settings.compact_min_tombstones))
    return EmbeddedGallery(gallery)


def open_gallery(settings: Settings, model_id: str, dim: int, background: bool = False) -> GalleryBackend:
    """Make and open the backend ``settings`` choose; raises GalleryModelMismatch for another model.
    ``background``: the server's start, where a slow index load goes on behind /readyz "loading"."""
    gallery = make_gallery(settings, model_id, dim)
    gallery.start() if background else gallery.open()
    log.info("gallery opened", extra={"backend": gallery.backend, "model_id": model_id})
    return gallery
