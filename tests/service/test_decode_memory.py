"""Memory bombs under the pixel cap: a 5 kB 1-bit PNG of 6320x6320 is 40 Mpx (under the cap) and used
to cost ~500 MB per decode, with up to 40 decodes at once. Now every decode reserves its estimated
memory in a process-wide budget first; many such files at once must keep the server's peak RSS
growth within that budget (plus a margin), and every answer is a 2xx or a coded 4xx/503."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import threading
import time

import httpx
from PIL import Image

from bench.common import rss_mb
from service.faces.images import decode_cost, open_header
from tests.server import ServerProcess

BUDGET_MB = 256
MARGIN_MB = 160  # allocator slack, the per-thread YuNet instances, JSON of 16 requests


def one_bit_png(side: int = 6320) -> bytes:
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, "PNG", optimize=True)
    return buf.getvalue()


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0.0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid) or 0.0)
            time.sleep(0.01)


def test_the_header_estimate_covers_the_real_decode_and_is_known_before_it():
    data = one_bit_png()
    header = open_header(data)
    assert len(data) < 10_000 and header.size == (6320, 6320)
    cost = decode_cost(header)
    assert 6320 * 6320 * 2 < cost < 6320 * 6320 * 4  # one plane and a conversion, not 3-7 bytes a pixel


def test_many_one_bit_bombs_at_once_stay_within_the_decode_budget(tmp_path, default_model):
    bomb = base64.b64encode(one_bit_png()).decode()
    server = ServerProcess(tmp_path / "data", model=default_model,
                           env={"FACE_DECODE_MEMORY_MB": str(BUDGET_MB), "FACE_DECODE_WAIT_MS": "60000",
                                "FACE_MAX_FACES_PER_REQUEST": "4"})
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=120) as client:
            # warm: one of each route, so lazily built things (thread-local detectors) are in the baseline
            for route, extra in (("/detect", {}), ("/embed", {"image_type": "photo"})):
                client.post(route, json={"images": [bomb], **extra})
            baseline = rss_mb(server.proc.pid)
            sampler = RssSampler(server.proc.pid)
            sampler.start()

            def send(i: int) -> httpx.Response:
                route, extra = [("/detect", {}), ("/embed", {"image_type": "photo"})][i % 2]
                return client.post(route, json={"images": [bomb], **extra})

            with cf.ThreadPoolExecutor(16) as pool:
                responses = list(pool.map(send, range(16)))
            sampler.stop.set()
            sampler.join()
        growth = sampler.peak - baseline
        print(f"decode bombs: baseline {baseline:.0f} MB, peak {sampler.peak:.0f} MB, growth {growth:.0f} MB "
              f"(budget {BUDGET_MB} MB); statuses {sorted(r.status_code for r in responses)}")
        for r in responses:
            assert r.status_code < 500 or r.status_code == 503, (r.status_code, r.text[:200])
            if r.status_code >= 400:
                assert r.json()["error"]["code"] in ("no_face", "overloaded"), r.text[:200]
        detected = [r for r in responses if r.request.url.path == "/detect" and r.status_code == 200]
        assert detected and detected[0].json()["images"][0]["width"] == 6320
        assert growth < BUDGET_MB + MARGIN_MB, f"peak RSS grew {growth:.0f} MB over a {BUDGET_MB} MB budget"
    finally:
        server.stop()


def test_one_image_over_the_per_image_cap_is_refused_unread(tmp_path, default_model):
    bomb = base64.b64encode(one_bit_png(4000)).decode()  # ~56 MB to decode
    server = ServerProcess(tmp_path / "data", model=default_model, env={"FACE_MAX_DECODE_MB": "32"})
    try:
        server.wait_ready()
        r = httpx.post(server.url + "/detect", json={"images": [bomb]}, timeout=60)
        assert (r.status_code, r.json()["error"]["code"]) == (413, "image_too_large"), r.text
        assert r.json()["error"]["details"]["estimated_bytes"] > 32 << 20
    finally:
        server.stop()
