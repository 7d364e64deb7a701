"""The ONNX Runtime session: provider choice (never a silent fallback), inference, warm-up.

Lifecycle after Triton's python backend: ``initialize`` (load, choose providers), ``warmup`` (each
batch size once; the app calls it when FACE_WARMUP is on), ``execute`` (one batch in, L2-normalised
float32 embeddings out), ``finalize``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Settings
from .contract import FaceContract, read_contract
from .preprocess import l2_normalise, preprocess

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class ProviderError(RuntimeError):
    """The execution provider the settings demand is not available or not in use."""


def _provider_list(settings: Settings, available: list[str]) -> list:
    want_cuda = settings.providers == "cuda" or settings.require_gpu or (
        settings.providers == "auto" and CUDA in available
    )
    if settings.providers == "cpu":
        if settings.require_gpu:
            raise ProviderError("require_gpu is set but providers=cpu")
        return [CPU]
    if want_cuda and CUDA not in available:
        raise ProviderError(
            f"CUDA execution provider requested but onnxruntime offers only {available}; "
            "install the gpu extra (onnxruntime-gpu) or set FACE_PROVIDERS=cpu"
        )
    if not want_cuda:
        return [CPU]
    cuda_options = {
        "device_id": settings.cuda_device_id,
        "cudnn_conv_algo_search": settings.cudnn_conv_algo_search,
    }
    if settings.gpu_mem_limit_mb:
        cuda_options["gpu_mem_limit"] = settings.gpu_mem_limit_mb * 1024 * 1024
    return [(CUDA, cuda_options), CPU]


class EmbeddingModel:
    def __init__(self, path: Path, settings: Settings) -> None:
        self.path = Path(path)
        self.settings = settings
        self.contract: FaceContract = read_contract(self.path)
        self._session: Any = None  # an onnxruntime.InferenceSession once initialize() ran (ort is imported there)
        self._input_name = self.contract.input_name
        self.fixed_batch: int | None = None
        self.providers: list[str] = []

    # --- lifecycle ---------------------------------------------------------------------------
    def initialize(self) -> None:
        import onnxruntime as ort

        if CUDA in ort.get_available_providers() and hasattr(ort, "preload_dlls"):
            try:  # onnxruntime-gpu >= 1.21 finds the pip-installed CUDA/cuDNN libraries this way
                ort.preload_dlls()
            except Exception:  # noqa: BLE001 - the session creation below reports what is missing
                log.warning("onnxruntime.preload_dlls failed", exc_info=True)
        available = ort.get_available_providers()
        requested = _provider_list(self.settings, available)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.settings.intra_op_threads:
            options.intra_op_num_threads = self.settings.intra_op_threads
        self._session = ort.InferenceSession(str(self.path), sess_options=options, providers=requested)
        self.providers = self._session.get_providers()
        if (self.settings.require_gpu or self.settings.providers == "cuda") and CUDA not in self.providers:
            raise ProviderError(f"CUDA was requested but the session runs on {self.providers}")
        inputs = {i.name: i for i in self._session.get_inputs()}
        if self._input_name not in inputs:
            raise ValueError(f"model input {self._input_name!r} (from face.input_name) not in graph inputs {list(inputs)}")
        dim0 = inputs[self._input_name].shape[0]
        self.fixed_batch = dim0 if isinstance(dim0, int) and dim0 > 0 else None
        out_dim = self._session.get_outputs()[0].shape[-1]
        if isinstance(out_dim, int) and out_dim != self.contract.embedding_size:
            raise ValueError(f"graph output width {out_dim} != face.embedding_size {self.contract.embedding_size}")
        log.info(
            "model loaded",
            extra={"model": str(self.path), "model_id": self.contract.model_id, "providers": self.providers,
                   "available_providers": available, "fixed_batch": self.fixed_batch},
        )

    def warmup(self, batch_sizes: list[int]) -> dict[int, float]:
        """Run each batch size once so first requests do not pay for allocation or cuDNN search."""
        h, w = self.contract.input_size
        timings = {}
        for n in sorted(set(batch_sizes)):
            faces = np.full((n, h, w, 3), 128, dtype=np.uint8)
            start = time.perf_counter()
            self.execute(faces)
            timings[n] = round((time.perf_counter() - start) * 1000, 2)
        log.info("model warmed up", extra={"warmup_ms_by_batch": timings})
        return timings

    def execute(self, faces: np.ndarray) -> np.ndarray:
        """N x H x W x 3 uint8 RGB aligned faces -> N x D L2-normalised float32 embeddings."""
        if self._session is None:
            raise RuntimeError("model not initialised")
        tensor = preprocess(faces, self.contract)
        if self.fixed_batch is not None and tensor.shape[0] != self.fixed_batch:
            outputs = [self._run(tensor[i : i + 1]) for i in range(tensor.shape[0])]
            raw = np.concatenate(outputs, axis=0)
        else:
            raw = self._run(tensor)
        return l2_normalise(raw.reshape(raw.shape[0], -1))

    def _run(self, tensor: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input_name: tensor})[0]

    def finalize(self) -> None:
        self._session = None
