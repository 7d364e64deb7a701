"""Kept face crops over HTTP through a real server, on both backends: a keep_crops collection keeps the
crop the model saw for every face enrolled from an image (aligned crop or photo), sealed with the key
file that ``python -m service crop-key new`` wrote; embeddings into it are refused (409
crops_required); a plain collection keeps none; a wrong or missing key stops the server at start-up
(non-zero exit, the key file named); deleting an identity or the collection erases its crops."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys

import httpx
import numpy as np
import pytest
from PIL import Image

from harness.fixtures import FIXTURES, face_files
from harness.server import REPO, ServerProcess
from service.config import Settings
from service.gallery.crops import CropCipher, decode_crop
from service.gallery.open import open_gallery
from service.model.contract import read_contract
from tests.conftest import backend_env
from tests.damage import alter_kept_crop

PHOTO = FIXTURES / "photos" / "Amelie_Mauresmo_0001.jpg"


def crop_key(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service", "crop-key", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png(crop: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(crop).save(out, format="PNG")
    return out.getvalue()


def test_crop_key_cli_writes_a_0600_key_and_never_overwrites(tmp_path):
    path = tmp_path / "crop.key"
    made = crop_key("new", str(path))
    assert made.returncode == 0, made.stderr
    assert os.stat(path).st_mode & 0o777 == 0o600
    text = path.read_text()
    assert text.endswith("\n") and len(base64.b64decode(text.strip(), validate=True)) == 32
    again = crop_key("new", str(path))
    assert again.returncode == 1 and "exists" in again.stderr and path.read_text() == text
    assert crop_key("new").returncode != 0  # no path: usage error


def _refused(data_dir, model, env: dict[str, str], names: str) -> None:
    server = ServerProcess(data_dir, model=model, env=env)
    try:
        assert server.proc.wait(180) not in (0, None)
    finally:
        server.stop()
    log = server.log_path.read_text(errors="replace")
    assert names in log, log[-3000:]


@pytest.fixture(params=["embedded", "postgres"])
def setup(request, tmp_path, default_model):
    key = tmp_path / "crop.key"
    assert crop_key("new", str(key)).returncode == 0
    env = backend_env(request, {"FACE_ENROLL_HUB_ALPHA": "0"})
    return request.param, tmp_path / "data", default_model, env, key


def _opened(data_dir, model, env: dict[str, str], key):
    settings = Settings(data_dir=data_dir, crop_key_file=key,
                        **({"database_url": env["FACE_DATABASE_URL"], "database_schema": env["FACE_DATABASE_SCHEMA"]}
                           if "FACE_DATABASE_URL" in env else {}))
    contract = read_contract(model)
    return open_gallery(settings, contract.model_id, contract.embedding_size)


def test_keep_crops_collection_keeps_what_the_model_saw_sealed(setup):
    kind, data_dir, model, env, key = setup
    aligned = face_files("George_W_Bush")[:2]
    server = ServerProcess(data_dir, model=model, env={**env, "FACE_CROP_KEY_FILE": str(key)})
    try:
        ready = server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=120) as c:
            made = c.post("/collections", json={"name": "kept", "keep_crops": True})
            assert made.status_code == 201 and made.json()["keep_crops"] is True, made.text
            assert c.post("/collections", json={"name": "plain"}).json()["keep_crops"] is False
            assert {i["name"]: i["keep_crops"] for i in c.get("/collections").json()["items"]} == {
                "default": False, "kept": True, "plain": False}
            r = c.post("/collections/kept/enroll", json={"identity_id": "bush", "images": [b64(f.read_bytes())
                                                                                        for f in aligned]})
            assert r.status_code == 200, r.text
            bush_faces = r.json()["face_ids"]
            r = c.post("/collections/kept/enroll", json={"identity_id": "amelie", "image_type": "photo",
                                                         "images": [b64(PHOTO.read_bytes())]})
            assert r.status_code == 200, r.text
            photo_face = r.json()["face_ids"][0]
            r = c.post("/collections/kept/enroll", json={"identity_id": "gone", "images": [b64(aligned[0].read_bytes())]})
            gone_face = r.json()["face_ids"][0]
            assert c.delete("/collections/kept/identities/gone").status_code == 200
            # embeddings carry no crop: refused, nothing stored
            vector = c.post("/embed", json={"images": [b64(aligned[0].read_bytes())]}).json()["embeddings"][0]
            r = c.post("/collections/kept/enroll", json={"identity_id": "vec", "embeddings": [vector],
                                                         "model_id": ready["model_id"]})
            assert r.status_code == 409 and r.json()["error"]["code"] == "crops_required", r.text
            assert c.get("/collections/kept/identities/vec").status_code == 404
            # a plain collection takes both, and keeps no crop
            plain_faces = []
            for body in ({"images": [b64(aligned[0].read_bytes())]}, {"embeddings": [vector],
                                                                      "model_id": ready["model_id"]}):
                r = c.post("/collections/plain/enroll", json={"identity_id": "p", **body})
                assert r.status_code == 200, r.text
                plain_faces += r.json()["face_ids"]
    finally:
        server.stop()

    galleries = _opened(data_dir, model, env, key)
    try:
        kept = galleries.collection("kept")
        cipher = CropCipher.from_file(key)
        assert kept.crop_count() == 3 and galleries.collection("plain").crop_count() == 0
        assert kept.face_crop(gone_face) is None
        stored = {"bush": kept.identity_embeddings("bush"), "amelie": kept.identity_embeddings("amelie")}
        crops = {}
        for face_id in bush_faces + [photo_face]:
            blob = kept.face_crop(face_id)
            assert blob is not None
            crops[face_id] = decode_crop(cipher.open("kept", face_id, blob))
            assert crops[face_id].shape == (112, 112, 3)
        assert [(f, i) for f, i, _ in kept.iter_crops()] == [(bush_faces[0], "bush"), (bush_faces[1], "bush"),
                                                             (photo_face, "amelie")]
    finally:
        galleries.close()
    for face_id, path in zip(bush_faces, aligned):  # an aligned upload: the crop is the decoded upload
        sent = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
        assert np.abs(crops[face_id].astype(np.int16) - sent).mean() < 1.0

    # the right key starts again; the decoded crops embed to the stored embeddings
    server = ServerProcess(data_dir, model=model, env={**env, "FACE_CROP_KEY_FILE": str(key)})
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=120) as c:
            order = bush_faces + [photo_face]
            r = c.post("/embed", json={"images": [b64(png(crops[f])) for f in order]})
            assert r.status_code == 200, r.text
            again = np.asarray(r.json()["embeddings"], dtype=np.float32)
            expected = np.concatenate([stored["bush"], stored["amelie"]])
            cosine = np.sum(again * expected, axis=1)
            assert cosine.min() > 0.9999, cosine
            # GET .../faces/{id}/crop: the same crop, decrypted, as PNG, never cached
            for face_id in order:
                r = c.get(f"/collections/kept/faces/{face_id}/crop")
                assert r.status_code == 200, r.text
                assert r.headers["content-type"] == "image/png" and r.headers["cache-control"] == "no-store"
                assert r.headers["x-content-type-options"] == "nosniff"
                assert np.array_equal(decode_crop(r.content), crops[face_id])
            # (face ids are per collection on the embedded backend: `default`, empty, has none of them)
            for path, code in ((f"/collections/kept/faces/{gone_face}/crop", "face_not_found"),
                               (f"/collections/plain/faces/{plain_faces[0]}/crop", "crop_not_kept"),
                               (f"/faces/{bush_faces[0]}/crop", "face_not_found"),
                               (f"/collections/kept/faces/{10**15}/crop", "face_not_found")):
                r = c.get(path)
                assert (r.status_code, r.json()["error"]["code"]) == (404, code), (path, r.text)
            r = c.get("/collections/kept/faces/0/crop")
            assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_request")
        served = [line for line in server.log_path.read_text().splitlines() if '"face crop served"' in line]
        assert [(json.loads(line)["collection"], json.loads(line)["face_id"]) for line in served] == [
            ("kept", f) for f in order]  # who saw whose face: one line each, none for a refused one
    finally:
        server.stop()

    # another key, or none: the server refuses to start, naming the key file (or the setting)
    wrong = key.with_name("wrong.key")
    assert crop_key("new", str(wrong)).returncode == 0
    _refused(data_dir, model, {**env, "FACE_CROP_KEY_FILE": str(wrong)}, str(wrong))
    _refused(data_dir, model, env, "FACE_CROP_KEY_FILE")

    # deleting the collection erases its crops
    server = ServerProcess(data_dir, model=model, env={**env, "FACE_CROP_KEY_FILE": str(key)})
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=120) as c:
            assert c.delete("/collections/kept").json()["deleted_faces"] == 3
    finally:
        server.stop()
    galleries = _opened(data_dir, model, env, key)
    try:
        assert [i.name for i in galleries.list_collections()] == ["default", "plain"]
        if kind == "embedded":
            assert not (data_dir / "collections" / "kept").exists()
        else:
            import psycopg

            with psycopg.connect(env["FACE_DATABASE_URL"], autocommit=True,
                                 options=f"-c search_path={env['FACE_DATABASE_SCHEMA']},public") as conn:
                assert conn.execute("SELECT count(*) FROM face_crops").fetchone() == (0,)
    finally:
        galleries.close()


def test_keep_crops_without_a_key_is_refused(setup):
    _, data_dir, model, env, _ = setup
    server = ServerProcess(data_dir, model=model, env=env)
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=60) as c:
            r = c.post("/collections", json={"name": "kept", "keep_crops": True})
            assert r.status_code == 409 and r.json()["error"]["code"] == "crop_key_missing", r.text
            assert [i["name"] for i in c.get("/collections").json()["items"]] == ["default"]
    finally:
        server.stop()


def test_gallery_enroll_keeps_crops_and_gallery_import_is_refused(operator_backend, tmp_path, monkeypatch):
    """The operator's folder enroll into a keep_crops collection keeps the crops the model saw (as /enroll
    does); a gallery file (embeddings only) cannot go into one."""
    import shutil

    key = tmp_path / "crop.key"
    assert crop_key("new", str(key)).returncode == 0
    monkeypatch.setenv("FACE_CROP_KEY_FILE", str(key))  # the in-process opens below read it too
    env = {"FACE_CROP_KEY_FILE": str(key)}
    galleries = operator_backend.open()
    try:
        galleries.create_collection("kept", keep_crops=True)
        galleries.collection("default").enroll("someone", np.eye(1, galleries.dim, dtype=np.float32))
    finally:
        galleries.close()
    people = tmp_path / "people"
    for name in ("George_W_Bush", "Colin_Powell"):
        (people / name).mkdir(parents=True)
        for path in face_files(name)[:2]:
            shutil.copy(path, people / name / path.name)
    r = operator_backend.run("gallery", "enroll", str(people), "--collection", "kept", env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    galleries = operator_backend.open()
    try:
        kept = galleries.collection("kept")
        assert kept.crop_count() == 4
        cipher = CropCipher.from_file(key)
        face_id, identity, blob = kept.iter_crops()[0]
        sent = np.asarray(Image.open(sorted((people / identity).iterdir())[0]).convert("RGB"), dtype=np.int16)
        opened = decode_crop(cipher.open("kept", face_id, blob)).astype(np.int16)
        assert np.abs(opened - sent).mean() < 1.0
    finally:
        galleries.close()
    exported = tmp_path / "default.jsonl"
    assert operator_backend.run("gallery", "export", str(exported), env=env).returncode == 0
    r = operator_backend.run("gallery", "import", str(exported), "--collection", "kept", env=env)
    assert r.returncode != 0 and "keep_crops" in r.stderr + r.stdout, r.stderr


def test_operator_commands_refuse_a_crop_key_that_does_not_open_the_store(operator_backend, tmp_path, monkeypatch):
    """Issue 22's bad input: the operator's tools (the folder enroll that re-enrolls a collection without
    crops, export, keys) given another key than the one the kept crops were sealed with, or a key file that
    is no key, stop with exit status 2 and one line naming the key file, no traceback; nothing is written."""
    key = tmp_path / "crop.key"
    assert crop_key("new", str(key)).returncode == 0
    monkeypatch.setenv("FACE_CROP_KEY_FILE", str(key))
    galleries = operator_backend.open()
    try:
        galleries.create_collection("kept", keep_crops=True)
    finally:
        galleries.close()
    people = tmp_path / "people"
    (people / "George_W_Bush").mkdir(parents=True)
    for path in face_files("George_W_Bush")[:2]:
        (people / "George_W_Bush" / path.name).write_bytes(path.read_bytes())
    assert operator_backend.run("gallery", "enroll", str(people), "--collection", "kept",
                                env={"FACE_CROP_KEY_FILE": str(key)}, timeout=300).returncode == 0
    wrong = tmp_path / "wrong.key"
    assert crop_key("new", str(wrong)).returncode == 0
    not_a_key = tmp_path / "not-a.key"
    not_a_key.write_text("this is not a key\n")
    (people / "Colin_Powell").mkdir()
    for path in face_files("Colin_Powell")[:2]:
        (people / "Colin_Powell" / path.name).write_bytes(path.read_bytes())
    for bad in (wrong, not_a_key):
        env = {"FACE_CROP_KEY_FILE": str(bad)}
        for command in (("gallery", "enroll", str(people), "--collection", "kept"),
                        ("gallery", "export", str(tmp_path / "out.jsonl"), "--collection", "kept"),
                        ("keys", "list")):
            r = operator_backend.run(*command, env=env, timeout=300)
            if command[0] == "keys" and bad is wrong:  # keys never read crops: another valid key does not matter
                assert r.returncode == 0, r.stderr
                continue
            assert r.returncode == 2, (command, bad, r.stderr[-2000:])
            assert str(bad) in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "out.jsonl").exists()
    galleries = operator_backend.open()
    try:
        kept = galleries.collection("kept")
        assert [i.identity_id for i in kept.list_identities(10, None)] == ["George_W_Bush"] and kept.crop_count() == 2
    finally:
        galleries.close()


def test_a_kept_crop_that_does_not_open_is_collection_damaged_not_a_500(setup):
    """A sealed crop whose bytes were altered in the store (a disk fault, a hand edit) no longer
    authenticates: GET .../crop answers 503 ``collection_damaged`` naming the collection and the face,
    logged, never shown (it was a 500 with a traceback); the other faces' crops are served."""
    _, data_dir, model, env, key = setup
    server = ServerProcess(data_dir, model=model, env={**env, "FACE_CROP_KEY_FILE": str(key)})
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=120) as c:
            assert c.post("/collections", json={"name": "kept", "keep_crops": True}).status_code == 201
            faces = []
            for person in ("George_W_Bush", "Colin_Powell"):
                r = c.post("/collections/kept/enroll", json={"identity_id": person,
                                                              "images": [b64(face_files(person)[0].read_bytes())]})
                assert r.status_code == 200, r.text
                faces += r.json()["face_ids"]
            altered, kept = faces

            alter_kept_crop(data_dir, env, "kept", altered)
            r = c.get(f"/collections/kept/faces/{altered}/crop")
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "collection_damaged"
            assert r.json()["error"]["details"] == {"collection": "kept", "face_id": altered}
            served = c.get(f"/collections/kept/faces/{kept}/crop")
            assert served.status_code == 200 and served.content.startswith(b"\x89PNG")
        log = server.log_path.read_text()
        assert "Traceback" not in log and '"internal_error"' not in log
        assert [line for line in log.splitlines() if "kept crop does not open" in line and f'"face_id": {altered}' in line]
    finally:
        server.stop()
