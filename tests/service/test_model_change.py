"""The whole road of a model change, over HTTP on both backends: a collection on the default model
(SFace) keeps its crops; the LFW fixture people are enrolled; it is migrated to the second served
model (harness/models.py's tiny ONNX); the job ends done with its comparison report; the alias the
clients use is re-pointed at the copy; identify through the alias now answers with the new model and
finds the enrolled people."""

from __future__ import annotations

import time

import httpx

from harness.fixtures import ENROLLED, b64, face_files
from harness.server import ServerProcess
from tests.service.test_migrate_api import setup, tiny, wait_for  # noqa: F401 - fixtures

__all__ = ["setup", "tiny"]


def test_a_collection_moves_to_another_model_and_the_alias_follows(setup):
    _, data_dir, env = setup
    server = ServerProcess(data_dir, env=env)
    try:
        ready = server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=120) as c:
            assert c.post("/collections", json={"name": "people-v1", "keep_crops": True}).status_code == 201
            for person in ENROLLED:
                r = c.post("/collections/people-v1/enroll", json={"identity_id": person,
                                                                  "images": [b64(f) for f in face_files(person)]})
                assert r.status_code == 200, r.text
            assert c.put("/aliases/people", json={"collection": "people-v1"}).status_code == 200
            before = c.post("/collections/people/identify", json={"images": [b64(face_files("Tony_Blair")[0])]}).json()
            assert before["model_id"] == ready["model_id"] and before["results"][0]["identity_id"] == "Tony_Blair"

            r = c.post("/collections/people/migrate", json={"model": "tiny", "into": "people-v2"})
            assert r.status_code == 202, r.text
            done = wait_for(c, r.json()["job"]["id"])
            assert done["state"] == "done" and done["error"] is None, done
            report = done["report"]
            assert report["source"]["collection"] == "people-v1" and report["target"]["collection"] == "people-v2"
            assert report["source"]["faces"] == report["target"]["faces"] == sum(len(face_files(p)) for p in ENROLLED)
            assert report["unpaired_identities"] == 0 and 0.0 <= report["top1_agreement"] <= 1.0
            assert report["source"]["rank1"] is not None and report["target"]["rank1"] is not None

            assert c.put("/aliases/people", json={"collection": "people-v2"}).status_code == 200
            time.sleep(1.1)  # every replica follows within FACE_ALIAS_CACHE_S (at most 1 s)
            for person in ENROLLED:
                found = c.post("/collections/people/identify", json={"images": [b64(face_files(person)[0])],
                                                                     "threshold": 0.0}).json()
                assert found["model_id"] == "tiny@1", found
                assert found["results"][0]["identity_id"] == person, (person, found)
    finally:
        server.stop()
