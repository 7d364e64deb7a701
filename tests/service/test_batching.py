"""The batcher over real HTTP: several inference workers, concurrent requests of mixed sizes, every
one answered with its own rows; a full queue answers `overloaded` (503) instead of waiting."""

from __future__ import annotations

import concurrent.futures as cf
import time

import httpx
import numpy as np

from tests.conftest import FACES, b64
from tests.server import ServerProcess

ALL_FACES = sorted(FACES.glob("*.jpg"))


def embed(url: str, paths) -> httpx.Response:
    return httpx.post(url + "/embed", json={"images": [b64(p) for p in paths]}, timeout=120)


def test_48_concurrent_requests_of_mixed_sizes_with_two_workers_are_all_answered(tmp_path, default_model):
    server = ServerProcess(tmp_path / "data", model=default_model,
                           env={"FACE_BATCH_WORKERS": "2", "FACE_BATCH_MAX_WAIT_MS": "25", "FACE_BATCH_MAX_SIZE": "8"})
    try:
        server.wait_ready()
        single = np.array(embed(server.url, ALL_FACES).json()["embeddings"])
        rng = np.random.default_rng(3)
        requests = [rng.integers(0, len(ALL_FACES), size=rng.integers(1, 13)) for _ in range(48)]
        with cf.ThreadPoolExecutor(48) as pool:
            futures = [pool.submit(embed, server.url, [ALL_FACES[i] for i in picks]) for picks in requests]
            responses = [f.result(timeout=180) for f in futures]  # a lost request would hang here
        for picks, r in zip(requests, responses):
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(np.array(r.json()["embeddings"]), single[picks], atol=1e-4)
    finally:
        server.stop()


def test_a_full_queue_answers_overloaded_and_nothing_hangs(tmp_path, default_model):
    server = ServerProcess(tmp_path / "data", model=default_model,
                           env={"FACE_BATCH_MAX_QUEUED_FACES": "16", "FACE_BATCH_MAX_SIZE": "4"})
    try:
        server.wait_ready()
        with cf.ThreadPoolExecutor(24) as pool:
            futures = [pool.submit(embed, server.url, ALL_FACES[:12]) for _ in range(24)]
            responses = [f.result(timeout=180) for f in futures]
        statuses = sorted({r.status_code for r in responses})
        assert set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses, statuses
        for r in responses:
            if r.status_code == 503:
                assert r.json()["error"]["code"] == "overloaded"
        assert embed(server.url, ALL_FACES[:1]).status_code == 200  # the process still serves
    finally:
        server.stop()


def metric(text: str, prefix: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def test_clients_that_leave_are_not_computed_for(tmp_path, default_model):
    """12 clients queue 32 faces each behind a one-worker, one-face-per-run model and hang up after 0.2 s:
    their requests are cancelled (499 in the metrics) and most of their faces never reach the model."""
    server = ServerProcess(tmp_path / "data", model=default_model,
                           env={"FACE_BATCH_MAX_SIZE": "1", "FACE_BATCH_MAX_WAIT_MS": "0",
                                "FACE_MAX_FACES_PER_REQUEST": "32"})
    try:
        server.wait_ready()
        before = metric(httpx.get(server.url + "/metrics").text, "face_embeddings_computed_total")
        body = {"images": [b64(p) for p in ALL_FACES]}

        def impatient():
            try:
                return httpx.post(server.url + "/embed", json=body, timeout=httpx.Timeout(10, read=0.2)).status_code
            except httpx.ReadTimeout:
                return "left"

        with cf.ThreadPoolExecutor(12) as pool:
            outcomes = list(pool.map(lambda _: impatient(), range(12)))
        assert outcomes.count("left") >= 6, outcomes
        deadline = time.monotonic() + 60
        text = ""
        while time.monotonic() < deadline:  # until every abandoned request is accounted for
            text = httpx.get(server.url + "/metrics").text
            if metric(text, 'face_http_requests_total{method="POST",route="/embed",status="499"}') >= outcomes.count("left"):
                break
            time.sleep(0.2)
        computed = metric(text, "face_embeddings_computed_total") - before
        answered = sum(1 for o in outcomes if o == 200)
        assert computed < 32 * 12 / 2, (computed, outcomes)
        assert computed >= 32 * answered
        assert embed(server.url, ALL_FACES[:2]).status_code == 200
    finally:
        server.stop()
