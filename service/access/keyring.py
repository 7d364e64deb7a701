"""Who a request's key names: the secret resolved to a :class:`Principal`, quickly and never stale
for longer than a second.

What the store says about a key id (its StoredKey, or that there is none) is cached for at most
``cache_s`` (FACE_KEY_CACHE_S, at most 1 s): a key revoked on one replica is refused by every replica
sharing the database within that bound, and a request with a cached key touches no database (the
event loop checks it: one SHA-256 and a dict read). Whether the service is in open mode (no key
anywhere) is cached the same way. Last use is recorded in memory and written in one batch every few
seconds (``flush``).

Open mode: no FACE_API_KEY and no key ever stored (a revoked or expired key counts: a service that
once had keys never falls back to open because its keys ran out).

When the database cannot be reached (GalleryUnavailable), the last answer read is used however old,
so what needs no gallery (/embed, /detect, face-vs-face /verify) keeps working through an outage as
it did before keys existed. That is safe: revoking a key, or making the first one, is itself a write
to that database, so nothing can have changed there since (but in the last second before the outage).
A key never read before the outage cannot be checked: 503 ``database_unavailable``.
"""

from __future__ import annotations

import hmac
import threading
import time
from collections.abc import Callable

from ..gallery.api import Galleries, GalleryUnavailable, StoredKey
from .keys import ENV_KEY_ID, hash_secret, key_id_of
from .policy import OPEN, Principal, Role

MISS = object()  # lookup_cached: the store must be asked (in a worker thread)
MAX_CACHE_S = 1.0
MAX_REMEMBERED = 10_000  # key ids remembered; past it those that named no key are forgotten first


class KeyRing:
    def __init__(self, store: Galleries, env_secret: str | None = None, pepper: bytes = b"",
                 cache_s: float = MAX_CACHE_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._env = env_secret.encode() if env_secret else None
        self._pepper = pepper
        self._cache_s = min(cache_s, MAX_CACHE_S)
        self._clock = clock
        self._keys: dict[str, tuple[float, StoredKey | None]] = {}
        self._any_stored: tuple[float, bool] | None = None
        self._used: dict[str, float] = {}
        self._lock = threading.Lock()

    # --- open mode ---------------------------------------------------------------------------
    def open_mode_cached(self) -> bool | None:
        """True/False when known within the bound, None when the store must be asked (open_mode())."""
        if self._env is not None:
            return False
        cached = self._any_stored
        if cached is not None and self._clock() - cached[0] < self._cache_s:
            return not cached[1]
        return None

    def open_mode(self) -> bool:
        known = self.open_mode_cached()
        if known is not None:
            return known
        try:
            any_stored = len(self._store.list_keys()) > 0
        except GalleryUnavailable:
            if self._any_stored is None:
                raise
            return not self._any_stored[1]  # the last answer, however old (module docstring)
        self._any_stored = (self._clock(), any_stored)
        return not any_stored

    def forget(self) -> None:
        """Make what is cached stale (a key was created or revoked on this replica: effective at once
        here); stale answers are still there for an outage."""
        with self._lock:
            self._keys = {key_id: (-self._cache_s, stored) for key_id, (_, stored) in self._keys.items()}
            if self._any_stored is not None:
                self._any_stored = (-self._cache_s, self._any_stored[1])

    # --- keys --------------------------------------------------------------------------------
    def lookup_cached(self, secret: str) -> Principal | None | object:
        """The principal, None for a key that is refused, or MISS when the store must be asked."""
        if self._env is not None and hmac.compare_digest(secret.encode(), self._env):
            return Principal(key_id=ENV_KEY_ID, role=Role.admin, collections=None)
        key_id = key_id_of(secret)
        if key_id is None:
            return None
        cached = self._keys.get(key_id)
        if cached is None or self._clock() - cached[0] >= self._cache_s:
            return MISS
        return self._principal(secret, cached[1])

    def lookup(self, secret: str) -> Principal | None:
        """As lookup_cached, asking the store on a miss (blocking: call it from a worker thread)."""
        found = self.lookup_cached(secret)
        if found is not MISS:
            return found  # type: ignore[return-value]
        key_id = key_id_of(secret)
        assert key_id is not None
        try:
            stored = self._store.get_key(key_id)
        except GalleryUnavailable:
            last = self._keys.get(key_id)
            if last is None:
                raise
            return self._principal(secret, last[1])  # the last answer, however old (module docstring)
        with self._lock:
            if len(self._keys) >= MAX_REMEMBERED:  # a flood of made-up key ids must not grow this forever
                self._keys = {k: v for k, v in self._keys.items() if v[1] is not None}
                if len(self._keys) >= MAX_REMEMBERED:
                    self._keys.clear()
            self._keys[key_id] = (self._clock(), stored)
        return self._principal(secret, stored)

    def _principal(self, secret: str, stored: StoredKey | None) -> Principal | None:
        if stored is None:
            return None
        if not hmac.compare_digest(hash_secret(secret, self._pepper).encode(), stored.secret_hash.encode()):
            return None
        now = time.time()
        if stored.revoked_at is not None or (stored.expires_at is not None and stored.expires_at <= now):
            return None
        self._used[stored.key_id] = now
        return Principal(key_id=stored.key_id, role=Role(stored.role),
                         collections=frozenset(stored.collections) if stored.collections is not None else None,
                         rate_limit_rps=stored.rate_limit_rps, rate_limit_faces_per_s=stored.rate_limit_faces_per_s)

    def flush(self) -> None:
        """Write the last-use times gathered since the previous flush (one write; worker thread)."""
        used, self._used = self._used, {}
        if used:
            self._store.touch_keys(used)


__all__ = ["MISS", "OPEN", "KeyRing"]
