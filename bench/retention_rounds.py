"""What the retention sweeper costs between expiries, with many collections that have a retention.

The service's sweeper (service/app.py, ``service.gallery.retention``) runs a round whenever a face is
due to expire, at most every ``MIN_GAP_S`` (1 s) when expiries come steadily, and at least every
``FACE_RETENTION_SWEEP_S``. For each backend (embedded; PostgreSQL with ``--postgres``, a throwaway
server of harness/pg.py) and each ``--collections`` count N: N collections with ``retention_days``,
each holding ``--faces`` synthetic faces none of which has expired (embedded: closed, as idle ones
are), and one more whose faces expire one a second (``busy``). Timed, ``--rounds`` times each:

* ``walk_all``: a round as it was before stop 43: ``sweep`` then ``next_expiry`` over every collection;
* ``scheduled_due``: a round of ``retention.Schedule`` between its full rounds: only the collections
  due (here ``busy``), then their next expiry. Both kinds run at the next expiry (``now`` given), so
  each erases ``busy``'s one face due;
* ``scheduled_full``: its full round (every collection, every ``FACE_RETENTION_SWEEP_S``).

Reports each round's milliseconds (median, p90) and the sweeper's share of one core with a face
expiring every second: one round a second, plus (scheduled) a full round every 60 s.

    nice -n 19 python -m bench.retention_rounds [--collections 10,100,1000] [--rounds 10] [--postgres]

Saves bench/results/retention_rounds.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench.common import machine, per_backend, percentiles, save
from service.config import Settings
from service.gallery.open import make_gallery
from service.gallery.retention import DAY_S, LATE_S, Schedule, next_expiry, sweep

MODEL = "bench@1"
EVERY_S = 60.0  # FACE_RETENTION_SWEEP_S's default


def unit(rng: np.random.Generator, shape: tuple[int, ...], dim: int) -> np.ndarray:
    v = rng.normal(size=(*shape, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def timed(call, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        call()
        out.append((time.perf_counter() - t) * 1000)
    return out


def measure(galleries, rounds: int) -> dict:
    """The three kinds of round on an opened gallery (module docstring)."""
    sweep(galleries)  # what expired while the collections were made: erased before the timing
    due = [next_expiry(galleries) or time.time()]

    def walk_round() -> None:  # each round at the next expiry (as the sweeper times it): one face erased
        sweep(galleries, now=due[0] + LATE_S)
        due[0] = next_expiry(galleries) or time.time()

    walk_round()  # busy opened (embedded) before either kind is timed
    walk = timed(walk_round, rounds)
    schedule = Schedule(every_s=EVERY_S)
    full = timed(lambda: schedule.round(galleries, full=True), max(2, rounds // 3))
    due = timed(lambda: schedule.round(galleries, now=(schedule.next_due() or time.time()) + LATE_S), rounds)
    walk_p, full_p, due_p = (percentiles(x, (50, 90)) for x in (walk, full, due))
    return {"walk_all_ms": walk_p, "scheduled_due_ms": due_p, "scheduled_full_ms": full_p,
            "core_share_walk_all": round(walk_p["p50_ms"] / 1000, 4),
            "core_share_scheduled": round(due_p["p50_ms"] / 1000 + full_p["p50_ms"] / 1000 / EVERY_S, 4),
            "busy_faces_left": galleries.collection("busy").face_count}


def run(settings: Settings, args: argparse.Namespace) -> dict:
    results = {}
    made = 0
    rng = np.random.default_rng(0)
    galleries = make_gallery(settings, MODEL, args.dim)
    galleries.open()
    try:
        now = time.time()
        # busy: a face enrolled (in the gallery's clock) every second over the last hour, retention 1 h:
        # each second one more is past it
        galleries.create_collection("busy", retention_days=3600 / DAY_S)
        busy = galleries.collection("busy")
        vectors = unit(rng, (3600,), args.dim)
        for start in range(0, 3600, 500):
            busy.import_identities([(f"b{i}", vectors[i:i + 1], None) for i in range(start, min(start + 500, 3600))],
                                   enrolled_at=[[now - 3600 + i + 5] for i in range(start, min(start + 500, 3600))])
    finally:
        galleries.close()
    for count in args.collections:
        galleries = make_gallery(settings, MODEL, args.dim)
        galleries.open()
        try:
            while made < count:  # the collections of the smaller counts are kept: N grows
                name = f"c{made:05d}"
                galleries.create_collection(name, retention_days=365.0)
                galleries.collection(name).import_identities(
                    [(f"p{i}", unit(rng, (1,), args.dim), None) for i in range(args.faces)])
                made += 1
        finally:
            galleries.close()  # embedded: reopened below with every collection but default closed
        galleries = make_gallery(settings, MODEL, args.dim)
        galleries.open()
        try:
            results[f"collections_{count}"] = {"collections_with_retention": count + 1, "faces_each": args.faces,
                                               **measure(galleries, args.rounds)}
        finally:
            galleries.close()
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--collections", type=lambda v: [int(c) for c in v.split(",")], default=[10, 100, 1000])
    parser.add_argument("--faces", type=int, default=2, help="faces in each collection (none expired)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--postgres", action="store_true")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    results = per_backend(args.postgres, lambda settings: run(settings, args))
    path = save("retention_rounds", {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                     "results": results, "machine": machine()}, args.output)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
