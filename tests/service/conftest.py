from __future__ import annotations

import httpx
import pytest


@pytest.fixture(scope="module")
def client(server):
    """An HTTP client of the session's server, one per test module (modules that need another define their own)."""
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


class OperatorBackend:
    """A fresh backend (embedded data dir, or a fresh schema on the suite's PostgreSQL) for the operator
    commands (``python -m service keys|audit|gallery``) run as real subprocesses against it."""

    def __init__(self, kind: str, data_dir, model, env: dict[str, str], pgdata=None) -> None:
        self.kind, self.data_dir, self.model, self.pgdata = kind, data_dir, model, pgdata
        self.env = {"FACE_DATA_DIR": str(data_dir), "FACE_MODEL": str(model), **env}

    def run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120):
        """``python -m service ARGS`` with this backend's settings: the CompletedProcess (text)."""
        import os
        import subprocess
        import sys

        from tests.server import MODEL_CACHE, REPO

        base = {k: v for k, v in os.environ.items() if not k.startswith("FACE_")}
        full = {**base, "FACE_MODEL_CACHE_DIR": str(MODEL_CACHE), "FACE_INTRA_OP_THREADS": "2", **self.env,
                **(env or {})}
        return subprocess.run([sys.executable, "-m", "service", *args], cwd=REPO, env=full, capture_output=True,
                              text=True, timeout=timeout)

    def settings(self):
        from service.config import Settings

        pg = {"database_url": self.env["FACE_DATABASE_URL"], "database_schema": self.env["FACE_DATABASE_SCHEMA"]} \
            if self.kind == "postgres" else {}
        return Settings(data_dir=self.data_dir, model=self.model, **pg)

    def open(self):
        """The same backend opened in this process (a Galleries; close it before the next command)."""
        from service.gallery.open import open_gallery
        from service.model.contract import read_contract

        contract = read_contract(self.model)
        return open_gallery(self.settings(), contract.model_id, contract.embedding_size)

    def stored_files(self):
        """Every file this backend keeps its data in: the data dir, and on postgres the cluster's
        data dir (heap, WAL)."""
        roots = [self.data_dir] + ([self.pgdata] if self.pgdata is not None else [])
        return [p for root in roots for p in root.rglob("*") if p.is_file()]


@pytest.fixture(params=["embedded", "postgres"])
def operator_backend(request, tmp_path, default_model) -> OperatorBackend:
    env: dict[str, str] = {}
    pgdata = None
    if request.param == "postgres":
        postgres = request.getfixturevalue("postgres")
        env, pgdata = postgres.gallery_env(), postgres.pgdata
    return OperatorBackend(request.param, tmp_path / "data", default_model, env, pgdata)
