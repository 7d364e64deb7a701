"""Dynamic batching with the real model: requests share runs, results stay per request."""

from __future__ import annotations

import asyncio

import numpy as np
from PIL import Image

from service.config import Settings
from service.model.batcher import DynamicBatcher
from service.model.runtime import EmbeddingModel
from tests.conftest import FACES


def load_faces():
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in sorted(FACES.glob("*.jpg"))])


def test_concurrent_requests_are_batched_and_answered_correctly(default_model):
    model = EmbeddingModel(default_model, Settings(providers="cpu"))
    model.initialize()
    faces = load_faces()
    expected = model.execute(faces)
    batches: list[int] = []

    async def scenario():
        batcher = DynamicBatcher(model.execute, max_batch=8, max_wait_ms=20,
                                 on_batch=lambda n, s: batches.append(n))
        await batcher.start()
        # 32 requests of 1 face, plus one request of 5 and one of 11 (split over batches)
        singles = [batcher.embed(faces[i : i + 1]) for i in range(len(faces))]
        multi = [batcher.embed(faces[:5]), batcher.embed(faces[5:16])]
        results = await asyncio.gather(*singles, *multi)
        await batcher.stop()
        return results

    results = asyncio.run(scenario())
    for i in range(len(faces)):
        assert float(results[i][0] @ expected[i]) > 0.9999
    np.testing.assert_allclose(results[-2], expected[:5], atol=1e-4)
    np.testing.assert_allclose(results[-1], expected[5:16], atol=1e-4)
    assert max(batches) <= 8
    assert sum(batches) == len(faces) + 16
    assert len(batches) < len(faces)  # requests really were combined


def test_failure_reaches_every_request_of_that_batch_only():
    calls = []

    def execute(faces):
        calls.append(len(faces))
        if faces[0, 0, 0, 0] == 255:
            raise RuntimeError("boom")
        return np.ones((len(faces), 4), np.float32)

    async def scenario():
        batcher = DynamicBatcher(execute, max_batch=4, max_wait_ms=0)
        await batcher.start()
        bad = np.full((1, 2, 2, 3), 255, np.uint8)
        good = np.zeros((1, 2, 2, 3), np.uint8)
        first = await asyncio.gather(batcher.embed(bad), return_exceptions=True)
        second = await batcher.embed(good)
        await batcher.stop()
        return first[0], second

    err, ok = asyncio.run(scenario())
    assert isinstance(err, RuntimeError) and ok.shape == (1, 4)
