"""podman for the container test (test_container.py), as this host can run it. Where it cannot run a
trivial container, the test is skipped loudly (each skip says why, the session ends with a banner);
TEST_REQUIRE_CONTAINER=1 turns the skip into a failure."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import skipped_because
from tests.server import REPO

# the Dockerfile's base for PYTHON_VERSION=3.11: pulled, or a Debian bookworm stand-in (scripts/podman-setup)
BASE = "docker.io/library/python:3.11-slim"
SANDBOX_CONF = REPO / "deploy" / "podman" / "containers.conf"
NOT_RUN: list[str] = []


@dataclass
class Podman:
    """podman as this host can run it: plain, or with the sandbox settings (deploy/podman)."""

    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    global_args: list[str] = field(default_factory=list)

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(["podman", *self.global_args, *args], env=self.env, cwd=REPO, capture_output=True,
                                text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"podman {' '.join(args[:3])} ... exited {result.returncode}:\n"
                                 f"{(result.stdout + result.stderr)[-6000:]}")
        return result


def _trivial_run(podman: Podman) -> str | None:
    """None when podman runs a container of the base image on the host network, else why not."""
    try:
        result = podman("run", "--rm", "--network", "host", BASE, "python", "-c", "print(6 * 7)",
                        timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{type(exc).__name__}: {exc}"
    if result.returncode == 0 and result.stdout.strip() == "42":
        return None
    return (result.stdout + result.stderr).strip()[-600:] or f"exit {result.returncode}"


def usable_podman() -> tuple[Podman | None, str]:
    """The podman invocation that works here, or None and the reason."""
    if shutil.which("podman") is None:
        return None, "podman is not installed (scripts/podman-setup installs it as root)"
    exists = subprocess.run(["podman", "image", "exists", BASE], capture_output=True, text=True, timeout=60)
    if exists.returncode != 0:
        return None, f"no {BASE} image (scripts/podman-setup pulls it or makes a stand-in) {exists.stderr.strip()}"
    plain = Podman()
    why = _trivial_run(plain)
    if why is None:
        return plain, ""
    # sandboxes like CI's refuse the rlimits rootful podman sets and run no systemd: what works there
    sandbox = Podman(env={**os.environ, "CONTAINERS_CONF": str(SANDBOX_CONF)},
                     global_args=["--cgroup-manager", "cgroupfs"])
    why_sandbox = _trivial_run(sandbox)
    if why_sandbox is None:
        return sandbox, ""
    return None, f"podman cannot run a container here: {why} (with {SANDBOX_CONF.relative_to(REPO)}: {why_sandbox})"


def build_runtime_image(podman: Podman, tag: str, extra: str, timeout: float = 1200) -> str:
    """The Dockerfile's runtime target with ``EXTRA=extra`` (cpu or gpu), built from the checkout as
    ``tag``. chroot isolation: RUN steps need no OCI runtime; docker format: keeps the HEALTHCHECK (OCI
    images have none). The image this replaces is removed: one per code change would pile up."""
    before = podman("image", "inspect", "--format", "{{.Id}}", tag, check=False).stdout.strip()
    podman("build", "--isolation=chroot", "--format", "docker", "--build-arg", f"EXTRA={extra}",
           "--build-arg", "PYTHON_VERSION=3.11", "--target", "runtime", "-t", tag, ".", timeout=timeout)
    if before and podman("image", "inspect", "--format", "{{.Id}}", tag).stdout.strip() != before:
        podman("rmi", before, check=False)
    return tag


@pytest.fixture(scope="module")
def podman() -> Iterator[Podman]:
    found, reason = usable_podman()
    if found is None:
        if os.environ.get("TEST_REQUIRE_CONTAINER") == "1":
            pytest.fail(f"TEST_REQUIRE_CONTAINER=1 but {reason}")
        NOT_RUN.append(reason)
        pytest.skip(f"CONTAINER TEST DID NOT RUN: {reason}")
    # one module at a time builds and runs images, whatever test process it is in (scripts/test runs
    # TEST_WORKERS of them): two builds at once would share podman's storage and layer cache
    with open(Path(tempfile.gettempdir()) / "face-tests-podman.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, at the module's end
        yield found


def pytest_terminal_summary(terminalreporter):
    reasons = NOT_RUN or skipped_because(terminalreporter, "CONTAINER TEST DID NOT RUN")
    if reasons:
        terminalreporter.write_sep("!", "THE CONTAINER TEST DID NOT RUN", red=True, bold=True)
        terminalreporter.write_line(f"reason: {reasons[0]}", red=True, bold=True)
