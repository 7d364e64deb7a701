"""A full disk, for real: the gallery on a small tmpfs (the embedded data dir, or the PostgreSQL
tablespace of the server's tables), filled through the API. Every write is answered 200 or 507
``storage_full`` (never a 500, never a dropped connection); reads go on; nothing acknowledged is lost
and nothing refused is stored, across kill -9; the log says so once a minute, not once a request;
once space is freed, writes are taken again without a restart."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import metric
from tests.server import REPO, ServerProcess, listed_identities

MODEL_ID = "sface@2021dec-int8bq"
SMALL_MB = 6
PAD = "x" * 4000  # metadata that fills the disk a few hundred identities in


@contextmanager
def small_disk(mb: int) -> Iterator[Path]:
    """A tmpfs of ``mb`` MB, in a directory outside pytest's tmp root (which is 0700: PostgreSQL's own
    user must reach a tablespace there); unmounted and removed however the test ends."""
    base = Path(tempfile.mkdtemp(prefix="face-full-"))
    base.chmod(0o755)
    disk = base / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mb}m,mode=0755", "tmpfs", str(disk)],
                          capture_output=True, text=True)
    try:
        if done.returncode != 0:  # not root (CI runs as root: podman's tests need it too)
            pytest.skip(f"a full disk needs a small filesystem: cannot mount a tmpfs here ({done.stderr.strip()})")
        yield disk
    finally:
        if done.returncode == 0:
            subprocess.run(["umount", "-l", str(disk)], check=False)
        shutil.rmtree(base, ignore_errors=True)


def fill(path: Path) -> None:
    """Take every byte left on the file system ``path`` is on."""
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass


def grow(path: Path, mb: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={mb}m", str(path)], check=True)


@pytest.fixture(params=["embedded", "postgres"])
def small_disk_server(request, tmp_path, default_model) -> Iterator[tuple[ServerProcess, Path, dict[str, str]]]:
    """A server whose gallery lives on a tmpfs of SMALL_MB: the data dir itself (embedded), or a
    tablespace the server's role creates its tables in (postgres: the WAL stays on the main disk, as
    when a database's data volume fills)."""
    with small_disk(SMALL_MB) as disk, ExitStack() as cleanup:
        yield from _server_on(request, disk, tmp_path, default_model, cleanup)


def _server_on(request, disk: Path, tmp_path: Path, default_model: Path,
               cleanup: ExitStack) -> Iterator[tuple[ServerProcess, Path, dict[str, str]]]:
    env: dict[str, str] = {}
    data_dir = disk / "data"
    if request.param == "postgres":
        import psycopg

        pg = request.getfixturevalue("postgres")
        data_dir = tmp_path / "data"
        location = disk / "ts"
        location.mkdir()
        shutil.chown(location, pg.system_user)
        tag = "full_" + uuid.uuid4().hex[:8]  # the role, its tablespace
        schema = pg.fresh_schema()

        def drop() -> None:  # what a failed set-up made too (IF EXISTS)
            with psycopg.connect(pg.url, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
                conn.execute(f"DROP TABLESPACE IF EXISTS {tag}")
                if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (tag,)).fetchone():
                    conn.execute(f"DROP OWNED BY {tag}")
                    conn.execute(f"DROP ROLE {tag}")

        cleanup.callback(drop)
        with psycopg.connect(pg.url, autocommit=True) as conn:
            database = conn.execute("SELECT current_database()").fetchone()[0]
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            conn.execute(f"CREATE ROLE {tag} LOGIN")
            conn.execute(f'GRANT CREATE ON DATABASE "{database}" TO {tag}')
            conn.execute(f"CREATE TABLESPACE {tag} OWNER {tag} LOCATION '{location}'")
            conn.execute(f"ALTER ROLE {tag} SET default_tablespace = {tag}")
        env = {"FACE_DATABASE_URL": psycopg.conninfo.make_conninfo(pg.url, user=tag), "FACE_DATABASE_SCHEMA": schema}
    server = ServerProcess(data_dir, model=default_model, env={"FACE_LOG_LEVEL": "info", **env},
                           log_path=tmp_path / "server.log")
    cleanup.callback(server.stop)  # first of the clean-ups (the last registered)
    server.wait_ready()
    yield server, disk, env


def enroll(client: httpx.Client, identity: str, rng: np.random.Generator, replace: bool = False) -> httpx.Response:
    return client.post("/enroll", json={"identity_id": identity, "embeddings": rng.normal(size=(4, 128)).tolist(),
                                        "model_id": MODEL_ID, "metadata": {"pad": PAD}, "replace": replace})


def test_a_full_disk_refuses_writes_with_507_and_loses_nothing(small_disk_server, tmp_path):
    server, disk, env = small_disk_server
    rng = np.random.default_rng(7)
    acked: list[str] = []
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for i in range(20_000):
            r = enroll(client, f"p{i:05d}", rng)
            if r.status_code != 200:
                break
            acked.append(f"p{i:05d}")
        assert r.status_code == 507 and r.json()["error"]["code"] == "storage_full", r.text
        assert len(acked) > 20, "the disk was full before the test began"
        refused = [f"refused{i}" for i in range(6)]
        for identity in refused:  # full stays full: each a coded 507 on a connection that stays usable
            r = enroll(client, identity, rng)
            assert r.status_code == 507 and r.json()["error"]["code"] == "storage_full", r.text
        assert metric(client, 'face_errors_total{code="storage_full"}') >= 7
        if "FACE_DATABASE_URL" in env:  # its disk is the database host's: not this process's to report
            assert "face_data_dir_free_bytes" not in client.get("/metrics").text
        else:  # what an operator alerts on before this
            assert metric(client, "face_data_dir_size_bytes") == SMALL_MB * 2**20
            assert metric(client, "face_data_dir_free_bytes") < SMALL_MB * 2**20 / 10

        # reads go on, and a replace that cannot be written leaves the faces it would have replaced
        kept = client.get(f"/identities/{acked[3]}").json()["face_ids"]
        assert enroll(client, acked[3], rng, replace=True).status_code == 507
        assert client.get(f"/identities/{acked[3]}").json()["face_ids"] == kept
        probe = client.post("/identify", json={"embeddings": [rng.normal(size=128).tolist()], "model_id": MODEL_ID})
        assert probe.status_code == 200, probe.text
        # a delete may need space too (SQLite's WAL grows): taken whole (200) or not at all (507)
        r = client.delete(f"/identities/{acked[5]}")
        assert r.status_code in (200, 507), r.text
        deleted = {acked[5]} if r.status_code == 200 else set()
        if deleted:
            assert client.get(f"/identities/{acked[5]}").status_code == 404
        assert client.get("/readyz").status_code == 200

        # space again: writes are taken without a restart
        grow(disk, 64)
        if "FACE_DATABASE_URL" not in env:
            assert metric(client, "face_data_dir_size_bytes") == 64 * 2**20
        assert enroll(client, "after-space", rng).status_code == 200
        acked.append("after-space")

    log = server.log_path.read_text()
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert not [e for e in events if e["level"] == "error" and e["event"] != "gallery storage full"], log[-3000:]
    assert 1 <= sum(e["event"] == "gallery storage full" for e in events) <= 2  # one a minute, not one a refusal
    assert "Traceback" not in log and "internal_error" not in log

    server.kill()  # nothing acknowledged may depend on a clean stop
    again = ServerProcess(server.data_dir, model=None, env={"FACE_LOG_LEVEL": "info", **env},
                          log_path=tmp_path / "again.log")
    try:
        again.wait_ready()
        with httpx.Client(base_url=again.url, timeout=60) as client:
            assert listed_identities(client) == set(acked) - deleted
    finally:
        again.stop()


def test_a_snapshot_that_does_not_fit_is_skipped_and_the_store_keeps_everything(tmp_path, default_model):
    """The embedded index's snapshot (hnswlib reports no short write: a full disk would leave a cut
    file) is skipped while the data dir has not room for it, the previous snapshot kept; a stop on a
    full disk is clean (its WAL checkpoint waits), and the next start has every face."""
    with small_disk(SMALL_MB) as disk:
        snapshot_skipped_on_a_full_disk(disk, tmp_path, default_model)


def snapshot_skipped_on_a_full_disk(disk: Path, tmp_path: Path, default_model: Path) -> None:
    server = ServerProcess(disk / "data", model=default_model, log_path=tmp_path / "server.log",
                           env={"FACE_LOG_LEVEL": "info", "FACE_SNAPSHOT_INTERVAL_S": "1"})
    rng = np.random.default_rng(8)
    acked: list[str] = []
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=60) as client:
            for i in range(20_000):
                r = enroll(client, f"s{i:05d}", rng)
                if r.status_code != 200:
                    assert r.status_code == 507, r.text
                    break
                acked.append(f"s{i:05d}")
        assert server.stop() in (0, -15)  # uvicorn re-raises the SIGTERM it handled
        log = server.log_path.read_text()
        assert "index snapshot skipped: not enough free space" in log
        assert "Application shutdown failed" not in log and "Traceback" not in log, log[-3000:]
        assert not list((disk / "data").glob("*.tmp"))  # no cut snapshot left taking the space
        fill(disk / "filler")  # the last bytes too
        keys = subprocess.run([sys.executable, "-m", "service", "keys", "create", "--role", "read"], cwd=REPO,
                              env={**os.environ, "FACE_DATA_DIR": str(disk / "data")}, capture_output=True, text=True,
                              timeout=120)
        assert keys.returncode == 2 and "no space left" in keys.stderr, keys.stderr[-2000:]  # one line, no traceback
        assert "Traceback" not in keys.stderr
        (disk / "filler").unlink()
        grow(disk, 64)
        again = ServerProcess(disk / "data", env={"FACE_LOG_LEVEL": "info"}, log_path=tmp_path / "again.log")
        try:
            again.wait_ready()
            with httpx.Client(base_url=again.url, timeout=60) as client:
                assert listed_identities(client) == set(acked)
        finally:
            again.stop()
    finally:
        server.stop()
