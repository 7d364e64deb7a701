"""Migrating a collection to another served model over HTTP, on both backends (service/jobs): the job
re-embeds every kept crop with the new model into a new collection, keeps it up with writes made to
the source meanwhile, survives a kill -9 of its server, and every bad request is a 4xx with its code
and leaves nothing behind. The second model is harness/models.py's tiny ONNX (no TensorFlow)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from harness.fixtures import FIXTURES, b64
from harness.models import tiny_model
from harness.server import REPO, ServerProcess
from tests.conftest import backend_env
from tests.damage import alter_kept_crop

FACES = sorted((FIXTURES / "faces").glob("*.jpg"))  # 32 aligned LFW crops


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tiny-migrate") / "tiny.onnx", dim=64)


@pytest.fixture(params=["embedded", "postgres"])
def setup(request, tmp_path, default_model, tiny):
    key = tmp_path / "crop.key"
    made = subprocess.run([sys.executable, "-m", "service", "crop-key", "new", str(key)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    env = backend_env(request, {"FACE_MODELS": f"sface={default_model},tiny={tiny}", "FACE_ENROLL_HUB_ALPHA": "0",
                                "FACE_CROP_KEY_FILE": str(key), "FACE_JOB_STALE_S": "2"})
    return request.param, tmp_path / "data", env


def error(r: httpx.Response) -> tuple[int, str]:
    return r.status_code, r.json()["error"]["code"]


def enroll(c: httpx.Client, collection: str, identity: str, files) -> None:
    r = c.post(f"/collections/{collection}/enroll", json={"identity_id": identity, "images": [b64(f) for f in files]})
    assert r.status_code == 200, r.text


def wait_for(c: httpx.Client, job_id: str, states=("done", "failed", "cancelled"), timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {job['state']}: {job}")


def identities(c: httpx.Client, collection: str) -> dict[str, int]:
    out, after = {}, None
    while True:
        r = c.get(f"/collections/{collection}/identities", params={"limit": 500, **({"cursor": after} if after else {})})
        assert r.status_code == 200, r.text
        page = r.json()
        for item in page["items"]:
            out[item["identity_id"]] = item["face_count"]
        after = page.get("next_cursor")
        if not after:
            return out


def test_migration_copies_every_identity_and_keeps_up_with_writes(setup):
    _, data_dir, env = setup
    server = ServerProcess(data_dir, env=env)
    try:
        ready = server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=120) as c:
            assert c.post("/collections", json={"name": "people-v1", "keep_crops": True,
                                                "retention_days": 3650}).status_code == 201
            for i, face in enumerate(FACES[:24]):  # one face each: 24 identities
                enroll(c, "people-v1", f"p{i:02d}", [face])
            enroll(c, "people-v1", "many", FACES[24:27])
            with ThreadPoolExecutor(4) as pool:  # enough for the job to be running while the writer writes
                list(pool.map(lambda i: enroll(c, "people-v1", f"zz{i:03d}", [FACES[i % 24]]), range(300)))
            assert c.put("/aliases/people", json={"collection": "people-v1"}).status_code == 200
            r = c.post("/collections/people/migrate", json={"model": "tiny", "into": "people-v2", "batch_size": 1,
                                                            "shadow": True})
            assert r.status_code == 202, r.text
            job = r.json()["job"]
            assert job["collection"] == "people-v1" and job["into"] == "people-v2" and job["kind"] == "migrate"
            assert job["source_model_id"] == ready["model_id"] and job["model"] == "tiny"
            assert job["state"] in ("queued", "running") and job["id"].startswith("job_")
            assert c.get("/collections/people-v2").json()["retention_days"] == 3650  # forgets as the old one
            # writes to A while the job runs: new identities, deletions, appended faces
            def writer() -> None:
                with httpx.Client(base_url=server.url, timeout=120) as w:
                    for i, face in enumerate(FACES[27:33]):
                        enroll(w, "people-v1", f"new{i}", [face])
                        assert w.delete(f"/collections/people-v1/identities/p{i:02d}").status_code == 200
                    enroll(w, "people-v1", "p10", [FACES[27]])  # an appended face

            thread = threading.Thread(target=writer)
            thread.start()
            thread.join()
            during = c.get(f"/jobs/{job['id']}").json()
            assert during["state"] in ("queued", "running"), f"the job ended before the writes: {during}"
            done = wait_for(c, job["id"])
            assert done["state"] == "done", done
            assert done["progress"]["phase"] == "done" and done["finished_at"] is not None
            source, target = identities(c, "people-v1"), identities(c, "people-v2")
            assert target == source and "new4" in target and "p00" not in target and target["p10"] == 2
            info = c.get("/collections/people-v2").json()
            assert info["model"] == "tiny" and info["keep_crops"] is True and info["dim"] == 64
            for identity in ("many", "p10", "zz000"):  # B's faces keep when A's were enrolled (retention counts from it)
                faces = [c.get(f"/collections/{name}/identities/{identity}").json()["faces"]
                         for name in ("people-v1", "people-v2")]
                assert [f["enrolled_at"] for f in faces[0]] == [f["enrolled_at"] for f in faces[1]], (identity, faces)
                assert len(faces[0]) >= 1 and faces[1][0]["expires_at"] == faces[1][0]["enrolled_at"] + 3650 * 86_400
            # every identity's own face finds it first in B (B's vectors are the tiny model's)
            for face, identity in [(FACES[30], "new3"), (FACES[25], "many")]:  # faces no other identity has
                r = c.post("/collections/people-v2/identify", json={"images": [b64(face)], "threshold": 0.0})
                assert r.status_code == 200, r.text
                assert r.json()["model_id"] == "tiny@1" and r.json()["results"][0]["identity_id"] == identity, r.text
            assert [j["id"] for j in c.get("/jobs").json()["items"]] == [job["id"]]
            assert c.get("/jobs", params={"collection": "people-v1", "state": "done"}).json()["items"][0]["id"] == job["id"]
            actions = {e["action"] for e in c.get("/audit", params={"collection": "people-v1"}).json()["items"]}
            assert "job.started" in actions
            report = done["report"]  # compare.py's, over the finished copy
            assert report["source"]["collection"] == "people-v1" and report["target"]["collection"] == "people-v2"
            assert report["unpaired_identities"] == 0 and report["paired_probes"] == 5  # many: 3 faces, p10: 2
            # shadow: true: /identify on the source is run on the copy too, off the request path
            assert c.post("/collections/people/identify", json={"images": [b64(FACES[30])]}).status_code == 200
            deadline = time.monotonic() + 30
            while 'face_shadow_identify_total{source="people-v1",target="people-v2"} 1.0' not in c.get("/metrics").text:
                assert time.monotonic() < deadline, c.get("/metrics").text[-3000:]
                time.sleep(0.1)
    finally:
        server.stop()


def test_bad_migrations_are_refused_and_leave_nothing(setup):
    _, data_dir, env = setup
    server = ServerProcess(data_dir, env=env)
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=120) as c:
            assert c.post("/collections", json={"name": "kept", "keep_crops": True}).status_code == 201
            assert c.post("/collections", json={"name": "plain"}).status_code == 201
            enroll(c, "kept", "a", FACES[:2])
            enroll(c, "plain", "a", FACES[:2])
            before = {i["name"] for i in c.get("/collections").json()["items"]}

            def migrate(collection: str, **body) -> httpx.Response:
                return c.post(f"/collections/{collection}/migrate", json={"model": "tiny", "into": "new", **body})

            assert error(migrate("plain")) == (409, "no_source_crops")
            assert "gallery enroll" in migrate("plain").json()["error"]["message"]
            assert error(migrate("missing")) == (404, "collection_not_found")
            assert error(migrate("kept", model="nope")) == (404, "model_not_found")
            assert error(c.post("/collections/kept/migrate", json={"model": "tiny", "into": "plain"})) == (
                409, "collection_exists")
            assert c.put("/aliases/taken", json={"collection": "plain"}).status_code == 200
            assert error(c.post("/collections/kept/migrate", json={"model": "tiny", "into": "taken"})) == (
                409, "collection_exists")
            assert migrate("kept", batch_size=0).status_code == 422
            assert {i["name"] for i in c.get("/collections").json()["items"]} == before
            assert c.get("/jobs").json()["items"] == []
            # two at once: exactly one wins, the other creates nothing
            with ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(lambda n: c.post("/collections/kept/migrate",
                                                          json={"model": "tiny", "into": f"into-{n}"}), range(4)))
            codes = sorted(r.status_code for r in answers)
            assert codes == [202, 409, 409, 409], [r.text for r in answers]
            assert all(error(r) == (409, "job_running") for r in answers if r.status_code == 409)
            winner = next(r.json()["job"] for r in answers if r.status_code == 202)
            assert {i["name"] for i in c.get("/collections").json()["items"]} == before | {winner["into"]}
            done = wait_for(c, winner["id"])
            assert done["state"] == "done", done
            assert error(c.post(f"/jobs/{winner['id']}/cancel")) == (409, "job_finished")
            assert error(c.post(f"/jobs/{winner['id']}/resume")) == (409, "job_finished")
            assert error(c.get("/jobs/job_000000000000")) == (404, "job_not_found")
            assert error(c.post("/jobs/job_000000000000/cancel")) == (404, "job_not_found")
            assert error(c.get("/jobs", params={"state": "odd"}))[0] == 422
            # cancel, then resume: the job ends done with the target complete
            for i, face in enumerate(FACES[2:22]):  # enough for the resumed job to be still running below
                enroll(c, "kept", f"k{i}", [face])
            r = c.post("/collections/kept/migrate", json={"model": "tiny", "into": "again", "batch_size": 1})
            assert r.status_code == 202, r.text
            job_id = r.json()["job"]["id"]
            cancelled = c.post(f"/jobs/{job_id}/cancel")
            assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled", cancelled.text
            again = c.post(f"/jobs/{job_id}/cancel")  # cancelling a cancelled job changes nothing
            assert again.status_code == 200 and again.json()["state"] == "cancelled", again.text
            resumed = c.post(f"/jobs/{job_id}/resume")
            assert resumed.status_code == 200 and resumed.json()["state"] in ("queued", "running"), resumed.text
            assert error(c.post(f"/jobs/{job_id}/resume")) == (409, "job_running")
            assert wait_for(c, job_id)["state"] == "done"
            assert identities(c, "again") == identities(c, "kept")
    finally:
        server.stop()


def test_a_killed_servers_migration_resumes_after_restart(setup):
    _, data_dir, env = setup
    server = ServerProcess(data_dir, env=env)
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=120) as c:
            assert c.post("/collections", json={"name": "big", "keep_crops": True}).status_code == 201
            for i in range(150):
                enroll(c, "big", f"id{i:03d}", [FACES[i % len(FACES)]])
            r = c.post("/collections/big/migrate", json={"model": "tiny", "into": "big-v2", "batch_size": 1})
            assert r.status_code == 202, r.text
            job_id = r.json()["job"]["id"]
            job = wait_for(c, job_id, states=("running",))
            while job["progress"]["faces_done"] < 5 and job["state"] == "running":
                job = c.get(f"/jobs/{job_id}").json()
            assert job["state"] == "running", job  # mid-way
            server.kill()
    finally:
        server.stop()
    server = ServerProcess(data_dir, env=env)
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=120) as c:
            done = wait_for(c, job_id)
            assert done["state"] == "done", done
            assert identities(c, "big-v2") == identities(c, "big")
            assert done["progress"]["identities_done"] == 150
    finally:
        server.stop()


def gallery_cli(data_dir, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "service", "gallery", "--data-dir", str(data_dir), *args], cwd=REPO,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


def test_the_cli_migrates_through_the_server_or_in_process(setup):
    """`gallery migrate` with --url follows the server's job to its end; without a URL it runs the same
    job code here (refused, naming --url, while a server holds the embedded data dir)."""
    import json

    kind, data_dir, env = setup
    server = ServerProcess(data_dir, env=env)
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=120) as c:
            assert c.post("/collections", json={"name": "kept", "keep_crops": True}).status_code == 201
            for i, face in enumerate(FACES[:6]):
                enroll(c, "kept", f"p{i}", [face])
        remote = gallery_cli(data_dir, env, "migrate", "--collection", "kept", "--model", "tiny", "--into", "via-url",
                             "--url", server.url)
        assert remote.returncode == 0, remote.stderr
        assert json.loads(remote.stdout)["state"] == "done"
        refused = gallery_cli(data_dir, env, "migrate", "--collection", "kept", "--model", "nope", "--into", "x",
                              "--url", server.url)
        assert refused.returncode == 2 and "model_not_found" in refused.stderr, refused.stderr
        if kind == "embedded":
            locked = gallery_cli(data_dir, env, "migrate", "--collection", "kept", "--model", "tiny", "--into", "x")
            assert locked.returncode == 2 and "--url" in locked.stderr, locked.stderr
    finally:
        server.stop()
    here = gallery_cli(data_dir, env, "migrate", "--collection", "kept", "--model", "tiny", "--into", "in-process",
                       "--batch-size", "2")
    assert here.returncode == 0, here.stderr
    job = json.loads(here.stdout)
    assert job["state"] == "done" and job["progress"]["identities_done"] == 6, job
    listed = gallery_cli(data_dir, env, "jobs")
    assert listed.returncode == 0, listed.stderr
    assert [j["into"] for j in json.loads(listed.stdout)["items"]] == ["in-process", "via-url"]
    shown = gallery_cli(data_dir, env, "jobs", job["id"])
    assert shown.returncode == 0 and json.loads(shown.stdout)["id"] == job["id"]
    assert gallery_cli(data_dir, env, "jobs", "job_000000000000").returncode == 2


def test_a_kept_crop_that_does_not_open_fails_the_job_as_collection_damaged(setup):
    """A sealed crop altered in the store (a disk fault; the key itself is checked at start-up) fails
    the migration ``collection_damaged`` naming the face, logged without a stack (it was
    ``crop_key_missing``, which sends the operator after the wrong thing, with a traceback); the
    target collection stays, as after any failed job, to be deleted or resumed."""
    _, data_dir, env = setup
    server = ServerProcess(data_dir, env=env)
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=120) as c:
            assert c.post("/collections", json={"name": "kept", "keep_crops": True}).status_code == 201
            for i, face in enumerate(FACES[:3]):
                enroll(c, "kept", f"p{i}", [face])
            altered = c.get("/collections/kept/identities/p1").json()["faces"][0]["face_id"]

            alter_kept_crop(data_dir, env, "kept", altered)
            r = c.post("/collections/kept/migrate", json={"model": "tiny", "into": "kept-v2", "batch_size": 1})
            assert r.status_code == 202, r.text
            job = wait_for(c, r.json()["job"]["id"])
            assert job["state"] == "failed" and job["error"]["code"] == "collection_damaged", job
            assert f"face {altered}" in job["error"]["message"] and "'kept'" in job["error"]["message"], job
        log = server.log_path.read_text()
        assert "Traceback" not in log, log[-3000:]
    finally:
        server.stop()


def test_an_alias_cannot_point_at_the_target_of_an_unfinished_migration(setup):
    """PUT /aliases at a migration's new collection while its job runs (or is cancelled or failed) is 409
    `migration_unfinished`: clients would be switched to a half-copied gallery, and the job's catch-up
    would delete from it what the old collection lacks (an enrollment acknowledged through the alias).
    Once the job is done the same PUT switches, and a write through the alias stays."""
    _, data_dir, env = setup
    server = ServerProcess(data_dir, env=env)
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=120) as c:
            assert c.post("/collections", json={"name": "people-v1", "keep_crops": True}).status_code == 201
            for i in range(60):
                enroll(c, "people-v1", f"p{i:03d}", [FACES[i % len(FACES)]])
            assert c.put("/aliases/people", json={"collection": "people-v1"}).status_code == 200
            r = c.post("/collections/people/migrate", json={"model": "tiny", "into": "people-v2", "batch_size": 1})
            assert r.status_code == 202, r.text
            job_id = r.json()["job"]["id"]
            flip = c.put("/aliases/people", json={"collection": "people-v2"})
            assert c.get(f"/jobs/{job_id}").json()["state"] in ("queued", "running")  # it was unfinished
            assert error(flip) == (409, "migration_unfinished"), flip.text
            details = flip.json()["error"]["details"]
            assert details["job_id"] == job_id and details["collection"] == "people-v2"
            assert error(c.put("/aliases/other", json={"collection": "people-v2"})) == (409, "migration_unfinished")
            assert c.get("/aliases/people").json()["collection"] == "people-v1"  # unchanged
            assert c.get("/aliases/other").status_code == 404
            cancelled = c.post(f"/jobs/{job_id}/cancel")
            assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled", cancelled.text
            assert error(c.put("/aliases/people", json={"collection": "people-v2"})) == (409, "migration_unfinished")
            assert c.post(f"/jobs/{job_id}/resume").status_code == 200
            assert wait_for(c, job_id)["state"] == "done"
            assert c.put("/aliases/people", json={"collection": "people-v2"}).status_code == 200
            enroll(c, "people", "after_switch", [FACES[5]])
            assert "after_switch" in identities(c, "people-v2")
    finally:
        server.stop()


def test_a_source_at_its_max_faces_migrates_while_one_identity_shrinks_and_another_grows(setup):
    """The target gets the source's max_faces: a catch-up that synced identities in id order would
    grow one (a_x) before shrinking the other (a_y), needing more room than the source ever held
    (too_many_faces_for_collection, again on resume). Shrinking ones go first."""
    _, data_dir, env = setup
    server = ServerProcess(data_dir, env=env)
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=120) as c:
            limit = 20 + 150
            assert c.post("/collections", json={"name": "v1", "keep_crops": True, "max_faces": limit}).status_code == 201
            enroll(c, "v1", "a_x", FACES[0:10])
            enroll(c, "v1", "a_y", FACES[10:20])
            for i in range(150):  # enough for the job to be copying still when the writes are answered
                enroll(c, "v1", f"f{i:03d}", [FACES[i % len(FACES)]])
            r = c.post("/collections/v1/migrate", json={"model": "tiny", "into": "v2", "batch_size": 1})
            assert r.status_code == 202, r.text
            job_id = r.json()["job"]["id"]
            job = wait_for(c, job_id, states=("running",))
            while job["progress"].get("identities_done", 0) < 3 and job["state"] == "running":
                job = c.get(f"/jobs/{job_id}").json()
            y = c.get("/collections/v1/identities/a_y").json()
            shrunk = c.post("/collections/v1/faces/delete", json={"face_ids": [f["face_id"] for f in y["faces"]][:8]})
            assert shrunk.status_code == 200, shrunk.text
            enroll(c, "v1", "a_x", FACES[20:28])  # the source stays at its limit
            assert c.get("/collections/v1").json()["faces"] == limit
            assert c.get(f"/jobs/{job_id}").json()["state"] == "running"  # the writes came during the copy
            done = wait_for(c, job_id)
            assert done["state"] == "done", done
            assert identities(c, "v2") == identities(c, "v1") and identities(c, "v2")["a_x"] == 18
    finally:
        server.stop()
