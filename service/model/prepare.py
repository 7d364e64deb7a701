"""Prepare third-party ONNX models so the service can run them, and locate the default model.

Preparation is our own code, run once, writing a repaired copy plus its contract:

* graph inputs that no node consumes are dropped (the SFace file as shipped declares 29 such
  inputs and onnxruntime then demands them at run time);
* inputs that merely shadow initializers are dropped too, so weights are constants ORT may fold;
* weight-only ``DequantizeLinear`` nodes over constant int8 initializers (the shipped SFace stores
  its weights that way) are folded into float32 initializers, which is what the reference LFW figure
  was measured with and what every execution provider runs fastest;
* a fixed batch dimension of 1 is made dynamic (``batch``) when the graph allows it;
* the ``face.*`` contract is written into the copy's metadata and into a JSON sidecar.

``python -m service.model.prepare`` runs it from the command line.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..faces.quality import QualityModel
from ..packaged import packaged_model
from .calibration import ImpostorTail
from .contract import (
    FaceContract,
    file_digest,
    read_contract,
    save_model,
    write_contract,
    write_sidecar,
)
from .files import replace_atomically

log = logging.getLogger(__name__)

SFACE_FILE = "face_recognition_sface_2021dec_int8bq.onnx"
PREPARED_NAME = "sface-2021dec"

SFACE_TAIL_FILE = "sface_impostor_tail.json"
SFACE_QUALITY_FILE = "sface_quality.json"


def packaged_impostor_tail(filename: str = SFACE_TAIL_FILE) -> ImpostorTail | None:
    """The default model's impostor tail, measured once on all cross-person pairs of the LFW crops
    (users do not have them at prepare time); how it was made is in the file's ``method``.
    (None only while bench/impostor_tail.py bootstraps it; tests check it ships.)"""
    path = Path(__file__).parent / filename
    return ImpostorTail.from_json(path.read_text()) if path.exists() else None


def packaged_quality(filename: str = SFACE_QUALITY_FILE) -> QualityModel | None:
    """The default model's fitted quality (``bench/quality.py --write-model`` on the LFW originals;
    how in the file's ``method``). None only while that bench bootstraps it; tests check it ships."""
    path = Path(__file__).parent / filename
    return QualityModel.from_json(path.read_text()) if path.exists() else None


# SFace (opencv_zoo, Apache-2.0): 112x112 RGB 0..255 NCHW, raw pixels in (the graph subtracts and
# scales itself), 128-d out. Thresholds measured on ../shared/data/lfw-112: 0.314 is its LFW 10-fold
# verify threshold (99.33%); 0.42 gave a 1% false-accept rate for unknown faces against a
# 300-identity gallery while still identifying 97% of known faces (the service now derives the 1:N
# threshold from the impostor tail and the gallery size; 0.42 is what it falls back to without one).
SFACE_CONTRACT = FaceContract(
    input_name="data",
    embedding_size=128,
    model_name="sface",
    model_version="2021dec-int8bq",
    threshold=0.314,
    identify_threshold=0.42,
    layout="NCHW",
    color="RGB",
    input_size=(112, 112),
    mean=(0.0, 0.0, 0.0),
    std=(1.0, 1.0, 1.0),
    alignment="arcface-5pt-112",
    impostor_tail=packaged_impostor_tail(),
    quality=packaged_quality(),
)


def drop_unused_inputs(graph: onnx.GraphProto) -> list[str]:
    consumed = {name for node in graph.node for name in node.input}
    consumed |= {out.name for out in graph.output}
    initializers = {init.name for init in graph.initializer}
    dropped = [i.name for i in graph.input if i.name not in consumed or i.name in initializers]
    keep = [i for i in graph.input if i.name not in dropped]
    del graph.input[:]
    graph.input.extend(keep)
    unused_inits = [i for i in graph.initializer if i.name not in consumed]
    for init in unused_inits:
        graph.initializer.remove(init)
    return dropped


def _dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, axis: int, block: int) -> np.ndarray:
    q = q.astype(np.float32)
    zero = np.zeros_like(scale, dtype=np.float32) if zero is None else zero.astype(np.float32)
    scale = scale.astype(np.float32)
    if scale.ndim == 0 or scale.size == 1:
        return (q - zero.reshape(())) * scale.reshape(())
    axis = axis % q.ndim
    if block > 0:  # blocked quantisation: one scale per `block` elements along `axis`
        scale = np.repeat(scale, block, axis=axis).take(range(q.shape[axis]), axis=axis)
        zero = np.repeat(zero, block, axis=axis).take(range(q.shape[axis]), axis=axis)
        return (q - zero) * scale
    shape = [1] * q.ndim
    shape[axis] = -1  # per-axis quantisation
    return (q - zero.reshape(shape)) * scale.reshape(shape)


def fold_weight_dequantization(graph: onnx.GraphProto) -> int:
    """Replace DequantizeLinear (and a following constant Reshape) of constants by float32 weights."""
    inits = {i.name: i for i in graph.initializer}
    folded = 0
    for node in list(graph.node):
        if node.op_type != "DequantizeLinear" or not all(n in inits for n in node.input if n):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        arrays = [numpy_helper.to_array(inits[n]) if n else None for n in node.input]
        q, scale = arrays[0], arrays[1]
        assert q is not None and scale is not None  # x and x_scale are required inputs of DequantizeLinear
        zero = arrays[2] if len(arrays) > 2 else None
        weight = _dequantize(q, scale, zero, attrs.get("axis", 1), attrs.get("block_size", 0))
        graph.initializer.append(numpy_helper.from_array(weight.astype(np.float32), node.output[0]))
        graph.node.remove(node)
        folded += 1
    # constant Reshape of a now-constant weight: fold as well, so the graph holds plain Conv weights
    inits = {i.name: i for i in graph.initializer}
    for node in list(graph.node):
        if node.op_type == "Reshape" and all(n in inits for n in node.input):
            data = numpy_helper.to_array(inits[node.input[0]])
            shape = numpy_helper.to_array(inits[node.input[1]])
            graph.initializer.append(numpy_helper.from_array(data.reshape(shape), node.output[0]))
            graph.node.remove(node)
    drop_unused_inputs(graph)
    return folded


def make_batch_dynamic(proto: onnx.ModelProto, name: str = "batch") -> bool:
    """Rename a fixed batch dim of 1 to a symbol, if no Reshape in the graph hard-codes it."""
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Reshape" and node.input[1] in inits:
            target = numpy_helper.to_array(inits[node.input[1]])
            # a constant reshape whose input is an activation would pin the batch size
            if node.input[0] not in inits and target.size and target[0] == 1:
                return False
    for value in list(graph.input) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].ClearField("dim_value")
            dims[0].dim_param = name
    del graph.value_info[:]  # stale fixed shapes; ORT infers them again
    return True


def prepare_model(src: Path, dst: Path, contract: FaceContract, fold_dequant: bool = True) -> Path:
    """Write a repaired copy of ``src`` to ``dst`` with the contract in metadata and a sidecar."""
    proto = onnx.load(str(src))
    dropped = drop_unused_inputs(proto.graph)
    folded = fold_weight_dequantization(proto.graph) if fold_dequant else 0
    dynamic = make_batch_dynamic(proto)
    write_contract(proto, contract)
    onnx.checker.check_model(proto)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_model(proto, dst)  # atomic: a half-written model is never picked up
    write_sidecar(dst, contract)
    log.info(
        "model prepared",
        extra={"src": str(src), "dst": str(dst), "dropped_inputs": len(dropped),
               "folded_dequantize": folded, "dynamic_batch": dynamic},
    )
    return dst


def default_model(cache_dir: Path) -> Path:
    """The prepared default model (SFace), preparing it on first use; re-prepared if the source or
    the contract we write changed."""
    src = packaged_model(SFACE_FILE)
    dst = Path(cache_dir) / PREPARED_NAME / "model.onnx"
    stamp = dst.with_name("source.sha256")
    contract = hashlib.sha256(repr(sorted(SFACE_CONTRACT.to_metadata().items())).encode()).hexdigest()[:16]
    digest = f"{file_digest(src)} contract:{contract}"
    if dst.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return dst
    prepare_model(src, dst, SFACE_CONTRACT)
    replace_atomically(stamp, lambda tmp: tmp.write_text(digest + "\n"))
    return dst


def resolve_model_path(model: Path | None, cache_dir: Path) -> Path:
    """An ONNX file from a setting that may name a file, a directory, or nothing (the default)."""
    if model is None or str(model) == "":
        return default_model(cache_dir)
    model = Path(model)
    if model.is_dir():
        candidates = [model / "model.onnx"] if (model / "model.onnx").exists() else sorted(model.glob("*.onnx"))
        if len(candidates) != 1:
            raise FileNotFoundError(f"{model} must hold model.onnx or exactly one .onnx file")
        model = candidates[0]
    if not model.exists():
        raise FileNotFoundError(f"model file {model} does not exist")
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m service.model.prepare",
        description="Prepare the default SFace model (or repair any ONNX file) for the service.",
    )
    parser.add_argument("--cache-dir", type=Path, default=Path("models"), help="output root for the default model")
    parser.add_argument("--src", type=Path, help="a third-party ONNX file to repair (it must carry the face.* metadata)")
    parser.add_argument("--dst", type=Path, help="where the repaired copy goes (with --src)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if args.src:
        contract = read_contract(args.src)
        out = prepare_model(args.src, args.dst or args.src.with_suffix(".prepared.onnx"), contract)
    else:
        out = default_model(args.cache_dir)
    logging.getLogger(__name__).info("ready", extra={"model": str(out)})


if __name__ == "__main__":
    main()
