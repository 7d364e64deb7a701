"""Dynamic batching with the real model: requests share runs, results stay per request."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from PIL import Image

from service.config import Settings
from service.model.batcher import DynamicBatcher, InferenceTimeout, Overloaded
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
    """A bad and a good request really share one failing run (asserted from the calls), both get
    its error; the next run, with another request, succeeds."""
    calls = []

    def execute(faces):
        calls.append(faces[:, 0, 0, 0].tolist())
        if (faces[:, 0, 0, 0] == 255).any():
            raise RuntimeError("boom")
        return np.ones((len(faces), 4), np.float32)

    async def scenario():
        batcher = DynamicBatcher(execute, max_batch=4, max_wait_ms=500)
        await batcher.start()
        bad = np.full((1, 2, 2, 3), 255, np.uint8)
        good = np.zeros((1, 2, 2, 3), np.uint8)
        shared = await asyncio.gather(batcher.embed(bad), batcher.embed(good), return_exceptions=True)
        later = await batcher.embed(np.ones((1, 2, 2, 3), np.uint8))
        await batcher.stop()
        return shared, later

    (bad_result, good_result), later = asyncio.run(scenario())
    assert calls[0] == [255, 0], calls  # one run held both requests
    assert isinstance(bad_result, RuntimeError) and isinstance(good_result, RuntimeError)
    assert calls[1] == [1] and later.shape == (1, 4)


def marked(value: int, n: int = 1) -> np.ndarray:
    """n tiny 'faces' whose first pixel says which request they belong to."""
    return np.full((n, 2, 2, 3), value, np.uint8)


class BlockingExecute:
    """An execute function that blocks until released and records the requests of every run."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.runs: list[list[int]] = []

    def __call__(self, faces: np.ndarray) -> np.ndarray:
        self.runs.append(sorted(set(faces[:, 0, 0, 0].tolist())))
        assert self.release.wait(30)
        return np.repeat(faces[:, :1, 0, 0].astype(np.float32), 4, axis=1)


def test_every_request_of_mixed_sizes_gets_its_own_rows_with_several_workers(default_model):
    """60 requests of 1..10 faces through the real model, 2 and 3 workers, a small batch: each gets
    exactly its own embeddings (those computed one by one), within a bound."""
    model = EmbeddingModel(default_model, Settings(providers="cpu"))
    model.initialize()
    faces = load_faces()
    one_by_one = np.concatenate([model.execute(faces[i : i + 1]) for i in range(len(faces))])
    rng = np.random.default_rng(7)
    requests = [rng.integers(0, len(faces), size=rng.integers(1, 11)) for _ in range(60)]

    for workers in (2, 3):
        batches: list[int] = []

        async def scenario():
            batcher = DynamicBatcher(model.execute, max_batch=8, max_wait_ms=5, workers=workers,
                                     on_batch=lambda n, s: batches.append(n))
            await batcher.start()
            try:
                return await asyncio.wait_for(asyncio.gather(*(batcher.embed(faces[r]) for r in requests)), 120)
            finally:
                await batcher.stop()

        results = asyncio.run(scenario())
        for picks, result in zip(requests, results):
            assert result.shape == (len(picks), one_by_one.shape[1])
            np.testing.assert_allclose(result, one_by_one[picks], atol=1e-4)
        assert max(batches) <= 8 and sum(batches) == sum(len(r) for r in requests)


def test_no_request_is_lost_when_several_workers_gather_at_once():
    """The old design's workers each gathered around one shared held-over chunk; two gathering at
    once overwrote it and that request waited forever (1-2 of 60 per round here). Many rounds of
    mixed sizes, arriving together or staggered, must all be answered with their own rows in order."""

    def execute(faces):  # row = (request, position) read back from the marked pixels
        time.sleep(0.0005 * len(faces))
        return faces[:, 0, :2, 0].astype(np.float32)

    def request(i: int, n: int) -> np.ndarray:
        faces = np.zeros((n, 2, 2, 3), np.uint8)
        faces[:, 0, 0, 0], faces[:, 0, 1, 0] = i, np.arange(n)
        return faces

    rng = np.random.default_rng(11)
    for round_ in range(12):
        workers, max_batch, stagger = (2, 3)[round_ % 2], (8, 32)[round_ // 2 % 2], (0, 0.002)[round_ // 4 % 2]
        sizes = rng.integers(1, 21, size=60)

        async def scenario():
            batcher = DynamicBatcher(execute, max_batch=max_batch, max_wait_ms=5, workers=workers)
            await batcher.start()
            tasks = []
            for i, n in enumerate(sizes):
                tasks.append(asyncio.create_task(batcher.embed(request(i, n))))
                if stagger:
                    await asyncio.sleep(stagger)
            done, pending = await asyncio.wait(tasks, timeout=20)
            await batcher.stop()
            return [t.result() for t in tasks] if not pending else len(pending)

        results = asyncio.run(scenario())
        assert not isinstance(results, int), f"round {round_}: {results} of 60 requests never answered"
        for i, (n, rows) in enumerate(zip(sizes, results)):
            assert rows.tolist() == [[i, p] for p in range(n)]


def test_a_request_past_its_deadline_gets_inference_timeout_and_never_reaches_the_model():
    execute = BlockingExecute()

    async def scenario():
        batcher = DynamicBatcher(execute, max_batch=4, max_wait_ms=0, workers=1, timeout_s=30)
        await batcher.start()
        first = asyncio.create_task(batcher.embed(marked(1)))  # occupies the only worker
        while not execute.runs:
            await asyncio.sleep(0.01)
        with pytest.raises(InferenceTimeout):
            await batcher.embed(marked(2, 3), timeout_s=0.2)  # waits behind it and times out
        assert batcher.queued_faces == 1  # the timed-out faces no longer count
        execute.release.set()
        later = await batcher.embed(marked(3, 2))
        result = await first
        await batcher.stop()
        return result, later

    first, later = asyncio.run(scenario())
    assert execute.runs == [[1], [3]]  # request 2's chunk was dropped, not run with request 3
    assert first[:, 0].tolist() == [1] and later[:, 0].tolist() == [3, 3]


def test_a_cancelled_request_is_skipped():
    execute = BlockingExecute()

    async def scenario():
        batcher = DynamicBatcher(execute, max_batch=8, max_wait_ms=0, workers=1)
        await batcher.start()
        first = asyncio.create_task(batcher.embed(marked(1)))
        while not execute.runs:
            await asyncio.sleep(0.01)
        gone = asyncio.create_task(batcher.embed(marked(2)))  # a client that leaves while queued
        kept = asyncio.create_task(batcher.embed(marked(3)))
        await asyncio.sleep(0.05)
        gone.cancel()
        execute.release.set()
        results = await asyncio.gather(first, kept)
        await batcher.stop()
        return results

    first, kept = asyncio.run(scenario())
    assert execute.runs == [[1], [3]] and kept[:, 0].tolist() == [3]


def test_queue_bound_answers_overloaded_at_once():
    execute = BlockingExecute()

    async def scenario():
        batcher = DynamicBatcher(execute, max_batch=4, max_wait_ms=0, workers=1, max_queued_faces=4)
        await batcher.start()
        first = asyncio.create_task(batcher.embed(marked(1, 3)))
        while not execute.runs:
            await asyncio.sleep(0.01)
        with pytest.raises(Overloaded):
            await batcher.embed(marked(2, 2))
        execute.release.set()
        ok = await batcher.embed(marked(3, 1))
        await first
        await batcher.stop()
        return ok

    assert asyncio.run(scenario()).shape == (1, 4)


def test_an_idle_model_runs_a_lone_request_at_once_instead_of_waiting_max_wait():
    """With nothing in flight there is nobody to wait for: the request runs without the 60 s
    max_wait (the old gatherer held every lone request for the whole max_wait). Two requests
    queued together still share that run."""
    execute = BlockingExecute()
    execute.release.set()

    async def scenario():
        batcher = DynamicBatcher(execute, max_batch=8, max_wait_ms=60_000, workers=1)
        await batcher.start()
        try:
            lone = await asyncio.wait_for(batcher.embed(marked(1)), 10)
            pair = await asyncio.wait_for(asyncio.gather(batcher.embed(marked(2)), batcher.embed(marked(3))), 10)
        finally:
            await batcher.stop()
        return lone, pair

    lone, (a, b) = asyncio.run(scenario())
    assert execute.runs == [[1], [2, 3]]
    assert lone[:, 0].tolist() == [1] and a[:, 0].tolist() == [2] and b[:, 0].tolist() == [3]


def test_while_a_run_is_in_flight_the_next_batch_waits_to_fill_up():
    """Two workers: while request 1 runs, request 2 takes the free worker but waits (max_wait) for
    request 3, which comes 50 ms later; both share one run."""
    execute = BlockingExecute()

    async def scenario():
        batcher = DynamicBatcher(execute, max_batch=8, max_wait_ms=2_000, workers=2)
        await batcher.start()
        try:
            first = asyncio.create_task(batcher.embed(marked(1)))
            while not execute.runs:
                await asyncio.sleep(0.01)
            second = asyncio.create_task(batcher.embed(marked(2)))
            await asyncio.sleep(0.05)
            third = asyncio.create_task(batcher.embed(marked(3)))
            while len(execute.runs) < 2:
                await asyncio.sleep(0.01)
            execute.release.set()
            return await asyncio.wait_for(asyncio.gather(first, second, third), 10)
        finally:
            execute.release.set()
            await batcher.stop()

    asyncio.run(scenario())
    assert execute.runs == [[1], [2, 3]]


def test_meanwhile_work_runs_beside_its_run_and_its_error_fails_only_its_own_request():
    """``meanwhile`` (the request's quality work, in the service) is called on the loop once the worker
    has prepared the request's faces and is starting their run (after ``prepare``, before ``execute``
    returns), so it overlaps the run instead of delaying it. Its exception fails its own request, not the others of
    the run; a request whose faces never run never calls it."""
    execute = BlockingExecute()
    order: list[str] = []

    def prepare(faces: np.ndarray) -> np.ndarray:
        order.append(f"prepare {faces[0, 0, 0, 0]}")
        return faces

    def broken() -> None:
        raise ValueError("bad crop")

    async def scenario():
        batcher = DynamicBatcher(execute, max_batch=8, max_wait_ms=0, workers=1, prepare=prepare)
        await batcher.start()
        try:
            # the run cannot end before the release: called with it unset, meanwhile overlapped the run
            first = asyncio.create_task(batcher.embed(marked(1), meanwhile=lambda: order.append(
                f"meanwhile 1 released={execute.release.is_set()}")))
            while len(order) < 2:
                await asyncio.sleep(0.01)
            # queued behind the first run: one times out there, two share the next run
            with pytest.raises(InferenceTimeout):
                await batcher.embed(marked(4), timeout_s=0.1, meanwhile=lambda: order.append("meanwhile 4"))
            fails = asyncio.create_task(batcher.embed(marked(2), meanwhile=broken))
            fine = asyncio.create_task(batcher.embed(marked(3), meanwhile=lambda: order.append("meanwhile 3")))
            await asyncio.sleep(0.05)
            execute.release.set()
            return await asyncio.wait_for(asyncio.gather(first, fails, fine, return_exceptions=True), 10)
        finally:
            execute.release.set()
            await batcher.stop()

    first, fails, fine = asyncio.run(scenario())
    assert order == ["prepare 1", "meanwhile 1 released=False", "prepare 2", "meanwhile 3"]
    assert execute.runs == [[1], [2, 3]]  # request 4 timed out in the queue and never ran
    assert first[:, 0].tolist() == [1] and fine[:, 0].tolist() == [3]
    assert isinstance(fails, ValueError) and str(fails) == "bad crop"


def test_stopping_with_a_run_in_flight_fails_its_requests_and_those_queued():
    """stop() while the model runs: the request in the run and the one queued behind it get an
    error at once instead of waiting forever; stop() returns once the run has ended."""
    execute = BlockingExecute()

    async def scenario():
        batcher = DynamicBatcher(execute, max_batch=1, max_wait_ms=0, workers=1)
        await batcher.start()
        running = asyncio.create_task(batcher.embed(marked(1)))
        queued = asyncio.create_task(batcher.embed(marked(2)))
        while not execute.runs:
            await asyncio.sleep(0.01)
        threading.Timer(0.2, execute.release.set).start()  # the run ends while stop() waits for it
        await batcher.stop()
        return await asyncio.wait_for(asyncio.gather(running, queued, return_exceptions=True), 10)

    running, queued = asyncio.run(scenario())
    assert execute.runs == [[1]]
    assert isinstance(running, RuntimeError) and str(running) == "the batcher stopped"
    assert isinstance(queued, RuntimeError) and str(queued) == "the batcher stopped"
