"""/openapi.json, /docs and /redoc: behind the API key when one is set (unless FACE_PUBLIC_DOCS), and
an OpenAPI that declares the key as an apiKey security scheme on every route that needs it.

The pages' scripts, styles and favicon (Swagger UI and ReDoc) are served by the service itself at
``/docs/assets/``, from the ``fastapi-offline`` package: no third-party script runs on the service's
origin (where it would see a key typed into "Authorize"), and the docs render on an air-gapped host.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import re
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.routing import APIRoute, iter_route_contexts
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from ..access.policy import GRANTS, Permission
from ..config import Settings
from .deps import Allow, allow
from .ops import PUBLIC_PATHS

SCHEME = "ApiKey"
ASSETS_URL = "/docs/assets"


def assets_dir() -> Path:
    """swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js and favicon.png, as the installed
    ``fastapi-offline`` package ships them (found without importing it)."""
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the fastapi-offline package (the docs' assets) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


def _with_policy(page: HTMLResponse) -> HTMLResponse:
    """A Content-Security-Policy that lets the page load only from the service: scripts are its own files
    and the page's inline script (by hash), requests go to the service, nothing can be framed or posted
    elsewhere (a logo the page names on a CDN is simply not shown)."""
    inline = re.findall(rb"<script>(.*?)</script>", page.body, re.S)
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s).digest()).decode()}'" for s in inline)
    page.headers["Content-Security-Policy"] = (
        f"default-src 'none'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; form-action 'self'; base-uri 'none'; "
        "frame-ancestors 'none'")
    page.headers["X-Content-Type-Options"] = "nosniff"
    page.headers["Referrer-Policy"] = "no-referrer"
    return page


class _AssetsRoute:
    """What the access log and the request metrics name the assets by (a mount sets no route)."""

    path = ASSETS_URL + "/{file}"


class DocsAssets(StaticFiles):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = _AssetsRoute
        await super().__call__(scope, receive, send)


def install_docs(app: FastAPI, settings: Settings) -> None:
    """Call with an app made with ``openapi_url=None`` (FastAPI's own docs routes cannot be guarded)."""
    guarded = settings.api_key is not None and not settings.public_docs
    dependencies = [allow(Permission.embed)] if guarded else []

    @app.get("/openapi.json", include_in_schema=False, dependencies=dependencies)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=dependencies)
    async def swagger() -> HTMLResponse:
        return _with_policy(get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - docs",
                                                swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
                                                swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
                                                swagger_favicon_url=f"{ASSETS_URL}/favicon.png"))

    @app.get("/redoc", include_in_schema=False, dependencies=dependencies)
    async def redoc() -> HTMLResponse:
        return _with_policy(get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc",
                                           redoc_js_url=f"{ASSETS_URL}/redoc.standalone.js",
                                           redoc_favicon_url=f"{ASSETS_URL}/favicon.png", with_google_fonts=False))

    # public like the console's files: third-party code anyone can download, no data
    app.mount(ASSETS_URL, DocsAssets(directory=assets_dir()), name="docs-assets")

    def schema() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = _with_links(_with_roles(_with_security(FastAPI.openapi(app), settings), app))
        return app.openapi_schema

    app.openapi = schema  # type: ignore[method-assign]


def _with_security(spec: dict, settings: Settings) -> dict:
    """The key's header as an apiKey scheme; when a key is set, required on every route but the
    health probes (the only routes without the key dependency, see ``ops.PUBLIC_PATHS``)."""
    spec.setdefault("components", {}).setdefault("securitySchemes", {})[SCHEME] = {
        "type": "apiKey", "in": "header", "name": settings.api_key_header,
        "description": "FACE_API_KEY, when the server has one (health routes never need it).",
    }
    # keys can be made at any time (POST /keys, the CLI): the scheme applies to every route but the
    # health probes; while the service is open (no key anywhere) a request without one is served too
    required: list[dict[str, list[str]]] = [{SCHEME: []}] if settings.api_key is not None else [{SCHEME: []}, {}]
    for path, operations in spec.get("paths", {}).items():
        if path in PUBLIC_PATHS:
            continue
        for operation in operations.values():
            operation["security"] = required
    return spec


# what any route behind a key may answer, whatever it does (the routers declare their own errors)
ACCESS_ERRORS = {
    "401": "`unauthorized`: no key, or one that is unknown, revoked or expired",
    "403": "`forbidden`: the key's role lacks the permission, or the collection is outside its scope",
    "429": "`rate_limited`: past the key's (or the client's) requests or faces per second; `Retry-After` "
           "says in how many seconds",
    "503": "Not now: `model_not_ready` (starting or stopping), `overloaded` (`Retry-After`), `gallery_loading`, "
           "`gallery_unavailable`, `database_unavailable`: retry later; `collection_damaged`, `catalog_damaged`: the "
           "collection's stored data, or the service's catalog of collections and keys, is damaged: not worth "
           "retrying until the operator restores it",
}
# what a change may answer (POST/PUT/PATCH/DELETE of the write and admin permissions)
WRITE_ERRORS = {"507": "`storage_full`: the gallery's disk is full; nothing of the write was stored",
                "503": ACCESS_ERRORS["503"] + "; `write_outcome_unknown`: the database connection failed while the "
                       "write was committed, so it may or may not be stored: read it back before sending it again "
                       "(`database_unavailable` means nothing was stored)"}
# what a route given images may answer (their faces go through the model)
IMAGE_ERRORS = {"504": "`inference_timeout`: the faces were not embedded within FACE_INFERENCE_TIMEOUT_MS"}
IMAGE_FIELDS = frozenset({"images", "image", "image_a", "image_b"})


def _takes_images(operation: dict, schemas: dict) -> bool:
    """Whether the operation's request body (JSON or multipart) has an image field."""
    for media in operation.get("requestBody", {}).get("content", {}).values():
        schema = media.get("schema", {})
        if "$ref" in schema:
            schema = schemas.get(schema["$ref"].rsplit("/", 1)[-1], {})
        if IMAGE_FIELDS & set(schema.get("properties", {})):
            return True
    return False


def _with_roles(spec: dict, app: FastAPI) -> dict:
    """Each operation says the permission it needs (``x-required-permission``), the roles that hold it
    (``x-roles``), whether its collection must be in the key's scope, and the same in words."""
    paths = spec.get("paths", {})
    schemas = spec.get("components", {}).get("schemas", {})
    for context in iter_route_contexts(app.routes):  # included routers' routes, with their prefixes
        route = context.route
        if not isinstance(route, APIRoute) or context.path not in paths:
            continue
        rules = [d.dependency for d in route.dependencies if isinstance(d.dependency, Allow)]
        rules += [d.call for d in route.dependant.dependencies if isinstance(d.call, Allow)]
        if not rules:
            continue
        rule = rules[-1]
        roles = sorted(role.value for role, grants in GRANTS.items() if rule.permission in grants)
        for method in route.methods or ():
            operation = paths[context.path].get(method.lower())
            if operation is None:
                continue
            operation["x-required-permission"] = rule.permission.value
            operation["x-roles"] = roles
            operation["x-collection-scoped"] = rule.scoped
            scope = ", in the key's collection scope" if rule.scoped else ""
            refusable = len(roles) < len(GRANTS) or rule.scoped  # (every role holds embed)
            refused = ", 403 `forbidden` outside the role or scope" if refusable else ""
            operation["description"] = (operation.get("description", "") + f"\n\n**Roles:** {', '.join(roles)}{scope}. "
                                         f"401 `unauthorized` without a valid key{refused}.").strip()
            errors = {status: text for status, text in ACCESS_ERRORS.items() if status != "403" or refusable}
            if method in ("POST", "PUT", "PATCH", "DELETE") and rule.permission.value in ("write", "admin"):
                errors |= WRITE_ERRORS
            if _takes_images(operation, schemas):
                errors |= IMAGE_ERRORS
            for status, description in errors.items():
                operation.setdefault("responses", {}).setdefault(status, {
                    "description": description,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}})
    return spec


# OpenAPI links (3.1 "links"): where a response's values lead, for readers of the document, for
# generated clients, and for a stateful fuzzer (scripts/fuzz), which follows them instead of guessing
# ids that 404. (operation id, success status) -> {link name: (target operation id, its parameters)};
# each link is declared on the default collection's operation and on its /collections/{collection} twin
# (the collection carried along from the request's path).
BODY = "$response.body#/"
IDENTITY = {"identity_id": BODY + "identity_id"}
FIRST_FACE = {"face_id": BODY + "face_ids/0"}
JOB = {"job_id": BODY + "job/id"}
LINKS: dict[tuple[str, str], dict[str, tuple[str, dict[str, str]]]] = {
    ("enroll", "200"): {
        "GetIdentity": ("get_identity", IDENTITY), "UpdateIdentity": ("update_identity", IDENTITY),
        "DeleteIdentity": ("delete_identity", IDENTITY), "MergeIdentity": ("merge_identity", IDENTITY),
        "MoveFace": ("move_face", FIRST_FACE), "DeleteFace": ("delete_face", FIRST_FACE),
        "FaceCrop": ("face_crop", FIRST_FACE)},
    ("start_duplicates_job", "202"): {"GetJob": ("get_duplicates_job", JOB)},
    ("start_outliers_job", "202"): {"GetJob": ("get_outliers_job", JOB)},
}
# links between operations of no collection (or naming it in their own path)
GLOBAL_LINKS: dict[tuple[str, str], dict[str, tuple[str, dict[str, str]]]] = {
    ("create_collection", "201"): {
        name: (target, {"collection": BODY + "name"}) for name, target in (
            ("GetCollection", "get_collection"), ("UpdateCollection", "update_collection"),
            ("DeleteCollection", "delete_collection"), ("Enroll", "collection_enroll"),
            ("ListIdentities", "collection_list_identities"), ("Migrate", "migrate_collection"))},
    ("create_key", "201"): {"RevokeKey": ("revoke_key", {"key_id": BODY + "key_id"})},
    ("set_alias", "200"): {name: (target, {"name": BODY + "alias"}) for name, target in (
        ("GetAlias", "get_alias"), ("DeleteAlias", "delete_alias"))},
    ("migrate_collection", "202"): {name: (target, JOB) for name, target in (
        ("GetJob", "get_job"), ("CancelJob", "cancel_job"), ("ResumeJob", "resume_job"))},
}


def _with_links(spec: dict) -> dict:
    operations = {op["operationId"]: op for ops in spec.get("paths", {}).values() for op in ops.values()
                  if isinstance(op, dict) and "operationId" in op}
    table = dict(GLOBAL_LINKS)
    for (source, status), links in LINKS.items():
        table[(source, status)] = links
        table[(f"collection_{source}", status)] = {
            name: (f"collection_{target}", {**parameters, "collection": "$request.path.collection"})
            for name, (target, parameters) in links.items()}
    for (source, status), links in table.items():
        response = operations[source]["responses"][status]
        response["links"] = {name: {"operationId": target, "parameters": parameters}
                             for name, (target, parameters) in links.items()}
    return spec
