"""Embedding throughput: raw onnxruntime session (fp32 and fp16) against end-to-end HTTP /embed.

1. Raw session: the model's ONNX session alone (input already preprocessed, output not
   normalised) at batch 1, 8, 32, 64, 128, 256, for the fp32 model and its fp16 variant (made with
   ``service.model.fp16``, parity-checked). Providers: CUDA when onnxruntime has it, else CPU.
2. End to end: the script starts the real server (``python -m service``, the batcher settings from
   the command line) and drives POST /embed with 1, 8, 32 and 128 concurrent clients (asyncio + httpx,
   spread over client processes so the client is not the bottleneck), with 1 face and with 32 faces
   per request (real LFW crops, base64 JPEG). Reports faces/s, p50/p99 request latency, the mean
   batch the server really formed (from /metrics), and the ratio to the raw session figure at that
   batch size. The 1-client/1-face run gives the single-face latency.

    python -m bench.embed_throughput                  # everything, default model (SFace)
    python -m bench.embed_throughput --quick          # a short CPU run
    python -m bench.embed_throughput --model m.onnx --batch-sizes 1,32,256 --batch-max-size 256

Results: printed as a table and saved as JSON in bench/results/embed_throughput_<device>_<model>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import multiprocessing
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import machine, percentile_ms, save
from harness.fixtures import FACES
from service.model.contract import read_contract
from service.model.fp16 import make_fp16_variant
from service.model.session import CPU, CUDA, FaceSession, ProviderChoice, ProviderError, SessionOptions
from service.model.session import choose_providers as session_providers

# a slow CPU needs minutes to drain 128 clients x 32 faces after each point; --quick skips those
QUICK_MAX_IN_FLIGHT = 1024


# --- helpers ---------------------------------------------------------------------------------
def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def load_face_images(limit: int = 64) -> tuple[list[bytes], np.ndarray]:
    from PIL import Image

    files = sorted(FACES.glob("*.jpg"))[:limit]
    encoded = [f.read_bytes() for f in files]
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    return encoded, pixels


def gpu_name() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def choose_providers(requested: str) -> list:
    """The providers the service would use for FACE_PROVIDERS=requested (CUDA options as its defaults)."""
    try:
        return session_providers(ProviderChoice(providers=requested))  # type: ignore[arg-type]
    except ProviderError as e:
        raise SystemExit(f"--providers {requested}: {e}") from e


# --- raw session -----------------------------------------------------------------------------
def raw_session(model: Path, faces: np.ndarray, batch_sizes: list[int], providers: list, seconds: float,
                intra_op_threads: int) -> dict:
    session = FaceSession(model, providers=providers, options=SessionOptions(intra_op_threads=intra_op_threads))
    contract = session.contract
    used = session.providers
    if providers[0] != CPU and used[0] != CUDA:
        raise SystemExit(f"CUDA was requested but the session runs on {used}")
    results = []
    for batch in batch_sizes:
        tensor = session.preprocess(faces[np.arange(batch) % len(faces)])  # outside the timed loop
        for _ in range(3):  # allocation, cuDNN algorithm choice
            session.run(tensor)
        times = []
        started = time.perf_counter()
        while time.perf_counter() - started < seconds or len(times) < 5:
            t0 = time.perf_counter()
            session.run(tensor)  # onnxruntime's run alone on the preprocessed tensor
            times.append(time.perf_counter() - t0)
        total = sum(times)
        results.append({"batch": batch, "runs": len(times), "images_per_s": round(batch * len(times) / total, 1),
                        "p50_ms": percentile_ms(times, 50), "p99_ms": percentile_ms(times, 99)})
        print(f"  raw {contract.model_version:<24} batch {batch:>4}: {results[-1]['images_per_s']:>9.1f} img/s  "
              f"p50 {results[-1]['p50_ms']:.2f} ms", flush=True)
    return {"model": str(model), "model_id": contract.model_id, "providers": used, "by_batch": results}


# --- HTTP clients (run in worker processes) --------------------------------------------------
async def _client_loop(url: str, body: bytes, clients: int, warmup: float, seconds: float) -> dict:
    import httpx

    latencies: list[float] = []  # of the requests that completed inside the measurement window
    errors = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as http:
        start = time.perf_counter()
        measure_from, stop_at = start + warmup, start + warmup + seconds

        async def one_client() -> None:
            nonlocal errors
            headers = {"content-type": "application/json"}
            while (sent := time.perf_counter()) < stop_at:
                try:
                    response = await http.post("/embed", content=body, headers=headers)
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                done = time.perf_counter()
                if not ok:
                    errors += 1
                elif measure_from <= done <= stop_at:  # throughput = completions per second of the window
                    latencies.append(done - sent)

        await asyncio.gather(*(one_client() for _ in range(clients)))
    return {"latencies": latencies, "errors": errors}


def _client_process(args: tuple) -> dict:
    return asyncio.run(_client_loop(*args))


def batch_histogram(url: str) -> tuple[float, float]:
    """(sum, count) of the server's face_inference_batch_size histogram."""
    import httpx

    text = httpx.get(url + "/metrics", timeout=10).text
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("face_inference_batch_size_sum"):
            total = float(line.split()[-1])
        elif line.startswith("face_inference_batch_size_count"):
            count = float(line.split()[-1])
    return total, count


def http_run(url: str, encoded: list[bytes], clients: int, faces_per_request: int, seconds: float, warmup: float,
             client_processes: int, pool) -> dict:
    images = [base64.b64encode(encoded[i % len(encoded)]).decode() for i in range(faces_per_request)]
    body = json.dumps({"images": images}).encode()
    procs = max(1, min(client_processes, clients))
    shares = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    before = batch_histogram(url)
    started = time.perf_counter()
    parts = pool.map(_client_process, [(url, body, share, warmup, seconds) for share in shares])
    wall = time.perf_counter() - started
    after = batch_histogram(url)
    latencies = [x for part in parts for x in part["latencies"]]
    errors = sum(part["errors"] for part in parts)
    batches = after[1] - before[1]
    return {
        "clients": clients, "faces_per_request": faces_per_request, "client_processes": procs,
        "requests": len(latencies), "errors": errors,
        "faces_per_s": round(len(latencies) * faces_per_request / seconds, 1),
        "requests_per_s": round(len(latencies) / seconds, 1),
        "p50_ms": percentile_ms(latencies, 50), "p99_ms": percentile_ms(latencies, 99),
        "mean_server_batch": round((after[0] - before[0]) / batches, 2) if batches else None,
        "wall_s": round(wall, 2),
        # completions arrive in bursts one latency apart: a window of few latencies miscounts them
        "window_too_short": bool(latencies) and percentile_ms(latencies, 50) > seconds * 1000 / 5,
    }


def raw_at(raw: dict, batch: float | None) -> dict | None:
    """The raw figure at the largest measured batch size not above ``batch``."""
    rows = raw["by_batch"]
    if batch is None:
        return None
    fitting = [r for r in rows if r["batch"] <= max(batch, rows[0]["batch"])]
    return max(fitting, key=lambda r: r["batch"])


# --- main ------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="ONNX model (default: the prepared SFace)")
    parser.add_argument("--providers", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--batch-sizes", type=parse_ints, default=[1, 8, 32, 64, 128, 256])
    parser.add_argument("--clients", type=parse_ints, default=[1, 8, 32, 128])
    parser.add_argument("--faces-per-request", type=parse_ints, default=[1, 32])
    parser.add_argument("--seconds", type=float, default=10.0, help="measurement time per point")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of HTTP load before measuring")
    parser.add_argument("--batch-max-size", type=int, default=None, help="FACE_BATCH_MAX_SIZE (default: largest batch size)")
    parser.add_argument("--batch-max-wait-ms", type=float, default=2.0, help="FACE_BATCH_MAX_WAIT_MS")
    parser.add_argument("--batch-workers", type=int, default=None, help="FACE_BATCH_WORKERS (default: 2 on CUDA, 1 on CPU)")
    parser.add_argument("--intra-op-threads", type=int, default=0, help="FACE_INTRA_OP_THREADS / raw session (0 = ORT default)")
    parser.add_argument("--client-processes", type=int, default=None,
                        help="processes driving the HTTP clients (default: cores // 4, at least 1)")
    parser.add_argument("--no-fp16", action="store_true", help="skip the fp16 variant")
    parser.add_argument("--no-http", action="store_true", help="raw session figures only")
    parser.add_argument("--quick", action="store_true",
                        help="short CPU run: batch <= 32, fp16 at batch <= 8, 5 s per point, HTTP points with "
                             f"more than {QUICK_MAX_IN_FLIGHT} faces in flight skipped")
    parser.add_argument("--output", type=Path, help="JSON path (default: bench/results/embed_throughput_<device>_<model>.json)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.quick:
        args.batch_sizes = [b for b in args.batch_sizes if b <= 32] or [1, 8, 32]
        args.seconds, args.warmup = min(args.seconds, 5.0), min(args.warmup, 1.0)

    from harness.server import MODEL_CACHE, ServerProcess
    from service.model.prepare import default_model

    model = args.model or default_model(MODEL_CACHE)
    contract = read_contract(model)
    providers = choose_providers(args.providers)
    on_gpu = providers[0] != CPU
    device_kind = f"cuda-{slug(gpu_name() or 'gpu')}" if on_gpu else "cpu"
    batch_max = args.batch_max_size or max(args.batch_sizes)
    batch_workers = args.batch_workers or (2 if on_gpu else 1)
    client_processes = args.client_processes or max(1, (os.cpu_count() or 4) // 4)
    encoded, pixels = load_face_images()

    import onnxruntime as ort

    print(f"model {contract.model_id} ({model}); providers {[p if isinstance(p, str) else p[0] for p in providers]}")
    result: dict = {
        "benchmark": "embed_throughput",
        "machine": {**machine(), "gpu_name": gpu_name(), "onnxruntime_device": ort.get_device(),
                    "onnxruntime_available_providers": ort.get_available_providers(),
                    "onnxruntime": ort.__version__, "numpy": np.__version__},
        "config": {"model": str(model), "model_id": contract.model_id, "device_kind": device_kind,
                   "providers_requested": args.providers, "batch_sizes": args.batch_sizes, "clients": args.clients,
                   "faces_per_request": args.faces_per_request, "seconds_per_point": args.seconds,
                   "warmup_s": args.warmup, "batch_max_size": batch_max, "batch_max_wait_ms": args.batch_max_wait_ms,
                   "batch_workers": batch_workers, "intra_op_threads": args.intra_op_threads,
                   "client_processes": client_processes, "quick": args.quick, "faces": len(encoded)},
    }

    print("raw session, fp32", flush=True)
    result["raw_fp32"] = raw_session(model, pixels, args.batch_sizes, providers, args.seconds, args.intra_op_threads)
    if not args.no_fp16:
        fp16_path = Path(tempfile.gettempdir()) / "face-bench" / f"{slug(contract.model_id)}-fp16" / "model.onnx"
        made = make_fp16_variant(model, fp16_path, FACES, reuse=True)
        fp16_batches = [b for b in args.batch_sizes if b <= 8] if args.quick and not on_gpu else args.batch_sizes
        print("raw session, fp16", flush=True)
        result["raw_fp16"] = raw_session(fp16_path, pixels, fp16_batches, providers, args.seconds, args.intra_op_threads)
        result["raw_fp16"]["parity_min_cosine"] = made.parity.min_cosine
        fp32_by_batch = {r["batch"]: r["images_per_s"] for r in result["raw_fp32"]["by_batch"]}
        result["fp16_speedup"] = {str(r["batch"]): round(r["images_per_s"] / fp32_by_batch[r["batch"]], 3)
                                  for r in result["raw_fp16"]["by_batch"]}

    if not args.no_http:
        env = {"FACE_BATCH_MAX_SIZE": str(batch_max), "FACE_BATCH_MAX_WAIT_MS": str(args.batch_max_wait_ms),
               "FACE_BATCH_WORKERS": str(batch_workers), "FACE_INTRA_OP_THREADS": str(args.intra_op_threads),
               "FACE_PROVIDERS": "cuda" if on_gpu else "cpu", "FACE_LOG_LEVEL": "warning",
               "FACE_MAX_FACES_PER_REQUEST": str(max(64, max(args.faces_per_request)))}
        result["config"]["server_env"] = env
        runs = []
        with tempfile.TemporaryDirectory() as tmp:
            server = ServerProcess(Path(tmp) / "data", model=model, env=env, log_path=Path(tmp) / "server.log")
            try:
                ready = server.wait_ready(timeout=300)
                result["server_providers"] = ready["providers"]
                context = multiprocessing.get_context("spawn")
                with context.Pool(client_processes) as pool:
                    for per_request in args.faces_per_request:
                        for clients in args.clients:
                            if args.quick and clients * per_request > QUICK_MAX_IN_FLIGHT:
                                print(f"  http {clients:>3} clients x {per_request:>2} faces: skipped (--quick)")
                                continue
                            run = http_run(server.url, encoded, clients, per_request, args.seconds, args.warmup,
                                           client_processes, pool)
                            reference = raw_at(result["raw_fp32"], run["mean_server_batch"])
                            if reference:
                                run["raw_batch"] = reference["batch"]
                                run["raw_images_per_s"] = reference["images_per_s"]
                                run["ratio_to_raw"] = round(run["faces_per_s"] / reference["images_per_s"], 3)
                            runs.append(run)
                            print(f"  http {clients:>3} clients x {per_request:>2} faces: {run['faces_per_s']:>9.1f} "
                                  f"faces/s  p50 {run['p50_ms']:.2f} ms  p99 {run['p99_ms']:.2f} ms  "
                                  f"batch {run['mean_server_batch']}  ratio {run.get('ratio_to_raw')}", flush=True)
            finally:
                server.stop()
        result["http"] = runs
        single = next((r for r in runs if r["clients"] == 1 and r["faces_per_request"] == 1), None)
        if single:
            result["single_face"] = {"p50_ms": single["p50_ms"], "p99_ms": single["p99_ms"]}
        result["saturation"] = max(runs, key=lambda r: r["faces_per_s"]) if runs else None

    result["table"] = table(result)
    print()
    print(result["table"])
    name = f"embed_throughput_{device_kind}_{slug(contract.model_name + '-' + contract.model_version)}"
    if args.quick:
        name += "_quick"
    print(f"\nsaved {save(name, result, args.output)}")


def table(result: dict) -> str:
    """Markdown tables of the figures (also stored in the JSON)."""
    lines = ["| raw session | batch | images/s | p50 ms | p99 ms |", "|---|---:|---:|---:|---:|"]
    for key in ("raw_fp32", "raw_fp16"):
        for row in result.get(key, {}).get("by_batch", []):
            lines.append(f"| {key[4:]} | {row['batch']} | {row['images_per_s']:.1f} | {row['p50_ms']:.2f} | "
                         f"{row['p99_ms']:.2f} |")
    if result.get("fp16_speedup"):
        lines.append("")
        lines.append("fp16 / fp32 throughput by batch: " +
                     ", ".join(f"{b}: {s:.2f}x" for b, s in result["fp16_speedup"].items()))
    if result.get("http"):
        lines += ["", "| HTTP /embed | clients | faces/req | faces/s | p50 ms | p99 ms | server batch | raw @ batch | ratio |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for run in result["http"]:
            short = " (window < 5 latencies)" if run.get("window_too_short") else ""
            lines.append(f"| | {run['clients']} | {run['faces_per_request']} | {run['faces_per_s']:.1f}{short} | "
                         f"{run['p50_ms']:.2f} | {run['p99_ms']:.2f} | {run['mean_server_batch']} | "
                         f"{run.get('raw_batch', '-')} ({run.get('raw_images_per_s', '-')}) | {run.get('ratio_to_raw', '-')} |")
        if result.get("single_face"):
            lines.append(f"\none client, one face: p50 {result['single_face']['p50_ms']:.2f} ms, "
                         f"p99 {result['single_face']['p99_ms']:.2f} ms")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
