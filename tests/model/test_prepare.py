"""Preparing the shipped SFace file: repaired graph, dynamic batch, same embeddings, contract."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from service.model.contract import ContractError, FaceContract, read_contract, sidecar_path
from service.model.prepare import SFACE_CONTRACT, SFACE_FILE, packaged_model, prepare_model, resolve_model_path
from tests.conftest import FACES


def faces(n=6):
    files = sorted(FACES.glob("*.jpg"))[:n]
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]).transpose(0, 3, 1, 2).astype(np.float32)


def normed(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_shipped_file_really_is_broken_and_prepared_copy_is_not(default_model):
    shipped = onnx.load(str(packaged_model(SFACE_FILE)))
    consumed = {i for n in shipped.graph.node for i in n.input}
    dangling = [i.name for i in shipped.graph.input if i.name not in consumed]
    assert len(dangling) == 29  # the defect the preparation exists for
    with pytest.raises(Exception):  # noqa: B017 - onnxruntime's error classes vary by version; any failure is the point
        ort.InferenceSession(str(packaged_model(SFACE_FILE))).run(None, {"data": faces(1)})

    prepared = onnx.load(str(default_model))
    assert [i.name for i in prepared.graph.input] == ["data"]
    assert not any(n.op_type == "DequantizeLinear" for n in prepared.graph.node)
    assert prepared.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_prepared_model_matches_unfolded_graph_at_any_batch(default_model, tmp_path):
    unfolded = prepare_model(packaged_model(SFACE_FILE), tmp_path / "raw.onnx", SFACE_CONTRACT, fold_dequant=False)
    x = faces(6)
    folded = ort.InferenceSession(str(default_model), providers=["CPUExecutionProvider"])
    raw = ort.InferenceSession(str(unfolded), providers=["CPUExecutionProvider"])
    a = normed(folded.run(None, {"data": x})[0])
    b = normed(np.concatenate([raw.run(None, {"data": x[i : i + 1]})[0] for i in range(len(x))]))
    assert a.shape == (6, 128)
    assert float((a * b).sum(1).min()) > 0.99999


def test_contract_in_metadata_and_sidecar(default_model):
    assert read_contract(default_model) == SFACE_CONTRACT
    side = json.loads(sidecar_path(default_model).read_text())
    assert FaceContract.from_metadata(side) == SFACE_CONTRACT
    assert side["face.threshold"] == "0.3140" and side["face.embedding_size"] == "128"


def test_sidecar_is_read_when_metadata_is_absent(default_model, tmp_path):
    proto = onnx.load(str(default_model))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    with pytest.raises(ContractError, match="no face"):
        read_contract(bare)
    sidecar_path(bare).write_text(sidecar_path(default_model).read_text())
    assert read_contract(bare).model_id == "sface@2021dec-int8bq"


def test_contract_validation():
    meta = SFACE_CONTRACT.to_metadata()
    with pytest.raises(ContractError, match="lacks"):
        FaceContract.from_metadata({k: v for k, v in meta.items() if k != "face.threshold"})
    with pytest.raises(ContractError, match="layout"):
        FaceContract.from_metadata({**meta, "face.layout": "CHWN"})
    with pytest.raises(ContractError, match="contract"):
        FaceContract.from_metadata({**meta, "face.contract": "99"})
    with pytest.raises(ContractError):
        FaceContract.from_metadata({**meta, "face.mean": "1,2"})


def test_resolve_model_path(default_model, tmp_path):
    assert resolve_model_path(default_model.parent, tmp_path) == default_model
    with pytest.raises(FileNotFoundError):
        resolve_model_path(tmp_path / "missing.onnx", tmp_path)


def test_processes_preparing_one_cache_at_once_each_get_a_whole_model(tmp_path):
    """Replicas (or test workers) sharing a model cache prepare the default model at the same moment:
    each must come back with a whole, loadable model and its contract, never another's half-written
    file. They all wrote one temporary name before, so their writes interleaved."""
    import subprocess
    import sys
    import time

    go = tmp_path / "go"
    script = (
        "import sys, time, pathlib, onnx\n"
        "from service.model.prepare import default_model, SFACE_CONTRACT\n"
        "from service.model.contract import read_contract, sidecar_path, FaceContract\n"
        "import json\n"
        "go = pathlib.Path(sys.argv[1])\n"
        "while not go.exists(): time.sleep(0.005)\n"
        "path = default_model(pathlib.Path(sys.argv[2]))\n"
        "onnx.checker.check_model(onnx.load(str(path)))\n"
        "assert read_contract(path) == SFACE_CONTRACT\n"
        "assert FaceContract.from_metadata(json.loads(sidecar_path(path).read_text())) == SFACE_CONTRACT\n"
        "print('whole')\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(go), str(tmp_path / "cache")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    time.sleep(3)  # every process imported and is waiting
    go.touch()
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and out.strip() == "whole", err[-2000:]
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()) == [
        "model.onnx", "model.onnx.face.json", "source.sha256"]  # no temporary file left behind
