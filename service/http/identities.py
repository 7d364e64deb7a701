"""Enroll, list, get, delete: the routes that own a collection's contents.

Mounted twice (app.py): unprefixed for the `default` collection, and under
`/collections/{collection}`. Reads need the `read` permission, changes `write`, both in the key's
scope; every change is audited in its own transaction (the gallery writes the record)."""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Path, Query, Request
from starlette.concurrency import run_in_threadpool

from ..access.policy import Permission
from ..errors import ErrorCode, ServiceError
from ..faces.metadata import MetadataLimits, check_metadata
from ..gallery.api import GalleryBackend
from ..gallery.identity_ids import MAX_LENGTH, find_identity
from ..gallery.openset import HUB_SEARCH_K, find_hub
from ..gallery.results import TooManyFacesForIdentity
from ..state import ServiceState
from .deps import ActorDep, CollectionDep, PrincipalDep, ServedDep, StateDep, allow
from .payload import body_docs, read_payload
from .schemas import (
    ID_PATTERN,
    DeleteResponse,
    EnrollRequest,
    EnrollResponse,
    ErrorResponse,
    IdentityDetail,
    IdentityPage,
    IdentitySummary,
)
from .vectors import list_source, source_vectors

ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 415, 422)}
router = APIRouter(tags=["identities"], responses=ERRORS)
READ = [allow(Permission.read, scoped=True)]
WRITE = [allow(Permission.write, scoped=True)]

# an id that names a stored identity: found as given, or in NFC or NFD form (identity_ids.find_identity)
IdentityPath = Annotated[str, Path(min_length=1, max_length=MAX_LENGTH, pattern=ID_PATTERN)]


@router.post("/enroll", response_model=EnrollResponse, openapi_extra=body_docs(EnrollRequest, ("images",)),
             summary="Enroll faces of an identity", dependencies=WRITE)
async def enroll(request: Request, state: StateDep, gallery: CollectionDep, actor: ActorDep,
                 principal: PrincipalDep, served: ServedDep) -> EnrollResponse:
    """Store one or more faces under `identity_id`.

    A new identity is created. For an existing identity the faces are **added** to its faces
    (`replace: false`, the default) or atomically **replace** them (`replace: true`); given
    `metadata` replaces the stored metadata. The response comes after the write is durable.
    Photos: one face per image (`multi_face`: the `largest`, or the one nearest the `center`).
    Embeddings instead of images: `embeddings` with the served `model_id`.

    Quality: every face must reach FACE_ENROLL_MIN_QUALITY (else the model's fitted default) and each
    part's limit, or the whole request is refused with 422 `low_quality` (`details.index`: the image,
    `details.reasons`: each limit missed and by how much) and nothing is stored. `min_quality` raises
    the limit; `force_quality: true` (the admin key) lowers it to `min_quality`, or without one
    skips the check (only an admin key may force: 403 `forbidden` for others). Client `embeddings`
    carry no quality and are not checked.
    An identity holds at most `FACE_MAX_FACES_PER_IDENTITY` faces (413 `too_many_faces_for_identity`).
    A face that scores high against many different enrolled identities at once, improbably for a real
    face (`FACE_ENROLL_HUB_ALPHA`), is refused with 422 `implausible_face`: such a "hub" would be
    named for strangers. Either way nothing is written.
    """
    payload, images = await read_payload(request, EnrollRequest, ("images",),
                                         max_images=state.settings.max_faces_per_request, vector_fields=("embeddings",),
                                         dimension=served.dim)
    check_metadata(payload.metadata, MetadataLimits(state.settings.max_metadata_bytes,
                                                    state.settings.max_metadata_depth))
    if payload.force_quality and not principal.may(Permission.admin):
        raise ServiceError(ErrorCode.forbidden, "only an admin key may force_quality", needs=Permission.admin.value)
    vectors, faces = await source_vectors(state, list_source(payload, images), served)
    faces.refuse_low_quality(state.settings.enroll_min_quality, payload.min_quality, payload.force_quality)
    if state.settings.enroll_hub_alpha > 0:
        await run_in_threadpool(_refuse_hubs, state, gallery, payload.identity_id, vectors)
    try:
        enrolled = await run_in_threadpool(
            gallery.enroll, payload.identity_id, vectors, payload.metadata, payload.replace,
            state.settings.max_faces_per_identity,  # counted inside the write: concurrent appends cannot overshoot
            actor,  # the audit record is written in the enrollment's own transaction
        )
    except TooManyFacesForIdentity as exc:
        raise _too_many(exc) from None
    return EnrollResponse(identity_id=payload.identity_id, created=enrolled.created, face_ids=enrolled.face_ids,
                          faces_replaced=enrolled.faces_removed, face_count=enrolled.face_count,
                          model_id=served.model_id,
                          faces=faces.locations(),
                          quality=faces.qualities(state.settings.enroll_min_quality, payload.min_quality,
                                                  payload.force_quality) if faces.quality else None)


def _too_many(exc: TooManyFacesForIdentity) -> ServiceError:
    return ServiceError(ErrorCode.too_many_faces_for_identity, str(exc), identity_id=exc.identity_id,
                        faces=exc.existing, adding=exc.adding, limit=exc.limit)


def _refuse_hubs(state: ServiceState, gallery: GalleryBackend, identity_id: str, vectors: np.ndarray) -> None:
    """One gallery search for the new faces (in the worker thread, like the write): a face whose
    scores against other identities are improbable for a real face is refused."""
    decision = state.open_set_threshold(gallery)
    hub = find_hub(decision, gallery.search(vectors, HUB_SEARCH_K), identity_id, state.settings.enroll_hub_alpha)
    if hub is not None:
        raise ServiceError(
            ErrorCode.implausible_face,
            f"face {hub.face_index} scores high against {len(hub.identities)} different enrolled identities at once: "
            f"probability {hub.probability:.2g} for a real face (FACE_ENROLL_HUB_ALPHA {state.settings.enroll_hub_alpha:g})",
            face_index=hub.face_index, probability=hub.probability, identities=hub.identities, scores=hub.scores)


@router.get("/identities", response_model=IdentityPage, summary="List identities", dependencies=READ)
async def list_identities(
    gallery: CollectionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(description="next_cursor from the previous page")] = None,
) -> IdentityPage:
    """Identities ordered by id, paginated with a cursor (stable while others enroll or delete)."""
    records = await run_in_threadpool(gallery.list_identities, limit + 1, cursor)
    more = len(records) > limit
    records = records[:limit]
    return IdentityPage(
        items=[IdentitySummary(**r.__dict__) for r in records],
        next_cursor=records[-1].identity_id if more else None,
    )


@router.get("/identities/{identity_id}", response_model=IdentityDetail, summary="One identity", dependencies=READ)
async def get_identity(identity_id: IdentityPath, gallery: CollectionDep) -> IdentityDetail:
    _, found = await run_in_threadpool(find_identity, identity_id, gallery.get_identity)
    return IdentityDetail(**found.record.__dict__, face_ids=[f.face_id for f in found.faces])


@router.delete("/identities/{identity_id}", response_model=DeleteResponse, summary="Delete an identity",
               dependencies=WRITE)
async def delete_identity(identity_id: IdentityPath, gallery: CollectionDep, actor: ActorDep) -> DeleteResponse:
    """Erase the identity and all its faces from the store and the index: it can never be
    returned by /identify or /verify again."""
    stored_as, deleted = await run_in_threadpool(find_identity, identity_id, lambda i: gallery.delete(i, actor))
    return DeleteResponse(identity_id=stored_as, deleted_faces=deleted)
