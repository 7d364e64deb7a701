"""Process memory: keep freed decode buffers from piling up in glibc's per-thread arenas.

glibc gives each thread that allocates its own malloc arena (up to 8 per core) and returns freed
memory from those arenas to the system only partly. Image decodes run in many worker threads, each
allocating and freeing tens of MB, so with the default the process keeps roughly (threads x largest
decode) resident: sixteen 40 Mpx decodes, one at a time but each on another thread, grew RSS by
~900 MB; with two arenas, by ~200 MB. The decode budget (``decode_budget``) bounds what is in use;
this bounds what is kept after.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # from glibc's malloc.h


def limit_malloc_arenas(arenas: int) -> bool:
    """At most ``arenas`` malloc arenas (0: glibc's default). True when applied; False where the C
    library has no mallopt (musl, macOS): then nothing changes."""
    if arenas <= 0:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        applied = bool(libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        applied = False
    log.debug("malloc arenas", extra={"arenas": arenas, "applied": applied})
    return applied
