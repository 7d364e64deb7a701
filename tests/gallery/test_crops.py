"""Kept face crops (keep_crops collections, service/gallery/crops.py) on both backends.

The backends are made from Settings by ``open_gallery``, as the service makes them, with a real key file
written by the crop-key code; the checks read the real files (the data dir, PostgreSQL's own data dir)
and rows. Crops are random noise so that any 64 bytes of them (or of their PNG) are found only where
they were written.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import numpy as np
import psycopg
import pytest

from service.config import Settings
from service.gallery.api import DEFAULT_COLLECTION, Galleries, IdentityUpdate
from service.gallery.crops import (
    CropAuthenticationFailed,
    CropCipher,
    CropKeyError,
    CropsUnavailable,
    decode_crop,
    encode_crop,
    write_key_file,
)
from service.gallery.open import open_gallery
from tests.gallery.test_gallery import DIM, unit

MODEL = "m@1"
WINDOW = 64


def noise_crop(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(112, 112, 3), dtype=np.uint8)


def files_holding(roots: list[Path], needle: bytes) -> list[str]:
    hits = []
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                try:
                    if needle in path.read_bytes():
                        hits.append(str(path))
                except OSError:  # a file PostgreSQL removed meanwhile
                    continue
    return hits


def windows(data: bytes) -> list[bytes]:
    """Three 64-byte pieces from the middle of ``data`` (past any common header)."""
    return [data[o:o + WINDOW] for o in (len(data) // 4, len(data) // 2, 3 * len(data) // 4)]


class CropBackend:
    """One backend's storage (a data dir, or one schema on the suite's PostgreSQL) and a key file."""

    def __init__(self, kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        self.kind = kind
        self.key_file = tmp_path / "crop.key"
        write_key_file(self.key_file)
        self.data_dir = tmp_path / "data"
        self.pgdata: Path | None = None
        if kind == "embedded":
            self.base = Settings(data_dir=self.data_dir, snapshot_interval_s=0)
        else:
            postgres = request.getfixturevalue("postgres")
            env = postgres.gallery_env()
            self.pgdata = postgres.pgdata
            self.base = Settings(data_dir=self.data_dir, database_url=env["FACE_DATABASE_URL"],
                                 database_schema=env["FACE_DATABASE_SCHEMA"])
        self.opened: list[Galleries] = []

    def open(self, key_file: Path | None | str = "default") -> Galleries:
        key = self.key_file if key_file == "default" else key_file
        galleries = open_gallery(self.base.model_copy(update={"crop_key_file": key}), MODEL, DIM)
        self.opened.append(galleries)
        return galleries

    def close(self, galleries: Galleries) -> None:
        galleries.close()
        self.opened.remove(galleries)

    def cipher(self) -> CropCipher:
        return CropCipher.from_file(self.key_file)

    def roots(self) -> list[Path]:
        return [self.data_dir] + ([self.pgdata] if self.pgdata is not None else [])

    def rows(self, sql: str, args: tuple = ()) -> list[tuple]:
        assert self.base.database_url is not None
        with psycopg.connect(self.base.database_url.get_secret_value(), autocommit=True,
                             options=f"-c search_path={self.base.database_schema},public") as conn:
            cursor = conn.execute(sql, args)
            return cursor.fetchall() if cursor.description is not None else []

    def checkpoint(self) -> None:
        """PostgreSQL: write what is in shared buffers to the heap files too (the WAL has it already)."""
        if self.kind == "postgres":
            self.rows("CHECKPOINT")


@pytest.fixture(params=["embedded", "postgres"])
def crops_backend(request, tmp_path):
    backend = CropBackend(request.param, tmp_path, request)
    yield backend
    for galleries in list(backend.opened):
        galleries.close()


def _enroll(galleries: Galleries, collection: str, identity: str, seeds: list[int], **kwargs):
    crops = [encode_crop(noise_crop(s)) for s in seeds]
    vectors = unit(np.random.default_rng(seeds[0]), len(seeds))
    return galleries.collection(collection).enroll(identity, vectors, crops=crops, **kwargs), crops


def test_crops_are_stored_sealed_and_open_to_what_was_enrolled(crops_backend):
    galleries = crops_backend.open()
    info = galleries.create_collection("kept", keep_crops=True)
    assert info.keep_crops
    gallery = galleries.collection("kept")
    assert gallery.keep_crops and not galleries.collection(DEFAULT_COLLECTION).keep_crops
    result, crops = _enroll(galleries, "kept", "alice", [1, 2])
    _enroll(galleries, "kept", "bob", [3])
    assert gallery.crop_count() == 3
    cipher = crops_backend.cipher()
    for face_id, crop, seed in zip(result.face_ids, crops, [1, 2]):
        blob = gallery.face_crop(face_id)
        assert blob is not None and crop not in blob and blob != crop
        opened = cipher.open("kept", face_id, blob)
        assert opened == crop and np.array_equal(decode_crop(opened), noise_crop(seed))  # lossless
    # paged by face id: what the migration job reads
    first = gallery.iter_crops(0, 2)
    rest = gallery.iter_crops(first[-1][0], 2)
    assert [(f, i) for f, i, _ in first + rest] == [(result.face_ids[0], "alice"), (result.face_ids[1], "alice"),
                                                    (result.face_ids[1] + 1 if crops_backend.kind == "embedded"
                                                     else rest[0][0], "bob")]
    assert gallery.iter_crops(rest[-1][0]) == []
    # listed and reopened with the setting
    assert {c.name: c.keep_crops for c in galleries.list_collections()} == {DEFAULT_COLLECTION: False, "kept": True}
    crops_backend.close(galleries)
    galleries = crops_backend.open()
    assert galleries.collection_info("kept").keep_crops and galleries.collection("kept").crop_count() == 3


def test_no_file_or_row_holds_a_crop_in_clear(crops_backend):
    galleries = crops_backend.open()
    galleries.create_collection("kept", keep_crops=True)
    result, crops = _enroll(galleries, "kept", "alice", [11])
    blob = galleries.collection("kept").face_crop(result.face_ids[0])
    assert blob is not None
    crops_backend.checkpoint()
    raw = noise_crop(11).tobytes()
    # the scan finds what is stored: the sealed blob is on disk (data dir, or PostgreSQL's WAL)
    assert files_holding(crops_backend.roots(), blob[100:100 + WINDOW])
    for needle in windows(crops[0]) + windows(raw):
        assert not files_holding(crops_backend.roots(), needle)
    if crops_backend.kind == "postgres":
        for needle in windows(crops[0]) + windows(raw):
            assert crops_backend.rows("SELECT count(*) FROM face_crops WHERE position(%s IN blob) > 0",
                                      (needle,)) == [(0,)]


def test_a_blob_on_another_face_or_collection_or_key_does_not_open(crops_backend):
    galleries = crops_backend.open()
    galleries.create_collection("kept", keep_crops=True)
    galleries.create_collection("other", keep_crops=True)
    result, _ = _enroll(galleries, "kept", "alice", [21, 22])
    first, second = result.face_ids
    blob = galleries.collection("kept").face_crop(first)
    assert blob is not None
    cipher = crops_backend.cipher()
    cipher.open("kept", first, blob)
    with pytest.raises(CropAuthenticationFailed):
        cipher.open("kept", second, blob)  # moved to another face
    with pytest.raises(CropAuthenticationFailed):
        cipher.open("other", first, blob)  # moved to another collection
    with pytest.raises(CropAuthenticationFailed):
        cipher.open("kept", first, blob[:-1] + bytes([blob[-1] ^ 1]))  # altered
    other_key = crops_backend.key_file.with_name("other.key")
    write_key_file(other_key)
    with pytest.raises(CropAuthenticationFailed):
        CropCipher.from_file(other_key).open("kept", first, blob)
    # moved in the store itself: the face now holding it cannot open it
    if crops_backend.kind == "embedded":
        crops_backend.close(galleries)
        store = sqlite3.connect(crops_backend.data_dir / "collections" / "kept" / "gallery.sqlite3")
        store.execute("UPDATE crops SET blob = ? WHERE face_id = ?", (blob, second))
        store.commit()
        store.close()
        galleries = crops_backend.open()
    else:
        crops_backend.rows("UPDATE face_crops SET blob = %s WHERE face_id = %s", (blob, second))
    moved = galleries.collection("kept").face_crop(second)
    assert moved == blob
    with pytest.raises(CropAuthenticationFailed):
        cipher.open("kept", second, moved)


def _crop_gone(crops_backend: CropBackend, blob: bytes, plain: bytes) -> None:
    crops_backend.checkpoint()
    if crops_backend.kind == "embedded":  # secure_delete and the truncated WAL: the bytes are in no file
        for needle in windows(blob) + windows(plain):
            assert not files_holding(crops_backend.roots(), needle)
    else:  # no row left
        assert crops_backend.rows("SELECT count(*) FROM face_crops WHERE blob = %s", (blob,)) == [(0,)]


def test_deleting_an_identity_or_replacing_its_faces_erases_their_crops(crops_backend):
    galleries = crops_backend.open()
    galleries.create_collection("kept", keep_crops=True)
    gallery = galleries.collection("kept")
    gone, gone_crops = _enroll(galleries, "kept", "alice", [31])
    kept, _ = _enroll(galleries, "kept", "bob", [32])
    replaced, replaced_crops = _enroll(galleries, "kept", "carol", [33])
    blobs = {f: gallery.face_crop(f) for f in gone.face_ids + replaced.face_ids}
    assert gallery.delete("alice") == 1
    _enroll(galleries, "kept", "carol", [34], replace=True)
    assert gallery.crop_count() == 2
    assert gallery.face_crop(gone.face_ids[0]) is None and gallery.face_crop(replaced.face_ids[0]) is None
    assert gallery.face_crop(kept.face_ids[0]) is not None
    blob = blobs[gone.face_ids[0]]
    assert blob is not None
    _crop_gone(crops_backend, blob, gone_crops[0])
    blob = blobs[replaced.face_ids[0]]
    assert blob is not None
    _crop_gone(crops_backend, blob, replaced_crops[0])


def test_deleting_a_collection_erases_its_crops(crops_backend):
    galleries = crops_backend.open()
    galleries.create_collection("kept", keep_crops=True)
    result, crops = _enroll(galleries, "kept", "alice", [41, 42])
    blobs = [galleries.collection("kept").face_crop(f) for f in result.face_ids]
    crops_backend.checkpoint()
    assert files_holding(crops_backend.roots(), (blobs[0] or b"")[100:100 + WINDOW])
    galleries.delete_collection("kept")
    for blob, crop in zip(blobs, crops):
        assert blob is not None
        _crop_gone(crops_backend, blob, crop)
    if crops_backend.kind == "postgres":
        assert crops_backend.rows("SELECT count(*) FROM face_crops") == [(0,)]


def test_a_collection_without_keep_crops_and_a_service_without_a_key_store_no_crop(crops_backend):
    galleries = crops_backend.open()
    galleries.create_collection("plain")
    assert not galleries.collection("plain").keep_crops
    galleries.collection("plain").enroll("alice", unit(np.random.default_rng(5), 1))
    assert galleries.collection("plain").crop_count() == 0
    crops_backend.close(galleries)
    keyless = crops_backend.open(key_file=None)  # nothing keeps crops yet: starts without a key
    with pytest.raises(CropsUnavailable):
        keyless.create_collection("kept", keep_crops=True)
    assert [c.name for c in keyless.list_collections()] == [DEFAULT_COLLECTION, "plain"]
    with pytest.raises(CropsUnavailable):  # crops given, no key: nothing written
        _enroll(keyless, "plain", "bob", [51])
    assert keyless.collection("plain").get_identity("bob") is None
    assert keyless.collection("plain").crop_count() == 0


def test_a_wrong_or_missing_key_refuses_to_open_a_gallery_that_keeps_crops(crops_backend):
    galleries = crops_backend.open()
    galleries.create_collection("kept", keep_crops=True)
    crops_backend.close(galleries)
    wrong = crops_backend.key_file.with_name("wrong.key")
    write_key_file(wrong)
    with pytest.raises(CropKeyError, match=str(wrong)):
        crops_backend.open(key_file=wrong)
    with pytest.raises(CropKeyError, match="FACE_CROP_KEY_FILE"):
        crops_backend.open(key_file=None)
    not_base64 = crops_backend.key_file.with_name("bad.key")
    not_base64.write_text("not a key!\n")
    with pytest.raises(CropKeyError, match=str(not_base64)):
        crops_backend.open(key_file=not_base64)
    assert crops_backend.open().collection("kept").keep_crops  # the right key opens it


def test_key_file_is_0600_random_and_never_overwritten(tmp_path):
    path = tmp_path / "k"
    write_key_file(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    first = path.read_bytes()
    with pytest.raises(FileExistsError):
        write_key_file(path)
    assert path.read_bytes() == first
    write_key_file(tmp_path / "k2")
    assert (tmp_path / "k2").read_bytes() != first
    CropCipher.from_file(path)


def test_postgres_migration_4_lands_before_or_after_a_later_one(request, tmp_path, monkeypatch):
    """Migrations 5 and 6 come from other branches: a database may have a later one applied before 4
    lands. The runner applies each missing one, in version order, whatever order the list was merged in."""
    from service.gallery.postgres import backend as pg

    crops_backend = CropBackend("postgres", tmp_path, request)
    five = pg.Migration(99, "a later migration from another branch", ("CREATE TABLE five_probe (x int)",))
    four = next(m for m in pg.MIGRATIONS if m.version == 4)
    before_four = tuple(m for m in pg.MIGRATIONS if m.version != 4)  # every other real one
    others = [m.version for m in before_four]
    try:
        monkeypatch.setattr(pg, "MIGRATIONS", (*before_four, five))  # a database where 5 landed first
        options = pg.PostgresOptions.from_settings(crops_backend.base)
        with psycopg.connect(options.url, **options.connect_kwargs()) as conn:
            assert pg.migrate(conn, options, MODEL, DIM)[:len(others) + 1] == [*others, 99]
        assert [r[0] for r in crops_backend.rows("SELECT version FROM schema_migrations ORDER BY 1")] == [*others, 99]
        monkeypatch.setattr(pg, "MIGRATIONS", (*before_four, five, four))  # merged after it
        galleries = crops_backend.open()
        assert [r[0] for r in crops_backend.rows("SELECT version FROM schema_migrations ORDER BY 1")] == sorted([*others, 4, 99])
        galleries.create_collection("kept", keep_crops=True)
        _enroll(galleries, "kept", "alice", [61])
        assert galleries.collection("kept").crop_count() == 1
        crops_backend.close(galleries)
        monkeypatch.setattr(pg, "MIGRATIONS", (*before_four, four, five))  # and listed in order: nothing to do
        assert crops_backend.open().collection("kept").crop_count() == 1
        assert len(crops_backend.rows("SELECT version FROM schema_migrations")) == len(others) + 2
    finally:
        for galleries in list(crops_backend.opened):
            galleries.close()


def test_postgres_migrations_apply_in_version_order_on_a_fresh_database(request, tmp_path, monkeypatch):
    """A merge may list a later migration (here 99, which builds on face_crops) before 4."""
    from service.gallery.postgres import backend as pg

    crops_backend = CropBackend("postgres", tmp_path, request)
    later = pg.Migration(99, "builds on migration 4", ("ALTER TABLE face_crops ADD COLUMN probe int",))
    real = [m.version for m in pg.MIGRATIONS]
    monkeypatch.setattr(pg, "MIGRATIONS", (*[m for m in pg.MIGRATIONS if m.version < 4], later,
                                           *[m for m in pg.MIGRATIONS if m.version >= 4]))
    galleries = crops_backend.open()
    try:
        assert [r[0] for r in crops_backend.rows("SELECT version FROM schema_migrations ORDER BY 1")] \
            == sorted([*real, 99])
    finally:
        crops_backend.close(galleries)


def test_a_renamed_identity_keeps_its_crops(crops_backend):
    """Crops are sealed to collection + face id, not to the identity: a rename leaves them as they are,
    readable under the new id (what a migration reads)."""
    galleries = crops_backend.open()
    galleries.create_collection("kept", keep_crops=True)
    result, crops = _enroll(galleries, "kept", "alice", [41, 42])
    gallery = galleries.collection("kept")
    gallery.update_identity("alice", IdentityUpdate(new_id="alice.b"))
    cipher = crops_backend.cipher()
    kept = gallery.identity_crops(["alice", "alice.b"])
    assert list(kept) == ["alice.b"] and [f for f, _, _ in kept["alice.b"]] == result.face_ids
    for (face_id, blob, _), crop in zip(kept["alice.b"], crops):
        assert blob is not None and cipher.open("kept", face_id, blob) == crop
    assert [(f, i) for f, i, _ in gallery.iter_crops(0, 10)] == [(f, "alice.b") for f in result.face_ids]
