"""The ONNX Runtime session: provider choice (never a silent fallback), inference, warm-up.

Lifecycle after Triton's python backend: ``initialize`` (load, choose providers), ``warmup`` (each
batch size once; the app calls it when FACE_WARMUP is on), ``execute`` (one batch in, L2-normalised
float32 embeddings out; ``execute_raw``: the outputs before normalisation, whose norm is a quality
part), ``finalize``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from ..config import Settings
from .contract import FaceContract, read_contract
from .session import (
    CUDA,
    FaceSession,
    ProviderChoice,
    ProviderError,
    SessionOptions,
    available_providers,
    provider_list,
)

log = logging.getLogger(__name__)

# FACE_REQUIRE_GPU / FACE_PROVIDERS=cuda on a host (or container) that cannot reach an NVIDIA GPU
NO_GPU = ("no usable GPU: CUDA was requested (FACE_PROVIDERS=cuda or FACE_REQUIRE_GPU=true) but no NVIDIA GPU "
          "is reachable; check the NVIDIA driver (nvidia-smi) and, in a container, the NVIDIA container toolkit "
          "(docker run --gpus all, or compose's device reservation)")
__all__ = ["EmbeddingModel", "ProviderError"]  # ProviderError: raised by initialize(), defined in .session


class EmbeddingModel:
    def __init__(self, path: Path, settings: Settings) -> None:
        self.path = Path(path)
        self.settings = settings
        self.contract: FaceContract = read_contract(self.path)
        self._session: FaceSession | None = None  # set by initialize()
        self.fixed_batch: int | None = None
        self.providers: list[str] = []

    # --- lifecycle ---------------------------------------------------------------------------
    def initialize(self) -> None:
        choice = ProviderChoice.from_settings(self.settings)
        available = available_providers()
        requested = provider_list(choice, available)
        try:
            self._session = FaceSession(self.path, providers=requested, contract=self.contract,
                                        options=SessionOptions(intra_op_threads=self.settings.intra_op_threads,
                                                               spinning=self.settings.intra_op_spinning))
        except Exception as exc:
            if choice.demands_cuda:  # onnxruntime's own words are about libraries: say what is missing
                raise ProviderError(f"{NO_GPU}: creating the CUDA session failed ({exc})") from exc
            raise
        self.providers = self._session.providers
        if choice.demands_cuda and CUDA not in self.providers:
            raise ProviderError(f"{NO_GPU}: onnxruntime could not use CUDA and would run on {self.providers}")
        self.fixed_batch = self._session.fixed_batch
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
        return self._session.embed(faces)

    def execute_raw(self, faces: np.ndarray) -> np.ndarray:
        """N x H x W x 3 uint8 RGB aligned faces -> N x D outputs as the graph gives them (the batcher
        runs this; ``pipeline`` normalises them and keeps their norms for ``quality``)."""
        if self._session is None:
            raise RuntimeError("model not initialised")
        return self._session.raw(faces)

    def prepare(self, faces: np.ndarray) -> np.ndarray:
        """``execute_raw``'s first step: the faces as the model's input tensor (the batcher's ``prepare``)."""
        if self._session is None:
            raise RuntimeError("model not initialised")
        return self._session.preprocess(faces)

    def execute_prepared(self, tensor: np.ndarray) -> np.ndarray:
        """``execute_raw``'s second step: the model's run on a ``prepare``d tensor."""
        if self._session is None:
            raise RuntimeError("model not initialised")
        return self._session.raw_prepared(tensor)

    def finalize(self) -> None:
        self._session = None
