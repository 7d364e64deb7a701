"""What every benchmark records about the machine it ran on, and the few helpers every benchmark
shares (one percentile rule, one RSS reader, the commit measured and an older one unpacked to
measure against)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import numpy as np

from harness.server import REPO

RESULTS = Path(__file__).parent / "results"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _gpu() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine() -> dict:
    versions = {}
    for pkg in ("onnxruntime", "onnxruntime-gpu", "numpy", "hnswlib", "fastapi", "uvicorn", "opencv-python-headless"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "gpu": _gpu(), "python": platform.python_version(),
            "platform": platform.platform(), "versions": versions,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def save(name: str, payload: dict, output: Path | None = None) -> Path:
    """Write ``payload`` as bench/results/<name>.json, or to ``output`` when given (a bench's --output)."""
    path = output or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def percentile_ms(seconds: list[float], q: float) -> float:
    """The q-th percentile (0-100) of durations in seconds, in ms. One rule for every benchmark:
    numpy's default (linear interpolation between the closest ranks); nan when there are none."""
    return round(float(np.percentile(np.asarray(seconds) * 1000, q)), 3) if len(seconds) else float("nan")


def percentiles(ms: list[float], qs: tuple[float, ...] = (50, 99)) -> dict:
    """{"p50_ms": .., "p99_ms": .., "mean_ms": ..} of durations already in ms (same rule as ``percentile_ms``)."""
    arr = np.asarray(ms, dtype=float)
    if not len(arr):
        return {**{f"p{q:g}_ms": float("nan") for q in qs}, "mean_ms": float("nan")}
    return {**{f"p{q:g}_ms": round(float(np.percentile(arr, q)), 3) for q in qs}, "mean_ms": round(float(arr.mean()), 3)}


def rss_mb(pid: int | str = "self", field: str = "VmRSS") -> float | None:
    """A process's resident set (``field``: VmRSS, or VmHWM for its peak) in MB from /proc; None when
    the process is gone or the field is missing (not Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def unpack(ref: str, into: Path) -> str:
    """``git archive`` of ``ref`` unpacked in ``into``; returns the commit hash."""
    commit = subprocess.run(["git", "rev-parse", ref], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.strip()
    archive = into / "src.tar"
    subprocess.run(["git", "archive", "-o", str(archive), commit], cwd=REPO, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    archive.unlink()
    return commit


def current_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    return out.stdout.strip() + ("+dirty" if dirty else "")


@contextmanager
def gallery_backends(postgres: bool) -> Iterator[list[tuple[str, dict[str, str] | None]]]:
    """The galleries a benchmark compares: ``("embedded", None)`` and, with ``postgres``, ``("postgres",
    env)``, env being the FACE_* settings of a throwaway PostgreSQL (harness/pg.py), stopped on exit."""
    backends: list[tuple[str, dict[str, str] | None]] = [("embedded", None)]
    server = None
    if postgres:
        from harness.pg import PgTestServer

        server = PgTestServer()
        backends.append(("postgres", server.gallery_env()))
    try:
        yield backends
    finally:
        if server is not None:
            server.close()


def per_backend(postgres: bool, run: Callable[..., dict]) -> dict[str, dict]:
    """``run(settings)`` on a fresh gallery of each backend of ``gallery_backends`` (embedded: a data dir
    in a temporary directory, snapshots only at close; PostgreSQL: its throwaway server), each result
    printed as it comes; returns backend -> result."""
    from service.config import Settings

    results = {}
    with gallery_backends(postgres) as backends, tempfile.TemporaryDirectory() as tmp:
        for name, env in backends:
            if env is None:
                settings = Settings(data_dir=Path(tmp) / "data", snapshot_interval_s=0)
            else:
                settings = Settings(database_url=env["FACE_DATABASE_URL"], database_schema=env["FACE_DATABASE_SCHEMA"])
            results[name] = run(settings)
            print(name, results[name], flush=True)
    return results
