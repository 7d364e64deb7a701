"""Enroll, list, get, update, delete, merge, move and delete faces, and see a face's kept crop: the routes
that own a collection's contents.

Mounted twice (app.py): unprefixed for the `default` collection, and under
`/collections/{collection}`. Reads need the `read` permission, changes `write` (and so does a kept
crop: an enrolled face's image), both in the key's scope; every change is audited in its own
transaction (the gallery writes the record)."""

from __future__ import annotations

import logging
import unicodedata
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Path, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from ..access.policy import Permission
from ..errors import ErrorCode, ServiceError
from ..faces.metadata import MetadataLimits, check_metadata, merge_patch
from ..gallery.api import MAX_ROW_ID, Actor, GalleryBackend, IdentityExists
from ..gallery.crops import CropAuthenticationFailed, CropsUnavailable, encode_crop
from ..gallery.identity_ids import MAX_LENGTH, find_identity
from ..gallery.openset import HUB_SEARCH_K, find_hub
from ..gallery.postgres import consistency
from ..gallery.results import (
    EnrollResult,
    FaceDeletion,
    FaceNotFound,
    IdentityChanged,
    IdentityDetails,
    IdentityNotFound,
    IdentityUpdate,
    TooManyFacesForCollection,
    TooManyFacesForIdentity,
)
from ..gallery.retention import DAY_S
from ..state import ServiceState
from .collections import crop_key_missing
from .deps import ActorDep, CollectionDep, PrincipalDep, ServedDep, StateDep, allow
from .payload import StrictRoute, body_docs, read_payload
from .schemas import (
    ID_PATTERN,
    DeleteResponse,
    EnrollRequest,
    EnrollResponse,
    ErrorResponse,
    FaceDeleteResponse,
    FacesDeleteRequest,
    FacesDeleteResponse,
    IdentityDetail,
    IdentityPage,
    IdentitySummary,
    IdentityUpdateRequest,
    MergeRequest,
    MergeResponse,
    MoveFaceRequest,
    MoveFaceResponse,
    PossibleDuplicate,
    StoredFace,
)
from .vectors import list_source, source_vectors

log = logging.getLogger(__name__)
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 415, 422)}
router = APIRouter(route_class=StrictRoute, tags=["identities"], responses=ERRORS)
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
    An identity holds at most `FACE_MAX_FACES_PER_IDENTITY` faces (413 `too_many_faces_for_identity`), a
    collection with a `max_faces` at most that many (413 `too_many_faces_for_collection`).
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
    if gallery.keep_crops and payload.embeddings is not None:
        raise ServiceError(ErrorCode.crops_required, f"the collection {gallery.name!r} keeps the aligned crop of every "
                           "face (keep_crops) so that it can be re-embedded later: enroll images, not embeddings",
                           collection=gallery.name)
    vectors, faces = await source_vectors(state, list_source(payload, images), served)
    faces.refuse_low_quality(state.settings.enroll_min_quality, payload.min_quality, payload.force_quality)
    if state.settings.enroll_hub_alpha > 0:
        await run_in_threadpool(_refuse_hubs, state, gallery, payload.identity_id, vectors)
    duplicates = None
    if state.settings.enroll_duplicate_policy != "allow":  # the guard against enrolling one person twice
        duplicates = await run_in_threadpool(_possible_duplicates, state, gallery, payload.identity_id, vectors)
    try:
        enrolled = await run_in_threadpool(
            _write, gallery, payload.identity_id, vectors, payload.metadata, payload.replace,
            state.settings.max_faces_per_identity,  # counted inside the write: concurrent appends cannot overshoot
            actor,  # the audit record is written in the enrollment's own transaction
            faces.crops if gallery.keep_crops else None,
        )
    except TooManyFacesForIdentity as exc:
        raise _too_many(exc) from None
    except TooManyFacesForCollection as exc:
        raise ServiceError(ErrorCode.too_many_faces_for_collection, str(exc), collection=exc.collection,
                           faces=exc.existing, adding=exc.adding, limit=exc.limit) from None
    except CropsUnavailable:
        raise crop_key_missing(gallery.name) from None
    return EnrollResponse(identity_id=payload.identity_id, created=enrolled.created, face_ids=enrolled.face_ids,
                          faces_replaced=enrolled.faces_removed, face_count=enrolled.face_count,
                          model_id=served.model_id,
                          faces=faces.locations(),
                          quality=faces.qualities(state.settings.enroll_min_quality, payload.min_quality,
                                                  payload.force_quality) if faces.quality else None,
                          possible_duplicates=duplicates or None)


def _write(gallery: GalleryBackend, identity_id: str, vectors: np.ndarray, metadata: dict | None, replace: bool,
           max_faces: int, actor: Actor, crops: list[np.ndarray] | None) -> EnrollResult:
    """The enrollment's one write; a keep_crops collection's faces keep the crops the model saw (encoded
    here, in the worker thread; sealed by the gallery inside the write's transaction)."""
    encoded = None if crops is None else [encode_crop(crop) for crop in crops]
    return gallery.enroll(identity_id, vectors, metadata, replace, max_faces, actor, encoded)


def _too_many(exc: TooManyFacesForIdentity) -> ServiceError:
    return ServiceError(ErrorCode.too_many_faces_for_identity, str(exc), identity_id=exc.identity_id,
                        faces=exc.existing, adding=exc.adding, limit=exc.limit)


def _refuse_hubs(state: ServiceState, gallery: GalleryBackend, identity_id: str, vectors: np.ndarray) -> None:
    """One gallery search for the new faces (in the worker thread, like the write): a face whose
    scores against other identities are improbable for a real face is refused. The search may read a
    standby: its lag leaves out only the identities of the last moments from a judgement over many, and
    on the primary the guard (on by default) would cost every enroll a search there."""
    decision = state.open_set_threshold(gallery)
    hub = find_hub(decision, gallery.search(vectors, HUB_SEARCH_K), identity_id, state.settings.enroll_hub_alpha)
    if hub is not None:
        raise ServiceError(
            ErrorCode.implausible_face,
            f"face {hub.face_index} scores high against {len(hub.identities)} different enrolled identities at once: "
            f"probability {hub.probability:.2g} for a real face (FACE_ENROLL_HUB_ALPHA {state.settings.enroll_hub_alpha:g})",
            face_index=hub.face_index, probability=hub.probability, identities=hub.identities, scores=hub.scores)


DUPLICATE_SEARCH_K = 5  # identities asked per new face by the enroll guard


def _possible_duplicates(state: ServiceState, gallery: GalleryBackend, identity_id: str,
                         vectors: np.ndarray) -> list[PossibleDuplicate]:
    """FACE_ENROLL_DUPLICATE_POLICY (warn, refuse): when this enroll would create a new identity, the
    other identities its faces match at or above the collection's open-set threshold, best first; refuse
    raises 409 ``possible_duplicate`` with them (nothing written). Appending to an identity is not checked.
    Both reads are the primary's (one search there per enroll, with the guard on): on a lagging standby an
    append to an identity just enrolled would be judged a new identity, and a person just enrolled under
    another id would be missed."""
    with consistency.on_primary():  # an identity enrolled a moment ago, by any client, is there
        if gallery.get_identity(identity_id) is not None:
            return []
        searched = gallery.search(vectors, DUPLICATE_SEARCH_K)
    threshold = state.open_set_threshold(gallery).threshold
    best: dict[str, PossibleDuplicate] = {}
    for matches in searched:
        for m in matches:
            if m.identity_id != identity_id and m.score >= threshold and (
                    m.identity_id not in best or m.score > best[m.identity_id].score):
                best[m.identity_id] = PossibleDuplicate(identity_id=m.identity_id, score=m.score, face_id=m.face_id)
    found = sorted(best.values(), key=lambda d: d.score, reverse=True)
    if found and state.settings.enroll_duplicate_policy == "refuse":
        raise ServiceError(ErrorCode.possible_duplicate,
                           f"the new identity's faces match {len(found)} enrolled identit{'y' if len(found) == 1 else 'ies'} "
                           f"at or above the open-set threshold {threshold:.3f} (best: {found[0].identity_id!r}, "
                           f"{found[0].score:.3f}); FACE_ENROLL_DUPLICATE_POLICY=refuse",
                           matches=[d.model_dump() for d in found], threshold=threshold)
    return found


@router.get("/identities", response_model=IdentityPage, summary="List identities", dependencies=READ)
async def list_identities(
    gallery: CollectionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(description="next_cursor from the previous page")] = None,
    prefix: Annotated[str | None, Query(min_length=1, max_length=MAX_LENGTH, pattern=r"^[^\x00]+$",
                                        description="Only the ids that start "
                                        "with this (after Unicode NFC, as ids are stored); pages as without it.")] = None,
) -> IdentityPage:
    """Identities ordered by id, paginated with a cursor (stable while others enroll or delete); with
    `prefix`, only those whose id starts with it (a range of the id index: a page costs the same)."""
    prefix = None if prefix is None else unicodedata.normalize("NFC", prefix)
    records = await run_in_threadpool(gallery.list_identities, limit + 1, cursor, prefix)
    more = len(records) > limit
    records = records[:limit]
    return IdentityPage(
        items=[IdentitySummary(**r.__dict__) for r in records],
        next_cursor=records[-1].identity_id if more else None,
    )


@router.get("/identities/{identity_id}", response_model=IdentityDetail, summary="One identity", dependencies=READ)
async def get_identity(identity_id: IdentityPath, gallery: CollectionDep, state: StateDep) -> IdentityDetail:
    """The identity, its metadata and its faces (each with when it was enrolled and, in a collection with
    `retention_days`, when it will be erased)."""
    _, found = await run_in_threadpool(find_identity, identity_id, gallery.get_identity)
    return await _detail(state, gallery, found)


async def _detail(state: ServiceState, gallery: GalleryBackend, found: IdentityDetails,
                  retentions: dict[str, float] | None = None) -> IdentityDetail:
    """The answer of GET /identities/{id}: each face with its enrollment and (with a retention) erasure time
    (``retentions``: as read already)."""
    if retentions is None:
        retentions = await run_in_threadpool(state.galleries.retentions)
    days = retentions.get(gallery.name)
    faces = [StoredFace(face_id=f.face_id, enrolled_at=f.created_at,
                        expires_at=None if days is None else f.created_at + days * DAY_S) for f in found.faces]
    return IdentityDetail(**found.record.__dict__, face_ids=[f.face_id for f in found.faces], faces=faces)


@router.patch("/identities/{identity_id}", response_model=IdentityDetail, summary="Rename an identity or change "
              "its metadata", dependencies=WRITE, responses={409: {"model": ErrorResponse}})
async def update_identity(identity_id: IdentityPath, body: IdentityUpdateRequest, state: StateDep,
                          gallery: CollectionDep, actor: ActorDep) -> IdentityDetail:
    """Change an identity without enrolling its faces again: rename it (`identity_id`), replace its
    metadata (`metadata`) or merge a patch into it (`metadata_patch`, RFC 7396: `null` removes a key).
    One transaction with its audit record (`identity.updated`: the new id, `renamed_from`, the metadata
    keys changed, never their values); a patch is applied to the metadata as stored when the write runs,
    so two clients patching different keys both keep theirs. A renamed identity keeps its faces (face
    ids, vectors, enrollment times, kept crops) and `created_at`. With `expected_updated_at` (the
    identity's `updated_at` as you read it) the change is made only if nothing wrote to the identity
    since: 409 `identity_changed` otherwise. Answers the identity as GET /identities/{id} does; nothing
    to change writes nothing. 404 `identity_not_found`, 409 `identity_exists` (the new id is another
    identity's), 422 `invalid_metadata`, 413 `metadata_too_large` (the metadata as the patch would
    leave it)."""
    limits = MetadataLimits(state.settings.max_metadata_bytes, state.settings.max_metadata_depth)
    check_metadata(body.metadata, limits)
    check_metadata(body.metadata_patch, limits)  # bounds the patch (its depth too) before it is applied

    def edit(stored: dict) -> dict:
        """The metadata to store, made inside the write's transaction from the stored one."""
        after = body.metadata if body.metadata is not None else merge_patch(stored, body.metadata_patch)
        check_metadata(after, limits)
        return after

    def update() -> IdentityDetails:
        with consistency.on_primary():  # lookups that decide the write: never a lagging standby's answer
            source, _ = find_identity(identity_id, gallery.get_identity)
            new_id = body.identity_id
            if new_id is not None and new_id != source:
                # the new id, or an identity stored under its NFD form before the NFC rule, is another's
                taken = next((form for form in dict.fromkeys((new_id, unicodedata.normalize("NFD", new_id)))
                              if form != source and gallery.get_identity(form) is not None), None)
                if taken is not None:
                    raise _identity_exists(taken)
        change = IdentityUpdate(new_id=new_id, metadata=None if body.metadata is None and body.metadata_patch is None
                                else edit, expected_updated_at=body.expected_updated_at)
        try:
            return gallery.update_identity(source, change, actor).details
        except IdentityNotFound as exc:  # deleted between the lookup and the write
            raise ServiceError(ErrorCode.identity_not_found, str(exc), identity_id=exc.identity_id) from None
        except IdentityExists:  # enrolled between the lookup and the write
            raise _identity_exists(new_id or source) from None
        except IdentityChanged as exc:
            raise ServiceError(ErrorCode.identity_changed, str(exc), identity_id=exc.identity_id,
                               updated_at=exc.updated_at) from None

    # read before the write: a database failure after its commit would be answered database_unavailable,
    # which promises that nothing was stored (a client may send it again)
    retentions = await run_in_threadpool(state.galleries.retentions)
    return await _detail(state, gallery, await run_in_threadpool(update), retentions)


def _identity_exists(identity_id: str) -> ServiceError:
    return ServiceError(ErrorCode.identity_exists, f"identity {identity_id!r} is already enrolled: merge into it "
                        "instead (POST /identities/{id}/merge)", identity_id=identity_id)


@router.delete("/identities/{identity_id}", response_model=DeleteResponse, summary="Delete an identity",
               dependencies=WRITE)
async def delete_identity(identity_id: IdentityPath, gallery: CollectionDep, actor: ActorDep) -> DeleteResponse:
    """Erase the identity and all its faces from the store and the index: it can never be
    returned by /identify or /verify again."""
    stored_as, deleted = await run_in_threadpool(find_identity, identity_id, lambda i: gallery.delete(i, actor))
    return DeleteResponse(identity_id=stored_as, deleted_faces=deleted)


# --- gallery hygiene: merge two identities, move a face, delete a face ---------------------------
# a face id as the gallery numbers them (a positive 64-bit integer)
FaceIdPath = Annotated[int, Path(ge=1, le=MAX_ROW_ID, description="A face id, as /enroll and /identities/{id} list them.")]


def _face_not_found(exc: FaceNotFound) -> ServiceError:
    return ServiceError(ErrorCode.face_not_found, str(exc), face_id=exc.face_id)


@router.post("/identities/{identity_id}/merge", response_model=MergeResponse, summary="Merge an identity into another",
             dependencies=WRITE)
async def merge_identity(identity_id: IdentityPath, body: MergeRequest, state: StateDep, gallery: CollectionDep,
                         actor: ActorDep) -> MergeResponse:
    """Every face of `identity_id` becomes the faces of `into` (face ids kept, nothing re-embedded), and
    `identity_id` is deleted: one transaction with its audit record (`identity.merged`). The target's
    metadata is kept. 404 `identity_not_found` for either, 422 `same_identity` for a merge into itself,
    413 `too_many_faces_for_identity` when the target would hold more than FACE_MAX_FACES_PER_IDENTITY."""

    def merge() -> MergeResponse:
        with consistency.on_primary():  # lookups that decide the write: never a lagging standby's answer
            source, _ = find_identity(identity_id, gallery.get_identity)
            target, _ = find_identity(body.into, gallery.get_identity)
        if source == target:
            raise ServiceError(ErrorCode.same_identity, f"cannot merge identity {source!r} into itself",
                               identity_id=source)
        try:
            merged = gallery.merge_identities(source, target, state.settings.max_faces_per_identity, actor)
        except IdentityNotFound as exc:  # deleted between the lookup and the merge
            raise ServiceError(ErrorCode.identity_not_found, str(exc), identity_id=exc.identity_id) from None
        except TooManyFacesForIdentity as exc:
            raise _too_many(exc) from None
        return MergeResponse(identity_id=merged.target_id, merged_from=source, faces_moved=merged.faces_moved,
                             face_count=merged.face_count)

    return await run_in_threadpool(merge)


@router.post("/faces/{face_id}/move", response_model=MoveFaceResponse, summary="Move a face to another identity",
             dependencies=WRITE)
async def move_face(face_id: FaceIdPath, body: MoveFaceRequest, state: StateDep, gallery: CollectionDep,
                    actor: ActorDep) -> MoveFaceResponse:
    """The face (same id) becomes a face of `identity_id`, which is created (metadata `{}`) if it is not
    enrolled; the face's identity is deleted when this was its last face. One transaction with its
    audit record (`face.moved`). 404 `face_not_found`, 422 `same_identity` (already that identity's),
    413 `too_many_faces_for_identity`."""

    def move() -> MoveFaceResponse:
        target = body.identity_id
        with consistency.on_primary():  # lookups that decide the write: never a lagging standby's answer
            if gallery.get_identity(target) is None:  # an id stored before the NFC rule, in its stored form
                target = next((form for form in (unicodedata.normalize("NFD", target),)
                               if gallery.get_identity(form) is not None), target)
        try:
            moved = gallery.move_face(face_id, target, state.settings.max_faces_per_identity, actor)
        except FaceNotFound as exc:
            raise _face_not_found(exc) from None
        except TooManyFacesForIdentity as exc:
            raise _too_many(exc) from None
        except ValueError as exc:
            raise ServiceError(ErrorCode.same_identity, str(exc), face_id=face_id, identity_id=target) from None
        return MoveFaceResponse(face_id=moved.face_id, from_identity=moved.from_identity, to_identity=moved.to_identity,
                                target_created=moved.target_created, source_deleted=moved.source_deleted)

    return await run_in_threadpool(move)


@router.delete("/faces/{face_id}", response_model=FaceDeleteResponse, summary="Delete one face", dependencies=WRITE)
async def delete_face(face_id: FaceIdPath, gallery: CollectionDep, actor: ActorDep) -> FaceDeleteResponse:
    """Erase one face from the store and the index, as deleting an identity erases its faces: no
    /identify or /verify can return it again. Its identity is deleted too when this was its last face.
    Audited (`face.deleted`). 404 `face_not_found`."""
    try:
        erased = (await run_in_threadpool(gallery.delete_faces, [face_id], actor)).raise_if_missing()
    except FaceNotFound as exc:
        raise _face_not_found(exc) from None
    return _deleted(erased.deleted)[0]


CROP_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
                "Content-Disposition": "inline"}


@router.get("/faces/{face_id}/crop", response_class=Response, summary="A face's kept crop (PNG)", dependencies=WRITE,
            responses={200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                             "description": "The aligned crop the model saw, as PNG."}})
async def face_crop(face_id: FaceIdPath, state: StateDep, gallery: CollectionDep, actor: ActorDep) -> Response:
    """The aligned crop kept for a face of a `keep_crops` collection (see Kept face crops): the model's
    input image (112x112 PNG), decrypted, so that the people who curate the gallery can see whom a face
    shows before they merge, move or delete it. Needs the `write` permission (those who may change the
    gallery; `read` keys identify without seeing enrolled faces) and is never cached
    (`Cache-Control: no-store`). Each crop served is logged (`face crop served`: the collection, the
    face, the key and the request id), so who saw whose face can be answered from the logs. 404
    `face_not_found`; 404 `crop_not_kept` when the collection keeps no crops, or the face has none
    (enrolled from embeddings, or imported); 503 `collection_damaged` when its sealed bytes no longer
    open (altered in the store)."""

    def read() -> bytes:
        cipher = state.galleries.crop_cipher
        blob = gallery.face_crop(face_id) if gallery.keep_crops else None
        if blob is None or cipher is None:
            if not gallery.face_embeddings([face_id]):
                raise _face_not_found(FaceNotFound(face_id))
            why = "keeps no face crops" if not gallery.keep_crops else "has no crop of this face"
            raise ServiceError(ErrorCode.crop_not_kept, f"collection {gallery.name!r} {why}", face_id=face_id,
                               collection=gallery.name)
        try:
            png = cipher.open(gallery.name, face_id, blob)
        except CropAuthenticationFailed as exc:  # its bytes altered in the store (the key was checked at start)
            log.error("kept crop does not open: altered in the store, or sealed with another key; restore the "
                      "collection from a backup, or enroll the face again",
                      extra={"collection": gallery.name, "face_id": face_id, "reason": str(exc)})
            raise ServiceError(ErrorCode.collection_damaged, f"the kept crop of face {face_id} of collection "
                               f"{gallery.name!r} does not open: it was altered in the store (a disk fault, a bad "
                               "restore); the operator restores the collection from a backup", collection=gallery.name,
                               face_id=face_id) from exc
        log.info("face crop served", extra={"collection": gallery.name, "face_id": face_id, "key_id": actor.key_id,
                                            "request_id": actor.request_id})
        return png

    return Response(await run_in_threadpool(read), media_type="image/png", headers=CROP_HEADERS)


@router.post("/faces/delete", response_model=FacesDeleteResponse, summary="Delete many faces", dependencies=WRITE)
async def delete_faces(body: FacesDeleteRequest, gallery: CollectionDep, actor: ActorDep) -> FacesDeleteResponse:
    """Erase up to 1,000 faces at once, as `DELETE /faces/{face_id}` erases one (store, index, snapshot,
    WAL; kept crops), all in one transaction: each identity left with no face is deleted with them, and
    each face has its own `face.deleted` audit record. Ids that are not faces of the collection come
    back in `not_found` (a retry of a request that timed out is safe). Clean-ups such as the faces
    `GET /outliers` found, or the faces a retention policy of your own selected, take one request."""
    erased = await run_in_threadpool(gallery.delete_faces, body.face_ids, actor)
    return FacesDeleteResponse(deleted=_deleted(erased.deleted), not_found=erased.not_found)


def _deleted(deletions: list[FaceDeletion]) -> list[FaceDeleteResponse]:
    return [FaceDeleteResponse(face_id=d.face_id, identity_id=d.identity_id, identity_deleted=d.identity_deleted)
            for d in deletions]
