"""FaceSession: the one way to run a face model (service, fp16 parity, exporter, benchmarks, tests)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from service.config import Settings
from service.model.contract import FaceContract, write_contract
from service.model.preprocess import preprocess
from service.model.runtime import EmbeddingModel
from service.model.session import (
    CPU,
    CUDA,
    FaceSession,
    ProviderChoice,
    ProviderError,
    provider_list,
)


def _faces(n: int, size: int = 112, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_face_session_is_the_service_model_without_settings(default_model):
    faces = _faces(5)
    session = FaceSession(default_model)  # no Settings: a path is enough
    served = EmbeddingModel(default_model, Settings(providers="cpu"))
    served.initialize()
    embeddings = session.embed(faces)
    np.testing.assert_array_equal(embeddings, served.execute(faces))
    assert embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    # the raw run the throughput benchmark times is the graph on the contract's preprocessing
    raw = session.run(preprocess(faces, session.contract))
    np.testing.assert_array_equal(raw.reshape(5, -1), session.raw(faces))
    assert session.providers == [CPU]


def _fixed_batch_model(input_name: str = "faces") -> onnx.ModelProto:
    """NHWC 1 x 2 x 2 x 3 -> 1 x 12: a graph that accepts only a batch of one."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", [input_name, "shape"], ["embedding"])],
        "fixed",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [1, 2, 2, 3])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, 12])],
        initializer=[helper.make_tensor("shape", TensorProto.INT64, [2], [1, 12])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    contract = FaceContract(input_name="faces", embedding_size=12, model_name="fixed", model_version="1",
                            threshold=0.5, layout="NHWC", input_size=(2, 2), mean=(0, 0, 0), std=(1, 1, 1))
    write_contract(proto, contract)
    return proto


def test_fixed_batch_model_runs_one_face_at_a_time():
    proto = _fixed_batch_model()
    session = FaceSession(proto)  # a proto carries its own contract
    assert session.fixed_batch == 1
    faces = _faces(3, size=2, seed=1)
    with pytest.raises(Exception, match="(?i)dimension|shape"):  # the graph itself refuses 3 faces at once
        session.run(preprocess(faces, session.contract))
    expected = faces.reshape(3, 12).astype(np.float32)
    np.testing.assert_array_equal(session.raw(faces), expected)
    np.testing.assert_allclose(session.embed(faces), expected / np.linalg.norm(expected, axis=1, keepdims=True),
                               rtol=1e-6)


def test_contract_input_name_must_be_in_the_graph():
    proto = _fixed_batch_model(input_name="pixels")  # the contract says "faces"
    with pytest.raises(ValueError, match="not in graph inputs"):
        FaceSession(proto)


def test_provider_choice_never_falls_back_silently():
    cpu_only = [CPU]
    with_cuda = [CUDA, CPU]
    assert provider_list(ProviderChoice(providers="auto"), cpu_only) == [CPU]
    assert provider_list(ProviderChoice(providers="cpu"), with_cuda) == [CPU]
    with pytest.raises(ProviderError, match="only"):
        provider_list(ProviderChoice(providers="cuda"), cpu_only)
    with pytest.raises(ProviderError, match="only"):
        provider_list(ProviderChoice(providers="auto", require_gpu=True), cpu_only)
    with pytest.raises(ProviderError, match="require_gpu"):
        provider_list(ProviderChoice(providers="cpu", require_gpu=True), with_cuda)
    chosen = provider_list(ProviderChoice(providers="auto", cuda_device_id=1, gpu_mem_limit_mb=2), with_cuda)
    assert chosen == [(CUDA, {"device_id": 1, "cudnn_conv_algo_search": "HEURISTIC", "gpu_mem_limit": 2 << 20}),
                      CPU]


def test_provider_choice_from_settings_reads_the_face_provider_settings():
    settings = Settings(providers="cuda", require_gpu=True, cuda_device_id=2, cudnn_conv_algo_search="EXHAUSTIVE",
                        gpu_mem_limit_mb=64)
    assert ProviderChoice.from_settings(settings) == ProviderChoice(
        providers="cuda", require_gpu=True, cuda_device_id=2, cudnn_conv_algo_search="EXHAUSTIVE",
        gpu_mem_limit_mb=64)


@pytest.mark.parametrize("spinning", [True, False])
def test_intra_op_spinning_setting_reaches_the_served_session(default_model, spinning):
    """FACE_INTRA_OP_SPINNING=false turns onnxruntime's pool spinning off in the session the service
    runs (and nothing else: the embeddings are the same numbers)."""
    served = EmbeddingModel(default_model, Settings(providers="cpu", intra_op_threads=2, intra_op_spinning=spinning))
    served.initialize()
    assert served._session is not None
    options = served._session.session.get_session_options()
    if spinning:  # onnxruntime's default: no entry
        with pytest.raises(RuntimeError, match="allow_spinning"):
            options.get_session_config_entry("session.intra_op.allow_spinning")
    else:
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    faces = _faces(3, seed=1)
    np.testing.assert_array_equal(served.execute(faces), FaceSession(default_model).embed(faces))
