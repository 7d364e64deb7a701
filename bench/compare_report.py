"""The migration's comparison report (service/jobs/compare.py) at size: how long the exact
leave-one-face-out rank-1 of two collections takes and how much memory it holds.

Seeds two embedded collections through the backend interface (``import_identities``): A with
``--faces`` synthetic faces (``--faces-per-identity`` per identity, clustered, 128-d) and B with the
same identities on another "model" (64-d, its own clusters), as a migration leaves them; then runs
``compare_collections(A, B)`` with ``--max-probes``. Memory: tracemalloc's peak during the
comparison (numpy's buffers are traced), against what holding one whole collection would take.

    nice -n 10 python -m bench.compare_report [--faces 10000 100000] [--max-probes 10000]

Saves bench/results/compare_report.json (or --output).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from bench.common import machine, save
from service.config import Settings
from service.gallery.api import Galleries
from service.gallery.open import make_gallery
from service.jobs.compare import compare_collections

OLD, OLD_DIM = "bench-old@1", 128
NEW, NEW_DIM = "bench-new@1", 64


def seed(galleries: Galleries, name: str, model_id: str, dim: int, identities: int, per: int, rng) -> float:
    galleries.create_collection(name, model_id=model_id, dim=dim)
    gallery = galleries.collection(name)
    started = time.perf_counter()
    for start in range(0, identities, 1000):
        count = min(1000, identities - start)
        centres = rng.normal(size=(count, 1, dim))
        faces = centres + 1.2 * rng.normal(size=(count, per, dim))  # loose clusters: rank-1 below 1 at size
        faces = (faces / np.linalg.norm(faces, axis=-1, keepdims=True)).astype(np.float32)
        gallery.import_identities([(f"id{start + i:07d}", faces[i], None) for i in range(count)])
    return time.perf_counter() - started


def run(size: int, per: int, max_probes: int) -> dict:
    rng = np.random.default_rng(size)
    identities = size // per
    with tempfile.TemporaryDirectory() as tmp:
        galleries = make_gallery(Settings(data_dir=Path(tmp) / "data", snapshot_interval_s=0), OLD, OLD_DIM,
                                 served={OLD: OLD_DIM, NEW: NEW_DIM})
        galleries.open()
        try:
            seed_s = seed(galleries, "a", OLD, OLD_DIM, identities, per, rng)
            seed(galleries, "b", NEW, NEW_DIM, identities, per, rng)
            load = os.getloadavg()
            tracemalloc.start()
            started = time.perf_counter()
            report = compare_collections(galleries.collection("a"), galleries.collection("b"), max_probes=max_probes)
            seconds = time.perf_counter() - started
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        finally:
            galleries.close()
    out = report.as_dict()
    out.pop("changed")
    return {"faces": size, "identities": identities, "seed_seconds_a": round(seed_s, 1),
            "compare_seconds": round(seconds, 2), "peak_traced_mb": round(peak / 2**20, 1),
            "whole_collection_a_mb": round(size * OLD_DIM * 4 / 2**20, 1),
            "multiply_adds": report.source.probes * size * OLD_DIM + report.target.probes * size * NEW_DIM,
            "load_average_before": load, "load_average_after": os.getloadavg(), "report": out}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--faces-per-identity", type=int, default=4)
    parser.add_argument("--max-probes", type=int, default=10_000)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    runs = []
    for size in args.faces:
        runs.append(run(size, args.faces_per_identity, args.max_probes))
        print(f"{size} faces: compare {runs[-1]['compare_seconds']} s, peak {runs[-1]['peak_traced_mb']} MB, "
              f"load {runs[-1]['load_average_after'][0]:.2f}", flush=True)
    path = save("compare_report", {
        "benchmark": "compare_report", "machine": machine(),
        "config": {"faces": args.faces, "faces_per_identity": args.faces_per_identity,
                   "max_probes": args.max_probes, "backend": "embedded", "dims": [OLD_DIM, NEW_DIM],
                   "note": "shared machine (2 cores, other engineers' jobs running): see the load averages"},
        "runs": runs}, args.output)
    print(path)


if __name__ == "__main__":
    main()
