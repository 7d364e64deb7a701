"""/identify `among` over HTTP on both backends: only the listed identities are candidates, scored
exactly over all their faces (the same scores as a search of the whole collection), at the open-set
threshold of a gallery of just them; ids not enrolled are named in a 404; `among` is refused with
enrolled probes."""

from __future__ import annotations

import numpy as np
import pytest

from service.gallery.search import score_among
from tests.service.test_hygiene_writes_api import error_code, vectors
from tests.service.test_identity_update_api import enroll, served  # noqa: F401 - the fixture

PEOPLE = ["ann", "bob", "cy", "dee", "eve", "fay", "gus", "hal"]


def near(row: list[float], seed: int, noise: float = 0.35) -> list[float]:
    v = np.asarray(row) + noise * np.random.default_rng(seed).normal(size=len(row)) / np.sqrt(len(row))
    return (v / np.linalg.norm(v)).tolist()


def test_identify_among_a_list_of_identities(served):  # noqa: F811 - the fixture
    assert served.post("/collections", json={"name": "doors"}).status_code == 201
    rows = {name: vectors(2, 900 + n) for n, name in enumerate(PEOPLE)}
    for name, faces in rows.items():
        enroll(served, "/collections/doors", name, faces)
    probe = near(rows["ann"][1], 1)
    ask = {"embeddings": [probe], "model_id": served.model_id, "top_k": 8}
    whole = served.post("/collections/doors/identify", json=ask).json()
    listed = served.post("/collections/doors/identify", json=ask | {"among": ["bob", "ann", "ann"]}).json()
    assert listed["results"][0]["identity_id"] == "ann" and listed["results"][0]["known"]
    assert [c["identity_id"] for c in listed["results"][0]["candidates"]] == ["ann", "bob"]
    # exact: the same best score and face as the whole collection's search gives each of them
    by_id = {c["identity_id"]: c for c in whole["results"][0]["candidates"]}
    for c in listed["results"][0]["candidates"]:
        assert (c["score"], c["face_id"]) == (pytest.approx(by_id[c["identity_id"]]["score"], abs=1e-5),
                                              by_id[c["identity_id"]]["face_id"])
    # the threshold of a gallery of 2 identities, 4 faces: never above the whole collection's
    assert (listed["gallery_identities"], listed["gallery_faces"]) == (2, 4)
    assert listed["threshold"] <= whole["threshold"] and listed["threshold_source"] == whole["threshold_source"]
    # not on the list: not a candidate, so unknown
    others = served.post("/collections/doors/identify", json=ask | {"among": ["cy", "dee"]}).json()["results"][0]
    assert others["identity_id"] is None and {c["identity_id"] for c in others["candidates"]} == {"cy", "dee"}
    r = served.post("/collections/doors/identify", json=ask | {"among": ["ann", "nobody", "no-one"]})
    assert (r.status_code, error_code(r)) == (404, "identity_not_found")
    assert r.json()["error"]["details"]["identity_ids"] == ["nobody", "no-one"]
    r = served.post("/collections/doors/identify", json={"identity_id": "ann", "among": ["bob"]})
    assert (r.status_code, error_code(r)) == (422, "invalid_request")
    r = served.post("/collections/doors/identify", json=ask | {"among": []})
    assert (r.status_code, error_code(r)) == (422, "invalid_request")
    r = served.post("/collections/doors/identify", json=ask | {"among": ["a\u0000b"]})
    assert r.status_code == 422 and error_code(r) in ("invalid_identity_id", "invalid_request")
    # another collection's identity is not in this one
    enroll(served, "", "ivy", vectors(1, 950))
    r = served.post("/collections/doors/identify", json=ask | {"among": ["ivy"]})
    assert (r.status_code, error_code(r)) == (404, "identity_not_found")


def test_score_among_is_the_exact_max_over_faces():
    rng = np.random.default_rng(5)
    faces = {}
    next_id = 1
    for n in range(30):
        k = int(rng.integers(1, 5))
        v = rng.normal(size=(k, 16)).astype(np.float32)
        faces[f"p{n}"] = (list(range(next_id, next_id + k)), v / np.linalg.norm(v, axis=1, keepdims=True))
        next_id += k
    probes = rng.normal(size=(7, 16)).astype(np.float32)
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)
    found = score_among(probes, faces, 5)
    for probe, matches in zip(probes, found):
        expected = sorted(((float((vecs @ probe).max()), name, ids[int((vecs @ probe).argmax())])
                           for name, (ids, vecs) in faces.items()), reverse=True)[:5]
        assert [(m.identity_id, m.face_id) for m in matches] == [(name, face) for _, name, face in expected]
        assert [m.score for m in matches] == pytest.approx([s for s, _, _ in expected], abs=1e-6)
    assert score_among(probes, {}, 5) == [[] for _ in range(7)]
