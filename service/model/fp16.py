"""Build tooling: an fp16 variant of an ONNX face model, float32 inputs and outputs kept, checked on real faces.

The service does not need this module to serve a variant made beforehand (the image makes the default
model's at build time): ``service.model.serving`` finds it in the model cache and imports this tool
only when the variant is missing or stale.

``make_fp16_variant(src, dst)``:

1. folds BatchNormalization into the preceding Conv *in float32* (onnxruntime's provider-independent
   "basic" optimisations, saved as plain ONNX), so the fused weights are rounded to fp16 once instead
   of being fused later from already-rounded fp16 weights;
2. converts weights and activations to fp16 with ``onnxconverter_common.float16`` and
   ``keep_io_types=True`` (the service keeps feeding float32 and reading float32), except:

   * the *tail*: every node after the last Conv/Gemm/MatMul (the embedding's own normalisation,
     a trailing BatchNormalization, an L2-normalisation). tf2onnx writes ``l2_normalize`` as
     ``Mul(x, x) -> ReduceSum``; in fp16 that sum overflows (max 65504) as soon as the embedding's
     norm passes 256 and the output becomes 0 or NaN. The tail is O(batch x D), so fp32 costs nothing;
   * op types whose fp16 accumulation overflows or loses too much wherever they sit (reductions,
     norms, exp/log, softmax), besides the converter's own block list;
   * weights are clamped to fp16's real range (65504), not the converter's default of 1e4, which
     would silently change large BatchNorm variances;

3. checks parity on real aligned faces, twice, and refuses the variant (nothing written) unless
   every cosine to the fp32 embeddings is >= ``min_cosine`` (0.999) in both:

   * *runtime*: the fp16 graph itself on the execution provider it will be served on (CUDA when
     onnxruntime has it, else CPU);
   * *emulated*: an fp32 copy of the fp16 graph with its (fp16-rounded) weights and every fp16
     activation rounded to fp16 by a Cast pair, run on the CPU provider.

   The second exists because onnxruntime's CPU provider lacks most fp16 kernels: it wraps the
   unsupported nodes in Casts and drops the Casts between neighbours, so activations stay fp32 and a
   CPU run of the fp16 graph only tests the weight rounding. The emulation rounds like a GPU does
   between kernels, so an overflow (inf/NaN) or precision loss shows up on a CPU-only machine too;
4. writes the variant with the source's ``face.*`` contract, ``model_version`` suffixed ``-fp16``
   (the gallery stores the model id, so fp16 and fp32 embeddings are never mixed silently), plus
   ``face.precision``, the parity figure and the source digest (to skip re-making an up-to-date variant):
   ``contract.fp16_variant_contract``, which the exporter's fp16 variant uses too.

The onnxconverter-common quirks this works around: it edits the model it is given in place (we
hand it a copy), and with a blocked node next to a graph output it types that output float16 despite
``keep_io_types`` (``_restore_io_types`` puts float32 back). fp16 is meant for the GPU; on the CPU
provider the variant runs correctly, and its speed there depends on the CPU's fp16 support.

``python -m service.model.fp16 SRC DST [--faces DIR]`` runs it from the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .contract import (
    FP16_MIN_COSINE_KEY,
    FP16_PARITY_FACES_KEY,
    ContractError,
    FaceContract,
    cached_variant,
    file_digest,
    fp16_variant_contract,
    read_contract,
    save_model,
    sidecar_path,
    write_contract,
    write_sidecar,
)
from .preprocess import l2_normalise
from .session import FaceSession, SessionOptions

log = logging.getLogger(__name__)

MIN_COSINE = 0.999
FP16_MAX = 65504.0
# aligned crops shipped as package data (see its ATTRIBUTION.md): an installed wheel has them too;
# used when no --faces directory is given
PARITY_FACES = Path(__file__).resolve().parent / "parity_faces"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
MIN_PARITY_FACES = 4

# Ops that carry the compute: everything after the last of them is the cheap tail kept in fp32.
HEAVY_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Einsum"}
# Wherever these sit, fp16 loses: sums of squares and exponentials overflow 65504, running means
# and variances of many elements lose digits. They stay fp32 behind Casts.
FP32_OPS = {
    "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
    "ReduceMean", "ReduceProd", "LpNormalization", "InstanceNormalization", "LayerNormalization",
    "GroupNormalization", "MeanVarianceNormalization", "Softmax", "LogSoftmax", "Exp", "Log", "Pow",
}


class Fp16Error(RuntimeError):
    """The fp16 variant cannot be made from this model."""


class Fp16ParityError(Fp16Error):
    """The fp16 variant's embeddings are not close enough to the fp32 ones."""


@dataclass(frozen=True)
class ParityReport:
    faces: int
    min_cosine: float  # the lower of the two checks: what the gate uses
    mean_cosine: float
    max_abs_diff: float  # largest difference of one L2-normalised embedding component
    runtime_min_cosine: float  # the fp16 graph on `providers`
    emulated_min_cosine: float  # fp16 rounding emulated on the CPU provider
    providers: list[str]

    def passed(self, min_cosine: float) -> bool:
        return self.min_cosine >= min_cosine


@dataclass(frozen=True)
class Fp16Result:
    path: Path
    contract: FaceContract
    parity: ParityReport
    fp32_nodes: list[str]  # nodes kept in fp32 inside the fp16 graph
    reused: bool = False  # an up-to-date variant was already there


# --- conversion ------------------------------------------------------------------------------
def is_fp16(proto: onnx.ModelProto) -> bool:
    return any(init.data_type == onnx.TensorProto.FLOAT16 for init in proto.graph.initializer)


def fold_in_fp32(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Apply onnxruntime's provider-independent optimisations (Conv+BN fusion, constant folding) in fp32.

    Falls back to the unoptimised graph if the result is anything but standard ONNX ops.
    """
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "basic.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(out)
        ort.InferenceSession(proto.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])
        optimised = onnx.load(str(out))
    foreign = {n.domain for n in optimised.graph.node if n.domain not in ("", "ai.onnx")}
    if foreign:
        log.warning("fp32 pre-optimisation produced non-standard ops; converting the graph as it was",
                    extra={"domains": sorted(foreign)})
        return proto
    # ORT declares every opset it knows; keep the ones the graph uses so other runtimes accept it
    used = {n.domain for n in optimised.graph.node} | {""}
    kept = [o for o in optimised.opset_import if o.domain in used or o.domain == "ai.onnx"]
    del optimised.opset_import[:]
    optimised.opset_import.extend(kept)
    return optimised


def tail_nodes(graph: onnx.GraphProto) -> list[str]:
    """Names of the nodes that feed no heavy op, directly or indirectly: the graph's cheap tail."""
    producer = {out: node for node in graph.node for out in node.output}
    feeds_heavy: set[int] = set()
    stack = [node for node in graph.node if node.op_type in HEAVY_OPS]
    while stack:
        node = stack.pop()
        if id(node) in feeds_heavy:
            continue
        feeds_heavy.add(id(node))
        stack.extend(producer[name] for name in node.input if name in producer)
    if not any(node.op_type in HEAVY_OPS for node in graph.node):
        return []  # no compute to speak of: nothing to call a tail
    return [node.name for node in graph.node if id(node) not in feeds_heavy]


def _name_nodes(graph: onnx.GraphProto) -> None:
    """The converter blocks nodes by name, and exported graphs may leave names empty."""
    taken = {node.name for node in graph.node if node.name}
    for index, node in enumerate(graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def convert_to_fp16(proto: onnx.ModelProto, fold_first: bool = True) -> tuple[onnx.ModelProto, list[str]]:
    """(fp16 graph with float32 inputs/outputs, names of the nodes kept in fp32)."""
    from onnxconverter_common import float16

    if is_fp16(proto):
        raise Fp16Error("the model already holds fp16 weights")
    original = proto
    proto = fold_in_fp32(proto) if fold_first else copy_model(proto)  # the converter edits in place
    _name_nodes(proto.graph)
    keep_fp32 = sorted(set(tail_nodes(proto.graph)) | {n.name for n in proto.graph.node if n.op_type in FP32_OPS})
    with warnings.catch_warnings():
        # one warning per weight below fp16's smallest value: expected, and there are hundreds
        warnings.filterwarnings("ignore", message="the float32 number", category=UserWarning)
        converted = float16.convert_float_to_float16(
            proto,
            keep_io_types=True,
            max_finite_val=FP16_MAX,
            op_block_list=sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | FP32_OPS),
            node_block_list=keep_fp32,
        )
    _restore_io_types(converted, original)
    onnx.checker.check_model(converted)
    return converted, keep_fp32


def copy_model(proto: onnx.ModelProto) -> onnx.ModelProto:
    duplicate = onnx.ModelProto()
    duplicate.CopyFrom(proto)
    return duplicate


def _elem_types(values: Iterable[onnx.ValueInfoProto]) -> dict[str, int]:
    return {v.name: v.type.tensor_type.elem_type for v in values}


def _restore_io_types(converted: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """Give every graph input and output its original element type back (float32 in, float32 out)."""
    graph = converted.graph
    wanted_inputs = _elem_types(original.graph.input)
    for value in graph.input:
        if value.name in wanted_inputs and value.type.tensor_type.elem_type != wanted_inputs[value.name]:
            raise Fp16Error(f"the converter changed the type of graph input {value.name!r}")
    wanted = _elem_types(original.graph.output)
    for value in graph.output:
        elem_type = wanted.get(value.name)
        if elem_type is None or value.type.tensor_type.elem_type == elem_type:
            continue
        producer = next(node for node in graph.node if value.name in node.output)
        if producer.op_type == "Cast":  # retarget the converter's Cast instead of stacking another
            for attribute in producer.attribute:
                if attribute.name == "to":
                    attribute.i = elem_type
        else:
            inner = value.name + "_fp16"
            producer.output[list(producer.output).index(value.name)] = inner
            graph.node.append(onnx.helper.make_node("Cast", [inner], [value.name], to=elem_type,
                                                    name=value.name + "_restore_type"))
        value.type.tensor_type.elem_type = elem_type
    for value in list(graph.value_info):  # stale types of the boundary values would contradict them
        if value.name in wanted:
            graph.value_info.remove(value)


def emulate_fp16(fp16: onnx.ModelProto) -> onnx.ModelProto:
    """An fp32 graph that computes what ``fp16`` computes, rounding every fp16 value as fp16 would.

    Weights become float32 holding their fp16-rounded values; each node that yields an fp16 tensor
    runs in fp32 and its output goes through Cast(float16) -> Cast(float) (inf beyond 65504, fp16
    precision below). Nodes already kept in fp32 by the conversion are unchanged.
    """
    from onnx import TensorProto, numpy_helper

    typed = copy_model(fp16)
    del typed.graph.value_info[:]
    typed = onnx.shape_inference.infer_shapes(typed)
    graph = typed.graph
    types = {**_elem_types(graph.value_info), **_elem_types(graph.input), **_elem_types(graph.output)}
    types.update({init.name: init.data_type for init in graph.initializer})
    del graph.value_info[:]  # the inferred fp16 types were only needed to find the fp16 values

    def as_float(tensor: onnx.TensorProto) -> onnx.TensorProto:
        return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name)

    for index, init in enumerate(graph.initializer):
        if init.data_type == TensorProto.FLOAT16:
            graph.initializer[index].CopyFrom(as_float(init))
    nodes = []
    for original in graph.node:
        node = onnx.NodeProto()
        node.CopyFrom(original)
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == TensorProto.FLOAT16:
                attribute.t.CopyFrom(as_float(attribute.t))
            if node.op_type == "Cast" and attribute.name == "to" and attribute.i == TensorProto.FLOAT16:
                attribute.i = TensorProto.FLOAT  # the rounding Cast pair below stands in for it
        rounding = []
        for position, name in enumerate(node.output):
            if name and types.get(name) == TensorProto.FLOAT16:
                exact, half = name + "__fp32", name + "__fp16"
                node.output[position] = exact
                rounding += [onnx.helper.make_node("Cast", [exact], [half], to=TensorProto.FLOAT16),
                             onnx.helper.make_node("Cast", [half], [name], to=TensorProto.FLOAT)]
        nodes += [node, *rounding]
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(typed)
    return typed


# --- parity ----------------------------------------------------------------------------------
def load_faces(directory: Path, size: tuple[int, int], limit: int = 64) -> np.ndarray:
    """Up to ``limit`` aligned face crops (N x H x W x 3 uint8 RGB) from a directory of images."""
    from PIL import Image

    files = sorted(p for p in Path(directory).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    faces = []
    for path in files:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
        if array.shape[:2] != tuple(size):
            raise Fp16Error(f"{path.name} is {array.shape[1]}x{array.shape[0]}; parity needs aligned "
                            f"{size[1]}x{size[0]} crops")
        faces.append(array)
    if len(faces) < MIN_PARITY_FACES:
        raise Fp16Error(f"{directory} holds {len(faces)} face images; parity needs at least {MIN_PARITY_FACES}")
    return np.stack(faces)


def default_providers() -> list[str]:
    """CUDA when onnxruntime has it (that is where fp16 is served), else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def embed(proto: onnx.ModelProto, faces: np.ndarray, contract: FaceContract, providers: list[str],
          optimise: bool = True, label: str = "the model") -> tuple[np.ndarray, list[str]]:
    """(L2-normalised float64 embeddings, providers the session really used)."""
    session = FaceSession(proto, providers=providers, options=SessionOptions(optimise=optimise), contract=contract)
    raw = session.raw(faces).astype(np.float64)
    if not np.isfinite(raw).all():
        raise Fp16ParityError(f"{label} produced non-finite embeddings (fp16 overflow?)")
    return l2_normalise(raw).astype(np.float64), session.providers


def check_parity(fp32: onnx.ModelProto, fp16: onnx.ModelProto, faces: np.ndarray, contract: FaceContract,
                 providers: list[str] | None = None) -> ParityReport:
    """fp16 against fp32 on the serving provider, and with fp16 rounding emulated on the CPU."""
    providers = providers or default_providers()
    reference, used = embed(fp32, faces, contract, providers)
    runtime, _ = embed(fp16, faces, contract, providers, label="the fp16 graph")
    cpu_reference = reference if used == ["CPUExecutionProvider"] else \
        embed(fp32, faces, contract, ["CPUExecutionProvider"])[0]
    # no graph optimisation: ORT would fuse or drop the rounding Cast pairs the emulation relies on
    emulated, _ = embed(emulate_fp16(fp16), faces, contract, ["CPUExecutionProvider"], optimise=False,
                        label="the fp16 graph with fp16 rounding emulated")
    runtime_cos = np.sum(reference * runtime, axis=1)
    emulated_cos = np.sum(cpu_reference * emulated, axis=1)
    worst = runtime_cos if runtime_cos.min() <= emulated_cos.min() else emulated_cos
    return ParityReport(
        faces=len(faces), min_cosine=float(worst.min()), mean_cosine=float(worst.mean()),
        max_abs_diff=float(max(np.abs(reference - runtime).max(), np.abs(cpu_reference - emulated).max())),
        runtime_min_cosine=float(runtime_cos.min()), emulated_min_cosine=float(emulated_cos.min()), providers=used,
    )


# --- the variant on disk ---------------------------------------------------------------------
def fp16_contract(contract: FaceContract, parity: ParityReport, source_digest: str) -> FaceContract:
    try:
        return fp16_variant_contract(contract, parity.min_cosine, parity.faces, source_digest)
    except ContractError as exc:
        raise Fp16Error(str(exc)) from exc


def make_fp16_variant(src: Path, dst: Path, faces_dir: Path | None = None, min_cosine: float = MIN_COSINE,
                      providers: list[str] | None = None, max_faces: int = 64, fold_first: bool = True,
                      reuse: bool = False) -> Fp16Result:
    """Convert ``src`` to fp16 at ``dst`` after a parity check; raises ``Fp16ParityError`` (nothing written).

    ``reuse``: keep an existing ``dst`` made from the same source file (parity is not re-run).
    """
    src, dst = Path(src), Path(dst)
    contract = read_contract(src)
    digest = file_digest(src)
    if reuse and (existing := cached_variant(dst, digest)) is not None:
        recorded = float(existing.extra[FP16_MIN_COSINE_KEY])
        report = ParityReport(faces=int(existing.extra.get(FP16_PARITY_FACES_KEY, 0)), min_cosine=recorded,
                              mean_cosine=float("nan"), max_abs_diff=float("nan"), runtime_min_cosine=recorded,
                              emulated_min_cosine=recorded, providers=[])
        return Fp16Result(dst, existing, report, fp32_nodes=[], reused=True)

    faces_dir = Path(faces_dir) if faces_dir else PARITY_FACES
    if not faces_dir.is_dir():
        raise Fp16Error(f"no face directory for the parity check: {faces_dir} (pass --faces DIR)")
    faces = load_faces(faces_dir, contract.input_size, max_faces)

    fp32 = onnx.load(str(src))
    fp16, fp32_nodes = convert_to_fp16(fp32, fold_first=fold_first)
    parity = check_parity(fp32, fp16, faces, contract, providers)
    log.info("fp16 parity", extra={"src": str(src), "faces_dir": str(faces_dir), **dataclasses.asdict(parity),
                                   "min_required": min_cosine, "fp32_nodes": fp32_nodes})
    if not parity.passed(min_cosine):
        raise Fp16ParityError(
            f"fp16 variant of {contract.model_id}: minimum cosine over {parity.faces} faces is below "
            f"{min_cosine} (runtime {parity.runtime_min_cosine:.6f} on {','.join(parity.providers)}, "
            f"fp16 rounding emulated {parity.emulated_min_cosine:.6f}); nothing written"
        )

    variant = fp16_contract(contract, parity, digest)
    write_contract(fp16, variant)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_model(fp16, dst)  # atomic: a half-written model is never picked up
    if sidecar_path(src).exists():  # third-party models carry their contract in a sidecar as well
        write_sidecar(dst, variant)
    log.info("fp16 variant written", extra={"dst": str(dst), "model_id": variant.model_id,
                                            "bytes": dst.stat().st_size, "src_bytes": src.stat().st_size})
    return Fp16Result(dst, variant, parity, fp32_nodes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.model.fp16",
        description="Make an fp16 variant of an ONNX face model (float32 inputs/outputs kept), refused "
        f"unless its embeddings of real faces have cosine >= {MIN_COSINE} to the fp32 ones.",
    )
    parser.add_argument("src", type=Path, help="fp32 ONNX model with a face.* contract (metadata or sidecar)")
    parser.add_argument("dst", type=Path, help="where the fp16 variant goes")
    parser.add_argument("--faces", type=Path, help="directory of aligned face crops (default: the package's parity_faces)")
    parser.add_argument("--max-faces", type=int, default=64, help="faces used for the parity check")
    parser.add_argument("--min-cosine", type=float, default=MIN_COSINE)
    parser.add_argument("--providers", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where the parity check runs (auto: CUDA when available)")
    parser.add_argument("--no-fold", action="store_true", help="skip the fp32 Conv+BatchNorm folding")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    providers = {"auto": None, "cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider"]}[args.providers]
    try:
        result = make_fp16_variant(args.src, args.dst, args.faces, args.min_cosine, providers,
                                   args.max_faces, fold_first=not args.no_fold)
    except Fp16Error as exc:
        log.error("%s", exc)
        return 1
    parity = result.parity
    log.info("%s -> %s: min cosine %.6f on %s, %.6f with fp16 rounding emulated (mean %.6f, %d faces); "
             "kept in fp32: %s", args.src, result.path, parity.runtime_min_cosine, ",".join(parity.providers),
             parity.emulated_min_cosine, parity.mean_cosine, parity.faces, ", ".join(result.fp32_nodes) or "none")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
