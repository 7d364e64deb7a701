"""What a collection's face limit (max_faces) costs the enrollments into it.

For each backend (embedded; PostgreSQL with ``--postgres``, a throwaway server of harness/pg.py): two
collections, one without a limit and one with a limit it never reaches (so every enroll pays the check
and none is refused), each enrolled into by ``--writers`` threads at once, one new 1-face identity after
another, for ``--seconds``; the two are run in turn, ``--rounds`` times (interleaved, so drift in the
machine's load falls on both). On PostgreSQL a write that adds faces to a limited collection takes the
collection's quota lock (pg_advisory_xact_lock): writers into one limited collection queue there, which
is the price measured here. Reports enrolls per second and the enroll latency (p50, p99) of each.

    nice -n 19 python -m bench.collection_limit [--writers 8] [--seconds 5] [--rounds 2] [--postgres]

Saves bench/results/collection_limit.json.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import machine, per_backend, percentiles, save
from service.config import Settings
from service.gallery.open import make_gallery

MODEL = "bench@1"


def one_round(collection, writers: int, seconds: float, dim: int, tag: str) -> tuple[int, list[float]]:
    """``writers`` threads enrolling for ``seconds``: how many enrolls were made, and their latencies (ms)."""
    latencies: list[list[float]] = [[] for _ in range(writers)]
    barrier = threading.Barrier(writers)
    deadline: list[float] = []

    def write(n: int) -> None:
        rng = np.random.default_rng(n)
        barrier.wait()
        if n == 0:
            deadline.append(time.monotonic() + seconds)
        while not deadline:
            time.sleep(0.001)
        i = 0
        while time.monotonic() < deadline[0]:
            v = rng.normal(size=(1, dim)).astype(np.float32)
            t = time.perf_counter()
            collection.enroll(f"{tag}-{n}-{i}", v / np.linalg.norm(v))
            latencies[n].append((time.perf_counter() - t) * 1000)
            i += 1

    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [x for per in latencies for x in per]
    return len(flat), flat


def run(settings: Settings, args: argparse.Namespace) -> dict:
    galleries = make_gallery(settings, MODEL, args.dim)
    galleries.open()
    try:
        galleries.create_collection("free")
        galleries.create_collection("limited", max_faces=10**12)  # never reached: every write checks, none refused
        found: dict[str, dict] = {"free": {"enrolls": 0, "seconds": 0.0, "ms": []},
                                  "limited": {"enrolls": 0, "seconds": 0.0, "ms": []}}
        for r in range(args.rounds):
            for name in ("free", "limited"):
                made, ms = one_round(galleries.collection(name), args.writers, args.seconds, args.dim, f"r{r}")
                found[name]["enrolls"] += made
                found[name]["seconds"] += args.seconds
                found[name]["ms"] += ms
        out = {name: {"enrolls_per_s": round(v["enrolls"] / v["seconds"], 1), "enrolls": v["enrolls"],
                      "enroll_ms": percentiles(v["ms"], (50, 99))} for name, v in found.items()}
        out["limited_vs_free"] = round(out["limited"]["enrolls_per_s"] / out["free"]["enrolls_per_s"], 3)
        return out
    finally:
        galleries.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--postgres", action="store_true")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    results = per_backend(args.postgres, lambda settings: run(settings, args))
    path = save("collection_limit", {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                     "results": results, "machine": machine()}, args.output)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
