"""API keys (admin): create (the secret shown once), list (never a secret), revoke; and /whoami, what
the calling key may do (any key: the console shows or hides its admin pages by it)."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Path
from starlette.concurrency import run_in_threadpool

from ..access.keys import LATEST_EXPIRY, key_view, load_pepper, new_key
from ..access.policy import SCOPED_ADMIN, Permission, Role
from ..errors import ErrorCode, ServiceError
from ..gallery.api import CollectionNotFound
from .deps import ActorDep, PrincipalDep, StateDep, allow
from .payload import StrictRoute
from .schemas import NO_NUL, ErrorResponse, KeyCreate, KeyCreated, KeyList, KeyOut, KeyRevoked, WhoAmI

ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 415, 422)}
router = APIRouter(route_class=StrictRoute, tags=["keys"], responses=ERRORS)
ADMIN = [allow(Permission.admin)]


@router.post("/keys", status_code=201, response_model=KeyCreated, summary="Create an API key", dependencies=ADMIN)
async def create_key(body: KeyCreate, state: StateDep, actor: ActorDep) -> KeyCreated:
    """A new key with a role and a scope (`collections`: the ones it may touch; null: all; an admin key
    cannot have one: 422 `invalid_request`, as the admin routes reach every collection). The answer
    holds the secret, this once: only its hash is stored. 404 `collection_not_found` for a scope naming
    a collection that does not exist."""
    if body.expires_at is not None and body.expires_at <= time.time():
        raise ServiceError(ErrorCode.invalid_request, "expires_at is in the past: a key that no request could use",
                           expires_at=body.expires_at)
    if body.expires_at is not None and body.expires_at >= LATEST_EXPIRY:
        raise ServiceError(ErrorCode.invalid_request, "expires_at is Unix time in seconds; this looks like "
                           "milliseconds (the year 5000 or later)", expires_at=body.expires_at)
    if body.role == Role.admin.value and body.collections is not None:
        raise ServiceError(ErrorCode.invalid_request, SCOPED_ADMIN, role=body.role, collections=body.collections)
    if body.collections is not None:
        for name in body.collections:
            try:
                await run_in_threadpool(state.galleries.collection_info, name)
            except CollectionNotFound:
                raise ServiceError(ErrorCode.collection_not_found, f"no collection named {name!r}",
                                   collection=name) from None
    made = new_key(body.role, tuple(body.collections) if body.collections is not None else None, body.note,
                   body.expires_at, load_pepper(state.settings), body.rate_limit_rps, body.rate_limit_faces_per_s)
    try:
        await run_in_threadpool(state.galleries.add_key, made.stored, actor)
    except CollectionNotFound as exc:  # deleted since the check above (the store checks in its transaction)
        raise ServiceError(ErrorCode.collection_not_found, str(exc), collection=exc.name) from None
    state.keyring.forget()  # open mode ends here at once
    return KeyCreated(secret=made.secret, **key_view(made.stored))


@router.get("/keys", response_model=KeyList, summary="List API keys", dependencies=ADMIN)
async def list_keys(state: StateDep) -> KeyList:
    """Every key, revoked and expired ones too, oldest first: ids, roles, scopes, times; never a secret."""
    keys = await run_in_threadpool(state.galleries.list_keys)
    return KeyList(items=[KeyOut(**key_view(k)) for k in keys])


@router.delete("/keys/{key_id}", response_model=KeyRevoked, summary="Revoke an API key", dependencies=ADMIN)
async def revoke_key(key_id: Annotated[str, Path(max_length=64, pattern=NO_NUL)], state: StateDep, actor: ActorDep) -> KeyRevoked:
    """Refused at once on this replica, within FACE_KEY_CACHE_S (1 s) on every other replica sharing the
    database. The key stays listed (revoked) for the audit trail."""
    revoked = await run_in_threadpool(state.galleries.revoke_key, key_id, actor)
    if revoked is None or revoked.revoked_at is None:
        raise ServiceError(ErrorCode.key_not_found, f"no key with id {key_id!r}", key_id=key_id)
    state.keyring.forget()
    return KeyRevoked(key_id=revoked.key_id, revoked_at=revoked.revoked_at)


@router.get("/whoami", response_model=WhoAmI, summary="What this key may do", dependencies=[allow(Permission.embed)])
async def whoami(principal: PrincipalDep) -> WhoAmI:
    return WhoAmI(key_id=principal.key_id, role=principal.role.value,
                  collections=sorted(principal.collections) if principal.collections is not None else None,
                  open_mode=principal.open_mode)
