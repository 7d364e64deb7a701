"""Keys over HTTP: made with a role and a scope, the secret shown once and stored only as a hash,
revoked at once here and within a second on another replica, expiring on time; open mode without keys."""

from __future__ import annotations

import time

import httpx

from harness.server import ServerProcess
from tests.access.conftest import ADMIN_SECRET, KeyedServer, pg_tables_text


def test_a_new_key_works_is_listed_without_its_secret_and_is_refused_once_revoked(keyed: KeyedServer):
    secret = keyed.make_key("lifecycle", "read", ["alpha"])
    key_id = keyed.key_ids["lifecycle"]
    assert secret.startswith(f"fk_{key_id}_")
    with keyed.client(secret) as reader:
        assert reader.get("/collections/alpha/identities").status_code == 200
    with keyed.client("admin") as admin:
        listing = admin.get("/keys")
        assert listing.status_code == 200
        assert secret not in listing.text and secret.split("_", 2)[2] not in listing.text  # (the random part may hold "_")
        mine = [k for k in listing.json()["items"] if k["key_id"] == key_id][0]
        assert mine["role"] == "read" and mine["collections"] == ["alpha"] and mine["revoked_at"] is None
        assert "secret" not in mine and "secret_hash" not in mine
        revoked = admin.delete(f"/keys/{key_id}")
        assert revoked.status_code == 200 and revoked.json()["revoked_at"] > 0
        assert admin.delete("/keys/ffffffffffff").json()["error"]["code"] == "key_not_found"
    with keyed.client(secret) as reader:  # refused at once on the replica that revoked it
        r = reader.get("/collections/alpha/identities")
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"


def test_an_expired_key_is_refused(keyed: KeyedServer):
    secret = keyed.make_key("short-lived", "embed", expires_at=time.time() + 2)
    with keyed.client(secret) as client:
        assert client.get("/whoami").status_code == 200
        time.sleep(2.5)
        assert client.get("/whoami").status_code == 401


def test_a_key_scope_must_name_existing_collections(keyed: KeyedServer):
    with keyed.client("admin") as admin:
        r = admin.post("/keys", json={"role": "read", "collections": ["nowhere"]})
        assert r.status_code == 404 and r.json()["error"]["code"] == "collection_not_found"
        r = admin.post("/keys", json={"role": "superuser"})
        assert r.status_code == 422


def test_an_admin_key_cannot_be_scoped(keyed: KeyedServer):
    """The admin routes (keys, audit, jobs, aliases, collections) are no collection's: an admin key
    scoped to alpha read beta's jobs and audit trail and made itself an unscoped admin key. Refused,
    422 `invalid_request`, nothing made; an unscoped admin key and a scoped write key are made."""
    with keyed.client("admin") as admin:
        before = admin.get("/keys").json()["items"]
        for scope in (["alpha"], [], ["alpha", "beta"]):
            r = admin.post("/keys", json={"role": "admin", "collections": scope})
            assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_request"), r.text
            assert "write key" in r.json()["error"]["message"] and "unscoped admin" in r.json()["error"]["message"]
        assert admin.get("/keys").json()["items"] == before
    keyed.make_key("scoped-writer", "write", ["alpha"])
    keyed.make_key("unscoped-admin", "admin", None)


def test_readyz_tells_a_scoped_key_of_its_own_collections_only(keyed: KeyedServer):
    """/readyz gave an embed key scoped to alpha the face and identity totals over every collection (and
    the default collection's threshold, which follows its size): an unscoped key's details only."""
    keyed.make_key("embed-alpha", "embed", ["alpha"])
    totals = {"gallery", "identify_threshold", "identify_threshold_source", "identify_fpir", "impostor_tail"}
    for name in ("embed-alpha", "read-alpha"):
        with keyed.client(name) as scoped:
            ready = scoped.get("/readyz").json()
        assert ready["status"] == "ready" and ready["model_id"] == keyed.model_id
        assert not totals & set(ready), (name, ready)
        assert set(ready["collections"]) == {"alpha"}, ready["collections"]
    for name in ("key-embed", "admin"):
        with keyed.client(name) as unscoped:
            ready = unscoped.get("/readyz").json()
        assert totals <= set(ready) and ready["gallery"]["collections"] >= 3, (name, ready)
        assert {"default", "alpha", "beta"} <= set(ready["collections"])


def test_a_collection_with_live_keys_scoped_to_it_is_not_deleted(keyed: KeyedServer):
    """A key scoped to x outlived x's delete and then read and deleted identities of a new, unrelated x:
    DELETE /collections/x is 409 `collection_in_use` (details: `keys`) while such a key lives."""
    with keyed.client("admin") as admin:
        assert admin.post("/collections", json={"name": "short-lived"}).status_code == 201
        keyed.make_key("of-short-lived", "write", ["short-lived"])
        key_id = keyed.key_ids["of-short-lived"]
        r = admin.delete("/collections/short-lived")
        assert (r.status_code, r.json()["error"]["code"]) == (409, "collection_in_use"), r.text
        error = r.json()["error"]
        assert error["details"]["keys"] == [key_id] and error["details"]["aliases"] == []
        assert "revoke" in error["message"] and key_id in error["message"]
        with keyed.client("of-short-lived") as scoped:  # still its collection
            assert scoped.get("/collections/short-lived/identities").status_code == 200
        assert admin.delete(f"/keys/{key_id}").status_code == 200
        assert admin.delete("/collections/short-lived").status_code == 200
        r = admin.post("/keys", json={"role": "read", "collections": ["short-lived"]})
        assert (r.status_code, r.json()["error"]["code"]) == (404, "collection_not_found")


def test_secrets_are_never_written_in_plain_text(keyed: KeyedServer):
    """Not in the server's log, not in any file of its data dir (the embedded catalog), not in the
    database (postgres: a dump of the schema's tables)."""
    secret = keyed.make_key("plain-text-check", "read")
    with keyed.client(secret) as client:
        client.get("/whoami")
    time.sleep(0.2)
    assert secret not in keyed.proc.log_path.read_text(errors="replace")
    assert ADMIN_SECRET not in keyed.proc.log_path.read_text(errors="replace")
    needle = secret.encode()
    for path in keyed.proc.data_dir.rglob("*"):
        if path.is_file():
            assert needle not in path.read_bytes(), path
    if keyed.backend == "postgres":
        assert secret not in pg_tables_text(keyed.env)


def test_open_mode_until_the_first_key_then_keys_are_required(tmp_path, default_model):
    proc = ServerProcess(tmp_path / "data", model=default_model)
    try:
        proc.wait_ready()
        with httpx.Client(base_url=proc.url, timeout=30) as anyone:
            assert anyone.get("/identities").status_code == 200
            me = anyone.get("/whoami").json()
            assert me["open_mode"] is True and me["role"] == "admin"
            made = anyone.post("/keys", json={"role": "admin", "note": "first"})
            assert made.status_code == 201
            r = anyone.get("/identities")
            assert r.status_code == 401, "the first key ends open mode at once"
            with httpx.Client(base_url=proc.url, timeout=30, headers={"X-API-Key": made.json()["secret"]}) as admin:
                assert admin.get("/identities").status_code == 200
                admin.delete(f"/keys/{made.json()['key_id']}")
            assert anyone.get("/identities").status_code == 401, "a service that had keys never reopens"
        assert "the service is open" in proc.log()
    finally:
        proc.stop()


def test_a_key_revoked_on_one_replica_is_refused_on_another_within_a_second(two_replicas):
    a, b = two_replicas
    admin = {"X-API-Key": ADMIN_SECRET}
    made = httpx.post(a.url + "/keys", json={"role": "read"}, headers=admin, timeout=30).json()
    key = {"X-API-Key": made["secret"]}
    with httpx.Client(base_url=b.url, headers=key, timeout=30) as on_b:
        assert on_b.get("/identities").status_code == 200  # b has the key in its cache now
        assert httpx.delete(f"{a.url}/keys/{made['key_id']}", headers=admin, timeout=30).status_code == 200
        revoked_at = time.monotonic()
        while on_b.get("/identities").status_code == 200:
            assert time.monotonic() - revoked_at < 1.0, "replica b still accepts a key revoked on a"
            time.sleep(0.02)
        assert time.monotonic() - revoked_at < 1.5
        assert on_b.get("/identities").status_code == 401


def test_keys_carry_their_own_rate_limits(keyed: KeyedServer):
    secret = keyed.make_key("slow", "read", rate_limit_rps=2)
    with keyed.client(secret) as client:
        answers = [client.get("/whoami") for _ in range(6)]
    limited = [r for r in answers if r.status_code == 429]
    assert limited, [r.status_code for r in answers]
    assert limited[0].json()["error"]["code"] == "rate_limited"
    assert int(limited[0].headers["Retry-After"]) >= 1
    with keyed.client("key-read") as other:  # another key's budget is its own
        assert other.get("/whoami").status_code == 200


def test_a_key_that_could_never_be_used_is_not_made(keyed: KeyedServer):
    """A key expired when made (a time past, or 0 from a client's default), one whose expiry was written in
    milliseconds (the year 58,000: it never expires), and a rate so small that the key never gets a second
    request: 422 ``invalid_request``, no key made."""
    with keyed.client("admin") as admin:
        before = admin.get("/keys").json()["items"]
        now = time.time()
        for extra in ({"expires_at": now - 60}, {"expires_at": 0}, {"expires_at": now * 1000},
                      {"rate_limit_rps": 5e-324}, {"rate_limit_rps": 1e-4}, {"rate_limit_faces_per_s": 1e-9},
                      {"rate_limit_rps": 1e300}, {"rate_limit_faces_per_s": 0}):
            r = admin.post("/keys", json={"role": "read", **extra})
            assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_request"), (extra, r.text)
        assert admin.get("/keys").json()["items"] == before
        made = admin.post("/keys", json={"role": "read", "expires_at": now + 60, "rate_limit_rps": 0.001})
        assert made.status_code == 201, made.text
        assert admin.delete(f"/keys/{made.json()['key_id']}").status_code == 200


def test_a_request_with_a_body_is_charged_once(keyed: KeyedServer):
    """Access is decided before a JSON body is read and again where FastAPI solves the route's
    dependencies: the second is the first's answer, not a second charge to the key's budget."""
    secret = keyed.make_key("twice", "read", rate_limit_rps=2)  # a burst of 2
    with keyed.client(secret) as client:
        answers = [client.post("/duplicates/jobs", json={"threshold": "not a number"}) for _ in range(3)]
    assert [r.status_code for r in answers] == [422, 422, 429], [r.text for r in answers]
