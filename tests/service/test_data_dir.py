"""The data dir over real server processes: one server per dir, damaged snapshots, erasure on disk,
background loading."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from bench.gallery_fill import fill_store
from service.model.contract import read_contract
from tests.conftest import ENROLLED, b64, face_files, metric
from tests.damage import damage_pages
from tests.gallery.traces import find_vector
from tests.server import REPO, ServerProcess


@pytest.fixture
def spawn():
    """ServerProcess, killed at teardown if a failed test left it running."""
    started: list[ServerProcess] = []

    def start(*args, **kwargs) -> ServerProcess:
        started.append(ServerProcess(*args, **kwargs))
        return started[-1]

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(30)


def enroll(c: httpx.Client, names) -> None:
    for name in names:
        r = c.post("/enroll", json={"identity_id": name, "images": [b64(p) for p in face_files(name)[:2]]})
        assert r.status_code == 200, r.text


def identifies(c: httpx.Client, names) -> list:
    r = c.post("/identify", json={"images": [b64(face_files(n)[2]) for n in names]})
    assert r.status_code == 200, r.text
    return [x["identity_id"] for x in r.json()["results"]]


def test_second_server_on_the_same_data_dir_refuses_to_start(tmp_path, spawn, default_model):
    data = tmp_path / "data"
    first = spawn(data, model=default_model)
    first.wait_ready()
    second = spawn(data, model=default_model)
    with pytest.raises(RuntimeError, match="exited"):
        second.wait_ready(timeout=90)
    assert second.proc.returncode not in (0, None)
    assert "is in use by another process" in second.log() and f"pid {first.proc.pid}" in second.log()
    refusal = [line for line in second.log().splitlines() if "could not start" in line]
    assert len(refusal) == 1 and f"pid {first.proc.pid}" in refusal[0]  # one line says why,
    assert "Traceback" not in second.log()  # without the 60 lines of a stack a misconfiguration is not
    second.stop()
    with httpx.Client(base_url=first.url, timeout=60) as c:  # the first one is untouched
        enroll(c, ENROLLED[:2])
        assert identifies(c, ENROLLED[:2]) == ENROLLED[:2]
    first.kill()  # the kernel drops a dead process's lock: the next server starts
    third = spawn(data, model=default_model)
    third.wait_ready()
    third.stop()


@pytest.fixture
def usual_umask():
    """The usual umask (022) for the processes the test starts (pytest's own directories are 0700
    whatever it is); the test process's own restored after."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_a_data_dir_the_service_makes_is_its_owners_alone(tmp_path, spawn, default_model, usual_umask):
    """Faces' embeddings, kept crops, key hashes and the audit trail: a data dir the server or a command
    makes is 0700 whatever the umask (0755 before: readable by every user of the host), as the backup's
    copy is; one the operator made readable by others is served as it is, with one warning saying so, and
    so is a crop key or pepper file others may read."""
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    made = {"server": shared / "srv" / "data", "command": shared / "cmd" / "data"}
    server = spawn(made["server"], model=default_model)
    server.wait_ready()
    server.stop()
    keys = subprocess.run([sys.executable, "-m", "service", "keys", "create", "--role", "admin"], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "FACE_DATA_DIR": str(made["command"])})
    assert keys.returncode == 0, keys.stderr
    for who, data in made.items():
        assert stat.S_IMODE(data.stat().st_mode) == 0o700, who
        assert stat.S_IMODE(data.parent.stat().st_mode) == 0o755, who  # the folders above: the umask's
    assert "data dir readable by other users" not in server.log_path.read_text()

    opened = shared / "opened"
    opened.mkdir(mode=0o755)
    secrets = {"FACE_CROP_KEY_FILE": tmp_path / "crop.key", "FACE_KEY_PEPPER_FILE": tmp_path / "pepper"}
    made_key = subprocess.run([sys.executable, "-m", "service", "crop-key", "new", str(secrets["FACE_CROP_KEY_FILE"])],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
    assert made_key.returncode == 0, made_key.stderr
    secrets["FACE_KEY_PEPPER_FILE"].write_bytes(os.urandom(32))
    for path in secrets.values():
        path.chmod(0o644)  # readable by every user of the host
    server = spawn(opened, model=default_model, env={name: str(path) for name, path in secrets.items()})
    server.wait_ready()
    server.stop()
    assert stat.S_IMODE(opened.stat().st_mode) == 0o755  # the operator's choice, left as it is
    log = server.log_path.read_text().splitlines()
    warned = [line for line in log if "data dir readable by other users" in line]
    assert len(warned) == 1 and '"mode": "0755"' in warned[0] and "chmod 700" in warned[0], warned
    for setting in secrets:  # the secret files alike (FACE_TLS_KEY_FILE's own check: test_tls.py)
        warned = [line for line in log if "secret file readable by other users" in line and setting in line]
        assert len(warned) == 1 and '"mode": "0644"' in warned[0] and "chmod 600" in warned[0], (setting, warned)


def test_a_data_dir_that_is_a_file_is_one_error_line_for_the_server_and_each_command(tmp_path, spawn, default_model):
    """FACE_DATA_DIR naming a file (or, where the tests run as root and cannot show it, a directory this
    process may not write): the server exits with one ``could not start`` line, each command with
    ``error: ...``, naming the path and why; each was a traceback (FileExistsError from mkdir)."""
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("x")
    server = spawn(a_file, model=default_model)
    with pytest.raises(RuntimeError, match="exited"):
        server.wait_ready(timeout=90)
    refusal = [line for line in server.log().splitlines() if "could not start" in line]
    assert len(refusal) == 1 and "not-a-dir" in refusal[0] and "it is a file" in refusal[0], server.log()[-2000:]
    assert "Traceback" not in server.log()
    for command in (["keys", "list"], ["audit", "export"], ["gallery", "export", str(tmp_path / "out.jsonl")]):
        r = subprocess.run([sys.executable, "-m", "service", command[0], "--data-dir", str(a_file), "--model",
                            str(default_model), *command[1:]], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and "not-a-dir" in r.stderr, (command, r.stderr)
        assert "Traceback" not in r.stderr, (command, r.stderr)
    assert a_file.read_text() == "x"


@pytest.mark.parametrize("store", ["gallery.sqlite3", "catalog.sqlite3", "collections/site-b/gallery.sqlite3",
                                   "gallery.sqlite3:pages", "catalog.sqlite3:pages", "catalog.sqlite3:keys"])
def test_a_damaged_store_is_one_error_line_naming_it_for_the_server_and_each_command(tmp_path, spawn, default_model,
                                                                                      store):
    """A store that is no longer a SQLite database, as a bad restore or a disk fault leaves it: with the
    catalog's, the server refuses to start, with one ``could not start`` line naming the file and what
    to do (it was a traceback: "file is not a database"); a collection's, the default one's too, is
    contained instead (the next tests: the default's stopped the start too). Each command that reads it
    says it in one ``error:`` line. The file is left as it was. ``:pages``: the file is a database
    whose pages after the first are damaged (the catalog's was a traceback still); ``:keys``: only the
    pages of the catalog's keys (read after the catalog opened: a traceback too, and each command's)."""
    store, _, pages = store.partition(":")
    data = tmp_path / "data"
    server = spawn(data, model=default_model)
    server.wait_ready()
    with httpx.Client(base_url=server.url, timeout=60) as c:
        enroll(c, ENROLLED[:1])
        assert c.post("/collections", json={"name": "site-b"}).status_code == 201
        r = c.post("/collections/site-b/enroll", json={"identity_id": "b", "images": [b64(face_files(ENROLLED[1])[0])]})
        assert r.status_code == 200, r.text
        if pages == "keys":  # the keys' own pages, beyond the catalog's first ones
            admin = c.post("/keys", json={"role": "admin"}).json()["secret"]  # the first key ends open mode
            for _ in range(12):
                r = c.post("/keys", json={"role": "read", "note": "n" * 500}, headers={"X-API-Key": admin})
                assert r.status_code == 201, r.text
    server.stop()
    damaged = data / store
    with sqlite3.connect(damaged) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for leftover in (damaged.with_name(damaged.name + "-wal"), damaged.with_name(damaged.name + "-shm")):
        leftover.unlink(missing_ok=True)
    if pages:
        damage_pages(damaged, 41, table="keys" if pages == "keys" else None)
    else:
        damaged.write_bytes(np.random.default_rng(41).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    garbage = damaged.read_bytes()
    if store != "catalog.sqlite3":  # contained: the service starts, and serves the other collection
        server = spawn(data, model=default_model)
        server.wait_ready(timeout=90)
        with httpx.Client(base_url=server.url, timeout=60) as c:
            if store.startswith("collections/"):
                assert identifies(c, ENROLLED[:1]) == ENROLLED[:1]
            else:
                r = c.get("/collections/site-b/identities")
                assert r.status_code == 200 and [i["identity_id"] for i in r.json()["items"]] == ["b"], r.text
                assert c.get("/identities").json()["error"]["code"] == "collection_damaged"
        server.stop()
    else:
        server = spawn(data, model=default_model)
        with pytest.raises(RuntimeError, match="exited"):
            server.wait_ready(timeout=90)
        assert server.proc.returncode == 3
        refusal = [line for line in server.log().splitlines() if "could not start" in line]
        assert len(refusal) == 1 and str(damaged) in refusal[0] and "is not a SQLite database" in refusal[0], \
            server.log()[-2000:]
        assert "backup" in refusal[0] and "Traceback" not in server.log()
    for command in (["keys", "list"], ["gallery", "export", str(tmp_path / "out.jsonl")],
                    ["gallery", "export", str(tmp_path / "b.jsonl"), "--collection", "site-b"]):
        r = subprocess.run([sys.executable, "-m", "service", command[0], "--data-dir", str(data), "--model",
                            str(default_model), *command[1:]], cwd=REPO, capture_output=True, text=True, timeout=120)
        if r.returncode == 0:  # a command that never reads the damaged pages (keys: the catalog's keys only)
            assert store != "catalog.sqlite3" or (pages == "keys" and command[0] == "gallery"), (command, r.stdout)
            assert not store.startswith("collections/site-b") or "site-b" not in command, (command, r.stdout)
            continue
        assert r.returncode == 2 and r.stderr.startswith("error: ") and str(damaged) in r.stderr, (command, r.stderr)
        assert "Traceback" not in r.stderr, (command, r.stderr)
    assert damaged.read_bytes() == garbage


def test_a_damaged_collection_is_contained_and_the_others_serve(tmp_path, spawn, default_model):
    """Another collection's store damaged (site-b: no database at all; site-c: its pages, found on
    reading them): the server starts and the default collection serves; every request to a damaged
    one is 503 ``collection_damaged`` naming it (a listing was a 500, a start-up refusal before that);
    ``GET /collections`` says ``damaged``; the log names each file once, with no traceback; nothing is
    written to them. Restored, site-c serves its faces again without a restart; site-b is deleted (its
    garbage overwritten and removed: a traceback once), audited as damaged, and its name used again."""
    data = tmp_path / "data"
    server = spawn(data, model=default_model)
    server.wait_ready()
    with httpx.Client(base_url=server.url, timeout=60) as c:
        enroll(c, ENROLLED[:1])
        for name, people in (("site-b", ENROLLED[1:3]), ("site-c", ENROLLED[3:5])):
            assert c.post("/collections", json={"name": name}).status_code == 201
            for person in people:
                r = c.post(f"/collections/{name}/enroll", json={
                    "identity_id": person, "metadata": {"note": "x" * 3000},  # more pages than the first
                    "images": [b64(p) for p in face_files(person)[:2]]})
                assert r.status_code == 200, r.text
    server.stop()
    stores = {name: data / "collections" / name / "gallery.sqlite3" for name in ("site-b", "site-c")}
    for store in stores.values():
        with sqlite3.connect(store) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        for leftover in (store.with_name(store.name + "-wal"), store.with_name(store.name + "-shm")):
            leftover.unlink(missing_ok=True)
    good_c = stores["site-c"].read_bytes()
    stores["site-b"].write_bytes(np.random.default_rng(42).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    damage_pages(stores["site-c"], 43)
    damaged = {name: store.read_bytes() for name, store in stores.items()}

    server = spawn(data, model=default_model)
    server.wait_ready(timeout=90)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        listed = {item["name"]: item for item in c.get("/collections").json()["items"]}
        assert [n for n, item in listed.items() if item["damaged"]] == ["site-b", "site-c"], listed
        assert listed["site-b"]["faces"] == 0 and listed["default"]["faces"] == 2
        assert c.get("/collections/site-c").json()["damaged"] is True
        ready = c.get("/readyz").json()  # ready: the default collection serves; the damaged ones are named
        assert ready["status"] == "ready" and ready["collections"]["site-b"]["damaged"] is True
        assert ready["collections"]["default"]["damaged"] is False
        probe = [b64(face_files(ENROLLED[1])[2])]
        for name in ("site-b", "site-c"):
            for method, path, body in (
                    ("GET", "identities", None), ("GET", f"identities/{ENROLLED[1]}", None),
                    ("POST", "identify", {"images": probe}), ("POST", "verify", {"image_a": probe[0], "identity_id": ENROLLED[1]}),
                    ("POST", "enroll", {"identity_id": "new", "images": probe}),
                    ("DELETE", f"identities/{ENROLLED[3]}", None), ("GET", "duplicates", None),
                    ("POST", "faces/delete", {"face_ids": [1]})):
                r = c.request(method, f"/collections/{name}/{path}", json=body)
                assert r.status_code == 503, (name, path, r.status_code, r.text)
                assert r.json()["error"]["code"] == "collection_damaged", r.text
                assert r.json()["error"]["details"] == {"collection": name}
                assert str(data) not in r.text  # the file is for the operator's log, not for clients
        r = c.get("/audit")  # the whole trail cannot be read: said, not a page silently left out
        assert r.status_code == 503 and r.json()["error"]["details"] == {"collection": "site-b"}, r.text
        assert c.get("/audit", params={"collection": "default"}).status_code == 200
        assert identifies(c, ENROLLED[:1]) == ENROLLED[:1]  # the default collection serves on, reads and writes
        enroll(c, ENROLLED[5:6])
        lines = server.log_path.read_text().splitlines()  # the whole log (log(): its end)
        for name, store in stores.items():
            found = [line for line in lines if "collection damaged" in line and f'"collection": "{name}"' in line]
            assert len(found) == 1 and str(store) in found[0], lines[-20:]
            assert store.read_bytes() == damaged[name]  # nothing was written to it
        assert not [line for line in lines if "Traceback" in line]

        stores["site-c"].write_bytes(good_c)  # restored from a backup, the server running
        r = c.get("/collections/site-c/identities")
        assert r.status_code == 200 and sorted(i["identity_id"] for i in r.json()["items"]) == sorted(ENROLLED[3:5])
        r = c.post("/collections/site-c/identify", json={"images": [b64(face_files(ENROLLED[3])[2])]})
        assert r.status_code == 200 and r.json()["results"][0]["identity_id"] == ENROLLED[3], r.text
        assert c.get("/collections/site-c").json()["damaged"] is False
        assert metric(c, "face_collections_damaged") == 1  # site-b

        r = c.delete("/collections/site-b")
        assert r.status_code == 200, r.text
        assert not (data / "collections" / "site-b").exists()
        trail = c.get("/audit", params={"collection": "site-b"}).json()["items"]
        assert [e["details"] for e in trail if e["action"] == "collection.deleted"] == [
            {"identities": 0, "faces": 0, "damaged": True}], trail
        assert c.post("/collections", json={"name": "site-b"}).status_code == 201
        assert c.get("/collections/site-b/identities").json()["items"] == []
    assert "Traceback" not in server.log_path.read_text()


@pytest.mark.parametrize("damage", ["garbage", "pages", "faces"])
def test_a_damaged_default_collection_is_contained_and_the_others_serve(tmp_path, spawn, default_model, damage):
    """The default collection's store damaged (no database at all; its pages; only its faces' pages, which
    the store opens with and the index load meets): the server starts (it refused to, exit 3, though
    every other collection was whole; "faces": /readyz stayed 503 gallery_unavailable), /readyz is ready
    and names it damaged, every unkeyed gallery request is 503 ``collection_damaged`` naming
    ``default``, /embed and the other collections serve, the log names the file once; the data dir stays
    locked (a second server refuses it); nothing is written to the file; restored while the server runs,
    it serves its faces again on its next use ("faces": it took a restart)."""
    data = tmp_path / "data"
    server = spawn(data, model=default_model)
    server.wait_ready()
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for person in ENROLLED[:2]:
            r = c.post("/enroll", json={"identity_id": person, "metadata": {"note": "x" * 3000},
                                        "images": [b64(p) for p in face_files(person)[:2]]})
            assert r.status_code == 200, r.text
        assert c.post("/collections", json={"name": "site-b"}).status_code == 201
        for person in ENROLLED[2:4]:
            r = c.post("/collections/site-b/enroll", json={"identity_id": person,
                                                           "images": [b64(p) for p in face_files(person)[:2]]})
            assert r.status_code == 200, r.text
    server.stop()
    store = data / "gallery.sqlite3"
    with sqlite3.connect(store) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for leftover in (store.with_name(store.name + "-wal"), store.with_name(store.name + "-shm")):
        leftover.unlink(missing_ok=True)
    whole = store.read_bytes()
    if damage != "garbage":
        damage_pages(store, 44, table="faces" if damage == "faces" else None)
    else:
        store.write_bytes(np.random.default_rng(44).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    damaged = store.read_bytes()

    server = spawn(data, model=default_model)
    ready = server.wait_ready(timeout=90)
    assert ready["status"] == "ready" and ready["collections"]["default"]["damaged"] is True, ready
    assert ready["collections"]["site-b"]["damaged"] is False and ready["collections"]["site-b"]["identities"] == 2
    with httpx.Client(base_url=server.url, timeout=60) as c:
        probe = b64(face_files(ENROLLED[0])[2])
        for method, path, body in (("GET", "/identities", None), ("GET", f"/identities/{ENROLLED[0]}", None),
                                   ("POST", "/identify", {"images": [probe]}),
                                   ("POST", "/verify", {"image_a": probe, "identity_id": ENROLLED[0]}),
                                   ("POST", "/enroll", {"identity_id": "new", "images": [probe]}),
                                   ("DELETE", f"/identities/{ENROLLED[1]}", None)):
            r = c.request(method, path, json=body)
            assert r.status_code == 503, (path, r.status_code, r.text)
            assert r.json()["error"]["code"] == "collection_damaged", r.text
            assert r.json()["error"]["details"] == {"collection": "default"}
        assert c.post("/embed", json={"images": [probe]}).status_code == 200
        listed = {item["name"]: item["damaged"] for item in c.get("/collections").json()["items"]}
        assert listed == {"default": True, "site-b": False}
        r = c.post("/collections/site-b/identify", json={"images": [b64(face_files(ENROLLED[2])[2])]})
        assert r.status_code == 200 and r.json()["results"][0]["identity_id"] == ENROLLED[2], r.text
        r = c.post("/collections/site-b/enroll", json={"identity_id": ENROLLED[4],
                                                       "images": [b64(face_files(ENROLLED[4])[0])]})
        assert r.status_code == 200, r.text
        assert metric(c, "face_collections_damaged") == 1

        second = spawn(data, model=default_model)  # the data dir is still this server's
        with pytest.raises(RuntimeError, match="exited"):
            second.wait_ready(timeout=90)
        assert "is in use by another process" in second.log_path.read_text()

        lines = server.log_path.read_text().splitlines()
        found = [line for line in lines if "collection damaged" in line and '"collection": "default"' in line]
        assert len(found) == 1 and str(store) in found[0], lines[-20:]
        assert not [line for line in lines if "Traceback" in line]
        assert store.read_bytes() == damaged  # nothing was written to it

        store.write_bytes(whole)  # restored from a backup, the server running
        r = c.get("/identities")
        assert r.status_code == 200 and sorted(i["identity_id"] for i in r.json()["items"]) == sorted(ENROLLED[:2])
        assert identifies(c, ENROLLED[:2]) == ENROLLED[:2]
        enroll(c, ENROLLED[5:6])
        assert c.get("/readyz").json()["collections"]["default"]["damaged"] is False
        assert metric(c, "face_collections_damaged") == 0
        assert '"event": "collection readable again"' in server.log_path.read_text()
    server.stop()
    assert "Traceback" not in server.log_path.read_text()


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_snapshot_does_not_crash_the_server(tmp_path, spawn, default_model, damage):
    data = tmp_path / "data"
    server = spawn(data, model=default_model)
    server.wait_ready()
    with httpx.Client(base_url=server.url, timeout=60) as c:
        enroll(c, ENROLLED[:4])
    server.stop()  # snapshot written
    snapshot = data / "index.hnsw"
    raw = bytearray(snapshot.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 3]
    else:
        for pos in range(100, len(raw), 211):
            raw[pos] ^= 0xFF
    snapshot.write_bytes(bytes(raw))
    server = spawn(data, model=default_model)
    ready = server.wait_ready()
    assert '"source": "rebuilt"' in server.log()
    assert ready["gallery"]["index_live"] == ready["gallery"]["faces"] == 8
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert identifies(c, ENROLLED[:4]) == ENROLLED[:4]
    server.stop()


def stored_embeddings(data, identity: str) -> list[np.ndarray]:
    conn = sqlite3.connect(f"file:{data / 'gallery.sqlite3'}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT embedding FROM faces WHERE identity_id = ?", (identity,)).fetchall()
    finally:
        conn.close()
    return [np.frombuffer(r[0], dtype=np.float32) for r in rows]


@pytest.mark.parametrize("ending", ["stop", "kill"])
def test_deleted_face_leaves_no_trace_in_the_data_dir(tmp_path, spawn, default_model, ending):
    data = tmp_path / "data"
    server = spawn(data, model=default_model, env={"FACE_SNAPSHOT_INTERVAL_S": "0.5"})
    server.wait_ready()
    secret = ENROLLED[3]
    with httpx.Client(base_url=server.url, timeout=60) as c:
        enroll(c, ENROLLED[:4])
        vectors = stored_embeddings(data, secret)
        assert len(vectors) == 2
        deadline = time.monotonic() + 30  # wait for a background snapshot holding the secret faces
        while time.monotonic() < deadline and not all("index.hnsw" in find_vector(data, v) for v in vectors):
            time.sleep(0.2)
        assert "index.hnsw" in find_vector(data, vectors[0])
        assert c.delete(f"/identities/{secret}").status_code == 200
        enroll(c, ENROLLED[4:5])
    if ending == "stop":
        server.stop()
    else:
        server.kill()
    for v in vectors:
        assert not find_vector(data, v), f"{ending}: deleted vector still in {find_vector(data, v)}"
    server = spawn(data, model=default_model)
    server.wait_ready()
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert identifies(c, ENROLLED[:5]) == ENROLLED[:3] + [None] + ENROLLED[4:5]
    server.stop()
    for v in vectors:
        assert not find_vector(data, v), f"after restart: deleted vector still in {find_vector(data, v)}"


def test_gallery_loads_in_the_background(tmp_path, spawn, default_model):
    data = tmp_path / "data"
    contract = read_contract(default_model)
    fill_store(data, contract.model_id, contract.embedding_size, faces=20_000)
    server = spawn(data, model=default_model)
    face = b64(face_files(ENROLLED[0])[0])
    seen_loading = False
    deadline = time.monotonic() + 300
    with httpx.Client(base_url=server.url, timeout=30) as c:
        while time.monotonic() < deadline:
            try:
                health = c.get("/healthz")
            except httpx.TransportError:
                assert server.proc.poll() is None, server.log()
                time.sleep(0.1)
                continue
            assert health.status_code == 200
            ready = c.get("/readyz")
            if ready.status_code == 200:
                break
            body = ready.json()["error"]
            assert ready.status_code == 503 and body["code"] == "gallery_loading", ready.text
            assert body["details"]["status"] == "loading"
            if not seen_loading:
                seen_loading = True
                for method, path, kwargs in [("POST", "/identify", {"json": {"images": [face]}}),
                                             ("POST", "/enroll", {"json": {"identity_id": "x", "images": [face]}}),
                                             ("DELETE", "/identities/syn00000001", {})]:
                    r = c.request(method, path, **kwargs)
                    assert r.status_code == 503 and r.json()["error"]["code"] == "gallery_loading", r.text
                assert c.get("/identities", params={"limit": 2}).status_code == 200  # the store answers
            time.sleep(0.2)
        assert seen_loading, "the gallery was never seen loading"
        assert ready.status_code == 200 and ready.json()["gallery"]["index_live"] == 20_000
        assert c.post("/identify", json={"images": [face]}).status_code == 200
    server.stop()
