"""An acknowledged change always has its audit record, SIGKILL included, on both backends: the record
is written in the change's own transaction."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest

from harness.server import ServerProcess
from tests.conftest import backend_env


@pytest.fixture(params=["embedded", "postgres"])
def env(request):
    return backend_env(request, {"FACE_SNAPSHOT_INTERVAL_S": "0", "FACE_ENROLL_HUB_ALPHA": "0"})


def test_every_acknowledged_change_has_its_audit_entry_after_sigkill(tmp_path, default_model, env):
    data = tmp_path / "data"
    server = ServerProcess(data, model=default_model, env=env)
    model_id = server.wait_ready()["model_id"]
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.post("/collections", json={"name": "kin"}).status_code == 201
    acknowledged: dict[str, tuple[str, str]] = {}  # request id -> (action, identity)
    lock = threading.Lock()
    stop = threading.Event()

    def write_forever(worker: int) -> None:
        rng = np.random.default_rng(worker)
        prefix = "/collections/kin" if worker % 2 else ""
        with httpx.Client(base_url=server.url, timeout=30) as c:
            i = 0
            while not stop.is_set():
                identity = f"w{worker}-{i}"
                v = rng.normal(size=(1, 128))
                rows = (v / np.linalg.norm(v)).tolist()
                try:
                    r = c.post(f"{prefix}/enroll", json={"identity_id": identity, "embeddings": rows,
                                                         "model_id": model_id})
                    if r.status_code == 200:
                        with lock:
                            acknowledged[r.headers["X-Request-ID"]] = ("identity.created", identity)
                    if i % 3 == 2:
                        r = c.delete(f"{prefix}/identities/{identity}")
                        if r.status_code == 200:
                            with lock:
                                acknowledged[r.headers["X-Request-ID"]] = ("identity.deleted", identity)
                except httpx.HTTPError:
                    return  # the server died mid-request: not acknowledged
                i += 1

    threads = [threading.Thread(target=write_forever, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(acknowledged) < 60 and time.monotonic() < deadline:
        time.sleep(0.05)
    server.kill()
    stop.set()
    for t in threads:
        t.join(30)
    assert len(acknowledged) >= 60

    server = ServerProcess(data, model=default_model, env=env)
    server.wait_ready()
    try:
        recorded: dict[str, tuple[str, str]] = {}
        with httpx.Client(base_url=server.url, timeout=60) as c:
            cursor = None
            while True:
                page = c.get("/audit", params={"limit": 1000} | ({"cursor": cursor} if cursor else {})).json()
                recorded |= {e["request_id"]: (e["action"], e["identity_id"]) for e in page["items"]}
                cursor = page["next_cursor"]
                if not cursor:
                    break
        missing = {rid: what for rid, what in acknowledged.items() if recorded.get(rid) != what}
        assert not missing, f"acknowledged without an audit entry: {list(missing.items())[:5]}"
    finally:
        server.stop()
