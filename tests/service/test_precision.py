"""FACE_PRECISION=fp16: the service makes (parity-checked) and serves an fp16 variant of its model."""

from __future__ import annotations

import httpx
import numpy as np

from tests.conftest import b64, face_files
from tests.server import ServerProcess


def test_fp16_variant_is_made_served_and_agrees_with_fp32(tmp_path, default_model, server):
    cache = tmp_path / "models"
    proc = ServerProcess(tmp_path / "data", model=default_model,
                         env={"FACE_PRECISION": "fp16", "FACE_MODEL_CACHE_DIR": str(cache)})
    try:
        ready = proc.wait_ready(timeout=240)
        assert ready["model_id"] == "sface@2021dec-int8bq-fp16"
        assert ready["model_path"] == str(cache / "sface-2021dec-fp16" / "model.onnx")
        faces = [b64(p) for p in face_files("George_W_Bush") + face_files("Tony_Blair")]
        with httpx.Client(timeout=60) as client:
            half = np.array(client.post(proc.url + "/embed", json={"images": faces}).json()["embeddings"])
            full = np.array(client.post(server.url + "/embed", json={"images": faces}).json()["embeddings"])
        assert np.sum(half * full, axis=1).min() >= 0.999
    finally:
        proc.stop()
    # a restart reuses the variant (same source digest) instead of converting again
    mtime = (cache / "sface-2021dec-fp16" / "model.onnx").stat().st_mtime_ns
    proc = ServerProcess(tmp_path / "data", model=default_model,
                         env={"FACE_PRECISION": "fp16", "FACE_MODEL_CACHE_DIR": str(cache)})
    try:
        assert proc.wait_ready(timeout=240)["model_id"] == "sface@2021dec-int8bq-fp16"
    finally:
        proc.stop()
    assert (cache / "sface-2021dec-fp16" / "model.onnx").stat().st_mtime_ns == mtime
