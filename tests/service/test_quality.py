"""Face quality over HTTP (issue 21): every face carries its quality; /enroll refuses faces below the
limits (422 low_quality) before anything is stored, on both gallery backends; /identify's min_quality.

The degraded faces are made here from the committed LFW photos (tests/fixtures/photos), never committed."""

from __future__ import annotations

import dataclasses
import io
import uuid

import cv2
import httpx
import numpy as np
import pytest
from PIL import Image

from harness.server import ServerProcess
from service.faces.quality import PARTS, PHOTO_ONLY
from tests.conftest import FIXTURES, b64, face_files

PHOTOS = FIXTURES / "photos"
SHARP = PHOTOS / "Keanu_Reeves_0001.jpg"
SIDEWAYS = PHOTOS / "Chris_Byrd_0002.jpg"  # a real near-profile LFW photo


def rgb(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def png(array: np.ndarray) -> str:
    out = io.BytesIO()
    Image.fromarray(array).save(out, "PNG")
    return b64(out.getvalue())


def blurred_array() -> np.ndarray:
    return cv2.GaussianBlur(rgb(SHARP), (0, 0), 6)


def blurred() -> str:
    return png(blurred_array())


def tiny() -> str:
    """The photo shrunk to a fifth (eyes ~9 px apart) on a gray canvas of the original size."""
    small = cv2.resize(rgb(SHARP), (50, 50), interpolation=cv2.INTER_AREA)
    canvas = np.full((250, 250, 3), 120, np.uint8)
    canvas[100:150, 100:150] = small
    return png(canvas)


def dark() -> str:
    return png((rgb(SHARP).astype(np.float32) * 0.12).round().astype(np.uint8))


def compressed() -> str:
    """The photo saved as a JPEG of quality 3 (the strongest level of bench/quality.py's degradations)."""
    out = io.BytesIO()
    Image.fromarray(rgb(SHARP)).save(out, "JPEG", quality=3)
    return b64(out.getvalue())


BAD = {"blurred": (blurred, "sharpness"), "tiny": (tiny, "size"), "dark": (dark, "exposure"),
       "sideways": (lambda: b64(SIDEWAYS), "yaw"), "compressed": (compressed, "blockiness")}


@pytest.fixture(scope="module", params=["embedded", "postgres"])
def client(request):
    server = request.getfixturevalue("server" if request.param == "embedded" else "postgres_server")
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def enroll(client, identity: str, images: list[str], **options) -> httpx.Response:
    return client.post("/enroll", json={"identity_id": identity, "images": images, "image_type": "photo", **options})


def test_a_sharp_frontal_face_passes_and_carries_every_part(client):
    body = client.post("/embed", json={"images": [b64(SHARP)], "image_type": "photo"}).json()
    quality = body["quality"][0]
    assert quality["fitted"] and quality["passed"] and quality["failed"] == []
    assert 0.0 <= quality["min_score"] <= quality["score"] <= 1.0
    assert set(quality["parts"]) == set(PARTS)
    for name, part in quality["parts"].items():
        assert part["value"] is not None and part["passed"], (name, part)
    assert quality["parts"]["size"]["value"] > 30 and abs(quality["parts"]["yaw"]["value"]) < 20
    # /detect gives every face the same quality; an aligned crop has the crop parts only, with a reason
    detected = client.post("/detect", json={"images": [b64(SHARP)]}).json()["images"][0]["faces"][0]
    assert detected["quality"]["score"] == pytest.approx(quality["score"], abs=1e-3)
    crop = client.post("/embed", json={"images": [b64(face_files("George_W_Bush")[0])]}).json()["quality"][0]
    assert crop["passed"] and crop["score"] is not None
    for name in PHOTO_ONLY:
        assert crop["parts"][name]["value"] is None and "aligned crop" in crop["parts"][name]["reason"]
    assert crop["parts"]["sharpness"]["value"] > 0


@pytest.mark.parametrize("kind", sorted(BAD))
def test_a_bad_face_is_refused_at_enrollment_with_its_reason_and_nothing_is_stored(client, kind):
    make, part = BAD[kind]
    identity = f"{kind}-{uuid.uuid4().hex[:6]}"
    r = enroll(client, identity, [make()])
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "low_quality" and error["details"]["index"] == 0
    reasons = {reason["part"]: reason for reason in error["details"]["reasons"]}
    assert part in reasons, reasons
    assert reasons[part]["by"] > 0
    assert client.get(f"/identities/{identity}").status_code == 404
    # its quality says the same where it is only measured
    quality = client.post("/embed", json={"images": [make()], "image_type": "photo"}).json()["quality"][0]
    assert not quality["passed"] and part in {f["part"] for f in quality["failed"]}
    assert quality["parts"][part]["passed"] is False
    # an admin may store it anyway
    r = enroll(client, identity, [make()], force_quality=True)
    assert r.status_code == 200, r.text
    assert r.json()["quality"][0]["passed"] is False  # stored by force; its quality still says what it misses
    assert client.delete(f"/identities/{identity}").status_code == 200


def test_blockiness_is_measured_on_an_aligned_crop_itself(client):
    """An aligned crop sent as a heavily compressed JPEG keeps its 8x8 grid: refused for blockiness; the
    same crop as PNG is not."""
    crop = rgb(face_files("George_W_Bush")[0])
    out = io.BytesIO()
    Image.fromarray(crop).save(out, "JPEG", quality=3)
    identity = f"crop-{uuid.uuid4().hex[:6]}"
    r = client.post("/enroll", json={"identity_id": identity, "images": [b64(out.getvalue())]})
    assert r.status_code == 422, r.text
    assert "blockiness" in {reason["part"] for reason in r.json()["error"]["details"]["reasons"]}
    assert client.get(f"/identities/{identity}").status_code == 404
    quality = client.post("/embed", json={"images": [png(crop)]}).json()["quality"][0]
    assert quality["parts"]["blockiness"]["passed"] and quality["parts"]["blockiness"]["value"] < 2


def test_one_bad_face_refuses_a_multi_image_enroll(client):
    identity = f"multi-{uuid.uuid4().hex[:6]}"
    r = enroll(client, identity, [b64(SHARP), b64(PHOTOS / "Bill_Frist_0001.jpg"), blurred()])
    assert r.status_code == 422, r.text
    assert r.json()["error"]["details"]["index"] == 2
    assert client.get(f"/identities/{identity}").status_code == 404
    r = enroll(client, identity, [b64(SHARP), b64(PHOTOS / "Keanu_Reeves_0001.jpg")])
    assert r.status_code == 200, r.text
    assert [q["passed"] for q in r.json()["quality"]] == [True, True]
    assert client.delete(f"/identities/{identity}").status_code == 200


def test_min_quality_raises_the_limit_and_force_quality_lowers_it(client):
    identity = f"limit-{uuid.uuid4().hex[:6]}"
    r = enroll(client, identity, [b64(SHARP)], min_quality=0.9999)
    assert r.status_code == 422, r.text
    reasons = r.json()["error"]["details"]["reasons"]
    assert [x["part"] for x in reasons] == ["score"] and reasons[0]["limit"] == 0.9999
    # a lower min_quality than the default does not lower it without force_quality
    assert enroll(client, identity, [blurred()], min_quality=0.0).status_code == 422
    r = enroll(client, identity, [blurred()], min_quality=0.0, force_quality=True)
    assert r.status_code == 200, r.text
    assert client.delete(f"/identities/{identity}").status_code == 200


def test_identify_refuses_low_quality_probes_instead_of_guessing(client):
    identity = f"probe-{uuid.uuid4().hex[:6]}"
    assert enroll(client, identity, [b64(SHARP)]).status_code == 200
    r = client.post("/identify", json={"images": [b64(SHARP), blurred()], "image_type": "photo",
                                       "min_quality": 0.5})
    assert r.status_code == 200, r.text
    good, bad = r.json()["results"]
    assert good["identity_id"] == identity and good["error"] is None and good["quality"]["passed"]
    assert bad["error"]["code"] == "low_quality" and bad["candidates"] == [] and bad["identity_id"] is None
    assert "sharpness" in {x["part"] for x in bad["error"]["details"]["reasons"]}
    # without min_quality the probe is searched and still carries its quality
    r = client.post("/identify", json={"images": [blurred()], "image_type": "photo"}).json()["results"][0]
    assert r["error"] is None and r["candidates"] and r["quality"]["passed"] is False
    assert client.delete(f"/identities/{identity}").status_code == 200


def test_readyz_reports_the_fitted_quality(client):
    quality = client.get("/readyz").json()["quality"]
    assert quality["fitted"] is True and 0 < quality["min_score"] < 1
    assert quality["limits"]["size"]["min"] > 0


@pytest.fixture(scope="module")
def unfitted_server(tmp_path_factory, default_model):
    """A server on a copy of the default model whose contract has no face.quality."""
    from service.model.contract import read_contract
    from service.model.prepare import SFACE_FILE, prepare_model
    from service.packaged import packaged_model

    contract = dataclasses.replace(read_contract(default_model), quality=None)
    model = prepare_model(packaged_model(SFACE_FILE), tmp_path_factory.mktemp("unfitted") / "model.onnx", contract)
    proc = ServerProcess(tmp_path_factory.mktemp("unfitted-data") / "data", model=model)
    proc.wait_ready()
    yield proc
    proc.stop()


def test_a_model_without_fitted_quality_gets_part_limits_only(unfitted_server):
    with httpx.Client(base_url=unfitted_server.url, timeout=60) as c:
        ready = c.get("/readyz").json()["quality"]
        assert ready["fitted"] is False and "no fitted quality" in ready["note"]
        quality = c.post("/embed", json={"images": [b64(SHARP)], "image_type": "photo"}).json()["quality"][0]
        assert quality["score"] is None and quality["fitted"] is False and quality["passed"]
        r = enroll(c, "blurred", [blurred()])
        assert r.status_code == 422 and r.json()["error"]["code"] == "low_quality"
        assert {x["part"] for x in r.json()["error"]["details"]["reasons"]} == {"sharpness"}
        assert enroll(c, "sharp", [b64(SHARP)]).status_code == 200
