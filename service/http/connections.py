"""Connections that never finish asking: uvicorn's HTTP protocol with deadlines for a request's arrival.

uvicorn closes a keep-alive connection that stays idle after a response (``timeout_keep_alive``), but
a connection that opens and sends nothing, sends its request line and headers a byte at a time
(slowloris), or sends its headers and then stops in the middle of the body, is kept for ever: enough
of them use up the process's file descriptors (and a stalled body holds a request open), and then no
client is served. Here a connection is closed when

* its next request has not got all its headers in ``header_timeout_s``, from the connection's opening
  or from its previous response (data trickling in does not extend this);
* its request's headers are in but no part of the body has arrived for ``body_timeout_s`` (a slow but
  steady upload is never cut). The request is dropped: its handler sees the client gone.

A request that has arrived whole is never cut, however long it takes to answer. Each close is
reported (``on_timeout``: /metrics' ``face_http_connections_timed_out_total``) by what was missing:
``idle`` (no byte of a request came), ``headers`` (part of them came), ``body``. The protocol is
uvicorn's own (httptools where installed, else h11) with a few hooks; a request costs two clock reads
and no timer: the connection's one timer re-arms itself only when it fires.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("service.http")


class _Deadlines:
    """Mixed into uvicorn's protocol class (``connection_made``, ``data_received``,
    ``on_response_complete``, ``connection_lost``, ``loop``, ``transport`` and ``cycle`` are its own;
    a cycle's ``more_body`` says whether its request's body is still arriving)."""

    header_timeout_s = 20.0
    body_timeout_s = 60.0
    on_timeout: Callable[[str], None] | None = None  # told "idle", "headers" or "body" at each close
    _timer: asyncio.TimerHandle | None = None
    _waiting_since = 0.0  # when the connection began to wait for its next request's headers
    _heard_at = 0.0  # when data last arrived
    _heard_since_wait = False  # whether data arrived since the wait for the next request began

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        loop = self.loop  # type: ignore[attr-defined]
        self._waiting_since = self._heard_at = loop.time()
        self._timer = loop.call_later(min(self.header_timeout_s, self.body_timeout_s), self._check)

    def data_received(self, data: bytes) -> None:
        self._heard_at = self.loop.time()  # type: ignore[attr-defined]
        self._heard_since_wait = True  # (not from the times: uvloop's clock moves once a loop iteration)
        super().data_received(data)  # type: ignore[misc]

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._waiting_since = self.loop.time()  # type: ignore[attr-defined]
        self._heard_since_wait = False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)  # type: ignore[misc]

    def _check(self) -> None:
        loop = self.loop  # type: ignore[attr-defined]
        cycle = getattr(self, "cycle", None)
        if cycle is None or cycle.response_complete:  # waiting for a request's headers
            what = "headers" if self._heard_since_wait else "idle"
            wait = self._waiting_since + self.header_timeout_s - loop.time()
        elif cycle.more_body:  # headers in, the body still arriving
            wait, what = self._heard_at + self.body_timeout_s - loop.time(), "body"
        else:  # the request is whole: it is being handled, its response restarts the wait
            wait, what = self.header_timeout_s, ""
        if wait > 0:
            self._timer = loop.call_later(wait, self._check)
            return
        self._timer = None
        transport = self.transport  # type: ignore[attr-defined]
        if not transport.is_closing():
            log.debug("connection closed: no request arrived in time" if what == "idle" else
                      f"connection closed: the request's {what} did not arrive in time",
                      extra={"client": getattr(self, "client", None), "part": what,
                             "timeout_s": self.body_timeout_s if what == "body" else self.header_timeout_s})
            transport.close()
            if self.on_timeout is not None:
                self.on_timeout(what)


def http_protocol(header_timeout_s: float, body_timeout_s: float,
                  on_timeout: Callable[[str], None] | None = None) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class (``uvicorn.Config(http=...)``) with the two deadlines; ``on_timeout``
    is told what was missing ("idle", "headers" or "body") at each connection they close."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    return type("DeadlineHTTPProtocol", (_Deadlines, AutoHTTPProtocol),
                {"header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s,
                 "on_timeout": staticmethod(on_timeout) if on_timeout is not None else None})
