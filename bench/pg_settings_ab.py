"""PostgreSQL server settings A/B at 1M faces, in interleaved rounds of one run (issue 25).

``bench.pg_tuning`` starts one variant after another; on this virtual machine the search time drifts
by tens of percent within minutes (its own runs: the same variant 5.5 then 7.4 ms p50 ten minutes
apart), more than some settings change. This bench runs every variant at once instead: one copy of
the data dir that ``gallery_backends --backends postgres --phase build`` persisted per variant
(``WORKDIR/pg_<faces>`` for the first, ``pg_<faces>_ab<i>`` copies, made once, for the others), each
with its settings (ALTER SYSTEM, then a start: ``huge_pages`` and ``shared_buffers`` take one), all
running. After a warm-up of each (every probe at the largest ef), rounds alternate between them, the
order rotating each round: per round and variant, ``--round-probes`` probes (the next slice of the
1,000) at each ef, through

* ``knn``: the service's own kNN statement (``HNSW_SQL``, top_k x OVERSAMPLE rows) on one connection,
  prepared (what psycopg does on a pooled connection), as ``pg_tuning`` times it; and/or
* ``service``: the whole service search (``PostgresGallery.search``: pool, one pipeline with the
  settings, counts and kNN, grouping), with ``FACE_HNSW_EF_SEARCH`` = the ef.

Reported per variant, mode and ef: pooled p50/p99 of every probe, the median of the per-round p50s and
p99s, recall@1 of the face's identity against exact search; and against the first variant the per-round
difference of p50 (median, quartiles, rounds faster). ``EXPLAIN (ANALYZE, BUFFERS)`` of 100 probes per
variant at each ef at the end (buffers per search, microseconds per buffer).

    sysctl vm.nr_hugepages=1200   # 2 MB pages for one server's 2 GB of shared buffers (1,071 asked)
    python -m bench.pg_settings_ab --faces 1000000 --workdir /work/bench-pg1m \\
        --variants off:huge_pages=off on:huge_pages=on --ef 128 auto --rounds 20
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import machine, percentiles, save
from bench.gallery_backends import MODEL_ID, Data, PgServer, pg_options
from bench.gallery_search import person_id
from bench.pg_tuning import configure, explain, huge_pages_meminfo, knn_sql, service_options
from service.gallery.ef import AUTO, search_ef
from service.gallery.postgres.backend import DEFAULT_COLLECTION_ID, hnsw_index_name
from service.gallery.search import OVERSAMPLE

log = logging.getLogger("bench.pg_settings_ab")

SHOWN = ("shared_buffers", "effective_cache_size", "huge_pages", "huge_pages_status", "server_version")


@dataclass(frozen=True)
class Variant:
    name: str
    settings: dict[str, str]

    @classmethod
    def parse(cls, text: str) -> Variant:
        """``NAME:key=value,key=value`` (``NAME:`` alone: the build's settings)."""
        name, _, rest = text.partition(":")
        return cls(name, dict(item.split("=", 1) for item in rest.split(",") if item))


class Target:
    """One variant's running server, its kNN connection and (``service``) its gallery per ef."""

    def __init__(self, variant: Variant, pgdata: Path, data: Data, efs: list[int | str], modes: list[str],
                 top_k: int) -> None:
        import psycopg
        from pgvector.psycopg import register_vector

        from service.gallery.postgres.backend import PostgresGalleries

        self.variant, self.pgdata = variant, pgdata
        self.server = PgServer(pgdata)
        self.conn = psycopg.connect(self.server.url, **pg_options(self.server.url).connect_kwargs())
        register_vector(self.conn)
        self.conn.execute("SET statement_timeout = 0")
        self.shown = {key: self.conn.execute(f"SHOW {key}").fetchone()[0] for key in SHOWN}
        dim = data.flat.shape[1]
        built = self.conn.execute("SELECT reloptions FROM pg_class WHERE oid = %s::regclass",
                                  (hnsw_index_name(dim),)).fetchone()[0] or []
        self.index_options = list(built)  # its reloptions, e.g. ["m=24", "ef_construction=200"]
        self.galleries = {}
        if "service" in modes:
            for ef in efs:
                galleries = PostgresGalleries(service_options(self.server.url, ef, self.index_options), MODEL_ID, dim)
                galleries.open()
                self.galleries[ef] = galleries
        self.top_k = top_k

    def set_ef(self, ef: int) -> None:
        self.conn.execute(f"SET hnsw.ef_search = {int(ef)}")

    def knn(self, sql: str, probe: np.ndarray) -> list:
        return self.conn.execute(sql, {"p": probe, "c": DEFAULT_COLLECTION_ID, "k": self.top_k * OVERSAMPLE},
                                 prepare=True).fetchall()

    def close(self) -> None:
        for galleries in self.galleries.values():
            galleries.close()
        self.conn.close()
        self.server.stop()


def data_dir(workdir: Path, faces: int, i: int) -> Path:
    """The first variant's is the build's; the others' are copies of it, made once (the build's must be stopped)."""
    base = workdir / f"pg_{faces}"
    if i == 0:
        return base
    copy = workdir / f"pg_{faces}_ab{i}"
    if not copy.exists():
        started = time.perf_counter()
        subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(copy)], check=True)
        (copy / "postmaster.pid").unlink(missing_ok=True)
        log.warning("copied %s to %s in %.0f s", base, copy, time.perf_counter() - started)
    return copy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, required=True, help="where gallery_backends --phase build put pg_<faces>")
    parser.add_argument("--probes", type=int, default=1000)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="the build's")
    parser.add_argument("--variants", nargs="+", type=Variant.parse, required=True,
                        help="NAME:key=value,...; the first is the baseline, e.g. off:huge_pages=off on:huge_pages=on")
    parser.add_argument("--base-settings", default="shared_buffers=2GB,effective_cache_size=4GB",
                        help="every variant's, before its own")
    parser.add_argument("--ef", nargs="+", default=["128", AUTO], help="auto or numbers")
    parser.add_argument("--modes", nargs="+", choices=["knn", "service"], default=["knn", "service"])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--round-probes", type=int, default=200)
    parser.add_argument("--explain-probes", type=int, default=100)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    workdir = args.workdir.resolve()
    data = Data(args.faces, args.probes, args.seed)
    n, k = len(data.flat), args.top_k * OVERSAMPLE
    efs: list[int | str] = [AUTO if ef == AUTO else int(ef) for ef in args.ef]
    used = {ef: search_ef(ef, n, k) for ef in efs}
    sql = knn_sql(data.flat.shape[1], "vector")
    base = dict(item.split("=", 1) for item in args.base_settings.split(",") if item)
    payload: dict = {"benchmark": "pg_settings_ab", "machine": machine(), "load_average_start": os.getloadavg(),
                     "config": {"faces": n, "probes": args.probes, "top_k": args.top_k, "k_rows": k, "ef": efs,
                                "ef_used": [used[ef] for ef in efs], "modes": args.modes, "rounds": args.rounds,
                                "round_probes": args.round_probes, "seed": args.seed, "base_settings": base,
                                "variants": {v.name: v.settings for v in args.variants},
                                "data": "synthetic (gallery_backends.Data): identity centres + noise, 2 faces each"}}
    dirs = [data_dir(workdir, args.faces, i) for i in range(len(args.variants))]
    for variant, pgdata in zip(args.variants, dirs):
        configure(pgdata, {**base, **variant.settings})
    targets: list[Target] = []
    try:
        for variant, pgdata in zip(args.variants, dirs):
            targets.append(Target(variant, pgdata, data, efs, args.modes, args.top_k))
            log.warning("%s: %s, %s", variant.name, targets[-1].shown, huge_pages_meminfo())
        payload["servers"] = {t.variant.name: {"pgdata": str(t.pgdata), "settings": t.shown,
                                               "index_options": t.index_options} for t in targets}
        payload["huge_pages_meminfo"] = huge_pages_meminfo()
        for t in targets:  # warm-up: the pages the searches touch, into each server's shared buffers
            started = time.perf_counter()
            t.set_ef(max(used.values()))
            for probe in data.probes:
                t.knn(sql, probe)
            log.warning("%s: warm-up %.1f s", t.variant.name, time.perf_counter() - started)
        # latencies[(variant, mode, ef)] per round; identity hits pooled
        cells = [(t.variant.name, mode, ef) for t in targets for mode in args.modes for ef in efs]
        rounds: dict = {cell: [] for cell in cells}
        hits: dict = {cell: [0, 0] for cell in cells}
        for r in range(args.rounds):
            start = (r * args.round_probes) % len(data.probes)
            picks = [(start + j) % len(data.probes) for j in range(args.round_probes)]
            order = targets[r % len(targets):] + targets[:r % len(targets)]
            for t in order:
                for mode in args.modes:
                    for ef in efs:
                        t.set_ef(used[ef])  # the kNN connection's; the service's galleries set their own
                        latencies = []
                        for i in picks:
                            probe = data.probes[i]
                            owner = person_id(int(data.owner[data.exact_face[i]]))
                            began = time.perf_counter()
                            if mode == "knn":
                                found = t.knn(sql, probe)[0][1]
                            else:
                                found = t.galleries[ef].default.search(probe[None, :], args.top_k)[0][0].identity_id
                            latencies.append((time.perf_counter() - began) * 1000)
                            hits[(t.variant.name, mode, ef)][0] += found == owner
                            hits[(t.variant.name, mode, ef)][1] += 1
                        rounds[(t.variant.name, mode, ef)].append(latencies)
            log.warning("round %d/%d: %s (load %.2f)", r + 1, args.rounds, "  ".join(
                f"{name}/{mode}/{ef} {np.percentile(rounds[(name, mode, ef)][-1], 50):.2f}"
                for name, mode, ef in cells), os.getloadavg()[0])
        payload["results"] = []
        first = targets[0].variant.name
        for name, mode, ef in cells:
            per_round = rounds[(name, mode, ef)]
            p50s = [float(np.percentile(x, 50)) for x in per_round]
            row = {"variant": name, "mode": mode, "ef": ef, "ef_used": used[ef],
                   "recall_at_1_identity": round(hits[(name, mode, ef)][0] / hits[(name, mode, ef)][1], 4),
                   **percentiles([v for x in per_round for v in x]),
                   "round_p50_median_ms": round(float(np.median(p50s)), 3),
                   "round_p99_median_ms": round(float(np.median([np.percentile(x, 99) for x in per_round])), 3)}
            if name != first:
                base_p50s = [float(np.percentile(x, 50)) for x in rounds[(first, mode, ef)]]
                diff = np.asarray(p50s) - np.asarray(base_p50s)
                row["vs_" + first] = {"round_p50_diff_median_ms": round(float(np.median(diff)), 3),
                                      "round_p50_diff_quartiles_ms": [round(float(q), 3) for q in np.percentile(diff, [25, 75])],
                                      "rounds_faster": int((diff < 0).sum()), "rounds": len(diff)}
            payload["results"].append(row)
            log.warning("%s", row)
        payload["explain"] = []
        for t in targets:
            for ef in efs:
                t.set_ef(used[ef])
                payload["explain"].append({"variant": t.variant.name, "ef": ef,
                                           **explain(t.conn, sql, data, k, args.explain_probes)})
                log.warning("explain %s", payload["explain"][-1])
    finally:
        for t in targets:
            t.close()
        # leave every data dir as the build configured it: a copy left at huge_pages=on would not start
        # (not even to be configured again) once the reserved pages are given back
        for pgdata in dirs:
            configure(pgdata, {**{key: PgServer.SETTINGS[key] for key in ("shared_buffers", "effective_cache_size")},
                               "huge_pages": "try"})
    payload["load_average_end"] = os.getloadavg()
    path = save(f"pg_settings_ab_{n}{args.tag}", payload)
    log.warning("saved %s", path)
    print(json.dumps([{key: row[key] for key in ("variant", "mode", "ef", "p50_ms", "p99_ms", "round_p50_median_ms",
                                                   "recall_at_1_identity")} | row.get("vs_" + first, {})
                      for row in payload["results"]], indent=1))


if __name__ == "__main__":
    main()
