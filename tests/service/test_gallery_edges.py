"""Edges of what the gallery takes in and searches, on both backends, over HTTP on servers of their own
(fresh galleries: these tests depend on exactly what is enrolled).

* A search that widens to the whole gallery (few identities, many faces each) must answer, never 500.
* Client vectors with huge (1e308) or subnormal values are normalised, never stored as zeros; no
  score is ever NaN/null.
"""

from __future__ import annotations

import uuid
from urllib.parse import quote

import httpx
import numpy as np
import pytest

from harness.server import ServerProcess
from tests.conftest import ENROLLED, b64, backend_env, face_files, metric, unknown_files

MODEL_ID = "sface@2021dec-int8bq"
SERVER_ENV = {"FACE_MAX_FACES_PER_REQUEST": "1000", "FACE_MAX_FACES_PER_IDENTITY": "1000",
              "FACE_MAX_REQUEST_BYTES": str(16 * 1024 * 1024)}


@pytest.fixture(scope="module", params=["embedded", "postgres"])
def client(request, tmp_path_factory, default_model):
    """A server with an empty gallery of its own, on each backend."""
    env = backend_env(request, SERVER_ENV)
    server = ServerProcess(tmp_path_factory.mktemp(f"edges-{request.param}") / "data", model=default_model, env=env)
    server.wait_ready()
    with httpx.Client(base_url=server.url, timeout=60) as c:
        c.backend = request.param  # type: ignore[attr-defined]
        yield c
    server.stop()


def embed(client, paths) -> np.ndarray:
    r = client.post("/embed", json={"images": [b64(p) for p in paths]})
    assert r.status_code == 200, r.text
    return np.array(r.json()["embeddings"], dtype=np.float64)


def enroll_vectors(client, identity: str, vectors: np.ndarray) -> httpx.Response:
    return client.post("/enroll", json={"identity_id": identity, "embeddings": vectors.tolist(), "model_id": MODEL_ID})


def crowd(rng, centre: np.ndarray, n: int) -> np.ndarray:
    """n faces of one person: a real SFace embedding plus N(0, 0.05) noise (the issue's gallery)."""
    return centre + rng.normal(0.0, 0.05, size=(n, len(centre)))


def test_a_search_over_the_whole_gallery_answers(client):
    """4 people with 300 faces each: a stranger's probe at top_k 5 widens until it asks for every face,
    and hnswlib's graph walk does not reach them all (HTTP 500 before; 20 of 20 probes here, 0 of 20
    with 200 faces each). Every probe gets the 4 people, scored exactly."""
    rng = np.random.default_rng(19)
    people = ENROLLED[:4]
    centres = embed(client, [face_files(name)[0] for name in people])
    per_person, prefix = 300, f"crowd-{uuid.uuid4().hex[:6]}-"
    faces = {}

    def enroll_in_small_requests(name: str) -> None:
        # 8 faces per request: hnswlib inserts up to 4 per thread in one thread, so the graph (and whether
        # the walk misses faces) is the same on every run; a bigger batch is inserted by racing threads
        for start in range(0, per_person, 8):
            assert enroll_vectors(client, prefix + name, faces[name][start:start + 8]).status_code == 200

    for name, centre in zip(people, centres):
        faces[name] = crowd(rng, centre, per_person)
        enroll_in_small_requests(name)

    try:
        probe_the_crowd(client, rng, prefix, faces)
    finally:
        for name in people:
            client.delete(f"/identities/{prefix}{name}")


def probe_the_crowd(client, rng, prefix: str, faces: dict[str, np.ndarray]) -> None:
    strangers = embed(client, unknown_files())
    probes = np.concatenate([strangers, rng.normal(size=(20 - len(strangers), strangers.shape[1]))])
    fallbacks_before = metric(client, 'face_index_search_fallbacks_total{kind="exact"}')
    for probe in probes:  # one probe per request, as the clients sent them
        r = client.post("/identify", json={"embeddings": [probe.tolist()], "model_id": MODEL_ID, "top_k": 5})
        assert r.status_code == 200, r.text
        candidates = r.json()["results"][0]["candidates"]
        assert sorted(c["identity_id"] for c in candidates) == sorted(prefix + name for name in faces)
        unit = probe / np.linalg.norm(probe)
        for c in candidates:  # max-over-faces, exactly
            mine = faces[c["identity_id"].removeprefix(prefix)]
            best = float((mine / np.linalg.norm(mine, axis=1, keepdims=True) @ unit).max())
            assert c["score"] == pytest.approx(best, abs=1e-4)
    if client.backend == "embedded":  # the index said how it answered (postgres never needs to fall back)
        assert metric(client, 'face_index_search_fallbacks_total{kind="exact"}') > fallbacks_before
    # no snapshot writer was stuck (a series both backends show: 0 on postgres, which forks none)
    assert metric(client, "face_index_snapshot_writers_killed_total") == 0
    # and the keep-alive connection survived: the same client goes on
    assert client.get("/healthz").status_code == 200


def scores_are_numbers(body: dict) -> None:
    """Every score and stranger probability of an /identify answer is a finite number (never null/NaN)."""
    for result in body["results"]:
        assert result["score"] is not None and np.isfinite(result["score"])
        for c in result["candidates"]:
            assert np.isfinite(c["score"]) and np.isfinite(c["stranger_probability"]), c


def test_huge_and_tiny_values_keep_their_direction(client):
    """1e308 values overflowed the norm to inf and were stored as zeros (embedded: scores 0.0; postgres:
    NaN scores, null in the answer). Scaled first, any finite vector keeps its direction on enroll,
    identify and verify; subnormal ones are under the documented norm floor: invalid_embedding."""
    direction = np.array([1.0, -1.0] * 64)
    biggest = float(np.finfo(np.float64).max)
    identity = f"huge-{uuid.uuid4().hex[:6]}"
    mixed = [biggest, -1e308] + [v * 1e308 for v in direction[2:-1]] + [-5e-324]  # the last rounds to 0
    r = enroll_vectors(client, identity, np.array([[1e308] * 128, mixed]))
    assert r.status_code == 200, r.text
    stored = client.get(f"/identities/{identity}").json()
    assert stored["face_count"] == 2

    def unit_of(v) -> np.ndarray:  # the reference direction, in float64 with the scale taken out by hand
        v = np.asarray(v, dtype=np.float64) / np.max(np.abs(v))
        return v / np.linalg.norm(v)

    faces = np.stack([unit_of([1e308] * 128), unit_of(mixed)])
    probes = [[1e308] * 128, (direction * 1e-3).tolist(), [-biggest] * 128, mixed]
    r = client.post("/identify", json={"embeddings": probes, "model_id": MODEL_ID, "top_k": 5, "threshold": 0.5})
    assert r.status_code == 200, r.text
    body = r.json()
    scores_are_numbers(body)
    for result, probe in zip(body["results"], probes):
        best = float((faces @ unit_of(probe)).max())
        [mine] = [c for c in result["candidates"] if c["identity_id"] == identity]
        assert mine["score"] == pytest.approx(best, abs=1e-5)
    # the same direction as the stored faces: found (before: scored 0.0 against zeros, or null on postgres)
    assert [r["identity_id"] for r in body["results"]][:2] == [identity, identity]
    assert body["results"][3]["identity_id"] == identity

    r = client.post("/verify", json={"embedding_a": [1e308] * 128, "identity_id": identity, "model_id": MODEL_ID})
    assert r.status_code == 200 and r.json()["similarity"] == pytest.approx(1.0, abs=1e-5), r.text
    r = client.post("/verify", json={"embedding_a": [1e308] * 128, "embedding_b": [-1e308] * 128, "model_id": MODEL_ID})
    assert r.status_code == 200 and r.json()["similarity"] == pytest.approx(-1.0, abs=1e-5), r.text

    # subnormal (and any vector with a norm under 1e-6): refused, nothing stored, the request tells which
    for bad in ([5e-324] * 128, [0.0] * 127 + [1e-310]):
        r = enroll_vectors(client, identity, np.array([[1.0] * 128, bad]))
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_embedding", r.text
        assert r.json()["error"]["details"]["index"] == 1
    assert client.get(f"/identities/{identity}").json()["face_count"] == 2
    assert client.delete(f"/identities/{identity}").status_code == 200


def test_identity_ids_are_nfc_and_never_invisible(client):
    """NFC and NFD 'José' are one identity; ids with format characters (RLO, zero-width, BOM), controls
    or nothing visible are refused with invalid_identity_id and store nothing; lookups by either form."""
    vector = embed(client, face_files(ENROLLED[5])[:1])
    tag = uuid.uuid4().hex[:6]
    nfc, nfd = f"Jos\u00e9-{tag}", f"Jose\u0301-{tag}"
    first = enroll_vectors(client, nfc, vector)
    second = enroll_vectors(client, nfd, vector)
    assert first.status_code == second.status_code == 200, second.text
    assert second.json()["identity_id"] == nfc and second.json()["created"] is False
    assert second.json()["face_count"] == 2
    for form in (nfc, nfd):
        r = client.get(f"/identities/{form}")
        assert r.status_code == 200 and r.json()["identity_id"] == nfc, r.text
        r = client.post("/verify", json={"embedding_a": vector[0].tolist(), "identity_id": form, "model_id": MODEL_ID})
        assert r.status_code == 200 and r.json()["match"] is True, r.text
    listed = [i["identity_id"] for i in client.get("/identities", params={"limit": 1000}).json()["items"]]
    assert listed.count(nfc) == 1 and nfd not in listed

    bad = {"rlo": f"evil\u202egpj.exe-{tag}", "zero-width space": f"a\u200bb-{tag}", "zwnj": f"x\u200c{tag}",
           "zwj": f"\u200d{tag}", "word joiner": f"{tag}\u2060", "bom": f"\ufeff{tag}", "soft hyphen": f"a\u00ad{tag}",
           "c1 control": f"a\u0085{tag}", "only spaces": "   ", "ideographic space": "\u3000", "tab": " \t ",
           "filler": "\u3164", "line separator": f"a\u2028{tag}", "invisible only": "\u200b\u200b", "nul": f"a\x00{tag}"}
    before = client.get("/identities", params={"limit": 1000}).json()
    for why, identity in bad.items():
        r = enroll_vectors(client, identity, vector)
        assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_identity_id"), (why, r.text)
        for r in (client.get(f"/identities/{quote(identity, safe='')}"),
                  client.delete(f"/identities/{quote(identity, safe='')}"),
                  client.post("/verify", json={"embedding_a": vector[0].tolist(), "identity_id": identity,
                                               "model_id": MODEL_ID})):
            assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_identity_id"), (why, r.text)
    assert client.get("/identities", params={"limit": 1000}).json() == before
    assert client.delete(f"/identities/{nfd}").json() == {"identity_id": nfc, "deleted_faces": 2}


@pytest.mark.parametrize("backend", ["embedded", "postgres"])
def test_ids_stored_before_the_rule_can_still_be_read_and_deleted(backend, request, tmp_path, default_model):
    """A gallery from before the NFC rule may hold an NFD id, or one with a format character: each is
    still found (as given, or by its NFC form), verified against and deleted, never refused."""
    from service.config import Settings
    from service.gallery.open import make_gallery
    from service.model.contract import read_contract

    env = {}
    if backend == "postgres":
        env = request.getfixturevalue("postgres").gallery_env()
        settings = Settings(database_url=env["FACE_DATABASE_URL"], database_schema=env["FACE_DATABASE_SCHEMA"])
    else:
        settings = Settings(data_dir=tmp_path / "data")
    contract = read_contract(default_model)
    vector = np.ones((1, contract.embedding_size), np.float32) / np.sqrt(contract.embedding_size)
    old = make_gallery(settings, contract.model_id, contract.embedding_size)
    old.open()
    nfd, hidden = "Jose\u0301", "evil\u202egpj"
    for identity in (nfd, hidden):  # what older versions stored as given
        old.collection("default").enroll(identity, vector)
    old.close()

    server = ServerProcess(tmp_path / "data", model=default_model, env=env)
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=60) as c:
            for identity in (nfd, "Jos\u00e9", hidden):  # "José" in NFC finds the NFD one
                r = c.get(f"/identities/{quote(identity, safe='')}")
                assert r.status_code == 200 and r.json()["identity_id"] in (nfd, hidden), r.text
            r = c.post("/verify", json={"embedding_a": vector[0].tolist(), "identity_id": "Jos\u00e9",
                                        "model_id": MODEL_ID})
            assert r.status_code == 200 and r.json()["identity_id"] == nfd and r.json()["match"], r.text
            nfc_path = "/identities/" + quote("Jos\u00e9", safe="")
            assert c.delete(nfc_path).json() == {"identity_id": nfd, "deleted_faces": 1}
            assert c.delete(f"/identities/{quote(hidden, safe='')}").json() == {"identity_id": hidden,
                                                                                "deleted_faces": 1}
            assert c.get("/identities").json()["items"] == []
    finally:
        server.stop()
