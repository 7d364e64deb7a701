"""Pure ASGI middleware (no BaseHTTPMiddleware overhead on the hot path)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

from .errors import ErrorCode, ServiceError
from .metrics import Metrics

log = logging.getLogger("service.access")


async def send_error(send, error: ServiceError) -> None:
    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
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
    dropped from the batcher's queue instead of being run for nobody. Only after the body has been
    read does a watcher listen for ``http.disconnect``, so it never competes with the handler for
    body messages; once the response has started nothing is cancelled.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body_read = asyncio.Event()
        started = False

        async def tracked_receive():
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_read.set()
            return message

        async def tracked_send(message):
            nonlocal started
            started = True
            await send(message)

        async def watch() -> None:
            await body_read.wait()
            while (await receive())["type"] != "http.disconnect":
                pass

        handler = asyncio.ensure_future(self.app(scope, tracked_receive, tracked_send))
        watcher = asyncio.ensure_future(watch())
        try:
            done, _ = await asyncio.wait({handler, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if handler not in done and not started:
                log.info("client disconnected; request abandoned", extra={"path": scope.get("path")})
                scope["client_disconnected"] = True
                handler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await handler
                return
            await handler
        finally:
            watcher.cancel()
            if not handler.done():
                handler.cancel()


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
