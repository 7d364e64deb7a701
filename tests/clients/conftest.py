"""Real servers (real uvicorn over HTTP) with an admin key for the faceclient and `face` CLI tests."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.server import ServerProcess
from service.gallery.crops import write_key_file
from tests.conftest import ENROLLED, face_files

ADMIN = "client-tests-admin-secret-0123456789"
ENV = {"FACE_API_KEY": ADMIN, "FACE_ENROLL_HUB_ALPHA": "0"}


@dataclass
class Served:
    proc: ServerProcess
    backend: str

    @property
    def url(self) -> str:
        return self.proc.url


def start(tmp_path_factory: pytest.TempPathFactory, model: Path, name: str, env: dict[str, str]) -> Served:
    proc = ServerProcess(tmp_path_factory.mktemp(name) / "data", model=model, env=env)
    proc.wait_ready()
    return Served(proc, name)


@pytest.fixture(scope="package")
def embedded(tmp_path_factory, default_model) -> Iterator[Served]:
    """With a crop key (FACE_CROP_KEY_FILE): a collection created with keep_crops keeps its faces' crops
    (face_crop); a plain one, as every other test makes, is as without the key."""
    key = tmp_path_factory.mktemp("crop-key") / "crop.key"
    write_key_file(key)
    served = start(tmp_path_factory, default_model, "embedded", {**ENV, "FACE_CROP_KEY_FILE": str(key)})
    yield served
    served.proc.stop()


@pytest.fixture(scope="package", params=["embedded", "postgres"])
def any_backend(request, tmp_path_factory, default_model) -> Iterator[Served]:
    """The embedded server above, then one on the test PostgreSQL."""
    if request.param == "embedded":
        yield request.getfixturevalue("embedded")
        return
    from tests.conftest import backend_env

    served = start(tmp_path_factory, default_model, "postgres", backend_env(request, ENV))
    yield served
    served.proc.stop()


@pytest.fixture
def collection_name() -> str:
    """A fresh collection name per test: tests share a server, not their gallery."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def people_dir(tmp_path) -> Path:
    """Three people of the committed faces, one sub-folder each (the enroll-folder layout)."""
    for person in ENROLLED[:3]:
        (tmp_path / "people" / person).mkdir(parents=True)
        for path in face_files(person)[:2]:
            shutil.copy(path, tmp_path / "people" / person / path.name)
    return tmp_path / "people"
