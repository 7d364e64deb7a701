"""pgvector at 1M faces: what one search costs, and what cuts it (issue 25).

Runs on the postgres gallery that ``bench.gallery_backends --backends postgres --phase build`` left in
a work dir (``WORKDIR/pg_<faces>``: the service's schema, the faces by COPY, the service's HNSW index),
with the same synthetic data and exact answers (``gallery_backends.Data``). Each variant is one start of
that data dir with a pgvector build and server settings; nothing is rebuilt but the extra indexes asked
for. Per variant, on one connection (the service's connection options, ``register_vector``): a warm-up
pass of every probe at the largest ef, then for each ef (``SET hnsw.ef_search``) every probe through
the service's own kNN statement (``HNSW_SQL``, top_k x OVERSAMPLE rows), timed from send to the last
row, and recall@1 of the face and of its identity against exact search; once with ``prepare=False``
(a fresh plan each time) and once with ``prepare=True`` (a prepared statement: what psycopg does
after ``prepare_threshold`` = 5 executions on a pooled connection); then ``EXPLAIN (ANALYZE, BUFFERS)``
of 100 probes per ef (shared buffers per search, time per buffer, the index used).

Variants are ``TREE:SHARED_BUFFERS:INDEX[:HUGE_PAGES]``:

* TREE ``wheel``: the pgserver wheel's own PostgreSQL and vector.so; any other name: a copy of that
  install tree given by ``--tree NAME=DIR``, into which ``scripts/build-pgvector --prefix DIR`` installed
  pgvector built here (``native``: ``-march=native``; ``portable``: ``--optflags ""``, as the
  pgvector/pgvector images build it). Same PostgreSQL build, same on-disk index, so the same index is
  measured with each build; the vector.so the backend actually mapped is recorded;
* SHARED_BUFFERS: e.g. ``128MB`` (PostgreSQL's default) or ``2GB`` (holds the index), with
  ``effective_cache_size`` ``--effective-cache-size``;
* INDEX ``vector``: the service's index (``vector(dim)``, vector_cosine_ops); ``halfvec``: an index on
  ``embedding::halfvec(dim)`` (halfvec_cosine_ops, same WHERE, m and ef_construction) built on the
  same table by ``--build-halfvec`` (timed, its size recorded), searched with the probe cast to halfvec
  (the score stays the exact float32 cosine);
* HUGE_PAGES: PostgreSQL's ``huge_pages``, ``try`` (its default; what a variant without the field gets)
  ``on`` or ``off``. ``on`` maps shared memory, shared buffers included, on the kernel's explicit 2 MB
  pages, which must be reserved first (as root: ``sysctl vm.nr_hugepages=N``, N at least
  ``postgres -C shared_memory_size_in_huge_pages``; the server does not start otherwise). ``try`` without
  reserved pages is ``off``; ``huge_pages_status`` and the kernel's counts are recorded per variant.

``--rebuild-index M,EFC`` first builds the service's index again with other m / ef_construction
(timed). ``--service`` also times the whole service search (``PostgresGallery.search``: pool, one pipeline with
the settings, counts and kNN) for each variant, at each ef of ``--service-ef`` (default auto). ``--perf S``: ``perf record`` of the
backend for S seconds of searches at ef auto (first variant), its top symbols.

    scripts/build-pgvector --prefix /work/pg-native/pginstall
    scripts/build-pgvector --prefix /work/pg-portable/pginstall --optflags ""
    nice -n 10 python -m bench.pg_tuning --faces 1000000 --workdir /work/bench-pg1m \\
        --tree native=/work/pg-native/pginstall --tree portable=/work/pg-portable/pginstall \\
        --variants wheel:2GB:vector native:2GB:vector portable:2GB:vector wheel:128MB:vector --service --perf 20
    nice -n 10 python -m bench.pg_tuning --faces 1000000 --workdir /work/bench-pg1m --build-halfvec \\
        --variants wheel:2GB:halfvec --tag _halfvec
    sysctl vm.nr_hugepages=1200   # 2.3 GB of 2 MB pages: shared_buffers 2GB and the rest of shared memory
    nice -n 10 python -m bench.pg_tuning --faces 1000000 --workdir /work/bench-pg1m \\
        --variants wheel:2GB:vector:off wheel:2GB:vector:on wheel:2GB:vector:off wheel:2GB:vector:on --tag _huge_pages
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import machine, percentiles, save
from bench.gallery_backends import MODEL_ID, Data, PgServer, pg_options
from bench.gallery_search import person_id
from service.gallery.ef import AUTO, search_ef
from service.gallery.postgres.backend import DEFAULT_COLLECTION_ID, HNSW_SQL, hnsw_index_name
from service.gallery.search import OVERSAMPLE

log = logging.getLogger("bench.pg_tuning")


def halfvec_index_name(dim: int) -> str:
    return hnsw_index_name(dim) + "_halfvec"


def knn_sql(dim: int, index: str) -> str:
    """The service's kNN statement; for ``halfvec`` its ORDER BY on the halfvec index's expression."""
    text = HNSW_SQL.format(dim=int(dim))
    if index == "halfvec":
        order = f"ORDER BY embedding::vector({int(dim)}) <=> %(p)b"
        assert order in text, text
        text = text.replace(order, f"ORDER BY embedding::halfvec({int(dim)}) <=> %(p)b::halfvec({int(dim)})")
    return text


@dataclass(frozen=True)
class Variant:
    tree: str  # wheel, or a --tree name
    shared_buffers: str
    index: str  # vector | halfvec
    huge_pages: str = "try"  # PostgreSQL's setting: try (its default) | on | off

    @classmethod
    def parse(cls, text: str) -> Variant:
        tree, buffers, index, *huge = text.split(":")
        assert index in ("vector", "halfvec"), text
        assert huge in ([], ["try"], ["on"], ["off"]), text
        return cls(tree, buffers, index, *huge)

    def __str__(self) -> str:
        return f"{self.tree}:{self.shared_buffers}:{self.index}" + ("" if self.huge_pages == "try" else f":{self.huge_pages}")


def huge_pages_meminfo() -> dict:
    """The kernel's explicit huge pages (``vm.nr_hugepages``): what PostgreSQL's ``huge_pages`` maps."""
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return {key: fields[key].strip() for key in ("HugePages_Total", "HugePages_Free", "HugePages_Rsvd", "Hugepagesize")}


def configure(pgdata: Path, settings: dict[str, str]) -> None:
    """ALTER SYSTEM on the wheel's server, then stop it (shared_buffers takes a restart)."""
    import psycopg

    server = PgServer(pgdata)
    try:
        with psycopg.connect(server.url, autocommit=True) as conn:
            for key, value in settings.items():
                conn.execute(f"ALTER SYSTEM SET {key} = '{value}'")
    finally:
        server.stop()


def mapped_vector_so(conn) -> str | None:
    """The vector.so this backend has mapped (after it ran a vector operator)."""
    pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        if line.endswith("/vector.so"):
            return line.split()[-1]
    return None


def build_halfvec(url: str, dim: int, m: int, ef_construction: int, maintenance_work_mem: str) -> dict:
    import psycopg

    name = halfvec_index_name(dim)
    with psycopg.connect(url, **pg_options(url).connect_kwargs()) as conn:
        if conn.execute("SELECT to_regclass(%s)", (name,)).fetchone()[0] is not None:
            log.warning("%s exists: not rebuilt", name)
            return {"built": False}
        conn.execute("SET statement_timeout = 0")
        conn.execute(f"SET maintenance_work_mem = '{maintenance_work_mem}'")
        started = time.perf_counter()
        conn.execute(f"CREATE INDEX {name} ON faces USING hnsw ((embedding::halfvec({dim})) halfvec_cosine_ops) "
                     f"WITH (m = {m}, ef_construction = {ef_construction}) WHERE vector_dims(embedding) = {dim}")
        seconds = time.perf_counter() - started
    log.warning("halfvec index built in %.0f s", seconds)
    return {"built": True, "seconds": round(seconds, 1), "load_average_after": os.getloadavg(),
            "maintenance_work_mem": maintenance_work_mem}


def rebuild_index(url: str, dim: int, m: int, ef_construction: int) -> dict:
    """Drop the service's index and build it again with other m / ef_construction (the service's own
    ensure_index, as a start with changed FACE_HNSW_M / FACE_HNSW_EF_CONSTRUCTION after a REINDEX)."""
    from dataclasses import replace

    from service.gallery.postgres.backend import PostgresGalleries

    galleries = PostgresGalleries(replace(pg_options(url), hnsw_m=m, hnsw_ef_construction=ef_construction),
                                  MODEL_ID, dim)
    galleries.open()
    try:
        with galleries._transaction() as conn:  # noqa: SLF001 - as a DBA would
            conn.execute(f"DROP INDEX IF EXISTS {hnsw_index_name(dim)}")
        started = time.perf_counter()
        galleries.ensure_index([dim])
        seconds = time.perf_counter() - started
    finally:
        galleries.close()
    log.warning("index rebuilt with m=%d ef_construction=%d in %.0f s", m, ef_construction, seconds)
    return {"m": m, "ef_construction": ef_construction, "seconds": round(seconds, 1), "load_average_after": os.getloadavg()}


def explain(conn, sql: str, data: Data, k: int, probes: int) -> dict:
    """EXPLAIN (ANALYZE, BUFFERS) of the first ``probes`` probes: the index scanned, buffers and time."""
    hits, reads, ms, nodes = [], [], [], set()
    for probe in data.probes[:probes]:
        plan = conn.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql,
                            {"p": probe, "c": DEFAULT_COLLECTION_ID, "k": k}).fetchone()[0][0]
        top = plan["Plan"]
        hits.append(top["Shared Hit Blocks"])
        reads.append(top["Shared Read Blocks"])
        ms.append(plan["Execution Time"])
        node = top
        while "Plans" in node:
            node = node["Plans"][0]
        nodes.add(f'{node["Node Type"]} {node.get("Index Name", "")}'.strip())
    buffers = np.asarray(hits) + np.asarray(reads)
    return {"probes": probes, "scan": sorted(nodes), "shared_hit_per_search": round(float(np.mean(hits)), 1),
            "shared_read_per_search": round(float(np.mean(reads)), 1),
            "execution_ms": percentiles(ms), "us_per_buffer": round(float(np.sum(ms)) * 1000 / float(buffers.sum()), 3)}


def sweep(conn, sql: str, data: Data, efs: list, k: int, prepare: bool) -> list[dict]:
    rows = []
    for ef in efs:
        conn.execute(f"SET hnsw.ef_search = {int(ef)}")
        latencies, face_hits, identity_hits = [], 0, 0
        for i, probe in enumerate(data.probes):
            t = time.perf_counter()
            found = conn.execute(sql, {"p": probe, "c": DEFAULT_COLLECTION_ID, "k": k}, prepare=prepare).fetchall()
            latencies.append((time.perf_counter() - t) * 1000)
            exact = int(data.exact_face[i])
            face_hits += found[0][0] == exact + 1  # face ids 1..N in file order
            identity_hits += found[0][1] == person_id(int(data.owner[exact]))
        n = len(data.probes)
        row = {"ef": ef, "prepare": prepare, "recall_at_1_face": face_hits / n, "recall_at_1_identity": identity_hits / n,
               **percentiles(latencies), "load_average": os.getloadavg()[0]}
        rows.append(row)
        log.warning("  ef=%-4s prepare=%-5s recall@1 face=%.4f identity=%.4f p50=%.2fms p99=%.2fms", ef, prepare,
                    row["recall_at_1_face"], row["recall_at_1_identity"], row["p50_ms"], row["p99_ms"])
    return rows


def service_options(url: str, ef: int | str, index_options: list[str] | None):
    """The bench's PostgresOptions at ``ef`` (``FACE_HNSW_EF_SEARCH``), with the index's own m and
    ef_construction (its reloptions, e.g. ``["m=24", "ef_construction=200"]``) as the replica's settings."""
    from dataclasses import replace

    built = dict(opt.split("=", 1) for opt in index_options or [])
    return replace(pg_options(url, ef), hnsw_m=int(built.get("m", 16)),
                   hnsw_ef_construction=int(built.get("ef_construction", 200)))


def service_search(url: str, data: Data, top_k: int, ef: int | str, index_options: list[str] | None) -> dict:
    """The whole service search at ``ef`` (PostgresGalleries, its pool and pipeline, configured for the
    index: ``service_options``), after a warm-up."""
    from service.gallery.postgres.backend import PostgresGalleries

    galleries = PostgresGalleries(service_options(url, ef, index_options), MODEL_ID, data.flat.shape[1])
    galleries.open()
    try:
        gallery = galleries.default
        for probe in data.probes[:100]:
            gallery.search(probe[None, :], top_k)
        latencies, identity_hits = [], 0
        for i, probe in enumerate(data.probes):
            t = time.perf_counter()
            best = gallery.search(probe[None, :], top_k)[0]
            latencies.append((time.perf_counter() - t) * 1000)
            identity_hits += best[0].identity_id == person_id(int(data.owner[data.exact_face[i]]))
        return {"ef": ef, "ef_used": search_ef(ef, gallery.face_count, top_k * OVERSAMPLE),
                "recall_at_1_identity": identity_hits / len(data.probes), **percentiles(latencies)}
    finally:
        galleries.close()


def perf_profile(conn, sql: str, data: Data, k: int, seconds: float) -> dict:
    """``perf record`` of this connection's backend while it searches at the current ef; top symbols."""
    pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "perf.data"
        rec = subprocess.Popen(["perf", "record", "-F", "999", "-e", "cpu-clock", "-p", str(pid), "-o", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        searches, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            conn.execute(sql, {"p": data.probes[searches % len(data.probes)], "c": DEFAULT_COLLECTION_ID, "k": k},
                         prepare=True).fetchall()
            searches += 1
        rec.send_signal(2)
        rec.wait(timeout=60)
        report = subprocess.run(["perf", "report", "-i", str(out), "--stdio", "--no-children", "--sort", "dso,symbol",
                                 "--percent-limit", "0.7"], capture_output=True, text=True).stdout
    top = []
    for line in report.splitlines():
        hit = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[.\]\s+(.+)$", line)
        if hit:
            top.append({"percent": float(hit.group(1)), "dso": hit.group(2),
                        "symbol": re.sub(r"(\s+-)+$", "", hit.group(3).strip())})
    return {"seconds": seconds, "searches": searches, "top_symbols": top}


def run_variant(args, data: Data, variant: Variant, pginstall: Path | None, first: bool) -> dict:
    import psycopg
    from pgvector.psycopg import register_vector

    pgdata = args.workdir / f"pg_{args.faces}"
    configure(pgdata, {"shared_buffers": variant.shared_buffers, "effective_cache_size": args.effective_cache_size,
                       "huge_pages": variant.huge_pages})
    try:
        server = PgServer(pgdata, pginstall=pginstall)
    except Exception:
        if variant.huge_pages == "on":
            log.error("huge_pages=on: the server did not start; reserve the pages first, as root: sysctl "
                      "vm.nr_hugepages=N (N: `postgres -D PGDATA -C shared_memory_size_in_huge_pages`); %s",
                      huge_pages_meminfo())
        raise
    out: dict = {"variant": str(variant), "pginstall": str(pginstall) if pginstall else "wheel",
                 "load_average_start": os.getloadavg(), "huge_pages_meminfo": huge_pages_meminfo()}
    try:
        dim = data.flat.shape[1]
        k = args.top_k * OVERSAMPLE
        efs = [search_ef(AUTO, len(data.flat), k) if ef == AUTO else int(ef) for ef in args.ef]
        sql = knn_sql(dim, variant.index)
        with psycopg.connect(server.url, **pg_options(server.url).connect_kwargs()) as conn:
            register_vector(conn)
            conn.execute("SET statement_timeout = 0")
            out["server_settings"] = {key: conn.execute(f"SHOW {key}").fetchone()[0]
                                      for key in ("shared_buffers", "effective_cache_size", "server_version",
                                                  "huge_pages", "huge_pages_status", "shared_memory_size_in_huge_pages")}
            log.warning("%s: %s, %s", variant, out["server_settings"], out["huge_pages_meminfo"])
            index = halfvec_index_name(dim) if variant.index == "halfvec" else hnsw_index_name(dim)
            out["index"] = {"name": index, "bytes": conn.execute("SELECT pg_relation_size(%s::regclass)", (index,)).fetchone()[0],
                            "options": conn.execute("SELECT reloptions FROM pg_class WHERE oid = %s::regclass",
                                                    (index,)).fetchone()[0]}
            started = time.perf_counter()
            conn.execute(f"SET hnsw.ef_search = {max(efs)}")
            for probe in data.probes:  # warm-up: the pages the searches touch, into shared buffers
                conn.execute(sql, {"p": probe, "c": DEFAULT_COLLECTION_ID, "k": k}).fetchall()
            out["warm_up_seconds"] = round(time.perf_counter() - started, 1)
            out["vector_so"] = mapped_vector_so(conn)
            log.warning("%s: warm-up %.1f s, %s", variant, out["warm_up_seconds"], out["vector_so"])
            out["search"] = [row for prepare in (False, True) for row in sweep(conn, sql, data, efs, k, prepare)]
            generic = sql.replace("%(p)b", "$1").replace("%(c)s", "$2").replace("%(k)s", "$3")
            out["generic_plan"] = [r[0] for r in conn.execute("EXPLAIN (GENERIC_PLAN) " + generic)]
            out["explain"] = []
            for ef in efs:
                conn.execute(f"SET hnsw.ef_search = {int(ef)}")
                out["explain"].append({"ef": ef, **explain(conn, sql, data, k, args.explain_probes)})
                log.warning("  explain ef=%s: %s", ef, out["explain"][-1])
            if first and args.perf:
                conn.execute(f"SET hnsw.ef_search = {efs[0]}")
                out["perf"] = {"ef": efs[0], **perf_profile(conn, sql, data, k, args.perf)}
                log.warning("  perf: %s", out["perf"]["top_symbols"][:12])
        if args.service:
            out["service_search"] = [service_search(server.url, data, args.top_k, ef, out["index"]["options"])
                                     for ef in args.service_ef]
            log.warning("  service search: %s", out["service_search"])
    finally:
        server.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, required=True, help="where gallery_backends --phase build put pg_<faces>")
    parser.add_argument("--probes", type=int, default=1000)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="the build's")
    parser.add_argument("--ef", nargs="+", default=[AUTO, "256", "192", "128", "96"], help="auto or numbers")
    parser.add_argument("--variants", nargs="+", type=Variant.parse, default=[Variant("wheel", "2GB", "vector")],
                        help="TREE:SHARED_BUFFERS:INDEX[:HUGE_PAGES], e.g. wheel:2GB:vector native:2GB:vector wheel:2GB:vector:on")
    parser.add_argument("--tree", action="append", default=[], metavar="NAME=DIR",
                        help="an install tree with pgvector built here (scripts/build-pgvector --prefix DIR)")
    parser.add_argument("--effective-cache-size", default="4GB")
    parser.add_argument("--build-halfvec", action="store_true", help="build the halfvec index first (if missing)")
    parser.add_argument("--m", type=int, default=16, help="of the halfvec index (the vector index's are recorded)")
    parser.add_argument("--ef-construction", type=int, default=200)
    parser.add_argument("--rebuild-index", metavar="M,EF_CONSTRUCTION",
                        help="first drop the service's index and build it again with these (m variants)")
    parser.add_argument("--explain-probes", type=int, default=100)
    parser.add_argument("--service", action="store_true", help="also the whole service search (each variant)")
    parser.add_argument("--service-ef", nargs="+", default=[AUTO], help="the service search's ef: auto or numbers")
    parser.add_argument("--perf", type=float, default=0, help="seconds of perf record (first variant)")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    args.workdir = args.workdir.resolve()
    args.ef = [AUTO if ef == AUTO else int(ef) for ef in args.ef]
    args.service_ef = [AUTO if ef == AUTO else int(ef) for ef in args.service_ef]
    trees = dict(t.split("=", 1) for t in args.tree)
    data = Data(args.faces, args.probes, args.seed)
    payload: dict = {"benchmark": "pg_tuning", "machine": machine(), "load_average_start": os.getloadavg(),
                     "config": {"faces": len(data.flat), "probes": args.probes, "top_k": args.top_k,
                                "k_rows": args.top_k * OVERSAMPLE, "ef": args.ef, "seed": args.seed,
                                "effective_cache_size": args.effective_cache_size,
                                "variants": [str(v) for v in args.variants],
                                "trees": trees,
                                "data": "synthetic (gallery_backends.Data): identity centres + noise, 2 faces each"}}
    if args.rebuild_index:
        m, efc = (int(v) for v in args.rebuild_index.split(","))
        server = PgServer(args.workdir / f"pg_{args.faces}")
        try:
            payload["index_rebuild"] = rebuild_index(server.url, data.flat.shape[1], m, efc)
        finally:
            server.stop()
    if args.build_halfvec:
        server = PgServer(args.workdir / f"pg_{args.faces}")
        try:
            payload["halfvec_build"] = build_halfvec(server.url, data.flat.shape[1], args.m, args.ef_construction,
                                                     PgServer.SETTINGS["maintenance_work_mem"])
        finally:
            server.stop()
    payload["variants"] = []
    for i, variant in enumerate(args.variants):
        pginstall = None
        if variant.tree != "wheel":
            assert variant.tree in trees, f"--tree {variant.tree}=DIR is needed for {variant}"
            pginstall = Path(trees[variant.tree]).resolve()
        payload["variants"].append(run_variant(args, data, variant, pginstall, first=i == 0))
    # leave the data dir as the build configured it
    configure(args.workdir / f"pg_{args.faces}", {**{k: PgServer.SETTINGS[k] for k in ("shared_buffers", "effective_cache_size")},
                                                  "huge_pages": "try"})
    payload["load_average_end"] = os.getloadavg()
    path = save(f"pg_tuning_{len(data.flat)}{args.tag}", payload)
    log.warning("saved %s", path)
    print(json.dumps({v["variant"]: [(r["ef"], r["prepare"], r["p50_ms"], r["p99_ms"], r["recall_at_1_identity"])
                                     for r in v["search"]] for v in payload["variants"]}, indent=1))


if __name__ == "__main__":
    main()
