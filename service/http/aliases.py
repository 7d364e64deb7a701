"""Aliases (admin): a second name of a collection, which every `/collections/{collection}/...` route
accepts. Clients keep using the alias while the operator re-points it (one atomic write) from an old
collection to a new one: the switch without downtime of a model change. Every replica follows a
re-point within FACE_ALIAS_CACHE_S (at most 1 s)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path
from starlette.concurrency import run_in_threadpool

from ..access.policy import Permission
from ..errors import ErrorCode, ServiceError
from ..gallery.api import COLLECTION_NAME_PATTERN, AliasInfo, AliasNotFound, CollectionExists, CollectionNotFound
from ..jobs.store import MigrationUnfinished
from .deps import ActorDep, StateDep, allow
from .payload import StrictRoute
from .schemas import AliasList, AliasOut, AliasSet, ErrorResponse

ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 415, 422)}
router = APIRouter(route_class=StrictRoute, tags=["aliases"], responses=ERRORS, dependencies=[allow(Permission.admin)])
AliasName = Annotated[str, Path(pattern=COLLECTION_NAME_PATTERN, max_length=63,
                                description="The alias: a collection name's form, and no collection's name")]


def out(info: AliasInfo) -> AliasOut:
    return AliasOut(alias=info.name, collection=info.collection, updated_at=info.updated_at)


def not_found(name: str) -> ServiceError:
    return ServiceError(ErrorCode.alias_not_found, f"no alias named {name!r}", alias=name)


@router.put("/aliases/{name}", response_model=AliasOut, summary="Point an alias at a collection")
async def set_alias(name: AliasName, body: AliasSet, state: StateDep, actor: ActorDep) -> AliasOut:
    """Creates the alias, or re-points it: one atomic write, so each request through it is served by
    the old collection or by the new one, never by neither. Audited (`alias.set`, with the previous
    target). 404 `collection_not_found` for a target that is no collection (an alias cannot point at
    an alias); 409 `collection_exists` when a collection has the alias's name; 409
    `migration_unfinished` when the target is the new collection of a migration that is not done
    (running, failed or cancelled: half-copied, and the job would overwrite writes made through the alias)."""
    try:
        info = await run_in_threadpool(state.galleries.set_alias, name, body.collection, actor)
    except MigrationUnfinished as exc:
        raise ServiceError(ErrorCode.migration_unfinished, str(exc), collection=body.collection, job_id=exc.job_id,
                           state=exc.state) from None
    except CollectionNotFound:
        raise ServiceError(ErrorCode.collection_not_found, f"no collection named {body.collection!r} (an alias "
                           "points at a collection, not at another alias)", collection=body.collection) from None
    except CollectionExists:
        raise ServiceError(ErrorCode.collection_exists, f"a collection is named {name!r}: an alias needs a name "
                           "no collection has", collection=name) from None
    state.aliases.forget()  # followed at once on this replica
    return out(info)


@router.get("/aliases", response_model=AliasList, summary="List aliases")
async def list_aliases(state: StateDep) -> AliasList:
    infos = await run_in_threadpool(state.galleries.list_aliases)
    return AliasList(items=[out(info) for info in infos])


@router.get("/aliases/{name}", response_model=AliasOut, summary="One alias")
async def get_alias(name: AliasName, state: StateDep) -> AliasOut:
    for info in await run_in_threadpool(state.galleries.list_aliases):
        if info.name == name:
            return out(info)
    raise not_found(name)


@router.delete("/aliases/{name}", response_model=AliasOut, summary="Delete an alias")
async def delete_alias(name: AliasName, state: StateDep, actor: ActorDep) -> AliasOut:
    """Removes the name (audited: `alias.deleted`); the collection it pointed to is untouched. The
    answer is the alias as it was."""
    try:
        info = await run_in_threadpool(state.galleries.delete_alias, name, actor)
    except AliasNotFound:
        raise not_found(name) from None
    state.aliases.forget()
    return out(info)
