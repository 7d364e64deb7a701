"""Several models served at once (FACE_MODELS), on both backends: each collection is pinned to one
model, and every gallery route embeds with, checks model ids against and decides by that model;
/embed and /detect take `model`; /readyz lists the models; a stored collection whose model is no
longer served refuses the start. The second model is harness/models.py's tiny ONNX (no TensorFlow)."""

from __future__ import annotations

import json

import httpx
import pytest

from harness.fixtures import ENROLLED, FIXTURES, b64, face_files
from harness.models import tiny_model
from harness.server import ServerProcess
from service.config import Settings
from tests.conftest import backend_env

TINY_DIM = 64


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tiny") / "tiny.onnx", dim=TINY_DIM)


def two_model_env(request, default_model, tiny) -> dict[str, str]:
    """The env of a server serving SFace (`sface`, the default) and the tiny model, on the backend of
    ``request.param``."""
    # FACE_WARMUP: as the service starts by default (tests/conftest.py turns it off for the others)
    return backend_env(request, {"FACE_MODELS": f"sface={default_model},tiny={tiny}", "FACE_ENROLL_HUB_ALPHA": "0",
                                 "FACE_WARMUP": "true"})


@pytest.fixture(scope="module", params=["embedded", "postgres"])
def served(request, tmp_path_factory, default_model, tiny):
    proc = ServerProcess(tmp_path_factory.mktemp(f"models-{request.param}") / "data",
                         env=two_model_env(request, default_model, tiny))
    ready = proc.wait_ready()
    with httpx.Client(base_url=proc.url, timeout=60) as client:
        client.ready = ready  # type: ignore[attr-defined]
        client.log_path = proc.log_path  # type: ignore[attr-defined]
        assert client.post("/collections", json={"name": "small", "model": "tiny"}).status_code == 201
        yield client
    proc.stop()


@pytest.fixture(params=["embedded", "postgres"])
def backend(request):
    """The request of a test parametrised over the backends (backend_env reads its param)."""
    return request


def error(r: httpx.Response) -> tuple[int, str]:
    return r.status_code, r.json()["error"]["code"]


def images(identity: str, n: int = 2) -> list[str]:
    return [b64(p) for p in face_files(identity)[:n]]


def test_readyz_lists_every_model_and_the_default(served):
    ready = served.ready
    assert ready["default_model"] == "sface"
    models = ready["models"]
    assert set(models) == {"sface", "tiny"}
    assert models["tiny"]["model_id"] == "tiny@1" and models["tiny"]["dim"] == TINY_DIM
    assert models["sface"]["model_id"] == ready["model_id"] and models["sface"]["dim"] == ready["embedding_size"]
    assert models["sface"]["default"] and not models["tiny"]["default"]
    assert all(m["ready"] and m["provider"] for m in models.values())


def test_every_model_runs_each_batch_size_once_before_the_service_is_ready(served):
    """The warm-up (FACE_WARMUP, on by default): each served model runs batches of 1, 2, 4 ... up to
    FACE_BATCH_MAX_SIZE once at start-up, so no first request pays for the allocation, and /readyz
    says ready only after both have."""
    events = [json.loads(line) for line in served.log_path.read_text().splitlines() if line.startswith("{")]
    names = [e["event"] for e in events]
    warmed = [e for e in events if e["event"] == "model warmed up"]
    assert Settings().batch_max_size == 32
    assert len(warmed) == 2 and all(list(e["warmup_ms_by_batch"]) == ["1", "2", "4", "8", "16", "32"]
                                    for e in warmed), warmed
    last_warmed = max(i for i, name in enumerate(names) if name == "model warmed up")
    assert last_warmed < names.index("service ready")


def test_embed_and_detect_take_a_model(served):
    crop = images(ENROLLED[0], 1)
    default = served.post("/embed", json={"images": crop}).json()
    assert default["model_id"] == served.ready["model_id"] and default["dimension"] == 128
    for answer in (served.post("/embed", params={"model": "tiny"}, json={"images": crop}).json(),
                   served.post("/embed", json={"images": crop, "model": "tiny"}).json()):
        assert answer["model_id"] == "tiny@1" and answer["model"] == "tiny" and answer["dimension"] == TINY_DIM
        assert len(answer["embeddings"][0]) == TINY_DIM
    assert error(served.post("/embed", params={"model": "nope"}, json={"images": crop})) == (404, "model_not_found")
    assert served.post("/embed", params={"model": "nope"}, json={"images": crop}).json()["error"]["details"][
        "served"] == ["sface", "tiny"]
    photo = b64(sorted((FIXTURES / "photos").glob("*.jpg"))[0])
    detected = served.post("/detect", params={"model": "tiny"}, json={"images": [photo]})
    assert detected.status_code == 200, detected.text
    assert detected.json()["model_id"] == "tiny@1" and detected.json()["images"][0]["faces"]
    assert error(served.post("/detect", json={"images": [photo], "model": "nope"})) == (404, "model_not_found")


def test_collections_are_pinned_to_their_model(served):
    listed = {c["name"]: c for c in served.get("/collections").json()["items"]}
    assert (listed["small"]["model"], listed["small"]["model_id"], listed["small"]["dim"]) == ("tiny", "tiny@1",
                                                                                             TINY_DIM)
    assert (listed["default"]["model"], listed["default"]["dim"]) == ("sface", 128)
    assert error(served.post("/collections", json={"name": "ghost", "model": "nope"})) == (404, "model_not_found")
    assert error(served.get("/collections/ghost")) == (404, "collection_not_found")  # nothing was made


def test_each_collection_embeds_identifies_and_verifies_with_its_own_model(served):
    person, other = ENROLLED[1], ENROLLED[2]
    for path, model_id in (("/collections/small", "tiny@1"), ("", served.ready["model_id"])):
        r = served.post(f"{path}/enroll", json={"identity_id": person, "images": images(person)})
        assert r.status_code == 200, r.text
        assert r.json()["model_id"] == model_id
        found = served.post(f"{path}/identify", json={"images": images(person, 1), "threshold": 0.0}).json()
        assert found["model_id"] == model_id
        assert found["results"][0]["identity_id"] == person and found["results"][0]["score"] > 0.99
        verified = served.post(f"{path}/verify", json={"image_a": images(other, 1)[0], "identity_id": person}).json()
        assert verified["model_id"] == model_id
    tiny_verify = served.post("/collections/small/verify", json={"image_a": images(person, 1)[0],
                                                                 "identity_id": person}).json()
    assert tiny_verify["threshold"] == 0.5  # the tiny contract's, not SFace's


def test_embeddings_as_input_must_carry_the_collections_model(served):
    person = ENROLLED[3]
    crop = images(person, 1)
    tiny_vec = served.post("/embed", params={"model": "tiny"}, json={"images": crop}).json()["embeddings"]
    sface_vec = served.post("/embed", json={"images": crop}).json()["embeddings"]
    ok = served.post("/collections/small/enroll", json={"identity_id": person, "embeddings": tiny_vec,
                                                        "model_id": "tiny@1"})
    assert ok.status_code == 200, ok.text
    found = served.post("/collections/small/identify", json={"embeddings": tiny_vec, "model_id": "tiny@1",
                                                             "threshold": 0.0}).json()
    assert found["results"][0]["identity_id"] == person
    # the other model's id (or none) on the tiny collection; the tiny model's on the default one
    r = served.post("/collections/small/identify", json={"embeddings": tiny_vec, "model_id": served.ready["model_id"]})
    assert error(r) == (422, "model_mismatch") and r.json()["error"]["details"]["expected"] == "tiny@1"
    assert error(served.post("/identify", json={"embeddings": tiny_vec, "model_id": "tiny@1"})) == (422,
                                                                                                   "model_mismatch")
    assert error(served.post("/collections/small/identify", json={"embeddings": sface_vec,
                                                                  "model_id": "tiny@1"})) == (422, "wrong_dimension")
    r = served.post("/collections/small/verify", json={"embedding_a": tiny_vec[0], "embedding_b": tiny_vec[0]})
    assert error(r) == (422, "model_mismatch")


def test_a_collection_of_a_model_no_longer_served_refuses_the_start(backend, tmp_path, default_model, tiny):
    env = two_model_env(backend, default_model, tiny)
    data = tmp_path / "data"
    first = ServerProcess(data, env=env)
    first.wait_ready()
    with httpx.Client(base_url=first.url, timeout=60) as client:
        assert client.post("/collections", json={"name": "on-tiny", "model": "tiny"}).status_code == 201
        assert client.post("/collections/on-tiny/enroll", json={"identity_id": "x", "images": images(ENROLLED[0], 1)}
                           ).status_code == 200
    first.stop()
    one_model = {k: v for k, v in env.items() if k != "FACE_MODELS"}
    refused = ServerProcess(data, model=default_model, env=one_model)
    with pytest.raises(RuntimeError, match="exited"):
        refused.wait_ready(timeout=180)
    assert refused.proc.returncode != 0
    log = refused.log()
    assert "on-tiny" in log and "tiny@1" in log and "not served" in log
    again = ServerProcess(data, env=env)  # nothing was changed: served again, it starts and has its faces
    again.wait_ready()
    with httpx.Client(base_url=again.url, timeout=60) as client:
        assert client.get("/collections/on-tiny").json()["faces"] == 1
    again.stop()


def test_one_model_configuration_answers_as_before(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        ready = client.get("/readyz").json()
        assert ready["default_model"] == "default" and list(ready["models"]) == ["default"]
        assert ready["models"]["default"]["model_id"] == ready["model_id"]
        r = client.post("/embed", params={"model": "default"}, json={"images": images(ENROLLED[0], 1)})
        assert r.json()["model_id"] == ready["model_id"]
        assert error(client.post("/embed", params={"model": "tiny"}, json={"images": images(ENROLLED[0], 1)})) == (
            404, "model_not_found")


def test_a_model_file_missing_at_start_up_is_named_and_nothing_starts(backend, tmp_path, default_model, tiny):
    """Issue 22's bad input: FACE_MODELS names a file that is not there (a model not yet copied, a typo).
    The server exits non-zero naming the model and the file, before it opens or creates any store; the
    operator commands and the calibration say the same in one line with exit status 2 (no traceback)."""
    import subprocess
    import sys

    from harness.server import MODEL_CACHE, REPO

    missing = tmp_path / "exported" / "new.onnx"
    models = f"sface={default_model},new={missing}"
    data = tmp_path / "data"
    proc = ServerProcess(data, env=backend_env(backend, {"FACE_MODELS": models}))
    try:
        assert proc.proc.wait(180) not in (0, None)
    finally:
        proc.stop()
    log = proc.log()
    assert f"model 'new': model file {missing} does not exist" in log, log[-3000:]
    assert not data.exists()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "FACE_MODEL_CACHE_DIR": str(MODEL_CACHE),
           "FACE_LOG_JSON": "false", "HNSWLIB_NO_NATIVE": "1", "FACE_MODELS": models, "FACE_DATA_DIR": str(data),
           **backend_env(backend)}
    for command in (("gallery", "export", str(tmp_path / "out.jsonl")), ("keys", "list"),
                    ("calibrate", str(FIXTURES / "train"), "--model", "new"),
                    ("cluster", str(FIXTURES / "train"), "--output", str(tmp_path / "out.json"))):
        run = subprocess.run([sys.executable, "-m", "service", *command], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 2, (command, run.stderr[-3000:])
        assert f"model 'new': model file {missing} does not exist" in run.stderr and "Traceback" not in run.stderr, (
            command, run.stderr[-3000:])
    assert not data.exists() and not (tmp_path / "out.jsonl").exists() and not (tmp_path / "out.json").exists()


def test_readyz_says_where_each_models_tail_and_quality_come_from(served):
    """Uncalibrated: SFace's tail and quality are its contract's; the tiny model has no tail at all."""
    models = served.ready["models"]
    assert (models["sface"]["impostor_tail_source"], models["sface"]["quality_source"]) == ("model", "model")
    # the tiny model's contract has neither: null, not "model" (it said "model" for a quality it did not have)
    assert (models["tiny"]["impostor_tail_source"], models["tiny"]["quality_source"]) == (None, None)
