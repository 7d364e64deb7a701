"""Dynamic micro-batching: faces from concurrent requests share one session run.

Design: one gatherer, N inference workers.

* A request's faces are queued as chunks of at most ``max_batch`` faces, each with its own future.
* A single gatherer task forms every batch. It first waits for a free inference slot (one of
  ``workers``), then takes the first live chunk and gathers more: while another run is in flight,
  until the batch is full or ``max_wait_ms`` has passed; when no run is in flight (an idle model),
  only what is already queued, and the batch runs at once. Waiting beside an idle model only adds
  latency: a lone request used to pay the whole ``max_wait_ms``, and under load the queue fills
  while the model is busy anyway. A chunk that does not fit is held over as the first chunk of the
  next batch. Because only the gatherer ever touches the held-over chunk there is exactly one of it and
  nothing can overwrite it (the old design had each of N workers gather on its own around one shared
  held-over slot, and a chunk overwritten there was never answered).
* The batch goes to an inference task that runs the model in a thread (never on the event loop) and
  hands each chunk its own rows. At most ``workers`` run at once; while they are busy the queue
  fills, so the next batch is formed from what is waiting at that moment (bigger batches under load).
* Every request waits with a deadline (``timeout_s``): past it the request gets ``InferenceTimeout``
  and its chunks' futures are cancelled. The gatherer drops chunks whose future is done (timed out,
  cancelled because the client left, or already failed), both when it takes them from the queue and
  before a batch runs, so an abandoned request never takes room in a later batch and never has rows
  written into it. ``max_queued_faces`` bounds the faces waiting; beyond it ``Overloaded`` is raised
  at once instead of growing an unbounded backlog.

Images are decoded and validated before they reach the queue, so one request's bad image can never
fail another's batch; a model failure fails exactly the requests whose faces were in that run.
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


class InferenceTimeout(TimeoutError):
    """A request's faces were not embedded within the batcher's deadline."""


class Overloaded(RuntimeError):
    """Too many faces are already waiting for the model."""


@dataclass
class _Chunk:
    faces: np.ndarray
    future: asyncio.Future = field(repr=False)

    @property
    def abandoned(self) -> bool:
        return self.future.done()  # answered, failed, timed out or cancelled: nobody needs rows for it


class DynamicBatcher:
    def __init__(
        self,
        execute: Callable[[np.ndarray], np.ndarray],
        max_batch: int,
        max_wait_ms: float,
        workers: int = 1,
        on_batch: Callable[[int, float], None] | None = None,
        timeout_s: float | None = None,
        max_queued_faces: int | None = None,
    ) -> None:
        self._execute = execute
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.timeout_s = timeout_s
        self.max_queued_faces = max_queued_faces
        self._workers = workers
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Chunk] | None = None
        self._slots: asyncio.Semaphore | None = None
        self._gatherer: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="inference")
        self._held: _Chunk | None = None  # owned by the gatherer alone
        self._queued_faces = 0
        self._in_flight = 0  # batches handed to _run and not finished

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._slots = asyncio.Semaphore(self._workers)
        self._gatherer = asyncio.create_task(self._gather_forever(), name="batcher-gatherer")

    async def stop(self) -> None:
        tasks = [t for t in [self._gatherer, *self._running] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._fail_waiting(RuntimeError("the batcher stopped"))
        self._executor.shutdown(wait=True)

    @property
    def queued_faces(self) -> int:
        """Faces waiting for (or in) a session run."""
        return self._queued_faces

    async def embed(self, faces: np.ndarray, timeout_s: float | None = None) -> np.ndarray:
        """N aligned faces (N x H x W x 3 uint8) -> N embeddings, batched with whoever else is waiting.

        Raises ``InferenceTimeout`` past the deadline (``timeout_s``, else the batcher's) and
        ``Overloaded`` when the queue is full; cancelling the caller abandons its faces."""
        if self._queue is None:
            raise RuntimeError("batcher not started")
        if self.max_queued_faces is not None and self._queued_faces + len(faces) > self.max_queued_faces:
            raise Overloaded(f"{self._queued_faces} faces are already waiting; the limit is {self.max_queued_faces}")
        loop = asyncio.get_running_loop()
        chunks = []
        for start in range(0, len(faces), self.max_batch):
            chunk = _Chunk(faces[start : start + self.max_batch], loop.create_future())
            self._queued_faces += len(chunk.faces)
            chunk.future.add_done_callback(lambda _f, n=len(chunk.faces): self._dequeued(n))  # type: ignore[misc]  # noqa: B008 - binds this chunk's size now
            chunks.append(chunk)
            self._queue.put_nowait(chunk)
        timeout = timeout_s if timeout_s is not None else self.timeout_s
        # one chunk (the common case): its own future, without a gathering future around it
        waiting = chunks[0].future if len(chunks) == 1 else asyncio.gather(*(c.future for c in chunks))
        try:
            results = await asyncio.wait_for(waiting, timeout)
        except asyncio.TimeoutError:  # the builtin TimeoutError only from 3.11 on
            raise InferenceTimeout(f"{len(faces)} faces were not embedded within {timeout:g} s") from None
        finally:
            for c in chunks:  # timed out, cancelled or failed: nobody will read these rows
                c.future.cancel()
        return results if len(chunks) == 1 else np.concatenate(results, axis=0)

    def _dequeued(self, n: int) -> None:
        self._queued_faces -= n

    # --- the gatherer ------------------------------------------------------------------------
    async def _take(self, timeout: float | None) -> _Chunk | None:
        """The next live chunk (held-over first); None when ``timeout`` passes first."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            if self._held is not None:
                chunk, self._held = self._held, None
            elif deadline is None:
                chunk = await self._queue.get()
            else:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    if self._queue.empty():
                        return None
                    chunk = self._queue.get_nowait()
                else:
                    try:
                        chunk = await asyncio.wait_for(self._queue.get(), remaining)
                    except asyncio.TimeoutError:
                        return None
            if not chunk.abandoned:
                return chunk

    async def _form_batch(self) -> list[_Chunk]:
        loop = asyncio.get_running_loop()
        first = await self._take(None)
        assert first is not None  # no deadline: _take waits until there is a chunk
        batch, size = [first], len(first.faces)
        deadline = loop.time() + self.max_wait
        while size < self.max_batch:
            # an idle model takes only what is queued now (timeout 0); a busy one gets max_wait to fill up
            chunk = await self._take(0 if self._in_flight == 0 else deadline - loop.time())
            if chunk is None:
                break
            if size + len(chunk.faces) > self.max_batch:
                self._held = chunk  # first in the next batch: order is kept, nothing is lost
                break
            batch.append(chunk)
            size += len(chunk.faces)
        return batch

    async def _gather_forever(self) -> None:
        while True:
            await self._slots.acquire()  # a free worker first: meanwhile the queue fills up
            try:
                batch = await self._form_batch()
            except BaseException:
                self._slots.release()
                raise
            self._in_flight += 1
            task = asyncio.create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    # --- an inference worker -----------------------------------------------------------------
    async def _run(self, batch: list[_Chunk]) -> None:
        try:
            live = [c for c in batch if not c.abandoned]  # requests may have left while we gathered
            if live:
                await self._infer(live)
        finally:
            self._in_flight -= 1
            self._slots.release()

    async def _infer(self, live: list[_Chunk]) -> None:
        loop = asyncio.get_running_loop()
        faces = live[0].faces if len(live) == 1 else np.concatenate([c.faces for c in live], axis=0)
        started = time.perf_counter()
        try:
            embeddings = await loop.run_in_executor(self._executor, self._execute, faces)
        except asyncio.CancelledError:  # stop(): these requests get an error, not silence
            _fail(live, RuntimeError("the batcher stopped"))
            raise
        except Exception as exc:  # noqa: BLE001 - delivered to every request of this run
            log.exception("inference failed", extra={"batch_size": len(faces)})
            _fail(live, exc)
            return
        if self._on_batch is not None:
            self._on_batch(len(faces), time.perf_counter() - started)
        offset = 0
        for c in live:
            n = len(c.faces)
            if not c.future.done():
                c.future.set_result(embeddings[offset : offset + n])
            offset += n

    def _fail_waiting(self, exc: Exception) -> None:
        pending = [self._held] if self._held is not None else []
        self._held = None
        while self._queue is not None and not self._queue.empty():
            pending.append(self._queue.get_nowait())
        _fail(pending, exc)


def _fail(chunks: list[_Chunk], exc: BaseException) -> None:
    """``exc`` to every chunk still waiting for its rows."""
    for c in chunks:
        if not c.future.done():
            c.future.set_exception(exc)
