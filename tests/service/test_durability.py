"""The gallery survives restarts and SIGKILL; it refuses another model's gallery."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from service.model.contract import read_contract
from service.model.prepare import SFACE_FILE, packaged_model, prepare_model
from tests.conftest import ENROLLED, b64, face_files
from tests.server import ServerProcess, listed_identities


def test_restart_keeps_gallery_and_identify_still_works(tmp_path, default_model):
    data = tmp_path / "data"
    server = ServerProcess(data, model=default_model)
    server.wait_ready()
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for name in ENROLLED[:4]:
            assert c.post("/enroll", json={"identity_id": name, "images": [b64(p) for p in face_files(name)[:2]]}).status_code == 200
        c.delete(f"/identities/{ENROLLED[0]}")
    server.stop()  # SIGTERM: graceful shutdown writes an index snapshot
    assert '"event": "service stopped"' in server.log()
    assert (data / "index.json").exists()

    server = ServerProcess(data, model=default_model)
    ready = server.wait_ready()
    assert ready["gallery"]["identities"] == 3 and ready["gallery"]["faces"] == 6
    assert '"source": "snapshot"' in server.log()
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/identify", json={"images": [b64(face_files(n)[2]) for n in ENROLLED[:4]]}).json()["results"]
        assert [x["identity_id"] for x in r] == [None] + ENROLLED[1:4]
    server.stop()


def test_acknowledged_enrollments_survive_sigkill(tmp_path, default_model):
    data = tmp_path / "data"
    server = ServerProcess(data, model=default_model, env={"FACE_SNAPSHOT_INTERVAL_S": "0"})
    server.wait_ready()
    faces = [b64(face_files(name)[0]) for name in ENROLLED]
    acknowledged: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def enroll_forever(worker: int) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            i = 0
            while not stop.is_set():
                identity = f"w{worker}-{i}"
                try:
                    r = c.post("/enroll", json={"identity_id": identity, "images": [faces[(worker + i) % len(faces)]]})
                except httpx.HTTPError:
                    return  # the server died mid-request: not acknowledged
                if r.status_code == 200:
                    with lock:
                        acknowledged.append(identity)
                i += 1

    threads = [threading.Thread(target=enroll_forever, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(acknowledged) < 40 and time.monotonic() < deadline:
        time.sleep(0.05)
    server.kill()  # SIGKILL while enrollments are in flight
    stop.set()
    for t in threads:
        t.join(30)
    assert len(acknowledged) >= 40

    server = ServerProcess(data, model=default_model, env={"FACE_SNAPSHOT_INTERVAL_S": "0"})
    ready = server.wait_ready()
    assert '"source": "rebuilt"' in server.log()  # no snapshot (periodic ones off): rebuilt from the store
    assert ready["gallery"]["identities"] >= len(acknowledged)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        missing = set(acknowledged) - listed_identities(c)
        assert not missing, f"acknowledged but lost: {sorted(missing)[:10]}"
        # and the rebuilt index finds them: every stored face is searchable
        r = c.post("/identify", json={"images": [faces[0]], "top_k": 100}).json()["results"][0]
        assert ready["gallery"]["index_live"] == ready["gallery"]["faces"]
        assert len(r["candidates"]) == min(100, ready["gallery"]["identities"])
    server.stop()


def test_gallery_refuses_a_different_model(tmp_path, default_model):
    data = tmp_path / "data"
    server = ServerProcess(data, model=default_model)
    server.wait_ready()
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.post("/enroll", json={"identity_id": "x", "images": [b64(face_files(ENROLLED[0])[0])]}).status_code == 200
    server.stop()

    other_contract = read_contract(default_model)
    other_contract = type(other_contract)(**{**other_contract.__dict__, "model_version": "retrained"})
    other = prepare_model(packaged_model(SFACE_FILE), tmp_path / "other" / "model.onnx", other_contract)
    server = ServerProcess(data, model=other)
    with pytest.raises(RuntimeError) as excinfo:
        server.wait_ready(timeout=60)
    assert server.proc.returncode != 0
    assert "sface@2021dec-int8bq" in str(excinfo.value) and "sface@retrained" in str(excinfo.value)
    server.stop()

    # the refused start changed nothing: the original model still finds the stored identity
    server = ServerProcess(data, model=default_model)
    assert server.wait_ready()["gallery"]["identities"] == 1
    server.stop()


def test_api_key_guards_everything_but_health(tmp_path, default_model):
    server = ServerProcess(tmp_path / "data", model=default_model, env={"FACE_API_KEY": "s3cret"})
    server.wait_ready()
    face = b64(face_files(ENROLLED[0])[0])
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        for method, path, kwargs in [("POST", "/embed", {"json": {"images": [face]}}), ("GET", "/identities", {}),
                                     ("GET", "/metrics", {}), ("DELETE", "/identities/x", {})]:
            r = c.request(method, path, **kwargs)
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
            r = c.request(method, path, headers={"X-API-Key": "wrong"}, **kwargs)
            assert r.status_code == 401
        assert c.post("/embed", json={"images": [face]}, headers={"X-API-Key": "s3cret"}).status_code == 200
    server.stop()
