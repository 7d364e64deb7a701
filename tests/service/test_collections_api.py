"""Collections over HTTP on both backends: create/list/get/delete, the routes under
/collections/{name}, isolation (also under concurrent writes), per-collection thresholds, retention
(faces erased on time by the server's own sweep), and the audit trail of what changed."""

from __future__ import annotations

import base64
import threading
import time

import httpx
import numpy as np
import pytest

from harness.fixtures import face_files
from harness.server import ServerProcess
from tests.conftest import backend_env, metric
from tests.damage import deletes_refused

DIM = 128


def vectors(n: int, seed: int) -> list[list[float]]:
    v = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).tolist()


@pytest.fixture(scope="module", params=["embedded", "postgres"])
def served(request, tmp_path_factory, default_model):
    env = backend_env(request, {"FACE_ENROLL_HUB_ALPHA": "0", "FACE_RETENTION_SWEEP_S": "0.2"})
    proc = ServerProcess(tmp_path_factory.mktemp(f"collections-{request.param}") / "data", model=default_model,
                         env=env)
    ready = proc.wait_ready()
    with httpx.Client(base_url=proc.url, timeout=60) as client:
        client.model_id = ready["model_id"]  # type: ignore[attr-defined]
        yield client
    proc.stop()


def enroll(client, collection: str, identity: str, rows: list[list[float]]) -> httpx.Response:
    return client.post(f"/collections/{collection}/enroll",
                       json={"identity_id": identity, "embeddings": rows, "model_id": client.model_id})


def test_create_list_get_delete(served):
    r = served.post("/collections", json={"name": "site-a"})
    assert r.status_code == 201, r.text
    made = r.json()
    assert made["name"] == "site-a" and made["identities"] == 0 and made["faces"] == 0
    assert made["model_id"] == served.model_id and made["identify_threshold"] > 0
    assert served.post("/collections", json={"name": "site-a"}).json()["error"]["code"] == "collection_exists"
    for bad in ("Site-A", "-x", "a/b", "", "x" * 64, "é"):
        r = served.post("/collections", json={"name": bad})
        assert r.status_code == 422, bad
    names = [c["name"] for c in served.get("/collections").json()["items"]]
    assert "default" in names and "site-a" in names
    assert enroll(served, "site-a", "ann", vectors(2, 1)).status_code == 200
    one = served.get("/collections/site-a").json()
    assert one["identities"] == 1 and one["faces"] == 2
    gone = served.delete("/collections/site-a")
    assert gone.status_code == 200 and gone.json() == {"name": "site-a", "deleted_identities": 1, "deleted_faces": 2}
    for path in ("/collections/site-a", "/collections/site-a/identities"):
        r = served.get(path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "collection_not_found", path
    r = served.post("/collections/site-a/identify", json={"embeddings": vectors(1, 1), "model_id": served.model_id})
    assert r.json()["error"]["code"] == "collection_not_found"
    r = served.delete("/collections/default")
    assert r.status_code == 409 and r.json()["error"]["code"] == "collection_protected"


def test_a_collection_with_retention_forgets_its_faces_on_time_and_keeps_them_once_cleared(served):
    seconds = 2.0
    for bad in (0, -1, 36_501, "soon", True):
        r = served.post("/collections", json={"name": "bad-retention", "retention_days": bad})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", bad
    r = served.post("/collections", json={"name": "visitors", "retention_days": seconds / 86_400})
    assert r.status_code == 201 and r.json()["retention_days"] == pytest.approx(seconds / 86_400)
    started = time.time()
    assert enroll(served, "visitors", "guest", vectors(2, 40)).status_code == 200
    probe = {"embeddings": vectors(1, 40), "model_id": served.model_id}
    assert served.post("/collections/visitors/identify", json=probe).json()["results"][0]["identity_id"] == "guest"
    faces = served.get("/collections/visitors/identities/guest").json()["faces"]
    assert len(faces) == 2 and all(started <= f["enrolled_at"] <= time.time() for f in faces)
    assert all(f["expires_at"] == pytest.approx(f["enrolled_at"] + seconds) for f in faces)
    while served.get("/collections/visitors/identities/guest").status_code == 200:
        assert time.time() - started < 20, "not erased within its retention and a few sweeps"
        time.sleep(0.05)
    assert time.time() - started >= seconds  # not before its time
    assert served.post("/collections/visitors/identify", json=probe).json()["results"][0]["identity_id"] is None
    assert served.get("/collections/visitors").json()["faces"] == 0
    trail = served.get("/audit", params={"collection": "visitors"}).json()["items"]
    erased = [e for e in trail if e["action"] == "face.deleted"]
    assert len(erased) == 2 and all(e["details"]["via"] == "retention" and e["key_id"] is None for e in erased)
    assert metric(served, 'face_retention_erased_faces_total{collection="visitors"}') == 2.0

    cleared = served.patch("/collections/visitors", json={"retention_days": None})
    assert cleared.status_code == 200 and cleared.json()["retention_days"] is None
    assert trail[0]["action"] != "collection.updated"
    updated = served.get("/audit", params={"collection": "visitors", "limit": 1}).json()["items"][0]
    assert (updated["action"], updated["details"]) == ("collection.updated", {
        "retention_days": None, "previous_retention_days": pytest.approx(seconds / 86_400)})
    assert enroll(served, "visitors", "resident", vectors(1, 41)).status_code == 200
    assert served.get("/collections/visitors/identities/resident").json()["faces"][0]["expires_at"] is None
    time.sleep(seconds + 1)  # past what the retention was, and several sweeps
    assert served.get("/collections/visitors/identities/resident").status_code == 200
    for bad in ({}, {"retention_days": 0}, {"retention_days": "x"}, {"retention_days": 1, "name": "other"}):
        r = served.patch("/collections/visitors", json=bad)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", bad
    r = served.patch("/collections/nothing-here", json={"retention_days": 1})
    assert r.status_code == 404 and r.json()["error"]["code"] == "collection_not_found"


@pytest.mark.parametrize("backend", ["embedded", "postgres"])
def test_a_sweep_is_timed_for_the_next_expiry_not_the_next_interval(request, tmp_path, default_model, backend):
    """With FACE_RETENTION_SWEEP_S at 60 s, a face is erased about a second after its expiry, not at
    the next minute: the sweeper, started on a gallery whose face expires in a few seconds, times its
    next sweep for that expiry (it waited the whole interval: erased up to a minute late)."""
    env = {"FACE_RETENTION_SWEEP_S": "60"}
    if backend == "postgres":
        env |= request.getfixturevalue("postgres").gallery_env()
    retention_s = 12.0
    first = ServerProcess(tmp_path / "data", model=default_model, env=env)
    try:
        ready = first.wait_ready()
        with httpx.Client(base_url=first.url, timeout=60) as c:
            c.model_id = ready["model_id"]  # type: ignore[attr-defined]
            assert c.post("/collections", json={"name": "timed", "retention_days": retention_s / 86_400}).status_code == 201
            assert enroll(c, "timed", "guest", vectors(1, 7)).status_code == 200
            expires = c.get("/collections/timed/identities/guest").json()["faces"][0]["expires_at"]
    finally:
        first.stop()
    second = ServerProcess(tmp_path / "data", model=default_model, env=env)  # its first sweep finds it unexpired
    try:
        second.wait_ready()
        assert time.time() < expires - 2, "the restart took longer than the retention: nothing to time"
        with httpx.Client(base_url=second.url, timeout=60) as c:
            while c.get("/collections/timed/identities/guest").status_code == 200:
                assert time.time() < expires + 5, "not erased within seconds of its expiry"
                time.sleep(0.05)
            assert time.time() >= expires  # not before its time
    finally:
        second.stop()
    erased = [line for line in second.log_path.read_text().splitlines() if "faces past retention erased" in line]
    assert len(erased) == 1 and '"faces": 1' in erased[0], erased


@pytest.mark.parametrize("backend", ["embedded", "postgres"])
def test_faces_the_database_will_not_erase_are_shown_overdue_until_erased(request, tmp_path, default_model, backend):
    """/metrics' face_retention_overdue_seconds{collection}: while the gallery's database refuses to erase
    a collection's faces past their retention, it grows with their time since expiry (the erased-faces
    counter alone says nothing: it stays still); once erasure works again the next full round erases them
    and it is 0. The face is served meanwhile, and the failure logged without a traceback."""
    env = {"FACE_RETENTION_SWEEP_S": "1"}
    database = None
    if backend == "postgres":
        env |= request.getfixturevalue("postgres").gallery_env()
        database = (env["FACE_DATABASE_URL"], env["FACE_DATABASE_SCHEMA"])
    sample = 'face_retention_overdue_seconds{collection="held"}'
    server = ServerProcess(tmp_path / "data", model=default_model, env=env)
    try:
        ready = server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=60) as c:
            c.model_id = ready["model_id"]  # type: ignore[attr-defined]
            assert c.post("/collections", json={"name": "held", "retention_days": 3 / 86_400}).status_code == 201
            assert enroll(c, "held", "guest", vectors(1, 9)).status_code == 200
            with deletes_refused("held", data_dir=None if database else tmp_path / "data", database=database):
                expires = c.get("/collections/held/identities/guest").json()["faces"][0]["expires_at"]
                assert time.time() < expires, "the retention passed before the deletes were refused"
                while (overdue := metric(c, sample)) < 4:
                    assert time.time() < expires + 30, f"not shown overdue: {overdue}"
                    time.sleep(0.2)
                assert overdue <= time.time() - expires + 0.5  # its time since expiry, not more
                assert c.get("/collections/held/identities/guest").status_code == 200  # held, still served
                assert metric(c, 'face_retention_erased_faces_total{collection="held"}') == 0
            while c.get("/collections/held/identities/guest").status_code == 200:
                assert time.time() < expires + 60, "not erased once the deletes were allowed"
                time.sleep(0.1)
            assert metric(c, sample) == 0.0
            assert metric(c, 'face_retention_erased_faces_total{collection="held"}') == 1
    finally:
        server.stop()
    log = server.log_path.read_text()
    assert "retention sweep of a collection failed" in log and "Traceback" not in log


def test_the_unprefixed_routes_are_the_default_collection(served):
    rows = vectors(1, 2)
    assert served.post("/enroll", json={"identity_id": "dora", "embeddings": rows,
                                        "model_id": served.model_id}).status_code == 200
    assert served.get("/collections/default/identities/dora").status_code == 200
    r = served.post("/collections/default/identify", json={"embeddings": rows, "model_id": served.model_id})
    assert r.json()["results"][0]["identity_id"] == "dora"
    served.delete("/collections/default/identities/dora")
    assert served.get("/identities/dora").status_code == 404


def test_the_same_id_in_two_collections_is_two_people(served):
    for name in ("north", "south"):
        served.post("/collections", json={"name": name})
    a, b = vectors(2, 3)
    assert enroll(served, "north", "pat", [a]).json()["created"] is True
    assert enroll(served, "south", "pat", [b]).json()["created"] is True
    north = served.post("/collections/north/identify", json={"embeddings": [b], "model_id": served.model_id}).json()
    assert north["results"][0]["identity_id"] is None  # b is south's pat, unknown in north
    v = served.post("/collections/south/verify", json={"embedding_a": b, "identity_id": "pat",
                                                       "model_id": served.model_id}).json()
    assert v["match"] is True and v["similarity"] > 0.99
    served.delete("/collections/north/identities/pat")
    assert served.get("/collections/south/identities/pat").status_code == 200


def test_the_threshold_follows_each_collection_own_size(served):
    served.post("/collections", json={"name": "small"})
    served.post("/collections", json={"name": "large"})
    for i in range(60):
        enroll(served, "large", f"p{i}", vectors(3, 100 + i))
    enroll(served, "small", "only", vectors(1, 99))
    small, large = served.get("/collections/small").json(), served.get("/collections/large").json()
    assert small["identify_threshold"] < large["identify_threshold"]
    probe = {"embeddings": vectors(1, 7), "model_id": served.model_id}
    answer = served.post("/collections/small/identify", json=probe).json()
    assert answer["threshold"] == pytest.approx(small["identify_threshold"])
    assert answer["gallery_identities"] == 1
    ready = served.get("/readyz").json()
    assert ready["collections"]["small"]["identify_threshold"] == pytest.approx(small["identify_threshold"])
    assert ready["collections"]["large"]["faces"] == 180


def test_no_cross_collection_answer_under_concurrent_writes(served):
    """Two collections enrolled into from threads while both are identified from others: every
    candidate of an identify in a collection is one of that collection's identities, always."""
    for name in ("left", "right"):
        served.post("/collections", json={"name": name})
    stop = threading.Event()
    errors: list[str] = []
    rng = np.random.default_rng(11)
    shared = vectors(1, 12)  # the same face enrolled in both, under a per-collection id

    def writer(collection: str) -> None:
        with httpx.Client(base_url=str(served.base_url), timeout=60) as c:
            c.model_id = served.model_id  # type: ignore[attr-defined]
            i = 0
            while not stop.is_set() and i < 60:
                rows = shared if i % 5 == 0 else vectors(1, int(rng.integers(1 << 30)))
                r = enroll(c, collection, f"{collection}-{i}", rows)
                if r.status_code != 200:
                    errors.append(r.text)
                i += 1

    def reader(collection: str) -> None:
        with httpx.Client(base_url=str(served.base_url), timeout=60) as c:
            while not stop.is_set():
                r = c.post(f"/collections/{collection}/identify",
                           json={"embeddings": shared, "top_k": 10, "model_id": served.model_id})
                if r.status_code != 200:
                    errors.append(r.text)
                    continue
                for cand in r.json()["results"][0]["candidates"]:
                    if not cand["identity_id"].startswith(f"{collection}-"):
                        errors.append(f"{collection} answered {cand['identity_id']}")

    threads = [threading.Thread(target=writer, args=(n,)) for n in ("left", "right")]
    threads += [threading.Thread(target=reader, args=(n,)) for n in ("left", "right", "left", "right")]
    for t in threads:
        t.start()
    for t in threads[:2]:
        t.join()
    stop.set()
    for t in threads[2:]:
        t.join()
    assert errors == []
    assert served.get("/collections/left").json()["identities"] == 60


def test_every_change_is_audited_with_who_when_and_what(served):
    served.post("/collections", json={"name": "audited"}, headers={"X-Request-ID": "req-make-audited"})
    r = enroll(served, "audited", "zoe", vectors(2, 21))
    request_id = r.headers["X-Request-ID"]
    assert request_id
    served.post("/collections/audited/enroll", json={"identity_id": "zoe", "embeddings": vectors(1, 22),
                                                     "model_id": served.model_id, "replace": True})
    served.delete("/collections/audited/identities/zoe")
    served.delete("/collections/audited")
    page = served.get("/audit", params={"collection": "audited"}).json()
    actions = [e["action"] for e in page["items"]]
    assert actions == ["collection.deleted", "identity.deleted", "identity.replaced", "identity.created",
                       "collection.created"]
    created = page["items"][3]
    assert created["identity_id"] == "zoe" and created["request_id"] == request_id
    assert created["client"] == "127.0.0.1" and created["details"]["face_count"] == 2
    assert page["items"][-1]["request_id"] == "req-make-audited"
    assert page["items"][0]["details"] == {"identities": 0, "faces": 0}
    # paging: one entry a page, newest first, every entry once
    seen, cursor = [], None
    while True:
        p = served.get("/audit", params={"collection": "audited", "limit": 1} | ({"cursor": cursor} if cursor else {}))
        seen += [e["action"] for e in p.json()["items"]]
        cursor = p.json()["next_cursor"]
        if not cursor:
            break
    assert seen == actions
    # a cursor neither backend made: 422 on the cursor, not a 500 (nor a database error)
    for bad in ("", "abc", "1:2", "9" * 30, "-5", "1.5:default:" + "9" * 30, "nan:default:1", "inf:default:1"):
        r = served.get("/audit", params={"cursor": bad})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", (bad, r.text[:300])
        assert r.json()["error"]["details"]["errors"][0]["field"] == "query.cursor"
    only_zoe = served.get("/audit", params={"identity_id": "zoe", "collection": "audited"}).json()["items"]
    assert {e["action"] for e in only_zoe} == {"identity.created", "identity.replaced", "identity.deleted"}
    for entry in served.get("/audit", params={"limit": 1000}).json()["items"]:  # never an image or a vector
        assert all(not isinstance(v, (list, dict)) or k == "collections" for k, v in entry["details"].items()), entry


def test_photos_go_to_the_chosen_collection(served):
    served.post("/collections", json={"name": "photos"})
    face = base64.b64encode(face_files("Colin_Powell")[0].read_bytes()).decode()
    assert served.post("/collections/photos/enroll", json={"identity_id": "colin", "images": [face]}).status_code == 200
    probe = base64.b64encode(face_files("Colin_Powell")[1].read_bytes()).decode()
    here = served.post("/collections/photos/identify", json={"images": [probe]}).json()
    assert here["results"][0]["identity_id"] == "colin"
    default = served.post("/identify", json={"images": [probe]}).json()
    assert all(c["identity_id"] != "colin" for c in default["results"][0]["candidates"])


def test_a_collection_face_limit_is_held_exactly_under_concurrent_enrolls(served):
    """max_faces: 24 clients enrolling one face each into a collection limited to 10 store exactly 10 (the
    others get 413 too_many_faces_for_collection with the counts), a replace that adds no net face passes
    at the limit, lifting the limit lets writes in again, and every change is audited."""
    r = served.post("/collections", json={"name": "capped", "max_faces": 10})
    assert r.status_code == 201 and r.json()["max_faces"] == 10, r.text
    barrier = threading.Barrier(24)
    answers: list[httpx.Response] = []

    def one(n: int) -> None:
        with httpx.Client(base_url=str(served.base_url), timeout=60) as own:
            own.model_id = served.model_id  # type: ignore[attr-defined]
            barrier.wait()
            answers.append(enroll(own, "capped", f"p{n}", vectors(1, 500 + n)))

    threads = [threading.Thread(target=one, args=(n,)) for n in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    stored = [r for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code != 200]
    assert len(stored) == 10 and len(refused) == 14, [r.text for r in answers]
    for r in refused:
        error = r.json()["error"]
        assert (r.status_code, error["code"]) == (413, "too_many_faces_for_collection"), r.text
        assert error["details"] == {"collection": "capped", "faces": 10, "adding": 1, "limit": 10}
    assert served.get("/collections/capped").json()["faces"] == 10
    kept = stored[0].json()["identity_id"]
    r = served.post("/collections/capped/enroll", json={"identity_id": kept, "embeddings": vectors(1, 600),
                                                        "model_id": served.model_id, "replace": True})
    assert r.status_code == 200, r.text  # one face for one: no net face
    r = served.patch("/collections/capped", json={"max_faces": None})
    assert r.status_code == 200 and r.json()["max_faces"] is None
    assert enroll(served, "capped", "late", vectors(2, 601)).status_code == 200
    r = served.patch("/collections/capped", json={"max_faces": 5})  # under what it holds: nothing erased
    assert r.status_code == 200 and r.json()["faces"] == 12, r.text
    assert enroll(served, "capped", "later", vectors(1, 602)).status_code == 413
    trail = [e for e in served.get("/audit", params={"collection": "capped"}).json()["items"]
             if e["action"] == "collection.updated"]
    assert [e["details"] for e in trail] == [{"max_faces": 5, "previous_max_faces": None},
                                             {"max_faces": None, "previous_max_faces": 10}]
    for bad in (0, -1, 1.5, "10", True):
        r = served.patch("/collections/capped", json={"max_faces": bad})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", bad


def test_a_collection_identify_fpir_sets_its_own_threshold(served):
    """identify_fpir: a stricter target gives a higher threshold for the same size, in /identify's answer
    and the collection's; PATCH changes only what it names (retention kept); null: the service's again."""
    for name, fpir in (("strict", 0.0001), ("lenient", None)):
        body = {"name": name, "retention_days": 30} | ({"identify_fpir": fpir} if fpir else {})
        assert served.post("/collections", json=body).status_code == 201
        for n in range(6):
            assert enroll(served, name, f"p{n}", vectors(1, 700 + n)).status_code == 200
    probe = {"embeddings": vectors(1, 800), "model_id": served.model_id}
    strict = served.post("/collections/strict/identify", json=probe).json()
    lenient = served.post("/collections/lenient/identify", json=probe).json()
    assert (strict["threshold_source"], strict["fpir_target"]) == ("fpir", 0.0001)
    assert (lenient["threshold_source"], lenient["fpir_target"]) == ("fpir", 0.01)  # FACE_IDENTIFY_FPIR
    assert strict["threshold"] > lenient["threshold"]
    info = served.get("/collections/strict").json()
    assert info["identify_fpir"] == 0.0001 and info["identify_threshold"] == pytest.approx(strict["threshold"])
    r = served.patch("/collections/lenient", json={"identify_fpir": 0.0001})
    assert r.status_code == 200 and r.json()["retention_days"] == 30 and r.json()["identify_fpir"] == 0.0001
    again = served.post("/collections/lenient/identify", json=probe).json()
    assert again["threshold"] == pytest.approx(strict["threshold"])
    assert served.patch("/collections/lenient", json={"identify_fpir": None}).json()["identify_fpir"] is None
    assert served.post("/collections/lenient/identify", json=probe).json()["threshold"] == \
        pytest.approx(lenient["threshold"])
    # the default collection too (its settings are read once a second on PostgreSQL)
    assert served.patch("/collections/default", json={"identify_fpir": 0.0001}).status_code == 200
    try:
        assert served.post("/identify", json=probe).json()["fpir_target"] == 0.0001
    finally:
        served.patch("/collections/default", json={"identify_fpir": None})
    for bad in (0, 1, -0.1, "0.01"):
        r = served.patch("/collections/strict", json={"identify_fpir": bad})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", bad
