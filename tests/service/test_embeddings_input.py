"""Embeddings as input to /verify, /identify and /enroll, over real HTTP with the real model."""

from __future__ import annotations

import json
import uuid

import httpx
import numpy as np
import pytest

from tests.conftest import b64, face_files

MODEL_ID = "sface@2021dec-int8bq"


def embed(client, paths) -> list[list[float]]:
    r = client.post("/embed", json={"images": [b64(p) for p in paths]})
    assert r.status_code == 200, r.text
    assert r.json()["model_id"] == MODEL_ID
    return r.json()["embeddings"]


def error(r: httpx.Response) -> tuple[int, str]:
    return r.status_code, r.json()["error"]["code"]


@pytest.fixture(scope="module")
def enrolled(client):
    """Three people enrolled from images, under a prefix of this module's own; erased afterwards, as
    the server's gallery is shared with other modules that enroll the same fixture people."""
    prefix = f"emb-{uuid.uuid4().hex[:6]}-"
    names = ("Colin_Powell", "Tony_Blair", "Hugo_Chavez")
    for name in names:
        r = client.post("/enroll", json={"identity_id": prefix + name, "images": [b64(p) for p in face_files(name)[:2]]})
        assert r.status_code == 200, r.text
    yield prefix
    for name in names:
        assert client.delete(f"/identities/{prefix}{name}").status_code == 200


def test_embedding_from_embed_identifies_like_the_image(client, enrolled):
    names = ("Colin_Powell", "Tony_Blair", "Hugo_Chavez")
    probes = [face_files(name)[2] for name in names]
    # among this module's own three: the shared server's gallery holds the same people (and their faces
    # under other ids) from other modules, in whatever order the test processes ran them
    among = [enrolled + name for name in names]
    by_image = client.post("/identify", json={"images": [b64(p) for p in probes], "top_k": 3, "among": among}).json()
    vectors = embed(client, probes)
    r = client.post("/identify", json={"embeddings": vectors, "model_id": MODEL_ID, "top_k": 3, "among": among})
    assert r.status_code == 200, r.text
    by_vector = r.json()
    for name, a, b in zip(names, by_image["results"], by_vector["results"]):
        assert b["identity_id"] == a["identity_id"] == enrolled + name
        assert b["score"] == pytest.approx(a["score"], abs=1e-5)
        assert [c["identity_id"] for c in b["candidates"]] == [c["identity_id"] for c in a["candidates"]]
        assert b["face"] is None
    assert [r["image_index"] for r in by_vector["results"]] == [0, 1, 2]
    # any scale: the service normalises; the same answer for a vector times 7.5
    scaled = (np.array(vectors[0]) * 7.5).tolist()
    r = client.post("/identify", json={"embeddings": [scaled], "model_id": MODEL_ID, "among": among}).json()
    assert r["results"][0]["identity_id"] == by_image["results"][0]["identity_id"]
    assert r["results"][0]["score"] == pytest.approx(by_image["results"][0]["score"], abs=1e-5)


def test_embeddings_in_a_multipart_form(client, enrolled):
    vector = embed(client, face_files("Tony_Blair")[2:3])
    # form fields without files (httpx sends multipart when given files=)
    r = client.post("/identify", files={"embeddings": (None, json.dumps(vector)), "model_id": (None, MODEL_ID)})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["identity_id"].endswith("Tony_Blair")


def test_enroll_by_embeddings_then_identify_by_image(client):
    identity = f"vec-{uuid.uuid4().hex[:6]}-Jean_Chretien"
    vectors = embed(client, face_files("Jean_Chretien")[:2])
    r = client.post("/enroll", json={"identity_id": identity, "embeddings": vectors, "model_id": MODEL_ID,
                                     "metadata": {"source": "edge"}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["created"] is True and body["face_count"] == 2 and body["faces"] is None
    r = client.post("/identify", json={"images": [b64(face_files("Jean_Chretien")[2])], "top_k": 20}).json()
    result = r["results"][0]
    assert result["known"] and result["identity_id"].endswith("Jean_Chretien")
    # the identity enrolled by vectors is found by the image, as high as any (others may hold the same faces)
    ours = [c for c in result["candidates"] if c["identity_id"] == identity]
    assert ours and ours[0]["score"] == pytest.approx(result["score"], abs=1e-5)
    # stored normalised: the vector enrolled times 100 scores the same as the original against it
    big = (np.array(vectors[0]) * 100).tolist()
    r = client.post("/verify", json={"embedding_a": big, "identity_id": identity, "model_id": MODEL_ID}).json()
    assert r["similarity"] == pytest.approx(1.0, abs=1e-5) and r["match"] is True
    assert client.delete(f"/identities/{identity}").status_code == 200


def test_verify_by_embeddings_matches_verify_by_images(client, enrolled):
    a, b = face_files("Ariel_Sharon")[:2]
    other = face_files("George_W_Bush")[0]
    va, vb, vo = embed(client, [a, b, other])
    for left, right, vleft, vright in ((a, b, va, vb), (a, other, va, vo)):
        by_image = client.post("/verify", json={"image_a": b64(left), "image_b": b64(right)}).json()
        r = client.post("/verify", json={"embedding_a": vleft, "embedding_b": vright, "model_id": MODEL_ID})
        assert r.status_code == 200, r.text
        by_vector = r.json()
        assert by_vector["similarity"] == pytest.approx(by_image["similarity"], abs=1e-5)
        assert by_vector["match"] == by_image["match"] and by_vector["threshold"] == by_image["threshold"]
        assert by_vector["face_a"] is None and by_vector["model_id"] == MODEL_ID
    target = enrolled + "Colin_Powell"
    probe = embed(client, face_files("Colin_Powell")[2:3])[0]
    r = client.post("/verify", json={"embedding_a": probe, "identity_id": target, "model_id": MODEL_ID}).json()
    image = client.post("/verify", json={"image_a": b64(face_files("Colin_Powell")[2]), "identity_id": target}).json()
    assert r["match"] is True and r["similarity"] == pytest.approx(image["similarity"], abs=1e-5)


def _raw(client, path: str, text: str) -> httpx.Response:
    """JSON text sent as is (NaN and 1e400 are what a sloppy client's serializer may emit)."""
    return client.post(path, content=text.encode(), headers={"content-type": "application/json"})


def test_refusals_have_codes_and_store_nothing(client):
    good = embed(client, face_files("Donald_Rumsfeld")[:1])[0]
    identity = f"refused-{uuid.uuid4().hex[:6]}"
    enroll = {"identity_id": identity, "model_id": MODEL_ID}
    cases = {
        "no model_id": ({"identity_id": identity, "embeddings": [good]}, (422, "model_mismatch")),
        "other model": ({**enroll, "model_id": "arcface@1", "embeddings": [good]}, (422, "model_mismatch")),
        "short": ({**enroll, "embeddings": [good[:64]]}, (422, "wrong_dimension")),
        "long": ({**enroll, "embeddings": [good, good + [0.0]]}, (422, "wrong_dimension")),
        "zero": ({**enroll, "embeddings": [[0.0] * 128]}, (422, "invalid_embedding")),
        "near zero": ({**enroll, "embeddings": [[1e-12] * 128]}, (422, "invalid_embedding")),
        "both": ({**enroll, "embeddings": [good], "images": [b64(face_files("Donald_Rumsfeld")[0])]},
                 (422, "invalid_request")),
        "neither": ({**enroll}, (422, "invalid_request")),
        "empty list": ({**enroll, "embeddings": []}, (422, "invalid_request")),
        "too many": ({**enroll, "embeddings": [good] * 17}, (413, "too_many_faces")),  # the fixture's limit: 16
    }
    for name, (body, expected) in cases.items():
        assert error(client.post("/enroll", json=body)) == expected, name
    # NaN and Infinity are not JSON: refused by the parser; 1e400 is JSON, overflows to inf, and the vector
    # check refuses it
    for name, bad, expected in (("NaN", "NaN", (400, "malformed_json")), ("-inf", "-Infinity", (400, "malformed_json")),
                                ("inf", "1e400", (422, "invalid_embedding"))):
        values = [json.dumps(v) for v in good]
        values[3] = bad
        text = "[" + ", ".join(values) + "]"
        r = _raw(client, "/enroll", f'{{"identity_id": "{identity}", "model_id": "{MODEL_ID}", "embeddings": [{text}]}}')
        assert error(r) == expected, name
        if expected[1] == "invalid_embedding":
            assert r.json()["error"]["details"]["index"] == 0
    # nothing of it was stored
    assert error(client.get(f"/identities/{identity}")) == (404, "identity_not_found")
    # the huge but finite is fine: only the direction counts
    r = client.post("/identify", json={"embeddings": [[v * 1e300 for v in good]], "model_id": MODEL_ID})
    assert r.status_code == 200, r.text


def test_verify_and_identify_refusals(client):
    good = embed(client, face_files("Donald_Rumsfeld")[:1])[0]
    image = b64(face_files("Donald_Rumsfeld")[0])
    verify_cases = {
        "image and embedding mixed": ({"image_a": image, "embedding_b": good, "model_id": MODEL_ID}, "invalid_request"),
        "embedding_b without a": ({"embedding_b": good, "image_b": image, "model_id": MODEL_ID}, "invalid_request"),
        "only embedding_a": ({"embedding_a": good, "model_id": MODEL_ID}, "invalid_request"),
        "b and identity": ({"embedding_a": good, "embedding_b": good, "identity_id": "x", "model_id": MODEL_ID},
                           "invalid_request"),
        "no model": ({"embedding_a": good, "embedding_b": good}, "model_mismatch"),
        "dimension": ({"embedding_a": good, "embedding_b": good[1:], "model_id": MODEL_ID}, "wrong_dimension"),
        "zero": ({"embedding_a": [0.0] * 128, "embedding_b": good, "model_id": MODEL_ID}, "invalid_embedding"),
        "images with another model id": ({"image_a": image, "image_b": image, "model_id": "other@1"}, "model_mismatch"),
    }
    for name, (body, code) in verify_cases.items():
        assert error(client.post("/verify", json=body)) == (422, code), name
    r = client.post("/verify", json={"embedding_a": good, "embedding_b": [0.0] * 127 + [1e-3], "model_id": MODEL_ID})
    assert r.status_code == 200  # tiny but above the floor: a direction
    assert error(client.post("/identify", json={"embeddings": [good], "model_id": MODEL_ID + "x"})) == (422, "model_mismatch")
    assert error(client.post("/identify", json={"embeddings": [good, good[:10]], "model_id": MODEL_ID})) == (
        422, "wrong_dimension")
    r = client.post("/identify", json={"embeddings": [good, good[:10]], "model_id": MODEL_ID})
    assert r.json()["error"]["details"] == {"index": 1, "expected": 128, "given": 10}
    assert error(client.post("/identify", json={"embeddings": [good], "images": [image], "model_id": MODEL_ID})) == (
        422, "invalid_request")
    assert client.get("/readyz").status_code == 200
