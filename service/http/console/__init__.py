"""The web console: plain HTML/CSS/JS pages served by the service itself at ``/console``.

The pages are static files in this package (no build step, nothing loaded from elsewhere). They are
public, but every API call they make carries the API key, which the page asks for and keeps only in
the tab's sessionStorage; ``/console/config.json`` tells the page the header's name and whether a key
is needed at all. ``GET /whoami`` tells the page the key's role and collections: every gallery call
goes to the collection picked in the header, and only an admin key sees the Keys and Audit pages.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from ...config import Settings
from ..deps import StateDep

STATIC = Path(__file__).parent / "static"

# Scripts, styles and fonts only from here; photos the user picks are shown as blob: URLs and crops
# from /detect as data: URLs. Nothing can be fetched from, or posted to, another origin.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


class _ConsoleRoute:
    """What the access log and the request metrics name the console's files by (a mount sets no route;
    without this they would count as ``unmatched``, like requests for paths that do not exist)."""

    path = "/console/{file}"


class ConsoleFiles(StaticFiles):
    """StaticFiles with the console's security headers."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = _ConsoleRoute
        await super().__call__(scope, receive, send)

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        # the page itself is never kept, not even in the back/forward cache: it shows a new key's secret
        # once (app.js also hides it on pagehide); the script and style are revalidated every time
        # (ETag): a new version of the service is picked up without a stale page
        page = response.headers.get("content-type", "").startswith("text/html")
        response.headers["Cache-Control"] = "no-store" if page else "no-cache"
        return response


def mount_console(app: FastAPI, settings: Settings) -> None:
    @app.get("/console", include_in_schema=False)
    async def console_root() -> RedirectResponse:
        # relative, so that it also works behind a proxy that serves the API under a path prefix
        return RedirectResponse("console/", status_code=307)

    @app.get("/console/config.json", include_in_schema=False)
    async def console_config(state: StateDep) -> dict:
        # a key is needed once any exists: FACE_API_KEY or one stored (made through the API or the CLI)
        required = not await run_in_threadpool(state.keyring.open_mode)
        return {"api_key_header": settings.api_key_header, "api_key_required": required}

    app.mount("/console", ConsoleFiles(directory=STATIC, html=True), name="console")
