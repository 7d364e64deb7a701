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
* its request line and headers pass ``max_header_bytes``, however the bytes arrive and wherever they
  fall (after an early answer, pipelined behind a request being answered: then after its answer): it
  is answered 431 ``headers_too_large`` first (uvicorn's httptools parser keeps headers of any size: a
  1 MB header value, 10,000 headers). The bytes in the read that ends a body are not counted (at most
  one read more);
* reads of a chunked body that hold no body byte (its chunk extensions, its trailer, which the parser
  keeps at any size) pass ``max_header_bytes`` in a row: closed at once (its handler sees the client
  gone). Trailer fields are dropped: they never join the request's headers (a second Host, an API key).

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

The framing is the parser's, told by its callbacks, and one way only: a request the parser refuses (a
Content-Length given twice, or with Transfer-Encoding: request smuggling) is answered 422
``invalid_request`` after the answers before it (uvicorn wrote its plain 400 at once, into an answer in
progress, and closed), or at once when it is the body of the request being handled (which is dropped),
then drained as above; so is a request naming two Hosts (the host check read one,
the app the other), and one asking to switch protocols (``Upgrade``) with a body, which the parser would
otherwise take to have none and parse the body as the next request: smuggled past a proxy that forwards
``Upgrade``. One without a body is answered as a plain request (nothing is upgraded to) and closes the
connection, nothing after it parsed. A target in absolute form (``http://host/path``) names the request's
host (RFC 9112), for the host check too. A client's end of its sending side (FIN) is taken as the client
gone, as uvicorn and nginx take it: its requests are abandoned (service.http.middleware's
DisconnectMiddleware: a request waiting for the model is not computed for nobody), so a client that only
half-closes after its request gets no answer (it cannot be told from one that left, and leaving is common).

A request that has arrived whole is never cut, however long it takes to answer, and a body the server
itself has stopped reading (a request pipelined behind one being answered) is not held to the body's
deadline. Each close is reported (``on_close``: /metrics' ``face_http_connections_closed_total``) with
its reason: ``idle`` (no byte of a request came), ``headers`` (part of them came), ``body``,
``headers_too_large``, ``invalid`` (refused by the parser, or as above). The protocol is uvicorn's
httptools one with a few hooks; a request costs two clock reads and no timer: the connection's one
timer re-arms itself only when it fires.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import httptools

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


REFUSED_ON_THE_WIRE = "face.refused_on_the_wire"  # a request's scope key: the refusal it was answered with here


class _Refused(Exception):
    """Raised by a parser callback to stop the parse of a request refused on the wire (``_Deadlines._refusal``)."""


class _Deadlines:
    """Mixed into uvicorn's httptools protocol class (``connection_made``, ``data_received``, the parser's
    callbacks ``on_message_begin`` ... ``on_message_complete``, ``on_response_complete``,
    ``connection_lost``, ``shutdown``, ``loop``, ``transport``, ``parser``, ``flow``, ``pipeline``, ``scheme``
    and ``cycle`` are its own). Where the parser is in the byte stream is told by its callbacks, not by
    uvicorn's per-request flags (a request answered before its body ended keeps ``more_body`` set)."""

    header_timeout_s = 20.0
    body_timeout_s = 60.0
    max_header_bytes = 64 * 1024
    on_close: Callable[[str], None] | None = None  # told the reason of each close (idle, headers, body, ...)
    _timer: asyncio.TimerHandle | None = None
    _waiting_since = 0.0  # when the connection began to wait for its next request's headers
    _heard_at = 0.0  # when data last arrived
    _header_bytes = 0  # bytes of the next request's line and headers received so far (0: none yet, idle)
    _header_tail = b""  # the last 3 of them (the blank line that ends them may span two parts)
    _begun = False  # the parser has begun a request it has not ended (its line, headers or body)
    _in_body = False  # ... and is in its body: past its headers, before its end
    _body_bytes = 0  # body bytes the parser has given (all requests)
    _framing = 0  # bytes of the current body's reads in a row that held no body byte (extensions, trailer)
    _refusal: ServiceError | None = None  # the request refused on the wire, with why (set by a callback)
    _held: tuple[ServiceError, str] | None = None  # a refusal sent once the requests before it are answered
    _upgraded = False  # a request asked to switch protocols: nothing after its headers is parsed
    _ended = False  # a request ended in the read being parsed
    _running: Any = None  # the request whose handler was started last (uvicorn's cycle)
    _write_paused_at: float | None = None  # when the transport's buffer last filled (the client not reading)
    _socket_transport: Any = None  # the transport itself (uvicorn's protocol has a _Transport of it)
    _draining = False  # answered before the body was all read: what comes is read and dropped
    _drained = 0  # bytes dropped so far
    _drain_until = 0.0
    _shutting_down = False

    def connection_made(self, transport: Any) -> None:
        self._socket_transport = transport
        super().connection_made(_Transport(transport, self))  # type: ignore[misc]
        flow = self.flow  # type: ignore[attr-defined]
        resume = flow.resume_reading

        def resume_unless_queued() -> None:  # (uvicorn resumes at each answer and each body read: a client
            if not self.pipeline and self._held is None:  # type: ignore[attr-defined]  # pipelining without
                resume()  # reading its answers had one more read parsed and queued each time: memory without bound)

        flow.resume_reading = resume_unless_queued
        loop = self.loop  # type: ignore[attr-defined]
        self._waiting_since = self._heard_at = loop.time()
        self._timer = loop.call_later(min(self.header_timeout_s, self.body_timeout_s), self._check)

    def data_received(self, data: bytes) -> None:
        """uvicorn's own, but: header bytes are counted (431 past ``max_header_bytes``), a chunked body's
        reads without a body byte too (extensions, a trailer: the parser keeps a trailer of any size), a request the
        parser refuses gets a coded answer after the requests before it (uvicorn wrote its 400 at once,
        into the answer in progress, and closed), and nothing after an upgrade request is parsed."""
        self._heard_at = self.loop.time()  # type: ignore[attr-defined]
        if self._draining:
            self._drained += len(data)
            if self._drained > DRAIN_MAX_BYTES:
                self._end_drain("more than DRAIN_MAX_BYTES came")
            return
        if self._held is not None or self._upgraded:
            return  # (what follows a refused request, or one that asked for another protocol, is not parsed)
        in_body, body_bytes = self._in_body, self._body_bytes
        if not in_body and not self._headers_fit(data):
            self._refuse(ServiceError(ErrorCode.headers_too_large, f"the request line and headers exceed "
                                      f"{self.max_header_bytes} bytes", limit=self.max_header_bytes),
                         "headers_too_large")
            return  # (not parsed: the parser would keep them)
        self._unset_keepalive_if_required()  # type: ignore[attr-defined]
        self._ended = False
        try:
            self.parser.feed_data(data)  # type: ignore[attr-defined]
        except httptools.HttpParserUpgrade:
            self._upgraded = True  # (its request, if it had no body, is answered; its answer closes the connection)
        except httptools.HttpParserError as exc:
            refusal, self._refusal = self._refusal, None
            error = refusal or ServiceError(ErrorCode.invalid_request, f"malformed HTTP request: {exc}")
            cycle = self.cycle  # type: ignore[attr-defined]
            if refusal is None and self._in_body and not cycle.response_complete:  # in the body of a request made
                if cycle is self._running:
                    self._refuse_now(error)  # (its handler waits for a body that will never be parsed)
                    return
                queued = self.pipeline  # type: ignore[attr-defined]
                if queued and queued[0][0] is cycle:  # (queued behind others: never started; answered in its turn)
                    queued.popleft()
                    cycle.response_complete = cycle.disconnected = True
            self._refuse(error, "invalid")
            return
        if self._ended and not self._in_body:  # a request ended in this read, the next one's headers may have begun
            self._header_tail = data[-3:]  # (where its blank line may start; its bytes in this read are not counted)
        if in_body and self._in_body:  # still in that body: reads of its framing alone (extensions, trailer)
            self._framing = 0 if self._body_bytes > body_bytes else self._framing + len(data)
            if self._framing > self.max_header_bytes:
                self._cut("a body's framing (chunk extensions, trailer) exceeds the header limit",
                          "headers_too_large")

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

    # the parser's callbacks (httptools calls the protocol's methods)

    def on_message_begin(self) -> None:
        self._begun = True
        super().on_message_begin()  # type: ignore[misc]

    def on_headers_complete(self) -> None:
        self._header_bytes, self._header_tail = 0, b""
        headers = self.headers  # type: ignore[attr-defined]
        upgrade = self.parser.should_upgrade()  # type: ignore[attr-defined]
        hosts = [value for name, value in headers if name == b"host"]
        if len(hosts) > 1:
            self._refusal = ServiceError(ErrorCode.invalid_request, "a request may name one Host, not several")
            raise _Refused
        if upgrade and any(name == b"transfer-encoding" or (name == b"content-length" and value.strip(b" \t0"))
                           for name, value in headers):
            # (the parser would take the body for the next requests: a request smuggled past a proxy)
            self._refusal = ServiceError(ErrorCode.invalid_request, "a request that asks to switch protocols "
                                         "(Upgrade) may not carry a body: this service speaks HTTP/1.1 only")
            raise _Refused
        self._in_body, self._framing = True, 0  # (a request refused above has no body of its own to read)
        authority = _absolute_form_authority(self.url)  # type: ignore[attr-defined]
        if authority is not None:  # the target's authority is the request's host, whatever Host says (RFC 9112)
            headers[:] = [(name, value) for name, value in headers if name != b"host"] + [(b"host", authority)]
        super().on_headers_complete()  # type: ignore[misc]
        if upgrade:  # answered as a plain request (nothing is upgraded to), then the connection is closed
            self.cycle.keep_alive = False  # type: ignore[attr-defined]

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_body:  # a trailer field (after a chunked body): dropped, never one of the request's headers
            return  # (uvicorn appended it to the headers the app had already been given: a second Host...)
        super().on_header(name, value)  # type: ignore[misc]

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        super().on_body(body)  # type: ignore[misc]

    def on_message_complete(self) -> None:
        self._begun = self._in_body = False
        self._ended = True
        cycle = self.cycle  # type: ignore[attr-defined]
        if cycle.response_complete:  # answered before its body ended: the wait for the next starts now
            self._waiting_since = self.loop.time()  # type: ignore[attr-defined]
        super().on_message_complete()  # type: ignore[misc]

    def _should_upgrade(self) -> bool:
        return False  # (no route speaks another protocol: an upgrade request is answered as a plain one)

    def _unsupported_upgrade_warning(self) -> None:
        log.debug("upgrade request answered as a plain HTTP/1.1 request", extra={"client": getattr(self, "client", None)})

    # refusals, drains and closes

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        self._running = cycle  # (uvicorn starts a request's handler here: at once, or when its turn comes)
        super()._start_asgi_task(cycle, app)  # type: ignore[misc]

    def _owed(self) -> bool:
        """Whether answers are owed on the connection: the request being handled, or ones queued behind it."""
        running = self._running
        return (running is not None and not running.response_complete) or bool(self.pipeline)  # type: ignore[attr-defined]

    def _refuse(self, error: ServiceError, reason: str) -> None:
        """Answers ``error`` with ``Connection: close`` once every request before it is answered (until
        then nothing more is read: uvicorn holds the pipelined ones), then drains and closes."""
        if self._owed():
            self._held = (error, reason)
            self.flow.pause_reading()  # type: ignore[attr-defined]
            return
        transport = self.transport  # type: ignore[attr-defined]
        if transport.is_closing():
            return
        body = json.dumps(error.body()).encode()
        head = [f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}", "content-type: application/json",
                f"content-length: {len(body)}", "connection: close",
                *(f"{k.lower()}: {v}" for k, v in error.headers.items())]
        transport.write("\r\n".join(head).encode() + b"\r\n\r\n" + body)
        self._drain()  # (closed once what still comes is dropped, as after a 413)
        log.debug(f"connection closed: {error.code.value}", extra={"client": getattr(self, "client", None),
                                                                    "detail": error.message})
        if self.on_close is not None:
            self.on_close(reason)

    def _refuse_now(self, error: ServiceError) -> None:
        """A request being handled whose body the parser refuses (a malformed chunk): its handler is told its
        client is gone (it waits for the rest of the body) and the refusal is answered now, unless the
        handler has begun its own answer (then the connection is closed)."""
        cycle = self.cycle  # type: ignore[attr-defined]
        started = cycle.response_started
        cycle.disconnected = True  # (what it still sends is dropped)
        cycle.scope[REFUSED_ON_THE_WIRE] = error  # (its handler's end is logged and counted as this refusal)
        cycle.message_event.set()
        if started:
            self._cut(f"{error.code.value}: {error.message}", "invalid")
            return
        cycle.response_complete = True  # (its answer is this refusal)
        self._refuse(error, "invalid")

    def _cut(self, why: str, reason: str) -> None:
        """Closes the connection at once (its request, being handled, sees its client gone)."""
        if not self._socket_transport.is_closing():
            log.debug(f"connection closed: {why}", extra={"client": getattr(self, "client", None)})
            self._socket_transport.close()
            if self.on_close is not None:
                self.on_close(reason)

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if self._in_body:  # (answered before its body ended: the body's deadline, not uvicorn's keep-alive timer)
            self._unset_keepalive_if_required()  # type: ignore[attr-defined]
        self._waiting_since = self.loop.time()  # type: ignore[attr-defined]
        if self._held is not None and not self._owed():
            (error, reason), self._held = self._held, None
            self._refuse(error, reason)

    def pause_writing(self) -> None:
        self._write_paused_at = self.loop.time()  # type: ignore[attr-defined]
        super().pause_writing()  # type: ignore[misc]

    def resume_writing(self) -> None:
        self._write_paused_at = None
        super().resume_writing()  # type: ignore[misc]

    def _close_or_drain(self) -> None:
        """uvicorn's protocol closes the connection (``transport.close()``): at once, unless it has just
        answered a request whose body is still arriving (``Connection: close`` after a 413): then the
        connection drains first. Shutting down, the server closes at once."""
        cycle = getattr(self, "cycle", None)
        if (self._draining or self._shutting_down or cycle is None or not cycle.response_complete
                or not self._in_body or self._socket_transport.is_closing()):
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
        running = self._running
        if running is not None and not running.response_complete:  # (uvicorn tells only the last request parsed,
            running.disconnected = True  # which is not the one being handled when others are pipelined: that
            running.message_event.set()  # one then wrote into the closed transport, a RuntimeError and a 500)
        super().connection_lost(exc)  # type: ignore[misc]

    def _check(self) -> None:
        loop = self.loop  # type: ignore[attr-defined]
        now = loop.time()
        if self._draining:
            quiet = self._heard_at + min(DRAIN_IDLE_S, self.body_timeout_s)
            wait = min(self._drain_until, quiet) - now
            if wait > 0:
                self._timer = loop.call_later(wait, self._check)
            else:
                self._timer = None
                self._end_drain("for too long" if now >= self._drain_until else "paused")
            return
        queued, held = bool(self.pipeline), self._held is not None  # type: ignore[attr-defined]
        if not self._in_body and not held and not self._owed():  # waiting for a request's headers
            what = "headers" if self._begun or self._header_bytes else "idle"
            wait = self._waiting_since + self.header_timeout_s - now
        elif self._in_body and not held and not queued and not self.flow.read_paused:  # type: ignore[attr-defined]
            wait, what = self._heard_at + self.body_timeout_s - now, "body"  # the body arriving, read as it comes
        else:  # requests being answered, the bytes after them held back: the last response restarts the wait
            if self._in_body:  # (the server is not reading that body: its client is not stalling)
                self._heard_at = now
            wait, what = self.header_timeout_s, ""
            if self._write_paused_at is not None:  # an answer waits for its client to read: so long at most
                wait, what = min(wait, self._write_paused_at + self.body_timeout_s - now), "write"
        if wait > 0:
            self._timer = loop.call_later(wait, self._check)
            return
        self._timer = None
        if what == "write":  # (closed with its answers unsent: a close would wait to send them first)
            if not self._socket_transport.is_closing():
                log.debug("connection closed: its client read no answer in time",
                          extra={"client": getattr(self, "client", None), "timeout_s": self.body_timeout_s})
                self._socket_transport.abort()
                if self.on_close is not None:
                    self.on_close(what)
            return
        transport = self.transport  # type: ignore[attr-defined]
        if not transport.is_closing():
            log.debug("connection closed: no request arrived in time" if what == "idle" else
                      f"connection closed: the request's {what} did not arrive in time",
                      extra={"client": getattr(self, "client", None), "part": what,
                             "timeout_s": self.body_timeout_s if what == "body" else self.header_timeout_s})
            transport.close()
            if self.on_close is not None:
                self.on_close(what)


def _absolute_form_authority(target: bytes) -> bytes | None:
    """The authority of a request target in absolute form (``http://host:port/path``), without user
    info; None for the origin form (``/path``)."""
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        return None
    authority = rest.split(b"/", 1)[0].split(b"?", 1)[0].split(b"#", 1)[0]
    return authority.rpartition(b"@")[2]


def http_protocol(header_timeout_s: float, body_timeout_s: float, max_header_bytes: int = 64 * 1024,
                  on_close: Callable[[str], None] | None = None) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class (``uvicorn.Config(http=...)``) with the two deadlines and the header
    limit; ``on_close`` is told why ("idle", "headers", "body", "headers_too_large" or "invalid") at each connection
    they close."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol  # (uvicorn[standard] brings httptools)

    return type("DeadlineHTTPProtocol", (_Deadlines, HttpToolsProtocol),
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
