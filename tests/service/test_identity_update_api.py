"""PATCH /identities/{id} over HTTP on both backends (both mounts): a rename keeps every face (ids,
enrollment times, what /identify answers), metadata replaced or merge-patched (RFC 7396), the audit
record in the write, nothing written when nothing changes, the codes for bad input with nothing
changed, patches of different keys from concurrent clients all kept, and renames acknowledged before
a kill -9 found complete after the restart."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from harness.server import ServerProcess
from tests.conftest import backend_env
from tests.service.test_hygiene_writes_api import best, error_code, vectors


@pytest.fixture(scope="module", params=["embedded", "postgres"])
def served(request, tmp_path_factory, default_model):
    env = backend_env(request, {"FACE_ENROLL_HUB_ALPHA": "0", "FACE_MAX_METADATA_BYTES": "256"})
    proc = ServerProcess(tmp_path_factory.mktemp(f"update-{request.param}") / "data", model=default_model, env=env)
    ready = proc.wait_ready()
    with httpx.Client(base_url=proc.url, timeout=60) as client:
        client.model_id = ready["model_id"]  # type: ignore[attr-defined]
        yield client
    proc.stop()


def enroll(client, prefix: str, identity: str, rows: list[list[float]], metadata: dict | None = None) -> list[int]:
    r = client.post(f"{prefix}/enroll", json={"identity_id": identity, "embeddings": rows, "model_id": client.model_id,
                                              **({"metadata": metadata} if metadata is not None else {})})
    assert r.status_code == 200, r.text
    return r.json()["face_ids"]


def audit_of(client, request_id: str) -> list[dict]:
    return [e for e in client.get("/audit", params={"limit": 1000}).json()["items"] if e["request_id"] == request_id]


@pytest.mark.parametrize("prefix", ["", "/collections/staff"])
def test_a_rename_keeps_every_face_and_is_audited(served, prefix):
    if prefix:
        assert served.post("/collections", json={"name": "staff"}).status_code == 201
    rows = vectors(3, 1)
    face_ids = enroll(served, prefix, "jdoe", rows, {"desk": 4})
    enroll(served, prefix, "other", vectors(1, 2))
    before = served.get(f"{prefix}/identities/jdoe").json()
    r = served.patch(f"{prefix}/identities/jdoe", json={"identity_id": "jane.doe"}, headers={"X-Request-ID": "rn" + prefix[-5:]})
    assert r.status_code == 200, r.text
    after = r.json()
    assert after == served.get(f"{prefix}/identities/jane.doe").json()
    assert after["identity_id"] == "jane.doe" and after["face_ids"] == face_ids and after["metadata"] == {"desk": 4}
    assert after["faces"] == before["faces"], "a rename changed the faces' enrollment times"
    assert after["created_at"] == before["created_at"] and after["updated_at"] > before["updated_at"]
    assert error_code(served.get(f"{prefix}/identities/jdoe")) == "identity_not_found"
    assert all(best(served, prefix, row) == "jane.doe" for row in rows)
    listed = {i["identity_id"] for i in served.get(f"{prefix}/identities", params={"limit": 1000}).json()["items"]}
    assert "jane.doe" in listed and "jdoe" not in listed
    collection = served.get(f"/collections/{prefix.rsplit('/', 1)[-1] or 'default'}").json()
    assert collection["identities"] == len(listed)
    [entry] = audit_of(served, "rn" + prefix[-5:])
    assert (entry["action"], entry["identity_id"], entry["collection"]) == (
        "identity.updated", "jane.doe", prefix.rsplit("/", 1)[-1] or "default")
    assert entry["details"] == {"renamed_from": "jdoe", "metadata_keys": [], "face_count": 3}
    # the faces follow the new id in every face route
    r = served.delete(f"{prefix}/faces/{face_ids[0]}")
    assert r.status_code == 200 and r.json()["identity_id"] == "jane.doe", r.text


def test_metadata_replaced_or_merge_patched(served):
    enroll(served, "", "meta", vectors(1, 3), {"desk": 4, "team": {"name": "ops", "floor": 2}, "badge": "b-1"})
    r = served.patch("/identities/meta", json={"metadata_patch": {"badge": None, "team": {"floor": 3}, "phone": "x"}},
                     headers={"X-Request-ID": "patch-1"})
    assert r.status_code == 200, r.text
    assert r.json()["metadata"] == {"desk": 4, "team": {"name": "ops", "floor": 3}, "phone": "x"}
    [entry] = audit_of(served, "patch-1")
    assert entry["details"] == {"metadata_keys": ["badge", "phone", "team"], "face_count": 1}
    assert "ops" not in json.dumps(entry) and "b-1" not in json.dumps(entry), "the audit record holds metadata values"
    r = served.patch("/identities/meta", json={"metadata": {"only": True}})
    assert r.status_code == 200 and r.json()["metadata"] == {"only": True}, r.text
    assert served.get("/identities/meta").json()["metadata"] == {"only": True}
    # a patch that is not an object at a key replaces it; a value of another JSON type is a change
    r = served.patch("/identities/meta", json={"metadata_patch": {"only": 1}})
    assert r.status_code == 200 and r.json()["metadata"] == {"only": 1}, r.text


def test_nothing_to_change_writes_nothing(served):
    enroll(served, "", "same", vectors(1, 4), {"a": 1})
    before = served.get("/identities/same").json()
    for i, body in enumerate(({"identity_id": "same"}, {"metadata": {"a": 1}}, {"metadata_patch": {"a": 1, "b": None}})):
        r = served.patch("/identities/same", json=body, headers={"X-Request-ID": f"noop-{i}"})
        assert r.status_code == 200 and r.json() == before, r.text
        assert audit_of(served, f"noop-{i}") == [], body


def test_bad_updates_are_refused_and_change_nothing(served):
    enroll(served, "", "keep", vectors(1, 5), {"a": 1})
    enroll(served, "", "taken", vectors(1, 6))
    before = served.get("/identities/keep").json()
    cases = [
        ({"identity_id": "taken"}, 409, "identity_exists"),
        ({"identity_id": "taken", "metadata": {"b": 2}}, 409, "identity_exists"),
        ({}, 422, "invalid_request"),
        ({"metadata": {"a": 2}, "metadata_patch": {"a": 3}}, 422, "invalid_request"),
        ({"metadata": {"a": 2}, "color": "red"}, 422, "invalid_request"),
        ({"metadata": [1, 2]}, 422, "invalid_request"),
        ({"identity_id": "a/b"}, 422, "invalid_request"),
        ({"identity_id": ".."}, 422, "invalid_identity_id"),
        ({"identity_id": "evil\u202eid"}, 422, "invalid_identity_id"),
        ({"metadata_patch": {"x": float("nan")}}, 400, "malformed_json"),
        ({"metadata": {"big": "x" * 300}}, 413, "metadata_too_large"),
        # the patch is small, what it leaves is not
        ({"metadata_patch": {"more": "y" * 200}}, None, None),
        ({"metadata_patch": {"most": "z" * 200}}, 413, "metadata_too_large"),
    ]
    for body, status, code in cases:
        r = served.patch("/identities/keep", content=json.dumps(body), headers={"content-type": "application/json"})
        if status is None:
            assert r.status_code == 200, r.text
            before = r.json()
            continue
        assert (r.status_code, error_code(r)) == (status, code), (body, r.text)
        assert served.get("/identities/keep").json() == before, body
    r = served.patch("/identities/nobody", json={"metadata": {}})
    assert (r.status_code, error_code(r)) == (404, "identity_not_found")
    r = served.patch("/identities/taken", json={"identity_id": "keep"})
    assert (r.status_code, error_code(r)) == (409, "identity_exists")
    assert r.json()["error"]["details"]["identity_id"] == "keep"
    assert served.get("/identities/taken").status_code == 200


def test_an_id_no_identity_can_have_is_invalid_identity_id_on_every_route(served):
    """One vocabulary: a new id in a JSON body that FastAPI validates (a rename, a face move) is refused
    with the code /enroll gives it, not the generic invalid_request (the move route gave that before)."""
    face_id = enroll(served, "", "moving", vectors(1, 8))[0]
    for bad in ("..", ".", "a\u200bb", " \u00a0 "):
        r = served.post("/enroll", json={"identity_id": bad, "embeddings": vectors(1, 9), "model_id": served.model_id})
        assert (r.status_code, error_code(r)) == (422, "invalid_identity_id"), r.text
        r = served.patch("/identities/moving", json={"identity_id": bad})
        assert (r.status_code, error_code(r)) == (422, "invalid_identity_id"), r.text
        r = served.post(f"/faces/{face_id}/move", json={"identity_id": bad})
        assert (r.status_code, error_code(r)) == (422, "invalid_identity_id"), r.text
        r = served.post("/identities/moving/merge", json={"into": bad})
        assert (r.status_code, error_code(r)) in ((422, "invalid_identity_id"), (404, "identity_not_found")), r.text
    assert served.get("/identities/moving").json()["face_ids"] == [face_id]


def test_concurrent_patches_of_different_keys_are_all_kept(served):
    """Each patch is applied to the metadata as stored when its write runs: 16 clients each set their own
    key at once, and every key is there at the end (a read-modify-write in the client would lose some)."""
    enroll(served, "", "shared", vectors(1, 7), {})
    barrier = threading.Barrier(16)
    statuses: list[int] = []

    def patch(n: int) -> None:
        with httpx.Client(base_url=str(served.base_url), timeout=60) as own:
            barrier.wait()
            statuses.append(own.patch("/identities/shared", json={"metadata_patch": {f"k{n}": n}}).status_code)

    threads = [threading.Thread(target=patch, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert statuses == [200] * 16
    assert served.get("/identities/shared").json()["metadata"] == {f"k{n}": n for n in range(16)}


def test_an_edit_from_a_stale_read_is_refused(served):
    """expected_updated_at: of 8 clients editing from the same read, exactly one succeeds and the others
    get 409 identity_changed with the identity's updated_at now; any write to the identity (a face
    enrolled) makes an earlier read stale."""
    enroll(served, "", "edited", vectors(1, 10), {"v": 0})
    read = served.get("/identities/edited").json()
    barrier = threading.Barrier(8)
    answers: list[httpx.Response] = []

    def edit(n: int) -> None:
        with httpx.Client(base_url=str(served.base_url), timeout=60) as own:
            barrier.wait()
            answers.append(own.patch("/identities/edited", json={"metadata": {"v": n},
                                                                 "expected_updated_at": read["updated_at"]}))

    threads = [threading.Thread(target=edit, args=(n,)) for n in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    won = [r for r in answers if r.status_code == 200]
    lost = [r for r in answers if r.status_code != 200]
    assert len(won) == 1 and len(lost) == 7, [r.text for r in answers]
    now = served.get("/identities/edited").json()
    assert now == won[0].json() and now["metadata"] != {"v": 0}
    for r in lost:
        assert error_code(r) == "identity_changed"
        assert r.json()["error"]["details"] == {"identity_id": "edited", "updated_at": now["updated_at"]}
    # a face enrolled is a write to the identity: an edit from before it is refused, one from after it is made
    enroll(served, "", "edited", vectors(1, 11))
    r = served.patch("/identities/edited", json={"identity_id": "edited-2", "expected_updated_at": now["updated_at"]})
    assert (r.status_code, error_code(r)) == (409, "identity_changed")
    fresh = served.get("/identities/edited").json()
    r = served.patch("/identities/edited", json={"identity_id": "edited-2", "expected_updated_at": fresh["updated_at"]})
    assert r.status_code == 200 and r.json()["face_count"] == 2, r.text


@pytest.fixture(params=["embedded", "postgres"])
def kill_env(request):
    return backend_env(request, {"FACE_SNAPSHOT_INTERVAL_S": "0", "FACE_ENROLL_HUB_ALPHA": "0"})


def test_acknowledged_renames_survive_sigkill(tmp_path, default_model, kill_env):
    """Renames acknowledged before a kill -9 are complete after the restart: the new id holds every face
    (found by /identify, so the embedded index maps its labels to the new id), the old one is gone, and
    each has its audit record."""
    data = tmp_path / "data"
    server = ServerProcess(data, model=default_model, env=kill_env)
    model_id = server.wait_ready()["model_id"]
    rows = {f"p{i}": vectors(2, 100 + i) for i in range(8)}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        c.model_id = model_id  # type: ignore[attr-defined]
        for identity, r in rows.items():
            enroll(c, "", identity, r)
        for identity in rows:
            r = c.patch(f"/identities/{identity}", json={"identity_id": f"{identity}-renamed", "metadata": {"n": identity}})
            assert r.status_code == 200, r.text
    server.kill()
    server = ServerProcess(data, model=default_model, env=kill_env)
    server.wait_ready()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            c.model_id = model_id  # type: ignore[attr-defined]
            for identity, r in rows.items():
                assert c.get(f"/identities/{identity}").status_code == 404
                got = c.get(f"/identities/{identity}-renamed").json()
                assert got["face_count"] == 2 and got["metadata"] == {"n": identity}
                assert best(c, "", r[0]) == f"{identity}-renamed"
            renames = [e for e in c.get("/audit", params={"limit": 1000}).json()["items"]
                       if e["action"] == "identity.updated"]
            assert sorted(e["details"]["renamed_from"] for e in renames) == sorted(rows)
    finally:
        server.stop()
