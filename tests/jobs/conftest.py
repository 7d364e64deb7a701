"""What the jobs tests share: a real uvicorn serving SFace and the tiny model in this process (the test
can reach ``app.state.service``: start a shadow pair, read the galleries), on both backends."""

from __future__ import annotations

import httpx
import pytest

from harness.models import tiny_model
from harness.server import MODEL_CACHE, serving_in_process
from service.config import Settings


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tiny") / "tiny.onnx", dim=64)


@pytest.fixture(params=["embedded", "postgres"])
def service(request, tmp_path, default_model, tiny):
    pg = {}
    if request.param == "postgres":
        env = request.getfixturevalue("postgres").gallery_env()
        pg = {"database_url": env["FACE_DATABASE_URL"], "database_schema": env["FACE_DATABASE_SCHEMA"]}
    settings = Settings(data_dir=tmp_path / "data", models=[f"sface={default_model}", f"tiny={tiny}"],
                        model_cache_dir=MODEL_CACHE, intra_op_threads=2, enroll_hub_alpha=0, **pg)
    with serving_in_process(settings) as (url, app), httpx.Client(base_url=url, timeout=60) as client:
        client.shadow = app.state.service.shadow  # type: ignore[attr-defined]
        client.galleries = app.state.service.galleries  # type: ignore[attr-defined]
        yield client

