"""What migrating a collection to another model costs (issue 22): throughput, disk, and what it does
to the traffic of the collection being migrated.

For each backend (embedded, PostgreSQL from harness/pg.py), in one run:

1. **Seed** collection ``a`` (``keep_crops``) with ``--faces`` faces, ``--faces-per-identity`` per
   identity, straight through the backend interface (``Galleries.create_collection`` +
   ``GalleryBackend.enroll(..., crops=)``, one enroll per identity as the service writes them, no HTTP):
   the crops are real aligned LFW crops (``../shared/data/lfw-112``, every k-th file, cycled) encoded
   as the service stores them (``crops.encode_crop``: PNG) and sealed by the backend; the vectors are
   random unit vectors (A's vectors play no part in the migration's cost). ``a`` is pinned to
   ``harness/models.py``'s tiny 64-d model, so that the migration re-embeds every crop with the real
   default model (SFace), the cost an operator's migration pays (``--to tiny``: the tiny model, i.e.
   the job's own overhead with next to no model cost).
2. **Serve** both models (``FACE_MODELS=sface=...,tiny=...``, the crop key) from a real server
   (harness/server.py) on that gallery. A paced reader (``--identify-rps``, one request at a time)
   sends ``POST /collections/a/identify`` with an aligned LFW crop for ``--before-s`` seconds (the
   baseline), then ``POST /collections/a/migrate {"model": "sface", "into": "b"}`` starts the job and
   the reader goes on until ``GET /jobs/{id}`` says ``done``: identify p50/p99 before vs during.
3. **Throughput**: faces/s of the whole job (POST to ``done``: copy, catch-up and the comparison
   report) and of its copy phase alone (from the job's progress samples), extrapolated linearly to 1M
   faces (the per-face work does not grow with the gallery; compare 10k and 100k to check).
4. **Disk**: bytes of a sealed crop (read back with ``iter_crops``) x 1M, and the store's measured
   growth per face while seeding ``a`` (faces + vectors + crops + index) and while the job filled ``b``
   (the real cost of keeping B's crops), scaled to 1M. Embedded: the data dir's files after a clean
   stop; PostgreSQL: ``pg_total_relation_size`` of every table of the schema after VACUUM.

    nice -n 10 python -m bench.migration --faces 10000 [--backends embedded,postgres] [--to sface]

Saves bench/results/migration_<faces>[_tag].json with the machine, the load average before and after
(the development box is shared: its 2 cores run other engineers' jobs) and the configuration.
"""

from __future__ import annotations

import argparse
import base64
import os
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from bench.common import current_commit, machine, percentiles, save
from harness.models import tiny_model
from harness.server import MODEL_CACHE, REPO, ServerProcess

DATA = REPO.parent / "shared" / "data" / "lfw-112"
SOURCE, TARGET = "a", "b"
SOURCE_MODEL, TARGET_MODEL = "tiny", "sface"  # served names (FACE_MODELS)


def load_crops(data: Path, n: int) -> tuple[list[bytes], list[str]]:
    """``n`` aligned crops of ``data`` (every k-th file, sorted, so all of the set is sampled) as the
    service stores them (PNG bytes, crops.encode_crop), and the same crops as base64 probes."""
    from PIL import Image

    from bench.embeddings import list_dataset
    from service.gallery.crops import encode_crop

    files, _, _ = list_dataset(data)
    chosen = files[::max(1, len(files) // n)][:n]
    encoded = [encode_crop(np.asarray(Image.open(f).convert("RGB"), dtype=np.uint8)) for f in chosen]
    return encoded, [base64.b64encode(e).decode() for e in encoded]


def seed(collection, faces: int, per_identity: int, crops: list[bytes], threads: int = 1) -> dict:
    """Enroll ``faces`` faces into ``collection`` (a GalleryBackend), ``per_identity`` per identity, one
    enroll per identity (random unit vectors, seeded by the identity's number; the cycled ``crops``)
    from ``threads`` threads (PostgreSQL commits one transaction per enroll: several in flight fill it
    faster); returns counts and timing."""
    from concurrent.futures import ThreadPoolExecutor

    starts = list(range(0, faces, per_identity))

    def enroll(i: int) -> None:
        start = starts[i]
        n = min(per_identity, faces - start)
        vectors = np.random.default_rng(i).standard_normal((n, collection.dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        collection.enroll(f"person-{i:07d}", vectors, {"seeded": True},
                          crops=[crops[(start + k) % len(crops)] for k in range(n)])

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(enroll, range(len(starts))))
    seconds = time.perf_counter() - t0
    return {"identities": len(starts), "faces": faces, "threads": threads, "seconds": round(seconds, 2),
            "faces_per_s": round(faces / seconds, 1)}


def raw_session_rate(model_path: Path, crops: list[bytes], batch: int, seconds: float = 10.0) -> float:
    """Faces/s of the target model's bare onnxruntime session (the server's settings: CPU, 2 intra-op
    threads) on decoded crops at the job's batch size: the ceiling a migration can approach."""
    from service.config import Settings
    from service.gallery.crops import decode_crop
    from service.model.runtime import EmbeddingModel

    model = EmbeddingModel(model_path, Settings(providers="cpu", intra_op_threads=2, model_cache_dir=MODEL_CACHE))
    model.initialize()
    try:
        faces = np.stack([decode_crop(crops[i % len(crops)]) for i in range(batch)])
        model.execute(faces)  # warm-up
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            model.execute(faces)
            done += batch
        return done / (time.perf_counter() - t0)
    finally:
        model.finalize()


def sealed_crop_bytes(collection, limit: int = 2000) -> float:
    """Mean size of the sealed blobs the backend stored (the first ``limit`` by face id)."""
    sizes: list[int] = []
    after = 0
    while len(sizes) < limit:
        page = collection.iter_crops(after, min(256, limit - len(sizes)))
        if not page:
            break
        sizes += [len(blob) for _, _, blob in page]
        after = page[-1][0]
    return float(np.mean(sizes))


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def pg_schema_bytes(url: str, schema: str) -> int:
    """Heap + TOAST + indexes of every table of ``schema``, after VACUUM (dead tuples out of the count)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind = 'r'", (schema,)).fetchall()]
        for table in tables:
            conn.execute(f'VACUUM "{schema}"."{table}"')
        row = conn.execute(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relkind = 'r'",
            (schema,)).fetchone()
    assert row is not None
    return int(row[0])


class PacedReader(threading.Thread):
    """One client sending ``POST /collections/a/identify`` (one aligned crop) at ``rps``, one at a
    time; each answer is recorded under the phase current when its request started."""

    def __init__(self, url: str, probes: list[str], rps: float) -> None:
        super().__init__(daemon=True)
        self.url, self.probes, self.interval = url, probes, 1.0 / rps
        self.phase = "warmup"  # not reported: the first requests open the collection and warm the batcher
        self.samples: dict[str, list[float]] = {}
        self.errors: dict[str, dict[str, int]] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            i = 0
            next_at = time.perf_counter()
            while not self._halt.is_set():
                phase = self.phase
                t0 = time.perf_counter()
                try:
                    r = client.post(f"/collections/{SOURCE}/identify",
                                    json={"images": [self.probes[i % len(self.probes)]], "top_k": 5})
                    status = str(r.status_code)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                if status == "200":
                    self.samples.setdefault(phase, []).append((time.perf_counter() - t0) * 1000)
                else:
                    counts = self.errors.setdefault(phase, {})
                    counts[status] = counts.get(status, 0) + 1
                i += 1
                next_at += self.interval
                self._halt.wait(max(0.0, next_at - time.perf_counter()))

    def stop(self) -> None:
        self._halt.set()
        self.join(60)

    def summary(self) -> dict:
        return {phase: {"requests": len(ms), **percentiles(ms), "errors": self.errors.get(phase, {})}
                for phase, ms in self.samples.items() if phase != "warmup"}


def migrate(url: str, target: str, batch_size: int, timeout_s: float) -> dict:
    """Start the job over HTTP and poll it to the end; its progress samples and timings."""
    with httpx.Client(base_url=url, timeout=60) as client:
        t0 = time.perf_counter()
        r = client.post(f"/collections/{SOURCE}/migrate", json={"model": target, "into": TARGET,
                                                                 "batch_size": batch_size})
        if r.status_code != 202:
            raise RuntimeError(f"POST migrate answered {r.status_code}: {r.text}")
        job = r.json()["job"]
        samples: list[dict] = []
        slowest_poll, poll_timeouts = 0.0, 0
        while time.perf_counter() - t0 < timeout_s:
            asked = time.perf_counter()
            try:  # a server that stops answering is a finding, not the end of the run
                job = client.get(f"/jobs/{job['id']}").json()
            except httpx.TimeoutException:
                poll_timeouts += 1
                continue
            finally:
                slowest_poll = max(slowest_poll, time.perf_counter() - asked)
            progress = job["progress"]
            samples.append({"t": round(time.perf_counter() - t0, 2), "state": job["state"], **progress})
            if job["state"] in ("done", "failed", "cancelled"):
                break
            time.sleep(1.0)
        seconds = time.perf_counter() - t0
    copy = [s for s in samples if s["phase"] == "copy" and s["faces_done"]]
    copy_end = next((s["t"] for s in samples if s["phase"] in ("catch_up", "compare", "done")), seconds)
    copy_rate = None
    if len(copy) >= 2 and copy[-1]["t"] > copy[0]["t"]:  # the rate between the first and last copy sample
        copy_rate = (copy[-1]["faces_done"] - copy[0]["faces_done"]) / (copy[-1]["t"] - copy[0]["t"])
    faces = job["progress"]["faces_total"]
    return {"job_id": job["id"], "state": job["state"], "error": job.get("error"), "seconds": round(seconds, 2),
            "faces": faces, "faces_per_s": round(faces / seconds, 1) if seconds else None,
            "copy_phase_s": round(copy_end, 2),
            "copy_faces_per_s": round(copy_rate, 1) if copy_rate else None,
            "job_faces_per_s": job["progress"].get("faces_per_s"),
            "slowest_job_poll_s": round(slowest_poll, 2), "job_poll_timeouts_60s": poll_timeouts,
            "report": _report_summary(job.get("report")), "samples": samples}


def _report_summary(report: dict | None) -> dict | None:
    if not report:
        return None
    keep = ("paired_probes", "top1_agreement", "changed_count", "identities_changed", "unpaired_identities",
            "seconds", "sampled")
    return {**{k: report[k] for k in keep if k in report},
            **{f"{side}_rank1": report[side].get("rank1") for side in ("source", "target") if side in report}}


def run_backend(backend: str, args: argparse.Namespace, work: Path, crops: list[bytes], probes: list[str],
                models: dict[str, Path], pg=None) -> dict:
    from service.config import Settings
    from service.gallery.crops import write_key_file
    from service.gallery.open import open_gallery
    from service.model.contract import read_contract

    root = work / backend
    data_dir = root / "data"
    data_dir.mkdir(parents=True)
    key = root / "crop.key"
    write_key_file(key)
    contracts = {name: read_contract(path) for name, path in models.items()}
    served = {c.model_id: c.embedding_size for c in contracts.values()}
    default = contracts[TARGET_MODEL]
    env = {"FACE_MODELS": ",".join(f"{name}={path}" for name, path in models.items()),
           "FACE_CROP_KEY_FILE": str(key), "FACE_ENROLL_HUB_ALPHA": "0", "FACE_LOG_LEVEL": "warning"}
    if pg is not None:
        env |= pg.gallery_env()
    settings = Settings(data_dir=data_dir, crop_key_file=key, database_url=env.get("FACE_DATABASE_URL"),
                        database_schema=env.get("FACE_DATABASE_SCHEMA", "public"))

    def size() -> int:
        if pg is not None:
            return pg_schema_bytes(env["FACE_DATABASE_URL"], env["FACE_DATABASE_SCHEMA"])
        return dir_bytes(data_dir)

    source = contracts[SOURCE_MODEL]
    galleries = open_gallery(settings, default.model_id, default.embedding_size, served=served)
    try:
        galleries.create_collection(SOURCE, keep_crops=True, model_id=source.model_id, dim=source.embedding_size)
    finally:
        galleries.close()
    empty = size()
    galleries = open_gallery(settings, default.model_id, default.embedding_size, served=served)
    try:
        seeded = seed(galleries.collection(SOURCE), args.faces, args.faces_per_identity, crops,
                      args.seed_threads if pg is not None else 1)
        sealed = sealed_crop_bytes(galleries.collection(SOURCE))
    finally:
        galleries.close()
    after_seed = size()
    print(backend, "seeded", seeded, flush=True)

    server = ServerProcess(data_dir, env=env, log_path=root / "server.log")
    reader = None
    try:
        server.wait_ready(timeout=600)
        reader = PacedReader(server.url, probes, args.identify_rps)
        reader.start()
        time.sleep(3)
        reader.phase = "before"
        time.sleep(args.before_s)
        reader.phase = "during"
        load_before = os.getloadavg()
        if args.skip_migration:  # the harness alone (seeding, disk, identify): a second baseline window
            time.sleep(args.before_s)
            migration = {"faces": 0, "faces_per_s": None, "copy_faces_per_s": None, "samples": [], "skipped": True}
        else:
            migration = migrate(server.url, args.to, args.batch_size, args.timeout_s)
        load_after = os.getloadavg()
        reader.phase = "after"
        time.sleep(min(args.before_s, 5))
    finally:
        if reader is not None:
            reader.stop()
        server.stop()
    after_migration = size()
    per_face_a = (after_seed - empty) / seeded["faces"]
    per_face_b = (after_migration - after_seed) / max(1, migration["faces"])
    latency = reader.summary() if reader is not None else {}
    result = {
        "seed": seeded,
        "migration": {k: v for k, v in migration.items() if k != "samples"},
        "progress_samples": migration["samples"],
        "extrapolated_1m": {
            "hours_whole_job": round(1e6 / migration["faces_per_s"] / 3600, 2) if migration["faces_per_s"] else None,
            "hours_copy_phase": round(1e6 / migration["copy_faces_per_s"] / 3600, 2)
            if migration["copy_faces_per_s"] else None},
        "identify": latency,
        "identify_p99_during_over_before": round(latency["during"]["p99_ms"] / latency["before"]["p99_ms"], 2)
        if "during" in latency and "before" in latency else None,
        "disk": {
            "sealed_crop_bytes_mean": round(sealed, 1),
            "sealed_crops_gb_per_million": round(sealed * 1e6 / 1e9, 2),
            "store_bytes_empty": empty, "store_bytes_after_seed": after_seed,
            "store_bytes_after_migration": after_migration,
            "a_bytes_per_face": round(per_face_a, 1), "a_gb_per_million_faces": round(per_face_a * 1e6 / 1e9, 2),
            "b_bytes_per_face": round(per_face_b, 1), "b_gb_per_million_faces": round(per_face_b * 1e6 / 1e9, 2)},
        "load_average_during": {"at_start": load_before, "at_done": load_after},
    }
    print(backend, {k: v for k, v in result.items() if k != "progress_samples"}, flush=True)
    return result


def main(argv: list[str] | None = None, pg=None) -> None:
    """``pg``: a running harness.pg.PgTestServer to use (a test suite's) instead of starting one."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=int, default=10_000)
    parser.add_argument("--faces-per-identity", type=int, default=4)
    parser.add_argument("--backends", default="embedded,postgres")
    parser.add_argument("--to", choices=[TARGET_MODEL, SOURCE_MODEL + "2"], default=TARGET_MODEL,
                        help="the model B is pinned to: sface (the real default model) or tiny2 (a second tiny "
                             "model: the job's own overhead, next to no model cost)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed-threads", type=int, default=4, help="concurrent enrolls while seeding PostgreSQL")
    parser.add_argument("--crops", type=int, default=1000, help="distinct LFW crops cycled through the faces")
    parser.add_argument("--identify-rps", type=float, default=4.0)
    parser.add_argument("--before-s", type=float, default=30.0)
    parser.add_argument("--timeout-s", type=float, default=4 * 3600)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--workdir", type=Path, help="where the galleries go (default: a temporary directory)")
    parser.add_argument("--skip-migration", action="store_true",
                        help="seed, measure disk and identify twice without starting the job")
    parser.add_argument("--note", default="", help="what else ran meanwhile (saved in the JSON)")
    parser.add_argument("--tag", default="")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    from service.model.prepare import default_model

    load_start = os.getloadavg()
    crops, probes = load_crops(args.data, args.crops)
    raw_rate = raw_after = None
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        models = {TARGET_MODEL: default_model(MODEL_CACHE), SOURCE_MODEL: tiny_model(work / "tiny.onnx", dim=64)}
        if args.to != TARGET_MODEL:
            models[args.to] = tiny_model(work / "tiny2.onnx", dim=64, name="tiny2", seed=1)
        own_pg = pg is None
        if not args.skip_migration:
            raw_rate = round(raw_session_rate(models[args.to], crops, args.batch_size), 1)
            print("raw session", args.to, raw_rate, "faces/s", flush=True)
        try:
            for backend in args.backends.split(","):
                if backend == "postgres" and pg is None:
                    from harness.pg import PgTestServer

                    pg = PgTestServer()
                results[backend] = run_backend(backend, args, work, crops, probes, models,
                                               pg if backend == "postgres" else None)
            if not args.skip_migration:  # the load moves: the bare session again, after the runs
                raw_after = round(raw_session_rate(models[args.to], crops, args.batch_size), 1)
        finally:
            if pg is not None and own_pg:
                pg.close()
    payload = {
        "benchmark": "migration", "machine": machine(), "commit": current_commit(),
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "note": "shared 2-core development box: other engineers' tests and benchmarks ran at the same time "
                "(load averages recorded); client, server and PostgreSQL share the same 2 cores",
        "run_note": args.note,
        "config": {"faces": args.faces, "faces_per_identity": args.faces_per_identity, "to": args.to,
                   "source_model": SOURCE_MODEL, "batch_size": args.batch_size, "distinct_crops": len(crops),
                   "dataset": args.data.name, "identify_rps": args.identify_rps, "before_s": args.before_s,
                   "identify_probe": "one aligned LFW crop (base64 PNG) per request, top_k 5, on collection a",
                   "seeding": "GalleryBackend.enroll per identity with crops (no HTTP), random unit vectors"},
        "raw_session_faces_per_s": raw_rate, "raw_session_faces_per_s_after": raw_after,
        "results": results,
    }
    for result in results.values():  # what share of the bare model's speed the whole job reaches
        rate = result["migration"].get("faces_per_s")
        raw_mean = (raw_rate + raw_after) / 2 if raw_rate and raw_after else raw_rate
        result["migration"]["share_of_raw_session"] = round(rate / raw_mean, 3) if rate and raw_mean else None
    name = f"migration_{args.faces}" + (f"_{args.to}" if args.to != TARGET_MODEL else "") + (
        f"_{args.tag}" if args.tag else "")
    print(save(name, payload, args.output))


if __name__ == "__main__":
    main()
