"""Damaged stored data, on both backends, through a real server: one collection's data that the store
cannot read (damaged pages of its SQLite store; damaged heap blocks of its faces in PostgreSQL, as a
disk fault or a bad restore leaves them) is 503 ``collection_damaged`` naming it, logged once, and
the other collections serve on. (The embedded data dir's own cases: tests/service/test_data_dir.py.)"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from harness.server import ServerProcess
from tests.conftest import ENROLLED, b64, face_files, metric
from tests.damage import damage_pages

FACES = 60  # site-b's faces: several pages of its own in either store


def unit(rng: np.random.Generator) -> list[float]:
    v = rng.normal(size=128)
    return (v / np.linalg.norm(v)).tolist()


class Embedded:
    """The data dir's stores: site-b's pages after the first (header and schema) overwritten."""

    def __init__(self, tmp_path: Path) -> None:
        self.env: dict[str, str] = {}

    def damage(self, data: Path, rng: np.random.Generator, collection: str = "site-b") -> str:
        store = data / "collections" / collection / "gallery.sqlite3"
        with sqlite3.connect(store) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        for leftover in (store.with_name(store.name + "-wal"), store.with_name(store.name + "-shm")):
            leftover.unlink(missing_ok=True)
        raw = bytearray(store.read_bytes())
        page = int.from_bytes(raw[16:18], "big") or 65536
        raw[page:] = rng.integers(0, 256, len(raw) - page, dtype=np.uint8).tobytes()
        store.write_bytes(bytes(raw))
        return str(store)  # what the log names

    def damage_keys(self, data: Path, rng: np.random.Generator) -> str:
        """The catalog's keys table's pages (not its key-id index: a lookup finds the row, then reads it)."""
        catalog = data / "catalog.sqlite3"
        damage_pages(catalog, int(rng.integers(1 << 30)), table="keys")
        return str(catalog)

    def close(self) -> None:
        pass


class Postgres:
    """A PostgreSQL of its own (it is stopped to damage a file): the heap blocks of the faces table that
    hold site-b's faces and no other collection's overwritten, as PostgreSQL's checks then find them."""

    def __init__(self, tmp_path: Path) -> None:
        from harness.pg import PgTestServer

        self.server = PgTestServer()
        self.env = self.server.gallery_env()

    def damage(self, data: Path, rng: np.random.Generator) -> str:
        import psycopg

        schema = self.env["FACE_DATABASE_SCHEMA"]
        with psycopg.connect(self.server.url, autocommit=True) as conn:
            relation = conn.execute(f"SELECT pg_relation_filepath('{schema}.faces')").fetchone()[0]
            blocks = conn.execute(
                f"SELECT (ctid::text::point)[0]::int, bool_and(collection_id <> 1) FROM {schema}.faces "
                "GROUP BY 1 ORDER BY 1").fetchall()
            conn.execute("CHECKPOINT")
        own = [block for block, only_site_b in blocks if only_site_b]
        assert len(own) >= 2, blocks
        self.server.stop()
        path = self.server.pgdata / relation
        raw = bytearray(path.read_bytes())
        for block in own:
            raw[block * 8192:(block + 1) * 8192] = rng.integers(0, 256, 8192, dtype=np.uint8).tobytes()
        path.write_bytes(bytes(raw))
        self.server.start()
        return relation  # what the log names

    def damage_keys(self, data: Path, rng: np.random.Generator) -> str:
        """Every heap block of the keys table (api_keys), as PostgreSQL's checks then find them."""
        import psycopg

        schema = self.env["FACE_DATABASE_SCHEMA"]
        with psycopg.connect(self.server.url, autocommit=True) as conn:
            relation = conn.execute(f"SELECT pg_relation_filepath('{schema}.api_keys')").fetchone()[0]
            conn.execute("CHECKPOINT")
        self.server.stop()
        path = self.server.pgdata / relation
        raw = bytearray(path.read_bytes())
        assert len(raw) >= 2 * 8192, len(raw)
        path.write_bytes(rng.integers(0, 256, len(raw), dtype=np.uint8).tobytes())
        self.server.start()
        return relation

    def close(self) -> None:
        self.server.close()


@pytest.fixture(params=["embedded", "postgres"])
def backend(request, tmp_path) -> Iterator[Embedded | Postgres]:
    made = (Embedded if request.param == "embedded" else Postgres)(tmp_path)
    yield made
    made.close()


def test_damaged_data_of_one_collection_is_503_collection_damaged_and_the_others_serve(tmp_path, default_model,
                                                                                      backend):
    """Every kind of request to site-b (listing, reading, searching, enrolling, deleting) is 503
    ``collection_damaged`` with ``details.collection`` (it was a 500 ``internal_error`` with the
    database's traceback), the file or relation only in the log, in one ``collection damaged`` line;
    the default collection reads, searches and (in a store of its own) enrolls; the process never fails."""
    rng = np.random.default_rng(2026)
    data = tmp_path / "data"
    server = ServerProcess(data, model=default_model, env=backend.env)
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=60) as c:
            r = c.post("/enroll", json={"identity_id": ENROLLED[0], "images": [b64(face_files(ENROLLED[0])[0])]})
            assert r.status_code == 200, r.text
            model_id = r.json()["model_id"]
            assert c.post("/collections", json={"name": "site-b"}).status_code == 201
            for i in range(FACES):
                r = c.post("/collections/site-b/enroll", json={
                    "identity_id": f"p{i}", "embeddings": [unit(rng)], "model_id": model_id,
                    "metadata": {"note": "x" * 2000}})
                assert r.status_code == 200, r.text
    finally:
        server.stop()
    named = backend.damage(data, rng)

    server = ServerProcess(data, model=default_model, env=backend.env)
    try:
        server.wait_ready(timeout=90)
        with httpx.Client(base_url=server.url, timeout=60) as c:
            probe = {"embeddings": [unit(rng)], "model_id": model_id}
            for method, path, body in (
                    ("GET", f"identities/p{FACES - 1}", None), ("POST", "identify", probe),
                    ("POST", "enroll", {"identity_id": "new", **probe}),
                    ("POST", "verify", {"embedding_a": probe["embeddings"][0], "identity_id": f"p{FACES - 1}",
                                        "model_id": model_id}),
                    ("POST", "identities/p3/merge", {"into": f"p{FACES - 2}"}),
                    ("DELETE", f"identities/p{FACES - 1}", None)) * 2:  # the second time: not logged again
                r = c.request(method, f"/collections/site-b/{path}", json=body)
                assert r.status_code == 503, (path, r.status_code, r.text)
                assert r.json()["error"] == {
                    "code": "collection_damaged", "details": {"collection": "site-b"},
                    "message": "the stored data of collection 'site-b' is damaged (a disk fault, a bad restore): "
                               "the operator restores it from a backup, or deletes the collection"}, r.text
            assert c.get("/identities").json()["items"][0]["identity_id"] == ENROLLED[0]
            r = c.post("/identify", json={"images": [b64(face_files(ENROLLED[0])[1])]})
            assert r.status_code == 200 and r.json()["results"][0]["identity_id"] == ENROLLED[0], r.text
            r = c.post("/enroll", json={"identity_id": ENROLLED[1], "images": [b64(face_files(ENROLLED[1])[0])]})
            if isinstance(backend, Embedded):
                assert r.status_code == 200, r.text  # a store of its own
            else:  # one faces table for all: PostgreSQL may put the new row on a damaged block (its free space)
                assert r.status_code == 200 or r.json()["error"]["details"] == {"collection": "default"}, r.text
            assert c.get("/readyz").status_code == 200
            damaged = 1 if r.status_code == 200 else 2  # site-b, and default if its enroll met a damaged block
            assert metric(c, "face_collections_damaged") == damaged  # to alert on, asked for or not
        log = server.log_path.read_text()
        found = [line for line in log.splitlines() if "collection damaged" in line and '"site-b"' in line]
        assert len(found) == 1 and named in found[0], found
        assert "Traceback" not in log and '"internal_error"' not in log
    finally:
        server.stop()


def test_damaged_keys_found_while_serving_are_503_catalog_damaged(tmp_path, default_model, backend):
    """The catalog's keys damaged (the embedded catalog's pages of them; PostgreSQL's heap blocks of
    api_keys) and a server started with FACE_API_KEY, which reads no stored key to start: a request
    with a stored key, and the admin's listing of keys, are 503 ``catalog_damaged`` (they were 500
    ``internal_error`` with the database's traceback), the file or relation only in the log, in one
    ``catalog damaged`` line; the FACE_API_KEY admin reads and searches the gallery. Started without
    FACE_API_KEY, the server reads the stored keys to start and refuses, in one line naming them."""
    rng = np.random.default_rng(2027)
    data = tmp_path / "data"
    admin = {"X-API-Key": "an-admin-key-of-the-environment-0123456789"}
    env = {**backend.env, "FACE_API_KEY": admin["X-API-Key"]}
    server = ServerProcess(data, model=default_model, env=env)
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=60) as c:
            r = c.post("/enroll", json={"identity_id": ENROLLED[0], "images": [b64(face_files(ENROLLED[0])[0])]},
                       headers=admin)
            assert r.status_code == 200, r.text
            secrets = []
            for _ in range(40):  # several pages (blocks) of keys
                r = c.post("/keys", json={"role": "read", "note": "n" * 500}, headers=admin)
                assert r.status_code == 201, r.text
                secrets.append(r.json()["secret"])
            assert c.get("/identities", headers={"X-API-Key": secrets[-1]}).status_code == 200
    finally:
        server.stop()
    named = backend.damage_keys(data, rng)

    server = ServerProcess(data, model=default_model, env=env)
    try:
        server.wait_ready(timeout=90)
        with httpx.Client(base_url=server.url, timeout=60) as c:
            for headers, path in (({"X-API-Key": secrets[-1]}, "/identities"), ({"X-API-Key": secrets[0]}, "/identities"),
                                  (admin, "/keys")) * 2:  # the second time: not logged again
                r = c.get(path, headers=headers)
                assert r.status_code == 503, (path, r.status_code, r.text)
                assert r.json()["error"] == {
                    "code": "catalog_damaged",
                    "message": "the service's catalog (collections, keys) is damaged (a disk fault, a bad restore): "
                               "the operator restores it from a backup"}, r.text
            r = c.post("/identify", json={"images": [b64(face_files(ENROLLED[0])[1])]}, headers=admin)
            assert r.status_code == 200 and r.json()["results"][0]["identity_id"] == ENROLLED[0], r.text
            assert c.get("/healthz").status_code == 200
        log = server.log_path.read_text()
        found = [line for line in log.splitlines() if "catalog damaged" in line]
        assert len(found) == 1 and named in found[0], found
        assert "Traceback" not in log and '"internal_error"' not in log
    finally:
        server.stop()
    # without FACE_API_KEY the start asks whether any key is stored, reading the damaged ones: refused
    server = ServerProcess(data, model=default_model, env=backend.env)
    try:
        with pytest.raises(RuntimeError, match="exited"):
            server.wait_ready(timeout=90)
        assert server.proc.returncode == 3
        log = server.log_path.read_text()
        refusal = [line for line in log.splitlines() if "could not start" in line]
        assert len(refusal) == 1 and named in refusal[0] and "Traceback" not in log, log[-3000:]
    finally:
        server.stop()
