"""The migration's model call (service/jobs/migrate.py model_embed): kept crops of another size than
the new model's input end the job with wrong_image_size, never a shape error from inside the session."""

from __future__ import annotations

import numpy as np
import pytest

from harness.models import tiny_model
from service.config import Settings
from service.errors import ErrorCode
from service.jobs.migrate import JobFailed, model_embed
from service.model.runtime import EmbeddingModel


def test_crops_of_another_size_than_the_models_input_are_a_clear_failure(tmp_path):
    model = EmbeddingModel(tiny_model(tmp_path / "tiny96.onnx", size=96), Settings(data_dir=tmp_path / "data"))
    model.initialize()
    embed = model_embed(model)
    crops = np.random.default_rng(0).integers(0, 255, (2, 96, 96, 3), dtype=np.uint8)
    vectors = embed(crops)
    assert vectors.shape == (2, 64) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    with pytest.raises(JobFailed) as failed:
        embed(np.zeros((2, 112, 112, 3), np.uint8))  # the service's usual crops
    assert failed.value.code is ErrorCode.wrong_image_size
    assert "112x112" in str(failed.value) and "96x96" in str(failed.value)
