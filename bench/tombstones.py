"""Search latency with deleted faces: tombstones left in the graph (what the old code kept forever)
vs after compaction (what maintenance now does once tombstones dominate).

Builds a gallery of ``--identities`` x ``--faces-per-identity`` synthetic faces, deletes
``--delete-share`` of the identities through ``Gallery.delete`` (the real erase path), times
searches with the tombstones in place (compaction held off), runs one maintenance round
(compaction), times again.

    nice -n 19 python -m bench.tombstones [--identities 2000] [--faces-per-identity 10] [--delete-share 0.999]

Saves bench/results/tombstones.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import machine, save
from service.gallery import Gallery, GalleryOptions


def search_ms(gallery: Gallery, probes: np.ndarray) -> float:
    times = []
    for p in probes:
        t = time.perf_counter()
        gallery.search(p[None], 5)
        times.append((time.perf_counter() - t) * 1000)
    return round(statistics.median(times), 3)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--identities", type=int, default=2000)
    parser.add_argument("--faces-per-identity", type=int, default=10)
    parser.add_argument("--delete-share", type=float, default=0.999)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--probes", type=int, default=300)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    options = GalleryOptions(snapshot_interval_s=0, compact_min_tombstones=10**12)  # compaction held off
    with tempfile.TemporaryDirectory() as tmp:
        gallery = Gallery(Path(tmp), "bench@1", args.dim, options=options)
        gallery.open()
        vectors = rng.normal(size=(args.identities, args.faces_per_identity, args.dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=-1, keepdims=True)
        t = time.perf_counter()
        for start in range(0, args.identities, 500):
            gallery.import_identities([(f"id{i}", vectors[i], None) for i in range(start, min(start + 500, args.identities))])
        build_s = time.perf_counter() - t
        probes = rng.normal(size=(args.probes, args.dim)).astype(np.float32)
        full_ms = search_ms(gallery, probes)
        deleted = int(args.identities * args.delete_share)
        t = time.perf_counter()
        for i in range(deleted):
            gallery.delete(f"id{i}")
        delete_ms = (time.perf_counter() - t) * 1000 / max(deleted, 1)
        stats = gallery.stats()
        tombstoned_ms = search_ms(gallery, probes)
        gallery.options = GalleryOptions(snapshot_interval_s=0)  # the defaults: compact now
        t = time.perf_counter()
        gallery.maintain()
        compact_s = time.perf_counter() - t
        compacted_ms = search_ms(gallery, probes)
        after = gallery.stats()
        gallery.close()
    result = {
        "config": vars(args),
        "build_s": round(build_s, 1),
        "delete_ms_per_identity": round(delete_ms, 2),
        "search_ms_median": {"full_gallery": full_ms, "with_tombstones": tombstoned_ms, "after_compaction": compacted_ms},
        "tombstones_before_compaction": stats["index_tombstones"], "live": stats["index_live"],
        "tombstones_after_compaction": after["index_tombstones"], "compaction_s": round(compact_s, 3),
        "machine": machine(),
    }
    print(result["search_ms_median"], result["tombstones_before_compaction"], "->", result["tombstones_after_compaction"])
    print(f"saved {save('tombstones', result)}")


if __name__ == "__main__":
    main()
