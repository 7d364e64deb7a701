"""``python -m service keys create|list|revoke``: real subprocesses on a real data dir or PostgreSQL schema.

The secret printed once matches the stored hash (and nothing else is stored: no file of the backend
holds it), list never shows it, revoke sets revoked_at, every change is audited as made by the CLI,
unknown collections and a bad pepper file are refused with nothing stored. Both backends.
"""

from __future__ import annotations

import json
import re
import time

import httpx

from service.access.keys import hash_secret, key_id_of, matches, new_key
from service.gallery.api import AuditQuery
from tests.server import ServerProcess

SECRET = re.compile(r"^fk_[0-9a-f]{12}_[A-Za-z0-9_-]{43}$")


def test_create_list_revoke(operator_backend):
    b = operator_backend
    r = b.run("keys", "create", "--role", "admin", "--note", "first admin")
    assert r.returncode == 0, r.stderr
    secret = r.stdout.strip()
    assert SECRET.fullmatch(secret), r.stdout  # stdout is the secret alone: KEY=$(python -m service keys create ...)
    assert "X-API-Key" in r.stderr and "once" in r.stderr  # and how to use it
    key_id = key_id_of(secret)

    r = b.run("keys", "create", "--role", "read", "--collections", "default", "--expires-in-days", "30",
              "--rate-limit-rps", "5", "--rate-limit-faces-per-s", "20", "--json")
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)
    assert SECRET.fullmatch(made["secret"]) and key_id_of(made["secret"]) == made["key_id"]
    assert (made["role"], made["collections"], made["rate_limit_rps"], made["rate_limit_faces_per_s"]) == \
        ("read", ["default"], 5.0, 20.0)
    assert abs(made["expires_at"] - (made["created_at"] + 30 * 86400)) < 1

    galleries = b.open()
    try:
        admin, reader = galleries.get_key(key_id), galleries.get_key(made["key_id"])
        assert matches(secret, admin.secret_hash) and matches(made["secret"], reader.secret_hash)
        assert not matches(made["secret"], admin.secret_hash)
        assert (admin.role, admin.collections, admin.note, admin.revoked_at) == ("admin", None, "first admin", None)
        assert (reader.role, reader.collections) == ("read", ("default",))
        hashes = [admin.secret_hash, reader.secret_hash]
    finally:
        galleries.close()

    for args in (("keys", "list"), ("keys", "list", "--json")):
        r = b.run(*args)
        assert r.returncode == 0, r.stderr
        assert key_id in r.stdout and made["key_id"] in r.stdout and "first admin" in r.stdout
        for never in (secret, made["secret"], *hashes):
            assert never not in r.stdout and never not in r.stderr
    listed = {k["key_id"]: k for k in json.loads(b.run("keys", "list", "--json").stdout)["items"]}
    assert listed[key_id]["revoked_at"] is None and listed[made["key_id"]]["collections"] == ["default"]
    assert "secret" not in listed[key_id] and "secret_hash" not in listed[key_id]

    before = time.time()
    r = b.run("keys", "revoke", made["key_id"], "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["revoked_at"] >= before
    r = b.run("keys", "revoke", made["key_id"])  # again: said, not an error, no second record
    assert r.returncode == 0 and "already revoked" in r.stdout, r.stdout + r.stderr
    r = b.run("keys", "revoke", "0123456789ab")
    assert r.returncode == 2 and "no key" in r.stderr
    listed = {k["key_id"]: k for k in json.loads(b.run("keys", "list", "--json").stdout)["items"]}
    assert listed[made["key_id"]]["revoked_at"] >= before and listed[key_id]["revoked_at"] is None

    galleries = b.open()
    try:
        assert galleries.get_key(made["key_id"]).revoked_at >= before
        assert galleries.has_keys()  # the admin key is live
        entries = galleries.audit(AuditQuery(limit=100))
    finally:
        galleries.close()
    actions = [(e.action, e.details.get("role")) for e in reversed(entries) if e.action.startswith("key.")]
    assert actions == [("key.created", "admin"), ("key.created", "read"), ("key.revoked", "read")]
    for entry in entries:  # made by the CLI: no key, user@host, no request
        assert entry.key_id is None and entry.request_id is None and "@" in (entry.client or ""), entry
        assert not any(s in json.dumps(entry.details) for s in (secret, made["secret"], *hashes))

    # the secret is in no file of the backend; the hash is (so the search can see what is stored)
    stored = [p.read_bytes() for p in b.stored_files()]
    for text in (secret, made["secret"]):
        assert not any(text.encode() in data or text[16:].encode() in data for data in stored)
    assert any(hashes[0].encode() in data for data in stored)


def test_unknown_or_invalid_collections_are_refused(operator_backend):
    b = operator_backend
    for scope, why in (("default,nosuch", "nosuch"), ("Bad Name", "not a collection name"), (",", "no collection")):
        r = b.run("keys", "create", "--role", "write", "--collections", scope)
        assert r.returncode == 2 and why in r.stderr, (scope, r.stderr)
        assert r.stdout == ""  # no secret
    # an expiry in the year 5000 or later, as POST /keys refuses it (before: 1e7 days stored an admin key,
    # then a traceback instead of its secret, and every `keys list` after it a traceback)
    for bad in (("--expires-in-days", "1e7"), ("--expires-in-days", "1e306"), ("--expires-in-days", "1e400"),
                ("--expires-in-days", "0"), ("--expires-in-days", "-1"), ("--rate-limit-rps", "0"),
                ("--rate-limit-faces-per-s", "nan"), ("--rate-limit-rps", "5e-324"), ("--rate-limit-rps", "1e-4"),
                ("--rate-limit-faces-per-s", "1e7"), ("--note", "x" * 501), ("--role", "root")):
        r = b.run("keys", "create", *(("--role", "read") if bad[0] != "--role" else ()), *bad)
        assert r.returncode == 2 and r.stdout == "", (bad, r.stdout)
        assert "error" in r.stderr and "Traceback" not in r.stderr, (bad, r.stderr)
    galleries = b.open()
    try:
        assert galleries.list_keys() == [] and not galleries.has_keys()
        galleries.create_collection("front-desk")
        far = new_key("read", None, "stored before the limit", 1e15, b"").stored  # the year 31,690,708
        galleries.add_key(far)
    finally:
        galleries.close()
    listed = b.run("keys", "list")  # printed as it is, not a traceback
    assert listed.returncode == 0 and far.key_id in listed.stdout and "unix time 1000000000000000" in listed.stdout, \
        listed.stderr
    r = b.run("keys", "create", "--role", "write", "--collections", "front-desk,default", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["collections"] == ["front-desk", "default"]


def test_pepper_file(operator_backend, tmp_path):
    b = operator_backend
    pepper = tmp_path / "pepper"
    pepper.write_bytes(b"\x00some random pepper bytes\xff")
    r = b.run("keys", "create", "--role", "embed", env={"FACE_KEY_PEPPER_FILE": str(pepper)})
    assert r.returncode == 0, r.stderr
    secret = r.stdout.strip()
    galleries = b.open()
    try:
        stored = galleries.get_key(key_id_of(secret)).secret_hash
    finally:
        galleries.close()
    assert matches(secret, stored, pepper.read_bytes()) and not matches(secret, stored)
    assert stored == hash_secret(secret, pepper.read_bytes())

    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    for path, why in ((tmp_path / "missing", "cannot be read"), (empty, "is empty")):
        r = b.run("keys", "create", "--role", "embed", env={"FACE_KEY_PEPPER_FILE": str(path)})
        assert r.returncode == 2 and str(path) in r.stderr and why in r.stderr, r.stderr
        assert r.stdout == ""
    assert len(json.loads(b.run("keys", "list", "--json").stdout)["items"]) == 1


def until(check, timeout: float = 5.0):
    """``check()``'s first truthy answer, polled (the server trusts what it read about keys for FACE_KEY_CACHE_S)."""
    deadline = time.monotonic() + timeout
    while not (answer := check()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return answer


def test_first_admin_key_while_a_server_runs(operator_backend, tmp_path):
    """A fresh install, serving in open mode: the operator makes the first admin key beside the running
    server (which holds the data dir, or the database), with the same pepper file; the server then
    wants it, and refuses it once revoked."""
    b = operator_backend
    pepper = tmp_path / "pepper"
    pepper.write_bytes(b"pepper of this install\n")
    b.env["FACE_KEY_PEPPER_FILE"] = str(pepper)
    server = ServerProcess(b.data_dir, model=b.model, env=b.env)
    try:
        server.wait_ready()
        whoami = server.url + "/whoami"
        assert httpx.get(whoami, timeout=10).json()["open_mode"] is True
        r = b.run("keys", "create", "--role", "admin", "--json")
        assert r.returncode == 0, r.stderr
        made = json.loads(r.stdout)
        with_key = {"X-API-Key": made["secret"]}
        assert until(lambda: httpx.get(whoami, timeout=10).status_code == 401)  # open mode is over
        answer = httpx.get(whoami, headers=with_key, timeout=10)
        assert answer.status_code == 200, answer.text
        assert (answer.json()["key_id"], answer.json()["role"]) == (made["key_id"], "admin")
        listed = json.loads(b.run("keys", "list", "--json").stdout)["items"]
        assert [k["key_id"] for k in listed] == [made["key_id"]]

        r = b.run("keys", "revoke", made["key_id"])
        assert r.returncode == 0, r.stderr
        assert until(lambda: httpx.get(whoami, headers=with_key, timeout=10).status_code == 401)
        r = b.run("audit", "export")
        assert r.returncode == 0, r.stderr
        assert [json.loads(line)["action"] for line in r.stdout.splitlines()] == ["key.created", "key.revoked"]
        assert server.proc.poll() is None
    finally:
        server.stop()


def test_an_admin_key_cannot_be_scoped(operator_backend, tmp_path):
    """`keys create --role admin --collections ...` is refused (the admin routes reach every collection,
    so a scope cannot hold one); a scoped admin key stored before that (here: straight into the store)
    is named at start-up and refused, 403 `forbidden`, on every route, while its other keys work."""
    b = operator_backend
    r = b.run("keys", "create", "--role", "admin", "--collections", "default")
    assert r.returncode == 2 and r.stdout == "" and "write key" in r.stderr, r.stderr
    galleries = b.open()
    try:
        assert galleries.list_keys() == []
        old = new_key("admin", ("default",), "scoped admin from before")
        revoked = new_key("admin", ("default",), "revoked already")
        for key in (old, revoked):
            galleries.add_key(key.stored)
        galleries.revoke_key(revoked.stored.key_id)
        writer = new_key("write", ("default",))
        galleries.add_key(writer.stored)
    finally:
        galleries.close()
    server = ServerProcess(b.data_dir, model=b.model, env=b.env)
    try:
        server.wait_ready()
        warned = [line for line in server.log_path.read_text().splitlines() if "scoped admin keys" in line]
        assert len(warned) == 1 and old.stored.key_id in warned[0], warned
        assert revoked.stored.key_id not in warned[0] and writer.stored.key_id not in warned[0]
        assert old.secret not in warned[0] and old.stored.secret_hash not in warned[0]
        with httpx.Client(base_url=server.url, headers={"X-API-Key": old.secret}, timeout=30) as scoped:
            for method, path in (("GET", "/whoami"), ("GET", "/keys"), ("GET", "/audit"), ("GET", "/identities"),
                                 ("POST", "/keys"), ("DELETE", f"/keys/{writer.stored.key_id}")):
                answer = scoped.request(method, path, json={"role": "admin"} if method == "POST" else None)
                assert answer.status_code == 403, (method, path, answer.text)
                error = answer.json()["error"]
                assert error["code"] == "forbidden" and "revoke" in error["message"], error
                assert old.stored.key_id in error["message"]
            assert httpx.get(server.url + "/readyz", headers={"X-API-Key": old.secret}).json() == {"status": "ready"}
        with httpx.Client(base_url=server.url, headers={"X-API-Key": writer.secret}, timeout=30) as fine:
            assert fine.get("/identities").status_code == 200
    finally:
        server.stop()
