"""Per-request overhead of a one-face /embed: (one-face HTTP p50) - (raw batch-1 session p50).

One run measures, in interleaved rounds (so that load from anything else on the machine hits every
variant alike):

* **raw**: the model's onnxruntime session alone at batch 1 (input preprocessed once, outside the
  timing), as ``bench.embed_throughput`` measures it;
* **current**: ``POST /embed`` with one aligned face (a real LFW crop, base64 JPEG in JSON) on the
  server of this checkout, one client, sequential requests on one keep-alive connection;
* **baseline** (``--baseline REF``): the same against a server started from ``git archive REF``
  (unpacked in a temporary directory, run with the same Python and model), so before and after come
  from the same run on the same machine.

Besides latency, each variant's CPU time per request (the server process's, all threads, from
/proc/PID/task/*/schedstat; for raw, this process's during the runs) is recorded: on a machine
shared with other work latencies swing by tens of ms while CPU time hardly moves, so the CPU
overhead (server CPU per request - raw CPU per run) is the figure to compare there, with
``--intra-op-threads 1`` (onnxruntime's spinning pool threads would count idle spinning as CPU).
Steadier still is the server's event-loop thread's CPU per request (``loop_cpu_ms``: the main
thread, which runs every request's Python work but not the session), the figure that says what a
change to the request path saved; each round also records the load average.
The latency overhead is the figure that counts, from a run on an otherwise idle machine.

Two options separate the request path's own cost from the machine's (docs in bench/README.md,
"Where the overhead goes"):

* ``--model tiny``: the harness's tiny model (``harness.models.tiny_model``: one pooling and one
  matmul, ~20 us a run) instead of SFace; the same request path, decode and quality, without a
  15-25 ms model run between requests;
* ``--think-ms N``: the client busy-waits N ms before each timed request and each raw run, so the
  server (and the raw session) sits idle between requests, as beside a real client. On a virtual
  machine a thread that wakes after some milliseconds idle runs its first work much slower (caches,
  the vCPU's idle state): this measures that, for the server and for the raw session alike.

Both servers run side by side with their default settings (only the data directory, providers and
``FACE_INTRA_OP_THREADS`` are set, the latter equal to the raw session's), and are measured one at a
time. Each round gives a p50 per variant; the summary is the median over rounds of those p50s and of
the per-round differences (HTTP p50 - raw p50). The client is the standard library's
``http.client`` (little client-side cost; the figure is the server's overhead plus one loopback
round trip).

    python -m bench.overhead --baseline 10bf1b3                 # ~2 min on a 2-core CPU
    python -m bench.overhead --baseline main --rounds 5 --requests 40 --output /tmp/o.json   # quick
    python -m bench.overhead --intra-op-threads 1 ...           # busy machine: compare cpu_overhead
    python -m bench.overhead --model tiny [--think-ms 15]       # the request path alone, back to back or idle between
    python -m bench.overhead --tls --baseline HEAD              # what HTTPS costs a request (same code, TLS on)
    python -m bench.overhead --spinning off --baseline REF      # onnxruntime's pool without spinning (REF: without
                                                                # FACE_INTRA_OP_SPINNING, so it spins) + raw_spinning

Results: printed, and saved as JSON in bench/results/overhead_<device>.json (``--output`` to choose).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import ssl
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import current_commit, machine, percentile_ms, save, unpack
from harness.fixtures import FACES
from harness.server import MODEL_CACHE, REPO, ServerProcess
from service.model.session import CPU, FaceSession, SessionOptions


class Server(ServerProcess):
    """``python -m service`` from a source tree, on a free port, logging to a file, with one keep-alive
    ``http.client`` connection for the timed requests."""

    def __init__(self, name: str, source: Path, model: Path, env: dict[str, str], work: Path) -> None:
        super().__init__(work / f"data-{name}", model=model, env=env, log_path=work / f"server-{name}.log",
                         source=source)
        self.name = name
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        if self.conn is None:  # one keep-alive connection for every request (TLS: one handshake)
            if self.url.startswith("https:"):  # --tls: the server's self-signed certificate is the CA
                assert isinstance(self.verify, ssl.SSLContext)
                self.conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=60, context=self.verify)
            else:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        headers = {"content-type": "application/json"} if body is not None else {}
        self.conn.request(method, path, body=body, headers=headers)
        response = self.conn.getresponse()
        return response.status, response.read()

    def reconnect(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = None

    def stop(self) -> int:
        self.reconnect()
        return super().stop()


def cpu_ns(pid: int) -> int:
    """CPU time all threads of a process have run so far, in ns (/proc/PID/task/*/schedstat). Unlike
    latency it hardly moves when other work shares the CPU: the robust figure on a busy machine."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):  # a thread that just ended
            pass
    return total


def thread_cpu_ns(pid: int, tid: int) -> int:
    """CPU time one thread has run so far, in ns: the server's main thread (tid = pid) runs the event
    loop, i.e. all of a request's Python work but the session run (in an inference thread)."""
    return int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])


@dataclass
class Timed:
    latencies: list[float]  # seconds, one per request / run
    cpu_ms: float  # CPU time per request / run of the process doing the work (server, or the raw session's)
    loop_cpu_ms: float | None = None  # the server's event-loop thread's CPU time per request


def think(seconds: float) -> None:
    """The client's pause before a request, busy-waiting (so that the client's own CPU stays awake):
    the server, or the raw session, sits idle meanwhile, as between the requests of a real caller."""
    if seconds > 0:
        until = time.perf_counter() + seconds
        while time.perf_counter() < until:
            pass


def time_raw(session: FaceSession, tensor: np.ndarray, n: int, pause: float = 0.0) -> Timed:
    for _ in range(3):
        session.run(tensor)
    times = []
    cpu0 = cpu_ns(os.getpid())
    for _ in range(n):
        think(pause)
        t0 = time.perf_counter()
        session.run(tensor)
        times.append(time.perf_counter() - t0)
    return Timed(times, (cpu_ns(os.getpid()) - cpu0) / n / 1e6)


def time_http(server: Server, body: bytes, n: int, warmup: int = 5, pause: float = 0.0) -> Timed:
    server.reconnect()  # the server closes idle keep-alive connections (5 s) while others are measured
    times = []
    cpu0 = loop0 = 0
    pid = server.proc.pid
    for i in range(warmup + n):
        if i == warmup:
            cpu0, loop0 = cpu_ns(pid), thread_cpu_ns(pid, pid)
        think(pause)
        t0 = time.perf_counter()
        status, data = server.request("POST", "/embed", body)
        elapsed = time.perf_counter() - t0
        if status != 200:
            raise RuntimeError(f"{server.name}: /embed answered {status}: {data[:300]!r}")
        if i >= warmup:
            times.append(elapsed)
    return Timed(times, (cpu_ns(pid) - cpu0) / n / 1e6, (thread_cpu_ns(pid, pid) - loop0) / n / 1e6)


def anon_huge_pages_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", help="git ref to compare with (its server runs beside this checkout's)")
    parser.add_argument("--model", help="ONNX model file, or `tiny` (harness.models.tiny_model: a model that "
                        "runs in ~20 us, so the figure is the request path's alone; default: the prepared SFace)")
    parser.add_argument("--think-ms", type=float, default=0.0,
                        help="the client busy-waits this long before each timed request and raw run: the "
                        "server idles between requests, as it does while a real client thinks (default 0: back to back)")
    parser.add_argument("--providers", choices=["auto", "cpu", "cuda"], default="cpu")
    parser.add_argument("--intra-op-threads", type=int, default=2, help="raw session and FACE_INTRA_OP_THREADS")
    parser.add_argument("--spinning", choices=["on", "off"], default="on",
                        help="off: the raw session and the servers (FACE_INTRA_OP_SPINNING=false; a baseline "
                        "without that setting ignores it) run onnxruntime's intra-op pool without spinning; "
                        "the raw session with spinning is then timed too, as `raw_spinning`")
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help="set in the environment of this checkout's server only (not the baseline's, not the raw "
                             "session's), e.g. GLIBC_TUNABLES=glibc.malloc.hugetlb=1 against --baseline HEAD")
    parser.add_argument("--tls", action="store_true",
                        help="this checkout's server serves HTTPS (a self-signed certificate made here; the timed "
                        "connection is kept alive, so one handshake): against --baseline HEAD, what TLS costs a request")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--requests", type=int, default=100, help="timed requests (and raw runs) per variant per round")
    parser.add_argument("--output", type=Path, help="JSON path (default: bench/results/overhead_<device>.json)")
    args = parser.parse_args()

    from bench.embed_throughput import choose_providers
    from service.model.prepare import default_model

    scratch = tempfile.TemporaryDirectory(prefix="face-overhead-model-")
    if args.model == "tiny":
        from harness.models import tiny_model

        model = tiny_model(Path(scratch.name) / "tiny.onnx")
    else:
        model = Path(args.model) if args.model else default_model(MODEL_CACHE)
    providers = choose_providers(args.providers)
    spinning = args.spinning == "on"
    session = FaceSession(model, providers=providers,
                          options=SessionOptions(intra_op_threads=args.intra_op_threads, spinning=spinning))
    raws = {"raw": session}
    if not spinning:
        raws["raw_spinning"] = FaceSession(model, providers=providers,
                                           options=SessionOptions(intra_op_threads=args.intra_op_threads))
    face_file = sorted(FACES.glob("*.jpg"))[0]
    from PIL import Image

    pixels = np.asarray(Image.open(face_file).convert("RGB"))[None]
    tensor = session.preprocess(pixels)
    body = json.dumps({"images": [base64.b64encode(face_file.read_bytes()).decode()]}).encode()
    env = {"FACE_PROVIDERS": args.providers, "FACE_INTRA_OP_THREADS": str(args.intra_op_threads)}
    if not spinning:
        env["FACE_INTRA_OP_SPINNING"] = "false"
    device = "cpu" if session.providers[0] == CPU else "cuda"

    result: dict = {"benchmark": "overhead", "machine": machine(),
                    "config": {"model": str(model), "model_id": session.contract.model_id,
                               "providers": session.providers, "intra_op_threads": args.intra_op_threads,
                               "rounds": args.rounds, "requests_per_round": args.requests, "face": face_file.name,
                               "body_bytes": len(body), "server_env": env, "client": "http.client, keep-alive",
                               "think_ms": args.think_ms, "spinning": args.spinning,
                               "current_server_env": dict(item.split("=", 1) for item in args.server_env),
                               "current": current_commit()}}
    with tempfile.TemporaryDirectory(prefix="face-overhead-") as tmp:
        work = Path(tmp)
        current_env = {**env, **result["config"]["current_server_env"]}
        if args.tls:
            from harness.tls import write_pair

            write_pair(work / "tls.crt", work / "tls.key", serial=1)
            current_env |= {"FACE_TLS_CERT_FILE": str(work / "tls.crt"), "FACE_TLS_KEY_FILE": str(work / "tls.key")}
            result["config"]["current_tls"] = "self-signed P-256 certificate, TLS 1.3, one kept-alive connection"
        servers = [Server("current", REPO, model, current_env, work)]
        if args.baseline:
            source = work / "baseline"
            source.mkdir()
            result["config"]["baseline"] = {"ref": args.baseline, "commit": unpack(args.baseline, source)}
            servers.append(Server("baseline", source, model, env, work))
        try:
            for server in servers:
                server.wait_ready(timeout=300)
            variants = list(raws) + [s.name for s in servers]
            samples: dict[str, list[float]] = {v: [] for v in variants}
            rounds = []
            for r in range(args.rounds):
                order = variants[r % len(variants):] + variants[: r % len(variants)]  # rotate who goes first
                p50, cpu, loop_cpu = {}, {}, {}
                for variant in order:
                    if variant in raws:
                        timed = time_raw(raws[variant], tensor, args.requests, args.think_ms / 1000)
                    else:
                        timed = time_http(next(s for s in servers if s.name == variant), body, args.requests,
                                          pause=args.think_ms / 1000)
                    samples[variant] += timed.latencies
                    p50[variant] = percentile_ms(timed.latencies, 50)
                    cpu[variant] = round(timed.cpu_ms, 3)
                    if timed.loop_cpu_ms is not None:
                        loop_cpu[variant] = round(timed.loop_cpu_ms, 3)
                row = {"order": order, "p50_ms": p50, "cpu_ms": cpu, "loop_cpu_ms": loop_cpu,
                       "load_average": [round(x, 2) for x in os.getloadavg()],
                       "overhead_ms": {s.name: round(p50[s.name] - p50["raw"], 3) for s in servers},
                       "cpu_overhead_ms": {s.name: round(cpu[s.name] - cpu["raw"], 3) for s in servers}}
                rounds.append(row)
                print(f"round {r + 1}/{args.rounds}: p50 " + "  ".join(f"{v} {p50[v]:.2f}" for v in variants)
                      + " | overhead " + "  ".join(f"{k} {v:.2f}" for k, v in row["overhead_ms"].items())
                      + " | cpu/request " + "  ".join(f"{v} {cpu[v]:.2f}" for v in variants)
                      + " | loop cpu/request " + "  ".join(f"{k} {v:.2f}" for k, v in loop_cpu.items()), flush=True)
            # transparent huge pages each server's memory got (GLIBC_TUNABLES=glibc.malloc.hugetlb=1 asks for them)
            result["anon_huge_pages_kb"] = {s.name: anon_huge_pages_kb(s.proc.pid) for s in servers}
        finally:
            for server in servers:
                server.stop()
    summary = {
        "p50_ms_median_of_rounds": {v: round(statistics.median(r["p50_ms"][v] for r in rounds), 3) for v in variants},
        "overhead_ms_median_of_rounds": {s.name: round(statistics.median(r["overhead_ms"][s.name] for r in rounds), 3)
                                         for s in servers},
        "cpu_ms_median_of_rounds": {v: round(statistics.median(r["cpu_ms"][v] for r in rounds), 3) for v in variants},
        "cpu_overhead_ms_median_of_rounds": {
            s.name: round(statistics.median(r["cpu_overhead_ms"][s.name] for r in rounds), 3) for s in servers},
        # the event loop's CPU per request: the Python work per request, with the session's run left out
        "loop_cpu_ms_median_of_rounds": {
            s.name: round(statistics.median(r["loop_cpu_ms"][s.name] for r in rounds), 3) for s in servers},
        "load_average_median_of_rounds": round(statistics.median(r["load_average"][0] for r in rounds), 2),
        # p10 and min: less moved by other work on the machine than p50 (load only ever adds time)
        "pooled": {v: {"p50_ms": percentile_ms(samples[v], 50), "p99_ms": percentile_ms(samples[v], 99),
                       "p10_ms": percentile_ms(samples[v], 10), "min_ms": round(min(samples[v]) * 1000, 3),
                       "n": len(samples[v])} for v in variants},
    }
    pooled = summary["pooled"]
    for stat in ("p50_ms", "p10_ms", "min_ms"):
        summary[f"pooled_overhead_{stat}"] = {s.name: round(pooled[s.name][stat] - pooled["raw"][stat], 3)
                                              for s in servers}
    result["rounds"] = rounds
    result["summary"] = summary
    print(json.dumps(summary, indent=2))
    print(f"saved {save(f'overhead_{device}', result, args.output)}")
    scratch.cleanup()


if __name__ == "__main__":
    main()
