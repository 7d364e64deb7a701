"""Which backend the settings choose, made and opened: above both backends, so neither imports the other."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from .api import Galleries, GalleryBackend
from .embedded.backend import EmbeddedGallery
from .embedded.gallery import Gallery, GalleryOptions

if TYPE_CHECKING:
    from ..config import Settings

log = logging.getLogger(__name__)


def make_gallery(settings: Settings, model_id: str, dim: int,
                 data_dir: Path | None = None) -> GalleryBackend | Galleries:
    """The backend ``settings`` choose (not opened): postgres when a database URL is set, else embedded."""
    if settings.database_url is not None:
        from .postgres.backend import PostgresGalleries, PostgresOptions  # psycopg is only imported when used

        return PostgresGalleries(PostgresOptions.from_settings(settings), model_id, dim)
    gallery = Gallery(data_dir or settings.data_dir, model_id, dim, m=settings.hnsw_m,
                      ef_construction=settings.hnsw_ef_construction, ef_search=settings.hnsw_ef_search,
                      options=GalleryOptions(snapshot_interval_s=settings.snapshot_interval_s,
                                             snapshot_min_changes=settings.snapshot_min_changes,
                                             compact_tombstone_ratio=settings.compact_tombstone_ratio,
                                             compact_min_tombstones=settings.compact_min_tombstones))
    return EmbeddedGallery(gallery)


def open_gallery(settings: Settings, model_id: str, dim: int, background: bool = False) -> GalleryBackend | Galleries:
    """Make and open the backend ``settings`` choose; raises GalleryModelMismatch for another model.
    ``background``: the server's start, where a slow index load goes on behind /readyz "loading"."""
    gallery = make_gallery(settings, model_id, dim)
    gallery.start() if background else gallery.open()
    log.info("gallery opened", extra={"backend": gallery.backend, "model_id": model_id})
    return gallery
