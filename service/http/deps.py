"""FastAPI dependencies, as ``Annotated`` aliases the routers declare in their signatures.

They are ``async def`` although most never await: FastAPI runs a plain ``def`` dependency in the
thread pool, a thread round trip per dependency per request for a few attribute reads. What needs
the database (a key not in the key ring's cache, a named collection) goes to a worker thread.

Access: every route but the health probes declares ``Allow(permission)`` (service/access/policy.py
says which role holds which); a gallery route also checks that its collection (the path's
``{collection}``, else ``default``) is in the key's scope, before it is looked up, so a key cannot
learn which collections exist outside its scope. ``{collection}`` may be an alias: it is resolved
first (``resolve_collection``), and the scope and the gallery are those of its target.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Path, Request
from starlette.concurrency import run_in_threadpool

from ..access.keyring import MISS
from ..access.policy import OPEN, Permission, Principal
from ..errors import ErrorCode, ServiceError
from ..gallery.api import COLLECTION_NAME_PATTERN, DEFAULT_COLLECTION, Actor, CollectionNotFound, GalleryBackend
from ..model.registry import ServedModel
from ..state import ServiceState


async def get_state(request: Request) -> ServiceState:
    state = getattr(request.app.state, "service", None)
    if state is None:
        raise ServiceError(ErrorCode.model_not_ready, "the service is starting or stopping")
    return state


StateDep = Annotated[ServiceState, Depends(get_state)]


def _request_state(request: Request) -> dict[str, Any]:
    return request.scope.setdefault("state", {})


async def resolve_principal(request: Request, state: ServiceState) -> Principal | None:
    """The principal of the request's key if it is valid (``OPEN`` in open mode), else None. The one
    place a key becomes a principal: ``authenticate`` refuses None with 401, /readyz leaves its details out."""
    ring = state.keyring
    secret = request.headers.get(state.settings.api_key_header)
    if secret:
        found = ring.lookup_cached(secret)
        if found is MISS:
            found = await run_in_threadpool(ring.lookup, secret)
        if found is not None:
            return found  # type: ignore[return-value]
    open_mode = ring.open_mode_cached()
    if open_mode is None:
        open_mode = await run_in_threadpool(ring.open_mode)
    return OPEN if open_mode else None


async def authenticate(request: Request) -> Principal:
    """The caller's principal (once per request); 401 for a missing, unknown, revoked or expired key
    unless the service is in open mode; 403 for a key refused whatever it asks (``Principal.unusable``)."""
    scope_state = _request_state(request)
    principal = scope_state.get("principal")
    if principal is not None:
        return principal
    state = await get_state(request)
    found = await resolve_principal(request, state)
    if found is None:
        secret = request.headers.get(state.settings.api_key_header)
        what = "wrong, revoked or expired" if secret else "missing"
        raise ServiceError(ErrorCode.unauthorized, f"{what} API key in header {state.settings.api_key_header}")
    if found.unusable is not None:  # a scoped admin key (policy.py): valid, and refused whatever it asks
        raise ServiceError(ErrorCode.forbidden, found.unusable, key_id=found.key_id, role=found.role.value)
    scope_state["principal"] = found
    return found


async def collection_path(request: Request,
                          collection: Annotated[str, Path(pattern=COLLECTION_NAME_PATTERN, max_length=63,
                                                          description="The collection's name, or an alias of it")]
                          ) -> None:
    """Declares ``{collection}`` of the prefixed gallery routes and resolves it (an alias names its
    target), after the key (a request without a valid key gets its 401 first)."""
    await authenticate(request)
    await resolve_collection(request)


async def resolve_collection(request: Request) -> str:
    """The collection the request names, once per request: the path's ``{collection}`` (an alias
    resolved to the collection it points to now, from the replica's alias map, at most
    FACE_ALIAS_CACHE_S old), else ``default``. Every later step of the request (the key's scope, the
    gallery) uses this one name, so a re-point never splits a request between two collections."""
    scope_state = _request_state(request)
    resolved = scope_state.get("collection")
    if resolved is not None:
        return resolved
    named = request.path_params.get("collection", DEFAULT_COLLECTION)
    resolved = named
    if named != DEFAULT_COLLECTION:  # `default` is a collection, never an alias: no lookup on the hot path
        aliases = (await get_state(request)).aliases
        known = aliases.cached()
        if known is None:
            known = await run_in_threadpool(aliases.current)
        resolved = known.get(named, named)
    scope_state["collection"] = resolved
    if resolved != named:
        scope_state["alias"] = named
    return resolved


def collection_of(request: Request) -> str:
    """The request's collection once resolved (resolve_collection), else as the path names it."""
    return _request_state(request).get("collection") or request.path_params.get("collection", DEFAULT_COLLECTION)


class Allow:
    """A route's access rule: ``dependencies=[Allow(Permission.read)]`` (``scoped``: a gallery route,
    whose collection must be in the key's scope). Docs read ``permission`` (http/docs.py)."""

    def __init__(self, permission: Permission, scoped: bool = False) -> None:
        self.permission = permission
        self.scoped = scoped

    async def __call__(self, request: Request) -> Principal:
        principal = await authenticate(request)
        passed = _request_state(request).setdefault("allowed", [])
        if self in passed:  # decided already, before the body was read (payload.StrictRoute)
            return principal
        if not principal.may(self.permission):
            raise ServiceError(ErrorCode.forbidden, f"a {principal.role.value} key may not do this "
                               f"(it needs the {self.permission.value} permission)",
                               role=principal.role.value, needs=self.permission.value)
        if self.scoped:
            # the alias's target must be in the scope (an alias name listed in a scope grants nothing)
            name = await resolve_collection(request)
            if not principal.may_touch(name):
                named = _request_state(request).get("alias", name)  # an alias's target outside the scope stays untold
                raise ServiceError(ErrorCode.forbidden, f"this key may not touch collection {named!r}",
                                   collection=named)
        limiter = (await get_state(request)).limits.requests
        wait = limiter.charge(_subject(request, principal), 1.0, principal.rate_limit_rps)
        if wait is not None:
            raise limiter.refuse(wait, _subject_name(principal))
        passed.append(self)
        return principal


def _subject(request: Request, principal: Principal) -> str:
    """Whose budget a request spends: its key's, or in open mode its client address's."""
    if principal.key_id is not None:
        return f"key:{principal.key_id}"
    return f"client:{request.client.host if request.client else '?'}"


def _subject_name(principal: Principal) -> str:
    return f"key {principal.key_id}" if principal.key_id is not None else "this client address"


def charge_faces(request: Request, count: int) -> None:
    """Spend ``count`` of the caller's faces-per-second budget (payload.py, once the body is counted);
    429 ``rate_limited`` past it."""
    principal = _request_state(request).get("principal")
    state = getattr(request.app.state, "service", None)
    if principal is None or state is None or count <= 0:
        return
    limiter = state.limits.faces
    wait = limiter.charge(_subject(request, principal), float(count), principal.rate_limit_faces_per_s)
    if wait is not None:
        raise limiter.refuse(wait, _subject_name(principal))


def allow(permission: Permission, scoped: bool = False) -> Any:
    return Depends(Allow(permission, scoped))


PrincipalDep = Annotated[Principal, Depends(authenticate)]


async def get_collection(request: Request) -> GalleryBackend:
    """The request's collection (``/collections/{collection}/...``, else ``default``); 404
    ``collection_not_found``. The default one is held by the state: no lookup on the hot path."""
    state = await get_state(request)
    name = await resolve_collection(request)
    if name == DEFAULT_COLLECTION:
        return state.default_gallery
    try:
        return await run_in_threadpool(state.galleries.collection, name)
    except CollectionNotFound:
        raise ServiceError(ErrorCode.collection_not_found, f"no collection named {name!r}", collection=name) from None


CollectionDep = Annotated[GalleryBackend, Depends(get_collection)]


async def get_actor(request: Request) -> Actor:
    """Who makes this change, for its audit record (never the secret)."""
    principal = await authenticate(request)
    return Actor(key_id=principal.key_id, client=request.client.host if request.client else None,
                 request_id=_request_state(request).get("request_id"))


ActorDep = Annotated[Actor, Depends(get_actor)]


async def get_served(request: Request, gallery: CollectionDep) -> ServedModel:
    """The served model the request's collection is pinned to (``state.served_for``): it embeds the
    request's images, its model id is what embeddings given as input must carry, its thresholds decide."""
    return (await get_state(request)).served_for(gallery)


ServedDep = Annotated[ServedModel, Depends(get_served)]
