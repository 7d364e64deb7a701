"""Read-your-writes across PostgreSQL standbys: the consistency token of a request.

With standbys (``FACE_DATABASE_READ_URLS``) a write commits on the primary, and a standby applies it
a little later. So after each write the gallery notes the primary's WAL position (an LSN, written
``X/Y`` as PostgreSQL does), and the API returns it in the ``Face-Consistency-Token`` header and a
cookie of the same content. A request that carries the token (header, else cookie) is read from a
standby only once that standby has replayed the position (waiting at most
``FACE_DATABASE_READ_WAIT_MS``), else from the primary: the client sees its own writes through any
service replica. Without a token a read may be up to ``FACE_DATABASE_MAX_LAG_MS`` behind.

A write decided by reads (a rename or merge looks its identities up first, the enroll guard against
duplicates its identity and matches) makes those reads in
:func:`on_primary`: what another client has just written is there, whatever the standbys have applied,
so the write is never refused (404, 409) for a standby's lag.

The token travels from the HTTP layer to the gallery and back in a context variable, which Starlette
copies into the worker thread of each gallery call; the object it holds is shared, so what the
gallery notes there is seen by the middleware when the response starts.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass

HEADER = "Face-Consistency-Token"
COOKIE = "face_consistency_token"
_LSN = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")


def parse_lsn(text: str) -> int:
    """``"16/B374D848"`` -> an integer that orders like the WAL; ValueError if it is not one."""
    match = _LSN.match(text.strip())
    if match is None:
        raise ValueError(f"not a WAL position (X/Y in hexadecimal): {text[:40]!r}")
    return int(match.group(1), 16) << 32 | int(match.group(2), 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


@dataclass
class ReadAfter:
    """One request's consistency: the position its reads must see, and the one its writes reached."""

    required: int | None = None  # from the client's token
    written: int | None = None  # the primary's WAL position after this request's last write

    def floor(self) -> int | None:
        """What a read of this request must see: the client's token, and this request's own writes."""
        known = [v for v in (self.required, self.written) if v is not None]
        return max(known) if known else None


_current: ContextVar[ReadAfter | None] = ContextVar("face_read_after", default=None)


def begin(read_after: ReadAfter) -> Token[ReadAfter | None]:
    return _current.set(read_after)


def end(token: Token[ReadAfter | None]) -> None:
    _current.reset(token)


def required() -> int | None:
    """The WAL position the current request's reads must see (None: any in-rotation standby will do)."""
    current = _current.get()
    return None if current is None else current.floor()


def note_write(lsn: int) -> None:
    current = _current.get()
    if current is not None:
        current.written = lsn if current.written is None else max(current.written, lsn)


_on_primary: ContextVar[bool] = ContextVar("face_reads_on_primary", default=False)


@contextmanager
def on_primary() -> Iterator[None]:
    """The block's reads go to the primary, never to a standby: the lookups that decide a write (in the
    worker thread that runs them: a context variable is not seen by the threads a block starts)."""
    token = _on_primary.set(True)
    try:
        yield
    finally:
        _on_primary.reset(token)


def primary_only() -> bool:
    """Whether the current reads must go to the primary (:func:`on_primary`)."""
    return _on_primary.get()
