"""What an alias costs a request, and what a re-point costs the traffic through it.

One server per backend (embedded; ``--postgres``: also one on a PostgreSQL started from the
pgserver wheel, harness/pg.py), a collection of ``--identities`` random identities (embeddings, so
the model is not in the timing), an alias to it and a second collection holding the same probe.

* **direct vs alias**: ``POST /collections/{name}/identify`` with one embedding, sequential, one
  keep-alive connection, in interleaved rounds (direct then alias, so load from anything else on
  the machine hits both alike); per round a p50 each; the summary is the median over rounds of the
  p50s and of the per-round differences (alias - direct).
* **re-point under traffic**: ``--readers`` clients identify through the alias while it is
  re-pointed between the two collections every ``--repoint-every-s``; counted: answers, errors
  (anything but 200 naming one of the two targets), and p50/p99 of those requests.

    python -m bench.alias_overhead                       # embedded, ~1 min on a 2-core CPU
    python -m bench.alias_overhead --postgres            # both backends

Results: printed, and saved in bench/results/alias_overhead.json (``--output`` to choose), with the
machine and its load average (the machine may be shared).
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
from pathlib import Path

import numpy as np

from bench.common import current_commit, machine, percentile_ms, percentiles, save
from harness.server import MODEL_CACHE, ServerProcess

KEY = "alias-bench-admin-key-0123456789"


class Conn:
    """One keep-alive connection sending JSON with the admin key."""

    def __init__(self, port: int) -> None:
        self.http = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        self.http.request(method, path, body=data, headers={"X-API-Key": KEY, "Content-Type": "application/json"})
        response = self.http.getresponse()
        return response.status, json.loads(response.read() or b"{}")

    def close(self) -> None:
        self.http.close()


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def fill(conn: Conn, model_id: str, dim: int, identities: int) -> list[float]:
    """Collections ``bench-a`` (``identities`` people, and ``probe-a``) and ``bench-b`` (``probe-b``, the
    same vector), the alias ``live`` -> bench-a; returns the probe."""
    rng = np.random.default_rng(0)
    for name in ("bench-a", "bench-b"):
        assert conn.call("POST", "/collections", {"name": name})[0] == 201
    for i, vector in enumerate(unit(rng, identities, dim)):
        status, _ = conn.call("POST", "/collections/bench-a/enroll",
                              {"identity_id": f"p{i}", "embeddings": [vector.tolist()], "model_id": model_id})
        assert status == 200
    probe = unit(rng, 1, dim)[0].tolist()
    for name in ("a", "b"):
        assert conn.call("POST", f"/collections/bench-{name}/enroll",
                         {"identity_id": f"probe-{name}", "embeddings": [probe], "model_id": model_id})[0] == 200
    assert conn.call("PUT", "/aliases/live", {"collection": "bench-a"})[0] == 200
    return probe


def direct_vs_alias(conn: Conn, model_id: str, probe: list[float], rounds: int, requests: int) -> dict:
    body = {"embeddings": [probe], "model_id": model_id}
    per_round: dict[str, list[float]] = {"direct": [], "alias": []}
    for _ in range(rounds):
        for variant, path in (("direct", "/collections/bench-a/identify"), ("alias", "/collections/live/identify")):
            times = []
            for _ in range(requests):
                started = time.perf_counter()
                status, _ = conn.call("POST", path, body)
                times.append(time.perf_counter() - started)
                assert status == 200
            per_round[variant].append(percentile_ms(times, 50))
    diffs = [a - d for a, d in zip(per_round["alias"], per_round["direct"])]
    return {"rounds": rounds, "requests_per_round": requests,
            "direct_p50_ms": round(statistics.median(per_round["direct"]), 3),
            "alias_p50_ms": round(statistics.median(per_round["alias"]), 3),
            "alias_minus_direct_p50_ms": round(statistics.median(diffs), 3), "per_round_p50_ms": per_round}


def repoint_under_traffic(port: int, model_id: str, probe: list[float], readers: int, seconds: float,
                          every_s: float) -> dict:
    body = {"embeddings": [probe], "model_id": model_id}
    stop = threading.Event()
    answers: list[tuple[float, bool]] = []
    lock = threading.Lock()

    def reader() -> None:
        conn = Conn(port)
        try:
            while not stop.is_set():
                started = time.perf_counter()
                status, answer = conn.call("POST", "/collections/live/identify", body)
                ok = status == 200 and answer["results"][0]["identity_id"] in ("probe-a", "probe-b")
                with lock:
                    answers.append((time.perf_counter() - started, ok))
        finally:
            conn.close()

    threads = [threading.Thread(target=reader) for _ in range(readers)]
    for t in threads:
        t.start()
    admin = Conn(port)
    repoints = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(every_s)
        assert admin.call("PUT", "/aliases/live", {"collection": "bench-b" if repoints % 2 == 0 else "bench-a"})[0] == 200
        repoints += 1
    stop.set()
    for t in threads:
        t.join(60)
    admin.close()
    return {"readers": readers, "seconds": seconds, "repoints": repoints, "answers": len(answers),
            "errors": sum(1 for _, ok in answers if not ok), **percentiles([s * 1000 for s, _ in answers])}


def run_backend(name: str, env: dict[str, str], work: Path, args: argparse.Namespace) -> dict:
    from service.model.prepare import default_model

    server = ServerProcess(work / name / "data", model=default_model(MODEL_CACHE),
                           env={"FACE_API_KEY": KEY, "FACE_ENROLL_HUB_ALPHA": "0", **env})
    try:
        ready = server.wait_ready()
        conn = Conn(server.port)
        probe = fill(conn, ready["model_id"], ready["embedding_size"], args.identities)
        result = {"direct_vs_alias": direct_vs_alias(conn, ready["model_id"], probe, args.rounds, args.requests),
                  "repoint_under_traffic": repoint_under_traffic(server.port, ready["model_id"], probe, args.readers,
                                                                 args.traffic_s, args.repoint_every_s)}
        conn.close()
        return result
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--identities", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--traffic-s", type=float, default=10.0)
    parser.add_argument("--repoint-every-s", type=float, default=0.1)
    parser.add_argument("--postgres", action="store_true", help="also on PostgreSQL (harness/pg.py)")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    results: dict[str, dict] = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="alias-bench-") as tmp:
        results["embedded"] = run_backend("embedded", {}, Path(tmp), args)
        if args.postgres:
            from harness.pg import PgTestServer

            pg = PgTestServer()
            try:
                results["postgres"] = run_backend("postgres", pg.gallery_env(), Path(tmp), args)
            finally:
                pg.close()
    payload = {"benchmark": "alias_overhead", "machine": machine(), "commit": current_commit(),
               "load_average": {"before": load_before, "after": os.getloadavg()},
               "config": {k: v for k, v in vars(args).items() if k != "output"}, "results": results}
    path = save("alias_overhead", payload, args.output)
    print(json.dumps(results, indent=2))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
