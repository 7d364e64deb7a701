"""Run the real service in a subprocess (real uvicorn, real HTTP) for tests and benchmarks."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
# the prepared default model is cached here across test runs (gitignored)
MODEL_CACHE = REPO / ".cache" / "models"


_handed_out: set[int] = set()  # the ports free_port gave in this process
# where free_port looks: below Linux's ephemeral range (ip_local_port_range, 32768-60999 by default), so
# that no outgoing connection's own port takes one between its choice and its bind
PORTS = range(10000, 32768)


def free_port() -> int:
    """A free port for a server to bind. A server binds its port only once started (the model loaded),
    seconds after the port was chosen: meanwhile another test process (pytest-xdist) could be given the
    same port, and its client would then talk to the first server that binds it (CI once saw a test's
    server answered by another test's). So each worker takes only its own ports (the port modulo the
    number of workers is its number; chosen here at random: the kernel's own choice for a bind to port 0
    is always odd), and one process never takes a port twice."""
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    mine = (int(worker[2:]) if worker[2:].isdigit() else 0) % count
    while True:
        port = random.randrange(PORTS.start + (mine - PORTS.start) % count, PORTS.stop, count)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # taken
        _handed_out.add(port)
        return port


class ServerProcess:
    def __init__(self, data_dir: Path, model: Path | None = None, port: int | None = None,
                 env: dict[str, str] | None = None, log_path: Path | None = None,
                 python: str | None = None, source: Path | None = None, host: str = "127.0.0.1") -> None:
        """``source``: run the ``service`` of another source tree (e.g. an unpacked ``git archive``)
        instead of this checkout's: the server starts there, with it on PYTHONPATH. ``host``: the
        interface to bind (reached at 127.0.0.1 whatever it is)."""
        self.port = port or free_port()
        tls_cert = (env or {}).get("FACE_TLS_CERT_FILE")  # HTTPS, its certificate its own CA (self-signed)
        self.url = f"{'https' if tls_cert else 'http'}://127.0.0.1:{self.port}"
        self.verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=tls_cert) if tls_cert else True
        self.data_dir = Path(data_dir)
        self.log_path = log_path or self.data_dir.parent / f"server-{self.port}.log"
        cmd = [python or sys.executable, "-m", "service", "--host", host, "--port", str(self.port),
               "--data-dir", str(self.data_dir)]
        if model is not None:
            cmd += ["--model", str(model)]
        full_env = {**os.environ, "FACE_MODEL_CACHE_DIR": str(MODEL_CACHE), "FACE_INTRA_OP_THREADS": "2",
                    "PYTHONUNBUFFERED": "1", **({"PYTHONPATH": str(source)} if source else {}), **(env or {})}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=source or REPO, env=full_env, stdout=self._log, stderr=subprocess.STDOUT)
        # with a key /readyz shows its details to key holders only: the harness is one
        key = full_env.get("FACE_API_KEY")
        self.key_headers = {full_env.get("FACE_API_KEY_HEADER", "X-API-Key"): key} if key else {}

    def wait_ready(self, timeout: float = 120) -> dict:
        """/readyz's answer once it is 200 (its details: the key is sent when the server has one)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                r = httpx.get(self.url + "/readyz", headers=self.key_headers, timeout=5, verify=self.verify)
                if r.status_code == 200:
                    return r.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def kill(self) -> None:
        """SIGKILL: no shutdown hooks, no snapshot, nothing flushed by us."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self._log.close()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


def listed_identities(client: httpx.Client) -> set[str]:
    """Every identity id the server lists, following /identities' cursor to the last page."""
    listed: set[str] = set()
    cursor = None
    while True:
        page = client.get("/identities", params={"limit": 1000} | ({"cursor": cursor} if cursor else {})).json()
        listed |= {item["identity_id"] for item in page["items"]}
        cursor = page["next_cursor"]
        if not cursor:
            return listed


@contextlib.contextmanager
def running_server(data_dir: Path, model: Path | None = None, **kwargs: Any) -> Iterator[str]:
    """Start the service, wait for /readyz, yield its base URL, stop it."""
    server = ServerProcess(data_dir, model=model, **kwargs)
    try:
        server.wait_ready()
        yield server.url
    finally:
        server.stop()


@contextlib.contextmanager
def serving_in_process(settings: Any, timeout: float = 120) -> Iterator[tuple[str, Any]]:
    """The real app (``create_app(settings)``) on a real uvicorn over HTTP, in a thread of this process:
    for a test that must also reach the running service's state (``app.state.service``), e.g. to start
    what only the service's own code starts. Yields (base URL, app); stops the server (lifespan shutdown
    included) at the end. Prefer :class:`ServerProcess` for everything else."""
    import threading

    import uvicorn

    from service.app import create_app

    app = create_app(settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on",
                                           proxy_headers=False))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while not (server.started and httpx.get(url + "/readyz", timeout=5).status_code == 200):
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.2)
        yield url, app
    finally:
        server.should_exit = True
        thread.join(60)
