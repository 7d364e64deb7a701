"""A search that widens to the whole embedded gallery: what hnswlib does there, and what the exact
fallback (service.gallery.embedded.index.exact_nearest over the store's faces) costs.

Builds a gallery of ``--identities`` x ``--faces-per-identity`` faces clustered around their
identity (unit centres plus N(0, 0.05) noise per value, as issue 19's real SFace + noise gallery),
then times stranger probes at top_k 5 through ``Gallery.search`` (which widens to every face and falls
back to the exact scan when hnswlib cannot return them) and, per probe, the parts:

* ``hnsw_quarter``: hnswlib ``knn_query`` for a quarter of the live faces (the widening step before);
* ``hnsw_all``: ``knn_query`` for every live face (counted when it raises, as it does on these graphs);
* ``exact_store``: the exact scan over the store's faces (SQLite, in chunks), the fallback used;
* ``exact_get_items``: the same scan over vectors fetched from hnswlib (``get_items``), the alternative.

    nice -n 10 python -m bench.whole_gallery_search [--identities 4] [--faces-per-identity 2500]

Saves bench/results/whole_gallery_search_<faces>.json.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import machine, percentiles, save
from service.gallery import Gallery, GalleryOptions
from service.gallery.embedded.index import exact_nearest


def timed(fn, *args, **kwargs) -> tuple[float, bool]:  # type: ignore[no-untyped-def]
    """Milliseconds of one call, and whether it returned (False: it raised RuntimeError, as hnswlib does)."""
    t = time.perf_counter()
    try:
        fn(*args, **kwargs)
        ok = True
    except RuntimeError:
        ok = False
    return (time.perf_counter() - t) * 1000, ok


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--identities", type=int, default=4)
    parser.add_argument("--faces-per-identity", type=int, default=2500)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--probes", type=int, default=20)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(19)
    centres = rng.normal(size=(args.identities, args.dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    with tempfile.TemporaryDirectory() as tmp:
        gallery = Gallery(Path(tmp), "bench@1", args.dim, options=GalleryOptions(snapshot_interval_s=0))
        gallery.open()
        t = time.perf_counter()
        for i, centre in enumerate(centres):
            faces = (centre + rng.normal(0, 0.05, size=(args.faces_per_identity, args.dim))).astype(np.float32)
            gallery.enroll(f"id{i}", faces / np.linalg.norm(faces, axis=1, keepdims=True))
        build_s = time.perf_counter() - t
        index, live = gallery._index, gallery.face_count  # noqa: SLF001 - timing the parts
        hnsw = index._live_index  # noqa: SLF001
        labels = np.fromiter(gallery._label_identity, dtype=np.int64)  # noqa: SLF001

        def from_hnsw():  # type: ignore[no-untyped-def]
            for start in range(0, len(labels), 10_000):
                part = labels[start:start + 10_000]
                yield part, np.asarray(hnsw.get_items(part), dtype=np.float32)

        times: dict[str, list[float]] = {k: [] for k in ("search", "hnsw_quarter", "hnsw_all", "exact_store",
                                                         "exact_get_items")}
        hnsw_all_failed = 0
        probes = rng.normal(size=(args.probes, args.dim)).astype(np.float32)
        for p in probes[:, None, :]:
            times["search"].append(timed(gallery.search, p, 5)[0])
            times["hnsw_quarter"].append(timed(hnsw.knn_query, p, k=live // 4)[0])
            ms, ok = timed(hnsw.knn_query, p, k=live)
            times["hnsw_all"].append(ms)
            hnsw_all_failed += not ok
            times["exact_store"].append(timed(exact_nearest, p, live, gallery._live_faces())[0])  # noqa: SLF001
            times["exact_get_items"].append(timed(exact_nearest, p, live, from_hnsw())[0])
        fallbacks = dict(index.fallbacks)
        gallery.close()

    result = {
        "benchmark": "whole_gallery_search", "machine": machine(), "load_average": os.getloadavg(),
        "config": {**vars(args), "top_k": 5, "noise_sd": 0.05, "m": 16, "ef_construction": 200, "ef_search": "auto"},
        "faces": live, "build_s": round(build_s, 1), "hnsw_all_failed": f"{hnsw_all_failed}/{args.probes}",
        "fallbacks": fallbacks, "ms": {k: percentiles(v) for k, v in times.items()},
    }
    print(result)
    print(save(f"whole_gallery_search_{live}", result))


if __name__ == "__main__":
    main()
