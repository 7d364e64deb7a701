"""One face-model session: an ONNX file (or proto) run by onnxruntime behind its face.* contract.

Everything that runs a face model goes through :class:`FaceSession`: the service's
:class:`~service.model.runtime.EmbeddingModel`, the fp16 parity check, the exporter's parity,
evaluation and distillation teacher, the benchmarks and the test helpers. It needs no Settings:
the provider choice is a :class:`ProviderChoice` (the service builds one from its settings with
:meth:`ProviderChoice.from_settings`) turned into an onnxruntime provider list by
:func:`choose_providers`, never a silent fallback.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .contract import FaceContract, read_contract
from .preprocess import l2_normalise, preprocess

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class ProviderError(RuntimeError):
    """The execution provider asked for is not available or not in use."""


@dataclass(frozen=True)
class ProviderChoice:
    """Which execution provider a session runs on (the FACE_PROVIDERS family of settings)."""

    providers: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when onnxruntime has it, else CPU
    require_gpu: bool = False
    cuda_device_id: int = 0
    cudnn_conv_algo_search: str = "HEURISTIC"
    gpu_mem_limit_mb: int = 0  # 0 = no limit

    @classmethod
    def from_settings(cls, settings: Any) -> ProviderChoice:
        return cls(providers=settings.providers, require_gpu=settings.require_gpu,
                   cuda_device_id=settings.cuda_device_id, cudnn_conv_algo_search=settings.cudnn_conv_algo_search,
                   gpu_mem_limit_mb=settings.gpu_mem_limit_mb)

    @property
    def demands_cuda(self) -> bool:
        return self.require_gpu or self.providers == "cuda"


def provider_list(choice: ProviderChoice, available: list[str]) -> list:
    """The onnxruntime provider list for ``choice`` given the ``available`` providers."""
    want_cuda = choice.providers == "cuda" or choice.require_gpu or (
        choice.providers == "auto" and CUDA in available
    )
    if choice.providers == "cpu":
        if choice.require_gpu:
            raise ProviderError("require_gpu is set but providers=cpu")
        return [CPU]
    if want_cuda and CUDA not in available:
        raise ProviderError(
            f"CUDA execution provider requested but onnxruntime offers only {available}; "
            "install the gpu extra (onnxruntime-gpu) or set FACE_PROVIDERS=cpu"
        )
    if not want_cuda:
        return [CPU]
    cuda_options: dict[str, Any] = {
        "device_id": choice.cuda_device_id,
        "cudnn_conv_algo_search": choice.cudnn_conv_algo_search,
    }
    if choice.gpu_mem_limit_mb:
        cuda_options["gpu_mem_limit"] = choice.gpu_mem_limit_mb * 1024 * 1024
    return [(CUDA, cuda_options), CPU]


def available_providers() -> list[str]:
    """onnxruntime's providers, after loading pip-installed CUDA/cuDNN libraries where it can."""
    import onnxruntime as ort

    if CUDA in ort.get_available_providers() and hasattr(ort, "preload_dlls"):
        try:  # onnxruntime-gpu >= 1.21 finds the pip-installed CUDA/cuDNN libraries this way
            ort.preload_dlls()
        except Exception:  # noqa: BLE001 - the session creation reports what is missing
            log.warning("onnxruntime.preload_dlls failed", exc_info=True)
    return list(ort.get_available_providers())


def choose_providers(choice: ProviderChoice) -> list:
    """The provider list for ``choice`` on this machine (the service and the benchmarks call this)."""
    return provider_list(choice, available_providers())


@dataclass(frozen=True)
class SessionOptions:
    intra_op_threads: int = 0  # 0 = onnxruntime's default
    # False: the intra-op pool's threads sleep as soon as a run ends instead of spinning for more work
    # (onnxruntime's session.intra_op.allow_spinning; spinning keeps a core busy after every run)
    spinning: bool = True
    optimise: bool = True  # False: no graph optimisation (fp16 emulation needs its Cast pairs kept)
    log_severity_level: int | None = None  # None = onnxruntime's default


def _contract_of(model: Any) -> FaceContract:
    import onnx

    if isinstance(model, onnx.ModelProto):
        return FaceContract.from_metadata({p.key: p.value for p in model.metadata_props})
    return read_contract(Path(model))


class FaceSession:
    """An onnxruntime session over a face model, fed by the contract's preprocessing.

    ``model``: a path or an ``onnx.ModelProto``; ``providers``: an onnxruntime provider list (see
    :func:`choose_providers`; default CPU); ``contract``: defaults to the model's own. A model with a
    fixed batch dimension is run one face at a time for any other batch size.
    """

    def __init__(self, model: Any, providers: list | None = None, options: SessionOptions | None = None,
                 contract: FaceContract | None = None) -> None:
        import onnx
        import onnxruntime as ort

        options = options or SessionOptions()
        self.contract = contract or _contract_of(model)
        self.input_name = self.contract.input_name
        ort_options = ort.SessionOptions()
        ort_options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if options.optimise
                                                else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        if options.intra_op_threads:
            ort_options.intra_op_num_threads = options.intra_op_threads
        if not options.spinning:
            ort_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if options.log_severity_level is not None:
            ort_options.log_severity_level = options.log_severity_level
        data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
        self.session = ort.InferenceSession(data, sess_options=ort_options, providers=providers or [CPU])
        self.providers: list[str] = self.session.get_providers()
        inputs = {i.name: i for i in self.session.get_inputs()}
        if self.input_name not in inputs:
            raise ValueError(f"model input {self.input_name!r} (from face.input_name) not in graph inputs {list(inputs)}")
        dim0 = inputs[self.input_name].shape[0]
        self.fixed_batch: int | None = dim0 if isinstance(dim0, int) and dim0 > 0 else None
        out_dim = self.session.get_outputs()[0].shape[-1]
        if isinstance(out_dim, int) and out_dim != self.contract.embedding_size:
            raise ValueError(f"graph output width {out_dim} != face.embedding_size {self.contract.embedding_size}")

    def preprocess(self, faces: np.ndarray) -> np.ndarray:
        """N x H x W x 3 uint8 RGB -> the model's input tensor."""
        return preprocess(faces, self.contract)

    def run(self, tensor: np.ndarray) -> np.ndarray:
        """One onnxruntime run on a preprocessed tensor (what raw benchmarks time); the first output."""
        return self.session.run(None, {self.input_name: tensor})[0]

    def raw(self, faces: np.ndarray) -> np.ndarray:
        """N x H x W x 3 uint8 RGB -> N x D embeddings as the graph outputs them (not normalised)."""
        return self.raw_prepared(self.preprocess(faces))

    def raw_prepared(self, tensor: np.ndarray) -> np.ndarray:
        """``raw`` of a tensor already preprocessed (``preprocess``)."""
        if self.fixed_batch is not None and tensor.shape[0] != self.fixed_batch:
            out = np.concatenate([self.run(tensor[i : i + 1]) for i in range(tensor.shape[0])], axis=0)
        else:
            out = self.run(tensor)
        return out.reshape(out.shape[0], -1)

    def embed(self, faces: np.ndarray) -> np.ndarray:
        """N x H x W x 3 uint8 RGB -> N x D L2-normalised float32 embeddings."""
        return l2_normalise(self.raw(faces))
