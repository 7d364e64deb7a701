"""What /identify ``among`` costs: reading the listed identities' faces and scoring them exactly, against
a search of the whole collection.

For each backend (embedded; PostgreSQL with ``--postgres``, a throwaway server of harness/pg.py): a
collection of ``--identities`` x ``--faces-per-identity`` synthetic faces (imported); then, for lists of
10, 100 and 1,000 identities (random), ``--repeats`` one-probe searches limited to the list
(``search_among``, what the route does) and as many searches of the whole
collection (``search``, top 5). Reports the latency (p50, p99) of each.

    nice -n 19 python -m bench.identify_among [--identities 10000] [--faces-per-identity 3] [--postgres]

Saves bench/results/identify_among.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench.common import machine, per_backend, percentiles, save
from service.config import Settings
from service.gallery.open import make_gallery

MODEL = "bench@1"
LIST_SIZES = (10, 100, 1000)


def unit(rng: np.random.Generator, shape: tuple[int, ...], dim: int) -> np.ndarray:
    v = rng.normal(size=(*shape, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def run(settings: Settings, args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(0)
    galleries = make_gallery(settings, MODEL, args.dim)
    galleries.open()
    try:
        galleries.create_collection("doors")
        collection = galleries.collection("doors")
        vectors = unit(rng, (args.identities, args.faces_per_identity), args.dim)
        for start in range(0, args.identities, 200):  # PostgreSQL's statement timeout bounds one COPY
            collection.import_identities([(f"p{i:06d}", vectors[i], None)
                                          for i in range(start, min(start + 200, args.identities))])
        out: dict = {}
        whole: list[float] = []
        for _ in range(args.repeats):
            probe = unit(rng, (1,), args.dim)
            t = time.perf_counter()
            collection.search(probe, 5)
            whole.append((time.perf_counter() - t) * 1000)
        out["whole_collection_top5_ms"] = percentiles(whole, (50, 99))
        for size in LIST_SIZES:
            among: list[float] = []
            for _ in range(args.repeats):
                names = [f"p{i:06d}" for i in rng.choice(args.identities, size=size, replace=False)]
                probe = unit(rng, (1,), args.dim)
                t = time.perf_counter()
                collection.search_among(probe, names, 5)
                among.append((time.perf_counter() - t) * 1000)
            out[f"among_{size}_ms"] = percentiles(among, (50, 99))
        return out
    finally:
        galleries.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--identities", type=int, default=10_000)
    parser.add_argument("--faces-per-identity", type=int, default=3)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--postgres", action="store_true")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    results = per_backend(args.postgres, lambda settings: run(settings, args))
    path = save("identify_among", {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                   "results": results, "machine": machine()}, args.output)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
