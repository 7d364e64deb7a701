"""How fast a retention sweep erases expired faces, and what it costs the enrollments running beside it.

For each backend (embedded; PostgreSQL with ``--postgres``, a throwaway server of harness/pg.py): a
collection with ``retention_days`` holds ``--identities`` x ``--faces-per-identity`` synthetic faces
(imported); a thread enrolls one new identity after another (2 faces each) the whole time, first
alone (the baseline), then while ``service.gallery.retention.sweep`` erases every imported face as past
its retention (the real path: ``delete_faces`` with an audit entry per face), once per ``--chunks``
value (faces per write: 1 is one transaction per face, the sweep before stop 40; 64 today's), each
on a collection of its own. Reports the sweep's faces per second and the enroll latency (p50, p99,
max) alone and beside the sweep.

    nice -n 19 python -m bench.retention_sweep [--identities 2500] [--faces-per-identity 2] [--chunks 1,64] [--postgres]

Saves bench/results/retention_sweep.json.
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
from service.gallery.retention import CHUNK, DAY_S, sweep

MODEL = "bench@1"


def unit(rng: np.random.Generator, shape: tuple[int, ...], dim: int) -> np.ndarray:
    v = rng.normal(size=(*shape, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def enroll_latencies(collection, rng: np.random.Generator, dim: int, prefix: str, stop: threading.Event,
                     out: list[float]) -> None:
    i = 0
    while not stop.is_set():
        vectors = unit(rng, (2,), dim)
        t = time.perf_counter()
        collection.enroll(f"{prefix}{i}", vectors)
        out.append((time.perf_counter() - t) * 1000)
        i += 1


def run(settings: Settings, args: argparse.Namespace) -> dict:
    """Each ``--chunks`` value on a collection of its own, one after the other, on the same gallery."""
    galleries = make_gallery(settings, MODEL, args.dim)
    galleries.open()
    try:
        return {f"chunk_{chunk}": sweep_once(galleries, args, chunk) for chunk in args.chunks}
    finally:
        galleries.close()


def sweep_once(galleries, args: argparse.Namespace, chunk: int) -> dict:
    rng = np.random.default_rng(0)
    name = f"sweep-{chunk}"
    galleries.create_collection(name, retention_days=1.0)
    collection = galleries.collection(name)
    vectors = unit(rng, (args.identities, args.faces_per_identity), args.dim)
    for start in range(0, args.identities, 500):
        collection.import_identities([(f"old{i}", vectors[i], None)
                                      for i in range(start, min(start + 500, args.identities))])
    alone: list[float] = []
    stop = threading.Event()
    writer = threading.Thread(target=enroll_latencies, args=(collection, rng, args.dim, "alone", stop, alone))
    writer.start()
    time.sleep(args.baseline_s)
    stop.set()
    writer.join()
    beside: list[float] = []
    stop = threading.Event()
    writer = threading.Thread(target=enroll_latencies, args=(collection, np.random.default_rng(1), args.dim,
                                                             "beside", stop, beside))
    cutoff_now = time.time() + DAY_S  # every imported face (and the baseline's) is past a day then
    writer.start()
    t = time.perf_counter()
    swept = sweep(galleries, now=cutoff_now, chunk=chunk)
    sweep_s = time.perf_counter() - t
    stop.set()
    writer.join()
    erased = swept.erased.get(name, 0)
    result = {"faces_erased": erased, "identities_deleted": swept.identities_deleted.get(name, 0),
              "sweep_s": round(sweep_s, 2), "faces_per_s": round(erased / sweep_s, 1),
              "enroll_ms_alone": {**percentiles(alone, (50, 99)), "max_ms": round(max(alone), 2), "n": len(alone)},
              "enroll_ms_beside_sweep": {**percentiles(beside, (50, 99)), "max_ms": round(max(beside), 2),
                                         "n": len(beside)},
              "left_in_collection": collection.face_count}
    galleries.delete_collection(name)  # the next chunk size sweeps only its own collection
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--identities", type=int, default=2500)
    parser.add_argument("--faces-per-identity", type=int, default=2)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--baseline-s", type=float, default=5.0, help="enrolling alone, before the sweep")
    parser.add_argument("--chunks", type=lambda v: [int(c) for c in v.split(",")], default=[1, CHUNK],
                        help="faces erased per write (1: one transaction per face, as before stop 40)")
    parser.add_argument("--postgres", action="store_true")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    results = per_backend(args.postgres, lambda settings: run(settings, args))
    path = save("retention_sweep", {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                    "results": results, "machine": machine()}, args.output)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
