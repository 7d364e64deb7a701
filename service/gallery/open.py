"""Which backend the settings choose, made and opened: above both backends, so neither imports the other."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from .api import Galleries
from .crops import check_crop_key, load_crop_cipher
from .embedded.galleries import EmbeddedGalleries
from .embedded.gallery import Gallery, GalleryOptions

if TYPE_CHECKING:
    from ..config import Settings

log = logging.getLogger(__name__)


def make_gallery(settings: Settings, model_id: str, dim: int, data_dir: Path | None = None,
                 served: dict[str, int] | None = None) -> Galleries:
    """The backend ``settings`` choose (not opened): postgres when a database URL is set, else embedded.
    ``model_id``/``dim``: the default model (new collections); ``served``: every served model (model id
    -> dim; None: the default alone); opening refuses a collection pinned to another (GalleryModelMismatch).
    Unopened, it serves keys, audit and the list of collections (the CLI beside a running server);
    ``open()``/``start()`` open the default collection too (the server, gallery tools)."""
    cipher = load_crop_cipher(settings)  # FACE_CROP_KEY_FILE: kept crops are sealed with it (CropKeyError)
    if settings.database_url is not None:
        from .postgres.backend import PostgresGalleries, PostgresOptions  # psycopg is only imported when used

        pg = PostgresGalleries(PostgresOptions.from_settings(settings), model_id, dim, served)
        pg.crop_cipher = cipher
        return pg
    # one maintenance thread for every collection (EmbeddedGalleries), none per collection
    options = GalleryOptions(snapshot_interval_s=settings.snapshot_interval_s,
                             snapshot_min_changes=settings.snapshot_min_changes,
                             compact_tombstone_ratio=settings.compact_tombstone_ratio,
                             compact_min_tombstones=settings.compact_min_tombstones, maintenance_thread=False,
                             snapshot_timeout_s=settings.snapshot_timeout_s)

    def collection(directory: Path, name: str, pinned_model_id: str, pinned_dim: int) -> Gallery:
        gallery = Gallery(directory, pinned_model_id, pinned_dim, m=settings.hnsw_m,
                          ef_construction=settings.hnsw_ef_construction, ef_search=settings.hnsw_ef_search,
                          options=options, name=name)
        gallery.crop_cipher = cipher
        return gallery

    embedded = EmbeddedGalleries(data_dir or settings.data_dir, model_id, dim, collection,
                                 idle_s=settings.collection_idle_s, snapshot_interval_s=settings.snapshot_interval_s,
                                 served=served)
    embedded.crop_cipher = cipher
    return embedded


def open_gallery(settings: Settings, model_id: str, dim: int, background: bool = False,
                 served: dict[str, int] | None = None) -> Galleries:
    """Make and open the backend ``settings`` choose; raises GalleryModelMismatch for another model.
    ``background``: the server's start, where a slow index load goes on behind /readyz "loading"."""
    galleries = make_gallery(settings, model_id, dim, served=served)
    galleries.start() if background else galleries.open()
    try:
        # kept crops this service could not open: refuse to start, naming the key file (CropKeyError)
        check_crop_key(galleries, galleries.crop_cipher)
    except BaseException:
        galleries.close()
        raise
    log.info("gallery opened", extra={"backend": galleries.backend, "model_id": model_id})
    return galleries
