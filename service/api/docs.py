"""/openapi.json, /docs and /redoc: behind the API key when one is set (unless FACE_PUBLIC_DOCS), and
an OpenAPI that declares the key as an apiKey security scheme on every route that needs it."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from ..config import Settings
from ..deps import ApiKey
from .ops import PUBLIC_PATHS

SCHEME = "ApiKey"


def install_docs(app: FastAPI, settings: Settings) -> None:
    """Call with an app made with ``openapi_url=None`` (FastAPI's own docs routes cannot be guarded)."""
    guarded = settings.api_key is not None and not settings.public_docs
    dependencies = [ApiKey] if guarded else []

    @app.get("/openapi.json", include_in_schema=False, dependencies=dependencies)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=dependencies)
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - docs")

    @app.get("/redoc", include_in_schema=False, dependencies=dependencies)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc")

    def schema() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = _with_security(FastAPI.openapi(app), settings)
        return app.openapi_schema

    app.openapi = schema  # type: ignore[method-assign]


def _with_security(spec: dict, settings: Settings) -> dict:
    """The key's header as an apiKey scheme; when a key is set, required on every route but the
    health probes (the only routes without the key dependency, see ``ops.PUBLIC_PATHS``)."""
    spec.setdefault("components", {}).setdefault("securitySchemes", {})[SCHEME] = {
        "type": "apiKey", "in": "header", "name": settings.api_key_header,
        "description": "FACE_API_KEY, when the server has one (health routes never need it).",
    }
    if settings.api_key is None:
        return spec
    for path, operations in spec.get("paths", {}).items():
        if path in PUBLIC_PATHS:
            continue
        for operation in operations.values():
            operation["security"] = [{SCHEME: []}]
    return spec
