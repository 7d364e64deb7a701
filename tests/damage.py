"""Damaged SQLite files, as a disk fault or a bad restore leaves them, for the tests of what the
service does with them (tests/service/test_data_dir.py, test_damaged_data.py, the client's), and a
gallery database that refuses to erase (the retention tests)."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np


def damage_pages(store: Path, seed: int, table: str | None = None) -> None:
    """Overwrite every page of a store but its first (the header and schema), or only ``table``'s (not
    its indexes': a lookup finds the row, then reads it): SQLite opens it as a database and finds the
    damage on reading those rows. What the WAL held is copied in first, and the WAL removed."""
    with sqlite3.connect(store) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = [n for (n,) in conn.execute("SELECT pageno FROM dbstat WHERE name = ?", (table,))] if table else []
    for leftover in (store.with_name(store.name + "-wal"), store.with_name(store.name + "-shm")):
        leftover.unlink(missing_ok=True)
    assert pages or not table, f"no pages of {table} in {store}"
    raw = bytearray(store.read_bytes())
    noise = np.random.default_rng(seed).integers(0, 256, len(raw), dtype=np.uint8).tobytes()
    for number in pages or range(2, len(raw) // size + 1):
        raw[(number - 1) * size:number * size] = noise[(number - 1) * size:number * size]
    store.write_bytes(bytes(raw))


def alter_kept_crop(data_dir: Path, env: dict[str, str], collection: str, face_id: int) -> None:
    """Flip one byte of the sealed crop of ``face_id`` in ``collection``'s store (past the magic and the
    nonce: its ciphertext), as a disk fault would: embedded (``env`` without FACE_DATABASE_URL), its
    store's crops table; PostgreSQL, face_crops."""
    def flip(blob: bytes) -> bytes:
        return blob[:40] + bytes([blob[40] ^ 0x01]) + blob[41:]

    if "FACE_DATABASE_URL" not in env:
        with sqlite3.connect(data_dir / "collections" / collection / "gallery.sqlite3") as conn:
            blob = conn.execute("SELECT blob FROM crops WHERE face_id = ?", (face_id,)).fetchone()[0]
            conn.execute("UPDATE crops SET blob = ? WHERE face_id = ?", (flip(blob), face_id))
        return
    import psycopg

    schema = env["FACE_DATABASE_SCHEMA"]
    with psycopg.connect(env["FACE_DATABASE_URL"], autocommit=True) as conn:
        blob = conn.execute(f"SELECT blob FROM {schema}.face_crops WHERE face_id = %s", (face_id,)).fetchone()[0]
        conn.execute(f"UPDATE {schema}.face_crops SET blob = %s WHERE face_id = %s", (flip(bytes(blob)), face_id))


@contextlib.contextmanager
def deletes_refused(collection: str, data_dir: Path | None = None, database: tuple[str, str] | None = None
                    ) -> Iterator[None]:
    """While inside, the gallery's database refuses every DELETE of a face of ``collection`` (a trigger
    that raises), as a store that cannot erase: the embedded collection's store in ``data_dir``, or the
    faces table of ``database`` (url, schema), both read on as before. The trigger is dropped on exit."""
    if data_dir is not None:
        store = data_dir / "gallery.sqlite3" if collection == "default" else \
            data_dir / "collections" / collection / "gallery.sqlite3"
        with contextlib.closing(sqlite3.connect(store)) as conn:
            conn.execute("CREATE TRIGGER refuse_deletes BEFORE DELETE ON faces BEGIN "
                         "SELECT RAISE(ABORT, 'deletes refused by the test'); END")
            conn.commit()
        try:
            yield
        finally:
            with contextlib.closing(sqlite3.connect(store)) as conn:
                conn.execute("DROP TRIGGER refuse_deletes")
                conn.commit()
        return
    import psycopg
    from psycopg import sql

    assert database is not None
    url, schema = database
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("""CREATE FUNCTION {}.refuse_deletes() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
              IF OLD.collection_id = (SELECT collection_id FROM {}.collections WHERE name = {}) THEN
                RAISE EXCEPTION 'deletes refused by the test';
              END IF;
              RETURN OLD;
            END $$""").format(sql.Identifier(schema), sql.Identifier(schema), sql.Literal(collection)))
        conn.execute(sql.SQL("CREATE TRIGGER refuse_deletes BEFORE DELETE ON {}.faces FOR EACH ROW "
                             "EXECUTE FUNCTION {}.refuse_deletes()").format(sql.Identifier(schema),
                                                                          sql.Identifier(schema)))
    try:
        yield
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP TRIGGER refuse_deletes ON {}.faces").format(sql.Identifier(schema)))
            conn.execute(sql.SQL("DROP FUNCTION {}.refuse_deletes()").format(sql.Identifier(schema)))
