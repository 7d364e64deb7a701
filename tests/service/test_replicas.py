"""Two real replicas (uvicorn processes) on one real PostgreSQL + pgvector gallery, over HTTP.

What one replica acknowledges, the other sees at once; deletes are final everywhere; two replicas
enrolling one new identity end with one identity; a database outage gives 503
``database_unavailable`` on gallery routes only and heals by itself, a frozen primary (SIGSTOP) within a
bound; kill -9 loses nothing acknowledged.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter

import httpx
import psycopg
import pytest

from harness.pgproxy import PgFaultProxy
from tests.conftest import ENROLLED, b64, face_files, unknown_files
from tests.pg import PgTestServer
from tests.server import ServerProcess, listed_identities


@pytest.fixture(scope="module")
def database():
    server = PgTestServer()  # its own server: a test here stops and restarts it
    yield server
    server.close()


@pytest.fixture(scope="module")
def replica_env(database):
    return {"FACE_DATABASE_URL": database.url, "FACE_DATABASE_SCHEMA": database.fresh_schema(),
            "FACE_DATABASE_TIMEOUT_S": "2"}


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, default_model, replica_env):
    servers = [ServerProcess(tmp_path_factory.mktemp(f"replica{i}") / "data", model=default_model, env=replica_env)
               for i in range(2)]
    for s in servers:
        s.wait_ready()
    yield servers
    for s in servers:
        s.stop()


def client(server: ServerProcess) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=60)


def enroll(c: httpx.Client, identity: str, paths, **extra) -> httpx.Response:
    return c.post("/enroll", json={"identity_id": identity, "images": [b64(p) for p in paths], **extra})


def identify(c: httpx.Client, paths, top_k: int = 5) -> list[dict]:
    r = c.post("/identify", json={"images": [b64(p) for p in paths], "top_k": top_k})
    assert r.status_code == 200, r.text
    return r.json()["results"]


def test_enrolled_on_a_is_identified_by_b_at_once(replicas):
    a, b = replicas
    with client(a) as ca, client(b) as cb:
        for name in ENROLLED[:4]:
            assert enroll(ca, name, face_files(name)[:2]).status_code == 200
            # no wait, no refresh: B answers from the committed database
            assert identify(cb, [face_files(name)[2]])[0]["identity_id"] == name
        assert cb.get(f"/identities/{ENROLLED[0]}").json()["face_count"] == 2
        assert identify(cb, unknown_files()[:1])[0]["identity_id"] is None
        assert ca.get("/readyz").json()["gallery"] == cb.get("/readyz").json()["gallery"]
    assert not (a.data_dir / "gallery.sqlite3").exists()  # the gallery is in PostgreSQL, not the data dir


def test_deleted_through_a_is_never_returned_by_b_under_traffic(replicas):
    a, b = replicas
    victim, probe = ENROLLED[4], face_files(ENROLLED[4])[2]
    with client(a) as ca:
        assert enroll(ca, victim, face_files(victim)[:2]).status_code == 200
    acknowledged_at: list[float] = []
    violations, errors, stop, checked = [], [], threading.Event(), []

    def identify_forever():
        with client(b) as cb:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    results = identify(cb, [probe])
                except Exception as exc:  # noqa: BLE001
                    errors.append(exc)
                    return
                returned = {c["identity_id"] for c in results[0]["candidates"]}
                if acknowledged_at and started > acknowledged_at[0]:
                    checked.append(1)
                    if victim in returned:
                        violations.append(results)

    threads = [threading.Thread(target=identify_forever) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    with client(a) as ca:
        r = ca.delete(f"/identities/{victim}")
        acknowledged_at.append(time.monotonic())
        assert r.status_code == 200 and r.json()["deleted_faces"] == 2
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert not violations, violations[:1]
    assert len(checked) >= 3  # identifies that started after the delete was acknowledged
    with client(b) as cb:
        assert cb.get(f"/identities/{victim}").status_code == 404


def test_same_new_identity_from_both_replicas_is_one_identity(replicas):
    a, b = replicas
    name = ENROLLED[5]
    faces = face_files(name)
    for round_ in range(5):
        identity, barrier, responses = f"{name}-{round_}", threading.Barrier(2), {}

        def post(server, path):
            with client(server) as c:
                barrier.wait()
                responses[server.port] = enroll(c, identity, [path])

        threads = [threading.Thread(target=post, args=(a, faces[0])), threading.Thread(target=post, args=(b, faces[1]))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(r.status_code == 200 for r in responses.values()), [r.text for r in responses.values()]
        assert sorted(r.json()["created"] for r in responses.values()) == [False, True]
        with client(b) as cb:
            detail = cb.get(f"/identities/{identity}").json()
        assert detail["face_count"] == 2
        assert sorted(detail["face_ids"]) == sorted(f for r in responses.values() for f in r.json()["face_ids"])


def test_database_outage_gives_503_on_gallery_routes_and_heals(replicas, database):
    a, b = replicas
    face, other = face_files(ENROLLED[1])[2], face_files(ENROLLED[2])[0]
    database.stop()
    try:
        with client(a) as ca:
            gallery_calls = [
                ("POST", "/identify", {"json": {"images": [b64(face)]}}),
                ("POST", "/enroll", {"json": {"identity_id": "during-outage", "images": [b64(face)]}}),
                ("GET", "/identities", {}),
                ("GET", f"/identities/{ENROLLED[1]}", {}),
                ("DELETE", f"/identities/{ENROLLED[1]}", {}),
                ("POST", "/verify", {"json": {"image_a": b64(face), "identity_id": ENROLLED[1]}}),
                ("GET", "/readyz", {}),
            ]
            for method, path, kwargs in gallery_calls:
                r = ca.request(method, path, **kwargs)
                assert r.status_code == 503, (path, r.status_code, r.text)
                assert r.json()["error"]["code"] == "database_unavailable", (path, r.text)
            # what needs no gallery keeps working
            r = ca.post("/embed", json={"images": [b64(face)]})
            assert r.status_code == 200 and len(r.json()["embeddings"]) == 1
            r = ca.post("/verify", json={"image_a": b64(face), "image_b": b64(other)})
            assert r.status_code == 200 and r.json()["match"] is False
            assert ca.get("/healthz").status_code == 200
    finally:
        database.start()
    for server in (a, b):  # no restart of the service: its pool reconnects by itself
        deadline = time.monotonic() + 30
        with client(server) as c:
            while (r := c.post("/identify", json={"images": [b64(face)]})).status_code != 200:
                assert time.monotonic() < deadline, r.text
                time.sleep(0.5)
            assert r.json()["results"][0]["identity_id"] == ENROLLED[1]
            assert c.get("/identities/during-outage").status_code == 404  # refused, so not stored
            assert c.get("/readyz").status_code == 200


FROZEN_PRIMARY_BOUND_S = 10.0  # FACE_DATABASE_TIMEOUT_S (2) and the statement timeout (3 s) are 5 s: room on a busy box


def test_a_frozen_primary_answers_503_within_a_bound_and_heals(database, tmp_path, default_model):
    """Every process of the primary stopped (SIGSTOP: a paused VM, a partition that resets no connection):
    its idle pooled connections answer nothing and its statement_timeout never fires. Requests that need
    it (a stored key the key ring must read again, a lookup, a search, /metrics, /readyz) are answered
    503 database_unavailable within a bound, not when the primary answers again; after SIGCONT all heals."""
    env = {"FACE_DATABASE_URL": database.url, "FACE_DATABASE_SCHEMA": database.fresh_schema(),
           "FACE_DATABASE_TIMEOUT_S": "2", "FACE_DATABASE_STATEMENT_TIMEOUT_MS": "3000"}
    server = ServerProcess(tmp_path / "data", model=default_model, env=env)
    face = b64(face_files(ENROLLED[1])[0])
    calls = [("GET", f"/identities/{ENROLLED[1]}", {}), ("GET", "/metrics", {}), ("GET", "/readyz", {}),
             ("POST", "/identify", {"json": {"images": [face]}})]
    try:
        server.wait_ready()
        with client(server) as c:
            r = c.post("/keys", json={"role": "admin"})  # the first key: open mode ends, requests need keys
            assert r.status_code == 201, r.text
            key = {"X-API-Key": r.json()["secret"]}
            c.headers.update(key)
            assert enroll(c, ENROLLED[1], [face_files(ENROLLED[1])[1]]).status_code == 200

        def ask(method: str, path: str, kwargs: dict, answers: list) -> None:
            with httpx.Client(base_url=server.url, timeout=FROZEN_PRIMARY_BOUND_S, headers=key) as c:
                try:
                    r = c.request(method, path, **kwargs)
                except httpx.TimeoutException:
                    answers.append((path, f"no answer within {FROZEN_PRIMARY_BOUND_S:g} s"))
                    return
                if r.status_code != 200 and not (r.status_code == 503 and
                                                 r.json()["error"]["code"] == "database_unavailable"):
                    answers.append((path, r.status_code, r.text[:200]))

        def at_once(answers: list) -> None:
            threads = [threading.Thread(target=ask, args=(*call, answers)) for call in calls * 2]
            for t in threads:
                t.start()
            for t in threads:
                t.join(FROZEN_PRIMARY_BOUND_S + 30)

        at_once([])  # the pools' connections open and idle, as under traffic
        time.sleep(1.2)  # past the key cache's bound: the key ring must read the key again
        pids, bad = database.processes(), []
        try:
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            at_once(bad)  # each takes an idle connection the pool checks, or waits for one
            at_once(bad)
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        assert not bad, bad
        with client(server) as c:
            c.headers.update(key)
            deadline = time.monotonic() + 30
            while (r := c.get(f"/identities/{ENROLLED[1]}")).status_code != 200:
                assert time.monotonic() < deadline, r.text
                time.sleep(0.2)
            for method, path, kwargs in calls:
                assert c.request(method, path, **kwargs).status_code == 200, path
            assert enroll(c, ENROLLED[2], [face_files(ENROLLED[2])[0]]).status_code == 200
    finally:
        server.stop()


def test_database_restart_under_traffic_gives_only_200_or_503_and_loses_nothing(replicas, database):
    a, b = replicas
    face = b64(face_files(ENROLLED[3])[0])
    statuses: Counter = Counter()
    acknowledged, unexpected, lock, stop = [], [], threading.Lock(), threading.Event()

    def traffic(server: ServerProcess, worker: int) -> None:
        with client(server) as c:
            i = 0
            while not stop.is_set():
                identity = f"t{server.port}-{worker}-{i}"
                for path, body in (("/enroll", {"identity_id": identity, "images": [face]}),
                                   ("/identify", {"images": [face]})):
                    r = c.post(path, json=body)
                    with lock:
                        statuses[r.status_code] += 1
                        if r.status_code == 200 and path == "/enroll":
                            acknowledged.append(identity)
                        elif r.status_code != 200 and not (
                                r.status_code == 503 and r.json()["error"]["code"] == "database_unavailable"):
                            unexpected.append((path, r.status_code, r.text[:200]))
                i += 1

    threads = [threading.Thread(target=traffic, args=(s, w)) for s in (a, b) for w in range(2)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    database.stop()
    time.sleep(2.0)
    database.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # traffic goes on until both replicas answered 200 again
        with lock:
            before = statuses[200]
        time.sleep(1.0)
        with lock:
            if statuses[200] > before + 4:
                break
    stop.set()
    for t in threads:
        t.join(60)
    assert not unexpected, unexpected[:5]
    assert statuses[503] > 0 and statuses[200] > 0, statuses  # the outage was seen, and it healed
    with client(b) as cb:
        for identity in acknowledged:
            assert cb.get(f"/identities/{identity}").status_code == 200, identity


def test_kill9_of_a_replica_loses_nothing_acknowledged(replicas, tmp_path, default_model, replica_env):
    a, b = replicas
    faces = [b64(face_files(name)[0]) for name in ENROLLED]
    acknowledged: list[str] = []
    lock, stop = threading.Lock(), threading.Event()

    def enroll_forever(server: ServerProcess, worker: int) -> None:
        with client(server) as c:
            i = 0
            while not stop.is_set():
                identity = f"k{server.port}-{worker}-{i}"
                try:
                    r = c.post("/enroll", json={"identity_id": identity, "images": [faces[(worker + i) % len(faces)]]})
                except httpx.HTTPError:
                    if server is a:
                        return  # A died mid-request: not acknowledged
                    raise
                if r.status_code == 200:
                    with lock:
                        acknowledged.append(identity)
                i += 1

    threads = [threading.Thread(target=enroll_forever, args=(s, w)) for s in (a, b) for w in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < 40 and time.monotonic() < deadline:
        time.sleep(0.05)
    a.kill()  # SIGKILL while enrollments are in flight through both replicas
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(60)
    assert len(acknowledged) >= 40

    with client(b) as cb:
        missing = set(acknowledged) - listed_identities(cb)
        assert not missing, f"acknowledged but lost: {sorted(missing)[:10]}"
    # a fresh replica in A's place serves the same gallery
    replacement = ServerProcess(tmp_path / "data", model=default_model, env=replica_env)
    try:
        ready = replacement.wait_ready()
        assert ready["gallery"]["identities"] >= len(acknowledged)
        with client(replacement) as c:
            assert not set(acknowledged) - listed_identities(c)
    finally:
        replacement.stop()


def _wait_for_lock_waiters(url: str, n: int, timeout: float = 30) -> None:
    """Until n sessions of the database wait on a lock (the held writes, each on one pooled connection)."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(url, autocommit=True) as conn:
        while (waiting := conn.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
               .fetchone()[0]) < n:
            assert time.monotonic() < deadline, f"{waiting} of {n} writes wait on the lock"
            time.sleep(0.05)


def test_writes_holding_the_pool_leave_reads_answering_and_a_busy_pool_is_overloaded(
        database, tmp_path, default_model):
    """Issue 19 item 9: writes stuck behind a row lock hold every write connection. Reads still answer
    (they have a pool of their own), another write gets 503 overloaded + Retry-After, not
    database_unavailable; a stopped database still gives database_unavailable."""
    schema = database.fresh_schema()
    env = {"FACE_DATABASE_URL": database.url, "FACE_DATABASE_SCHEMA": schema, "FACE_DATABASE_POOL_SIZE": "2",
           "FACE_DATABASE_TIMEOUT_S": "1"}
    server = ServerProcess(tmp_path / "data", model=default_model, env=env)
    try:
        server.wait_ready()
        name, faces, other = ENROLLED[0], face_files(ENROLLED[0]), face_files(ENROLLED[1])
        with client(server) as c:
            assert enroll(c, "held", other[:1]).status_code == 200
            assert enroll(c, name, faces[:2]).status_code == 200
            held: list[httpx.Response] = []
            with psycopg.connect(database.url) as locker:  # a transaction holding the row lock of "held"
                locker.execute(f"SELECT 1 FROM {schema}.identities WHERE identity_id = 'held' FOR UPDATE")

                def write_held() -> None:
                    with client(server) as w:
                        held.append(enroll(w, "held", other[1:2]))

                writers = [threading.Thread(target=write_held) for _ in range(2)]  # = FACE_DATABASE_POOL_SIZE
                for t in writers:
                    t.start()
                _wait_for_lock_waiters(database.url, 2)
                for _ in range(3):  # reads keep answering, again and again (no fast-fail path)
                    assert identify(c, [faces[2]])[0]["identity_id"] == name
                    r = c.get("/identities")
                    assert r.status_code == 200, r.text
                    assert {i["identity_id"] for i in r.json()["items"]} == {"held", name}
                    assert c.get(f"/identities/{name}").json()["face_count"] == 2
                r = enroll(c, "another", other[2:3])
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "overloaded", r.text
                assert int(r.headers["Retry-After"]) >= 1
                locker.rollback()  # the lock goes: the held writes finish
            for t in writers:
                t.join(30)
            assert [r.status_code for r in held] == [200, 200], [r.text for r in held]
            assert c.get("/identities/another").status_code == 404  # refused, so not stored
            assert c.get("/identities/held").json()["face_count"] == 3
        database.stop()
        try:
            with client(server) as c:
                for method, path, kwargs in (("GET", "/identities", {}),
                                             ("POST", "/enroll", {"json": {"identity_id": "x", "images": [b64(faces[0])]}})):
                    r = c.request(method, path, **kwargs)
                    assert r.status_code == 503 and r.json()["error"]["code"] == "database_unavailable", r.text
        finally:
            database.start()
    finally:
        server.stop()


def test_keys_read_before_an_outage_keep_working_for_what_needs_no_gallery(tmp_path, default_model, database):
    """With keys in use, a key this replica has read keeps /embed working while the database is away (a
    revocation is a write to that database: nothing can have changed); a key it never read cannot be
    checked: 503, never a 200 or a 401 guessed."""
    env = {"FACE_DATABASE_URL": database.url, "FACE_DATABASE_SCHEMA": database.fresh_schema(),
           "FACE_DATABASE_TIMEOUT_S": "2", "FACE_API_KEY": "environment-admin-key-0123456789"}
    server = ServerProcess(tmp_path / "data", model=default_model, env=env)
    try:
        server.wait_ready()
        admin = {"X-API-Key": env["FACE_API_KEY"]}
        made = [httpx.post(server.url + "/keys", json={"role": "embed"}, headers=admin, timeout=30).json()
                for _ in range(2)]
        known, unread = ({"X-API-Key": m["secret"]} for m in made)
        face = {"images": [b64(face_files(ENROLLED[1])[0])]}
        assert httpx.post(server.url + "/embed", json=face, headers=known, timeout=60).status_code == 200
        database.stop()
        try:
            time.sleep(1.2)  # past the key cache's bound: the replica must ask the database again
            with httpx.Client(base_url=server.url, timeout=60) as c:
                assert c.post("/embed", json=face, headers=known).status_code == 200
                assert c.post("/embed", json=face, headers=admin).status_code == 200  # the environment's key
                r = c.post("/embed", json=face, headers=unread)
                assert r.status_code == 503 and r.json()["error"]["code"] == "database_unavailable"
                assert c.post("/embed", json=face).status_code == 401
        finally:
            database.start()
    finally:
        server.stop()


def test_a_commit_whose_answer_is_lost_is_write_outcome_unknown_and_one_cut_before_it_is_unavailable(
        database, tmp_path, default_model):
    """A write whose COMMIT reached PostgreSQL but whose answer was lost (the connection cut meanwhile) was
    answered 503 database_unavailable ("retry later"): faceclient sent the enroll again and stored its faces
    twice. Now it is 503 write_outcome_unknown, without Retry-After, stored once (nothing ran it again); a
    connection cut before the COMMIT is still database_unavailable, nothing stored, and a retry stores it
    once. A collection's creation goes through the same commit."""
    proxy = PgFaultProxy(database.url)
    env = {"FACE_DATABASE_URL": proxy.url, "FACE_DATABASE_SCHEMA": database.fresh_schema(),
           "FACE_DATABASE_TIMEOUT_S": "2"}
    server = ServerProcess(tmp_path / "data", model=default_model, env=env)
    try:
        server.wait_ready()
        faces = face_files(ENROLLED[0])
        with client(server) as c:
            assert enroll(c, "colin", faces[:1]).status_code == 200
            proxy.arm("lost_commit_reply", b"INSERT INTO faces")
            r = enroll(c, "colin", faces[1:2])
            assert proxy.fired.is_set()
            assert r.status_code == 503 and r.json()["error"]["code"] == "write_outcome_unknown", r.text
            assert "Retry-After" not in r.headers
            assert c.get("/identities/colin").json()["face_count"] == 2  # committed, once

            proxy.arm("before_commit", b"INSERT INTO faces")
            r = enroll(c, "colin", faces[2:3])
            assert proxy.fired.is_set()
            assert r.status_code == 503 and r.json()["error"]["code"] == "database_unavailable", r.text
            assert c.get("/identities/colin").json()["face_count"] == 2  # rolled back
            assert enroll(c, "colin", faces[2:3]).status_code == 200  # so a retry is safe
            assert c.get("/identities/colin").json()["face_count"] == 3

            proxy.arm("lost_commit_reply", b"INSERT INTO collections")
            r = c.post("/collections", json={"name": "made"})
            assert proxy.fired.is_set()
            assert r.status_code == 503 and r.json()["error"]["code"] == "write_outcome_unknown", r.text
            assert c.get("/collections/made").status_code == 200
    finally:
        server.stop()
        proxy.close()
