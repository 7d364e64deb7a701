"""The embedded gallery (:class:`Gallery`: SQLite store + hnswlib index) behind the backend interface."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from ..api import Actor, EnrollResult, GalleryStats, IdentityDetails, IdentityExists, IdentityRecord, Match, ReadTarget
from ..results import Among, FacesDeleted, IdentityUpdate, MergeResult, MoveResult, UpdateResult
from .gallery import Gallery, ReadWriteLock


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
        self.name = gallery.name
        self.keep_crops = False  # the collection's setting (EmbeddedGalleries' handle says it)
        self.identify_fpir: float | None = None  # likewise
        # the write fence of this gallery on its own (GalleryBackend.write_fence); EmbeddedGalleries'
        # handles hold the collection's fence, which outlives this object (idle close, reopen)
        self._fence = ReadWriteLock()

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
               replace: bool = False, max_faces: int | None = None, actor: Actor | None = None,
               crops: list[bytes] | None = None, enrolled_at: list[float] | None = None,
               collection_limit: int | None = None) -> EnrollResult:
        with self._fence.read():
            return self.gallery.enroll(identity_id, embeddings, metadata, replace, max_faces, actor, crops, enrolled_at,
                                       collection_limit)

    def import_identities(self, items: list[tuple[str, np.ndarray, dict | None]],
                          actor: Actor | None = None,
                          enrolled_at: list[list[float] | None] | None = None,
                          collection_limit: int | None = None,
                          created_at: list[float | None] | None = None) -> list[list[int]]:
        import sqlite3

        try:
            with self._fence.read():
                return self.gallery.import_identities(items, actor, enrolled_at, collection_limit, created_at)
        except sqlite3.IntegrityError as exc:
            raise IdentityExists(f"an identity of the import is already enrolled: {exc}") from exc

    def delete(self, identity_id: str, actor: Actor | None = None) -> int | None:
        with self._fence.read():
            return self.gallery.delete(identity_id, actor)

    def search(self, probes: np.ndarray, top_k: int, ef: int | None = None) -> list[list[Match]]:
        return self.gallery.search(probes, top_k, ef)

    def identity_embeddings(self, identity_id: str) -> np.ndarray | None:
        return self.gallery.identity_embeddings(identity_id)

    def get_identity(self, identity_id: str) -> IdentityDetails | None:
        return self.gallery.get_identity(identity_id)

    def list_identities(self, limit: int, after: str | None, prefix: str | None = None) -> list[IdentityRecord]:
        return self.gallery.list_identities(limit, after, prefix)

    def stats(self) -> GalleryStats:
        extra = self.gallery.stats()  # a fresh dict of ints: the core counts are taken out of it
        core = {k: extra.pop(k) for k in ("identities", "faces", "index_live")}
        return GalleryStats(backend=self.backend, **core, extra=extra)

    def read_targets(self) -> list[ReadTarget]:
        return []

    def merge_identities(self, source_id: str, target_id: str, max_faces: int | None = None,
                         actor: Actor | None = None) -> MergeResult:
        with self._fence.read():
            return self.gallery.merge_identities(source_id, target_id, max_faces, actor)

    def update_identity(self, identity_id: str, update: IdentityUpdate, actor: Actor | None = None) -> UpdateResult:
        with self._fence.read():
            return self.gallery.update_identity(identity_id, update, actor)

    def move_face(self, face_id: int, target_id: str, max_faces: int | None = None,
                  actor: Actor | None = None) -> MoveResult:
        with self._fence.read():
            return self.gallery.move_face(face_id, target_id, max_faces, actor)

    def delete_faces(self, face_ids: list[int], actor: Actor | None = None) -> FacesDeleted:
        with self._fence.read():
            return self.gallery.delete_faces(face_ids, actor)

    @contextmanager
    def write_fence(self) -> Iterator[None]:
        with self._fence.write():
            yield

    @contextmanager
    def read_floor(self) -> Iterator[None]:
        yield  # one process reads what is committed

    def expired_faces(self, enrolled_before: float, limit: int) -> list[int]:
        return self.gallery.expired_faces(enrolled_before, limit)

    def oldest_enrollment(self) -> float | None:
        return self.gallery.oldest_enrollment()

    def face_crop(self, face_id: int) -> bytes | None:
        return self.gallery.face_crop(face_id)

    def iter_crops(self, after_face_id: int = 0, limit: int = 256) -> list[tuple[int, str, bytes]]:
        return self.gallery.iter_crops(after_face_id, limit)

    def crop_count(self) -> int:
        return self.gallery.crop_count()
    def face_embeddings(self, face_ids: list[int]) -> dict[int, tuple[str, np.ndarray]]:
        return self.gallery.face_embeddings(face_ids)

    def iter_faces(self, batch: int = 4096) -> Iterator[tuple[list[int], list[str], np.ndarray]]:
        return self.gallery.iter_faces(batch)

    def identity_crops(self, identity_ids: list[str]) -> dict[str, list[tuple[int, bytes | None, float]]]:
        return self.gallery.identity_crops(identity_ids)

    def search_among(self, probes: np.ndarray, identity_ids: list[str], top_k: int) -> Among:
        return self.gallery.search_among(probes, identity_ids, top_k)
