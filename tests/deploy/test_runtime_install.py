"""Install the service exactly as the Dockerfile does, into a fresh virtualenv, and serve from it.

No Docker engine runs on CI, so this replays the image build outside Docker: the `python` RUN lines
of the Dockerfile's `build` and `runtime` stages (pip wheel, pip install from those wheels, model
preparation, the fp16 variant) run verbatim through bash, with the stage's ENV and the build arg
EXTRA=cpu (CI has no GPU; the image default is gpu). Absolute image paths (/wheels, /opt/face/...,
/var/lib/face) are re-rooted under a temporary directory and BuildKit bind mounts become the paths
they mount. Then the server starts from that virtualenv the way the image's ENTRYPOINT does, and
/readyz must answer through the image's own HEALTHCHECK command.

Slow (PyPI downloads, hnswlib compiles): about two minutes. Needs network access to PyPI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import venv
from pathlib import Path

import httpx
import pytest

from tests.deploy.dockerfile import REPO, Dockerfile, Stage, parse_dockerfile, run_mounts
from tests.server import free_port

CI_EXTRA = "cpu"
INSTALL_TIMEOUT_S = 600


class ImageReplay:
    """Runs Dockerfile stages' `python` steps on this machine, image paths re-rooted under ``root``."""

    def __init__(self, dockerfile: Dockerfile, root: Path, venv_dir: Path, extra: str) -> None:
        self.dockerfile = dockerfile
        self.root = root
        self.venv_bin = venv_dir / "bin"
        self.args = {**dockerfile.global_args, "EXTRA": extra}

    def host_path(self, image_path: str) -> str:
        return str(self.root / image_path.lstrip("/")) if image_path.startswith("/") else image_path

    def env(self, stage: Stage) -> dict[str, str]:
        stage_env = {k: self.host_path(v) if v.startswith("/") else v for k, v in stage.env().items()}
        base = {k: v for k, v in os.environ.items() if not k.startswith("FACE_")}
        return {**base, **self.args, **stage_env, "PATH": f"{self.venv_bin}{os.pathsep}{base['PATH']}",
                "VIRTUAL_ENV": str(self.venv_bin.parent)}

    def workdir(self, stage: Stage) -> Path:
        workdirs = stage.all("WORKDIR")
        path = Path(self.host_path(workdirs[-1].text)) if workdirs else self.root
        path.mkdir(parents=True, exist_ok=True)
        return path

    def copy_context(self, stage: Stage) -> None:
        """COPY from the build context (our repository) into the stage's re-rooted WORKDIR."""
        workdir = self.workdir(stage)
        for inst in stage.all("COPY"):
            *sources, dest = inst.text.split()
            target = Path(self.host_path(dest)) if dest.startswith("/") else workdir / dest
            for source in sources:
                src = REPO / source
                if src.is_dir():
                    shutil.copytree(src, target if not dest.endswith("/") else target / src.name,
                                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True)
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, target / src.name)

    def python_steps(self, stage: Stage) -> list[str]:
        """RUN lines that use python (pip, model preparation); OS set-up (apt, users) is Docker's job."""
        steps = []
        for inst in stage.all("RUN"):
            mounts, command = run_mounts(inst.text)
            if not command.startswith("python "):
                continue
            for mount in mounts:
                if mount.from_stage:  # the other stage's files, re-rooted like ours
                    host = self.host_path(mount.source)
                else:  # the build context
                    host = str(REPO / mount.source)
                command = command.replace(mount.target, host)
            steps.append(command)
        return steps

    def run_stage(self, name: str, log: Path) -> list[str]:
        stage = self.dockerfile.stage(name)
        if name == "build":
            self.copy_context(stage)
        steps = self.python_steps(stage)
        for command in steps:
            with open(log, "ab") as out:
                out.write(f"\n$ {command}\n".encode())
                out.flush()
                done = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=self.workdir(stage),
                                      env=self.env(stage), stdout=out, stderr=subprocess.STDOUT,
                                      timeout=INSTALL_TIMEOUT_S)
            assert done.returncode == 0, f"`{command}` failed:\n{log.read_text()[-4000:]}"
        return steps


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> tuple[ImageReplay, Stage]:
    root = tmp_path_factory.mktemp("image")
    venv_dir = root / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(venv_dir)
    replay = ImageReplay(parse_dockerfile(), root / "fs", venv_dir, CI_EXTRA)
    log = root / "install.log"
    build_steps = replay.run_stage("build", log)
    runtime_steps = replay.run_stage("runtime", log)
    assert any("pip wheel" in s for s in build_steps) and any("pip install" in s for s in runtime_steps)
    return replay, replay.dockerfile.stage("runtime")


def test_installed_runtime_is_the_package_without_tensorflow(image):
    replay, stage = image
    python = str(replay.venv_bin / "python")
    probe = ("import importlib.util as u, service, onnxruntime as ort; "
             "print(service.__file__); print(ort.get_available_providers()); "
             "print(u.find_spec('tensorflow') is None, u.find_spec('tf2onnx') is None)")
    out = subprocess.run([python, "-c", probe], cwd=replay.workdir(stage), capture_output=True, text=True,
                         env=replay.env(stage), check=True).stdout.splitlines()
    assert str(replay.venv_bin.parent) in out[0]  # the installed package, not the checkout
    assert "CPUExecutionProvider" in out[1]
    assert out[2] == "True True"


def test_server_from_the_installed_runtime_becomes_ready(image):
    replay, stage = image
    env = replay.env(stage)
    env["FACE_PORT"] = str(free_port())
    env["FACE_HOST"] = "127.0.0.1"
    env["FACE_INTRA_OP_THREADS"] = "2"
    entrypoint = stage.all("ENTRYPOINT")[-1].exec_form()
    log_path = replay.root / "server.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(entrypoint, cwd=replay.workdir(stage), env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{env['FACE_PORT']}/readyz"
        deadline = time.monotonic() + 120
        ready = None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                response = httpx.get(url, timeout=5)
                if response.status_code == 200:
                    ready = response.json()
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        assert ready is not None, f"not ready:\n{log_path.read_text()[-4000:]}"
        assert ready["providers"] == ["CPUExecutionProvider"]
        # the model prepared at "build time" is the one served: nothing prepared at start-up
        assert ready["model_path"].startswith(env["FACE_MODEL_CACHE_DIR"])
        assert Path(env["FACE_DATA_DIR"]).is_dir()
        # the web console's pages are package data: the installed wheel serves them
        console = httpx.get(f"http://127.0.0.1:{env['FACE_PORT']}/console/app.js", timeout=5)
        assert console.status_code == 200 and "ERROR_MESSAGES" in console.text

        healthcheck = stage.all("HEALTHCHECK")[-1].exec_form()
        assert healthcheck[0] == "python"
        probe = subprocess.run(healthcheck, cwd=replay.workdir(stage), env=env, capture_output=True, timeout=30)
        assert probe.returncode == 0, probe.stderr
    finally:
        server.terminate()
        server.wait(30)
    # and the healthcheck fails once nothing answers
    down = subprocess.run(stage.all("HEALTHCHECK")[-1].exec_form(), cwd=replay.workdir(stage), env=env,
                          capture_output=True, timeout=30)
    assert down.returncode != 0


def test_fp16_variant_was_made_at_build_time(image):
    replay, stage = image
    cache = Path(replay.env(stage)["FACE_MODEL_CACHE_DIR"])
    from service.model.contract import read_contract

    assert read_contract(cache / "sface-2021dec-fp16" / "model.onnx").model_version.endswith("-fp16")


if sys.platform != "linux":  # the Dockerfile's commands are Linux shell
    pytestmark = pytest.mark.skip("replays Linux image steps")
