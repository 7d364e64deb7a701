"""How long the migration's fenced pass holds writes to the source (service/jobs/migrate.py, step 4),
and whether searches on the source notice it.

Per backend (embedded; ``--postgres``: also PostgreSQL from the pgserver wheel, harness/pg.py) and per
size (``--identities``, one face each: a full pass lists identities, so their number is what costs),
two collections are seeded through the backend interface as a finished copy leaves them: A (128-d)
and B (64-d) with the same identity ids and face counts. Then, ``--rounds`` times, for each of the
fenced pass's two modes (``Migration.fenced_sync``: ``changes``, what A's audit log names since the
last full pass began; ``full``, listing A and B, as every fenced pass did before 2026-12-05 and as a
resumed job still does):

* the job's own unfenced pass (``Migration._pass``: lists A and B), then ``--writes`` audited writes
  to A (deletes of identities, with an actor, as the API makes them) that the fenced pass must bring
  to B;
* **fenced pass**: ``Migration.fenced_sync`` inside ``A.write_fence()``, exactly as
  ``Migration.fenced_pass`` runs it; it must sync exactly those writes. A writer thread sends one
  enroll to A the moment the fence is held and records how long it waited (what a client's write to
  A waits, at most); a searcher thread searches A without pause all along, and its latencies while
  the fence was held are compared with those of the unfenced pass's.

    nice -n 10 python -m bench.migration_fence [--identities 10000 100000] [--postgres]

Saves bench/results/migration_fence.json (or --output), with the machine and its load averages (the
machine may be shared).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import current_commit, gallery_backends, machine, percentiles, save
from service.config import Settings
from service.gallery.api import Actor, Galleries, GalleryBackend
from service.gallery.open import make_gallery
from service.jobs.migrate import FENCE_LOOKBACK_S, SLACK_S, Migration, iter_identities
from service.jobs.store import JobRecord

OLD, OLD_DIM = "bench-old@1", 128
NEW, NEW_DIM = "bench-new@1", 64


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def seed(galleries: Galleries, name: str, model_id: str, dim: int, identities: int, rng: np.random.Generator) -> GalleryBackend:
    galleries.create_collection(name, model_id=model_id, dim=dim)
    gallery = galleries.collection(name)
    for start in range(0, identities, 500):
        count = min(500, identities - start)
        vectors = unit(rng, count, dim)
        gallery.import_identities([(f"id{start + i:07d}", vectors[i:i + 1], None) for i in range(count)])
    return gallery


def searches(gallery: GalleryBackend, probe: np.ndarray, stop: threading.Event,
             out: list[tuple[float, float]]) -> None:
    """(start, seconds) of each search until ``stop``."""
    while not stop.is_set():
        began = time.perf_counter()
        gallery.search(probe, 10)
        out.append((began, time.perf_counter() - began))


def one_round(galleries: Galleries, a: GalleryBackend, b: GalleryBackend, rng: np.random.Generator, n: int,
              mode: str, writes: int, victims: list[str]) -> dict:
    job = JobRecord(job_id=f"bench_{n}_{mode}", collection=a.name, into=b.name, model="new", model_id=NEW,
                    source_model_id=OLD, created_at=time.time() + SLACK_S + 60)  # nothing "written since"
    migration = Migration(galleries, job, embed=lambda crops: np.zeros((len(crops), NEW_DIM), np.float32),
                          save=lambda changes: True, compare=False)
    probe = unit(rng, 1, OLD_DIM)
    time.sleep(FENCE_LOOKBACK_S)  # the previous round's writes out of the fenced pass's look-back
    # the unfenced pass (what each catch-up pass costs), with the baseline searches running beside it
    stop, base = threading.Event(), []
    searcher = threading.Thread(target=searches, args=(a, probe, stop, base))
    searcher.start()
    began = time.perf_counter()
    assert migration._pass(a, b) == 0  # noqa: SLF001 - the job's own pass
    unfenced_s = time.perf_counter() - began
    stop.set()
    searcher.join()
    # as after the job's copy: every identity of A synced at its current updated_at
    migration.synced = {r.identity_id: r.updated_at for r in iter_identities(a)}
    if mode == "full":
        migration.pass_started = None  # as a resumed job: no full pass of this run to start from
    actor = Actor(key_id="bench", client="127.0.0.1", request_id=f"bench-{n}")
    for _ in range(writes):  # written between the last unfenced pass and the fence, as by clients
        a.delete(victims.pop(), actor)
    # the fenced pass, a write waiting for it and searches beside it
    stop, during, write_wait = threading.Event(), [], []
    fence_held = threading.Event()

    def writer() -> None:
        fence_held.wait()
        sent = time.perf_counter()
        a.enroll(f"late{n}{mode}", unit(rng, 1, OLD_DIM), actor=actor)
        write_wait.append(time.perf_counter() - sent)

    threads = [threading.Thread(target=searches, args=(a, probe, stop, during)), threading.Thread(target=writer)]
    for thread in threads:
        thread.start()
    with a.write_fence():
        held = time.perf_counter()
        fence_held.set()
        synced, used = migration.fenced_sync(a, b)
        released = time.perf_counter()
    stop.set()
    for thread in threads:
        thread.join()
    assert (synced, used) == (writes, mode), (synced, used)  # exactly the writes, in the mode asked for
    b.enroll(f"late{n}{mode}", unit(rng, 1, NEW_DIM))  # B equal to A again for the next round's pass
    inside = [s * 1000 for start, s in during if held <= start < released]
    return {"mode": mode, "unfenced_pass_s": round(unfenced_s, 3), "fence_held_s": round(released - held, 3),
            "synced": synced, "write_waited_s": round(write_wait[0], 3),
            "search_ms_baseline": percentiles([s * 1000 for _, s in base], (50, 99, 100)),
            "search_ms_while_fenced": percentiles(inside, (50, 99, 100)), "searches_while_fenced": len(inside)}


def run(backend: str, identities: int, rounds: int, pg_env: dict[str, str] | None, writes: int) -> dict:
    rng = np.random.default_rng(identities)
    with tempfile.TemporaryDirectory() as tmp:
        pg = {}
        if pg_env is not None:
            pg = {"database_url": pg_env["FACE_DATABASE_URL"], "database_schema": pg_env["FACE_DATABASE_SCHEMA"]}
        # seeding 100k faces into pgvector's HNSW index on a loaded 2-core box outlasts the default 15 s
        galleries = make_gallery(Settings(data_dir=Path(tmp) / "data", snapshot_interval_s=0,
                                          database_statement_timeout_ms=600_000, **pg), OLD, OLD_DIM,
                                 served={OLD: OLD_DIM, NEW: NEW_DIM})
        galleries.open()
        try:
            started = time.perf_counter()
            a = seed(galleries, "a", OLD, OLD_DIM, identities, rng)
            b = seed(galleries, "b", NEW, NEW_DIM, identities, rng)
            seed_s = time.perf_counter() - started
            load = os.getloadavg()
            victims = [f"id{i:07d}" for i in rng.permutation(identities)[: 2 * rounds * writes]]
            results = [one_round(galleries, a, b, rng, n, mode, writes, victims)
                       for n in range(rounds) for mode in ("changes", "full")]  # interleaved
        finally:
            galleries.close()
    summary = {mode: {key: round(statistics.median(r[key] for r in results if r["mode"] == mode), 3)
                      for key in ("unfenced_pass_s", "fence_held_s", "write_waited_s")} for mode in ("changes", "full")}
    return {"backend": backend, "identities": identities, "seed_s": round(seed_s, 1), "median": summary,
            "rounds": results, "load_average_before": load, "load_average_after": os.getloadavg()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--identities", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--writes", type=int, default=50, help="audited writes to A between the last pass and the fence")
    parser.add_argument("--postgres", action="store_true", help="also on PostgreSQL (harness/pg.py)")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    runs: list[dict] = []
    config = {"identities": args.identities, "faces_per_identity": 1, "rounds": args.rounds, "dims": [OLD_DIM, NEW_DIM],
              "writes_before_fence": args.writes,
              "note": "shared machine (2 cores, other engineers' jobs running): see the load averages"}
    with gallery_backends(args.postgres) as backends:
        for backend, env in backends:
            for size in args.identities:
                runs.append(run(backend, size, args.rounds, env, args.writes))
                save("migration_fence", {"benchmark": "migration_fence", "machine": machine(), "commit": current_commit(),
                                         "config": config, "runs": runs}, args.output)  # each run as it ends
                for mode, m in runs[-1]["median"].items():
                    print(f"{backend} {size} identities, fenced pass {mode}: fence held {m['fence_held_s']} s, a write "
                          f"waited {m['write_waited_s']} s, unfenced pass {m['unfenced_pass_s']} s, "
                          f"load {runs[-1]['load_average_after'][0]:.2f}", flush=True)
    path = save("migration_fence", {"benchmark": "migration_fence", "machine": machine(), "commit": current_commit(),
                                    "config": config, "runs": runs}, args.output)
    print(path)


if __name__ == "__main__":
    main()
