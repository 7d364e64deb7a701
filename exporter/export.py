"""Embedding branch -> ONNX with the face.* contract, checked for parity against TensorFlow.

The exported graph:
  input  ``input``: float32 [batch, 3, H, W], already normalised ((x - mean) / std per the contract);
         NCHW because that is what the service feeds every model; the transpose to Keras' NHWC sits
         inside the exported function, so the ONNX graph starts with one Transpose.
  output ``embedding``: float32 [batch, D], L2-normalised.
The dynamic batch dimension, which tf2onnx names ``unk__N``, is renamed ``batch``.

Parity is part of export: TF and onnxruntime embed the same real faces, and the export fails
(nothing is written) if the minimum cosine is below ``min_cosine`` (0.99999 by default). The
optional fp16 variant keeps float32 inputs and outputs and gets its own parity figure.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from service.model.calibration import ImpostorTail
from service.model.contract import FaceContract, write_contract

# one fp16 bar for the whole product: variants the exporter writes and variants the service makes
from service.model.fp16 import MIN_COSINE as MIN_COSINE_FP16

from .config import REPO, TrainConfig
from .images import face_files, load_faces

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

log = logging.getLogger(__name__)

DEFAULT_PARITY_FACES = REPO / "tests" / "fixtures" / "faces"
OUTPUT_NAME = "embedding"


class ExportParityError(RuntimeError):
    """The ONNX graph does not reproduce the TF model closely enough."""


def to_onnx(model: keras.Model, input_size: int, input_name: str = "input", opset: int = 17,
            graph_copies: bool = False) -> onnx.ModelProto:
    """The Keras embedding model as an ONNX graph with NCHW input and L2-normalised output.

    ``graph_copies``: convert as tf2onnx does by default, with a graph copy per optimizer (many times the
    memory; see _convert_lean), for before/after comparisons (exporter.memprobe).
    """
    import tensorflow as tf

    if opset > 18:
        raise ValueError("tf2onnx supports opsets up to 18")
    spec = (tf.TensorSpec((None, 3, input_size, input_size), tf.float32, name=input_name),)

    @tf.function(input_signature=spec)
    def embed_nchw(images: tf.Tensor) -> dict[str, tf.Tensor]:
        # the service feeds NCHW; Keras convolutions here are NHWC
        embeddings = model(tf.transpose(images, (0, 2, 3, 1)), training=False)
        return {OUTPUT_NAME: tf.math.l2_normalize(embeddings, axis=1)}

    proto = (_convert_with_copies if graph_copies else _convert_lean)(embed_nchw, spec, opset)
    rename_batch_dim(proto)
    return proto


def _convert_lean(function: Callable[..., Any], spec: tuple[tf.TensorSpec, ...], opset: int) -> onnx.ModelProto:
    """tf2onnx's conversion without its per-optimizer graph copies, falling back to them on error.

    By default tf2onnx deep-copies the whole graph (every weight as numpy) before each of its ~15
    optimizers, every iteration, so an optimizer that fails can be skipped. The discarded copies hold
    reference cycles and only go at a cyclic garbage collection, which counts objects, not bytes: dozens
    of copies of the weights pile up (ResNet-50: 12 GB resident for 160 MB of weights; MobileNetV2: 3 GB
    for 50 MB). Without the copies an optimizer error raises; then the conversion is redone the old way.
    """
    import gc

    import tf2onnx
    from tf2onnx import constants

    key = constants.ENV_TF2ONNX_CATCH_ERRORS
    saved = os.environ.get(key)
    os.environ[key] = "FALSE"
    thresholds = gc.get_threshold()
    # tf2onnx's rewriters still drop graph fragments (with their numpy weights) in reference cycles:
    # collect young objects 10x as often while converting
    gc.set_threshold(max(thresholds[0] // 10, 50), *thresholds[1:])
    try:
        proto, _ = tf2onnx.convert.from_function(function, input_signature=spec, opset=opset)
    except Exception as exc:  # noqa: BLE001 - any optimizer failure: convert again with tf2onnx's safety net
        log.warning("tf2onnx optimizer failed without graph copies (%s); converting again with them", exc)
        gc.collect()
        os.environ[key] = "TRUE"
        proto, _ = tf2onnx.convert.from_function(function, input_signature=spec, opset=opset)
    finally:
        gc.set_threshold(*thresholds)
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved
    gc.collect()
    return proto


def _convert_with_copies(function: Callable[..., Any], spec: tuple[tf.TensorSpec, ...], opset: int) -> onnx.ModelProto:
    """tf2onnx's own conversion, graph copies and all."""
    import tf2onnx

    return tf2onnx.convert.from_function(function, input_signature=spec, opset=opset)[0]


def rename_batch_dim(proto: onnx.ModelProto, name: str = "batch") -> None:
    """tf2onnx names the unknown batch dimension ``unk__N``; give it (everywhere) a readable name."""
    graph = proto.graph
    boundary = list(graph.input) + list(graph.output)
    symbols = {v.type.tensor_type.shape.dim[0].dim_param for v in boundary if v.type.tensor_type.shape.dim}
    symbols.discard("")
    for value in boundary + list(graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in symbols:
                dim.dim_param = name


def checked_unit(embeddings: np.ndarray, what: str) -> np.ndarray:
    """L2-normalised embeddings; non-finite or zero ones are an ExportParityError.

    A degenerate model must not pass parity by accident: ``nan < bar`` is False, and two models that
    both output zeros (or NaN) "agree". Zero is checked on the norm because the exported graph
    normalises with an epsilon, turning a zero embedding into zeros rather than NaN.
    """
    embeddings = np.asarray(embeddings, dtype=np.float64)
    if not np.all(np.isfinite(embeddings)):
        bad = int(np.sum(~np.all(np.isfinite(embeddings), axis=1)))
        raise ExportParityError(f"{what} produced non-finite embeddings for {bad} of {len(embeddings)} faces")
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    if np.any(norms < 1e-12):
        raise ExportParityError(f"{what} produced zero embeddings for {int(np.sum(norms < 1e-12))} "
                                f"of {len(embeddings)} faces")
    return embeddings / norms


def passes(value: float, bar: float) -> bool:
    """``value >= bar``, False for NaN (where ``value < bar`` would wave NaN through)."""
    return bool(np.isfinite(value) and value >= bar)


def tf_embeddings(model: keras.Model, faces: np.ndarray, mean: float, std: float) -> np.ndarray:
    x = (faces.astype(np.float32) - mean) / std
    return checked_unit(model(x, training=False), "the TF model")


def onnx_embeddings(proto_or_path: onnx.ModelProto | str | Path, faces: np.ndarray, contract: FaceContract,
                    precision: str = "fp32") -> np.ndarray:
    """The graph's checked unit embeddings of ``faces``, preprocessed per ``contract`` (the fp32 one for
    both variants: they take the same inputs); ``precision`` names the graph in errors."""
    from service.model.session import FaceSession

    out = FaceSession(proto_or_path, contract=contract).raw(faces)
    return checked_unit(out, f"the ONNX graph ({precision})")


def parity(reference: np.ndarray, candidate: np.ndarray) -> dict:
    cosines = np.sum(reference * candidate, axis=1)
    return {"faces": int(len(cosines)), "min_cosine": float(cosines.min()), "mean_cosine": float(cosines.mean()),
            "max_abs_diff": float(np.abs(reference - candidate).max())}


def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and activations, float32 graph inputs and outputs (the service feeds float32).

    The service's converter, so an exported variant and one the service makes are the same graph:
    BatchNorm folded in fp32 first, the embedding's normalisation tail kept in fp32 (its sum of
    squares overflows fp16)."""
    from service.model.fp16 import convert_to_fp16

    return convert_to_fp16(proto)[0]


@dataclass(frozen=True)
class ExportOptions:
    """How to export a model: everything but its source and the output file. ``python -m exporter export``
    builds it from its flags of the same names. The threshold comes from the first set of ``threshold``,
    ``threshold_from`` (an evaluation JSON) and ``calibrate_pairs`` (a pairs.txt, evaluated now)."""

    config: str | Path | None = None  # YAML config for an arcface-tf2 checkpoint
    overrides: list[str] = field(default_factory=list)  # KEY=VALUE config overrides
    threshold: float | None = None
    threshold_from: str | Path | None = None
    calibrate_pairs: str | Path | None = None
    identify_threshold: float | None = None  # optional 1:N threshold written into the contract
    parity_faces: str | Path | None = None  # default: DEFAULT_PARITY_FACES
    parity_count: int = 32
    min_cosine: float = 0.99999  # fp32 parity bar, TF vs onnxruntime
    fp16: bool = False  # also write an fp16 variant
    fp16_min_cosine: float = MIN_COSINE_FP16
    opset: int = 17
    input_name: str = "input"
    model_name: str | None = None  # default: the config's
    model_version: str | None = None  # default: the config's
    tf2onnx_graph_copies: bool = False  # see to_onnx(graph_copies=)


@dataclass(frozen=True)
class ThresholdChoice:
    """The verify threshold to write and where it came from."""

    value: float
    source: str  # face.threshold_source: "manual", "file:<json>" or "10-fold:<pairs folder>"
    impostor_tail: ImpostorTail | None = None  # from the evaluation, when there was one that has it
    calibration: dict | None = None  # the evaluation's accuracy_mean, accuracy_std and best_threshold


def resolve_threshold(options: ExportOptions, model: keras.Model, cfg: TrainConfig) -> ThresholdChoice:
    """The threshold per ``options`` (see ExportOptions); calibrating evaluates the in-memory TF model."""
    if options.threshold is not None:
        return ThresholdChoice(float(options.threshold), "manual")
    if options.threshold_from:
        report = json.loads(Path(options.threshold_from).read_text())
        # the report's impostor tail (if it has one) goes into the contract too
        tail = report.get("impostor_tail")
        return ThresholdChoice(float(report["best_threshold"]), f"file:{Path(options.threshold_from).name}",
                               ImpostorTail.from_dict(tail) if tail else None, _calibration_summary(report))
    if options.calibrate_pairs:
        from .evaluate import TFEmbedder, evaluate_model

        evaluation = evaluate_model(TFEmbedder(cfg, model), options.calibrate_pairs)
        return ThresholdChoice(float(evaluation.best_threshold), evaluation.threshold_source,
                               evaluation.impostor_tail, _calibration_summary(evaluation.to_dict()))
    raise ValueError("no threshold: pass --threshold, --threshold-from EVAL.json or --calibrate-pairs pairs.txt")


def _calibration_summary(report: dict) -> dict:
    return {k: report.get(k) for k in ("accuracy_mean", "accuracy_std", "best_threshold")}


def export_model(source: str | Path, output: str | Path, options: ExportOptions | None = None,
                 stage_hook: Callable[[str], None] | None = None) -> dict:
    """Export, write the contract, check parity; returns a summary. Raises ExportParityError on failure.

    The fp16 variant is gated separately (``options.fp16_min_cosine``, by default the bar the service
    applies to variants it makes): a failing fp16 variant is not written and raises, the fp32 model
    that already passed its own parity check stays. ``stage_hook(name)`` is called after each stage
    (exporter.memprobe measures memory there).
    """
    from .checkpoints import load_embedding_model

    options = options or ExportOptions()

    def stage(name: str) -> None:
        if stage_hook is not None:
            stage_hook(name)

    cfg, model = load_embedding_model(source, options.config, options.overrides)
    stage("load model")
    threshold = resolve_threshold(options, model, cfg)

    proto = to_onnx(model, cfg.input_size, options.input_name, options.opset, options.tf2onnx_graph_copies)
    stage("tf2onnx conversion")
    contract = FaceContract(
        input_name=proto.graph.input[0].name,
        embedding_size=cfg.embedding_size,
        model_name=options.model_name or cfg.export_model_name(),
        model_version=options.model_version or cfg.model_version,
        threshold=round(threshold.value, 4),
        identify_threshold=options.identify_threshold,
        impostor_tail=threshold.impostor_tail,
        layout="NCHW",
        color="RGB",
        input_size=(cfg.input_size, cfg.input_size),
        mean=(cfg.mean,) * 3,
        std=(cfg.std,) * 3,
        extra={"face.threshold_source": threshold.source, "face.backbone": cfg.backbone,
               "face.precision": "fp32"},
    )
    faces = load_faces(face_files(options.parity_faces or DEFAULT_PARITY_FACES, options.parity_count), cfg.input_size)
    reference = tf_embeddings(model, faces, cfg.mean, cfg.std)

    stage("TF reference embeddings")
    fp32 = parity(reference, onnx_embeddings(proto, faces, contract))
    stage("fp32 parity (onnxruntime)")
    log.info("parity fp32 on %d faces: min cosine %.7f", fp32["faces"], fp32["min_cosine"])
    if not passes(fp32["min_cosine"], options.min_cosine):
        raise ExportParityError(f"ONNX min cosine {fp32['min_cosine']:.7f} < {options.min_cosine} "
                                f"on {fp32['faces']} faces")
    contract = dataclasses.replace(contract, extra={**contract.extra, "face.parity_min_cosine": f"{fp32['min_cosine']:.7f}"})
    write_contract(proto, contract)
    onnx.checker.check_model(proto)

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    _save(proto, output)
    stage("check and save")
    result = {"onnx": str(output), "contract": contract.to_metadata(), "parity_fp32": fp32,
              "opset": options.opset, "bytes": output.stat().st_size}
    if threshold.calibration is not None:
        result["calibration"] = threshold.calibration

    if options.fp16:
        from service.model.contract import file_digest, fp16_variant_contract
        from service.model.fp16 import Fp16ParityError, check_parity

        half = to_fp16(proto)
        stage("fp16 conversion")
        try:
            # same inputs as the fp32 graph: the fp32 contract's preprocessing
            fp16_parity = parity(reference, onnx_embeddings(half, faces, contract, "fp16"))
            # the CPU provider runs most fp16 nodes through casts in fp32; the emulated check rounds every
            # activation to fp16 as a GPU would, so an overflow shows up here too
            emulated = check_parity(proto, half, faces, contract, ["CPUExecutionProvider"]).emulated_min_cosine
        except (ExportParityError, Fp16ParityError) as exc:  # NaN/inf/zero embeddings from the fp16 graph
            raise ExportParityError(f"fp16 variant refused: {exc}; the fp32 model {output} is written, "
                                    "no fp16 variant") from exc
        stage("fp16 parity")
        fp16_parity["emulated_min_cosine"] = emulated
        log.info("parity fp16 on %d faces: min cosine %.7f vs TF, %.7f with fp16 rounding emulated",
                 fp16_parity["faces"], fp16_parity["min_cosine"], emulated)
        if not (passes(fp16_parity["min_cosine"], options.fp16_min_cosine) and passes(emulated, options.fp16_min_cosine)):
            raise ExportParityError(f"fp16 min cosine {fp16_parity['min_cosine']:.6f} (emulated {emulated:.6f}) "
                                    f"< {options.fp16_min_cosine}; the fp32 model {output} is written, no fp16 variant")
        # the shared function: the same fp16 keys as a variant the service's tool makes, from the file just written
        half_contract = fp16_variant_contract(contract, min(fp16_parity["min_cosine"], emulated), fp16_parity["faces"],
                                              file_digest(output))
        half_contract = dataclasses.replace(  # this variant's own parity against TF, as the fp32 model has
            half_contract, extra={**half_contract.extra, "face.parity_min_cosine": f"{fp16_parity['min_cosine']:.7f}"})
        write_contract(half, half_contract)
        half_path = output.with_suffix(".fp16.onnx")
        _save(half, half_path)
        result.update({"onnx_fp16": str(half_path), "parity_fp16": fp16_parity, "bytes_fp16": half_path.stat().st_size})
    return result


def _save(proto: onnx.ModelProto, path: Path) -> None:
    # write then rename: a crashed export never leaves a half-written model where the service looks
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(proto, str(tmp))
    tmp.replace(path)
