"""Collections: named galleries (create, list, read, change, delete). Creating, changing and deleting
need `admin`; listing shows a key the collections in its scope; reading one needs `read` in its scope."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from starlette.concurrency import run_in_threadpool

from ..access.policy import Permission
from ..errors import ErrorCode, ServiceError
from ..gallery.api import (
    COLLECTION_NAME_PATTERN,
    CollectionExists,
    CollectionInfo,
    CollectionInUse,
    CollectionNotFound,
    CollectionProtected,
    valid_collection_name,
)
from ..gallery.crops import CropsUnavailable
from ..gallery.openset import GalleryCounts
from ..state import ServiceState
from .deps import ActorDep, PrincipalDep, StateDep, allow, resolve_collection
from .payload import StrictRoute
from .schemas import CollectionCreate, CollectionDeleted, CollectionList, CollectionOut, CollectionUpdate, ErrorResponse

ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 415, 422)}
router = APIRouter(route_class=StrictRoute, tags=["collections"], responses=ERRORS)
CollectionName = Annotated[str, Path(pattern=COLLECTION_NAME_PATTERN, max_length=63)]


def out(state: ServiceState, info: CollectionInfo) -> CollectionOut:
    counts = GalleryCounts(info.identities, info.faces, info.counted_faces)
    name = state.models.name_of(info.model_id)  # None: pinned to a model this replica does not serve
    served = state.models.get(name) if name is not None else None
    return CollectionOut(name=info.name, model_id=info.model_id, model=name, dim=info.dim, created_at=info.created_at,
                         identities=info.identities, faces=info.faces,
                         identify_threshold=state.decision_for(counts, served=served, fpir=info.identify_fpir).threshold,
                         keep_crops=info.keep_crops, retention_days=info.retention_days, max_faces=info.max_faces,
                         identify_fpir=info.identify_fpir, damaged=info.damaged)


def crop_key_missing(name: str) -> ServiceError:
    return ServiceError(ErrorCode.crop_key_missing, "keeping face crops needs a crop key: start the service with "
                        "FACE_CROP_KEY_FILE (`python -m service crop-key new PATH` writes one)", collection=name)


def not_found(name: str) -> ServiceError:
    return ServiceError(ErrorCode.collection_not_found, f"no collection named {name!r}", collection=name)


@router.post("/collections", status_code=201, response_model=CollectionOut, summary="Create a collection",
             dependencies=[allow(Permission.admin)])
async def create_collection(body: CollectionCreate, state: StateDep, actor: ActorDep) -> CollectionOut:
    """A new, empty gallery of its own: identity ids in it are its own, searches in it never see another
    collection's faces, and its open-set threshold follows its own size. 409 `collection_exists`.
    `keep_crops: true` keeps each enrolled face's aligned crop, encrypted (needs FACE_CROP_KEY_FILE:
    409 `crop_key_missing` without it); enrolling embeddings into it is then 409 `crops_required`.
    `model`: the served model it is pinned to (default: the default model); 404 `model_not_found`.
    `retention_days`: each face is erased that long after its enrollment, `max_faces`: the most faces it
    may hold, `identify_fpir`: its own open-set target (see `PATCH`)."""
    if not valid_collection_name(body.name):
        raise ServiceError(ErrorCode.invalid_collection_name, "a collection name is 1-63 lower-case letters, digits, "
                           "'-' or '_', starting with a letter or digit", name=body.name[:100])
    served = state.model_named(body.model)
    try:
        info = await run_in_threadpool(state.galleries.create_collection, body.name, actor,
                                       keep_crops=body.keep_crops, model_id=served.model_id, dim=served.dim,
                                       retention_days=body.retention_days, max_faces=body.max_faces,
                                       identify_fpir=body.identify_fpir)
    except CollectionExists:
        raise ServiceError(ErrorCode.collection_exists, f"a collection or alias named {body.name!r} already exists",
                           collection=body.name) from None
    except CropsUnavailable:
        raise crop_key_missing(body.name) from None
    return out(state, info)


@router.get("/collections", response_model=CollectionList, summary="List collections",
            dependencies=[allow(Permission.read)])
async def list_collections(state: StateDep, principal: PrincipalDep) -> CollectionList:
    """The collections this key may touch (all for an unscoped key), with their sizes and thresholds."""
    infos = await run_in_threadpool(state.galleries.list_collections)
    return CollectionList(items=[out(state, info) for info in infos if principal.may_touch(info.name)])


@router.get("/collections/{collection}", response_model=CollectionOut, summary="One collection",
            dependencies=[allow(Permission.read, scoped=True)])
async def get_collection(request: Request, collection: CollectionName, state: StateDep) -> CollectionOut:
    """The collection, or the one an alias names (the answer's `name` is the collection's own)."""
    collection = await resolve_collection(request)
    try:
        info = await run_in_threadpool(state.galleries.collection_info, collection)
    except CollectionNotFound:
        raise not_found(collection) from None
    return out(state, info)


@router.patch("/collections/{collection}", response_model=CollectionOut, summary="Change a collection",
              dependencies=[allow(Permission.admin)])
async def update_collection(collection: CollectionName, body: CollectionUpdate, state: StateDep,
                            actor: ActorDep) -> CollectionOut:
    """Sets the settings given, `default` included (those not given stay; null: the default):
    `retention_days` (null: faces kept until deleted), `max_faces` (null: no limit), `identify_fpir`
    (null: FACE_IDENTIFY_FPIR). Audited (`collection.updated`: each changed setting and its
    `previous_` value) unless nothing changed. Faces past a new, shorter retention are erased by the
    next sweep (at most FACE_RETENTION_SWEEP_S later), each with its `face.deleted` entry; a `max_faces` under
    the faces held erases nothing (writes that add faces are refused); a new `identify_fpir` is in force
    at once on this replica and, on PostgreSQL, on another from its next search of the collection. An
    alias's name is not a collection's (404), as for `DELETE`."""
    try:
        info = await run_in_threadpool(state.galleries.update_collection, collection, body.changes(), actor)
    except CollectionNotFound:
        raise not_found(collection) from None
    return out(state, info)


@router.delete("/collections/{collection}", response_model=CollectionDeleted, summary="Delete a collection",
               dependencies=[allow(Permission.admin)])
async def delete_collection(collection: CollectionName, state: StateDep, actor: ActorDep) -> CollectionDeleted:
    """Erases every identity and face in it, as deleting each identity would (nothing left in any file,
    snapshot or table); its audit entries stay. `default` always exists: 409 `collection_protected`.
    While an alias points to it, or a live key (neither revoked nor expired) is scoped to it: 409
    `collection_in_use`, details `aliases` and `keys` (re-point or delete the aliases, revoke the keys
    first: a key scoped to it would otherwise touch a collection made later under its name). An
    alias's name is not a collection's: deleting through an alias is refused (404)."""
    try:
        info = await run_in_threadpool(state.galleries.delete_collection, collection, actor)
    except CollectionNotFound:
        raise not_found(collection) from None
    except CollectionProtected:
        raise ServiceError(ErrorCode.collection_protected, "the default collection always exists; delete its "
                           "identities instead", collection=collection) from None
    except CollectionInUse as exc:
        why = ([f"aliases point to it (re-point or delete them first: {', '.join(exc.aliases)})"] if exc.aliases else [])
        why += [f"live keys are scoped to it (revoke them first: {', '.join(exc.keys)})"] if exc.keys else []
        raise ServiceError(ErrorCode.collection_in_use, f"collection {collection!r} is in use: {'; '.join(why)}",
                           collection=collection, aliases=exc.aliases, keys=exc.keys) from None
    return CollectionDeleted(name=info.name, deleted_identities=info.identities, deleted_faces=info.faces)
