"""What collections cost on the embedded backend (issue 20), measured in-process (no HTTP):

* per call: a search through a collection handle (``EmbeddedGalleries.collection``, what a request
  gets) vs the bare ``EmbeddedGallery`` over the same Gallery, interleaved rounds, median of rounds;
* per enroll: with an actor (the audit entry in the same SQLite transaction) vs without;
* idle collections: threads, Gallery objects (each holds an index) and RSS (glibc may keep freed
  memory: the object count is the figure) with ``--collections`` small collections open, then after they
  were closed for idleness, and the first call on a closed one (open + snapshot load + search).

    nice -n 10 python -m bench.collections_embedded [--faces 10000] [--collections 50]

Saves bench/results/collections_embedded.json (with the load average: the machine may be shared).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import current_commit, machine, rss_mb, save
from service.config import Settings
from service.gallery.api import DEFAULT_COLLECTION, Actor
from service.gallery.embedded.backend import EmbeddedGallery
from service.gallery.embedded.galleries import EmbeddedGalleries
from service.gallery.embedded.gallery import Gallery
from service.gallery.open import make_gallery

DIM = 128


def units(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def open_galleries() -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, Gallery) and o.store is not None)


def per_call_us(call, probes: np.ndarray) -> float:
    t = time.perf_counter()
    for p in probes:
        call(p[None], 5)
    return (time.perf_counter() - t) / len(probes) * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=int, default=10_000, help="faces in the default collection")
    parser.add_argument("--collections", type=int, default=50, help="small collections opened then left idle")
    parser.add_argument("--faces-per-collection", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp) / "data", collection_idle_s=3600, snapshot_interval_s=0)
        galleries = make_gallery(settings, "bench@1", DIM)
        assert isinstance(galleries, EmbeddedGalleries)
        galleries.open()
        handle = galleries.collection(DEFAULT_COLLECTION)
        vectors = units(rng, args.faces)
        for start in range(0, args.faces, 1000):
            handle.import_identities([(f"id{i}", vectors[i:i + 1], None) for i in range(start, start + 1000)])
        bare = EmbeddedGallery(galleries._entries[DEFAULT_COLLECTION].gallery)  # noqa: SLF001 - the same Gallery
        probes = units(rng, args.probes)
        via_handle, via_bare = [], []
        for _ in range(args.rounds):  # interleaved: the machine's load hits both alike
            via_bare.append(per_call_us(bare.search, probes))
            via_handle.append(per_call_us(lambda p, k: galleries.collection(DEFAULT_COLLECTION).search(p, k), probes))

        enroll_plain, enroll_audited = [], []
        actor = Actor(key_id="bench", client="127.0.0.1", request_id="r")
        for i in range(200):
            v = units(rng, 1)
            t = time.perf_counter()
            handle.enroll(f"e{i}", v)
            enroll_plain.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            handle.enroll(f"a{i}", v, actor=actor)
            enroll_audited.append((time.perf_counter() - t) * 1000)

        threads_before, rss_before = len(threading.enumerate()), rss_mb()
        small = units(rng, args.faces_per_collection)
        for c in range(args.collections):
            galleries.create_collection(f"c{c}")
            galleries.collection(f"c{c}").import_identities(
                [(f"p{i}", small[i:i + 1], None) for i in range(args.faces_per_collection)])
        open_now = len(galleries.open_collections())
        threads_open, rss_open = len(threading.enumerate()), rss_mb()
        galleries.idle_s = 0.5  # now let them go idle
        deadline = time.monotonic() + 120
        while open_galleries() > 1 and time.monotonic() < deadline:  # closed, not merely being closed
            time.sleep(0.2)
        gc.collect()
        alive = sum(1 for o in gc.get_objects() if isinstance(o, Gallery))  # each holds its index
        threads_idle, rss_idle = len(threading.enumerate()), rss_mb()
        first_call = []
        for c in range(min(10, args.collections)):
            t = time.perf_counter()
            galleries.collection(f"c{c}").search(small[:1], 5)
            first_call.append((time.perf_counter() - t) * 1000)
        galleries.close()

    payload = {
        "machine": machine(), "load_average": os.getloadavg(), "commit": current_commit(),
        "config": {"faces": args.faces, "dim": DIM, "collections": args.collections,
                   "faces_per_collection": args.faces_per_collection, "rounds": args.rounds, "probes": args.probes},
        "search_us_median_of_rounds": {"bare_gallery": round(statistics.median(via_bare), 1),
                                       "collection_handle": round(statistics.median(via_handle), 1)},
        "enroll_ms_median": {"without_actor": round(statistics.median(enroll_plain), 3),
                             "with_audit_entry": round(statistics.median(enroll_audited), 3)},
        "idle": {"collections_open_after_filling": open_now, "threads_before": threads_before,
                 "threads_with_collections_open": threads_open, "threads_after_idle_close": threads_idle,
                 "gallery_objects_alive_after_idle_close": alive,
                 "rss_mb_before": rss_before, "rss_mb_open": rss_open, "rss_mb_after_idle_close": rss_idle,
                 "first_call_after_idle_ms_median": round(statistics.median(first_call), 2)},
    }
    print(save("collections_embedded", payload, args.output))
    print(payload)


if __name__ == "__main__":
    main()
