"""Shadow traffic: after a migration, each /identify answered on the old collection is run again on
the new one, off the request path, and how often the two agree is counted on /metrics.

A pair (source A -> target B) is active from the moment a migrate job with ``shadow: true`` is done
(``ShadowMap.start``; the job runner calls it) until either collection is deleted or an alias that
pointed at A is re-pointed at B (then the new collection serves the traffic: nothing is left to
compare), or ``ShadowMap.stop``. While it is active, an /identify on A by image hands the aligned
crops it already has and A's top-1 of each searched probe to :meth:`ShadowMap.offer`: a dict lookup
and a put into a bounded queue (``FACE_SHADOW_QUEUE``), never a wait. When the queue is full the
request is dropped from the shadow and counted; nothing the request answers depends on the shadow.

One background task per process takes the queue: it embeds the crops with B's model (its batcher,
like any request of B) and searches B for the top-1 (in a worker thread), then counts per probe face:

* ``face_shadow_identify_total{source,target}``: probe faces run on both;
* ``face_shadow_top1_agreement_total{source,target,agree}``: whether B's top-1 identity is A's
  ("true"/"false"; the top candidates, whatever the threshold; an empty answer is "no identity");
* ``face_shadow_score_shift{source,target}``: B's top score minus A's (histogram), when both answered;
* ``face_shadow_dropped_total``: requests not shadowed (the queue was full, or the shadow run failed:
  logged).

The pairs live in this process. With several replicas each one needs them: the job rows are the truth
(service/jobs/). The replica that ran the job starts its pair when it ends; every replica also reads
the active pairs from the job rows every ``FACE_SHADOW_REFRESH_S`` (:meth:`ShadowMap.follow`, three
small reads, or one when no job asked for a shadow) and starts those it lacks, so a replica that did
not run the job shadows within seconds, not at its next restart. Pairs end as above, on each replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from starlette.concurrency import run_in_threadpool

from ..gallery.api import CollectionNotFound, Match
from ..model.preprocess import l2_normalise

if TYPE_CHECKING:
    from ..ops.metrics import Metrics
    from ..state import ServiceState

log = logging.getLogger(__name__)

__all__ = ["ShadowMap"]


@dataclass
class _Pair:
    target: str
    aliases: set[str] = field(default_factory=set)  # aliases seen pointing at the source


@dataclass(frozen=True)
class _Offer:
    source: str
    target: str
    crops: np.ndarray  # [n, H, W, 3] uint8, the aligned crops the request searched with
    top1: list[Match | None]  # A's best candidate per crop (None: A answered nothing)


class ShadowMap:
    """The active shadow pairs of this process and the queue of their work (module docstring)."""

    def __init__(self, metrics: Metrics, queue_size: int) -> None:
        self.metrics = metrics
        self._pairs: dict[str, _Pair] = {}
        self._lock = threading.Lock()
        self._queue_size = queue_size
        self._queue: asyncio.Queue[_Offer] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._following = threading.Event()  # set: the follow() thread stops

    # --- which pairs ---------------------------------------------------------------------------
    def start(self, source: str, target: str, aliases: Iterable[str] = ()) -> None:
        """Shadow the identify traffic of collection ``source`` on ``target`` (replaces an earlier target).
        ``aliases``: those pointing at ``source`` now (re-pointing one at ``target`` ends the shadow; the
        ones seen pointing at it later are added)."""
        if source == target:
            raise ValueError("a collection cannot shadow itself")
        with self._lock:
            self._pairs[source] = _Pair(target, set(aliases))
        log.info("shadow traffic started", extra={"source": source, "target": target})

    def stop(self, source: str) -> bool:
        """Stop shadowing ``source``; whether it was shadowed."""
        with self._lock:
            pair = self._pairs.pop(source, None)
        if pair is not None:
            log.info("shadow traffic stopped", extra={"source": source, "target": pair.target})
        return pair is not None

    def target_of(self, source: str) -> str | None:
        pair = self._pairs.get(source)
        return pair.target if pair is not None else None

    def pairs(self) -> dict[str, str]:
        """source -> target of every active pair."""
        with self._lock:
            return {source: pair.target for source, pair in self._pairs.items()}

    # --- the request path ------------------------------------------------------------------------
    def offer(self, state: ServiceState, source: str, crops: list[np.ndarray], top1: list[Match | None]) -> None:
        """Called by /identify on ``source`` (in the event loop) with the crops it searched and its
        top-1 of each: queued for the background task when ``source`` is shadowed; never waits."""
        target = self.target_of(source)
        if target is None or not crops:
            return
        if self._queue is None:
            self._queue = asyncio.Queue(self._queue_size)
            self._worker = asyncio.get_running_loop().create_task(self._work(state))
        try:
            self._queue.put_nowait(_Offer(source, target, np.stack(crops), list(top1)))
        except asyncio.QueueFull:
            self.metrics.shadow_dropped.inc()

    # --- the background task ---------------------------------------------------------------------
    async def _work(self, state: ServiceState) -> None:
        assert self._queue is not None
        while True:
            offer = await self._queue.get()
            try:
                await self._shadow(state, offer)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the shadow never fails anything: counted and logged
                self.metrics.shadow_dropped.inc()
                log.warning("shadow identify failed", extra={"source": offer.source, "target": offer.target,
                                                             "error": f"{type(exc).__name__}: {exc}"})
            finally:
                self._queue.task_done()

    async def _shadow(self, state: ServiceState, offer: _Offer) -> None:
        if not await run_in_threadpool(self._still_active, state, offer.source, offer.target):
            return
        try:
            gallery = state.galleries.collection(offer.target)
        except CollectionNotFound:  # deleted since the check
            self.stop(offer.source)
            return
        served = state.served_for(gallery)
        vectors = l2_normalise(await served.batcher.embed(offer.crops))  # B's batcher, as its requests
        found = await run_in_threadpool(gallery.search, vectors, 1)
        labels = (offer.source, offer.target)
        for before, matches in zip(offer.top1, found):
            after = matches[0] if matches else None
            agree = (before.identity_id if before else None) == (after.identity_id if after else None)
            self.metrics.shadow_identify.labels(*labels).inc()
            self.metrics.shadow_agreement.labels(*labels, "true" if agree else "false").inc()
            if before is not None and after is not None:
                self.metrics.shadow_score_shift.labels(*labels).observe(after.score - before.score)

    def _still_active(self, state: ServiceState, source: str, target: str) -> bool:
        """False (and the pair stopped) once either collection is gone or an alias that pointed at the
        source points at the target; blocking (collection list, alias map)."""
        with self._lock:
            pair = self._pairs.get(source)
        if pair is None or pair.target != target:
            return False
        deleted = []
        for name in (source, target):
            try:
                state.galleries.collection(name)  # cheap: a lookup (the route does it per request)
            except CollectionNotFound:
                deleted.append(name)
        aliases = state.aliases.current()  # at most FACE_ALIAS_CACHE_S old
        pair.aliases |= {alias for alias, collection in aliases.items() if collection == source}
        moved = sorted(alias for alias in pair.aliases if aliases.get(alias) == target)
        if not deleted and not moved:
            return True
        with self._lock:
            if self._pairs.get(source) is pair:
                del self._pairs[source]
        log.info("shadow traffic ended", extra={"source": source, "target": target, "aliases_moved": moved,
                                                "deleted": deleted})
        return False

    async def close(self) -> None:
        """Stop the background task (what is queued is not shadowed) and the follow() thread."""
        self._following.set()
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None

    # --- pairs from the job rows (every replica) ---------------------------------------------------
    def refresh(self, pairs: Iterable[tuple[str, str, list[str]]]) -> list[str]:
        """Start each (source, target, aliases pointing at the source) not shadowed here on that target
        (runner.shadow_pairs reads them from the job rows); returns the sources started. Only starts:
        a pair ends as the module docstring says, and the job rows no longer list an ended one."""
        started = []
        for source, target, aliases in pairs:
            if self.target_of(source) != target:
                self.start(source, target, aliases)
                started.append(source)
        return started

    def follow(self, read: Callable[[], Iterable[tuple[str, str, list[str]]]], every_s: float) -> threading.Thread:
        """A daemon thread that calls ``refresh(read())`` every ``every_s`` seconds until ``close()``;
        a failed read (database unavailable) is logged and tried again at the next round."""
        def loop() -> None:
            while not self._following.wait(every_s):
                try:
                    self.refresh(read())
                except Exception:  # noqa: BLE001 - the next round reads again; serving never depends on it
                    log.warning("reading the shadow pairs failed", exc_info=True)

        self._following.clear()
        thread = threading.Thread(target=loop, name="shadow-pairs", daemon=True)
        thread.start()
        return thread
