"""Faces of several dimensions in one PostgreSQL table (migration 6), measured against the layout before.

Before: ``faces.embedding vector(D)`` and one HNSW index on it. After (several models served): the
column is an untyped ``vector`` and each dimension has a partial expression index
``USING hnsw ((embedding::vector(D)) vector_cosine_ops) WHERE vector_dims(embedding) = D``, searched
with the same cast and predicate (service/gallery/postgres/backend.py, HNSW_SQL). One run, one
throwaway PostgreSQL (harness/pg.py), synthetic faces (bench.gallery_search):

* ``migration``: the typed table of ``--faces`` D-d faces, then migration 6's ALTER COLUMN TYPE vector:
  its time and whether the table was rewritten (relfilenode), then the index build it needs;
* ``typed`` vs ``partial``: index build time and size, kNN latency (p50/p99, one probe per query, ef_search
  100) and recall@10 against the exact answer, for the same D-d faces and probes; ``partial`` also holds
  as many faces of a second dimension (another model's collection) in the same table.

    python -m bench.pg_dimensions [--faces 20000] [--dim 128] [--other-dim 64] [--probes 300]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import psycopg
from pgvector.psycopg import register_vector

from bench.common import machine, percentiles, save
from bench.gallery_search import synthetic_gallery, unit


def _load(conn: psycopg.Connection, table: str, column_type: str, sets: list[np.ndarray]) -> None:
    conn.execute(f"CREATE TABLE {table} (face_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
                 f"embedding {column_type} NOT NULL)")
    with conn.cursor() as cur:
        for vectors in sets:
            with cur.copy(f"COPY {table} (embedding) FROM STDIN WITH (FORMAT BINARY)") as copy:
                copy.set_types(["vector"])
                for v in vectors:
                    copy.write_row((v,))
    conn.execute(f"VACUUM ANALYZE {table}")


def _timed(conn: psycopg.Connection, statement: str) -> float:
    started = time.perf_counter()
    conn.execute(statement)
    return time.perf_counter() - started


def _search(conn: psycopg.Connection, query: str, probes: np.ndarray, exact: list[set[int]], k: int) -> dict:
    conn.execute("SET hnsw.ef_search = 100")
    plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + query, (probes[0], k)))
    times, recall = [], []
    for probe, truth in zip(probes, exact):
        started = time.perf_counter()
        rows = conn.execute(query, (probe, k)).fetchall()
        times.append((time.perf_counter() - started) * 1000)
        recall.append(len({r[0] for r in rows} & truth) / k)
    return {"latency_ms": percentiles(times), "recall_at_10": round(float(np.mean(recall)), 4),
            "uses_hnsw": "hnsw" in plan.lower()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--other-dim", type=int, default=64)
    parser.add_argument("--probes", type=int, default=300)
    args = parser.parse_args(argv)
    from harness.pg import PgTestServer

    rng = np.random.default_rng(0)
    faces, _, probes = synthetic_gallery(args.faces // 4, 4, args.dim, args.probes, rng)
    flat = faces.reshape(-1, args.dim)
    other = unit(rng.normal(size=(len(flat), args.other_dim)))
    k = 10
    exact = [set((np.argsort(-(flat @ p))[:k] + 1).tolist()) for p in probes]  # face ids are 1..N in load order
    server = PgTestServer()
    out: dict = {"machine": machine(), "load_average": os.getloadavg(),
                 "config": {"faces": len(flat), "dim": args.dim, "other_dim_faces": len(other),
                            "other_dim": args.other_dim, "probes": args.probes, "k": k, "ef_search": 100,
                            "hnsw": {"m": 16, "ef_construction": 200}}}
    hnsw = "WITH (m = 16, ef_construction = 200)"
    try:
        with psycopg.connect(server.url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            register_vector(conn)
            conn.execute("SET maintenance_work_mem = '512MB'")
            # before: typed column, one index
            _load(conn, "typed", f"vector({args.dim})", [flat])
            build = _timed(conn, f"CREATE INDEX typed_hnsw ON typed USING hnsw (embedding vector_cosine_ops) {hnsw}")
            size = conn.execute("SELECT pg_relation_size('typed_hnsw')").fetchone()[0]  # type: ignore[index]
            out["typed"] = {"index_build_s": round(build, 2), "index_bytes": size, **_search(
                conn, "SELECT face_id FROM typed ORDER BY embedding <=> %s LIMIT %s", probes, exact, k)}
            # migration 6 on it: the index goes, the column loses its dimension, the partial index is built
            before = conn.execute("SELECT pg_relation_filenode('typed')").fetchone()[0]  # type: ignore[index]
            drop = _timed(conn, "DROP INDEX typed_hnsw")
            alter = _timed(conn, "ALTER TABLE typed ALTER COLUMN embedding TYPE vector")
            after = conn.execute("SELECT pg_relation_filenode('typed')").fetchone()[0]  # type: ignore[index]
            rebuild = _timed(conn, f"CREATE INDEX typed_hnsw_{args.dim} ON typed USING hnsw "
                             f"((embedding::vector({args.dim})) vector_cosine_ops) {hnsw} "
                             f"WHERE vector_dims(embedding) = {args.dim}")
            out["migration"] = {"drop_index_s": round(drop, 3), "alter_column_s": round(alter, 3),
                                "table_rewritten": before != after, "index_rebuild_s": round(rebuild, 2)}
            # after: untyped column, faces of two dimensions, a partial expression index each
            _load(conn, "mixed", "vector", [flat, other])
            builds = {}
            for dim in (args.dim, args.other_dim):
                builds[dim] = round(_timed(conn, f"CREATE INDEX mixed_hnsw_{dim} ON mixed USING hnsw "
                                           f"((embedding::vector({dim})) vector_cosine_ops) {hnsw} "
                                           f"WHERE vector_dims(embedding) = {dim}"), 2)
            size = conn.execute(f"SELECT pg_relation_size('mixed_hnsw_{args.dim}')").fetchone()[0]  # type: ignore[index]
            out["partial"] = {"index_build_s": builds[args.dim], "other_dim_index_build_s": builds[args.other_dim],
                              "index_bytes": size, **_search(
                                  conn, f"SELECT face_id FROM mixed WHERE vector_dims(embedding) = {args.dim} "
                                  f"ORDER BY embedding::vector({args.dim}) <=> %s LIMIT %s", probes, exact, k)}
    finally:
        server.close()
    path = save(f"pg_dimensions_{len(flat)}", out)
    print(path)
    print({key: out[key] for key in ("migration", "typed", "partial")})


if __name__ == "__main__":
    main()
