"""Gallery poisoning over real HTTP, on both backends: an identity's faces are capped (413), one
identity stuffed with near-duplicates does not raise the open-set threshold for everyone, and a
crafted "hub" face (a mean of many enrolled faces) is refused at enrollment (422).

Vectors go in through /enroll's ``embeddings`` (the real route, the real gallery): random unit
vectors of the model's dimension stand for faces of different people where only counts matter; the
hub test uses LFW faces embedded by the server. bench/poisoning.py runs the same attacks at scale
and reports the figures.
"""

from __future__ import annotations

import threading
import uuid

import httpx
import numpy as np
import pytest

from harness.fixtures import b64
from harness.server import REPO, ServerProcess
from service.model.calibration import FACES_COUNTED_PER_IDENTITY, threshold_for_gallery
from service.model.prepare import packaged_impostor_tail
from tests.conftest import backend_env

CAP = 300
LFW = REPO.parent / "shared" / "data" / "lfw-112"
ENV = {"FACE_WARMUP": "false", "FACE_MAX_FACES_PER_REQUEST": "64", "FACE_MAX_FACES_PER_IDENTITY": str(CAP)}


@pytest.fixture(scope="module", params=["embedded", "postgres"])
def server(request, tmp_path_factory, default_model):
    env = backend_env(request, ENV)
    proc = ServerProcess(tmp_path_factory.mktemp("poisoning") / "data", model=default_model, env=env)
    proc.wait_ready()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def model_id(client) -> str:
    return client.get("/readyz").json()["model_id"]


def unit(rng, n: int, dim: int = 128) -> np.ndarray:
    v = rng.normal(size=(n, dim))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def near(rng, centre: np.ndarray, n: int, noise: float = 0.02) -> np.ndarray:
    """n near-duplicates of ``centre`` (the stuffing attack's faces)."""
    v = centre[None, :] + rng.normal(scale=noise, size=(n, len(centre)))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def enroll(client, model_id, identity, vectors, **extra) -> httpx.Response:
    return client.post("/enroll", json={"identity_id": identity, "embeddings": np.asarray(vectors).tolist(),
                                        "model_id": model_id, **extra})


def counts(client) -> tuple[int, int, int]:
    """(identities, faces, counted faces) from the listing: what the threshold must be sized by."""
    faces, cursor = [], None
    while True:
        page = client.get("/identities", params={"limit": 1000} | ({"cursor": cursor} if cursor else {})).json()
        faces += [item["face_count"] for item in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            return len(faces), sum(faces), sum(min(f, FACES_COUNTED_PER_IDENTITY) for f in faces)


def test_faces_per_identity_are_capped_with_413(client, model_id):
    rng, who = np.random.default_rng(1), "cap-" + uuid.uuid4().hex[:8]
    centre = unit(rng, 1)[0]
    for _ in range(4):
        assert enroll(client, model_id, who, near(rng, centre, 64)).status_code == 200
    assert enroll(client, model_id, who, near(rng, centre, CAP - 256 - 10)).status_code == 200  # 10 short
    r = enroll(client, model_id, who, near(rng, centre, 11), metadata={"lost": True})
    assert r.status_code == 413, r.text
    error = r.json()["error"]
    assert error["code"] == "too_many_faces_for_identity"
    assert error["details"] == {"identity_id": who, "faces": CAP - 10, "adding": 11, "limit": CAP}
    stored = client.get(f"/identities/{who}").json()
    assert stored["face_count"] == CAP - 10 and stored["metadata"] == {}  # nothing of it was stored

    # 16 concurrent appends of one face each: exactly the 10 that fit are stored
    start, codes = threading.Barrier(16), []
    faces = near(rng, centre, 16)

    def append(i):
        with httpx.Client(base_url=str(client.base_url), timeout=120) as own:
            start.wait()
            codes.append(enroll(own, model_id, who, faces[i:i + 1]).status_code)

    threads = [threading.Thread(target=append, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(codes) == [200] * 10 + [413] * 6
    assert client.get(f"/identities/{who}").json()["face_count"] == CAP


def test_a_stuffed_identity_does_not_raise_the_threshold(client, model_id):
    """Before: every face counted toward n_eff, so 256 near-duplicates of one identity raised the
    threshold for every /identify as if 256 more people had been enrolled."""
    rng, tag = np.random.default_rng(2), uuid.uuid4().hex[:8]
    for i in range(30):
        assert enroll(client, model_id, f"p{i}-{tag}", unit(rng, 1)).status_code == 200
    before = client.get("/readyz").json()["identify_threshold"]
    stuffed = f"stuffed-{tag}"
    centre = unit(rng, 1)[0]
    for _ in range(4):
        assert enroll(client, model_id, stuffed, near(rng, centre, 64)).status_code == 200
    identities, faces, counted = counts(client)
    tail = packaged_impostor_tail()
    every_face = threshold_for_gallery(tail, 0.01, identities, faces).threshold
    expected = threshold_for_gallery(tail, 0.01, identities, counted).threshold
    body = client.post("/identify", json={"embeddings": unit(rng, 1).tolist(), "model_id": model_id}).json()
    assert body["gallery_faces"] == faces and body["threshold_source"] == "fpir"
    assert body["threshold"] == pytest.approx(expected, abs=1e-6)
    assert body["threshold"] - before < 0.01 < every_face - before  # counting every face moved it far more


def lfw_faces(client, people: int) -> np.ndarray:
    """The first crop of the first ``people`` LFW people, embedded by the server (/embed)."""
    folders = sorted(p for p in (LFW / "images").iterdir() if p.is_dir())[:people]
    crops = [sorted(folder.iterdir())[0] for folder in folders]
    vectors = []
    for start in range(0, len(crops), 16):
        r = client.post("/embed", json={"images": [b64(c) for c in crops[start:start + 16]]})
        assert r.status_code == 200, r.text
        vectors += r.json()["embeddings"]
    return np.asarray(vectors)


@pytest.mark.skipif(not (LFW / "images").is_dir(), reason="needs ../shared/data/lfw-112")
def test_a_hub_face_is_refused_and_a_single_likeness_is_not(client, model_id):
    """The mean of 60 enrolled faces, or of 30 of them (a k-means centroid of 2), scores high against
    many of them at once: enrolled, such a face is the closest candidate for a third of all strangers
    (bench/poisoning.py)."""
    tag = uuid.uuid4().hex[:8]
    people = lfw_faces(client, 60)
    for i, v in enumerate(people):
        assert enroll(client, model_id, f"h{i}-{tag}", v[None]).status_code == 200
    for name, hub in (("mean", people.mean(axis=0)), ("centroid", people[:30].mean(axis=0))):
        r = enroll(client, model_id, f"hub-{name}-{tag}", (hub / np.linalg.norm(hub))[None])
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["code"] == "implausible_face"
        details = error["details"]
        assert details["face_index"] == 0 and details["probability"] < 1e-20
        assert len(details["identities"]) >= 2 and all(i.endswith(tag) for i in details["identities"])
        assert client.get(f"/identities/hub-{name}-{tag}").status_code == 404  # nothing stored
    # the same face enrolled under a second name (one high score) is a likeness, not a hub
    assert enroll(client, model_id, f"twin-{tag}", people[:1]).status_code == 200
    # appending to an identity: its own faces are not held against it
    assert enroll(client, model_id, f"h0-{tag}", people[:1]).status_code == 200
