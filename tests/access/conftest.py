"""A keyed server per gallery backend, with a key of every role, shared by the access tests."""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest

from harness.server import ServerProcess
from tests.conftest import backend_env

ADMIN_SECRET = "admin-from-the-environment-0123456789"
DIM = 128


@dataclass
class KeyedServer:
    proc: ServerProcess
    backend: str
    model_id: str
    env: dict[str, str]
    keys: dict[str, str] = field(default_factory=dict)  # name -> secret
    key_ids: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.proc.url

    def client(self, key: str | None) -> httpx.Client:
        """A client sending ``key``: a name of ``keys`` ("admin" is the environment's), a raw secret, or None."""
        secret = ADMIN_SECRET if key == "admin" else self.keys.get(key, key) if key else None
        return httpx.Client(base_url=self.url, timeout=60, headers={"X-API-Key": secret} if secret else {})

    def make_key(self, name: str, role: str, collections: list[str] | None = None, **extra) -> str:
        with self.client("admin") as admin:
            r = admin.post("/keys", json={"role": role, "collections": collections, "note": name, **extra})
            assert r.status_code == 201, r.text
            self.keys[name], self.key_ids[name] = r.json()["secret"], r.json()["key_id"]
        return self.keys[name]


def unit_vectors(n: int, seed: int) -> list[list[float]]:
    v = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).tolist()


@pytest.fixture(scope="package", params=["embedded", "postgres"])
def keyed(request, tmp_path_factory, default_model) -> KeyedServer:
    env = backend_env(request, {"FACE_API_KEY": ADMIN_SECRET, "FACE_ENROLL_HUB_ALPHA": "0"})
    proc = ServerProcess(tmp_path_factory.mktemp(f"keyed-{request.param}") / "data", model=default_model, env=env)
    ready = proc.wait_ready()
    server = KeyedServer(proc, request.param, ready["model_id"], env)
    with server.client("admin") as admin:
        for name in ("alpha", "beta"):
            assert admin.post("/collections", json={"name": name}).status_code == 201
    for role in ("admin", "write", "read", "embed"):
        server.make_key(f"key-{role}", role)
    server.make_key("write-alpha", "write", ["alpha"])
    server.make_key("read-alpha", "read", ["alpha"])
    yield server
    proc.stop()


@pytest.fixture(params=["postgres"])
def two_replicas(request, tmp_path, default_model):
    """Two servers (replicas) on one PostgreSQL schema, with the environment's admin key."""
    env = backend_env(request, {"FACE_API_KEY": ADMIN_SECRET})
    a = ServerProcess(tmp_path / "a", model=default_model, env=env)
    b = ServerProcess(tmp_path / "b", model=default_model, env=env)
    try:
        a.wait_ready()
        b.wait_ready()
        yield a, b
    finally:
        a.stop()
        b.stop()


def pg_tables_text(env: dict[str, str]) -> str:
    """Every row of every table in the server's PostgreSQL schema, as text (to look for what must not be there)."""
    import psycopg
    from psycopg import sql

    schema = env.get("FACE_DATABASE_SCHEMA", "public")
    with psycopg.connect(env["FACE_DATABASE_URL"]) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (schema,))]
        return "\n".join(str(row) for table in tables
                         for row in conn.execute(sql.SQL("SELECT t::text FROM {}.{} t").format(
                             sql.Identifier(schema), sql.Identifier(table))))
