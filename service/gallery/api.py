"""The gallery backend interface, its typed results, and the semantics shared by every backend.

Two backends implement :class:`GalleryBackend`:

* **embedded** (``FACE_DATABASE_URL`` unset, the default): the SQLite store + hnswlib index in the
  data dir (:class:`service.gallery.gallery.Gallery`), adapted by :class:`EmbeddedGallery`.
* **postgres** (``FACE_DATABASE_URL`` set): PostgreSQL holds identities, faces and embeddings, and
  pgvector's HNSW index in the same database finds nearest faces (:mod:`service.gallery.postgres`).
  Replicas keep no gallery rows in memory, so many of them can serve one database.

What every backend means by the same call (the contract the shared tests check on both):

* ``enroll(id, faces, metadata, replace)``: one atomic write. A new id is created; for an existing
  id the faces are appended (``replace=False``) or replace all its faces (``replace=True``); given
  ``metadata`` replaces the stored metadata, ``None`` keeps it. Acknowledged = committed (durable).
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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from .gallery import Gallery, GalleryModelMismatch, GalleryOptions, Match
from .store import IdentityRecord

if TYPE_CHECKING:
    from ..config import Settings

log = logging.getLogger(__name__)

OVERSAMPLE = 4  # faces fetched per wanted identity, before grouping by identity
WIDEN = 4  # factor by which a probe's face budget grows when too few identities came back

__all__ = [
    "EnrollResult", "FaceRecord", "GalleryBackend", "GalleryModelMismatch", "GalleryStats", "GalleryUnavailable",
    "IdentityDetails", "IdentityExists", "IdentityRecord", "Match", "EmbeddedGallery", "check_model",
    "group_by_identity", "open_gallery", "search_identities",
]


class GalleryUnavailable(RuntimeError):
    """The gallery's database cannot be reached now; the request may be retried later."""


class IdentityExists(ValueError):
    """An import named an identity that is already enrolled (the import changed nothing)."""


@dataclass(frozen=True)
class EnrollResult:
    face_ids: list[int]
    created: bool  # the identity did not exist before this enrollment
    faces_removed: int  # faces dropped by replace=True


@dataclass(frozen=True)
class FaceRecord:
    face_id: int
    created_at: float


@dataclass(frozen=True)
class IdentityDetails:
    record: IdentityRecord
    faces: list[FaceRecord]


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
        """Faces in the gallery, as cheaply known as identity_count (sizes the open-set threshold)."""

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
               replace: bool = False) -> EnrollResult: ...

    def import_identities(self, items: list[tuple[str, np.ndarray, dict | None]]) -> list[list[int]]: ...

    def delete(self, identity_id: str) -> int | None: ...

    def search(self, probes: np.ndarray, top_k: int) -> list[list[Match]]: ...

    def identity_embeddings(self, identity_id: str) -> np.ndarray | None: ...

    def get_identity(self, identity_id: str) -> IdentityDetails | None: ...

    def list_identities(self, limit: int, after: str | None) -> list[IdentityRecord]: ...

    def stats(self) -> GalleryStats: ...


# --- semantics shared by the backends ----------------------------------------------------------

def check_model(stored_model: str | None, stored_dim: int | None, model_id: str, dim: int, where: str) -> None:
    """The model-id guard: embeddings of different models are not comparable, so refuse to mix them."""
    if stored_model is None:
        return
    if stored_model != model_id or int(stored_dim or 0) != dim:
        raise GalleryModelMismatch(
            f"the gallery in {where} holds {stored_dim}-d embeddings of model {stored_model!r}; "
            f"the loaded model is {model_id!r} ({dim}-d). Embeddings of different models "
            "are not comparable: use another gallery, or re-enroll with the new model."
        )


def group_by_identity(hits: list[tuple[int, str, float]]) -> list[Match]:
    """Max-over-faces: (face id, identity id, similarity) hits -> one Match per identity, best first."""
    best: dict[str, Match] = {}
    for face_id, identity_id, score in hits:
        if identity_id not in best or score > best[identity_id].score:
            best[identity_id] = Match(identity_id, float(score), int(face_id))
    return sorted(best.values(), key=lambda m: m.score, reverse=True)


NearestFaces = Callable[[np.ndarray, int], list[tuple[int, str, float]]]


def search_identities(nearest: NearestFaces, probe: np.ndarray, top_k: int, max_faces: int | None = None) -> list[Match]:
    """Top-k identities for one probe from a backend's nearest-faces search.

    ``nearest(probe, k)`` returns up to k (face id, identity id, similarity) hits, nearest first.
    The first ask is ``top_k * OVERSAMPLE`` faces; when those belong to fewer than ``top_k``
    identities and the backend may hold more faces, the ask widens (x4) until it has enough
    identities or the backend ran out of faces (it returned fewer than asked, or ``max_faces``).
    """
    k = top_k * OVERSAMPLE
    if max_faces is not None:
        k = min(k, max_faces)
    while True:
        hits = nearest(probe, k) if k > 0 else []
        best = group_by_identity(hits)
        exhausted = len(hits) < k or (max_faces is not None and k >= max_faces)
        if len(best) >= top_k or exhausted:
            return best[:top_k]
        k *= WIDEN
        if max_faces is not None:
            k = min(k, max_faces)


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
               replace: bool = False) -> EnrollResult:
        face_ids, created, removed = self.gallery.enroll(identity_id, embeddings, metadata, replace)
        return EnrollResult(list(face_ids), bool(created), int(removed))

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
        found = self.gallery.get_identity(identity_id)
        if found is None:
            return None
        record, faces = found
        return IdentityDetails(record, [FaceRecord(int(f), float(t)) for f, t in faces])

    def list_identities(self, limit: int, after: str | None) -> list[IdentityRecord]:
        return self.gallery.list_identities(limit, after)

    def stats(self) -> GalleryStats:
        raw = dict(self.gallery.stats())
        core = {k: int(raw.pop(k)) for k in ("identities", "faces", "index_live")}
        numbers = {k: int(v) for k, v in raw.items() if isinstance(v, (int, float))}  # /readyz shows numbers only
        return GalleryStats(backend=self.backend, **core, extra=numbers)


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
