"""A process-wide memory budget for image decodes.

The pixel cap alone does not bound memory: a 5 kB 1-bit PNG of 6320x6320 is under a 40 Mpx cap yet
costs hundreds of MB to decode and convert, and the server's thread pool runs up to 40 decodes at
once. So every photo decode first reserves its estimated peak memory (``decode_cost``, from the
header, before any pixel exists) here:

* one image above the per-image cap is refused at once (``image_too_large``, 413): it would never fit;
* otherwise it waits (up to ``wait_s``) until the decodes in flight leave room in the total budget,
  then decodes; past the wait it is refused with ``overloaded`` (503, retry later).

The reservation is held while the decoded arrays are alive (decode, detect, align) and released
after, so the decodes in flight never hold more than the budget. Decodes run in worker threads,
hence a ``threading.Condition``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import ErrorCode, ServiceError

log = logging.getLogger(__name__)

MB = 1 << 20


class DecodeBudget:
    def __init__(self, total_bytes: int, per_image_bytes: int, wait_s: float) -> None:
        self.total = total_bytes
        self.per_image = min(per_image_bytes, total_bytes)
        self.wait_s = wait_s
        self._used = 0
        self._cond = threading.Condition()

    @property
    def in_use(self) -> int:
        return self._used

    @contextmanager
    def reserve(self, cost: int, index: int) -> Iterator[None]:
        if cost > self.per_image:
            raise ServiceError(
                ErrorCode.image_too_large,
                f"image {index} would need about {cost // MB} MB to decode; the limit is {self.per_image // MB} MB",
                index=index, estimated_bytes=cost, limit=self.per_image,
            )
        started = time.monotonic()
        with self._cond:
            if not self._cond.wait_for(lambda: self._used + cost <= self.total, timeout=self.wait_s):
                log.warning("decode budget exhausted", extra={"cost": cost, "in_use": self._used,
                                                              "budget": self.total})
                raise ServiceError(
                    ErrorCode.overloaded,
                    f"image {index}: too many large images are being decoded; retry later",
                    index=index, waited_ms=round((time.monotonic() - started) * 1000),
                )
            self._used += cost
        try:
            yield
        finally:
            with self._cond:
                self._used -= cost
                self._cond.notify_all()
