"""Restart time after ``kill -9``: how long until /healthz and /readyz answer, at N faces.

Builds a gallery of N synthetic 128-d faces through the store's bulk path (bench.gallery_fill), then:

1. ``rebuild``: the first start finds no snapshot and builds the index from the store. This is
   what every restart after a ``kill -9`` cost before periodic snapshots (the old code also kept
   /healthz down until the index was built).
2. waits for the background snapshot, makes ``--changes`` enrollments and a tenth as many deletes
   over HTTP, then ``kill -9``.
3. ``snapshot+replay``: the restart loads the snapshot and replays the changes since.

    nice -n 19 python -m bench.restart_time --faces 100000 [--data-dir DIR] [--keep]

Saves bench/results/restart_time_<faces>.json. The model must be 128-d (the default, SFace).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import machine, save
from bench.gallery_fill import fill_store
from harness.fixtures import ENROLLED, b64, face_files
from harness.server import MODEL_CACHE, ServerProcess
from service.model.contract import read_contract
from service.model.prepare import default_model


def timed_start(data: Path, model: Path, env: dict) -> tuple[ServerProcess, dict]:
    """Start a server; seconds until /healthz and /readyz first answer 200, and the load log line."""
    started = time.monotonic()
    server = ServerProcess(data, model=model, env=env)
    health = ready = None
    with httpx.Client(base_url=server.url, timeout=10) as c:
        while ready is None:
            if server.proc.poll() is not None:
                raise RuntimeError(server.log())
            try:
                if health is None and c.get("/healthz").status_code == 200:
                    health = time.monotonic() - started
                if c.get("/readyz").status_code == 200:
                    ready = time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
    load = [json.loads(line) for line in server.log_path.read_text().splitlines()
            if '"gallery index ready"' in line][-1]
    return server, {"healthz_s": round(health, 2), "readyz_s": round(ready, 2), "source": load["source"],
                    "index_load_s": load["seconds"], "replayed_added": load.get("replayed_added"),
                    "replayed_erased": load.get("replayed_erased")}


def wait_for_snapshot(server: ServerProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if '"index snapshot written"' in server.log_path.read_text():
            return
        time.sleep(0.5)
    raise TimeoutError("no snapshot written")


def make_changes(url: str, count: int) -> dict:
    faces = [b64(face_files(name)[0]) for name in ENROLLED]
    with httpx.Client(base_url=url, timeout=60) as c:
        for i in range(count):
            r = c.post("/enroll", json={"identity_id": f"late{i:06d}", "images": [faces[i % len(faces)]]})
            r.raise_for_status()
        deleted = 0
        for i in range(0, count, 10):
            deleted += c.delete(f"/identities/syn{i:08d}").status_code == 200
    return {"enrolled": count, "deleted": deleted}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=int, default=100_000)
    parser.add_argument("--changes", type=int, default=200, help="enrollments after the snapshot (deletes: a tenth)")
    parser.add_argument("--snapshot-interval", type=float, default=5.0)
    parser.add_argument("--data-dir", type=Path, help="default: a temporary dir, removed at the end")
    parser.add_argument("--keep", action="store_true", help="keep the data dir")
    args = parser.parse_args(argv)

    model = default_model(MODEL_CACHE)
    contract = read_contract(model)
    data = args.data_dir or Path(tempfile.mkdtemp(prefix="restart-bench-")) / "data"
    # min_changes above what step 2 makes: the first snapshot (after the rebuild) is the only one, so the
    # restart really replays the changes
    env = {"FACE_SNAPSHOT_INTERVAL_S": str(args.snapshot_interval), "FACE_LOG_LEVEL": "info",
           "FACE_SNAPSHOT_MIN_CHANGES": str(args.changes * 2 + 10)}
    results: dict = {"config": {"faces": args.faces, "dim": contract.embedding_size, "model_id": contract.model_id,
                                "changes": args.changes, "snapshot_interval_s": args.snapshot_interval}}
    server = None
    try:
        t = time.monotonic()
        fill_store(data, contract.model_id, contract.embedding_size, args.faces, per_identity=1)
        results["fill_s"] = round(time.monotonic() - t, 1)
        print(f"store filled with {args.faces} faces in {results['fill_s']} s", flush=True)

        server, results["rebuild"] = timed_start(data, model, env)
        print("rebuild (no snapshot):", results["rebuild"], flush=True)
        t = time.monotonic()
        wait_for_snapshot(server, timeout=max(120, args.faces / 1000))
        results["first_snapshot_after_ready_s"] = round(time.monotonic() - t, 1)
        results["changes"] = make_changes(server.url, args.changes)
        time.sleep(0.5)
        server.kill()

        server, results["snapshot_replay"] = timed_start(data, model, env)
        print("snapshot + replay after kill -9:", results["snapshot_replay"], flush=True)
        server.stop()
        results["snapshot_bytes"] = (data / "index.hnsw").stat().st_size
    finally:
        if server is not None and server.proc.poll() is None:
            server.kill()
        if not args.keep and args.data_dir is None:
            shutil.rmtree(data.parent, ignore_errors=True)
    results["machine"] = machine()
    path = save(f"restart_time_{args.faces}", results)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
