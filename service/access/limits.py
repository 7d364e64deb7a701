"""Rate limits: requests and faces per second, per key (per client address in open mode).

Token buckets: a subject may spend ``rate`` tokens a second with bursts of up to ``rate * burst_s``
(at least one). Past it the request gets 429 ``rate_limited`` with ``Retry-After`` (seconds until a
token is back) and nothing else runs. Requests are charged when the key is checked, faces when the
body has been counted (before any image is decoded). The buckets live in this replica's memory: with
N replicas behind a balancer a key may reach N times its limit (the README says so). They are only
touched from the event loop, so they need no lock.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import ErrorCode, ServiceError

IDLE_DROP_S = 60.0  # a bucket unused this long is full again: forgotten (bounds memory in open mode)
MIN_RATE = 0.001  # per second (one in ~17 min): a key's own limit is at least this, or it never works again
MAX_RATE = 1e6
MAX_RETRY_AFTER_S = 86_400  # Retry-After says at most a day (a rate below MIN_RATE, stored before it was one)


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass
class RateLimiter:
    """One kind of budget (requests, or faces) for every subject."""

    what: str  # "requests" or "faces", for the error message
    rate: float  # per second; 0: no limit
    burst_s: float = 1.0
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, _Bucket] = field(default_factory=dict)
    _last_sweep: float = 0.0

    def charge(self, subject: str, amount: float = 1.0, rate: float | None = None) -> float | None:
        """Take ``amount`` tokens: None when allowed, else the seconds to wait (nothing is taken).
        ``rate`` overrides the limiter's (a key's own limit)."""
        rate = self.rate if rate is None else rate
        if rate <= 0:
            return None
        now = self.clock()
        capacity = max(1.0, rate * self.burst_s, amount)
        bucket = self._buckets.get(subject)
        if bucket is None:
            bucket = self._buckets[subject] = _Bucket(capacity, now)
        else:
            bucket.tokens = min(capacity, bucket.tokens + (now - bucket.at) * rate)
            bucket.at = now
        if now - self._last_sweep > IDLE_DROP_S:
            self._sweep(now)
        if bucket.tokens >= amount:
            bucket.tokens -= amount
            return None
        return (amount - bucket.tokens) / rate

    def _sweep(self, now: float) -> None:
        self._last_sweep = now
        for subject in [s for s, b in self._buckets.items() if now - b.at > IDLE_DROP_S]:
            del self._buckets[subject]

    def refuse(self, wait_s: float, subject_name: str) -> ServiceError:
        wait_s = min(wait_s, MAX_RETRY_AFTER_S)  # (a tiny rate waits longer than a float: inf)
        return ServiceError(ErrorCode.rate_limited, f"too many {self.what} for {subject_name}: retry in "
                            f"{math.ceil(wait_s)} s", retry_after_s=wait_s, limit=self.what)


@dataclass
class Limits:
    requests: RateLimiter
    faces: RateLimiter

    @classmethod
    def from_rates(cls, requests_per_s: float, faces_per_s: float, burst_s: float = 1.0) -> Limits:
        return cls(RateLimiter("requests", requests_per_s, burst_s), RateLimiter("faces", faces_per_s, burst_s))
