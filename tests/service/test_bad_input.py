"""Bad input: a clear 4xx with a machine-readable code, nothing stored changes, the process lives."""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import b64, face_files

FACE = face_files("Gerhard_Schroeder")[0]


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def rgb() -> Image.Image:
    return Image.open(FACE).convert("RGB")


def transparent_corner(img: Image.Image) -> Image.Image:
    img.putpixel((0, 0), (0, 0, 0, 0))  # an opaque alpha channel is dropped; real transparency is refused
    return img


def bomb_png() -> bytes:
    """A valid PNG header claiming 40000x40000 pixels, a few hundred bytes on disk."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b"")


BAD_IMAGES = {
    "empty_image": b"",
    "not_an_image": b"this is plain text, not a picture",
    "truncated_image": FACE.read_bytes()[: len(FACE.read_bytes()) // 2],
    "wrong_image_size": encode(rgb().resize((160, 160))),
    "alpha_channel": encode(transparent_corner(rgb().convert("RGBA"))),
    "image_too_large": bomb_png(),
}


def error_code(r: httpx.Response) -> str:
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    return r.json()["error"]["code"]


@pytest.mark.parametrize("expected", sorted(BAD_IMAGES))
def test_bad_image_json_and_multipart(client, expected):
    data = BAD_IMAGES[expected]
    r = client.post("/embed", json={"images": [b64(FACE), b64(data)]})
    assert error_code(r) == expected
    err = r.json()["error"]
    assert err["details"]["index"] == 1 and err["message"]
    r = client.post("/embed", files=[("images", ("ok.jpg", FACE.read_bytes())), ("images", ("bad", data))])
    assert error_code(r) == expected


def test_bad_requests_get_codes_and_change_nothing(client):
    identity = "bad-input-victim"
    assert client.post("/enroll", json={"identity_id": identity, "images": [b64(FACE)]}).status_code == 200
    before = client.get(f"/identities/{identity}").json()
    stats_before = client.get("/readyz").json()["gallery"]

    cases = [
        # (request kwargs, expected code, expected status)
        (dict(content=b'{"identity_id": "x", "images": [', headers={"content-type": "application/json"}), "malformed_json", 400),
        (dict(json={"identity_id": identity, "images": ["***not base64***"]}), "invalid_base64", 422),
        (dict(json={"identity_id": identity, "images": [b64(BAD_IMAGES["truncated_image"])]}), "truncated_image", 422),
        (dict(json={"identity_id": identity, "images": [b64(FACE), b64(b"")]}), "empty_image", 422),
        (dict(json={"identity_id": identity, "images": []}), "invalid_request", 422),
        (dict(json={"identity_id": "a/b", "images": [b64(FACE)]}), "invalid_request", 422),
        (dict(json={"identity_id": identity, "images": [b64(FACE)], "surprise": 1}), "invalid_request", 422),
        (dict(json={"identity_id": identity, "images": [b64(FACE)] * 17}), "too_many_faces", 413),
        (dict(json={"identity_id": identity, "images": ["A" * (3 * 1024 * 1024)]}), "payload_too_large", 413),
        (dict(content=b"identity_id=x", headers={"content-type": "text/plain"}), "unsupported_media_type", 415),
        (dict(json=[1, 2, 3]), "invalid_request", 422),
    ]
    for kwargs, code, status in cases:
        r = client.post("/enroll", **kwargs)
        assert (r.status_code, error_code(r)) == (status, code), (code, r.text[:300])

    assert error_code(client.get("/identities/nobody-here")) == "identity_not_found"
    assert error_code(client.delete("/identities/nobody-here")) == "identity_not_found"
    r = client.post("/verify", json={"image_a": b64(FACE), "identity_id": "nobody-here"})
    assert error_code(r) == "identity_not_found"
    assert error_code(client.get("/no-such-route")) == "not_found"
    assert error_code(client.get("/identities", params={"limit": 0})) == "invalid_request"
    assert error_code(client.post("/identify", json={"images": [b64(FACE)], "top_k": 0})) == "invalid_request"

    # text that is not valid Unicode (a lone surrogate, which JSON can spell) or holds a NUL, in a body
    # that FastAPI parses: refused (it was echoed in an error that could not be written, or sent to
    # PostgreSQL, which cannot hold it: 500s)
    for path, body in (("/collections", {"name": "\ud800"}), ("/keys", {"role": "read", "collections": ["\ud800"]}),
                       ("/keys", {"role": "read", "note": "a\x00b"})):
        r = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
        assert (r.status_code, error_code(r)) == (422, "invalid_request"), (path, r.text[:300])
        assert r.json()["error"]["details"]["errors"][0]["field"] == "body"
    assert not any(k["note"] == "a\x00b" for k in client.get("/keys").json()["items"])  # no key was made

    # nothing stored changed and the process still serves
    assert client.get(f"/identities/{identity}").json() == before
    assert client.get("/readyz").json()["gallery"] == stats_before
    assert client.post("/embed", json={"images": [b64(FACE)]}).status_code == 200


def test_one_bad_request_never_fails_its_neighbours(client):
    """Concurrent requests share batches; a bad image fails only its own request."""
    import concurrent.futures as cf

    good = {"images": [b64(FACE)]}
    bad = {"images": [b64(BAD_IMAGES["truncated_image"])]}
    with cf.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(client.post, "/embed", json=bad if i % 4 == 0 else good) for i in range(32)]
        responses = [f.result() for f in futures]
    for i, r in enumerate(responses):
        if i % 4 == 0:
            assert error_code(r) == "truncated_image"
        else:
            assert r.status_code == 200
            assert np.linalg.norm(r.json()["embeddings"][0]) == pytest.approx(1, abs=1e-5)


def test_a_body_of_many_wrong_parts_gets_a_short_answer_and_costs_little(client):
    """A body of 100,000 unknown fields, or a list of 300,000 wrong items, was answered with one error
    each: 18 MB of request gave a 68 MB answer and seconds of the event loop's time (pydantic lists every
    error). Now a body of more than MAX_BODY_FIELDS top-level fields is refused as it is read, lists are
    bounded by their models, and an answer lists at most 20 errors with their total."""
    from service.http.payload import MAX_BODY_FIELDS, MAX_REPORTED_ERRORS

    many_fields = {f"k{i}": i for i in range(100_000)}  # 1.6 MB (this server takes 2 MiB)
    for route, base in (("/collections", {"name": "many-fields"}), ("/embed", {"images": [b64(FACE)]}),
                        ("/enroll", {"identity_id": "many-fields", "images": [b64(FACE)]})):
        r = client.post(route, content=json.dumps({**base, **many_fields}), headers={"content-type": "application/json"})
        assert error_code(r) == "invalid_request" and len(r.content) < 2000, (route, r.status_code, len(r.content))
        assert f"more than {MAX_BODY_FIELDS} fields" in r.json()["error"]["message"]
    r = client.post("/keys", json={"role": "read", "collections": [1] * 300_000})
    assert error_code(r) == "invalid_request" and len(r.content) < 2000, (r.status_code, len(r.content))
    wrong = {f"k{i}": i for i in range(MAX_BODY_FIELDS - 2)}  # within the fields' limit: each one an error
    for route, base in (("/collections", {"name": "few-fields"}), ("/embed", {"images": [b64(FACE)]})):
        r = client.post(route, json={**base, **wrong})
        details = r.json()["error"]["details"]
        assert error_code(r) == "invalid_request" and len(details["errors"]) == MAX_REPORTED_ERRORS, (route, details)
        assert details["errors_total"] == len(wrong), (route, details)
    assert client.get("/collections/many-fields").status_code == 404
    assert client.get("/identities/many-fields").status_code == 404


@pytest.mark.parametrize("fmt", ["TIFF", "GIF", "PCX", "TGA", "SGI", "PPM"])
def test_an_image_in_a_format_not_taken_is_not_parsed(client, fmt):
    """Crops and photos alike: a format outside FACE_IMAGE_FORMATS is ``not_an_image`` (Pillow would read it)."""
    data = encode(rgb(), fmt)
    for image_type in ("aligned", "photo", "auto"):
        r = client.post("/embed", json={"images": [b64(data)], "image_type": image_type})
        assert error_code(r) == "not_an_image", (fmt, image_type)
        assert "(JPEG, PNG, WEBP, BMP:" in r.json()["error"]["message"]


def test_the_formats_taken_are_a_setting(tmp_path, default_model):
    from harness.server import ServerProcess

    proc = ServerProcess(tmp_path / "data", model=default_model, env={"FACE_IMAGE_FORMATS": "jpg"})
    try:
        proc.wait_ready()
        with httpx.Client(base_url=proc.url, timeout=60) as c:
            assert c.post("/embed", json={"images": [b64(FACE)]}).status_code == 200
            r = c.post("/embed", files=[("images", ("face.png", encode(rgb()), "image/png"))])
            assert error_code(r) == "not_an_image" and "(JPEG: FACE_IMAGE_FORMATS)" in r.json()["error"]["message"]
    finally:
        proc.stop()
