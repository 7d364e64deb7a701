"""A mid-sized collection beside a big one in the pgvector table: how it searches today, and what an
HNSW index of its own (a partial index ``WHERE collection_id = N``) would give (issue 25, collections).

Every collection's faces share one table and one HNSW index (``service.gallery.postgres.backend``). A
collection under ``HNSW_MIN_SHARE`` (10%) of the table is searched exactly, through its rows: a filtered
walk of the shared graph finds too few of its faces. This measures that exact path for a collection of
``--collection-faces`` faces beside the ``--faces`` of ``bench.gallery_backends --phase build``'s data
dir (use a copy: the collection and the index are left there for the next run unless ``--drop``):

1. the collection is imported through the service (``import_identities``: COPY into the shared table,
   so each face also enters the big HNSW index), timed;
2. ``PostgresGallery.search`` on it (the service's plan: exact), p50/p99 and identity recall@1 against
   numpy's exact answer;
3. a partial HNSW index of its faces is built (timed, its size), named as the service names it
   (``collection_index_name``), and the service's kNN statement for it (``OWN_HNSW_SQL``: the collection id
   as a literal, as the planner uses a partial index only when the query's WHERE implies its predicate,
   and without the dimension test) is timed at each ``--ef``, with its plan (the index it used) and recall;
4. ``PostgresGallery.search`` again, which now finds the index and searches through it (the service's
   ``auto`` ef for the collection's size).

    cp -a /work/bench-pg1m/pg_1000000 /work/bench-pg1m/pg_1000000_ab1   # or pg_settings_ab's copy
    python -m bench.pg_collection_index --pgdata /work/bench-pg1m/pg_1000000_ab1 --collection-faces 30000
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench.common import machine, percentiles, save
from bench.gallery_backends import PgServer
from bench.pg_tuning import service_options

log = logging.getLogger("bench.pg_collection_index")
MODEL_ID = "sface@2021dec-int8bq"  # gallery_backends' build
NAME = "mid"


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def collection_data(faces: int, per_identity: int, probes: int, dim: int, seed: int):
    """People (a centre each) with ``per_identity`` faces near it, and probes: new faces of some of them."""
    rng = np.random.default_rng(seed)
    people = faces // per_identity
    centres = unit(rng, people, dim)
    flat = centres.repeat(per_identity, axis=0) + 0.3 * unit(rng, people * per_identity, dim)
    flat /= np.linalg.norm(flat, axis=1, keepdims=True)
    asked = rng.choice(people, probes, replace=False)
    queries = centres[asked] + 0.3 * unit(rng, probes, dim)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    owner = np.arange(people).repeat(per_identity)
    exact = owner[(queries @ flat.T).argmax(axis=1)]  # the identity exact search answers
    return flat.astype(np.float32), queries.astype(np.float32), exact, per_identity


def timed(run, probes: np.ndarray, warm: int = 20) -> tuple[list, dict]:
    for p in probes[:warm]:
        run(p)
    answers, ms = [], []
    for p in probes:
        t = time.perf_counter()
        answers.append(run(p))
        ms.append((time.perf_counter() - t) * 1000)
    return answers, percentiles(ms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pgdata", type=Path, required=True, help="a copy of gallery_backends' pg_<faces> data dir")
    parser.add_argument("--collection-faces", type=int, default=30_000)
    parser.add_argument("--faces-per-identity", type=int, default=2)
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--ef", type=int, nargs="+", default=[40, 64, 100])
    parser.add_argument("--m", type=int, default=16, help="of the collection's own index")
    parser.add_argument("--ef-construction", type=int, default=200)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--drop", action="store_true", help="drop the index and the collection at the end")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")

    import psycopg
    from pgvector.psycopg import register_vector

    from service.gallery.postgres.backend import OWN_HNSW_SQL, PostgresGalleries, collection_index_name
    from service.gallery.search import OVERSAMPLE

    dim = 128
    flat, queries, exact, per = collection_data(args.collection_faces, args.faces_per_identity, args.probes, dim,
                                                args.seed)
    server = PgServer(args.pgdata)
    out: dict = {"benchmark": "pg_collection_index", "machine": machine(), "load_average_start": os.getloadavg(),
                 "config": {"pgdata": str(args.pgdata), "collection_faces": len(flat), "faces_per_identity": per,
                            "probes": len(queries), "top_k": args.top_k, "k_rows": args.top_k * OVERSAMPLE,
                            "ef": args.ef, "m": args.m, "ef_construction": args.ef_construction, "seed": args.seed,
                            "data": "synthetic: identity centres + noise; probes are new faces of its people"}}
    try:
        with psycopg.connect(server.url, autocommit=True) as conn:
            table_options = conn.execute(
                "SELECT c.reloptions FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'face_gallery' AND c.relname = 'faces_embedding_hnsw_128'").fetchone()[0]
        options = service_options(server.url, "auto", table_options)
        # the search as it was before collections had indexes of their own (none is built, and a
        # previous run's is dropped first): exact
        galleries = PostgresGalleries(replace(options, collection_index_min_faces=0), MODEL_ID, dim)
        galleries.open()
        try:
            if NAME not in {c.name for c in galleries.list_collections()}:
                galleries.create_collection(NAME)
            gallery = galleries.collection(NAME)
            with psycopg.connect(server.url, autocommit=True, options="-c search_path=face_gallery") as conn:
                conn.execute(f"DROP INDEX IF EXISTS {collection_index_name(gallery.collection_id)}")
            gallery.stats()
            if gallery.face_count == 0:
                started = time.perf_counter()
                for start in range(0, len(flat), 5000 * per):
                    rows = flat[start:start + 5000 * per]
                    gallery.import_identities([(f"m{(start // per) + i}", rows[i * per:(i + 1) * per], None)
                                               for i in range(len(rows) // per)])
                    log.warning("imported %d faces", start + len(rows))
                seconds = time.perf_counter() - started
                out["import"] = {"faces": len(flat), "seconds": round(seconds, 1),
                                 "faces_per_s": round(len(flat) / seconds, 1)}
            gallery.stats()
            assert gallery.face_count == len(flat), (gallery.face_count, len(flat))
            plan = gallery._plan(args.top_k * OVERSAMPLE)  # noqa: SLF001 - the path it takes
            out["table_faces"] = gallery._table_faces  # noqa: SLF001
            answers, lat = timed(lambda p: gallery.search(p[None], args.top_k)[0][0].identity_id, queries)
            out["service_search"] = {"plan": {"exact": plan.exact, "ef_search": plan.ef_search}, **lat,
                                     "recall_at_1_identity": float(np.mean([a == f"m{e}" for a, e in zip(answers, exact)]))}
            log.warning("service search (exact=%s): %s", plan.exact, out["service_search"])
            cid = gallery.collection_id
        finally:
            galleries.close()

        index = collection_index_name(cid)
        with psycopg.connect(server.url, **options.connect_kwargs()) as conn:
            register_vector(conn)
            if conn.execute("SELECT to_regclass(%s)", (index,)).fetchone()[0] is None:
                conn.execute("SET maintenance_work_mem = '1GB'")
                started = time.perf_counter()
                conn.execute(f"CREATE INDEX {index} ON faces USING hnsw ((embedding::vector({dim})) vector_cosine_ops) "
                             f"WITH (m = {args.m}, ef_construction = {args.ef_construction}) WHERE collection_id = {cid}")
                out["own_index_build_s"] = round(time.perf_counter() - started, 1)
            out["own_index_bytes"] = conn.execute("SELECT pg_relation_size(%s::regclass)", (index,)).fetchone()[0]
            conn.execute("ANALYZE faces")  # the planner's statistics of the new rows, as autovacuum keeps them
            # the service's statement for a collection's own index: the collection id a literal, no test of
            # the dimension (with it the planner multiplied the selectivities, expected ~150 rows and walked
            # the shared index, which found none of the collection's faces at a small ef)
            sql = OWN_HNSW_SQL.format(dim=dim, c=int(cid))
            k = args.top_k * OVERSAMPLE
            plan_text = "\n".join(r[0] for r in conn.execute("EXPLAIN " + sql, {"p": queries[0], "k": k}).fetchall())
            out["own_index_plan"] = plan_text
            out["own_index_used"] = index in plan_text
            rows = []
            for ef in args.ef:
                conn.execute(f"SET hnsw.ef_search = {int(ef)}")
                answers, lat = timed(lambda p: conn.execute(sql, {"p": p, "k": k}, prepare=True).fetchall()[0][1],
                                     queries)
                rows.append({"ef": ef, **lat,
                             "recall_at_1_identity": float(np.mean([a == f"m{e}" for a, e in zip(answers, exact)]))})
                log.warning("own index, ef %d: %s", ef, rows[-1])
            out["own_index_knn"] = rows
        # the service's own path to it (FACE_DATABASE_COLLECTION_INDEX_MIN_FACES: the index is the one the
        # service builds, by its name): PostgresGallery.search once its counts say the index is there
        galleries = PostgresGalleries(options, MODEL_ID, dim)
        galleries.open()
        try:
            gallery = galleries.collection(NAME)
            gallery.stats()
            plan = gallery._plan(args.top_k * OVERSAMPLE)  # noqa: SLF001
            answers, lat = timed(lambda p: gallery.search(p[None], args.top_k)[0][0].identity_id, queries)
            out["service_search_own_index"] = {
                "plan": {"exact": plan.exact, "own_index": plan.own_index, "ef_search": plan.ef_search}, **lat,
                "recall_at_1_identity": float(np.mean([a == f"m{e}" for a, e in zip(answers, exact)]))}
            log.warning("service search through its own index: %s", out["service_search_own_index"])
        finally:
            galleries.close()
        if args.drop:
            with psycopg.connect(server.url, **options.connect_kwargs()) as conn:
                conn.execute(f"DROP INDEX {index}")
        if args.drop:
            galleries = PostgresGalleries(options, MODEL_ID, dim)
            galleries.open()
            try:
                galleries.delete_collection(NAME)
            finally:
                galleries.close()
    finally:
        server.stop()
    out["load_average_end"] = os.getloadavg()
    path = save(f"pg_collection_index_{len(flat)}{args.tag}", out)
    log.warning("saved %s", path)


if __name__ == "__main__":
    main()
