"""Rate limits over HTTP: faces per second per client address in open mode (and per key, in
test_keys.py), refused with 429 rate_limited and a Retry-After that is honest."""

from __future__ import annotations

import time

import httpx
import numpy as np

from harness.server import ServerProcess


def test_faces_per_second_are_limited_per_client_in_open_mode(tmp_path, default_model):
    env = {"FACE_RATE_LIMIT_FACES_PER_S": "4", "FACE_RATE_LIMIT_RPS": "50"}
    proc = ServerProcess(tmp_path / "data", model=default_model, env=env)
    try:
        model_id = proc.wait_ready()["model_id"]
        rows = np.random.default_rng(1).normal(size=(3, 128))
        body = {"embeddings": (rows / np.linalg.norm(rows, axis=1, keepdims=True)).tolist(), "model_id": model_id}
        with httpx.Client(base_url=proc.url, timeout=30) as c:
            assert c.post("/identify", json=body).status_code == 200  # 3 of the 4 a second
            refused = c.post("/identify", json=body)
            assert refused.status_code == 429, refused.text
            assert refused.json()["error"]["code"] == "rate_limited"
            assert refused.json()["error"]["details"]["limit"] == "faces"
            wait = int(refused.headers["Retry-After"])
            assert 1 <= wait <= 2
            assert c.get("/healthz").status_code == 200  # the probes are never limited
            time.sleep(wait)
            assert c.post("/identify", json=body).status_code == 200  # honoured: served again
    finally:
        proc.stop()


def test_a_rate_too_small_to_wait_for_is_refused_with_a_retry_after_of_a_day(tmp_path, default_model):
    """A limit of 5e-324 a second: the wait for the next token is more than a float holds (inf), and
    refusing it raised OverflowError (500; at 1e-300 Retry-After had 301 digits). Now 429
    ``rate_limited``, Retry-After at most a day."""
    proc = ServerProcess(tmp_path / "data", model=default_model, env={"FACE_RATE_LIMIT_RPS": "5e-324"})
    try:
        proc.wait_ready()
        with httpx.Client(base_url=proc.url, timeout=30) as c:
            assert c.get("/whoami").status_code == 200  # the burst: one
            for _ in range(2):
                refused = c.get("/whoami")
                assert refused.status_code == 429, refused.text
                assert refused.json()["error"]["code"] == "rate_limited"
                assert refused.headers["Retry-After"] == "86400"
                assert "86400 s" in refused.json()["error"]["message"]
    finally:
        proc.stop()
    assert "Traceback" not in proc.log()
