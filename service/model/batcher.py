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
* The gatherer hands the batch straight to an inference thread (the model never runs on the event
  loop), which gives the outcome back to the loop in one callback that sets each chunk's rows on
  its future, the future the request awaits. At most ``workers`` run at once; while they are busy
  the queue fills, so the next batch is formed from what is waiting at that moment (bigger batches
  under load). Few hops: a request's run starts one loop iteration after it is queued and its
  handler resumes one iteration after the rows are set.
* Every request waits with a deadline (``timeout_s``): past it the request's chunks get
  ``InferenceTimeout`` on their futures (and the request with them). The gatherer drops chunks whose future is done (timed out,
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


@dataclass(eq=False)  # compared by identity: a field is an array
class _Chunk:
    faces: np.ndarray
    future: asyncio.Future = field(repr=False)
    meanwhile: Callable[[], object] | None = field(default=None, repr=False)  # see DynamicBatcher.embed

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
        prepare: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        """``execute``: a batch of faces (``prepare``d, if given) -> their rows, run on a worker thread.
        ``prepare``: its first step (the input tensor), run before the callers' ``meanwhile`` work is
        started beside the run, so that ``execute`` itself needs the GIL hardly at all."""
        self._execute = execute
        self._prepare = prepare
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.timeout_s = timeout_s
        self.max_queued_faces = max_queued_faces
        self._workers = workers
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Chunk] | None = None
        self._slots: asyncio.Semaphore | None = None
        self._gatherer: asyncio.Task | None = None
        self._running: dict[int, list[_Chunk]] = {}  # the chunks of each run in flight, by run number
        self._runs = 0
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="inference")
        self._held: _Chunk | None = None  # owned by the gatherer alone
        self._queued_faces = 0
        self._in_flight = 0  # batches handed to a worker thread and not finished

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._slots = asyncio.Semaphore(self._workers)
        self._gatherer = asyncio.create_task(self._gather_forever(), name="batcher-gatherer")

    async def stop(self) -> None:
        if self._gatherer is not None:
            self._gatherer.cancel()
            await asyncio.gather(self._gatherer, return_exceptions=True)
        for live in self._running.values():  # runs in flight: their requests get an error, not silence
            _fail(live, RuntimeError("the batcher stopped"))
        self._fail_waiting(RuntimeError("the batcher stopped"))
        self._executor.shutdown(wait=True)

    @property
    def queued_faces(self) -> int:
        """Faces waiting for (or in) a session run."""
        return self._queued_faces

    async def embed(self, faces: np.ndarray, timeout_s: float | None = None,
                    meanwhile: Callable[[], object] | None = None) -> np.ndarray:
        """N aligned faces (N x H x W x 3 uint8) -> N embeddings, batched with whoever else is waiting.

        Raises ``InferenceTimeout`` past the deadline (``timeout_s``, else the batcher's) and
        ``Overloaded`` when the queue is full; cancelling the caller abandons its faces. ``meanwhile``:
        work of the caller's that does not need the embeddings, called on the event loop once the
        model has started on these faces, so that it overlaps the run instead of delaying its start
        (its exception fails the request); not called when the faces never run."""
        if self._queue is None:
            raise RuntimeError("batcher not started")
        if self.max_queued_faces is not None and self._queued_faces + len(faces) > self.max_queued_faces:
            raise Overloaded(f"{self._queued_faces} faces are already waiting; the limit is {self.max_queued_faces}")
        loop = asyncio.get_running_loop()
        chunks = []
        for start in range(0, len(faces), self.max_batch):
            chunk = _Chunk(faces[start : start + self.max_batch], loop.create_future(),
                           meanwhile if start == 0 else None)
            self._queued_faces += len(chunk.faces)
            chunk.future.add_done_callback(lambda _f, n=len(chunk.faces): self._dequeued(n))  # type: ignore[misc]  # noqa: B008 - binds this chunk's size now
            chunks.append(chunk)
            self._queue.put_nowait(chunk)
        timeout = timeout_s if timeout_s is not None else self.timeout_s
        # the deadline fails the chunks' own futures (the gatherer then drops them): the caller wakes
        # when its rows are set, without wait_for's waiter future and its extra loop iterations
        expiry = None if timeout is None else loop.call_later(timeout, _expire, chunks, len(faces), timeout)
        try:
            if len(chunks) == 1:  # the common case: its own future, without a gathering future around it
                return await chunks[0].future
            return np.concatenate(await asyncio.gather(*(c.future for c in chunks)), axis=0)
        finally:
            if expiry is not None:
                expiry.cancel()
            for c in chunks:  # timed out, cancelled or failed: nobody will read these rows
                c.future.cancel()

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
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()  # a free worker first: meanwhile the queue fills up
            try:
                batch = await self._form_batch()
            except BaseException:
                self._slots.release()
                raise
            live = [c for c in batch if not c.abandoned]  # requests may have left while we gathered
            if not live:
                self._slots.release()
                continue
            # handed to the worker thread now, not from a task of its own (one loop iteration less)
            self._in_flight += 1
            self._runs += 1
            self._running[self._runs] = live
            self._executor.submit(self._infer, loop, self._runs, live)

    # --- an inference worker (a thread) ----------------------------------------------------------
    def _infer(self, loop: asyncio.AbstractEventLoop, run: int, live: list[_Chunk]) -> None:
        """Runs the model on the worker thread and hands the outcome to the loop in one callback, which
        sets each chunk's rows itself (no asyncio future and task in between)."""
        faces = live[0].faces if len(live) == 1 else np.concatenate([c.faces for c in live], axis=0)
        n = len(faces)
        started = time.perf_counter()
        try:
            if self._prepare is not None:
                faces = self._prepare(faces)
            if any(c.meanwhile is not None for c in live):
                # the callers' work overlaps the run (which releases the GIL) instead of holding up its
                # start: on the loop, it would take the GIL this thread still needs to begin
                loop.call_soon_threadsafe(_meanwhile, live)
            outcome: np.ndarray | BaseException = self._execute(faces)
        except BaseException as exc:  # noqa: BLE001 - delivered to every request of this run
            outcome = exc
        try:
            loop.call_soon_threadsafe(self._finish, run, outcome, n, time.perf_counter() - started)
        except RuntimeError:  # the loop closed meanwhile: stop() already failed these requests
            pass

    def _finish(self, run: int, outcome: np.ndarray | BaseException, n: int, seconds: float) -> None:
        self._in_flight -= 1
        live = self._running.pop(run)
        self._slots.release()
        if isinstance(outcome, BaseException):
            log.error("inference failed", exc_info=outcome, extra={"batch_size": n})
            _fail(live, outcome)
            return
        if self._on_batch is not None:
            self._on_batch(n, seconds)
        offset = 0
        for c in live:
            rows = len(c.faces)
            if not c.future.done():
                c.future.set_result(outcome[offset : offset + rows])
            offset += rows

    def _fail_waiting(self, exc: Exception) -> None:
        pending = [self._held] if self._held is not None else []
        self._held = None
        while self._queue is not None and not self._queue.empty():
            pending.append(self._queue.get_nowait())
        _fail(pending, exc)


def _meanwhile(chunks: list[_Chunk]) -> None:
    """The callers' ``meanwhile`` work, on the loop while their run is under way; an exception fails
    its own request only."""
    # The worker thread signals just before the run and may not have entered it yet (it needs the
    # GIL for a few more Python calls): taking the GIL here would hold up the run's start for the
    # whole of this work (CPython lets a waiting thread force a switch only after 5 ms). A sleep of 0
    # releases the GIL once, so the run starts first (measured: 0.25 ms -> 0.03 ms to its start).
    time.sleep(0)
    for c in chunks:
        if c.meanwhile is not None and not c.future.done():
            try:
                c.meanwhile()
            except Exception as exc:  # noqa: BLE001 - the request's own error, delivered to it
                c.future.set_exception(exc)


def _expire(chunks: list[_Chunk], faces: int, timeout: float) -> None:
    """A request's deadline: ``InferenceTimeout`` to its chunks still waiting."""
    _fail(chunks, InferenceTimeout(f"{faces} faces were not embedded within {timeout:g} s"))


def _fail(chunks: list[_Chunk], exc: BaseException) -> None:
    """``exc`` to every chunk still waiting for its rows."""
    for c in chunks:
        if not c.future.done():
            c.future.set_exception(exc)
