"""Pure ASGI middleware (no BaseHTTPMiddleware overhead on the hot path)."""

from __future__ import annotations

import asyncio
import json
import logging
import time

from .errors import ErrorCode, ServiceError
from .gallery import consistency
from .metrics import Metrics

log = logging.getLogger("service.access")


async def send_error(send, error: ServiceError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """Refuse bodies over the limit: by Content-Length up front, or by counting a streamed body."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = ServiceError(ErrorCode.payload_too_large, f"the request body exceeds {self.max_bytes} bytes",
                                 limit=self.max_bytes)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    if int(value) > self.max_bytes:
                        return await send_error(send, too_large)
                except ValueError:
                    return await send_error(send, ServiceError(ErrorCode.invalid_request, "bad Content-Length"))
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise too_large
            return message

        return await self.app(scope, limited_receive, send)


class DisconnectMiddleware:
    """Cancels a request's handler when its client goes away after sending the whole body.

    A request waiting for the model (or for decode memory) is then abandoned at once: its faces are
    dropped from the batcher's queue instead of being run for nobody. A watcher listens for
    ``http.disconnect`` only once the body has been read (so it never competes with the handler for
    body messages) and cancels the handler's task; once the response has started nothing is
    cancelled. One small task per request with a body, no extra task for the handler.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        task = asyncio.current_task()
        state = {"responding": False, "gone": False}
        watcher: asyncio.Task | None = None

        async def watch() -> None:
            # per ASGI the next message after the whole body is http.disconnect
            if (await receive())["type"] == "http.disconnect" and not state["responding"]:
                state["gone"] = True
                task.cancel()

        async def tracked_receive():
            nonlocal watcher
            message = await receive()
            if watcher is None and message["type"] == "http.request" and not message.get("more_body", False):
                watcher = asyncio.ensure_future(watch())
            return message

        async def tracked_send(message):
            state["responding"] = True
            await send(message)

        try:
            await self.app(scope, tracked_receive, tracked_send)
        except asyncio.CancelledError:
            if not state["gone"]:
                raise  # a real cancellation (shutdown), not ours
            if hasattr(task, "uncancel"):  # 3.11+: this task goes on normally
                task.uncancel()
            scope["client_disconnected"] = True
            log.info("client disconnected; request abandoned", extra={"path": scope.get("path")})
        finally:
            if watcher is not None:
                watcher.cancel()


class AccessMiddleware:
    """Counts and times every request by route template, and logs one structured line for each."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def capture(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            if scope.get("client_disconnected"):
                status = 499  # nginx's code for "client closed the request"; no response was sent
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            elapsed = time.perf_counter() - started
            method = scope.get("method", "")
            self.metrics.requests.labels(path, method, str(status)).inc()
            self.metrics.latency.labels(path, method).observe(elapsed)
            log.info("request", extra={"method": method, "route": path, "status": status,
                                       "ms": round(elapsed * 1000, 2)})


class ConsistencyMiddleware:
    """Read-your-writes across standbys (service.gallery.consistency): takes the client's token from
    the ``Face-Consistency-Token`` header (else its cookie), makes it the floor of the request's
    gallery reads, and returns the newest position (its own write's, else the one it was given) in the
    header and the cookie. A malformed header is refused (invalid_request, 422); a malformed cookie is
    ignored (a browser cannot easily repair one)."""

    def __init__(self, app, cookie_max_age_s: int = 300) -> None:
        self.app = app
        self.cookie_max_age_s = cookie_max_age_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        read_after = consistency.ReadAfter()
        header = consistency.HEADER.lower().encode()
        for name, value in scope.get("headers", []):
            if name == header:
                try:
                    read_after.required = consistency.parse_lsn(value.decode("latin-1"))
                except ValueError as exc:
                    return await send_error(send, ServiceError(
                        ErrorCode.invalid_request, f"bad {consistency.HEADER} header: {exc}", header=consistency.HEADER))
            elif name == b"cookie" and read_after.required is None:
                read_after.required = _cookie_lsn(value.decode("latin-1"))

        async def send_token(message):
            floor = read_after.floor()
            if message["type"] == "http.response.start" and floor is not None:
                token = consistency.format_lsn(floor).encode()
                cookie = (f"{consistency.COOKIE}={token.decode()}; Path=/; Max-Age={self.cookie_max_age_s}; "
                          "HttpOnly; SameSite=Lax").encode()
                message = {**message, "headers": [*message.get("headers", []), (header, token), (b"set-cookie", cookie)]}
            await send(message)

        context_token = consistency.begin(read_after)
        try:
            await self.app(scope, receive, send_token)
        finally:
            consistency.end(context_token)


def _cookie_lsn(cookies: str) -> int | None:
    for part in cookies.split(";"):
        name, _, value = part.strip().partition("=")
        if name == consistency.COOKIE:
            try:
                return consistency.parse_lsn(value)
            except ValueError:
                return None
    return None
