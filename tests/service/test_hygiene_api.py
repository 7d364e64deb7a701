"""Gallery hygiene over HTTP on both backends: enrolled faces and identities as /identify probes,
duplicate people (GET /duplicates), mislabelled faces (GET /outliers) and the enroll guard
(FACE_ENROLL_DUPLICATE_POLICY), with real LFW crops through the real model.

The planted cases: Andre Agassi's first four photos enrolled as two identities (a duplicate person),
and a photo of Bill Gates filed under Al Gore (a mislabelled face) in a gallery of other people."""

from __future__ import annotations

import base64
import time

import httpx
import pytest

from harness.server import REPO, ServerProcess
from tests.conftest import backend_env

LFW = (REPO / ".." / "shared" / "data" / "lfw-112" / "images").resolve()
BASE = ["Adrien_Brody", "Al_Gore", "Ali_Naimi", "Amelie_Mauresmo", "Ana_Palacio", "Andy_Roddick", "Angelina_Jolie",
        "Ann_Veneman", "Anna_Kournikova", "Antonio_Palocci", "Bill_Gates"]
COLLECTION = "hyg"

pytestmark = pytest.mark.skipif(not LFW.is_dir(), reason="needs ../shared/data/lfw-112")


def crops(person: str) -> list[str]:
    return [base64.b64encode(p.read_bytes()).decode() for p in sorted((LFW / person).glob("*.jpg"))]


def ident(person: str) -> str:
    return person.lower().replace("_", "-")


def enroll(client: httpx.Client, identity: str, images: list[str], collection: str = COLLECTION) -> httpx.Response:
    return client.post(f"/collections/{collection}/enroll", json={"identity_id": identity, "images": images})


def serve(request, tmp_path_factory, default_model, policy: str) -> ServerProcess:
    env = backend_env(request, {"FACE_ENROLL_HUB_ALPHA": "0", "FACE_ENROLL_DUPLICATE_POLICY": policy})
    proc = ServerProcess(tmp_path_factory.mktemp(f"hygiene-{request.param}-{policy}") / "data",
                         model=default_model, env=env)
    proc.wait_ready()
    return proc


class Planted:
    def __init__(self, client: httpx.Client) -> None:
        self.client = client
        self.faces: dict[str, list[int]] = {}  # identity -> its face ids
        assert client.post("/collections", json={"name": COLLECTION}).status_code == 201
        for person in BASE:
            self.add(ident(person), crops(person)[:4])
        agassi = crops("Andre_Agassi")
        self.add("agassi-a", agassi[:2])
        self.add("agassi-b", agassi[2:4])
        self.spare_agassi = agassi[4]
        self.mislabelled = self.add("al-gore", crops("Bill_Gates")[4:5])[0]  # Bill Gates filed under Al Gore

    def add(self, identity: str, images: list[str]) -> list[int]:
        r = enroll(self.client, identity, images)
        assert r.status_code == 200, r.text
        assert r.json().get("possible_duplicates") is None or identity in ("agassi-b", "al-gore")
        self.faces.setdefault(identity, []).extend(r.json()["face_ids"])
        return r.json()["face_ids"]

    def owner(self, face_id: int) -> str:
        return next(i for i, ids in self.faces.items() if face_id in ids)


@pytest.fixture(scope="module", params=["embedded", "postgres"])
def planted(request, tmp_path_factory, default_model):
    proc = serve(request, tmp_path_factory, default_model, "warn")
    with httpx.Client(base_url=proc.url, timeout=120) as client:
        yield Planted(client)
    proc.stop()


def test_face_id_probes_never_return_their_own_identity(planted: Planted):
    every = [f for ids in planted.faces.values() for f in ids]
    r = planted.client.post(f"/collections/{COLLECTION}/identify", json={"face_ids": every, "top_k": 5})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [p["probe_face_id"] for p in results] == every
    for probe in results:
        own = planted.owner(probe["probe_face_id"])
        assert len(probe["candidates"]) == 5
        assert own not in [c["identity_id"] for c in probe["candidates"]], probe
    # the duplicate person's faces find the other half first, and by name
    for face_id in planted.faces["agassi-a"]:
        probe = results[every.index(face_id)]
        assert probe["candidates"][0]["identity_id"] == "agassi-b"
        assert probe["candidates"][0]["face_id"] in planted.faces["agassi-b"]
        assert probe["identity_id"] == "agassi-b" and probe["known"] is True
    # the mislabelled photo of Bill Gates is named as Bill Gates, not as its own (wrong) identity
    probe = results[every.index(planted.mislabelled)]
    assert probe["candidates"][0]["identity_id"] == "bill-gates"


def test_identity_probe_scores_each_candidate_by_its_best_face(planted: Planted):
    r = planted.client.post(f"/collections/{COLLECTION}/identify", json={"identity_id": "agassi-b", "top_k": 3})
    assert r.status_code == 200, r.text
    (result,) = r.json()["results"]
    names = [c["identity_id"] for c in result["candidates"]]
    assert names[0] == "agassi-a" and "agassi-b" not in names and len(names) == 3
    # the best over agassi-b's faces: the same as the best face_ids probe of them
    by_face = planted.client.post(f"/collections/{COLLECTION}/identify",
                                  json={"face_ids": planted.faces["agassi-b"], "top_k": 1}).json()["results"]
    assert result["candidates"][0]["score"] == pytest.approx(max(p["candidates"][0]["score"] for p in by_face))
    assert result["probe_face_id"] is None


def test_the_planted_duplicate_is_found_with_its_evidence(planted: Planted):
    r = planted.client.get(f"/collections/{COLLECTION}/duplicates")
    assert r.status_code == 200, r.text
    body = r.json()
    pairs = {(p["identity_a"], p["identity_b"]): p for p in body["pairs"]}
    assert ("agassi-a", "agassi-b") in pairs, body
    pair = pairs[("agassi-a", "agassi-b")]
    assert pair["score"] >= body["min_score"] and 0 <= pair["false_alarm_probability"] < 0.01
    assert 1 <= len(pair["evidence"]) <= 3
    assert pair["score"] == max(e["score"] for e in pair["evidence"])
    for e in pair["evidence"]:
        assert e["face_a"] in planted.faces["agassi-a"] and e["face_b"] in planted.faces["agassi-b"]
    # the mislabelled face is an outlier of Al Gore, not evidence that Al Gore is Bill Gates
    assert ("al-gore", "bill-gates") not in pairs
    assert list(pairs) == [("agassi-a", "agassi-b")]
    faces = sum(len(ids) for ids in planted.faces.values())
    assert body["faces_scanned"] == faces and body["comparisons"] == faces * (len(planted.faces) - 1)
    assert body["max_false_alarm"] == 0.2 and body["model_id"]
    # an explicit min_score lists what scores that high; evidence and limit are honoured
    low = planted.client.get(f"/collections/{COLLECTION}/duplicates",
                             params={"min_score": 0.2, "evidence": 1, "limit": 2}).json()
    assert low["min_score"] == 0.2 and low["max_false_alarm"] is None and len(low["pairs"]) == 2
    assert low["pairs"][0]["identity_a"] == "agassi-a" and len(low["pairs"][0]["evidence"]) == 1
    assert low["pairs"][0]["score"] >= low["pairs"][1]["score"] >= 0.2
    # the unprefixed route is the default collection's (empty here)
    empty = planted.client.get("/duplicates").json()
    assert empty["pairs"] == [] and empty["faces_scanned"] == 0


def test_the_mislabelled_face_is_an_outlier_with_the_identity_it_matches(planted: Planted):
    r = planted.client.get(f"/collections/{COLLECTION}/outliers")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["identities_checked"] == len(planted.faces) and body["threshold"] > 0
    listed = {f["face_id"]: f for f in body["faces"]}
    assert planted.mislabelled in listed, body
    face = listed[planted.mislabelled]
    assert face["identity_id"] == "al-gore" and face["own_score"] < body["threshold"]
    assert face["best_other"]["identity_id"] == "bill-gates"
    assert face["best_other"]["face_id"] in planted.faces["bill-gates"]
    assert face["best_other"]["score"] >= body["threshold"]
    assert body["faces"][0]["own_score"] == min(f["own_score"] for f in body["faces"])
    # a stricter min_score lists more (worst first); limit cuts the list
    strict = planted.client.get(f"/collections/{COLLECTION}/outliers", params={"min_score": 0.9, "limit": 5}).json()
    assert len(strict["faces"]) == 5 and strict["faces"][0]["face_id"] == planted.mislabelled


def test_the_enroll_guard_warns_for_a_new_identity_only(planted: Planted):
    r = enroll(planted.client, "agassi-c", [planted.spare_agassi])
    assert r.status_code == 200, r.text
    named = [d["identity_id"] for d in r.json()["possible_duplicates"]]
    assert set(named) <= {"agassi-a", "agassi-b"} and named, r.json()
    first = r.json()["possible_duplicates"][0]
    assert first["face_id"] in planted.faces[first["identity_id"]]
    planted.faces["agassi-c"] = r.json()["face_ids"]
    # appending to an identity that exists is not checked; an unlike new identity is not warned
    again = enroll(planted.client, "agassi-c", [planted.spare_agassi])
    assert again.status_code == 200 and again.json()["possible_duplicates"] is None
    planted.faces["agassi-c"] += again.json()["face_ids"]
    fresh = enroll(planted.client, "bill-frist", crops("Bill_Frist")[:1])
    assert fresh.status_code == 200 and fresh.json()["possible_duplicates"] is None
    planted.faces["bill-frist"] = fresh.json()["face_ids"]


@pytest.fixture(params=["embedded", "postgres"])
def refusing(request, tmp_path_factory, default_model):
    proc = serve(request, tmp_path_factory, default_model, "refuse")
    with httpx.Client(base_url=proc.url, timeout=120) as client:
        yield client
    proc.stop()


def test_the_enroll_guard_refuses_and_writes_nothing(refusing: httpx.Client):
    agassi = crops("Andre_Agassi")
    assert refusing.post("/collections", json={"name": COLLECTION}).status_code == 201
    assert enroll(refusing, "agassi", agassi[:2]).status_code == 200
    assert enroll(refusing, "al-gore", crops("Al_Gore")[:2]).status_code == 200
    before = refusing.get(f"/collections/{COLLECTION}").json()
    r = enroll(refusing, "agassi-again", agassi[2:4])
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert error["code"] == "possible_duplicate"
    assert [m["identity_id"] for m in error["details"]["matches"]] == ["agassi"]
    assert error["details"]["matches"][0]["score"] >= error["details"]["threshold"]
    assert refusing.get(f"/collections/{COLLECTION}/identities/agassi-again").status_code == 404
    after = refusing.get(f"/collections/{COLLECTION}").json()
    assert (after["identities"], after["faces"]) == (before["identities"], before["faces"])
    audit = refusing.get("/audit", params={"identity_id": "agassi-again"}).json()["items"]
    assert audit == []
    # more faces for an identity that exists, and another person, are let through
    assert enroll(refusing, "agassi", agassi[2:4]).status_code == 200
    assert enroll(refusing, "bill-gates", crops("Bill_Gates")[:2]).status_code == 200


def test_bad_probes_and_queries_get_codes(planted: Planted):
    client = planted.client
    url = f"/collections/{COLLECTION}/identify"
    known = planted.faces["adrien-brody"][0]
    r = client.post(url, json={"face_ids": [known, 987654321]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "face_not_found"
    assert r.json()["error"]["details"]["face_ids"] == [987654321]
    # a face of another collection is not in this one
    assert client.post("/collections", json={"name": "other"}).status_code == 201
    r = client.post("/collections/other/identify", json={"face_ids": [known]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "face_not_found"
    two_sources = [{"face_ids": [known], "identity_id": "al-gore"},
                   {"face_ids": [known], "images": crops("Al_Gore")[:1]},
                   {"identity_id": "al-gore", "embeddings": [[1.0] * 128], "model_id": "x"}]
    for body in two_sources:
        r = client.post(url, json=body)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", (body, r.text)
    for body in ({"face_ids": []}, {"face_ids": ["a"]}, {"face_ids": [1.5]}, {"face_ids": [0]}, {"face_ids": [-1]},
                 {"face_ids": [2**63]}, {"face_ids": [known, -(2**70)]}):  # past a database integer: 422, not 500
        r = client.post(url, json=body)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", (body, r.text[:300])
    r = client.post(url, files=[("face_ids", (None, f"{known},{10**30}"))])  # a form's comma list
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", r.text[:300]
    r = client.post(url, json={"identity_id": "nobody-here"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "identity_not_found"
    for path, params in (("duplicates", {"limit": 0}), ("duplicates", {"limit": 1001}),
                         ("duplicates", {"evidence": 21}), ("duplicates", {"evidence": 0}),
                         ("duplicates", {"max_false_alarm": 1.5}), ("duplicates", {"max_false_alarm": 0}),
                         ("duplicates", {"min_score": 2}), ("outliers", {"limit": 0}),
                         ("outliers", {"limit": 1001}), ("outliers", {"min_score": "high"})):
        r = client.get(f"/collections/{COLLECTION}/{path}", params=params)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", (path, params, r.text)
    r = client.get("/collections/nowhere/duplicates")
    assert r.status_code == 404 and r.json()["error"]["code"] == "collection_not_found"


def test_face_id_probes_in_a_form(planted: Planted):
    ids = planted.faces["agassi-a"]
    url = f"/collections/{COLLECTION}/identify"
    for form in ([("face_ids", ",".join(map(str, ids)))], [("face_ids", str(i)) for i in ids]):
        r = planted.client.post(url, files=[(k, (None, v)) for k, v in form])
        assert r.status_code == 200, r.text
        assert [p["probe_face_id"] for p in r.json()["results"]] == ids
        assert all(p["candidates"][0]["identity_id"] == "agassi-b" for p in r.json()["results"])



def wait_for(client: httpx.Client, url: str, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        r = client.get(url)
        assert r.status_code == 200, r.text
        if r.json()["state"] in ("done", "failed", "cancelled") or time.monotonic() > deadline:
            return r.json()
        time.sleep(0.2)


def test_the_duplicates_scan_as_a_job_answers_what_the_request_answers(planted: Planted):
    """POST .../duplicates/jobs runs GET /duplicates's scan in the job runner (minutes at a million
    faces: longer than a request should wait); the done job holds the same answer. The job is read
    through its collection only; it is audited; bad parameters are refused before a job exists."""
    client = planted.client
    r = client.post(f"/collections/{COLLECTION}/duplicates/jobs", json={"evidence": 2, "limit": 5})
    assert r.status_code == 202, r.text
    job = r.json()["job"]
    assert (job["kind"], job["collection"], job["into"]) == ("duplicates", COLLECTION, "")
    assert job["state"] in ("queued", "running", "done") and job["duplicates"] is None or job["state"] == "done"
    url = f"/collections/{COLLECTION}/duplicates/jobs/{job['id']}"
    done = wait_for(client, url)
    assert done["state"] == "done", done
    answer = done["duplicates"]
    direct = client.get(f"/collections/{COLLECTION}/duplicates", params={"evidence": 2, "limit": 5}).json()
    assert answer["pairs"] == direct["pairs"] and answer["pairs"]
    assert ("agassi-a", "agassi-b") in {(p["identity_a"], p["identity_b"]) for p in answer["pairs"]}
    for key in ("min_score", "max_false_alarm", "comparisons", "family_comparisons", "faces_scanned", "model_id"):
        assert answer[key] == direct[key], key
    assert all(len(p["evidence"]) <= 2 for p in answer["pairs"]) and len(answer["pairs"]) <= 5
    assert done["report"] is None and done["progress"]["phase"] == "done"
    assert done["progress"]["faces_done"] == answer["faces_scanned"] == sum(map(len, planted.faces.values()))
    assert "params" not in done["progress"]
    # the admin's view of every job shows it too
    assert client.get(f"/jobs/{job['id']}").json()["duplicates"] == answer
    # another collection's path (here: the default one's) does not read it
    for other in (f"/duplicates/jobs/{job['id']}", "/collections/{COLLECTION}/duplicates/jobs/job_000000000000"):
        r = client.get(other.replace("{COLLECTION}", COLLECTION))
        assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found", r.text
    # audited, in the write that queued it
    started = [e for e in client.get("/audit", params={"collection": COLLECTION, "limit": 1000}).json()["items"]
               if e["action"] == "job.started" and e["details"].get("job") == job["id"]]
    assert len(started) == 1
    # refused before any job is stored: bad parameters, a collection that does not exist
    r = client.post(f"/collections/{COLLECTION}/duplicates/jobs", json={"min_score": 2})
    assert r.status_code == 422, r.text
    r = client.post(f"/collections/{COLLECTION}/duplicates/jobs", json={"limits": 5})
    assert r.status_code == 422, r.text
    r = client.post("/collections/no-such-collection/duplicates/jobs", json={})
    assert r.status_code == 404 and r.json()["error"]["code"] == "collection_not_found", r.text
    assert [j["id"] for j in client.get("/jobs", params={"collection": COLLECTION}).json()["items"]] == [job["id"]]


def test_the_outliers_scan_as_a_job_answers_what_the_request_answers(planted: Planted):
    """POST .../outliers/jobs runs GET /outliers's scan in the job runner; the done job holds the same
    answer (the mislabelled face first at a strict min_score), read through its own collection and
    kind only, audited when queued; bad parameters are refused before a job exists."""
    client = planted.client
    params = {"min_score": 0.9, "limit": 5}
    r = client.post(f"/collections/{COLLECTION}/outliers/jobs", json=params)
    assert r.status_code == 202, r.text
    job = r.json()["job"]
    assert (job["kind"], job["collection"], job["into"]) == ("outliers", COLLECTION, "")
    done = wait_for(client, f"/collections/{COLLECTION}/outliers/jobs/{job['id']}")
    assert done["state"] == "done", done
    answer = done["outliers"]
    assert answer == client.get(f"/collections/{COLLECTION}/outliers", params=params).json()
    assert len(answer["faces"]) == 5 and answer["faces"][0]["face_id"] == planted.mislabelled
    assert answer["threshold"] == 0.9 and answer["identities_checked"] == sum(len(f) > 1 for f in planted.faces.values())
    assert done["progress"]["faces_done"] == answer["faces_scanned"] == sum(map(len, planted.faces.values()))
    assert done["duplicates"] is None and done["report"] is None and "params" not in done["progress"]
    # the default threshold, as the request's: the 1:1 threshold in force
    r = client.post(f"/collections/{COLLECTION}/outliers/jobs", json={})
    default = wait_for(client, f"/collections/{COLLECTION}/outliers/jobs/{r.json()['job']['id']}")["outliers"]
    assert default == client.get(f"/collections/{COLLECTION}/outliers").json()
    assert planted.mislabelled in [f["face_id"] for f in default["faces"]]
    assert client.get(f"/jobs/{job['id']}").json()["outliers"] == answer  # the admin's view of every job
    # neither another collection's path nor the duplicates path reads it
    for other in (f"/outliers/jobs/{job['id']}", f"/collections/{COLLECTION}/duplicates/jobs/{job['id']}"):
        r = client.get(other)
        assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found", r.text
    started = [e for e in client.get("/audit", params={"collection": COLLECTION, "limit": 1000}).json()["items"]
               if e["action"] == "job.started" and e["details"].get("job") == job["id"]]
    assert len(started) == 1 and started[0]["details"]["kind"] == "outliers"
    for bad in ({"min_score": -2}, {"limit": 0}, {"threshold": 0.5}):
        r = client.post(f"/collections/{COLLECTION}/outliers/jobs", json=bad)
        assert r.status_code == 422, r.text
    r = client.post("/collections/no-such-collection/outliers/jobs", json={})
    assert r.status_code == 404 and r.json()["error"]["code"] == "collection_not_found", r.text
    kinds = [j["kind"] for j in client.get("/jobs", params={"collection": COLLECTION}).json()["items"]]
    assert kinds.count("outliers") == 2


def test_a_scan_of_a_deleted_collection_is_not_read_through_one_made_anew_under_its_name(planted: Planted):
    """A done duplicates scan names faces by id; once its collection is deleted and another is made under
    the same name (on the embedded backend its face ids start again at 1: the ids name other people), the
    scan is no longer read through that name: 404 ``job_not_found``, never the old answer."""
    client = planted.client
    name = "hyg-again"
    assert client.post("/collections", json={"name": name}).status_code == 201
    agassi = crops("Andre_Agassi")
    for identity, images in (("agassi-a", agassi[:2]), ("agassi-b", agassi[2:4])):
        assert enroll(client, identity, images, collection=name).status_code == 200
    r = client.post(f"/collections/{name}/duplicates/jobs", json={"min_score": 0.3})
    assert r.status_code == 202, r.text
    url = f"/collections/{name}/duplicates/jobs/{r.json()['job']['id']}"
    assert wait_for(client, url)["duplicates"]["pairs"]
    assert client.delete(f"/collections/{name}").status_code == 200
    assert client.post("/collections", json={"name": name}).status_code == 201
    for person in BASE[:3]:
        assert enroll(client, ident(person), crops(person)[:2], collection=name).status_code == 200
    r = client.get(url)
    assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found", r.text
    assert client.post(f"/collections/{name}/duplicates/jobs", json={}).status_code == 202  # a new scan runs
