"""The fp16 variant of the default model: parity on real faces, float32 I/O, contract, served by the runtime.

The models here are real ONNX graphs run by onnxruntime's CPU provider; the overflow cases are the
shipped SFace graph with a real-world hazard added (an L2-normalisation tail on a large embedding,
a large intermediate scale), which plain fp16 conversion breaks.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from service.config import Settings
from service.model import fp16
from service.model.contract import read_contract, sidecar_path, write_contract
from service.model.runtime import EmbeddingModel
from tests.conftest import FACES
from tests.server import REPO


@pytest.fixture(scope="module")
def variant(default_model, tmp_path_factory) -> fp16.Fp16Result:
    return fp16.make_fp16_variant(default_model, tmp_path_factory.mktemp("fp16") / "model.onnx", FACES)


@pytest.fixture(scope="module")
def faces() -> np.ndarray:
    return fp16.load_faces(FACES, (112, 112))


def _with_graph_edit(default_model: Path, edit, name: str) -> onnx.ModelProto:
    proto = onnx.load(str(default_model))
    edit(proto.graph)
    contract = dataclasses.replace(read_contract(default_model), model_name=name)
    write_contract(proto, contract)
    onnx.checker.check_model(proto)
    return proto


def with_l2_tail(default_model: Path) -> onnx.ModelProto:
    """SFace with tf2onnx's l2_normalize (Mul(x,x) -> ReduceSum -> Max -> Sqrt -> Reciprocal -> Mul)
    on an embedding of norm ~1000: the sum of squares (~1e6) is far beyond fp16's 65504."""

    def edit(graph):
        out = graph.output[0].name
        graph.initializer.extend([
            numpy_helper.from_array(np.array(80.0, np.float32), "scale"),
            numpy_helper.from_array(np.array([1], np.int64), "axes"),
            numpy_helper.from_array(np.array(1e-12, np.float32), "eps"),
        ])
        graph.node.extend([
            helper.make_node("Mul", [out, "scale"], ["big"]),
            helper.make_node("Mul", ["big", "big"], ["squares"]),
            helper.make_node("ReduceSum", ["squares", "axes"], ["sum"], keepdims=1),
            helper.make_node("Max", ["sum", "eps"], ["sum_eps"]),
            helper.make_node("Sqrt", ["sum_eps"], ["norm"]),
            helper.make_node("Reciprocal", ["norm"], ["inv_norm"]),
            helper.make_node("Mul", ["big", "inv_norm"], ["embedding"]),
        ])
        del graph.output[:]
        graph.output.append(helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 128]))

    return _with_graph_edit(default_model, edit, "sface-l2tail")


def with_large_intermediate(default_model: Path) -> onnx.ModelProto:
    """SFace whose input is scaled by 300 and back before anything else: 255 x 300 > 65504."""

    def edit(graph):
        data = graph.input[0].name
        graph.initializer.extend([numpy_helper.from_array(np.array(300.0, np.float32), "up"),
                                  numpy_helper.from_array(np.array(1 / 300, np.float32), "down")])
        for node in graph.node:
            node.input[:] = ["data_restored" if name == data else name for name in node.input]
        graph.node.insert(0, helper.make_node("Mul", ["data_up", "down"], ["data_restored"]))
        graph.node.insert(0, helper.make_node("Mul", [data, "up"], ["data_up"]))

    return _with_graph_edit(default_model, edit, "sface-scaled")


def test_fp16_variant_of_default_model_matches_fp32_on_real_faces(variant, default_model):
    parity = variant.parity
    assert parity.faces == len(list(FACES.glob("*.jpg"))) >= fp16.MIN_PARITY_FACES
    assert parity.runtime_min_cosine >= fp16.MIN_COSINE
    assert parity.emulated_min_cosine >= fp16.MIN_COSINE
    assert parity.providers == fp16.default_providers()  # what the session ran on is what was asked for

    proto = onnx.load(str(variant.path))
    io = list(proto.graph.input) + list(proto.graph.output)
    assert all(v.type.tensor_type.elem_type == TensorProto.FLOAT for v in io)
    conv_weights = {n.input[1] for n in proto.graph.node if n.op_type == "Conv"}
    assert conv_weights and all(i.data_type == TensorProto.FLOAT16 for i in proto.graph.initializer
                                if i.name in conv_weights)
    assert variant.path.stat().st_size < 0.6 * default_model.stat().st_size


def test_fp16_contract_is_the_source_contract_with_a_new_version(variant, default_model):
    source = read_contract(default_model)
    made = read_contract(variant.path)
    assert made.model_version == source.model_version + "-fp16"
    assert made.model_id != source.model_id  # the gallery refuses to mix the two
    same = ("input_name", "embedding_size", "model_name", "threshold", "identify_threshold", "layout", "color",
            "input_size", "mean", "std", "alignment")
    assert {k: getattr(made, k) for k in same} == {k: getattr(source, k) for k in same}
    assert made.extra["face.precision"] == "fp16"
    assert float(made.extra["face.fp16_min_cosine"]) == pytest.approx(variant.parity.min_cosine, abs=1e-6)
    assert made.extra["face.fp16_source_sha256"] == fp16.file_digest(default_model)
    assert sidecar_path(variant.path).exists()  # the source had one, so the variant has one too
    assert read_contract(variant.path) == made


def test_service_runtime_serves_the_fp16_variant(variant, default_model, faces):
    settings = Settings(providers="cpu", intra_op_threads=2)
    fp32_model, fp16_model = EmbeddingModel(default_model, settings), EmbeddingModel(variant.path, settings)
    fp32_model.initialize()
    fp16_model.initialize()
    reference, candidate = fp32_model.execute(faces), fp16_model.execute(faces)
    assert candidate.dtype == np.float32 and candidate.shape == reference.shape
    assert np.sum(reference * candidate, axis=1).min() >= fp16.MIN_COSINE
    # still a face model: two photos of the same person are closer than two different people
    names = [p.name.rsplit("_", 1)[0] for p in sorted(FACES.glob("*.jpg"))]
    same = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names)) if names[i] == names[j]]
    other = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names)) if names[i] != names[j]]
    similarity = candidate @ candidate.T
    assert np.mean([similarity[p] for p in same]) > np.mean([similarity[p] for p in other]) + 0.3


def test_emulated_rounding_catches_an_overflow_the_cpu_runtime_hides(default_model, faces):
    from onnxconverter_common import float16

    faces = faces[:8]  # enough to show it; the CPU runs of fp16 graphs are slow
    fp32 = with_l2_tail(default_model)
    contract = read_contract(default_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        naive = float16.convert_float_to_float16(fp16.copy_model(fp32), keep_io_types=True)
    naive_parity = fp16.check_parity(fp32, naive, faces, contract, ["CPUExecutionProvider"])
    # ORT's CPU provider keeps activations in fp32 between its cast-wrapped fp16 nodes: looks fine ...
    assert naive_parity.runtime_min_cosine >= fp16.MIN_COSINE
    # ... but with fp16 rounding between nodes (as on a GPU) the sum of squares is inf
    assert naive_parity.emulated_min_cosine < 0.5
    assert not naive_parity.passed(fp16.MIN_COSINE)

    ours, kept_fp32 = fp16.convert_to_fp16(fp32)
    assert {"ReduceSum", "Sqrt", "Reciprocal"} <= {n.op_type for n in ours.graph.node if n.name in kept_fp32}
    assert ours.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert fp16.check_parity(fp32, ours, faces, contract, ["CPUExecutionProvider"]).passed(fp16.MIN_COSINE)


def test_parity_failure_writes_nothing(default_model, tmp_path):
    src = tmp_path / "scaled" / "model.onnx"
    src.parent.mkdir()
    onnx.save(with_large_intermediate(default_model), str(src))
    dst = tmp_path / "scaled-fp16" / "model.onnx"
    with pytest.raises(fp16.Fp16ParityError):
        fp16.make_fp16_variant(src, dst, FACES, max_faces=8)
    assert not dst.exists() and not dst.parent.exists()


def test_refuses_an_fp16_source_and_reuses_an_up_to_date_variant(variant, default_model):
    with pytest.raises(fp16.Fp16Error, match="fp16"):
        fp16.make_fp16_variant(variant.path, variant.path.with_name("again.onnx"), FACES)
    before = variant.path.stat().st_mtime_ns
    again = fp16.make_fp16_variant(default_model, variant.path, FACES, reuse=True)
    assert again.reused and again.contract == variant.contract
    assert variant.path.stat().st_mtime_ns == before


def test_default_parity_faces_are_package_data(default_model, tmp_path):
    """Without a face directory the parity check uses faces inside the package (an installed wheel has
    no tests/ folder): copies of fixture crops, enough of them, and a variant is made with them."""
    shipped = sorted(fp16.PARITY_FACES.glob("*.jpg"))
    assert fp16.PARITY_FACES.parent == Path(fp16.__file__).parent and "tests" not in fp16.PARITY_FACES.parts
    assert len(shipped) == 8 >= fp16.MIN_PARITY_FACES and (fp16.PARITY_FACES / "ATTRIBUTION.md").is_file()
    for path in shipped:
        assert path.read_bytes() == (FACES / path.name).read_bytes()
    result = fp16.make_fp16_variant(default_model, tmp_path / "default-faces" / "model.onnx")
    assert result.parity.faces == len(shipped) and result.parity.min_cosine >= fp16.MIN_COSINE
    assert result.contract.extra["face.fp16_parity_faces"] == str(len(shipped))


def test_the_wheel_ships_the_parity_faces(wheel_names):
    names = {n for n in wheel_names if n.startswith("service/model/parity_faces/")}
    expected = {f"service/model/parity_faces/{p.name}" for p in fp16.PARITY_FACES.iterdir()}
    assert expected == names and "service/model/parity_faces/ATTRIBUTION.md" in names and len(names) == 9


def test_parity_faces_must_be_aligned_crops(tmp_path):
    for i in range(fp16.MIN_PARITY_FACES):
        Image.new("RGB", (160, 160), (i * 40, 80, 120)).save(tmp_path / f"big_{i}.png")
    with pytest.raises(fp16.Fp16Error, match="aligned"):
        fp16.load_faces(tmp_path, (112, 112))
    few = tmp_path / "few"
    few.mkdir()
    for path in sorted(FACES.glob("*.jpg"))[: fp16.MIN_PARITY_FACES - 1]:
        (few / path.name).write_bytes(path.read_bytes())
    with pytest.raises(fp16.Fp16Error, match="at least"):
        fp16.load_faces(few, (112, 112))


def test_cli_makes_the_variant_and_fails_on_bad_parity(default_model, tmp_path):
    dst = tmp_path / "cli" / "model.onnx"
    ok = subprocess.run([sys.executable, "-m", "service.model.fp16", str(default_model), str(dst), "--faces",
                         str(FACES)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert read_contract(dst).model_version.endswith("-fp16")
    assert "min cosine" in ok.stderr

    bad_src = tmp_path / "scaled.onnx"
    onnx.save(with_large_intermediate(default_model), str(bad_src))
    bad = subprocess.run([sys.executable, "-m", "service.model.fp16", str(bad_src), str(tmp_path / "bad.onnx"),
                          "--faces", str(FACES), "--max-faces", "8"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1
    assert "nothing written" in bad.stderr or "non-finite" in bad.stderr
    assert not (tmp_path / "bad.onnx").exists()
