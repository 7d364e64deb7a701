"""Huge embedding bodies (issue 19 item 3): time to the 413, peak memory, and /healthz meanwhile.

The issue's body: ``POST /enroll`` with 130,055 embeddings of 128 ones (``[1,1,...]``), as many as
fit in the default 32 MiB FACE_MAX_REQUEST_BYTES, against FACE_MAX_FACES_PER_REQUEST = 64. It must
be refused with 413 ``too_many_faces``; before the fix the whole body was parsed (on the event loop)
and validated first. Cases: one such body, three at once (each on its own connection), and
``giant_row``: one ``POST /identify`` whose one embedding has 16.8M ones (32 MiB), refused with 422
``wrong_dimension``.

For each variant (this checkout, and ``--baseline REF`` run from ``git archive REF`` as in
``bench.overhead``) and each case, a fresh server is started (freed memory the allocator keeps would
hide the next case's growth), then ``--repeats`` times:

* the server's peak RSS is reset (``/proc/PID/clear_refs``) and its RSS read; after the case, the
  peak (VmHWM) minus that RSS is the **peak RSS growth**;
* one client thread sends ``GET /healthz`` back to back on a keep-alive connection throughout: the
  **worst /healthz latency** is the longest the event loop left it waiting;
* each body is sent with ``http.client``; **time to 413** runs from the first byte sent to the answer
  (``after_sent``: from the last byte sent), per body.

The first repeat on a fresh server is the one to quote for memory (later ones may reuse memory the
allocator kept). Machine shared with other work: the load average is recorded before and after.

    nice -n 10 python -m bench.large_bodies --baseline 1df8f80            # ~3 min on 2 busy cores
    python -m bench.large_bodies --repeats 1 --output /tmp/large.json    # this checkout only

Results: printed, and saved as JSON in bench/results/large_bodies.json (``--output`` to choose).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import machine, percentile_ms, rss_mb, save
from bench.overhead import Server, current_commit, unpack
from harness.server import MODEL_CACHE, REPO

ROWS = 130_055
DIMENSION = 128


def issue_body(model_id: str, rows: int = ROWS) -> bytes:
    one = "[" + ",".join(["1"] * DIMENSION) + "]"
    return (f'{{"identity_id": "large-body", "model_id": "{model_id}", "embeddings": ['
            + ",".join([one] * rows) + "]}").encode()


def giant_row_body(model_id: str, size: int = 32 << 20) -> bytes:
    values = (size - 200) // 2
    return (f'{{"model_id": "{model_id}", "embeddings": [[' + ",".join(["1"] * values) + "]]}").encode()


class HealthPinger(threading.Thread):
    """GET /healthz back to back on one keep-alive connection until stopped; keeps every latency."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port, self.latencies, self.done = port, [], threading.Event()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        while not self.done.is_set():
            t0 = time.perf_counter()
            conn.request("GET", "/healthz")
            response = conn.getresponse()
            response.read()
            self.latencies.append(time.perf_counter() - t0)
            if response.status != 200:
                raise RuntimeError(f"/healthz answered {response.status}")
            time.sleep(0.005)
        conn.close()


def send(port: int, route: str, body: bytes) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    t0 = time.perf_counter()
    conn.request("POST", route, body=body, headers={"content-type": "application/json"})
    sent = time.perf_counter()
    response = conn.getresponse()
    data = response.read()
    done = time.perf_counter()
    conn.close()
    code = json.loads(data).get("error", {}).get("code") if response.status >= 400 else None
    return {"status": response.status, "code": code, "ms": round((done - t0) * 1000, 1),
            "after_sent_ms": round((done - sent) * 1000, 1)}


def run_case(server: Server, route: str, body: bytes, at_once: int) -> dict:
    pid = server.proc.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = rss_mb(pid) or 0.0
    pinger = HealthPinger(server.port)
    pinger.start()
    time.sleep(0.2)
    with ThreadPoolExecutor(at_once) as pool:
        answers = list(pool.map(lambda _: send(server.port, route, body), range(at_once)))
    time.sleep(0.2)
    pinger.done.set()
    pinger.join(120)
    peak = rss_mb(pid, "VmHWM") or 0.0
    return {"answers": answers, "rss_before_mb": round(before, 1), "peak_rss_growth_mb": round(peak - before, 1),
            "rss_after_mb": round(rss_mb(pid) or 0.0, 1),
            "healthz": {"n": len(pinger.latencies), "max_ms": round(max(pinger.latencies) * 1000, 1),
                        "p50_ms": percentile_ms(pinger.latencies, 50)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", help="git ref to compare with (e.g. 1df8f80, before the fix)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each case on one fresh server")
    parser.add_argument("--output", type=Path, help="JSON path (default: bench/results/large_bodies.json)")
    args = parser.parse_args()

    from service.model.prepare import default_model

    model = default_model(MODEL_CACHE)
    env = {"FACE_PROVIDERS": "cpu", "FACE_MAX_FACES_PER_REQUEST": "64", "FACE_MAX_REQUEST_BYTES": str(32 << 20)}
    cases = {"one": ("/enroll", issue_body, 1), "three_at_once": ("/enroll", issue_body, 3),
             "giant_row": ("/identify", giant_row_body, 1)}
    result: dict = {"benchmark": "large_bodies", "machine": machine(),
                    "config": {"rows": ROWS, "dimension": DIMENSION, "server_env": env, "repeats": args.repeats,
                               "current": current_commit(), "loadavg_before": os.getloadavg()},
                    "variants": {}}
    with tempfile.TemporaryDirectory(prefix="face-large-") as tmp:
        work = Path(tmp)
        sources = {"current": REPO}
        if args.baseline:
            sources["baseline"] = work / "baseline"
            sources["baseline"].mkdir()
            result["config"]["baseline"] = {"ref": args.baseline, "commit": unpack(args.baseline, sources["baseline"])}
        for name, source in sources.items():
            result["variants"][name] = {}
            for case, (route, make_body, at_once) in cases.items():
                server = Server(f"{name}-{case}", source, model, env, work)
                try:
                    ready = server.wait_ready(timeout=300)
                    body = make_body(ready["model_id"])
                    result["config"].setdefault("body_bytes", {})[case] = len(body)
                    runs = [run_case(server, route, body, at_once) for _ in range(args.repeats)]
                finally:
                    server.stop()
                times = [a["ms"] for run in runs for a in run["answers"]]
                summary = {"codes": sorted({f"{a['status']} {a['code']}" for run in runs for a in run["answers"]}),
                           "time_to_answer_ms_median": statistics.median(times), "time_to_answer_ms_max": max(times),
                           "first_peak_rss_growth_mb": runs[0]["peak_rss_growth_mb"],
                           "max_peak_rss_growth_mb": max(r["peak_rss_growth_mb"] for r in runs),
                           "healthz_worst_ms": max(r["healthz"]["max_ms"] for r in runs)}
                result["variants"][name][case] = {"summary": summary, "runs": runs}
                print(f"{name:8} {case:13} {json.dumps(summary)}", flush=True)
    result["config"]["loadavg_after"] = os.getloadavg()
    print(f"saved {save('large_bodies', result, args.output)}")


if __name__ == "__main__":
    main()
