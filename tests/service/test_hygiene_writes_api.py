"""Merge, move a face, delete a face over HTTP on both backends (both mounts): the answers, the codes
for bad input (`same_identity`, `face_not_found`, `identity_not_found`), the audit trail with the
request id, and kill -9 during merges: after a restart every acknowledged merge is complete and
audited, and no merge is half done."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest

from harness.server import ServerProcess
from tests.conftest import backend_env

DIM = 128


def vectors(n: int, seed: int) -> list[list[float]]:
    v = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).tolist()


@pytest.fixture(scope="module", params=["embedded", "postgres"])
def served(request, tmp_path_factory, default_model):
    env = backend_env(request, {"FACE_ENROLL_HUB_ALPHA": "0", "FACE_MAX_FACES_PER_IDENTITY": "6"})
    proc = ServerProcess(tmp_path_factory.mktemp(f"hygiene-{request.param}") / "data", model=default_model, env=env)
    ready = proc.wait_ready()
    with httpx.Client(base_url=proc.url, timeout=60) as client:
        client.model_id = ready["model_id"]  # type: ignore[attr-defined]
        yield client
    proc.stop()


def enroll(client, prefix: str, identity: str, rows: list[list[float]]) -> list[int]:
    r = client.post(f"{prefix}/enroll", json={"identity_id": identity, "embeddings": rows, "model_id": client.model_id})
    assert r.status_code == 200, r.text
    return r.json()["face_ids"]


def best(client, prefix: str, row: list[float]) -> str | None:
    r = client.post(f"{prefix}/identify", json={"embeddings": [row], "model_id": client.model_id, "top_k": 1})
    assert r.status_code == 200, r.text
    return r.json()["results"][0]["candidates"][0]["identity_id"]


def error_code(r: httpx.Response) -> str:
    return r.json()["error"]["code"]


def kill_mid_way(server: ServerProcess, workers: list[threading.Thread], stop: threading.Event,
                 acknowledged: dict, at_least: int) -> None:
    """Start the clients, SIGKILL the server once ``at_least`` of their writes were acknowledged, join them."""
    for t in workers:
        t.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < at_least and time.monotonic() < deadline:
        time.sleep(0.01)
    server.kill()
    stop.set()
    for t in workers:
        t.join(30)


def audit_entries(c: httpx.Client, action: str) -> list[dict]:
    """Every audit entry of ``action``, all pages."""
    found, cursor = [], None
    while True:
        page = c.get("/audit", params={"limit": 1000} | ({"cursor": cursor} if cursor else {})).json()
        found += [e for e in page["items"] if e["action"] == action]
        cursor = page["next_cursor"]
        if not cursor:
            return found


@pytest.mark.parametrize("prefix", ["", "/collections/tidy"])
def test_merge_over_http(served, prefix):
    if prefix:
        assert served.post("/collections", json={"name": "tidy"}).status_code == 201
    a, b = vectors(2, 1), vectors(1, 2)
    request_id = "merge" + prefix.replace("/", "-")
    a_ids, b_ids = enroll(served, prefix, "ann", a), enroll(served, prefix, "anne", b)
    r = served.post(f"{prefix}/identities/ann/merge", json={"into": "anne"}, headers={"X-Request-ID": request_id})
    assert r.status_code == 200, r.text
    assert r.json() == {"identity_id": "anne", "merged_from": "ann", "faces_moved": 2, "face_count": 3}
    assert error_code(served.get(f"{prefix}/identities/ann")) == "identity_not_found"
    assert served.get(f"{prefix}/identities/anne").json()["face_ids"] == sorted(a_ids + b_ids)
    assert best(served, prefix, a[0]) == "anne"
    collection = served.get(f"/collections/{prefix.rsplit('/', 1)[-1] or 'default'}").json()
    listed = served.get(f"{prefix}/identities", params={"limit": 1000}).json()["items"]
    assert collection["identities"] == len(listed) and collection["faces"] == sum(i["face_count"] for i in listed)
    [entry] = [e for e in served.get("/audit", params={"limit": 1000}).json()["items"]
               if e["request_id"] == request_id]
    assert (entry["action"], entry["identity_id"]) == ("identity.merged", "anne")
    assert entry["details"] == {"merged_from": "ann", "faces_moved": 2, "face_count": 3}
    # bad input: a code, nothing written
    r = served.post(f"{prefix}/identities/anne/merge", json={"into": "anne"})
    assert (r.status_code, error_code(r)) == (422, "same_identity")
    r = served.post(f"{prefix}/identities/ann/merge", json={"into": "anne"})
    assert (r.status_code, error_code(r)) == (404, "identity_not_found")
    r = served.post(f"{prefix}/identities/anne/merge", json={"into": "nobody"})
    assert (r.status_code, error_code(r)) == (404, "identity_not_found")
    r = served.post(f"{prefix}/identities/anne/merge", json={})
    assert (r.status_code, error_code(r)) == (422, "invalid_request")
    enroll(served, prefix, "big", vectors(4, 3))  # 3 + 4 > FACE_MAX_FACES_PER_IDENTITY (6)
    r = served.post(f"{prefix}/identities/big/merge", json={"into": "anne"})
    assert (r.status_code, error_code(r)) == (413, "too_many_faces_for_identity")
    assert served.get(f"{prefix}/identities/big").json()["face_count"] == 4


@pytest.mark.parametrize("prefix", ["", "/collections/tidy2"])
def test_move_and_delete_a_face_over_http(served, prefix):
    if prefix:
        assert served.post("/collections", json={"name": "tidy2"}).status_code == 201
    rows = vectors(2, 4)
    request_id = "del" + prefix.replace("/", "-")
    ids = enroll(served, prefix, "bob", rows)
    r = served.post(f"{prefix}/faces/{ids[0]}/move", json={"identity_id": "robert"})
    assert r.status_code == 200, r.text
    assert r.json() == {"face_id": ids[0], "from_identity": "bob", "to_identity": "robert", "target_created": True,
                        "source_deleted": False}
    assert best(served, prefix, rows[0]) == "robert"
    r = served.post(f"{prefix}/faces/{ids[1]}/move", json={"identity_id": "robert"})
    assert r.json()["source_deleted"] is True
    assert error_code(served.get(f"{prefix}/identities/bob")) == "identity_not_found"
    r = served.post(f"{prefix}/faces/{ids[1]}/move", json={"identity_id": "robert"})
    assert (r.status_code, error_code(r)) == (422, "same_identity")
    r = served.delete(f"{prefix}/faces/{ids[0]}", headers={"X-Request-ID": request_id})
    assert r.status_code == 200, r.text
    assert r.json() == {"face_id": ids[0], "identity_id": "robert", "identity_deleted": False}
    found = served.post(f"{prefix}/identify", json={"embeddings": [rows[0]], "model_id": served.model_id, "top_k": 50})
    assert ids[0] not in [c["face_id"] for c in found.json()["results"][0]["candidates"]]
    [entry] = [e for e in served.get("/audit", params={"limit": 1000}).json()["items"] if e["request_id"] == request_id]
    assert (entry["action"], entry["identity_id"], entry["details"]["face_id"]) == ("face.deleted", "robert", ids[0])
    r = served.delete(f"{prefix}/faces/{ids[1]}")
    assert r.json() == {"face_id": ids[1], "identity_id": "robert", "identity_deleted": True}
    for r in (served.delete(f"{prefix}/faces/{ids[1]}"),
              served.post(f"{prefix}/faces/{ids[1]}/move", json={"identity_id": "x"}),
              served.delete(f"{prefix}/faces/{10**15}")):
        assert (r.status_code, error_code(r)) == (404, "face_not_found")
        assert r.json()["error"]["details"]["face_id"] in (ids[1], 10**15)
    for bad in ("0", "-1", "abc", str(2**63)):
        r = served.delete(f"{prefix}/faces/{bad}")
        assert (r.status_code, error_code(r)) == (422, "invalid_request")


@pytest.mark.parametrize("prefix", ["", "/collections/tidy3"])
def test_delete_many_faces_over_http(served, prefix):
    if prefix:
        assert served.post("/collections", json={"name": "tidy3"}).status_code == 201
    dana, eve = vectors(3, 7), vectors(2, 8)
    d_ids, e_ids = enroll(served, prefix, "dana", dana), enroll(served, prefix, "eve", eve)
    request_id = "bulk" + prefix.replace("/", "-")
    asked = [e_ids[1], d_ids[0], 10**15, e_ids[0], d_ids[1], d_ids[0]]
    r = served.post(f"{prefix}/faces/delete", json={"face_ids": asked}, headers={"X-Request-ID": request_id})
    assert r.status_code == 200, r.text
    assert r.json() == {"deleted": sorted([{"face_id": d_ids[0], "identity_id": "dana", "identity_deleted": False},
                                           {"face_id": d_ids[1], "identity_id": "dana", "identity_deleted": False},
                                           {"face_id": e_ids[0], "identity_id": "eve", "identity_deleted": True},
                                           {"face_id": e_ids[1], "identity_id": "eve", "identity_deleted": True}],
                                          key=lambda d: d["face_id"]),
                        "not_found": [10**15]}
    assert served.get(f"{prefix}/identities/dana").json()["face_ids"] == [d_ids[2]]
    assert error_code(served.get(f"{prefix}/identities/eve")) == "identity_not_found"
    for row in (*dana[:2], *eve):
        found = served.post(f"{prefix}/identify", json={"embeddings": [row], "model_id": served.model_id, "top_k": 50})
        assert all(c["score"] < 0.99 for c in found.json()["results"][0]["candidates"])
    entries = [e for e in served.get("/audit", params={"limit": 1000}).json()["items"] if e["request_id"] == request_id]
    assert sorted((e["action"], e["identity_id"], e["details"]["face_id"]) for e in entries) == sorted(
        [("face.deleted", "dana", d_ids[0]), ("face.deleted", "dana", d_ids[1]),
         ("face.deleted", "eve", e_ids[0]), ("face.deleted", "eve", e_ids[1])])
    collection = served.get(f"/collections/{prefix.rsplit('/', 1)[-1] or 'default'}").json()
    listed = served.get(f"{prefix}/identities", params={"limit": 1000}).json()["items"]
    assert collection["identities"] == len(listed) and collection["faces"] == sum(i["face_count"] for i in listed)
    # again: nothing left to erase, nothing refused
    r = served.post(f"{prefix}/faces/delete", json={"face_ids": asked})
    assert r.json() == {"deleted": [], "not_found": sorted({*asked})}
    for bad in ([], [0], [-1], ["1"], [2**63], list(range(1, 1002)), None):
        r = served.post(f"{prefix}/faces/delete", json={"face_ids": bad})
        assert (r.status_code, error_code(r)) == (422, "invalid_request"), (bad, r.text)
    r = served.post(f"{prefix}/faces/delete", json={"face_ids": [d_ids[2]], "identity_id": "dana"})
    assert (r.status_code, error_code(r)) == (422, "invalid_request")
    assert served.get(f"{prefix}/identities/dana").json()["face_ids"] == [d_ids[2]]


def test_a_face_of_another_collection_is_not_found(served):
    assert served.post("/collections", json={"name": "fenced"}).status_code == 201
    [face] = enroll(served, "", "carol", vectors(1, 5))
    r = served.delete(f"/collections/fenced/faces/{face}")
    assert (r.status_code, error_code(r)) == (404, "face_not_found")
    r = served.post(f"/collections/fenced/faces/{face}/move", json={"identity_id": "carol"})
    assert (r.status_code, error_code(r)) == (404, "face_not_found")
    r = served.post("/collections/fenced/faces/delete", json={"face_ids": [face]})
    assert r.json() == {"deleted": [], "not_found": [face]}
    assert served.get("/identities/carol").json()["face_ids"] == [face]


@pytest.fixture(params=["embedded", "postgres"])
def env(request):
    return backend_env(request, {"FACE_SNAPSHOT_INTERVAL_S": "0", "FACE_ENROLL_HUB_ALPHA": "0"})


def test_every_acknowledged_merge_is_complete_and_audited_after_sigkill(tmp_path, default_model, env):
    """Four clients merge pairs of identities while the server is killed with SIGKILL: after the
    restart every acknowledged merge is complete (the source gone, its faces the target's, found
    under the target) and audited with its request id, and every other pair is either merged whole
    (with its record) or untouched: never half done."""
    data = tmp_path / "data"
    server = ServerProcess(data, model=default_model, env=env)
    model_id = server.wait_ready()["model_id"]
    pairs = 160
    faces: dict[str, list[int]] = {}
    rows: dict[str, list[list[float]]] = {}
    with httpx.Client(base_url=server.url, timeout=30) as c:
        c.model_id = model_id  # type: ignore[attr-defined]
        for i in range(pairs):
            for name, n in ((f"src{i}", 2), (f"dst{i}", 1)):
                rows[name] = vectors(n, 1000 + 2 * i + n)
                faces[name] = enroll(c, "", name, rows[name])
    acknowledged: dict[str, int] = {}  # request id -> pair
    lock = threading.Lock()
    stop = threading.Event()

    def merge_forever(worker: int) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            for i in range(worker, pairs, 4):
                if stop.is_set():
                    return
                try:
                    r = c.post(f"/identities/src{i}/merge", json={"into": f"dst{i}"})
                except httpx.HTTPError:
                    return  # the server died mid-request: not acknowledged
                if r.status_code == 200:
                    with lock:
                        acknowledged[r.headers["X-Request-ID"]] = i

    kill_mid_way(server, [threading.Thread(target=merge_forever, args=(w,)) for w in range(4)], stop, acknowledged, 40)
    assert 40 <= len(acknowledged) < pairs  # killed mid-way

    server = ServerProcess(data, model=default_model, env=env)
    server.wait_ready()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            c.model_id = model_id  # type: ignore[attr-defined]
            records = {e["request_id"]: e for e in audit_entries(c, "identity.merged")}
            merged_pairs = {int(e["identity_id"][3:]) for e in records.values()}
            for request_id, i in acknowledged.items():
                entry = records.get(request_id)
                assert entry is not None and entry["identity_id"] == f"dst{i}", (request_id, i)
                assert entry["details"] == {"merged_from": f"src{i}", "faces_moved": 2, "face_count": 3}
            for i in range(pairs):
                src, dst = c.get(f"/identities/src{i}"), c.get(f"/identities/dst{i}").json()
                if i in merged_pairs:
                    assert src.status_code == 404, (i, src.text)
                    assert dst["face_ids"] == sorted(faces[f"src{i}"] + faces[f"dst{i}"]), i
                else:
                    assert src.json()["face_ids"] == faces[f"src{i}"], i
                    assert dst["face_ids"] == faces[f"dst{i}"], i
            for i in sorted(merged_pairs)[:5]:
                assert best(c, "", rows[f"src{i}"][0]) == f"dst{i}"
            info = c.get("/collections/default").json()
            assert info["identities"] == 2 * pairs - len(merged_pairs) and info["faces"] == 3 * pairs
    finally:
        server.stop()


def test_every_acknowledged_bulk_delete_is_complete_and_audited_after_sigkill(tmp_path, default_model, env):
    """Three clients erase faces 8 at a time (POST /faces/delete) while the server is killed with
    SIGKILL: after the restart every acknowledged request's faces are gone (from the identities and
    from the search) with an audit record each, and every other request is all or nothing."""
    data = tmp_path / "data"
    server = ServerProcess(data, model=default_model, env=env)
    model_id = server.wait_ready()["model_id"]
    people = 120
    faces: dict[int, str] = {}
    rows: dict[int, list[float]] = {}
    with httpx.Client(base_url=server.url, timeout=30) as c:
        c.model_id = model_id  # type: ignore[attr-defined]
        for i in range(people):
            person = vectors(4, 5000 + i)
            for face_id, row in zip(enroll(c, "", f"p{i}", person), person):
                faces[face_id], rows[face_id] = f"p{i}", row
    ids = sorted(faces)
    chunks = [ids[n::60] for n in range(60)]  # 8 faces of 8 people each
    acknowledged: dict[str, int] = {}  # request id -> chunk
    lock = threading.Lock()
    stop = threading.Event()

    def delete_forever(worker: int) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            for n in range(worker, len(chunks), 3):
                if stop.is_set():
                    return
                try:
                    r = c.post("/faces/delete", json={"face_ids": chunks[n]})
                except httpx.HTTPError:
                    return  # the server died mid-request: not acknowledged
                if r.status_code == 200:
                    assert len(r.json()["deleted"]) == 8
                    with lock:
                        acknowledged[r.headers["X-Request-ID"]] = n

    kill_mid_way(server, [threading.Thread(target=delete_forever, args=(w,)) for w in range(3)], stop, acknowledged, 15)
    assert 15 <= len(acknowledged) < len(chunks)  # killed mid-way

    server = ServerProcess(data, model=default_model, env=env)
    server.wait_ready()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            c.model_id = model_id  # type: ignore[attr-defined]
            recorded: dict[str, set[int]] = {}
            for e in audit_entries(c, "face.deleted"):
                recorded.setdefault(e["request_id"], set()).add(e["details"]["face_id"])
            for request_id, n in acknowledged.items():
                assert recorded.get(request_id) == set(chunks[n]), (request_id, n)
            left = {f for i in range(people) for f in
                    (c.get(f"/identities/p{i}").json().get("face_ids") or [])}
            erased = set(ids) - left
            assert erased == set().union(*recorded.values())  # no face gone without its record
            for chunk in chunks:  # all or nothing
                assert set(chunk) <= erased or not set(chunk) & erased, chunk
            for n in list(acknowledged.values())[:4]:
                for face_id in chunks[n][:2]:
                    found = c.post("/identify", json={"embeddings": [rows[face_id]], "model_id": model_id,
                                                      "top_k": 5}).json()["results"][0]["candidates"]
                    assert all(x["score"] < 0.99 for x in found), (face_id, found)
            info = c.get("/collections/default").json()
            assert info["faces"] == len(left)
    finally:
        server.stop()
