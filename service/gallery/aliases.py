"""Aliases as a replica sees them: the map of alias -> collection, read from the backend at most every
``cache_s`` (FACE_ALIAS_CACHE_S, at most 1 s), so a re-point made on any replica (or by the CLI) is
followed by every replica within that bound, and a request through an alias costs a dict read.

The backend keeps the truth (:meth:`service.gallery.api.Galleries.set_alias`: one atomic write). A
request resolves its ``{collection}`` once (http/deps.py), so it is served by one collection from
start to end: during a re-point each request is answered by the old target or by the new one.

When the database cannot be reached, the last map read is used however old (as the key ring does):
a re-point is itself a write to that database, so nothing can have changed there since.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from .api import Galleries, GalleryUnavailable

MAX_CACHE_S = 1.0


class AliasMap:
    def __init__(self, galleries: Galleries, cache_s: float = MAX_CACHE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._galleries = galleries
        self._cache_s = min(cache_s, MAX_CACHE_S)
        self._clock = clock
        self._read: tuple[float, dict[str, str]] | None = None  # (when read, alias -> collection)
        self._refresh = threading.Lock()  # one reader at a time: the others wait and take its map

    def cached(self) -> dict[str, str] | None:
        """The map if read within the bound, else None (then call :meth:`current` in a worker thread)."""
        read = self._read
        if read is not None and self._clock() - read[0] < self._cache_s:
            return read[1]
        return None

    def current(self) -> dict[str, str]:
        """The map, read again if older than the bound (blocking)."""
        with self._refresh:
            known = self.cached()
            if known is not None:
                return known
            started = self._clock()
            try:
                aliases = {a.name: a.collection for a in self._galleries.list_aliases()}
            except GalleryUnavailable:
                if self._read is None:
                    raise
                return self._read[1]  # the last map, however old (module docstring)
            self._read = (started, aliases)  # as of the read's start: never trusted past the bound
            return aliases

    def resolve(self, name: str) -> str:
        """The collection ``name`` means here (an alias's target, else ``name`` itself)."""
        return self.current().get(name, name)

    def forget(self) -> None:
        """An alias was set or deleted on this replica: read the map again on the next request."""
        read = self._read
        if read is not None:
            self._read = (-self._cache_s, read[1])


__all__ = ["MAX_CACHE_S", "AliasMap"]
