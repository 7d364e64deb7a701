"""Connections that never finish asking: uvicorn's HTTP protocol with deadlines for a request's arrival.

uvicorn closes a keep-alive connection that stays idle after a response (``timeout_keep_alive``), but
a connection that opens and sends nothing, sends its request line and headers a byte at a time
(slowloris), or sends its headers and then stops in the middle of the body, is kept for ever: enough
of them use up the process's file descriptors (and a stalled body holds a request open), and then no
client is served. Here a connection is closed when

* its next request has not got all its headers in ``header_timeout_s``, from the connection's opening
  or from its previous response (data trickling in does not extend this);
* its request's headers are in but no part of the body has arrived for ``body_timeout_s`` (a slow but
  steady upload is never cut). The request is dropped: its handler sees the client gone;
* its request line and headers pass ``max_header_bytes``, however the bytes arrive: it is answered 431
  ``headers_too_large`` first (uvicorn's httptools parser keeps headers of any size: a 1 MB header
  value, 10,000 headers).

A request answered before it was all read (413 ``payload_too_large``, 431 ``headers_too_large``: the
answer says ``Connection: close``) does not have its connection closed at once: closing a socket with
unread data makes the kernel send a reset (RST), so a client still sending got a broken pipe or a reset
instead of the answer (and on a real network the reset can drop the answer itself). The connection
sends the answer, shuts its sending side (FIN), then reads and drops what still comes, until the client
closes, or ``DRAIN_MAX_BYTES`` have come, or nothing has for ``min(body_timeout_s, DRAIN_IDLE_S)``, or
``min(header_timeout_s, DRAIN_S)`` have passed since the answer; then it is closed (a client still
sending gets its reset then, its answer received long before). One answered before its body was read
without ``Connection: close`` (a 404, a 405) keeps its connection: the parser reads the rest of the body
and drops it, under the body's deadline, and the next request's headers are counted from where it ends.

A request that has arrived whole is never cut, however long it takes to answer. Each close is
reported (``on_close``: /metrics' ``face_http_connections_closed_total``) with its reason: ``idle`` (no
byte of a request came), ``headers`` (part of them came), ``body``, ``headers_too_large``. The protocol is
uvicorn's own (httptools where installed, else h11) with a few hooks; a request costs two clock reads
and no timer: the connection's one timer re-arms itself only when it fires.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from ..errors import ErrorCode, ServiceError

log = logging.getLogger("service.http")

# the rest of a request answered before it was read (413, 431) is read and dropped for at most so many bytes,
# so long after the answer (at most the headers' deadline) and so long a pause (at most the body's deadline)
DRAIN_MAX_BYTES = 128 * 1024 * 1024
DRAIN_S = 10.0
DRAIN_IDLE_S = 5.0


class _Transport:
    """The connection's transport as uvicorn's protocol sees it: its ``close`` after an answer sent before
    the request's body was all read drains the connection (``_Deadlines._drain``) instead, and the
    connection is closing for it from then on; everything else is the transport's own."""

    def __init__(self, transport: Any, protocol: _Deadlines) -> None:
        self._transport = transport
        self._protocol = protocol
        self.write = transport.write  # (the hot path: no lookup through __getattr__)

    def close(self) -> None:
        self._protocol._close_or_drain()

    def is_closing(self) -> bool:
        return self._protocol._draining or self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _Deadlines:
    """Mixed into uvicorn's protocol class (``connection_made``, ``data_received``,
    ``on_response_complete``, ``connection_lost``, ``shutdown``, ``loop``, ``transport`` and ``cycle`` are its own;
    a cycle's ``more_body`` says whether its request's body is still arriving)."""

    header_timeout_s = 20.0
    body_timeout_s = 60.0
    max_header_bytes = 64 * 1024
    on_close: Callable[[str], None] | None = None  # told the reason of each close (idle, headers, body, ...)
    _timer: asyncio.TimerHandle | None = None
    _waiting_since = 0.0  # when the connection began to wait for its next request's headers
    _heard_at = 0.0  # when data last arrived
    _header_bytes = 0  # bytes of the next request's line and headers received so far (0: none yet, idle)
    _header_tail = b""  # the last 3 of them (the blank line that ends them may span two parts)
    _socket_transport: Any = None  # the transport itself (uvicorn's protocol has a _Transport of it)
    _draining = False  # answered before the body was all read: what comes is read and dropped
    _drained = 0  # bytes dropped so far
    _drain_until = 0.0
    _shutting_down = False

    def connection_made(self, transport: Any) -> None:
        self._socket_transport = transport
        super().connection_made(_Transport(transport, self))  # type: ignore[misc]
        loop = self.loop  # type: ignore[attr-defined]
        self._waiting_since = self._heard_at = loop.time()
        self._timer = loop.call_later(min(self.header_timeout_s, self.body_timeout_s), self._check)

    def data_received(self, data: bytes) -> None:
        self._heard_at = self.loop.time()  # type: ignore[attr-defined]
        if self._draining:
            self._drained += len(data)
            if self._drained > DRAIN_MAX_BYTES:
                self._end_drain("more than DRAIN_MAX_BYTES came")
            return
        if self._awaiting_headers() and not self._headers_fit(data):
            self._refuse_headers()
            return  # (not parsed: the parser would keep them)
        super().data_received(data)  # type: ignore[misc]

    def _headers_fit(self, data: bytes) -> bool:
        """Whether the request line and headers, of which ``data`` is the next part, stay within
        ``max_header_bytes``: counted up to the blank line that ends them (found across the parts), so the
        body that follows in the same bytes is not counted."""
        tail = self._header_tail
        joint = (tail + data[:3]).find(b"\r\n\r\n")  # the blank line across the previous part's end
        if joint >= 0:
            end = joint + 4 - len(tail)
        else:
            found = data.find(b"\r\n\r\n")
            end = -1 if found < 0 else found + 4
        seen = self._header_bytes + (len(data) if end < 0 else end)
        self._header_bytes, self._header_tail = (seen, (tail + data[-3:])[-3:]) if end < 0 else (0, b"")
        return seen <= self.max_header_bytes

    def _awaiting_headers(self) -> bool:
        """Whether the next bytes are a request's line and headers: not while the body of a request
        already answered (a 404 before it was read) is still arriving (the parser drops it)."""
        cycle = getattr(self, "cycle", None)
        return cycle is None or (cycle.response_complete and not cycle.more_body)

    def _refuse_headers(self) -> None:
        transport = self.transport  # type: ignore[attr-defined]
        if transport.is_closing():
            return
        error = ServiceError(ErrorCode.headers_too_large, f"the request line and headers exceed "
                             f"{self.max_header_bytes} bytes", limit=self.max_header_bytes)
        body = json.dumps(error.body()).encode()
        head = [f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}", "content-type: application/json",
                f"content-length: {len(body)}", *(f"{k.lower()}: {v}" for k, v in error.headers.items())]
        transport.write("\r\n".join(head).encode() + b"\r\n\r\n" + body)
        self._drain()  # (closed once what still comes is dropped, as after a 413)
        log.debug("connection closed: headers too large", extra={"client": getattr(self, "client", None),
                                                                 "limit": self.max_header_bytes})
        if self.on_close is not None:
            self.on_close("headers_too_large")

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._waiting_since = self.loop.time()  # type: ignore[attr-defined]
        self._header_bytes, self._header_tail = 0, b""

    def _close_or_drain(self) -> None:
        """uvicorn's protocol closes the connection (``transport.close()``): at once, unless it has just
        answered a request whose body is still arriving (``Connection: close`` after a 413): then the
        connection drains first. Shutting down, the server closes at once."""
        cycle = getattr(self, "cycle", None)
        if (self._draining or self._shutting_down or cycle is None or not cycle.response_complete
                or not cycle.more_body or self._socket_transport.is_closing()):
            self._socket_transport.close()
            return
        self._drain()

    def _drain(self) -> None:
        """Shuts the connection's sending side once the answer is out (the client reads it to its end),
        then reads and drops what still comes (data_received), closing at the first bound (``_check``)."""
        loop = self.loop  # type: ignore[attr-defined]
        transport = self._socket_transport
        self._draining = True
        self._heard_at = now = loop.time()
        self._drain_until = now + min(DRAIN_S, self.header_timeout_s)
        if transport.can_write_eof():  # (not over TLS: the answer is then followed by nothing until the close)
            transport.write_eof()
        transport.resume_reading()  # (uvicorn pauses reading while a body waits for its app)
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_later(min(DRAIN_IDLE_S, self.body_timeout_s, self._drain_until - now), self._check)

    def _end_drain(self, why: str) -> None:
        transport = self._socket_transport
        if not transport.is_closing():
            log.debug(f"connection closed: the rest of a request answered unread was still arriving ({why})",
                      extra={"client": getattr(self, "client", None), "drained_bytes": self._drained})
            transport.close()

    def shutdown(self) -> None:
        self._shutting_down = True
        if self._draining:
            self._socket_transport.close()
            return
        super().shutdown()  # type: ignore[misc]

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)  # type: ignore[misc]

    def _check(self) -> None:
        loop = self.loop  # type: ignore[attr-defined]
        if self._draining:
            now = loop.time()
            quiet = self._heard_at + min(DRAIN_IDLE_S, self.body_timeout_s)
            wait = min(self._drain_until, quiet) - now
            if wait > 0:
                self._timer = loop.call_later(wait, self._check)
            else:
                self._timer = None
                self._end_drain("for too long" if now >= self._drain_until else "paused")
            return
        cycle = getattr(self, "cycle", None)
        if self._awaiting_headers():  # waiting for a request's headers
            # (told by the bytes counted, not by the times: uvloop's clock moves once a loop iteration)
            what = "headers" if self._header_bytes else "idle"
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
            if self.on_close is not None:
                self.on_close(what)


def http_protocol(header_timeout_s: float, body_timeout_s: float, max_header_bytes: int = 64 * 1024,
                  on_close: Callable[[str], None] | None = None) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class (``uvicorn.Config(http=...)``) with the two deadlines and the header
    limit; ``on_close`` is told why ("idle", "headers", "body" or "headers_too_large") at each connection
    they close."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    return type("DeadlineHTTPProtocol", (_Deadlines, AutoHTTPProtocol),
                {"header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s,
                 "max_header_bytes": max_header_bytes,
                 "on_close": staticmethod(on_close) if on_close is not None else None})


def listening_sockets(host: str, port: int) -> list[socket.socket]:
    """The server's sockets, bound to ``host:port`` (every address ``host`` names, as asyncio's
    ``create_server`` binds them) but not yet listening: made before the model is loaded and the gallery
    opened, so that a port in use (or an address not on this host, or a port below 1024 without the
    right) stops the start in a moment, not after a minute's loading. A client connecting meanwhile is
    refused, as if nothing were there. Raises ``OSError`` whose ``strerror`` names what could not be bound."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:  # a host name that does not resolve
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):  # in order, each address once
            try:
                sock = socket.socket(family, kind, proto)
            except OSError:  # a family this host lacks (IPv6 off): asyncio passes over it too
                continue
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # "::" takes IPv6 only; IPv4 has its own socket where named
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                ip, number = socket.getnameinfo(address, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
                shown = f"[{ip}]:{number}" if family == socket.AF_INET6 else f"{ip}:{number}"
                raise OSError(exc.errno, f"cannot listen on {shown}: {exc.strerror}") from None
        if not sockets:
            raise OSError(0, f"cannot listen on {host}:{port}: none of its addresses can be bound here")
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets
