"""Each served model has its own calibration (issue 22): ``python -m service calibrate --model NAME``
calibrates the named served model (FACE_MODELS) into the data dir, without touching the others', and
that model's collections and ``POST /cluster`` with ``model`` decide by it. Real CLI runs, a real
server of two models (SFace and harness/models.py's tiny ONNX) over HTTP, on both backends."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from harness.fixtures import ENROLLED, b64, face_files
from harness.models import tiny_model
from harness.server import ServerProcess
from service.gallery.hygiene.cluster import DEFAULT_FALSE_MERGE
from service.model.calibration import ImpostorTail, threshold_for_gallery
from tests.conftest import backend_env
from tests.server import MODEL_CACHE, REPO
from tests.service.test_open_set import _calibration_folder

TINY_THRESHOLD = 0.5  # harness tiny model's 1:1 threshold (its contract has no impostor tail)


def _run_calibrate(folder: Path, data_dir: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service", "calibrate", str(folder), "--data-dir", str(data_dir),
                           "--min-pairs", "200", "--image-type", "aligned", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, default_model):
    """A data dir where the tiny model was calibrated first, then the default model (no --model)."""
    root = tmp_path_factory.mktemp("calibrated")
    tiny = tiny_model(root / "tiny.onnx")
    folder = _calibration_folder(root)
    for photos in [p for p in folder.iterdir() if p.name.startswith("photos-")]:  # aligned crops only
        shutil.rmtree(photos)
    (folder / "Meryl_Streep" / "broken.jpg").unlink()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "FACE_MODEL_CACHE_DIR": str(MODEL_CACHE),
           "FACE_LOG_JSON": "false", "HNSWLIB_NO_NATIVE": "1", "FACE_MODELS": f"sface={default_model},tiny={tiny}"}
    data = root / "data"
    runs = {}
    for name, args in (("tiny", ("--model", "tiny")), ("sface", ())):
        run = _run_calibrate(folder, data, env, *args)
        assert run.returncode == 0, run.stderr[-3000:]
        runs[name] = json.loads(run.stdout)
    return SimpleNamespace(data=data, tiny=tiny, folder=folder, env=env, runs=runs)


def _stored(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def test_each_model_is_calibrated_into_its_own_file(calibrated):
    tiny, sface = calibrated.runs["tiny"], calibrated.runs["sface"]
    assert (tiny["model"], tiny["model_id"]) == ("tiny", "tiny@1")
    assert (sface["model"], sface["model_id"]) == ("sface", "sface@2021dec-int8bq")  # no --model: the default
    assert Path(tiny["stored"]) == calibrated.data / "calibration" / "tiny@1" / "impostor_tail.json"
    assert Path(sface["stored"]) == calibrated.data / "calibration" / "sface@2021dec-int8bq" / "impostor_tail.json"
    # the default model's calibration, made second, left the tiny model's as it was
    assert _stored(tiny["stored"])["model_id"] == "tiny@1"
    assert _stored(tiny["stored"])["tail"]["pairs"] == tiny["pairs"]
    assert _stored(sface["stored"])["model_id"] == "sface@2021dec-int8bq"
    assert _stored(tiny["stored"])["tail"]["cosine"] != _stored(sface["stored"])["tail"]["cosine"]
    assert not (calibrated.data / "impostor_tail.json").exists()


def test_a_model_that_is_not_served_is_refused_and_nothing_is_stored(calibrated, tmp_path):
    run = _run_calibrate(calibrated.folder, tmp_path / "data", calibrated.env, "--model", "nope")
    assert run.returncode == 2
    assert "no model named 'nope' is served (served: sface, tiny)" in run.stderr
    assert not (tmp_path / "data" / "calibration").exists()


@pytest.fixture(scope="module", params=["embedded", "postgres"])
def served(request, tmp_path_factory, calibrated, default_model):
    data = tmp_path_factory.mktemp(f"calibrated-{request.param}") / "data"
    shutil.copytree(calibrated.data / "calibration", data / "calibration")
    env = backend_env(request, {"FACE_MODELS": f"sface={default_model},tiny={calibrated.tiny}",
                                "FACE_ENROLL_HUB_ALPHA": "0", "FACE_WARMUP": "false"})
    proc = ServerProcess(data, env=env)
    ready = proc.wait_ready()
    with httpx.Client(base_url=proc.url, timeout=120) as client:
        client.ready = ready  # type: ignore[attr-defined]
        yield client
    proc.stop()


def _tail(summary: dict) -> ImpostorTail:
    return ImpostorTail.from_dict(_stored(summary["stored"])["tail"])


def test_each_models_collections_decide_by_its_own_calibration(served, calibrated):
    # the default model's: /readyz reports it
    assert served.ready["impostor_tail"]["source"] == "gallery"
    assert served.ready["impostor_tail"]["pairs"] == calibrated.runs["sface"]["pairs"]
    models = served.ready["models"]
    assert models["sface"]["impostor_tail_source"] == models["tiny"]["impostor_tail_source"] == "gallery"
    # the tiny model has no tail of its own: its collection's FPIR threshold comes from its calibration
    assert served.post("/collections", json={"name": "small", "model": "tiny"}).status_code == 201
    people = ENROLLED[:3]
    for person in people:
        r = served.post("/collections/small/enroll", json={"identity_id": person,
                                                           "images": [b64(p) for p in face_files(person)[:2]]})
        assert r.status_code == 200, r.text
    found = served.post("/collections/small/identify", json={"images": [b64(face_files(people[0])[0])]}).json()
    assert found["model_id"] == "tiny@1" and found["threshold_source"] == "fpir"
    expected = threshold_for_gallery(_tail(calibrated.runs["tiny"]), 0.01, 3, 6).threshold
    assert found["threshold"] == pytest.approx(max(expected, TINY_THRESHOLD), abs=1e-4)


def test_cluster_embeds_with_the_named_model_and_its_calibration(served, calibrated):
    crops = [b64(p) for person in ENROLLED[:2] for p in face_files(person)[:2]]
    tiny = served.post("/cluster", json={"images": crops, "image_type": "aligned", "model": "tiny"})
    assert tiny.status_code == 200, tiny.text
    body = tiny.json()
    assert (body["model"], body["model_id"], body["faces"]) == ("tiny", "tiny@1", 4)
    tail = _tail(calibrated.runs["tiny"])
    assert body["threshold"] == pytest.approx(max(tail.threshold_at(DEFAULT_FALSE_MERGE), TINY_THRESHOLD), abs=1e-4)
    by_query = served.post("/cluster", params={"model": "tiny"}, json={"images": crops, "image_type": "aligned"})
    assert by_query.json()["threshold"] == body["threshold"] and by_query.json()["model"] == "tiny"
    default = served.post("/cluster", json={"images": crops, "image_type": "aligned"}).json()
    assert (default["model"], default["model_id"]) == ("sface", served.ready["model_id"])
    sface_tail = _tail(calibrated.runs["sface"])
    assert default["threshold"] == pytest.approx(max(sface_tail.threshold_at(DEFAULT_FALSE_MERGE),
                                                     served.ready["verify_threshold"]), abs=1e-4)
    # the tiny model's embeddings cluster under its name and id, and only there
    vectors = served.post("/embed", json={"images": crops, "model": "tiny"}).json()["embeddings"]
    again = served.post("/cluster", json={"embeddings": vectors, "model_id": "tiny@1", "model": "tiny",
                                          "threshold": -1.0})
    assert again.status_code == 200, again.text
    assert [c["size"] for c in again.json()["clusters"]] == [4]
    wrong = served.post("/cluster", json={"embeddings": vectors, "model_id": "tiny@1"})
    assert (wrong.status_code, wrong.json()["error"]["code"]) == (422, "model_mismatch")
    unknown = served.post("/cluster", json={"images": crops, "image_type": "aligned", "model": "nope"})
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "model_not_found")
    assert unknown.json()["error"]["details"]["served"] == ["sface", "tiny"]
    twice = served.post("/cluster", params={"model": "sface"}, json={"images": crops, "image_type": "aligned",
                                                                     "model": "tiny"})
    assert (twice.status_code, twice.json()["error"]["code"]) == (422, "invalid_request")
