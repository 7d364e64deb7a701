"""Verify and identify: the routes that read a collection (the `read` permission, in the key's scope).

Mounted twice (app.py): unprefixed for the `default` collection, and under
`/collections/{collection}`; `CollectionDep` resolves which."""

from __future__ import annotations

import unicodedata
from typing import Any, NamedTuple

import numpy as np
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from ..access.policy import Permission
from ..errors import ErrorCode, ServiceError
from ..faces.pipeline import FaceBatch
from ..gallery.api import GalleryBackend, Match
from ..gallery.identity_ids import NEVER_STORED, find_identity
from ..gallery.openset import GalleryCounts, IdentifyThreshold
from ..model.calibration import counted_faces
from ..state import ServiceState
from .deps import CollectionDep, ServedDep, StateDep, allow, charge_faces
from .payload import StrictRoute, body_docs, read_payload
from .schemas import (
    Candidate,
    ErrorResponse,
    IdentifyRequest,
    IdentifyResponse,
    ProbeResult,
    VerifyRequest,
    VerifyResponse,
)
from .vectors import list_source, source_vectors, verify_source

ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 415, 422)}
router = APIRouter(route_class=StrictRoute, tags=["recognition"], dependencies=[allow(Permission.read, scoped=True)],
                   responses=ERRORS)


@router.post("/verify", response_model=VerifyResponse,
             openapi_extra=body_docs(VerifyRequest, (), ("image_a", "image_b")), summary="Same person?")
async def verify(request: Request, state: StateDep, gallery: CollectionDep, served: ServedDep) -> VerifyResponse:
    """Face vs face (`image_a` + `image_b`) or face vs enrolled identity (`image_a` + `identity_id`).
    Embeddings instead of images: `embedding_a` (+ `embedding_b`) with the served `model_id`.

    Against an identity the similarity is the best over its enrolled faces. The decision uses the
    request's `threshold`, else the service's, else the model's calibrated 1:1 threshold. Photos:
    the face `multi_face` picks (`largest` or `center`) is compared, and `face_a`/`face_b` say where.
    """
    payload, images = await read_payload(request, VerifyRequest, (), ("image_a", "image_b"), max_images=2,
                                         single_vector_fields=("embedding_a", "embedding_b"),
                                         dimension=served.dim)
    source = verify_source(payload, images)
    threshold = payload.threshold if payload.threshold is not None else served.verify_threshold
    identity_id = payload.identity_id  # as stored, once found
    if payload.identity_id is not None:
        identity_id, enrolled = await run_in_threadpool(find_identity, payload.identity_id,
                                                        gallery.identity_embeddings)
        if len(enrolled) == 0:
            raise ServiceError(ErrorCode.identity_not_found, f"identity {identity_id!r} is not enrolled",
                               identity_id=identity_id)
        probe, faces = await source_vectors(state, source, served)
        similarity = float(np.max(enrolled @ probe[0]))
    else:
        probe, faces = await source_vectors(state, source, served)
        similarity = float(probe[0] @ probe[1])
    located = faces.locations() or [None, None]
    return VerifyResponse(similarity=similarity, threshold=threshold, match=similarity >= threshold,
                          model_id=served.model_id, identity_id=identity_id,
                          face_a=located[0], face_b=located[1] if len(located) > 1 else None)


@router.post("/identify", response_model=IdentifyResponse, openapi_extra=body_docs(IdentifyRequest, ("images",)),
             summary="Who is this? (open set)")
async def identify(request: Request, state: StateDep, gallery: CollectionDep, served: ServedDep) -> IdentifyResponse:
    """Top-k enrolled identities per probe face. Open set: when the best score is below the
    threshold the probe is `unknown` (`identity_id: null`), with the candidates still listed.

    Photos with `multi_face: all` give one result per face found, each with its `image_index` and
    `face` box. The default threshold is the 1:N one: it holds `FACE_IDENTIFY_FPIR` (the share of
    never-enrolled faces named as someone) for the collection's current size, rising as it grows, since
    with more faces to match an unknown face is more likely to resemble one by chance. The answer says
    which threshold was used and why; each candidate's `stranger_probability` is the estimated chance
    that a stranger scores that high in this gallery.
    Probe embeddings instead of images: `embeddings` with the served `model_id`. Enrolled faces as
    probes: `face_ids` (one result each, with `probe_face_id`; 404 `face_not_found` for a face not in
    the collection), or a whole enrolled identity: `identity_id` (one result, each candidate scored by
    its best over the identity's faces); the probe's own identity is never a candidate.
    `among` (with images or embeddings): only these enrolled identities are candidates, scored exactly,
    at the threshold of a gallery of just them (an access list checked without a collection of its own).
    """
    payload, images = await read_payload(request, IdentifyRequest, ("images",),
                                         max_images=state.settings.max_faces_per_request, vector_fields=("embeddings",),
                                         dimension=served.dim)
    if payload.top_k > state.settings.max_top_k:
        raise ServiceError(ErrorCode.invalid_request, f"top_k may be at most {state.settings.max_top_k}")
    if payload.face_ids is not None or payload.identity_id is not None:
        if payload.among is not None:
            raise ServiceError(ErrorCode.invalid_request, "`among` limits a search of `images` or `embeddings`, not of "
                               "enrolled faces (`face_ids`, `identity_id`)")
        return await _identify_enrolled(request, state, gallery, payload)
    probes, faces = await source_vectors(state, list_source(payload, images), served)
    quality = faces.qualities(state.settings.enroll_min_quality) if faces.quality else [None] * len(probes)
    # probes refused by min_quality are not searched: they get low_quality, not a guess
    refused = _low_quality(faces, payload.min_quality)
    searched = [i for i in range(len(probes)) if refused[i] is None]
    # the threshold is sized by the gallery as searched (it may grow while the probes are embedded);
    # chosen in the same worker call as the search: it stat()s the calibration file, not on the loop
    if payload.among is not None:
        found, decision = await run_in_threadpool(_search_among, state, gallery, probes[searched], payload.top_k,
                                                  payload.threshold, payload.among)
    else:
        found, decision = await run_in_threadpool(_search_and_threshold, state, gallery, probes[searched],
                                                  payload.top_k, payload.threshold)
    matches: list[list] = [[] for _ in range(len(probes))]
    for i, candidates in zip(searched, found):
        matches[i] = candidates
    if faces.crops and payload.among is None and state.shadow.target_of(gallery.name) is not None:  # jobs/shadow.py
        state.shadow.offer(state, gallery.name, [faces.crops[i] for i in searched],
                           [matches[i][0] if matches[i] else None for i in searched])
    threshold = decision.threshold
    located = faces.locations() or [None] * len(matches)
    results = []
    for candidates, image_index, face, probe_quality, error in zip(matches, faces.image_index, located, quality,
                                                                  refused):
        best = candidates[0] if candidates else None
        known = best is not None and best.score >= threshold
        results.append(ProbeResult(
            image_index=image_index,
            face=face,
            identity_id=best.identity_id if known else None,
            known=known,
            score=best.score if best else None,
            candidates=[Candidate(identity_id=m.identity_id, score=m.score, face_id=m.face_id,
                                  stranger_probability=decision.stranger_probability(m.score)) for m in candidates],
            quality=probe_quality,
            error=error,
        ))
    return IdentifyResponse(results=results, threshold=threshold, threshold_source=decision.source,
                            fpir_target=decision.fpir_target, fpir_estimated=decision.fpir_estimated,
                            gallery_identities=decision.counts.identities, gallery_faces=decision.counts.faces,
                            model_id=served.model_id)


def _low_quality(faces: FaceBatch, min_quality: float | None) -> list[dict | None]:
    """Per probe: the ``low_quality`` error body when ``min_quality`` refuses it, else None. Client
    embeddings have no quality and are never refused."""
    if min_quality is None or not faces.quality:
        return [None] * len(faces.image_index)
    out: list[dict | None] = []
    for quality in faces.quality:
        reasons = quality.failures(min_quality)
        out.append({"code": ErrorCode.low_quality.value, "message": "the probe is below min_quality",
                    "details": {"reasons": reasons}} if reasons else None)
    return out


class _Searched(NamedTuple):
    matches: list  # per probe, its candidates best first (the gallery's search)
    decision: IdentifyThreshold


def _search_and_threshold(state: ServiceState, gallery: GalleryBackend, probes: np.ndarray, top_k: int,
                          requested: float | None) -> _Searched:
    matches = gallery.search(probes, top_k) if len(probes) else []
    return _Searched(matches, state.open_set_threshold(gallery, requested))


def _search_among(state: ServiceState, gallery: GalleryBackend, probes: np.ndarray, top_k: int,
                  requested: float | None, among: list[str]) -> _Searched:
    """``among``: the probes scored exactly against every face of these identities (each found as given,
    or else in its NFC or NFD form, as identity lookups do), and the threshold of a gallery of just these:
    the collection's FPIR over their counts (its n_eff), so a short access list is not held to the
    threshold of the whole collection. 404 ``identity_not_found`` naming every id not enrolled."""
    wanted = list(dict.fromkeys(among))
    for name in wanted:
        if NEVER_STORED.search(name):  # no identity has one; PostgreSQL could not even be asked (NUL)
            raise ServiceError(ErrorCode.invalid_identity_id, "an id in `among` holds a control character",
                               identity_id=name)
    forms = {name: list(dict.fromkeys((name, unicodedata.normalize("NFC", name), unicodedata.normalize("NFD", name))))
             for name in wanted}
    asked = sorted({form for group in forms.values() for form in group})
    found = gallery.search_among(probes, asked, len(asked))  # all of them: the forms not chosen are dropped below
    chosen = {name: next((form for form in forms[name] if form in found.faces), None) for name in wanted}
    missing = [name for name, form in chosen.items() if form is None]
    if missing:
        raise ServiceError(ErrorCode.identity_not_found, f"identity {missing[0]!r} is not enrolled" if len(missing) == 1
                           else f"{len(missing)} of the identities in `among` are not enrolled", identity_ids=missing)
    keep = set(chosen.values())
    sizes = [found.faces[form] for form in keep if form is not None]
    counts = GalleryCounts(len(sizes), sum(sizes), sum(counted_faces(n) for n in sizes))
    decision = state.decision_for(counts, requested, state.served_for(gallery), fpir=gallery.identify_fpir)
    return _Searched([[m for m in matches if m.identity_id in keep][:top_k] for matches in found.matches], decision)


# --- probes that are already enrolled: face_ids, identity_id -------------------------------------
async def _identify_enrolled(request: Request, state: ServiceState, gallery: GalleryBackend,
                             payload: IdentifyRequest) -> IdentifyResponse:
    """/identify with enrolled faces as the probes (``face_ids``: one result each, in order) or a whole
    identity (``identity_id``: one result, each candidate scored by its best over the identity's
    faces). The probe's own identity is never a candidate: top_k + 1 are searched and it is dropped."""
    given = [name for name in ("images", "embeddings", "face_ids", "identity_id") if getattr(payload, name) is not None]
    if len(given) != 1:
        raise ServiceError(ErrorCode.invalid_request,
                           "give exactly one probe source: images, embeddings, face_ids or identity_id", given=given)
    if payload.face_ids is not None:
        limit = state.settings.max_faces_per_request
        if len(payload.face_ids) > limit:
            raise ServiceError(ErrorCode.too_many_faces, f"{len(payload.face_ids)} face ids in one request; the limit "
                               f"is {limit}", limit=limit)
        charge_faces(request, len(payload.face_ids))
        return await run_in_threadpool(_by_face_ids, state, gallery, payload, payload.face_ids)
    charge_faces(request, 1)
    return await run_in_threadpool(_by_identity, state, gallery, payload, payload.identity_id or "")


def _others(matches: list[Match], own: str, top_k: int) -> list[Match]:
    return [m for m in matches if m.identity_id != own][:top_k]


def _by_face_ids(state: ServiceState, gallery: GalleryBackend, payload: IdentifyRequest,
                 face_ids: list[int]) -> IdentifyResponse:
    stored = gallery.face_embeddings(face_ids)
    missing = [f for f in dict.fromkeys(face_ids) if f not in stored]
    if missing:
        raise ServiceError(ErrorCode.face_not_found, f"no face {missing[0]} in this collection"
                           if len(missing) == 1 else f"{len(missing)} of the face ids are not in this collection",
                           face_ids=missing)
    probes = np.stack([stored[f][1] for f in face_ids]).astype(np.float32, copy=False)
    found, decision = _search_and_threshold(state, gallery, probes, payload.top_k + 1, payload.threshold)
    results = [_result(decision, _others(matches, stored[face_id][0], payload.top_k), index, face_id)
               for index, (face_id, matches) in enumerate(zip(face_ids, found))]
    return _response(gallery, decision, results)


def _by_identity(state: ServiceState, gallery: GalleryBackend, payload: IdentifyRequest,
                 identity_id: str) -> IdentifyResponse:
    stored_as, vectors = find_identity(identity_id, gallery.identity_embeddings)
    if len(vectors) == 0:
        raise ServiceError(ErrorCode.identity_not_found, f"identity {identity_id!r} is not enrolled",
                           identity_id=identity_id)
    found, decision = _search_and_threshold(state, gallery, vectors, payload.top_k + 1, payload.threshold)
    best: dict[str, Match] = {}  # each other identity by its best score over the probe identity's faces
    for matches in found:
        for m in matches:
            if m.identity_id != stored_as and (m.identity_id not in best or m.score > best[m.identity_id].score):
                best[m.identity_id] = m
    ranked = sorted(best.values(), key=lambda m: m.score, reverse=True)[:payload.top_k]
    return _response(gallery, decision, [_result(decision, ranked, 0, None)])


def _result(decision: IdentifyThreshold, candidates: list[Match], index: int, face_id: int | None) -> ProbeResult:
    best = candidates[0] if candidates else None
    known = best is not None and best.score >= decision.threshold
    return ProbeResult(
        image_index=index, face=None, identity_id=best.identity_id if known else None, known=known,
        score=best.score if best else None,
        candidates=[Candidate(identity_id=m.identity_id, score=m.score, face_id=m.face_id,
                              stranger_probability=decision.stranger_probability(m.score)) for m in candidates],
        probe_face_id=face_id)


def _response(gallery: GalleryBackend, decision: IdentifyThreshold, results: list[ProbeResult]) -> IdentifyResponse:
    return IdentifyResponse(results=results, threshold=decision.threshold, threshold_source=decision.source,
                            fpir_target=decision.fpir_target, fpir_estimated=decision.fpir_estimated,
                            gallery_identities=decision.counts.identities, gallery_faces=decision.counts.faces,
                            model_id=gallery.model_id)
