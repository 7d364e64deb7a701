"""Property-based fuzzing of the real server with schemathesis (``scripts/fuzz``, which installs it).

For each gallery backend: a server with an admin key, a collection ``fz`` holding two people (three
committed faces each), an alias, a finished duplicates job and a second key, so that generated requests
reach the routes' logic instead of 404s. schemathesis then generates requests from the served OpenAPI
document (its examples, coverage, fuzzing and stateful phases) for ``--seconds`` and checks every
answer: no 5xx, every status code and content type declared, every body valid against its declared
schema, and (``--strict``) schema-valid requests accepted and schema-invalid ones refused. Afterwards
the server's log must hold no traceback. Exit status: 0 when nothing was found on any backend.

    scripts/fuzz [--backend embedded|postgres|both] [--seconds 300] [--seed N] [--workers 1] [--strict]
                 [--out DIR]

What it found first (stop 41): a key's ``rate_limit_rps`` of 5e-324 answered 500 (Retry-After of an
infinite wait); booleans and numeric strings taken as numbers by five JSON bodies; whole floats refused
for integer fields; ``/metrics`` not declaring 401. The in-suite version is tests/service/
test_hostile_sweep.py (derived from the same document, every route, both backends, in seconds).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from harness.fixtures import FACES
from harness.server import REPO, ServerProcess

KEY = "fuzz-admin-key-" + "f" * 32
CHECKS = ["not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance"]
STRICT_CHECKS = ["negative_data_rejection", "positive_data_acceptance"]


def seed_gallery(url: str) -> dict[str, str | int]:
    """What the generated requests' path parameters name (schemathesis.toml's [parameters]): alice and bob
    in the default collection and in ``fz``; ``face_id`` is one of alice's in ``fz``."""
    faces = sorted(FACES.glob("*.jpg"))[:6]
    with httpx.Client(base_url=url, headers={"X-API-Key": KEY}, timeout=60) as client:
        assert client.post("/collections", json={"name": "fz"}).status_code == 201
        for prefix in ("", "/collections/fz"):  # the default collection's routes and the named one's
            for person, files in (("alice", faces[:3]), ("bob", faces[3:])):
                for path in files:
                    r = client.post(f"{prefix}/enroll", data={"identity_id": person},
                                    files={"images": (path.name, path.read_bytes(), "image/jpeg")})
                    assert r.status_code == 200, r.text
        assert client.put("/aliases/al1", json={"collection": "fz"}).status_code == 200
        job = client.post("/collections/fz/duplicates/jobs", json={}).json()["job"]["id"]
        key = client.post("/keys", json={"role": "read", "note": "fuzz"}).json()["key_id"]
        face = client.get("/collections/fz/identities/alice").json()["face_ids"][1]
    return {"collection": "fz", "identity_id": "alice", "face_id": face, "name": "al1", "job_id": job,
            "key_id": key}


@contextmanager
def gallery_env(backend: str) -> Iterator[dict[str, str]]:
    """The server settings of a gallery on ``backend``: PostgreSQL, a test server of its own while in use."""
    if backend != "postgres":
        yield {}
        return
    from harness.pg import PgTestServer

    pg = PgTestServer()
    try:
        yield pg.gallery_env()
    finally:
        pg.close()


def fuzz_backend(backend: str, args: argparse.Namespace, env: dict[str, str]) -> bool:
    """One backend's run (``args``: main's options); True when schemathesis found nothing and the log
    holds no traceback."""
    work = args.out / backend
    shutil.rmtree(work, ignore_errors=True)  # a fresh gallery each run (the last run's report goes too)
    work.mkdir(parents=True)
    proc = ServerProcess(work / "data", env={"FACE_API_KEY": KEY, **env}, log_path=work / "server.log")
    try:
        proc.wait_ready()
        parameters = seed_gallery(proc.url)
        (work / "schemathesis.toml").write_text(
            "[parameters]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in parameters.items()))
        cmd = [args.schemathesis, "run", f"{proc.url}/openapi.json", "-H", f"X-API-Key: {KEY}",
               "-c", ",".join(CHECKS + (STRICT_CHECKS if args.strict else [])), "--max-time", str(args.seconds),
               "-w", str(args.workers), "--suppress-health-check", "all", "--continue-on-failure"]
        if args.seed is not None:
            cmd += ["--seed", str(args.seed)]
        started = time.monotonic()
        with open(work / "schemathesis.log", "w") as report:
            rc = subprocess.run(cmd, cwd=work, stdout=report, stderr=subprocess.STDOUT).returncode
        summary = (work / "schemathesis.log").read_text(errors="replace").splitlines()[-25:]
        print(f"== {backend}: schemathesis exit {rc} after {time.monotonic() - started:.0f} s", flush=True)
        print("\n".join(line for line in summary if line.strip()), flush=True)
    finally:
        proc.stop()
    tracebacks = proc.log().count("Traceback")
    print(f"== {backend}: {tracebacks} traceback(s) in {proc.log_path}", flush=True)
    return rc == 0 and tracebacks == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["embedded", "postgres", "both"], default="both")
    parser.add_argument("--seconds", type=int, default=300, help="schemathesis' time budget per backend")
    parser.add_argument("--seed", type=int, default=None, help="the generator's seed (repeats a run)")
    parser.add_argument("--strict", action="store_true",
                        help="also: schema-valid requests accepted, schema-invalid ones refused (finds where the "
                        "document and the validation disagree; some disagreements are by design: README)")
    parser.add_argument("--workers", type=int, default=1, help="requests in flight at once (conflicting writes "
                        "to the same people: merges, moves and deletes racing)")
    parser.add_argument("--out", type=Path, default=REPO / ".cache" / "fuzz")
    parser.add_argument("--schemathesis", type=lambda p: str(Path(p).resolve()),
                        default=str(Path(sys.executable).with_name("schemathesis")))
    args = parser.parse_args(argv)
    backends = ["embedded", "postgres"] if args.backend == "both" else [args.backend]
    clean = True
    for backend in backends:
        with gallery_env(backend) as env:
            clean &= fuzz_backend(backend, args, env)
    print("fuzz: nothing found" if clean else f"fuzz: FOUND something: the reports are under {args.out}")
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
