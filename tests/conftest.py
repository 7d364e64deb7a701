from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from harness.fixtures import ENROLLED, FACES, FIXTURES, b64, face_files, unknown_files
from harness.server import MODEL_CACHE, REPO, ServerProcess
from service.config import Settings

__all__ = ["ENROLLED", "FACES", "FIXTURES", "b64", "face_files", "unknown_files"]  # imported by the tests

# The servers and in-process services the tests start skip the model's warm-up (one run of each batch
# size 1-32 at start-up: a CI run started the service 177 times, and their warm-ups took 187 s of it).
# What the tests assert never depends on it; tests/service/test_models.py starts one with it, as the
# service starts by default. A test may still set FACE_WARMUP itself; benchmarks never see this.
os.environ.setdefault("FACE_WARMUP", "false")


def skipped_because(terminalreporter, banner: str) -> list[str]:
    """The reasons of the tests skipped with ``banner`` in them, as the run reports them: the console's and
    the container's terminal summaries (with several test processes, pytest-xdist, the skip happened in a
    worker, and only its report reaches the process that prints the summary)."""
    reasons = []
    for report in terminalreporter.stats.get("skipped", []):
        message = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if banner in message:
            reasons.append(message.split(banner, 1)[1].lstrip(": "))
    return reasons


def metric(client, sample: str) -> float:
    """The value of one sample on /metrics, named with its labels exactly as exposed. Prometheus prints an
    unlabelled counter at 0 from the start, so tests compare values before and after, never mere names."""
    prefix = sample + " "
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    return 0.0  # a labelled sample appears only once it has been counted


@pytest.fixture(scope="session")
def wheel_names(tmp_path_factory) -> set[str]:
    """The files of the project's wheel, built once (the Docker image installs the wheel, not a checkout)."""
    tmp_path = tmp_path_factory.mktemp("wheel")
    source = tmp_path / "src"  # what the Dockerfile copies; built there so the checkout gets no build/ litter
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("service", "exporter"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"),
                    str(source)], check=True, capture_output=True, timeout=300, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("face_embedding_service-*.whl"))
    return set(zipfile.ZipFile(wheel).namelist())


@pytest.fixture(scope="session")
def default_model() -> Path:
    from service.model.prepare import default_model as prepare

    return prepare(MODEL_CACHE)


@pytest.fixture(scope="session")
def server(tmp_path_factory, default_model):
    """One real server over HTTP shared by the read-mostly API tests."""
    proc = ServerProcess(tmp_path_factory.mktemp("gallery") / "data", model=default_model,
                         env={"FACE_MAX_FACES_PER_REQUEST": "16", "FACE_MAX_REQUEST_BYTES": str(2 * 1024 * 1024)})
    proc.wait_ready()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def postgres():
    """One real PostgreSQL + pgvector for the session (started only when a test asks for it); each
    test gets its own schema on it (PgTestServer.fresh_schema)."""
    from harness.pg import PgTestServer

    server = PgTestServer()
    yield server
    server.close()


def backend_env(request, env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` for a server of a fixture parametrised over the gallery backends ("embedded",
    "postgres"): on postgres plus a fresh schema on the suite's PostgreSQL."""
    env = dict(env or {})
    if request.param == "postgres":
        env |= request.getfixturevalue("postgres").gallery_env()
    return env


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory, default_model, postgres):
    """Like ``server``, with its gallery on the test PostgreSQL (FACE_DATABASE_URL)."""
    proc = ServerProcess(tmp_path_factory.mktemp("pg-gallery") / "data", model=default_model,
                         env={"FACE_MAX_FACES_PER_REQUEST": "16", "FACE_MAX_REQUEST_BYTES": str(2 * 1024 * 1024),
                              **postgres.gallery_env()})
    proc.wait_ready()
    yield proc
    proc.stop()


@pytest.fixture(params=["embedded", "postgres"])
def gallery_settings(request, tmp_path) -> Settings:
    """The settings of one backend's galleries, on fresh storage (a data dir without background
    snapshots, or a PostgreSQL schema): for tests that make ``Galleries`` as the service does."""
    if request.param == "embedded":
        return Settings(data_dir=tmp_path / "data", snapshot_interval_s=0)
    env = request.getfixturevalue("postgres").gallery_env()
    return Settings(database_url=env["FACE_DATABASE_URL"], database_schema=env["FACE_DATABASE_SCHEMA"])
