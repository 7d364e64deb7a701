"""Dynamic micro-batching: faces from concurrent requests share one session run.

A request's faces are queued (split into chunks of at most ``max_batch``); a worker takes the first
chunk, then gathers more until the batch is full or ``max_wait_ms`` has passed, runs the model in a
thread (never on the event loop), and hands each request its own rows back. Images are decoded and
validated before they reach the queue, so one request's bad image can never fail another's batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class _Chunk:
    faces: np.ndarray
    future: asyncio.Future = field(repr=False)


class DynamicBatcher:
    def __init__(
        self,
        execute: Callable[[np.ndarray], np.ndarray],
        max_batch: int,
        max_wait_ms: float,
        workers: int = 1,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self._execute = execute
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self._workers = workers
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Chunk] | None = None
        self._tasks: list[asyncio.Task] = []
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="inference")
        self._held: _Chunk | None = None  # a chunk that did not fit the last batch goes first next

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._worker(), name=f"batcher-{i}") for i in range(self._workers)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._executor.shutdown(wait=True)

    async def embed(self, faces: np.ndarray) -> np.ndarray:
        """N aligned faces (N x H x W x 3 uint8) -> N embeddings, batched with whoever else is waiting."""
        if self._queue is None:
            raise RuntimeError("batcher not started")
        loop = asyncio.get_running_loop()
        chunks = []
        for start in range(0, len(faces), self.max_batch):
            chunk = _Chunk(faces[start : start + self.max_batch], loop.create_future())
            chunks.append(chunk)
            self._queue.put_nowait(chunk)
        results = await asyncio.gather(*(c.future for c in chunks))
        return np.concatenate(results, axis=0)

    async def _next_chunk(self, timeout: float | None) -> _Chunk | None:
        if self._held is not None:
            chunk, self._held = self._held, None
            return chunk
        if timeout is None:
            return await self._queue.get()
        if timeout <= 0:
            return self._queue.get_nowait() if not self._queue.empty() else None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:  # the builtin TimeoutError only from 3.11 on
            return None

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next_chunk(None)
            batch, size = [first], len(first.faces)
            deadline = loop.time() + self.max_wait
            while size < self.max_batch:
                chunk = await self._next_chunk(deadline - loop.time())
                if chunk is None:
                    break
                if size + len(chunk.faces) > self.max_batch:
                    self._held = chunk
                    break
                batch.append(chunk)
                size += len(chunk.faces)
            live = [c for c in batch if not c.future.done()]  # skip requests whose clients left
            if not live:
                continue
            faces = live[0].faces if len(live) == 1 else np.concatenate([c.faces for c in live], axis=0)
            started = time.perf_counter()
            try:
                embeddings = await loop.run_in_executor(self._executor, self._execute, faces)
            except Exception as exc:  # noqa: BLE001 - delivered to every waiting request
                log.exception("inference failed", extra={"batch_size": len(faces)})
                for c in live:
                    if not c.future.done():
                        c.future.set_exception(exc)
                continue
            if self._on_batch is not None:
                self._on_batch(len(faces), time.perf_counter() - started)
            offset = 0
            for c in live:
                n = len(c.faces)
                if not c.future.done():
                    c.future.set_result(embeddings[offset : offset + n])
                offset += n
