"""CI's tiny real pipeline: train a few steps -> export -> parity -> contract -> the service answers /verify."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.exporter.conftest import TRAIN_FACES, write_pairs

pytestmark = pytest.mark.export
TINY_FP16_MIN_COSINE = 0.995
pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    from exporter.export import ExportOptions, export_model

    out = tmp_path_factory.mktemp("export")
    pairs = write_pairs(out / "pairs.txt", TRAIN_FACES)
    (out / "images").symlink_to(TRAIN_FACES, target_is_directory=True)  # pairs.txt reads <dir>/images
    # A 6-step model is nowhere near converged: its embeddings of different faces are close together, so
    # fp16 rounding moves them by more, relatively, than a trained model's (measured over seeds: minimum
    # cosine 0.9989..0.9999 here, 0.999994 for the real MobileNetV2 run, 0.999998 for SFace). The 0.999 bar
    # itself is exercised on SFace in tests/model/test_fp16.py; here the pipeline gets a looser one.
    return export_model(tiny_run, out / "model.onnx", ExportOptions(calibrate_pairs=str(pairs), fp16=True,
                                                                    fp16_min_cosine=TINY_FP16_MIN_COSINE))


def test_export_parity_and_contract(exported):
    from service.model.contract import read_contract

    assert exported["parity_fp32"]["min_cosine"] >= 0.99999
    assert exported["parity_fp16"]["min_cosine"] >= TINY_FP16_MIN_COSINE
    contract = read_contract(exported["onnx"])
    assert contract.layout == "NCHW" and contract.color == "RGB" and contract.input_size == (112, 112)
    assert contract.mean == (127.5,) * 3 and contract.std == (127.5,) * 3
    assert contract.embedding_size == 128 and contract.model_id == "arcface-mbv2-ci@ci"
    assert contract.threshold == pytest.approx(exported["calibration"]["best_threshold"], abs=1e-4)
    assert contract.extra["face.threshold_source"].startswith("10-fold:")
    half = read_contract(exported["onnx_fp16"])
    assert half.extra["face.precision"] == "fp16" and half.model_id == "arcface-mbv2-ci@ci-fp16"
    assert exported["parity_fp16"]["emulated_min_cosine"] >= TINY_FP16_MIN_COSINE
    assert float(half.extra["face.fp16_min_cosine"]) >= TINY_FP16_MIN_COSINE


def test_fp16_export_carries_every_key_of_the_fp32_one_and_the_fp16_keys(exported):
    """The exporter's fp16 variant has the fp32 model's face.* keys plus exactly the keys a variant made
    by the service's fp16 tool has (the contract's FP16_KEYS), with the source digest of the fp32 file."""
    import onnx

    from service.model.contract import FP16_KEYS, file_digest, read_contract

    def keys(path: str) -> set[str]:
        return {p.key for p in onnx.load(path, load_external_data=False).metadata_props if p.key.startswith("face.")}

    full, half = keys(exported["onnx"]), keys(exported["onnx_fp16"])
    assert half == full | set(FP16_KEYS)
    made = read_contract(exported["onnx_fp16"])
    assert made.extra["face.fp16_source_sha256"] == file_digest(Path(exported["onnx"]))
    assert int(made.extra["face.fp16_parity_faces"]) == exported["parity_fp16"]["faces"]


def test_onnx_graph_shape(exported):
    import onnx

    graph = onnx.load(exported["onnx"]).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert graph.input[0].name == "input" and dims == ["batch", 3, 112, 112]
    assert [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim] == ["batch", 128]
    assert onnx.load(exported["onnx"]).opset_import[0].version == 17


def test_parity_failure_fails_the_export(tiny_run, tmp_path):
    from exporter.export import ExportOptions, ExportParityError, export_model

    with pytest.raises(ExportParityError):
        export_model(tiny_run, tmp_path / "m.onnx", ExportOptions(threshold=0.3, min_cosine=1.0 + 1e-9))
    assert not (tmp_path / "m.onnx").exists()


def test_fp16_parity_failure_keeps_fp32_and_writes_no_variant(tiny_run, tmp_path):
    from exporter.export import ExportOptions, ExportParityError, export_model

    with pytest.raises(ExportParityError, match="no fp16 variant"):
        export_model(tiny_run, tmp_path / "m.onnx", ExportOptions(threshold=0.3, fp16=True, fp16_min_cosine=1.0 + 1e-9))
    assert (tmp_path / "m.onnx").exists() and not (tmp_path / "m.fp16.onnx").exists()


def test_service_verifies_with_the_exported_model(exported, tmp_path):
    from exporter.evaluate import OnnxEmbedder
    from exporter.images import load_faces
    from tests.server import running_server

    a, b = sorted((TRAIN_FACES / "Meryl_Streep").glob("*.jpg"))[:2]
    embedder = OnnxEmbedder(exported["onnx"])
    emb = np.asarray(embedder(load_faces([a, b])))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    with running_server(tmp_path / "data", model=exported["onnx"]) as url:
        body = {"image_a": base64.b64encode(a.read_bytes()).decode(), "image_b": base64.b64encode(b.read_bytes()).decode()}
        response = httpx.post(f"{url}/verify", json=body, timeout=60)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model_id"] == embedder.contract.model_id
    assert answer["threshold"] == pytest.approx(embedder.contract.threshold)
    assert answer["similarity"] == pytest.approx(float(emb[0] @ emb[1]), abs=1e-4)
    assert answer["match"] == (answer["similarity"] >= answer["threshold"])


def _tampered_run(tiny_run, tmp_path, change) -> Path:
    """A copy of the tiny run whose embedding weights ``change`` (model -> None) has altered."""
    from exporter.checkpoints import load_run, save_run

    cfg, model = load_run(tiny_run)
    change(model)
    run = tmp_path / "tampered"
    save_run(run, cfg, model, ["a"])
    return run


def _final_dense(model):
    head = model.get_layer("OutputLayer")
    return next(layer for layer in head.layers if layer.__class__.__name__ == "Dense")


@pytest.mark.parametrize("how", ["nan", "zero"])
def test_degenerate_model_is_refused(tiny_run, tmp_path, how):
    """NaN embeddings (nan < bar is False) and all-zero embeddings must not pass the parity gate."""
    from exporter.export import ExportOptions, ExportParityError, export_model

    def change(model):
        dense = _final_dense(model)
        kernel, bias = dense.kernel, dense.bias
        kernel.assign(np.full(kernel.shape, np.nan if how == "nan" else 0.0, np.float32))
        bias.assign(np.zeros(bias.shape, np.float32))
        # the BN after the Dense would add its beta back: zero it so the embedding really is 0
        bn = model.get_layer("OutputLayer").layers[-1]
        bn.beta.assign(np.zeros(bn.beta.shape, np.float32))
        bn.moving_mean.assign(np.zeros(bn.moving_mean.shape, np.float32))

    run = _tampered_run(tiny_run, tmp_path, change)
    with pytest.raises(ExportParityError, match="non-finite|zero"):
        export_model(run, tmp_path / "m.onnx", ExportOptions(threshold=0.3))
    assert not (tmp_path / "m.onnx").exists()


def test_fp16_overflow_is_refused(tiny_run, tmp_path):
    """Huge activations are fine in fp32 but inf -> NaN in fp16: the fp16 gate must refuse them."""
    from exporter.export import ExportOptions, ExportParityError, export_model

    def change(model):
        dense = _final_dense(model)
        dense.kernel.assign(dense.kernel.numpy() * 1e6)
        bn = model.get_layer("OutputLayer").layers[-1]
        bn.moving_mean.assign(bn.moving_mean.numpy() * 1e6)
        bn.beta.assign(bn.beta.numpy() * 1e6)

    run = _tampered_run(tiny_run, tmp_path, change)
    with pytest.raises(ExportParityError, match="fp16"):
        export_model(run, tmp_path / "m.onnx", ExportOptions(threshold=0.3, fp16=True))
    assert (tmp_path / "m.onnx").exists() and not (tmp_path / "m.fp16.onnx").exists()


@pytest.fixture
def graph_copies(monkeypatch) -> list[str]:
    """Every deep copy of a tf2onnx Graph made while the test runs, with TF2ONNX_CATCH_ERRORS unset."""
    import copy

    from tf2onnx.graph import Graph

    copies: list[str] = []
    real = copy.deepcopy

    def counting(obj, memo=None, *args):
        if isinstance(obj, Graph):
            copies.append(type(obj).__name__)
        return real(obj, memo, *args)

    monkeypatch.setattr(copy, "deepcopy", counting)
    monkeypatch.delenv("TF2ONNX_CATCH_ERRORS", raising=False)
    return copies


def test_conversion_makes_no_graph_copies(tiny_run, graph_copies):
    """tf2onnx deep-copies the graph before every optimizer by default (ResNet-50 export peaked at
    ~13 GB); the exporter converts without those copies and leaves tf2onnx's setting as it was."""
    import os

    from exporter.checkpoints import load_run
    from exporter.export import to_onnx

    cfg, model = load_run(tiny_run)
    proto = to_onnx(model, cfg.input_size)
    assert graph_copies == []
    assert "TF2ONNX_CATCH_ERRORS" not in os.environ
    assert proto.graph.output[0].name == "embedding"


def test_conversion_with_graph_copies_on_request(tiny_run, graph_copies):
    """exporter.memprobe's "before" figure: to_onnx(graph_copies=True) converts as tf2onnx does by default
    (a graph copy per optimizer), into the same graph."""
    from exporter.checkpoints import load_run
    from exporter.export import to_onnx

    cfg, model = load_run(tiny_run)
    lean = to_onnx(model, cfg.input_size)
    assert graph_copies == []
    with_copies = to_onnx(model, cfg.input_size, graph_copies=True)
    assert graph_copies
    assert [n.op_type for n in with_copies.graph.node] == [n.op_type for n in lean.graph.node]


def test_the_exported_model_takes_over_a_gallery_without_its_photos(exported, default_model, tmp_path):
    """Issue 22's whole road with the CI's own exporter run: the model trained and exported above is
    served next to SFace; a collection on SFace that kept its crops is migrated to it (the job re-embeds
    the crops: no photo is sent again), compared, the clients' alias is re-pointed, and identify through
    the alias answers with the exported model and finds the enrolled people."""
    import subprocess
    import sys
    import time

    from harness.fixtures import ENROLLED, b64, face_files
    from harness.server import REPO, ServerProcess
    from service.model.contract import read_contract

    key = tmp_path / "crop.key"
    made = subprocess.run([sys.executable, "-m", "service", "crop-key", "new", str(key)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    exported_id = read_contract(exported["onnx"]).model_id
    server = ServerProcess(tmp_path / "data", env={"FACE_MODELS": f"sface={default_model},ci={exported['onnx']}",
                                                   "FACE_CROP_KEY_FILE": str(key), "FACE_ENROLL_HUB_ALPHA": "0"})
    try:
        ready = server.wait_ready()
        assert set(ready["models"]) == {"sface", "ci"}
        with httpx.Client(base_url=server.url, timeout=120) as c:
            assert c.post("/collections", json={"name": "people-v1", "keep_crops": True}).status_code == 201
            for person in ENROLLED:
                r = c.post("/collections/people-v1/enroll", json={"identity_id": person,
                                                                  "images": [b64(f) for f in face_files(person)]})
                assert r.status_code == 200, r.text
            assert c.put("/aliases/people", json={"collection": "people-v1"}).status_code == 200

            r = c.post("/collections/people/migrate", json={"model": "ci", "into": "people-v2"})
            assert r.status_code == 202, r.text
            job_id, deadline = r.json()["job"]["id"], time.monotonic() + 300
            while (job := c.get(f"/jobs/{job_id}").json())["state"] not in ("done", "failed", "cancelled"):
                assert time.monotonic() < deadline, job
                time.sleep(0.1)
            assert job["state"] == "done" and job["error"] is None, job
            report = job["report"]
            assert report["target"]["model_id"] == exported_id and report["unpaired_identities"] == 0
            assert report["source"]["faces"] == report["target"]["faces"] == sum(len(face_files(p)) for p in ENROLLED)

            assert c.put("/aliases/people", json={"collection": "people-v2"}).status_code == 200
            time.sleep(1.1)  # FACE_ALIAS_CACHE_S
            for person in ENROLLED:
                found = c.post("/collections/people/identify", json={"images": [b64(face_files(person)[0])],
                                                                     "threshold": 0.0}).json()
                assert found["model_id"] == exported_id, found
                assert found["results"][0]["identity_id"] == person, (person, found)
    finally:
        server.stop()
