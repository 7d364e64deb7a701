"""What collections cost on the embedded backend (issue 20), measured in-process (no HTTP):

* per call: a search through a collection handle (``EmbeddedGalleries.collection``, what a request
  gets) vs the bare ``EmbeddedGallery`` over the same Gallery, interleaved rounds, median of rounds;
* per enroll: with an actor (the audit entry in the same SQLite transaction) vs without;
* idle collections: threads, Gallery objects (each holds an index) and RSS (glibc may keep freed
  memory: the object count is the figure) with ``--collections`` small collections open, then after they
  were closed for idleness, and the first call on a closed one (open + snapshot load + search).

    nice -n 10 python -m bench.collections_embedded [--faces 10000] [--collections 50]

Saves bench/results/collections_embedded.json (with the load average: the machine may be shared).

``--part beside``: a small collection beside a big one (issue 20's benchmark, the embedded half of
bench.collections_filtered, with its probes and measures): the default collection holds ``--faces``
faces (synthetic identities of bench.gallery_backends, 2 faces each, 128-d; put in its store by the
store's bulk path, bench.gallery_fill, and indexed by the open, as a restart rebuilds it), a
collection "small" ``--small-faces`` faces (imported through the service's ``import_identities``),
both in one EmbeddedGalleries made by make_gallery from Settings. Probes of the small one: half new
images of its people, half people it does not hold. Measured: identity recall@1 against exact search
within each collection and single-probe p50/p99 search latency (a handle per call, as a request
gets), RSS at each step, that the small one is closed ``--idle-s`` (FACE_COLLECTION_IDLE_S) after its
last use (no Gallery, hence no index, left in memory), and the time of a first call that opens it
again while the big one is open (store open + snapshot load + search).

    nice -n 10 python -m bench.collections_embedded --part beside --faces 100000

Saves bench/results/collections_embedded_<faces>.json. Targets (issue 20): recall@1 >= 0.99 in the
small collection, and its p99 no slower than the big one's.
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

from bench.collections_filtered import exact_identities, measure
from bench.common import current_commit, machine, rss_mb, save
from bench.gallery_backends import MODEL_ID, Data
from bench.gallery_fill import fill_store_with
from bench.gallery_search import import_gallery, person_id
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


def costs(args: argparse.Namespace) -> None:
    """The per-call, per-enroll and idle-collection costs (module docstring)."""
    probes_n = args.probes or 200
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
        probes = units(rng, probes_n)
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
                   "faces_per_collection": args.faces_per_collection, "rounds": args.rounds, "probes": probes_n},
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


def gallery_objects(name: str) -> int:
    """Gallery objects of collection ``name`` still alive (an open one holds its index)."""
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, Gallery) and o.name == name)


def wait_closed(galleries: EmbeddedGalleries, name: str, timeout_s: float) -> bool:
    """Wait until ``name`` is no longer open and its Gallery is gone; False on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if name not in galleries.open_collections() and gallery_objects(name) == 0:
            return True
        time.sleep(0.05)
    return False


def beside(args: argparse.Namespace) -> dict:
    """A small collection beside a big one (module docstring); returns the payload, saved."""
    probes_n = args.probes or 400
    load_before = os.getloadavg()
    big = Data(args.faces, probes_n, args.seed)
    small = Data(args.small_faces, min(probes_n // 2, args.small_faces // 2), args.seed + 1)
    small_probes = np.concatenate([small.probes, big.probes[:probes_n - len(small.probes)]])
    small_expected = exact_identities(small_probes, small)
    big_expected = exact_identities(big.probes, big)
    out: dict = {"config": {"faces": args.faces, "small_faces": args.small_faces, "probes": probes_n,
                            "small_probes_known": len(small.probes), "top_k": args.top_k, "dim": DIM,
                            "seed": args.seed, "collection_idle_s": args.idle_s, "snapshot_interval_s": 0,
                            "big": "the default collection", "small": "collection 'small'"},
                 "machine": {**machine(), "load_average_before": load_before}, "commit": current_commit()}
    rss = {"data_made": rss_mb()}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        build: dict = {}
        started = time.perf_counter()
        fill_store_with(data_dir, MODEL_ID, big.faces, person_id)
        build["big_store_fill_s"] = round(time.perf_counter() - started, 1)
        # snapshots only when a collection closes: no 1M-face snapshot in the middle of a measurement
        settings = Settings(data_dir=data_dir, collection_idle_s=args.idle_s, snapshot_interval_s=0)
        galleries = make_gallery(settings, MODEL_ID, DIM)
        assert isinstance(galleries, EmbeddedGalleries)
        started = time.perf_counter()
        galleries.open()  # the default (big) collection's index, built from its store
        build["big_open_index_build_s"] = round(time.perf_counter() - started, 1)
        rss["big_open"] = rss_mb()
        try:
            galleries.create_collection("small")
            started = time.perf_counter()
            import_gallery(galleries.collection("small"), small.faces, 100)
            build["small_import_s"] = round(time.perf_counter() - started, 2)
            out["build"] = build
            rss["small_open"] = rss_mb()

            def identify(name: str):
                def search(probe: np.ndarray) -> str | None:
                    best = galleries.collection(name).search(probe[None], args.top_k)[0]
                    return best[0].identity_id if best else None
                return search

            results = {"small": measure(identify("small"), small_probes, small_expected),
                       "big": measure(identify(DEFAULT_COLLECTION), big.probes, big_expected)}
            results["small_again"] = measure(identify("small"), small_probes, small_expected)
            last_use = time.monotonic()
            for name, row in results.items():
                print(f"{name:12s} recall@1={row['recall_at_1']:.4f} p50={row['single_probe']['p50_ms']:.3f}ms "
                      f"p99={row['single_probe']['p99_ms']:.3f}ms", flush=True)
            out["results"] = results

            closed = wait_closed(galleries, "small", args.idle_s + 30)
            idle: dict = {"closed": closed, "closed_after_last_use_s": round(time.monotonic() - last_use, 2),
                          "open_collections": galleries.open_collections(),
                          "small_gallery_objects_alive": gallery_objects("small")}
            rss["small_closed"] = rss_mb()
            reopen_ms, warm_ms = [], []
            for _ in range(args.reopens):
                if not wait_closed(galleries, "small", args.idle_s + 30):
                    break
                started = time.perf_counter()
                galleries.collection("small").search(small_probes[:1], args.top_k)
                reopen_ms.append((time.perf_counter() - started) * 1000)
                started = time.perf_counter()
                galleries.collection("small").search(small_probes[1:2], args.top_k)
                warm_ms.append((time.perf_counter() - started) * 1000)
            idle["first_call_opening_small_ms"] = [round(v, 2) for v in reopen_ms]
            idle["first_call_opening_small_ms_median"] = round(statistics.median(reopen_ms), 2) if reopen_ms else None
            idle["next_call_ms_median"] = round(statistics.median(warm_ms), 3) if warm_ms else None
            out["idle"] = idle
        finally:
            galleries.close()
    rss["peak_vmhwm"] = rss_mb(field="VmHWM")
    out["rss_mb"] = {k: None if v is None else round(v, 1) for k, v in rss.items()}
    out["targets"] = {
        "small_recall_at_1_ge_0_99": out["results"]["small"]["recall_at_1"] >= 0.99,
        "small_p99_le_big_p99": (out["results"]["small"]["single_probe"]["p99_ms"]
                                 <= out["results"]["big"]["single_probe"]["p99_ms"]),
        "small_closed_when_idle": out["idle"]["closed"],
    }
    out["machine"]["load_average_after"] = os.getloadavg()
    out["note"] = ("machine shared with other engineers' jobs (2 cores): see the load averages; latency is "
                   "single-probe search() through a collection handle of EmbeddedGalleries, in process")
    print(save(f"collections_embedded_{args.faces}", out, args.output))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["costs", "beside"], default="costs",
                        help="costs: handle/audit/idle costs; beside: a small collection beside a big one")
    parser.add_argument("--faces", type=int, default=10_000, help="faces in the default collection (beside: the big one)")
    parser.add_argument("--collections", type=int, default=50, help="costs: small collections opened then left idle")
    parser.add_argument("--faces-per-collection", type=int, default=1000, help="costs")
    parser.add_argument("--rounds", type=int, default=15, help="costs")
    parser.add_argument("--probes", type=int, default=None, help="default: 200 (costs), 400 (beside)")
    parser.add_argument("--small-faces", type=int, default=1000, help="beside: faces of the small collection")
    parser.add_argument("--top-k", type=int, default=5, help="beside: identities asked per search")
    parser.add_argument("--seed", type=int, default=20, help="beside (bench.collections_filtered's default)")
    parser.add_argument("--idle-s", type=float, default=5.0, help="beside: FACE_COLLECTION_IDLE_S")
    parser.add_argument("--reopens", type=int, default=5, help="beside: first calls timed on the closed small one")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    costs(args) if args.part == "costs" else beside(args)


if __name__ == "__main__":
    main()
