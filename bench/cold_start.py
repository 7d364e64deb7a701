"""What a process pays before it does anything: the imports of the operator CLI and a server's start.

Every `python -m service gallery ...` call (the operator CLI, and each of the test suite's CLI tests)
and every server start (a replica, a restart after a crash) imports onnx, which imports ml_dtypes. This
times, per variant of the environment, in interleaved rounds (so other load on the machine hits every
variant alike):

* `import onnx` and `import ml_dtypes` alone (`python -c`), wall time;
* `python -m service gallery --help`: the operator CLI up to its answer;
* a server (the default SFace model, an empty gallery) from its start to /healthz 200 and to /readyz
  200 (polled every 10 ms).

A variant is this interpreter with directories put first on PYTHONPATH: `--variant NAME=DIR` (DIR made
with `pip install --target DIR --no-deps PACKAGE==VERSION`), so two versions of one package are compared
in one run with everything else the same. The plain environment is the variant `installed`.

    pip install --target /tmp/ml-dtypes-0.7.0 --no-deps ml_dtypes==0.7.0
    python -m bench.cold_start --variant ml_dtypes-0.7.0=/tmp/ml-dtypes-0.7.0 --rounds 11

Results: printed, and saved in bench/results/cold_start[TAG].json with the machine, each variant's
package versions and the medians over rounds (and every round's figure).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import current_commit, machine, save
from harness.server import MODEL_CACHE, REPO, free_port
from service.model.prepare import default_model

VERSIONS = ("import importlib.metadata as m, json; "
            "print(json.dumps({p: m.version(p) for p in ('ml_dtypes', 'onnx', 'onnxruntime', 'numpy')}))")


def run(env: dict[str, str], *args: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def server_start(env: dict[str, str], model: Path, data_dir: Path) -> tuple[float, float]:
    """Seconds from the server's start to /healthz 200 and to /readyz 200."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port),
                             "--data-dir", str(data_dir), "--model", str(model)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    healthy = None
    try:
        with httpx.Client(timeout=2) as client:
            while time.perf_counter() - started < 300:
                if proc.poll() is not None:
                    raise RuntimeError(f"the server exited with {proc.returncode}")
                try:
                    if healthy is None and client.get(url + "/healthz").status_code == 200:
                        healthy = time.perf_counter() - started
                    if healthy is not None and client.get(url + "/readyz").status_code == 200:
                        return healthy, time.perf_counter() - started
                except httpx.HTTPError:
                    pass
                time.sleep(0.01)
        raise TimeoutError("the server was not ready after 300 s")
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=DIR",
                        help="a variant with DIR first on PYTHONPATH (repeatable); `installed` is always run")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--no-server", action="store_true", help="time the imports and the CLI only")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()

    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    base |= {"FACE_MODEL_CACHE_DIR": str(MODEL_CACHE), "FACE_INTRA_OP_THREADS": "2", "FACE_SNAPSHOT_INTERVAL_S": "0"}
    variants = {"installed": base}
    for spec in args.variant:
        name, _, path = spec.partition("=")
        variants[name] = base | {"PYTHONPATH": str(Path(path).resolve())}
    model = default_model(MODEL_CACHE)
    versions = {name: json.loads(subprocess.run([sys.executable, "-c", VERSIONS], env=env, capture_output=True, text=True,
                                                check=True).stdout) for name, env in variants.items()}
    measures = ["import ml_dtypes", "import onnx", "service gallery --help"] + (
        [] if args.no_server else ["server to /healthz", "server to /readyz"])
    rounds: dict[str, dict[str, list[float]]] = {name: {m: [] for m in measures} for name in variants}
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="cold-start-") as tmp:
        for r in range(args.rounds):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))  # neither always goes first
            for name in order:
                env, got = variants[name], rounds[name]
                got["import ml_dtypes"].append(run(env, "-c", "import ml_dtypes"))
                got["import onnx"].append(run(env, "-c", "import onnx"))
                got["service gallery --help"].append(run(env, "-m", "service", "gallery", "--help"))
                if not args.no_server:
                    healthy, ready = server_start(env, model, Path(tmp) / f"{name}-{r}")
                    got["server to /healthz"].append(healthy)
                    got["server to /readyz"].append(ready)
            load.append(os.getloadavg()[0])
            print(f"round {r + 1}/{args.rounds}: " + "; ".join(
                f"{name} " + ", ".join(f"{m} {rounds[name][m][-1]:.2f}" for m in measures) for name in variants),
                flush=True)
    medians = {name: {m: round(statistics.median(v), 3) for m, v in got.items()} for name, got in rounds.items()}
    for name, got in medians.items():
        print(f"{name} ({versions[name]}): " + ", ".join(f"{m} {s:.3f} s" for m, s in got.items()))
    path = save(f"cold_start{args.tag}", {
        "machine": machine(), "commit": current_commit(), "rounds": args.rounds, "load_average_1m": load,
        "variants": {name: {"pythonpath": env.get("PYTHONPATH"), "versions": versions[name]}
                     for name, env in variants.items()},
        "median_s": medians, "rounds_s": rounds,
    })
    print(f"saved {path}")


if __name__ == "__main__":
    main()
