"""The command line and the settings it maps to."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from service.__main__ import settings_from_args
from service.config import Settings
from tests.server import REPO


def test_help_explains_every_flag():
    out = subprocess.run([sys.executable, "-m", "service", "--help"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for flag in ("--host", "--port", "--data-dir", "--model", "--providers", "--require-gpu"):
        assert flag in out
    assert "FACE_" in out


def test_env_and_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("FACE_PORT", "9123")
    monkeypatch.setenv("FACE_BATCH_MAX_SIZE", "16")
    settings = settings_from_args(["--data-dir", str(tmp_path)])  # what main() runs with
    assert settings.port == 9123 and settings.batch_max_size == 16 and settings.data_dir == tmp_path
    assert settings.require_gpu is False  # a flag not given leaves the setting to the environment/default
    monkeypatch.setenv("FACE_REQUIRE_GPU", "true")
    settings = settings_from_args(["--port", "9200", "--providers", "cpu"])
    assert settings.port == 9200 and settings.providers == "cpu" and settings.require_gpu is True


def test_require_gpu_on_a_cpu_host_fails_loudly(tmp_path, default_model):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this host has CUDA")
    proc = subprocess.run(
        [sys.executable, "-m", "service", "--port", "0", "--data-dir", str(tmp_path), "--model", str(default_model),
         "--require-gpu"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "CUDA" in proc.stderr and "onnxruntime-gpu" in proc.stderr
    refusal = [line for line in proc.stderr.splitlines() if "could not start" in line]
    assert len(refusal) == 1 and "onnxruntime-gpu" in refusal[0], proc.stderr[-2000:]  # one line says why
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_a_port_in_use_stops_the_start_before_anything_is_loaded(tmp_path, default_model):
    """The address is bound first: a port another process listens on is one ``could not start`` line
    naming it, before the model is loaded or the data dir made (it was found by uvicorn only after the
    whole start-up, "service ready" logged first), and the other process keeps its port."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        data_dir = tmp_path / "data"
        proc = subprocess.run(
            [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir),
             "--model", str(default_model)],
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 3, proc.stderr[-2000:]
        refusal = [line for line in proc.stderr.splitlines() if "could not start" in line]
        assert len(refusal) == 1 and f"127.0.0.1:{port}" in refusal[0] and "in use" in refusal[0], proc.stderr[-2000:]
        assert "FACE_PORT" in refusal[0] and "Traceback" not in proc.stderr
        assert "service ready" not in proc.stderr and not data_dir.exists()  # nothing was started or made
        with socket.create_connection(("127.0.0.1", port), timeout=5):  # still the other process's
            pass


def test_env_example_lists_every_setting_and_parses(monkeypatch):
    from service.config import env_example

    assert (REPO / ".env.example").read_text() == env_example(), "regenerate: python -m service.config > .env.example"
    lines = [ln for ln in (REPO / ".env.example").read_text().splitlines() if ln and not ln.startswith("#")]
    names = {ln.split("=", 1)[0] for ln in lines}
    assert names | {"FACE_API_KEY"} == {f"FACE_{n.upper()}" for n in Settings.model_fields}
    assert "\n# FACE_API_KEY=\n" in (REPO / ".env.example").read_text()  # commented: empty is refused
    for line in lines:
        name, value = line.split("=", 1)
        monkeypatch.setenv(name, value)
    settings = Settings(_env_file=None)  # the example's values, empty ones meaning "default"
    assert settings.api_key is None and settings.model is None and settings.port == 8000


@pytest.mark.parametrize("env, named", [
    ({"FACE_DATABASE_URL": "mysql://face:hunter2@db/face"}, "FACE_DATABASE_URL: not a PostgreSQL URL"),
    ({"FACE_DATABASE_URL": "face:hunter2@db"}, "FACE_DATABASE_URL: not a PostgreSQL URL"),
    ({"FACE_DATABASE_READ_URLS": "postgresql://a/b,redis://:hunter2@c"}, "FACE_DATABASE_READ_URLS: not a PostgreSQL URL"),
    ({"FACE_MODEL": "/etc/hostname"}, "is not an ONNX model"),
])
def test_a_setting_the_service_cannot_use_is_named_in_one_line_without_its_secret(tmp_path, env, named):
    """A database URL of another scheme (or none) was taken, then refused by the driver at start-up with a
    traceback; a model file that is not ONNX, likewise. Now the settings refuse the URL without repeating it
    (it may hold a password: pydantic printed the input), and the model is one ``could not start`` line."""
    import os

    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FACE_")} | env
    for command in (["--port", "0", "--data-dir", str(tmp_path / "data")], ["keys", "--data-dir", str(tmp_path / "d"), "list"]):
        proc = subprocess.run([sys.executable, "-m", "service", *command], cwd=REPO, env=full_env,
                              capture_output=True, text=True, timeout=120)
        if command[0] == "keys" and "FACE_MODEL" in env:
            continue  # (the commands read a model's contract only where they need it)
        assert proc.returncode != 0, (command, proc.stderr[-2000:])
        assert named in proc.stderr, (command, proc.stderr[-2000:])
        assert "hunter2" not in proc.stderr and "Traceback" not in proc.stderr, (command, proc.stderr[-2000:])
