"""Photos over HTTP: /detect, and /embed, /enroll, /verify, /identify on unaligned LFW originals,
against a real uvicorn server with the real SFace and YuNet models."""

from __future__ import annotations

import base64
import io
import uuid

import numpy as np
from PIL import Image

from service.faces.detection import align_face
from tests.conftest import FIXTURES, b64, face_files, metric
from tests.detection.helpers import fixture_landmarks, load_rgb
from tests.detection.test_photos import png_declaring

PHOTOS = FIXTURES / "photos"
GROUP = PHOTOS / "Alvaro_Silva_Calderon_0002.jpg"  # four faces


def photo(name: str) -> str:
    return b64(PHOTOS / name)


def jpeg(array: np.ndarray, **save) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, "JPEG", quality=95, **save)
    return out.getvalue()


def blank_photo() -> bytes:
    rng = np.random.default_rng(0)
    return jpeg((rng.random((300, 400, 3)) * 40 + 100).astype(np.uint8))  # gray noise, no face


def embed(client, images: list[str], **options) -> tuple[np.ndarray, dict]:
    r = client.post("/embed", json={"images": images, **options})
    assert r.status_code == 200, r.text
    body = r.json()
    return np.array(body["embeddings"], dtype=np.float32), body


def test_detect_reports_every_face_with_landmarks_and_crops(client):
    r = client.post("/detect", json={"images": [b64(GROUP), photo("Keanu_Reeves_0001.jpg"), b64(blank_photo())],
                                     "return_crops": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["detector"] == "yunet-2023mar" and body["alignment"] == "arcface-5pt-112"
    group, single, blank = body["images"]
    assert (group["width"], group["height"]) == (250, 250)
    assert len(group["faces"]) == 4 and len(single["faces"]) == 1 and blank["faces"] == []
    scores = [f["score"] for f in group["faces"]]
    assert scores == sorted(scores, reverse=True) and min(scores) >= 0.6
    for face in group["faces"]:
        assert face["image_index"] == 0 and len(face["box"]) == 4 and len(face["landmarks"]) == 5
        crop = Image.open(io.BytesIO(base64.b64decode(face["crop"])))
        assert crop.size == (112, 112) and crop.mode == "RGB"
    # the subject's right eye is on the image's left
    right_eye, left_eye = single["faces"][0]["landmarks"][:2]
    assert right_eye[0] < left_eye[0]


def test_service_crops_match_the_reference_alignment(client):
    """The crop /detect returns is the crop made from the reference landmarks of ../shared/data/lfw-112,
    up to detector jitter, and embeds to the same identity."""
    references = fixture_landmarks()
    for name in ("Amelie_Mauresmo_0001.jpg", "Bill_Frist_0002.jpg", "Helen_Clark_0001.jpg", "Keanu_Reeves_0001.jpg"):
        body = client.post("/detect", json={"images": [photo(name)], "return_crops": True}).json()
        face = body["images"][0]["faces"][0]
        ours = np.asarray(Image.open(io.BytesIO(base64.b64decode(face["crop"]))).convert("RGB"), dtype=np.float32)
        reference = align_face(load_rgb(PHOTOS / name), references[name])
        assert np.abs(ours - reference.astype(np.float32)).mean() < 6.0, name
        np.testing.assert_allclose(face["landmarks"], references[name], atol=3.0)
        vectors, _ = embed(client, [photo(name), b64(jpeg(reference))], image_type="auto")
        assert float(vectors[0] @ vectors[1]) >= 0.95, name


def test_verify_photos_same_and_different_people(client):
    def verify(a, b):
        r = client.post("/verify", json={"image_a": photo(a), "image_b": photo(b), "image_type": "photo"})
        assert r.status_code == 200, r.text
        return r.json()

    same = [verify("Amelie_Mauresmo_0001.jpg", "Amelie_Mauresmo_0002.jpg"),
            verify("Bill_Frist_0001.jpg", "Bill_Frist_0002.jpg")]
    different = [verify("Amelie_Mauresmo_0001.jpg", "Bill_Frist_0001.jpg"),
                 verify("Keanu_Reeves_0001.jpg", "Helen_Clark_0001.jpg")]
    assert all(v["match"] for v in same), same
    assert not any(v["match"] for v in different), different
    assert same[0]["face_a"]["image_index"] == 0 and same[0]["face_b"]["image_index"] == 1
    assert len(same[0]["face_a"]["box"]) == 4


def test_enroll_photos_then_identify_every_face_of_a_group_photo(client):
    suffix = uuid.uuid4().hex[:6]
    amelie, bill = f"amelie-{suffix}", f"bill-{suffix}"
    for identity, name in ((amelie, "Amelie_Mauresmo_0001.jpg"), (bill, "Bill_Frist_0001.jpg")):
        r = client.post("/enroll", json={"identity_id": identity, "images": [photo(name)], "image_type": "photo"})
        assert r.status_code == 200, r.text
        assert r.json()["faces"][0]["image_index"] == 0
    r = client.post("/identify", json={
        "images": [photo("Amelie_Mauresmo_0002.jpg"), b64(GROUP), photo("Bill_Frist_0002.jpg")],
        "image_type": "photo", "multi_face": "all", "top_k": 3,
    })
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [p["image_index"] for p in results] == [0, 1, 1, 1, 1, 2]
    assert results[0]["identity_id"] == amelie and results[-1]["identity_id"] == bill
    # strangers in the group photo are not taken for either enrolled identity
    assert all(p["identity_id"] not in (amelie, bill) for p in results[1:5])
    boxes = [tuple(p["face"]["box"]) for p in results[1:5]]
    assert len(set(boxes)) == 4
    for identity in (amelie, bill):
        assert client.delete(f"/identities/{identity}").status_code == 200


def test_multi_face_policies(client):
    detected = client.post("/detect", json={"images": [b64(GROUP)]}).json()["images"][0]["faces"]
    area = [f["box"][2] * f["box"][3] for f in detected]
    centre = [np.hypot(f["box"][0] + f["box"][2] / 2 - 124.5, f["box"][1] + f["box"][3] / 2 - 124.5) for f in detected]
    _, largest = embed(client, [b64(GROUP)], image_type="photo", multi_face="largest")
    _, central = embed(client, [b64(GROUP)], image_type="photo", multi_face="center")
    vectors, every = embed(client, [b64(GROUP)], image_type="photo", multi_face="all")
    assert largest["faces"][0]["box"] == detected[int(np.argmax(area))]["box"]
    assert central["faces"][0]["box"] == detected[int(np.argmin(centre))]["box"]
    assert len(every["faces"]) == 4 and vectors.shape == (4, 128)
    # one face per image where one identity is meant
    r = client.post("/enroll", json={"identity_id": "x", "images": [b64(GROUP)], "image_type": "photo",
                                     "multi_face": "all"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"


def test_auto_takes_model_sized_images_as_aligned_and_others_as_photos(client):
    aligned = face_files("Colin_Powell")[0]
    vectors, body = embed(client, [b64(aligned), photo("Keanu_Reeves_0001.jpg")], image_type="auto")
    assert body["faces"][0] is None and body["faces"][1]["image_index"] == 1
    only_aligned, body = embed(client, [b64(aligned)])
    assert body["faces"] is None
    assert float(vectors[0] @ only_aligned[0]) > 0.9999


def test_no_face_is_a_clear_error_and_detect_is_not(client):
    for route, body in (("/embed", {"images": [photo("Keanu_Reeves_0001.jpg"), b64(blank_photo())]}),
                        ("/identify", {"images": [b64(blank_photo())], "multi_face": "all"}),
                        ("/enroll", {"identity_id": "nobody", "images": [b64(blank_photo())]})):
        r = client.post(route, json={**body, "image_type": "photo"})
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["code"] == "no_face"
    assert error["details"]["index"] == 0
    r = client.post("/embed", json={"images": [photo("Keanu_Reeves_0001.jpg"), b64(blank_photo())],
                                    "image_type": "photo"})
    assert r.json()["error"]["details"]["index"] == 1
    assert client.get("/identities/nobody").status_code == 404


def test_photo_upright_from_exif_and_multipart(client):
    original = load_rgb(PHOTOS / "Keanu_Reeves_0001.jpg")
    # stored rotated, with the EXIF tag (6: rotate 90 CW to view) that turns it upright again
    stored = np.ascontiguousarray(np.rot90(original, k=1))
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = jpeg(stored, exif=exif.tobytes())
    files = [("images", ("a.jpg", (PHOTOS / "Keanu_Reeves_0001.jpg").read_bytes(), "image/jpeg")),
             ("images", ("b.jpg", rotated, "image/jpeg"))]
    r = client.post("/embed", files=files, data={"image_type": "photo"})
    assert r.status_code == 200, r.text
    vectors = np.array(r.json()["embeddings"])
    assert float(vectors[0] @ vectors[1]) > 0.97
    a, b = (np.array(f["box"]) for f in r.json()["faces"])
    np.testing.assert_allclose(a, b, atol=4.0)  # the box is in upright coordinates


def test_photo_limits(client):
    # a header declaring 20000x20000 pixels: refused before decoding
    r = client.post("/embed", json={"images": [b64(png_declaring(20000, 20000))], "image_type": "photo"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_large"
    # faces found count against the per-request limit (16 on this server)
    samples = ("face_faces_detected_total", "face_detect_seconds_count", 'face_errors_total{code="too_many_faces"}')
    before = [metric(client, s) for s in samples]
    r = client.post("/identify", json={"images": [b64(GROUP)] * 5, "image_type": "photo", "multi_face": "all"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_faces"
    found, photos, refused = (metric(client, s) - b for s, b in zip(samples, before))
    assert found > 16 and 1 <= photos <= 5 and refused == 1  # more than the limit was found, in up to 5 photos
