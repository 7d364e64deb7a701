"""Upgrading the service never loses the gallery: data dirs written by released versions (round 2's
1df8f80, round 3's 330ab64, stop 43's 4fca6ac), each left by a SIGKILL after its last acknowledged
write, and their PostgreSQL schemas (dumped then), are served by this version as those versions
answered of them, then written to and killed again.

The fixtures and what each version answered are made by tests/fixtures/upgrade/make.py (its docstring
says how); this test only reads them.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import shutil
import tarfile
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.server import ServerProcess

UPGRADE = Path(__file__).parents[1] / "fixtures" / "upgrade"
FACES = UPGRADE.parent / "faces"
RELEASES = ("round2-1df8f80", "round3-330ab64", "stop43-4fca6ac")


def probe(name: str) -> str:
    return base64.b64encode((FACES / f"{name}.jpg").read_bytes()).decode()


def prefix(collection: str) -> str:
    return "" if collection == "default" else f"/collections/{collection}"


def listed(c: httpx.Client, path: str) -> list[dict]:
    items: list[dict] = []
    cursor = None
    while True:
        r = c.get(path, params={"limit": 100} | ({"cursor": cursor} if cursor else {}))
        assert r.status_code == 200, r.text
        items += r.json()["items"]
        if not (cursor := r.json()["next_cursor"]):
            return items


def same_answers(c: httpx.Client, collection: str, said: dict) -> None:
    """The collection holds what the old version said it held, and identifies each fixture face as it did."""
    where = prefix(collection)
    assert {item["identity_id"] for item in listed(c, f"{where}/identities")} == set(said["identities"])
    for identity, old in said["identities"].items():
        now = c.get(f"{where}/identities/{identity}").json()
        assert (now["face_ids"], now["metadata"], now["face_count"]) == \
            (old["face_ids"], old["metadata"], old["face_count"]), identity
    for name, candidates in said["identify"].items():
        r = c.post(f"{where}/identify", json={"images": [probe(name)], "top_k": 3})
        assert r.status_code == 200, r.text
        now = [(x["identity_id"], x["face_id"], x["score"]) for x in r.json()["results"][0]["candidates"]]
        assert [x[:2] for x in now] == [tuple(x[:2]) for x in candidates], (collection, name)
        assert [x[2] for x in now] == pytest.approx([x[2] for x in candidates], abs=1e-5), (collection, name)


def restored(request, backend: str, release: str, tmp_path: Path) -> tuple[dict, dict[str, str]]:
    """The release's gallery where a server of this version finds it: the embedded data dir unpacked in
    tmp_path/data, or the PostgreSQL schema restored under a fresh name on the suite's PostgreSQL.
    Returns what the release answered of it and the server's settings for it."""
    if backend == "embedded":
        with tarfile.open(UPGRADE / f"{release}.tar.gz") as tar:
            tar.extractall(tmp_path, filter="data")
        return json.loads((UPGRADE / f"{release}.json").read_text()), {}
    import psycopg

    made = json.loads((UPGRADE / f"{release}-postgres.json").read_text())
    pg = request.getfixturevalue("postgres")
    schema = pg.fresh_schema()
    dump = gzip.decompress((UPGRADE / f"{release}-postgres.sql.gz").read_bytes()).decode()
    statements = "\n".join(line for line in dump.splitlines() if not line.startswith("\\"))  # psql's \restrict
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")  # the schema's dump has it not: it is the database's
        conn.execute(statements.replace(made["schema"], schema).encode())
    return made, {"FACE_DATABASE_URL": pg.url, "FACE_DATABASE_SCHEMA": schema}


@pytest.mark.parametrize("release", RELEASES)
@pytest.mark.parametrize("backend", ["embedded", "postgres"])
def test_a_gallery_of_a_released_version_is_served_whole_and_written_on(request, tmp_path, default_model, release,
                                                                        backend):
    made, env = restored(request, backend, release, tmp_path)
    data = tmp_path / "data"
    if made["api_key"]:  # the versions with keys: the same admin key, crop key and pepper
        env["FACE_API_KEY"] = made["api_key"]
        for setting, file in (("FACE_CROP_KEY_FILE", "test-crop-key"), ("FACE_KEY_PEPPER_FILE", "test-key-pepper")):
            shutil.copy(UPGRADE / file, tmp_path / file)
            (tmp_path / file).chmod(0o600)
            env[setting] = str(tmp_path / file)
    deleted_identity = made["deleted"]["default"][0]
    new_face = "Jean_Chretien_0003"  # appended to a person of the old gallery after the upgrade

    server = ServerProcess(data, model=default_model, env=env)
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, headers=server.key_headers, timeout=60) as c:
            for collection, said in made["collections"].items():
                same_answers(c, collection, said)
            assert c.get(f"/identities/{deleted_identity}").json()["error"]["code"] == "identity_not_found"
            if made["api_key"]:
                round_three_parts(c, server.url, made)
            # written on: a new identity, an old one deleted, a face appended to an old identity
            r = c.post("/enroll", json={"identity_id": "After_Upgrade", "images": [probe("Hugo_Chavez_0003")],
                                        "metadata": {"enrolled": "after the upgrade"}})
            assert r.status_code == 200 and r.json()["created"], r.text
            assert c.delete("/identities/Tony_Blair").status_code == 200
            r = c.post("/enroll", json={"identity_id": "George_W_Bush", "images": [probe(new_face)]})
            assert r.status_code == 200 and r.json()["face_count"] == 3, r.text
            appended = r.json()["face_ids"][0]
        server.kill()  # acknowledged writes survive kill -9 on the upgraded dir too

        server = ServerProcess(data, model=default_model, env=env)
        server.wait_ready()
        with httpx.Client(base_url=server.url, headers=server.key_headers, timeout=60) as c:
            expected = dict(made["collections"]["default"]["identities"])
            del expected["Tony_Blair"]
            ids = {item["identity_id"] for item in listed(c, "/identities")}
            assert ids == set(expected) | {"After_Upgrade"}
            assert c.get("/identities/After_Upgrade").json()["metadata"] == {"enrolled": "after the upgrade"}
            bush = c.get("/identities/George_W_Bush").json()
            assert bush["face_ids"] == expected["George_W_Bush"]["face_ids"] + [appended]
            assert appended not in [f for old in expected.values() for f in old["face_ids"]]  # ids never reused
            best = c.post("/identify", json={"images": [probe(new_face)], "top_k": 1}).json()["results"][0]
            assert (best["identity_id"], best["candidates"][0]["face_id"]) == ("George_W_Bush", appended)
            for collection, said in made["collections"].items():
                if collection != "default":
                    same_answers(c, collection, said)
        assert "Traceback" not in server.log_path.read_text()
    finally:
        server.stop()


def round_three_parts(c: httpx.Client, url: str, made: dict) -> None:
    """Collections, their alias, stored keys, kept crops, deleted faces and the audit trail of a round-3
    data dir."""
    listing = {item["name"]: item for item in c.get("/collections").json()["items"]}
    for old in made["listed"]["items"]:
        now = listing[old["name"]]
        assert {k: now[k] for k in ("model_id", "dim", "keep_crops", "identities", "faces")} == \
            {k: old[k] for k in ("model_id", "dim", "keep_crops", "identities", "faces")}
    assert c.get("/aliases/front").json()["collection"] == "site-a"
    assert {x["identity_id"] for x in listed(c, "/collections/front/identities")} == \
        set(made["collections"]["site-a"]["identities"])
    for collection, faces in made["deleted_faces"].items():
        for face in faces:
            r = c.get(f"/collections/{collection}/faces/{face}/crop")
            assert r.status_code == 404, r.text
    for identity in made["collections"]["site-a"]["identities"].values():
        for face in identity["face_ids"]:  # each kept crop opens with the same crop key
            r = c.get(f"/collections/site-a/faces/{face}/crop")
            assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
            assert Image.open(io.BytesIO(r.content)).size == (112, 112)
    writer = {"X-API-Key": made["keys"]["writer"]["secret"]}
    reader = {"X-API-Key": made["keys"]["reader"]["secret"]}
    with httpx.Client(base_url=url, timeout=60) as anyone:
        enroll = {"identity_id": "Writer_Check", "images": [probe("Hugo_Chavez_0003")]}
        assert anyone.post("/collections/site-a/enroll", headers=writer, json=enroll).status_code == 200
        assert anyone.post("/collections/site-b/enroll", headers=writer, json=enroll).status_code == 403
        assert anyone.post("/collections/site-b/enroll", headers=reader, json=enroll).status_code == 403
        assert anyone.get("/collections/site-b/identities", headers=reader).status_code == 200
        assert anyone.get("/identities", headers={"X-API-Key": "not-a-key"}).status_code == 401
    assert c.delete("/collections/site-a/identities/Writer_Check").status_code == 200
    audit = {entry["entry_id"]: entry for entry in listed(c, "/audit")}
    for old in made["audit"]:
        now = audit[old["entry_id"]]
        assert {k: now[k] for k in ("action", "collection", "identity_id", "key_id", "at")} == \
            {k: old[k] for k in ("action", "collection", "identity_id", "key_id", "at")}
