"""Pure ASGI middleware (no BaseHTTPMiddleware overhead on the hot path)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import time
import uuid

from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from ..errors import ErrorCode, ServiceError
from ..gallery.postgres import consistency
from ..ops.metrics import Metrics

log = logging.getLogger("service.access")


def record_error(scope, code: ErrorCode) -> None:
    """The code of the error a request was answered with, for its access log line and face_errors_total
    (AccessMiddleware reads it): whoever answers, a route's handler or a middleware."""
    scope.setdefault("state", {})["error_code"] = code.value


async def send_error(scope, send, error: ServiceError) -> None:
    record_error(scope, error.code)
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ForwardedMiddleware:
    """A request whose peer is one of FACE_TRUSTED_PROXIES comes from the address its X-Forwarded-For names,
    over the scheme its X-Forwarded-Proto names, as uvicorn's ProxyHeadersMiddleware reads them: the rightmost
    address that is not itself a trusted proxy's (each proxy appends the peer it was sent from; what is left
    of that is the client's own claim). uvicorn takes that entry whatever it holds: one that is no IP address
    (text a client wrote there and a proxy passed on, an IPv6 zone, ``unknown``) is not believed, the peer
    stays the client, so the audit trail and open mode's rate limits never key on what a sender wrote. The
    address is kept in one spelling (a rate limit counts per address). Not installed without trusted
    proxies: then no forwarding header is read (``python -m service`` turns uvicorn's own reading off)."""

    def __init__(self, app, trusted_proxies: list[str]) -> None:
        self.app = app
        self.forwarded = ProxyHeadersMiddleware(self._checked, trusted_hosts=trusted_proxies)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope["peer"] = scope.get("client")
        await self.forwarded(scope, receive, send)

    async def _checked(self, scope, receive, send):
        peer, client = scope.pop("peer"), scope.get("client")
        if client is not None and client != peer:
            address = forwarded_address(client[0])
            scope["client"] = (address, client[1]) if address is not None else peer
        await self.app(scope, receive, send)


def forwarded_address(value: str) -> str | None:
    """``value`` as an IP address in its one spelling (IPv4 for IPv4-mapped IPv6), or None when it is none."""
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id is not None:  # fe80::1%<anything>: the zone is free text
            return None
        ip = ip.ipv4_mapped or ip
    return str(ip)


class BodyLimitMiddleware:
    """Refuse bodies over the limit: by Content-Length up front, or by counting a streamed body."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    if int(value) > self.max_bytes:
                        return await send_error(scope, send, self._too_large())
                except ValueError:
                    return await send_error(scope, send, ServiceError(ErrorCode.invalid_request, "bad Content-Length"))
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large()
            return message

        return await self.app(scope, limited_receive, send)

    def _too_large(self) -> ServiceError:
        return ServiceError(ErrorCode.payload_too_large, f"the request body exceeds {self.max_bytes} bytes",
                            limit=self.max_bytes)


class StartupRefusalMiddleware:
    """A start-up the lifespan refused for a reason the operator can fix (no GPU, a locked data dir, a
    model file or a database that is not there: ``app.STARTUP_REFUSALS``) was logged by the lifespan as
    one line, ``could not start: ...``. This drops the traceback Starlette sends with the failure, which
    uvicorn would log whole after it; any other failure keeps its traceback."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "lifespan":
            return await self.app(scope, receive, send)

        async def quiet_send(message):
            if message["type"] == "lifespan.startup.failed" and getattr(scope["app"].state, "startup_refused", None):
                message = {**message, "message": ""}
            await send(message)

        return await self.app(scope, receive, quiet_send)


class HeadMiddleware:
    """HEAD is GET without the body (RFC 9110 9.3.2): the request is routed, checked and answered as
    its GET, and the answer's body is dropped (its headers, Content-Length included, kept). FastAPI's
    routes take only the methods they declare, so without this HEAD /healthz was a 405, and HEAD of a
    GET route under a mount (/console/config.json) the mount's 404. The ASGI server still sees HEAD."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def bodiless_send(message):
            if message["type"] == "http.response.body" and message.get("body"):
                message = {**message, "body": b""}
            await send(message)

        return await self.app({**scope, "method": "GET"}, receive, bodiless_send)


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


_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def request_id_of(scope) -> str:
    """The client's X-Request-ID when it is a sane token (a proxy's or the client's own), else a new one."""
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if _REQUEST_ID.fullmatch(text):
                return text
            break
    return uuid.uuid4().hex


NOSNIFF = (b"x-content-type-options", b"nosniff")
NO_STORE = (b"cache-control", b"no-store")
HSTS = (b"strict-transport-security", b"max-age=31536000")  # a year; this host only (no includeSubDomains)


class AccessMiddleware:
    """Counts and times every request by route template, logs one structured line for each, and gives
    each its request id (X-Request-ID, echoed in the answer; audit records and the log carry it).

    Every answer also carries ``X-Content-Type-Options: nosniff`` (a browser never runs a JSON body as
    something else), ``Cache-Control: no-store`` unless the route set its own (identities, metadata and
    embeddings are biometric data: no proxy or browser cache keeps them; ``X-API-Key`` is not the
    ``Authorization`` header shared caches already leave alone), and, when the service itself speaks
    HTTPS (``hsts``), ``Strict-Transport-Security``."""

    def __init__(self, app, metrics: Metrics, hsts: bool = False) -> None:
        self.app = app
        self.metrics = metrics
        self.always = (NOSNIFF, NO_STORE, HSTS) if hsts else (NOSNIFF, NO_STORE)  # each unless the route set it

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500
        request_id = request_id_of(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        header = (b"x-request-id", request_id.encode())

        async def capture(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", ()), header]
                named = {name.lower() for name, _ in headers}
                message["headers"] = headers + [h for h in self.always if h[0] not in named]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        except Exception:  # answered 500 internal_error outside this middleware (Starlette's ServerErrorMiddleware)
            scope["state"].setdefault("error_code", ErrorCode.internal_error.value)
            raise
        finally:
            if scope.get("client_disconnected"):
                status = 499  # nginx's code for "client closed the request"; no response was sent
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            elapsed = time.perf_counter() - started
            method = scope.get("method", "")
            self.metrics.observe_request(path, method, status, elapsed)
            state = scope["state"]
            fields = {"method": method, "route": path, "status": status, "ms": round(elapsed * 1000, 2),
                      "request_id": request_id, "key_id": getattr(state.get("principal"), "key_id", None)}
            code = state.get("error_code")
            if code is not None:
                self.metrics.errors.labels(code).inc()
                fields["error"] = code
            log.info("request", extra=fields)


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_READ = frozenset({b"host", b"origin", b"sec-fetch-site", b"access-control-request-method"})
CORS_METHODS = "GET, POST, DELETE"


def split_host(value: str) -> tuple[str, str | None]:
    """``host[:port]`` of a Host header, or of an origin's netloc: (lowercase host without brackets or
    a trailing dot, port or None)."""
    value = value.strip().lower()
    if value.startswith("["):  # [v6]:port
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
    elif value.count(":") == 1:
        host, port = value.split(":")
    else:
        host, port = value, None
    return host.rstrip("."), port or None


def host_allowed(host: str, allowed: list[str]) -> bool:
    for pattern in allowed:
        if pattern == "*" or host == pattern:
            return True
        if pattern.startswith("*.") and host.endswith(pattern[1:]):
            return True
    return False


def _same_origin(origin: str, host_header: str) -> bool:
    """The Origin header names the host and port this request was sent to (scheme aside: a proxy may
    terminate TLS)."""
    scheme, _, netloc = origin.partition("://")
    if scheme not in ("http", "https") or not netloc:
        return False  # "null" (sandboxed frames, file: pages, no-referrer forms) and oddities
    default = "443" if scheme == "https" else "80"
    o_host, o_port = split_host(netloc)
    h_host, h_port = split_host(host_header)
    return bool(o_host) and (o_host, o_port or default) == (h_host, h_port or default)


class OriginMiddleware:
    """Who may talk to the service from where, before anything else runs.

    * Host: only the names and addresses in FACE_ALLOWED_HOSTS (default: loopback) are answered, on
      every route; a DNS-rebinding page reaches the service under its own name and gets 421.
    * Without an API key, a state-changing request (not GET/HEAD/OPTIONS) sent by a page of another
      origin is refused (403 cross_origin_refused): its Origin names another host or port (or is
      "null"), or, without Origin, Sec-Fetch-Site says cross-site or same-site. Requests without these
      headers (curl, SDKs) and the service's own pages (the console) pass. With a key the key does
      this: a page cannot send the key's header to another origin without a CORS grant.
    * CORS: origins in FACE_CORS_ORIGINS get ``Access-Control-Allow-Origin`` naming them (and a
      preflight answer); nobody else gets a grant, and a preflight from elsewhere is refused.
    """

    def __init__(self, app, allowed_hosts: list[str], cors_origins: list[str], open_mode: bool,
                 api_key_header: str) -> None:
        self.app = app
        self.allowed_hosts = allowed_hosts
        self.cors_origins = frozenset(cors_origins)
        self.open_mode = open_mode
        self.allow_headers = f"Content-Type, {api_key_header}"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {name.decode(): value.decode("latin-1") for name, value in scope.get("headers", [])
                   if name in _READ}
        host_header = headers.get("host", "")
        host, _ = split_host(host_header)
        if not host_allowed(host, self.allowed_hosts):
            log.warning("host not allowed", extra={"host": host_header[:200], "path": scope.get("path")})
            return await send_error(scope, send, ServiceError(
                ErrorCode.host_not_allowed, f"this service does not answer to the host {host_header[:200]!r}; "
                "its operator lists the names it answers to in FACE_ALLOWED_HOSTS"))
        origin = headers.get("origin")
        granted = origin is not None and origin.lower() in self.cors_origins
        method = scope.get("method", "")
        if method == "OPTIONS" and origin is not None and "access-control-request-method" in headers:
            if not granted:
                return await send_error(scope, send, ServiceError(
                    ErrorCode.cross_origin_refused, "no CORS grant for this origin (FACE_CORS_ORIGINS)",
                    origin=origin[:200]))
            return await self._preflight(send, origin)
        if self.open_mode and method not in SAFE_METHODS and not granted and self._cross_site(headers, host_header):
            log.warning("cross-origin write refused", extra={"origin": (origin or "")[:200], "path": scope.get("path"),
                                                             "sec_fetch_site": headers.get("sec-fetch-site")})
            return await send_error(scope, send, ServiceError(
                ErrorCode.cross_origin_refused, "a page of another origin may not change anything here "
                "without an API key (FACE_CORS_ORIGINS lists the origins that may)",
                **({"origin": origin[:200]} if origin else {})))
        if not granted:
            return await self.app(scope, receive, send)

        async def grant(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []),
                                      (b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
            await send(message)

        return await self.app(scope, receive, grant)

    @staticmethod
    def _cross_site(headers: dict[str, str], host_header: str) -> bool:
        origin = headers.get("origin")
        if origin is not None:
            return not _same_origin(origin, host_header)
        return headers.get("sec-fetch-site") in ("cross-site", "same-site")

    async def _preflight(self, send, origin: str) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": [
            (b"access-control-allow-origin", origin.encode("latin-1")),
            (b"access-control-allow-methods", CORS_METHODS.encode()),
            (b"access-control-allow-headers", self.allow_headers.encode()),
            (b"access-control-max-age", b"600"), (b"vary", b"Origin")]})
        await send({"type": "http.response.body", "body": b""})

class ConsistencyMiddleware:
    """Read-your-writes across standbys (service.gallery.postgres.consistency): takes the client's token from
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
                    return await send_error(scope, send, ServiceError(
                        ErrorCode.invalid_request, f"bad {consistency.HEADER} header: {exc}", header=consistency.HEADER))
            elif name == b"cookie" and read_after.required is None:
                read_after.required = _cookie_lsn(value.decode("latin-1"))

        async def send_token(message):
            floor = read_after.floor()
            if message["type"] == "http.response.start" and floor is not None:
                token = consistency.format_lsn(floor).encode()
                secure = "; Secure" if scope.get("scheme") == "https" else ""  # HTTPS (FACE_TLS_*): never sent in clear
                cookie = (f"{consistency.COOKIE}={token.decode()}; Path=/; Max-Age={self.cookie_max_age_s}; "
                          f"HttpOnly; SameSite=Lax{secure}").encode()
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
