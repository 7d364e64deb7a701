"""Shadow traffic on every replica (service/jobs/shadow.py, ``ShadowMap.follow``): two servers on one
PostgreSQL database; a shadow migration runs on whichever replica's job runner takes it, and /identify
on the source is then shadowed on BOTH within seconds (each reads the finished shadow jobs every
``FACE_SHADOW_REFRESH_S``), not only on the one that ran the job or after a restart.

PostgreSQL only: an embedded data dir is served by one process, so there is no other replica to
follow the job rows (the replica that runs the job starts its own pair: tests/service/test_migrate_api.py)."""

from __future__ import annotations

import time

import httpx

from harness.fixtures import FIXTURES, b64
from harness.server import ServerProcess
from service.gallery.crops import write_key_file
from tests.conftest import metric

FACES = sorted((FIXTURES / "faces").glob("*.jpg"))
SAMPLE = 'face_shadow_identify_total{source="people-v1",target="people-v2"}'


def test_every_replica_shadows_a_migration_another_replica_ran(tmp_path, default_model, postgres):
    from harness.models import tiny_model

    tiny = tiny_model(tmp_path / "tiny.onnx", dim=64)
    key = tmp_path / "crop.key"
    write_key_file(key)
    env = {**postgres.gallery_env(), "FACE_MODELS": f"sface={default_model},tiny={tiny}", "FACE_ENROLL_HUB_ALPHA": "0",
           "FACE_CROP_KEY_FILE": str(key), "FACE_SHADOW_REFRESH_S": "1"}
    replicas = [ServerProcess(tmp_path / f"data{i}", env=env) for i in range(2)]
    try:
        for replica in replicas:
            replica.wait_ready()
        clients = [httpx.Client(base_url=r.url, timeout=120) for r in replicas]
        first = clients[0]
        assert first.post("/collections", json={"name": "people-v1", "keep_crops": True}).status_code == 201
        for i, face in enumerate(FACES[:6]):
            r = first.post("/collections/people-v1/enroll", json={"identity_id": f"p{i}", "images": [b64(face)]})
            assert r.status_code == 200, r.text
        r = first.post("/collections/people-v1/migrate", json={"model": "tiny", "into": "people-v2", "shadow": True})
        assert r.status_code == 202, r.text
        job_id = r.json()["job"]["id"]
        deadline = time.monotonic() + 120
        while (job := first.get(f"/jobs/{job_id}").json())["state"] not in ("done", "failed", "cancelled"):
            assert time.monotonic() < deadline, job
            time.sleep(0.1)
        assert job["state"] == "done", job
        # each replica, whichever ran the job: its identify on the source is shadowed within seconds
        for n, client in enumerate(clients):
            deadline = time.monotonic() + 30
            while True:
                before = metric(client, SAMPLE)
                r = client.post("/collections/people-v1/identify", json={"images": [b64(FACES[n])]})
                assert r.status_code == 200, r.text
                time.sleep(0.5)
                if metric(client, SAMPLE) > before:
                    break
                assert time.monotonic() < deadline, f"replica {n} never shadowed the migration"
        for client in clients:
            client.close()
    finally:
        for replica in replicas:
            replica.stop()
