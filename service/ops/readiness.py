"""/readyz runs a real inference, but at most once per ``ttl_s``: a load balancer polling it every
100 ms from several nodes must not cost a model run per poll. Concurrent polls share one run."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


class ReadinessProbe:
    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._checked: tuple[float, float] | None = None  # (monotonic time, inference ms)
        self._lock = asyncio.Lock()

    def _fresh(self) -> float | None:
        if self._checked is not None and time.monotonic() - self._checked[0] < self.ttl_s:
            return self._checked[1]
        return None

    async def inference_ms(self, run: Callable[[], Awaitable[float]]) -> float:
        """The latency of the last successful check if it is fresh, else of a new one (``run``)."""
        cached = self._fresh()
        if cached is not None:
            return cached
        async with self._lock:
            cached = self._fresh()  # someone else may have just checked
            if cached is not None:
                return cached
            elapsed = await run()  # a failure is not cached: the next poll tries again
            self._checked = (time.monotonic(), elapsed)
            return elapsed
