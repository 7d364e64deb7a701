"""``python -m service backup DEST``: a real server writing while a real subprocess copies its data
dir; the copy, served by a new server, has every write acknowledged before the backup began, the
collections, the keys and the audit trail, and no trace of a face deleted before it."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.gallery.traces import find_vector
from tests.server import REPO, ServerProcess, listed_identities
from tests.service.test_open_set import _calibration_folder

MODEL_ID = "sface@2021dec-int8bq"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def enroll(client: httpx.Client, identity: str, vectors: np.ndarray, collection: str = "") -> httpx.Response:
    prefix = f"/collections/{collection}" if collection else ""
    return client.post(f"{prefix}/enroll", json={"identity_id": identity, "embeddings": vectors.tolist(),
                                                 "model_id": MODEL_ID})


def test_a_backup_taken_while_the_server_writes_restores_what_was_acknowledged(tmp_path, default_model):
    data_dir = tmp_path / "data"
    made = run("keys", "create", "--role", "admin", env={"FACE_DATA_DIR": str(data_dir)})
    assert made.returncode == 0, made.stderr
    headers = {"X-API-Key": made.stdout.strip()}
    rng = np.random.default_rng(5)
    server = ServerProcess(data_dir, model=default_model)
    before: list[str] = []
    during: list[str] = []
    try:
        server.wait_ready()
        client = httpx.Client(base_url=server.url, headers=headers, timeout=60)
        for i in range(40):
            assert enroll(client, f"p{i}", rng.normal(size=(2, 128))).status_code == 200
            before.append(f"p{i}")
        assert client.post("/collections", json={"name": "team"}).status_code == 201
        assert enroll(client, "t1", rng.normal(size=(2, 128)), "team").status_code == 200
        secret = rng.normal(size=(1, 128)).astype(np.float32)
        assert enroll(client, "gone", secret).status_code == 200
        assert client.delete("/identities/gone").status_code == 200

        stop = threading.Event()

        def keep_writing() -> None:  # the server goes on taking writes while the copy is made
            with httpx.Client(base_url=server.url, headers=headers, timeout=60) as writer:
                i = 0
                while not stop.is_set():
                    if enroll(writer, f"w{i}", rng.normal(size=(2, 128))).status_code == 200:
                        during.append(f"w{i}")
                    i += 1

        writer = threading.Thread(target=keep_writing)
        writer.start()
        time.sleep(0.5)
        acknowledged_before_backup = set(before) | set(during)
        copy = run("backup", str(tmp_path / "copy"), "--data-dir", str(data_dir))
        time.sleep(0.3)
        stop.set()
        writer.join()
        assert copy.returncode == 0, copy.stderr
        assert len(during) > len(acknowledged_before_backup - set(before))  # writes went on during the copy
    finally:
        server.kill()

    backup = tmp_path / "copy"
    assert not find_vector(backup, secret[0])  # deleted before: in no file of the copy
    assert stat.S_IMODE(backup.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in backup.rglob("*.sqlite3"))
    assert not list(tmp_path.glob(".copy.partial-*"))

    restored = ServerProcess(backup, model=default_model)
    try:
        restored.wait_ready()
        with httpx.Client(base_url=restored.url, headers=headers, timeout=60) as client:  # the key was copied
            identities = listed_identities(client)
            assert acknowledged_before_backup <= identities <= set(before) | set(during)
            assert "gone" not in identities
            assert client.get("/collections/team/identities/t1").status_code == 200
            actions = [e["action"] for e in client.get("/audit", params={"limit": 500}).json()["items"]]
            assert "identity.deleted" in actions and "collection.created" in actions, actions
            probe = client.post("/identify", json={"embeddings": [rng.normal(size=128).tolist()], "model_id": MODEL_ID})
            assert probe.status_code == 200  # the index was rebuilt from the copied store
    finally:
        restored.stop()


@pytest.mark.parametrize("case", ["dest-exists", "inside-data-dir", "postgres", "no-gallery", "no-data-dir"])
def test_a_backup_that_cannot_be_made_says_why_and_makes_nothing(tmp_path, case):
    data_dir = tmp_path / "data"
    made = run("keys", "create", "--role", "admin", env={"FACE_DATA_DIR": str(data_dir)})  # a catalog to copy
    assert made.returncode == 0, made.stderr
    dest = tmp_path / "copy"
    env = {"FACE_DATA_DIR": str(data_dir)}
    if case == "dest-exists":
        dest.mkdir()
        (dest / "keep").write_text("mine")
    elif case == "inside-data-dir":
        dest = data_dir / "copy"
    elif case == "postgres":
        env["FACE_DATABASE_URL"] = "postgresql://face@db/face"
    elif case == "no-gallery":  # a directory, without a gallery in it
        data_dir = tmp_path / "empty"
        data_dir.mkdir()
        env["FACE_DATA_DIR"] = str(data_dir)
    else:
        env["FACE_DATA_DIR"] = str(tmp_path / "missing")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    done = run("backup", str(dest), env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr
    assert {"dest-exists": "exists", "inside-data-dir": "inside the data dir", "postgres": "pg_dump", "no-gallery": "no gallery",
            "no-data-dir": "not a directory"}[case] in done.stderr
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before  # nothing made or removed
    if case == "dest-exists":
        assert (dest / "keep").read_text() == "mine"


@pytest.mark.parametrize("damage", ["pages", "not-a-database"])
def test_a_damaged_store_fails_the_backup_by_name_or_is_copied_as_it_is(tmp_path, default_model, damage):
    """A collection store SQLite cannot read fails the backup with one line naming it, nothing kept (it
    was "database disk image is malformed", no file named); ``--copy-damaged`` copies it as its bytes
    and the rest as usual: the copy serves the healthy collections and refuses that one as the data dir
    does (503 collection_damaged), to be restored later. A damaged catalog is never copied so."""
    from tests.service.test_damaged_data import Embedded

    data_dir = tmp_path / "data"
    rng = np.random.default_rng(7)
    server = ServerProcess(data_dir, model=default_model)
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=60) as c:
            assert enroll(c, "alice", rng.normal(size=(1, 128))).status_code == 200
            for name in ("site-b", "site-c"):
                assert c.post("/collections", json={"name": name}).status_code == 201
                for i in range(20):
                    r = c.post(f"/collections/{name}/enroll", json={
                        "identity_id": f"p{i}", "embeddings": rng.normal(size=(1, 128)).tolist(), "model_id": MODEL_ID,
                        "metadata": {"note": "x" * 2000}})
                    assert r.status_code == 200, r.text
    finally:
        server.stop()
    store = data_dir / "collections" / "site-c" / "gallery.sqlite3"
    if damage == "pages":
        Embedded(tmp_path).damage(data_dir, rng, "site-c")
    else:
        for leftover in (store.with_name(store.name + "-wal"), store.with_name(store.name + "-shm")):
            leftover.unlink(missing_ok=True)
        store.write_bytes(b"not a database " * 1000)
    damaged = store.read_bytes()

    dest = tmp_path / "copy"
    refused = run("backup", str(dest), "--data-dir", str(data_dir))
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert refused.stderr.startswith(f"error: {store} is damaged") and "--copy-damaged" in refused.stderr
    assert not dest.exists() and not list(tmp_path.glob(".copy.partial-*"))

    done = run("backup", str(dest), "--data-dir", str(data_dir), "--copy-damaged")
    assert done.returncode == 0, done.stderr
    assert done.stderr == "warning: collections/site-c/gallery.sqlite3 is damaged: copied as it is (its collection " \
                          "is refused until restored)\n"
    report = {d["database"]: d for d in json.loads(done.stdout)["databases"]}
    assert report["collections/site-c/gallery.sqlite3"] == {"database": "collections/site-c/gallery.sqlite3",
                                                           "bytes": len(damaged), "damaged": True}
    assert report["collections/site-b/gallery.sqlite3"]["faces"] == 20
    assert (dest / "collections" / "site-c" / "gallery.sqlite3").read_bytes() == damaged
    served = ServerProcess(dest, model=default_model)
    try:
        served.wait_ready()
        with httpx.Client(base_url=served.url, timeout=60) as c:
            assert listed_identities(c) == {"alice"}
            r = c.get("/collections/site-b/identities", params={"limit": 100})
            assert r.status_code == 200 and len(r.json()["items"]) == 20, r.text
            r = c.get("/collections/site-c/identities")
            assert r.status_code == 503 and r.json()["error"]["code"] == "collection_damaged", r.text
    finally:
        served.stop()

    catalog = data_dir / "catalog.sqlite3"
    for leftover in (catalog.with_name(catalog.name + "-wal"), catalog.with_name(catalog.name + "-shm")):
        leftover.unlink(missing_ok=True)
    catalog.write_bytes(b"not a database " * 1000)
    again = run("backup", str(tmp_path / "copy2"), "--data-dir", str(data_dir), "--copy-damaged")
    assert again.returncode == 2 and again.stderr.startswith(f"error: {catalog} is damaged"), again.stderr
    assert "earlier backup" in again.stderr and not (tmp_path / "copy2").exists()


@pytest.mark.parametrize("name", ["data#1", "data?x=1", "data%20"])
def test_a_data_dir_whose_path_reads_as_a_uri_is_copied_whole(tmp_path, name):
    """A data dir named with '#', '?' or '%' (which a SQLite URI reads as a fragment, a query or an
    escape): the copy holds its catalog's tables and rows. Before: '#' and '?' gave an empty database
    (exit 0, a stray file beside the data dir), '%20' failed to open it."""
    data_dir = tmp_path / name
    made = run("keys", "create", "--role", "admin", "--note", "ops", env={"FACE_DATA_DIR": str(data_dir)})
    assert made.returncode == 0, made.stderr
    before = sorted(p.name for p in tmp_path.iterdir())
    copy = run("backup", str(tmp_path / "copy"), "--data-dir", str(data_dir))
    assert copy.returncode == 0, copy.stderr
    report = json.loads(copy.stdout)
    assert [(d["database"], d["keys"]) for d in report["databases"]] == [("catalog.sqlite3", 1)], report
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "copy"])  # nothing else made
    listed = run("keys", "list", "--json", env={"FACE_DATA_DIR": str(tmp_path / "copy")})
    assert listed.returncode == 0 and [k["note"] for k in json.loads(listed.stdout)["items"]] == ["ops"], listed.stderr


def test_a_backup_keeps_the_operators_calibration(tmp_path, default_model):
    """The impostor tail and the refitted quality that `python -m service calibrate --quality` stored in
    the data dir are the operator's measurement, not derived data: the copy has them (0600), and a
    server on it uses them (before: not copied, so a restored service fell back to the model's
    contract and its thresholds changed without a word)."""
    data_dir = tmp_path / "data"
    env = {"FACE_DATA_DIR": str(data_dir)}
    calibrated = run("calibrate", str(_calibration_folder(tmp_path)), "--model", str(default_model),
                     "--min-pairs", "500", "--quality", env=env)
    assert calibrated.returncode == 0, calibrated.stderr[-3000:]
    stored = sorted(p.relative_to(data_dir) for p in (data_dir / "calibration").rglob("*") if p.is_file())
    assert {p.name for p in stored} == {"impostor_tail.json", "quality.json"}, stored
    (data_dir / "impostor_tail.json").write_text((data_dir / stored[0]).read_text())  # where older versions kept it

    def calibration_in_use(data: Path) -> tuple[str, str]:
        server = ServerProcess(data, model=default_model)
        try:
            ready = server.wait_ready()
        finally:
            server.stop()
        return ready["impostor_tail"]["source"], ready["quality"]["source"]

    assert calibration_in_use(data_dir) == ("gallery", "gallery")  # (and a gallery made, to back up)
    copy = run("backup", str(tmp_path / "copy"), "--data-dir", str(data_dir))
    assert copy.returncode == 0, copy.stderr
    report = json.loads(copy.stdout)
    assert sorted(report["files"]) == sorted(str(p) for p in [*stored, Path("impostor_tail.json")]), report
    for relative in [*stored, Path("impostor_tail.json")]:
        kept = tmp_path / "copy" / relative
        assert kept.read_bytes() == (data_dir / relative).read_bytes()
        assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert calibration_in_use(tmp_path / "copy") == ("gallery", "gallery")


def test_a_collection_deleted_or_created_during_the_backup_is_left_out_whole(tmp_path, default_model, monkeypatch):
    """The stores copied are those of the collections the catalog copy lists (the backup's moment). One
    deleted once its catalog row was copied (with the alias that pointed at it deleted first) is left out
    whole: not in the copy's catalog, nor its alias, nor its store, and the report says so; one created
    after the catalog was copied is not in the copy at all. Before: the deleted collection's store failed
    to open ("unable to open database file") and the backup exited 1 keeping nothing, and a store made
    after the catalog copy was copied beside a catalog that does not list it."""
    import service.cli.backup as backup_cli

    data_dir = tmp_path / "data"
    made = run("keys", "create", "--role", "admin", env={"FACE_DATA_DIR": str(data_dir)})
    assert made.returncode == 0, made.stderr
    headers = {"X-API-Key": made.stdout.strip()}
    rng = np.random.default_rng(9)
    server = ServerProcess(data_dir, model=default_model)
    real_copy = backup_cli.copy_database
    events: list[str] = []
    try:
        server.wait_ready()
        client = httpx.Client(base_url=server.url, headers=headers, timeout=60)
        assert enroll(client, "alice", rng.normal(size=(1, 128))).status_code == 200
        for name in ("kept", "zz"):
            assert client.post("/collections", json={"name": name}).status_code == 201
            assert enroll(client, f"{name}-1", rng.normal(size=(2, 128)), name).status_code == 200
        assert client.put("/aliases/zz-alias", json={"collection": "zz"}).status_code in (200, 201)

        def copy_then_change(source: Path, target: Path, copy_damaged: bool = False) -> dict:
            copied = real_copy(source, target, copy_damaged)
            if source.name == "catalog.sqlite3":  # the backup's moment is past: zz goes, late comes
                assert client.delete("/aliases/zz-alias").status_code == 200
                assert client.delete("/collections/zz").status_code == 200
                assert client.post("/collections", json={"name": "late"}).status_code == 201
                assert enroll(client, "late-1", rng.normal(size=(1, 128)), "late").status_code == 200
                events.append("changed")
            return copied

        monkeypatch.setattr(backup_cli, "copy_database", copy_then_change)
        report = backup_cli.backup(data_dir, tmp_path / "copy")
        assert events == ["changed"]
        assert (data_dir / "collections" / "late" / "gallery.sqlite3").is_file()
    finally:
        server.kill()

    copy = tmp_path / "copy"
    assert sorted(d["database"] for d in report["databases"]) == [
        "catalog.sqlite3", "collections/kept/gallery.sqlite3", "gallery.sqlite3"], report
    assert report["left_out"] == [
        {"collection": "late", "why": "not in the catalog copied (created after it, or left by an interrupted delete)"},
        {"collection": "zz", "why": "deleted during the backup", "aliases": ["zz-alias"]}], report
    assert not (copy / "collections" / "zz").exists() and not (copy / "collections" / "late").exists()
    restored = ServerProcess(copy, model=default_model)
    try:
        restored.wait_ready()
        with httpx.Client(base_url=restored.url, headers=headers, timeout=60) as client:
            assert {c["name"] for c in client.get("/collections").json()["items"]} == {"default", "kept"}
            assert client.get("/aliases").json()["items"] == []
            assert client.get("/collections/kept/identities/kept-1").status_code == 200
            assert listed_identities(client) == {"alice"}
    finally:
        restored.stop()
