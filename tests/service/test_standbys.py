"""Reads on a real PostgreSQL streaming-replication standby (FACE_DATABASE_READ_URLS), over HTTP.

A real primary and a real hot standby made by the test from the same wheel (pg_basebackup -R), and
the real service: read-your-writes with the Face-Consistency-Token, deletes never returned by a
standby read under load, the standby stopped and restarted under traffic without a failed request,
a lagging standby (replay paused) left out until it catches up, a frozen standby (its processes
stopped: a paused VM, a partition) left out with the reads on it answered by the primary and holding
up no other standby's lag checks, writes whose lookups a lagging standby would answer wrongly decided
on the primary (the enroll guards too), and damaged blocks on a standby read from the primary.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import threading
import time

import httpx
import pytest

from tests.conftest import ENROLLED, b64, face_files, metric
from tests.pg import PgTestServer
from tests.server import ServerProcess

TOKEN = "Face-Consistency-Token"


@pytest.fixture(scope="module")
def cluster():
    primary = PgTestServer()
    standby = primary.standby()
    yield primary, standby
    primary.close()


@pytest.fixture(scope="module")
def schema() -> str:
    return PgTestServer.fresh_schema()


@pytest.fixture(scope="module")
def service(cluster, schema, tmp_path_factory, default_model):
    primary, standby = cluster
    server = ServerProcess(tmp_path_factory.mktemp("standbys") / "data", model=default_model, env={
        "FACE_DATABASE_URL": primary.url, "FACE_DATABASE_SCHEMA": schema,
        "FACE_DATABASE_READ_URLS": standby.url, "FACE_DATABASE_TIMEOUT_S": "2", "FACE_DATABASE_LAG_CHECK_MS": "100",
        "FACE_DATABASE_MAX_LAG_MS": "3000", "FACE_DATABASE_READ_WAIT_MS": "200"})
    server.wait_ready()
    yield server
    server.stop()


@pytest.fixture
def slow_standby(cluster):
    """The standby applies each commit 1 s late (longer than FACE_DATABASE_READ_WAIT_MS, shorter than
    FACE_DATABASE_MAX_LAG_MS): without the token, reads there would miss the client's own writes."""
    cluster[1].apply_delay(1000)
    yield
    cluster[1].apply_delay(0)


def standby_label(cluster) -> str:
    return f'standby="{cluster[1].socket_dir}:5432/postgres"'


def standby_reads(c: httpx.Client, cluster) -> float:
    return metric(c, f'face_database_reads_total{{role="standby",target="{cluster[1].socket_dir}:5432/postgres"}}')


def primary_reads(c: httpx.Client) -> float:
    return metric(c, 'face_database_reads_total{role="primary",target="primary"}')


def in_rotation(c: httpx.Client, cluster) -> bool:
    return metric(c, f"face_database_standby_in_rotation{{{standby_label(cluster)}}}") == 1.0


def wait_rotation(c: httpx.Client, cluster, wanted: bool, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while in_rotation(c, cluster) != wanted:
        assert time.monotonic() < deadline, f"standby in rotation is not {wanted}"
        time.sleep(0.1)


def enroll(c: httpx.Client, identity: str, path, token: str | None = None) -> httpx.Response:
    headers = {TOKEN: token} if token else {}
    return c.post("/enroll", json={"identity_id": identity, "images": [b64(path)]}, headers=headers)


def identify(c: httpx.Client, path, token: str | None) -> httpx.Response:
    return c.post("/identify", json={"images": [b64(path)], "top_k": 5}, headers={TOKEN: token} if token else {})


def test_a_client_reads_its_own_enrollment_from_the_standby(service, cluster, slow_standby):
    with httpx.Client(base_url=service.url, timeout=60) as c:
        wait_rotation(c, cluster, True)
        behind = metric(c, f"face_database_standby_behind_total{{{standby_label(cluster)}}}")
        for name in ENROLLED[:4]:
            r = enroll(c, name, face_files(name)[0])
            assert r.status_code == 200, r.text
            token = r.headers[TOKEN]  # the commit's WAL position
            c.cookies.clear()  # the header alone carries it here
            found = identify(c, face_files(name)[1], token)
            assert found.status_code == 200 and found.json()["results"][0]["identity_id"] == name, found.text
            assert c.get(f"/identities/{name}", headers={TOKEN: token}).json()["face_count"] == 1
        # the standby had not applied them within the wait: the primary answered
        assert metric(c, f"face_database_standby_behind_total{{{standby_label(cluster)}}}") > behind
        time.sleep(1.5)  # now it has: the same token is read there
        before = standby_reads(c, cluster)
        assert c.get(f"/identities/{ENROLLED[3]}", headers={TOKEN: token}).json()["face_count"] == 1
        assert standby_reads(c, cluster) == before + 1
        assert not math.isnan(metric(c, f"face_database_standby_lag_seconds{{{standby_label(cluster)}}}"))
        # the cookie does the same for a browser (or curl -b/-c): no header needed
        r = enroll(c, ENROLLED[4], face_files(ENROLLED[4])[0])
        assert c.cookies.get("face_consistency_token") == r.headers[TOKEN]
        assert identify(c, face_files(ENROLLED[4])[1], None).json()["results"][0]["identity_id"] == ENROLLED[4]
        bad = c.get("/identities", headers={TOKEN: "not-a-position"})
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_request", bad.text


def test_deletes_acknowledged_are_never_returned_by_a_standby_read_under_load(service, cluster, slow_standby):
    victims = ENROLLED[5:8]
    with httpx.Client(base_url=service.url, timeout=60) as c:
        wait_rotation(c, cluster, True)
        for name in victims:
            assert enroll(c, name, face_files(name)[0]).status_code == 200
        before = standby_reads(c, cluster)
    lock, stop = threading.Lock(), threading.Event()
    gone: set[str] = set()
    latest: list[str] = []  # the token of the last acknowledged delete, which every reader forwards
    violations, errors, checked = [], [], []

    def reader(worker: int) -> None:
        with httpx.Client(base_url=service.url, timeout=60) as c:
            i = 0
            while not stop.is_set():
                name = victims[(worker + i) % len(victims)]
                with lock:
                    deleted, token = set(gone), (latest[-1] if latest else None)
                r = identify(c, face_files(name)[1], token)
                i += 1
                if r.status_code != 200:
                    errors.append(r.text)
                    continue
                returned = {m["identity_id"] for m in r.json()["results"][0]["candidates"]}
                checked.append(1)
                if returned & deleted:
                    violations.append((returned & deleted, token))

    def writer() -> None:  # more load: enrollments going on meanwhile
        with httpx.Client(base_url=service.url, timeout=60) as c:
            i = 0
            while not stop.is_set():
                r = enroll(c, f"load-{i}", face_files(ENROLLED[i % 4])[2])
                if r.status_code != 200:
                    errors.append(r.text)
                i += 1

    threads = [threading.Thread(target=reader, args=(w,)) for w in range(3)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    with httpx.Client(base_url=service.url, timeout=60) as c:
        for name in victims:
            r = c.delete(f"/identities/{name}")
            assert r.status_code == 200, r.text
            with lock:
                gone.add(name)
                latest.append(r.headers[TOKEN])
            time.sleep(0.7)
    stop.set()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    assert not violations, violations[:3]
    assert len(checked) >= 10
    with httpx.Client(base_url=service.url, timeout=60) as c:
        assert standby_reads(c, cluster) > before


def test_standby_stopped_and_restarted_under_traffic_fails_no_request(service, cluster):
    _, standby = cluster
    face, other = face_files(ENROLLED[0])[1], face_files(ENROLLED[6])[1]
    with httpx.Client(base_url=service.url, timeout=60) as c:
        if c.get(f"/identities/{ENROLLED[0]}").status_code == 404:  # the probe's person (run alone)
            assert enroll(c, ENROLLED[0], face_files(ENROLLED[0])[0]).status_code == 200
        wait_rotation(c, cluster, True)
        failures = metric(c, f"face_database_standby_failures_total{{{standby_label(cluster)}}}")
    stop, bad, done = threading.Event(), [], []

    def traffic(worker: int) -> None:
        with httpx.Client(base_url=service.url, timeout=60) as c:
            token, i = None, 0
            while not stop.is_set():
                if i % 3 == 0:
                    r = enroll(c, f"restart-{worker}-{i}", other)
                    token = r.headers.get(TOKEN, token)
                else:
                    r = identify(c, face, token if i % 2 else None)
                    if r.status_code == 200 and r.json()["results"][0]["identity_id"] is None:  # read nothing
                        bad.append(r.text[:200])
                if r.status_code != 200:
                    bad.append((r.status_code, r.text[:200]))
                done.append(1)
                i += 1

    threads = [threading.Thread(target=traffic, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    standby.stop()
    with httpx.Client(base_url=service.url, timeout=60) as c:
        wait_rotation(c, cluster, False)
        time.sleep(1.0)
        standby.start()
        wait_rotation(c, cluster, True)
        back = standby_reads(c, cluster)
        deadline = time.monotonic() + 60  # the traffic's next reads go to it again (slow on a busy machine)
        while standby_reads(c, cluster) <= back and time.monotonic() < deadline:
            time.sleep(0.2)
        stop.set()
        for t in threads:
            t.join(60)
        assert not bad, bad[:3]
        assert len(done) >= 10
        assert metric(c, f"face_database_standby_failures_total{{{standby_label(cluster)}}}") > failures
        assert standby_reads(c, cluster) > back  # reads went back to it


def test_a_lagging_standby_is_left_out_until_it_catches_up(service, cluster):
    _, standby = cluster
    with httpx.Client(base_url=service.url, timeout=60) as c:
        wait_rotation(c, cluster, True)
        standby.pause_replay()
        try:
            assert enroll(c, "while-paused", face_files(ENROLLED[1])[0]).status_code == 200
            wait_rotation(c, cluster, False)  # over FACE_DATABASE_MAX_LAG_MS behind
            assert metric(c, f"face_database_standby_lag_seconds{{{standby_label(cluster)}}}") > 3.0
            c.cookies.clear()
            standby_before, primary_before = standby_reads(c, cluster), primary_reads(c)
            r = identify(c, face_files(ENROLLED[1])[1], None)  # no token, yet fresh: the primary answers
            assert r.status_code == 200 and r.json()["results"][0]["identity_id"] in (ENROLLED[1], "while-paused")
            assert c.get("/identities/while-paused").status_code == 200
            assert standby_reads(c, cluster) == standby_before and primary_reads(c) >= primary_before + 2
        finally:
            standby.resume_replay()
        wait_rotation(c, cluster, True)


def standby_processes(standby) -> list[int]:
    """The standby's postmaster and its children (backends, startup, walreceiver, checkpointer...)."""
    postmaster = int((standby.pgdata / "postmaster.pid").read_text().split()[0])
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(postmaster)], capture_output=True, text=True,
                              timeout=10).stdout.split()
    return [postmaster, *map(int, children)]


FROZEN_READ_BOUND_S = 10.0  # FACE_DATABASE_TIMEOUT_S (2) for the checker to give up on it, and room on a busy machine


def test_a_frozen_standby_is_left_out_and_its_reads_answered_by_the_primary(service, cluster):
    """Every process of the standby stopped (SIGSTOP: a paused VM, a partition that resets no connection):
    its open connections answer nothing and its statement_timeout never fires. Reads under traffic are
    answered (by the primary) within a bound, the standby leaves rotation, and comes back once resumed."""
    _, standby = cluster
    names = ["frozen-a", "frozen-b"]
    with httpx.Client(base_url=service.url, timeout=60) as c:
        wait_rotation(c, cluster, True)
        token = None
        for i, name in enumerate(names):
            r = enroll(c, name, face_files(ENROLLED[i])[2])
            assert r.status_code == 200, r.text
            token = r.headers[TOKEN]
        c.cookies.clear()
        before = standby_reads(c, cluster)
        for _ in range(6):  # the standby has them (the token): its pool's connections are open and used
            assert c.get(f"/identities/{names[0]}", headers={TOKEN: token}).status_code == 200
        assert standby_reads(c, cluster) > before
        failures = metric(c, f"face_database_standby_failures_total{{{standby_label(cluster)}}}")
    stop, answers, bad = threading.Event(), [], []

    def traffic(worker: int) -> None:
        with httpx.Client(base_url=service.url, timeout=60) as t:  # no token: any standby in rotation will do
            i = 0
            while not stop.is_set():
                started = time.monotonic()
                try:
                    if i % 2:
                        r = identify(t, face_files(ENROLLED[worker % 2])[1], None)
                    else:
                        r = t.get(f"/identities/{names[worker % 2]}")
                except httpx.TimeoutException:
                    bad.append("no answer within 60 s")
                    continue
                answers.append(time.monotonic() - started)
                if r.status_code != 200:
                    bad.append((r.status_code, r.text[:200]))
                i += 1

    pids = standby_processes(standby)
    threads = [threading.Thread(target=traffic, args=(w,)) for w in range(3)]
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        for t in threads:
            t.start()
        with httpx.Client(base_url=service.url, timeout=60) as c:
            wait_rotation(c, cluster, False, timeout=FROZEN_READ_BOUND_S)
            time.sleep(2.0)  # more traffic while it is out
            stop.set()
            for t in threads:
                t.join(90)
            assert not bad, bad[:3]
            assert len(answers) >= 6 and max(answers) < FROZEN_READ_BOUND_S, sorted(answers)[-5:]
            assert metric(c, f"face_database_standby_failures_total{{{standby_label(cluster)}}}") > failures
            started = time.monotonic()
            assert c.get(f"/identities/{names[1]}").status_code == 200
            assert time.monotonic() - started < 2.0  # out of rotation: straight to the primary
        assert '"standby left out"' in service.log_path.read_text()  # said once, with its reason
    finally:
        stop.set()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    with httpx.Client(base_url=service.url, timeout=60) as c:
        wait_rotation(c, cluster, True)
        back = standby_reads(c, cluster)
        deadline = time.monotonic() + 30
        while standby_reads(c, cluster) <= back:
            assert time.monotonic() < deadline, "no read went back to the resumed standby"
            assert c.get(f"/identities/{names[0]}").status_code == 200
            time.sleep(0.1)
        # frozen again, one read at a time: no other read fails there first, the lag check (its own
        # deadline) finds it silent and the read waiting on it is answered by the primary
        pids = standby_processes(standby)
        try:
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            started = time.monotonic()
            assert c.get(f"/identities/{names[1]}").status_code == 200
            assert time.monotonic() - started < FROZEN_READ_BOUND_S
            wait_rotation(c, cluster, False, timeout=FROZEN_READ_BOUND_S)
        finally:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        wait_rotation(c, cluster, True)


def test_a_frozen_standby_does_not_hold_up_the_lag_checks_of_another(cluster, tmp_path, default_model):
    """Two standbys, the first frozen (SIGSTOP): its lag check waits FACE_DATABASE_TIMEOUT_S for an answer
    (60 s here, to make that wait unmistakable; 5 s by default). The second, its replay paused behind a
    write, is still left out once over FACE_DATABASE_MAX_LAG_MS behind: its checks do not wait for the
    first one's. (Checked one after the other, it stayed in rotation one FACE_DATABASE_TIMEOUT_S per
    round longer: reads without a token that much staler than the bound.)"""
    primary, first = cluster
    second = primary.standby()
    server = ServerProcess(tmp_path / "data", model=default_model, env={
        "FACE_DATABASE_URL": primary.url, "FACE_DATABASE_SCHEMA": PgTestServer.fresh_schema(),
        "FACE_DATABASE_READ_URLS": f"{first.url},{second.url}", "FACE_DATABASE_TIMEOUT_S": "60",
        "FACE_DATABASE_LAG_CHECK_MS": "100", "FACE_DATABASE_MAX_LAG_MS": "3000",
        "FACE_ENROLL_HUB_ALPHA": "0"})  # the enroll below reads no standby

    def wait(c: httpx.Client, standby, wanted: bool, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        label = f'standby="{standby.socket_dir}:5432/postgres"'
        while metric(c, f"face_database_standby_in_rotation{{{label}}}") != float(wanted):
            assert time.monotonic() < deadline, f"{standby.socket_dir}: in rotation is not {wanted}"
            time.sleep(0.1)

    pids: list[int] = []
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=60) as c:
            wait(c, first, True, 30)
            wait(c, second, True, 30)
            pids = standby_processes(first)
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            second.pause_replay()
            assert enroll(c, "past-the-second", face_files(ENROLLED[0])[0]).status_code == 200
            wait(c, second, False, 30)  # about 3 s; never before the first one's check gives up (60 s)
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
            pids = []
            second.resume_replay()
            wait(c, first, True, 90)
            wait(c, second, True, 30)
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        server.stop()
        second.stop()


def test_writes_are_decided_on_the_primary_while_the_standby_lags(service, cluster, slow_standby):
    """A client without a consistency token (another process, another user) writes to an identity that
    another client has just enrolled, while the standby applies commits 1 s late (in rotation: under
    FACE_DATABASE_MAX_LAG_MS). The lookups that decide the write read the primary: no 404."""
    with httpx.Client(base_url=service.url, timeout=60) as c1, httpx.Client(base_url=service.url, timeout=60) as c2:
        wait_rotation(c1, cluster, True)
        counter = iter(range(100))

        def fresh() -> str:
            n = next(counter)
            identity = f"lookup-{n}"
            r = enroll(c1, identity, face_files(ENROLLED[n % len(ENROLLED)])[2])
            assert r.status_code == 200, r.text
            c2.cookies.clear()  # c2 carries no token (not even one of its own earlier writes)
            return identity

        base = fresh()
        time.sleep(1.5)  # the standby has it
        identity = fresh()
        r = c2.patch(f"/identities/{identity}", json={"identity_id": identity + "-renamed"})
        assert r.status_code == 200 and r.json()["identity_id"] == identity + "-renamed", r.text
        identity = fresh()
        r = c2.patch(f"/identities/{identity}", json={"metadata": {"a": 1}})
        assert r.status_code == 200 and r.json()["metadata"] == {"a": 1}, r.text
        identity = fresh()
        r = c2.post(f"/identities/{identity}/merge", json={"into": base})
        assert r.status_code == 200 and r.json()["identity_id"] == base, r.text
        identity = fresh()
        r = c2.post(f"/identities/{base}/merge", json={"into": identity})
        assert r.status_code == 200 and r.json()["identity_id"] == identity, r.text


@pytest.fixture
def refusing(cluster, schema, tmp_path_factory, default_model):
    """A second replica of the service on the same database and standby, with
    FACE_ENROLL_DUPLICATE_POLICY=refuse."""
    primary, standby = cluster
    server = ServerProcess(tmp_path_factory.mktemp("standbys-refusing") / "data", model=default_model, env={
        "FACE_DATABASE_URL": primary.url, "FACE_DATABASE_SCHEMA": schema,
        "FACE_DATABASE_READ_URLS": standby.url, "FACE_DATABASE_TIMEOUT_S": "2", "FACE_DATABASE_LAG_CHECK_MS": "100",
        "FACE_DATABASE_MAX_LAG_MS": "3000", "FACE_DATABASE_READ_WAIT_MS": "200",
        "FACE_ENROLL_DUPLICATE_POLICY": "refuse"})
    server.wait_ready()
    yield server
    server.stop()


def test_enroll_guards_are_decided_on_the_primary_while_the_standby_lags(service, refusing, cluster, slow_standby):
    """FACE_ENROLL_DUPLICATE_POLICY=refuse, the standby applying commits 1 s late (in rotation), a client
    without a token enrolling just after another client's enroll. Whether the enroll creates an identity,
    and whom its faces match, is read on the primary: an append to an identity enrolled a moment ago is
    not refused for its person's other identity (the standby did not have it yet: a new identity), and a
    person enrolled a moment ago under another id is refused."""
    url = "/collections/guards/enroll"

    def put(c: httpx.Client, identity: str, path) -> httpx.Response:
        c.cookies.clear()  # no token: another client
        return c.post(url, json={"identity_id": identity, "images": [b64(path)]})

    twin, other = face_files(ENROLLED[2]), face_files(ENROLLED[3])
    with httpx.Client(base_url=service.url, timeout=60) as c1, httpx.Client(base_url=refusing.url, timeout=60) as c2:
        assert c1.post("/collections", json={"name": "guards"}).status_code == 201
        wait_rotation(c2, cluster, True)
        # one person under two ids, enrolled by a replica that allows it; the first one long replicated
        assert put(c1, "twin-a", twin[0]).status_code == 200
        time.sleep(1.5)
        assert put(c1, "twin-b", twin[1]).status_code == 200
        r = put(c2, "twin-b", twin[2])  # an append: not checked
        assert r.status_code == 200 and r.json()["created"] is False, r.text
        assert r.json()["possible_duplicates"] is None
        # a person just enrolled under another id is that person's duplicate
        assert put(c1, "solo", other[0]).status_code == 200
        r = put(c2, "solo-again", other[1])
        assert r.status_code == 409 and r.json()["error"]["code"] == "possible_duplicate", r.text
        assert [m["identity_id"] for m in r.json()["error"]["details"]["matches"]] == ["solo"]


def test_metrics_show_each_databases_shared_buffers_beside_the_hnsw_index(service, cluster, schema):
    """/metrics says whether the HNSW index fits in each database's shared_buffers (a search whose index
    does not fit is 2.3-2.6x as slow): the indexes' size as the primary has them, the primary's
    shared_buffers (read at each scrape) and the standby's (read when its checker connects)."""
    import psycopg

    primary, standby = cluster
    with httpx.Client(base_url=service.url, timeout=30) as c:
        assert enroll(c, "buffers", face_files(ENROLLED[0])[0]).status_code == 200
        sizes = {}
        for name, server in (("primary", primary), ("standby", standby)):
            with psycopg.connect(server.url, autocommit=True) as conn:
                sizes[name] = conn.execute(
                    "SELECT pg_size_bytes(current_setting('shared_buffers')), coalesce(sum(pg_relation_size(c.oid)), 0) "
                    "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE n.nspname = %s AND c.relkind = 'i' AND c.relname LIKE 'faces\\_embedding\\_hnsw\\_%%'",
                    (schema,)).fetchone()
        buffers, index_bytes = sizes["primary"]
        assert index_bytes > 0
        assert metric(c, "face_database_hnsw_index_bytes") == index_bytes
        assert metric(c, 'face_database_shared_buffers_bytes{role="primary",target="primary"}') == buffers
        standby_target = f'role="standby",target="{standby.socket_dir}:5432/postgres"'
        assert metric(c, f"face_database_shared_buffers_bytes{{{standby_target}}}") == sizes["standby"][0]
        assert metric(c, 'face_database_huge_pages{role="primary",target="primary"}') in (0.0, 1.0)
        ready = c.get("/readyz").json()["gallery"]
        assert (ready["hnsw_index_bytes"], ready["shared_buffers_bytes"]) == (index_bytes, buffers)


def test_damaged_data_on_a_standby_is_read_from_the_primary(tmp_path, default_model):
    """A standby whose copy of some heap blocks is damaged (a disk fault on its host; the primary's are
    whole): the reads that meet them are answered by the primary, never 503 or 500, the standby is
    logged once and keeps serving its other reads. (Its own cluster: the standby is damaged for good.)"""
    import numpy as np
    import psycopg

    primary = PgTestServer()
    try:
        standby = primary.standby()
        schema = PgTestServer.fresh_schema()
        env = {"FACE_DATABASE_URL": primary.url, "FACE_DATABASE_SCHEMA": schema, "FACE_DATABASE_READ_URLS": standby.url,
               "FACE_DATABASE_TIMEOUT_S": "2", "FACE_DATABASE_LAG_CHECK_MS": "100", "FACE_DATABASE_MAX_LAG_MS": "3000"}
        server = ServerProcess(tmp_path / "data", model=default_model, env=env)
        rng = np.random.default_rng(25)
        try:
            server.wait_ready()
            with httpx.Client(base_url=server.url, timeout=60) as c:
                model_id = c.post("/enroll", json={"identity_id": ENROLLED[0], "images": [
                    b64(face_files(ENROLLED[0])[0])]}).json()["model_id"]
                for i in range(60):
                    v = rng.normal(size=128)
                    r = c.post("/enroll", json={"identity_id": f"p{i}", "embeddings": [(v / np.linalg.norm(v)).tolist()],
                                                "model_id": model_id})
                    assert r.status_code == 200, r.text
            with psycopg.connect(primary.url, autocommit=True) as conn:
                # hint bits set and logged now: no later read on the primary logs a full-page image of
                # these blocks that the standby would replay over their damage (checksums are on)
                conn.execute(f"VACUUM (FREEZE) {schema}.faces")
                conn.execute("CHECKPOINT")
                relation = conn.execute(f"SELECT pg_relation_filepath('{schema}.faces')").fetchone()[0]
                blocks = [b for (b,) in conn.execute(f"SELECT DISTINCT (ctid::text::point)[0]::int FROM {schema}.faces "
                                                     "WHERE identity_id LIKE 'p%' ORDER BY 1")]
                lsn = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
            with psycopg.connect(standby.url, autocommit=True) as conn:
                deadline = time.monotonic() + 30
                while conn.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (str(lsn),)).fetchone()[0] is not True:
                    assert time.monotonic() < deadline, "the standby never replayed the writes"
                    time.sleep(0.05)
                conn.execute("CHECKPOINT")  # a restartpoint: a restart replays nothing over the damage
            standby.stop()
            path = standby.pgdata / relation
            raw = bytearray(path.read_bytes())
            for block in blocks[1:]:  # blocks of p-faces only (the first may hold the photo's face too)
                raw[block * 8192:(block + 1) * 8192] = rng.integers(0, 256, 8192, dtype=np.uint8).tobytes()
            path.write_bytes(bytes(raw))
            standby.start()
            with httpx.Client(base_url=server.url, timeout=60) as c:
                wait_rotation(c, (primary, standby), True)
                served_before = primary_reads(c)
                for i in range(59, 29, -1):  # faces on the damaged blocks, read through the standby first
                    r = c.get(f"/identities/p{i}")
                    assert r.status_code == 200 and r.json()["face_count"] == 1, r.text
                assert primary_reads(c) >= served_before + 1
                assert in_rotation(c, (primary, standby))  # still in rotation for the rest
            log = server.log_path.read_text()
            assert len([line for line in log.splitlines() if "standby holds damaged data" in line]) == 1, log[-3000:]
            assert "Traceback" not in log and '"internal_error"' not in log and "collection_damaged" not in log
        finally:
            server.stop()
    finally:
        primary.close()


def test_a_migration_reads_what_was_acknowledged_before_it_despite_a_lagging_standby(cluster, tmp_path, default_model):
    """A standby in rotation that applies commits 15 s late (within a FACE_DATABASE_MAX_LAG_MS of 60 s):
    the migration job (a background thread, no client token) reads with the primary's WAL position at
    each pass's start as its floor. Without it, the start compared the standby's crop count with the
    primary's face count (409 `no_source_crops` for a valid job after an enroll), and a delete and a
    metadata change acknowledged 11 s before the job (past the fenced pass's look-back) were missing
    from the new collection when the job said done."""
    import subprocess
    import sys

    from harness.fixtures import FIXTURES
    from harness.models import tiny_model
    from harness.server import REPO

    faces = sorted((FIXTURES / "faces").glob("*.jpg"))
    primary, standby = cluster
    key = tmp_path / "crop.key"
    made = subprocess.run([sys.executable, "-m", "service", "crop-key", "new", str(key)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    tiny = tiny_model(tmp_path / "tiny.onnx", dim=64)
    server = ServerProcess(tmp_path / "data", env={
        "FACE_DATABASE_URL": primary.url, "FACE_DATABASE_SCHEMA": PgTestServer.fresh_schema(),
        "FACE_DATABASE_READ_URLS": standby.url, "FACE_DATABASE_LAG_CHECK_MS": "100",
        "FACE_DATABASE_MAX_LAG_MS": "60000", "FACE_DATABASE_READ_WAIT_MS": "200",
        "FACE_MODELS": f"sface={default_model},tiny={tiny}", "FACE_ENROLL_HUB_ALPHA": "0",
        "FACE_CROP_KEY_FILE": str(key), "FACE_JOB_STALE_S": "2"})

    def put(c: httpx.Client, identity: str, files) -> httpx.Response:
        r = c.post("/collections/people-v1/enroll", json={"identity_id": identity, "images": [b64(f) for f in files]})
        assert r.status_code == 200, r.text
        return r

    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=120) as c:
            wait_rotation(c, cluster, True)
            assert c.post("/collections", json={"name": "people-v1", "keep_crops": True}).status_code == 201
            for i in range(20):
                put(c, f"p{i:03d}", [faces[i]])
            time.sleep(1)  # replayed on the standby
            standby.apply_delay(15000)
            try:
                time.sleep(1)
                assert c.delete("/collections/people-v1/identities/p005").status_code == 200
                patched = c.patch("/collections/people-v1/identities/p006", json={"metadata": {"badge": "revoked"}})
                assert patched.status_code == 200, patched.text
                time.sleep(11)  # past the fenced pass's look-back (FENCE_LOOKBACK_S)
                put(c, "late", faces[20:23])  # 3 faces the standby has not applied
                c.cookies.clear()
                assert in_rotation(c, cluster)
                r = c.post("/collections/people-v1/migrate", json={"model": "tiny", "into": "people-v2"})
                assert r.status_code == 202, r.text
                job_id = r.json()["job"]["id"]
                deadline = time.monotonic() + 180
                while (job := c.get(f"/jobs/{job_id}").json())["state"] not in ("done", "failed", "cancelled"):
                    assert time.monotonic() < deadline, job
                    time.sleep(0.1)
                assert job["state"] == "done", job
            finally:
                standby.apply_delay(0)
            token = put(c, "marker", [faces[25]]).headers[TOKEN]  # a write after the job's: read at least that
            c.cookies.clear()
            read = {TOKEN: token}
            assert c.get("/collections/people-v2/identities/p005", headers=read).status_code == 404
            assert c.get("/collections/people-v2/identities/p006", headers=read).json()["metadata"] == {"badge": "revoked"}
            assert c.get("/collections/people-v2/identities/late", headers=read).json()["face_count"] == 3
            assert c.get("/collections/people-v2", headers=read).json()["faces"] == 22
    finally:
        server.stop()


def test_a_scan_job_reads_what_was_acknowledged_before_it_despite_a_lagging_standby(service, cluster, slow_standby):
    """A duplicates or outliers scan job runs in the job runner, without the client's token: it reads with
    the primary's WAL position at its start as its floor (as the migration does), so the faces enrolled
    before it was queued are scanned. Without it, the scan read the standby (1 s behind, in rotation)
    and its report had none of them."""
    with httpx.Client(base_url=service.url, timeout=60) as c:
        wait_rotation(c, cluster, True)
        for kind in ("duplicates", "outliers"):
            name = f"scanned-{kind}"
            assert c.post("/collections", json={"name": name}).status_code == 201
            for person in ENROLLED[:3]:
                r = c.post(f"/collections/{name}/enroll",
                           json={"identity_id": person, "images": [b64(f) for f in face_files(person)[:2]]})
                assert r.status_code == 200, r.text
            c.cookies.clear()  # the job's reads carry no token of the client's
            r = c.post(f"/collections/{name}/{kind}/jobs", json={"min_score": 0.3})
            assert r.status_code == 202, r.text
            url = f"/collections/{name}/{kind}/jobs/{r.json()['job']['id']}"
            deadline = time.monotonic() + 60
            while (job := c.get(url).json())["state"] not in ("done", "failed", "cancelled"):
                assert time.monotonic() < deadline, job
                time.sleep(0.05)
            assert job["state"] == "done", job
            assert job[kind]["faces_scanned"] == 6, job
