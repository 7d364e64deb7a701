"""Small face models for tests and benchmarks, built in seconds without TensorFlow.

``tiny_model(path)`` writes a real ONNX file carrying a face contract (``face.*`` metadata): the
aligned 112x112 crop, normalised as the contract says, average-pooled to 14x14 and projected by a
fixed random matrix to ``dim`` values. Not a face recogniser worth the name, but a different model
with another model id and dimension that the service loads, batches and serves like any other: what
tests of several served models (and of moving a gallery from one model to another) need.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

POOL = 8  # 112 / 8 = 14: the crop is seen as a 14x14 thumbnail


def tiny_model(path: Path, dim: int = 64, name: str = "tiny", version: str = "1", seed: int = 0,
               threshold: float = 0.5, size: int = 112) -> Path:
    """Write the tiny model to ``path`` (an .onnx file) and return it; same arguments, same bytes.
    ``size``: its input crop's side (a multiple of 8; 112, the service's crops, by default)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from service.model.contract import FaceContract, write_contract

    side = size // POOL
    weights = np.random.default_rng(seed).standard_normal((3 * side * side, dim)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("AveragePool", ["faces"], ["pooled"], kernel_shape=[POOL, POOL], strides=[POOL, POOL]),
         helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "weights"], ["embedding"])],
        name,
        [helper.make_tensor_value_info("faces", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", dim])],
        initializer=[numpy_helper.from_array(weights, "weights")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    contract = FaceContract(input_name="faces", embedding_size=dim, model_name=name, model_version=version,
                            threshold=threshold, layout="NCHW", input_size=(size, size))
    write_contract(proto, contract)
    onnx.checker.check_model(proto)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return path
