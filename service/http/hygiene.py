"""Gallery hygiene: duplicate people and mislabelled faces in a collection (the `read` permission, scoped).

Mounted twice (app.py): unprefixed for the `default` collection, and under
`/collections/{collection}`. Both are scans of the whole collection over the gallery interface
(service/gallery/hygiene/), run in a worker thread; they change nothing. Each also runs as a job
(`POST .../duplicates/jobs`, `POST .../outliers/jobs`: service/jobs/scan.py), for collections whose scan
outlasts a request."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from starlette.concurrency import run_in_threadpool

from ..access.policy import Permission
from ..errors import ErrorCode, ServiceError
from ..gallery.api import Actor, GalleryBackend
from ..gallery.hygiene.duplicates import (
    DuplicateScan,
    comparisons_for,
    find_duplicates,
    listing_score,
    scan_ef,
)
from ..gallery.hygiene.outliers import OutlierScan, find_outliers
from ..jobs.migrate import JobFailed
from ..jobs.scan import DUPLICATES, OUTLIERS, Scan, of_its_collection, start_scan
from ..jobs.store import JobRecord
from ..state import ServiceState
from .deps import ActorDep, CollectionDep, StateDep, allow
from .jobs import job_out
from .payload import StrictRoute
from .schemas import (
    NO_NUL,
    BestOtherOut,
    DuplicateEvidence,
    DuplicatePairOut,
    DuplicatesJobRequest,
    DuplicatesResponse,
    ErrorResponse,
    Job,
    JobCreated,
    OutlierOut,
    OutliersJobRequest,
    OutliersResponse,
)

log = logging.getLogger(__name__)
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 415, 422)}
router = APIRouter(route_class=StrictRoute, tags=["hygiene"], dependencies=[allow(Permission.read, scoped=True)], responses=ERRORS)

Limit = Annotated[int, Query(ge=1, le=1000, description="At most this many items.")]


@router.get("/duplicates", response_model=DuplicatesResponse, summary="Identities that are probably one person")
async def duplicates(
    state: StateDep,
    gallery: CollectionDep,
    min_score: Annotated[float | None, Query(ge=-1.0, le=1.0, description="List pairs whose best face pair "
                                             "scores at least this (instead of max_false_alarm).")] = None,
    max_false_alarm: Annotated[float | None, Query(gt=0.0, lt=1.0, description="Without min_score: list pairs "
                                                   "from the score at which the family-wise false-alarm probability "
                                                   "of the scan is this (default FACE_DUPLICATES_MAX_FALSE_ALARM).")
                               ] = None,
    limit: Limit = 100,
    evidence: Annotated[int, Query(ge=1, le=20, description="Face pairs shown per identity pair.")] = 3,
) -> DuplicatesResponse:
    """Pairs of different identities whose faces match each other, best first, each with its
    evidence (the best face pairs) and the estimated family-wise false-alarm probability of its score:
    the chance that two different people score that high somewhere in a scan of this many comparisons,
    from the model's impostor tail (or the gallery's own calibration). A kNN self-join through the
    collection's index (each face searched for its nearest other identities), not all pairs. Faces that
    do not match their own identity (see `/outliers`) give no evidence."""
    return await run_in_threadpool(_duplicates, state, gallery, min_score, max_false_alarm, limit, evidence)


@router.post("/duplicates/jobs", status_code=202, response_model=JobCreated,
             summary="Scan for duplicates in the background")
async def start_duplicates_job(state: StateDep, gallery: CollectionDep, actor: ActorDep,
                               body: DuplicatesJobRequest) -> JobCreated:
    """The scan of `GET /duplicates` (the same parameters and answer) as a job: minutes at a million
    faces, longer than a proxy or a client waits for one request. Answers 202 with the job; `GET
    .../duplicates/jobs/{job_id}` reads it (its `duplicates` once `done`). One job per collection at a
    time (a scan or a migration): 409 `job_running`. A scan cannot be cut short: a job cancelled
    (`POST /jobs/{id}/cancel`, admin) finishes its scan and drops the answer."""
    return await _start_scan_job(state, gallery, actor, DUPLICATES, body.model_dump())


@router.get("/duplicates/jobs/{job_id}", response_model=Job, summary="Read a duplicates scan job")
async def get_duplicates_job(job_id: Annotated[str, Path(max_length=64, pattern=NO_NUL)], state: StateDep,
                             gallery: CollectionDep) -> Job:
    """Its state and, once `done`, `duplicates`: what `GET /duplicates` would have answered. 404
    `job_not_found` for a job that is not a duplicates scan of this collection."""
    return await _scan_job(state, gallery, DUPLICATES, job_id)


async def _start_scan_job(state: ServiceState, gallery: GalleryBackend, actor: Actor | None, kind: str,
                          params: dict[str, Any]) -> JobCreated:
    try:
        job = await run_in_threadpool(start_scan, state.galleries, kind, gallery.name,
                                      state.served_for(gallery).name, params, actor)
    except JobFailed as exc:
        raise ServiceError(exc.code, str(exc), collection=gallery.name) from None
    if state.jobs is not None:
        state.jobs.wake()
    return JobCreated(job=job_out(job))


async def _scan_job(state: ServiceState, gallery: GalleryBackend, kind: str, job_id: str) -> Job:
    """A scan job of ``kind`` of this collection: any other job is 404, so a scoped key reads its own only."""
    job = await run_in_threadpool(state.galleries.get_job, job_id)
    if (job is None or job.kind != kind or job.collection != gallery.name or job.state == "creating"
            or not await run_in_threadpool(of_its_collection, state.galleries, job)):  # (not one made anew)
        raise ServiceError(ErrorCode.job_not_found, f"no {kind} scan {job_id!r} of this collection",
                           job_id=job_id[:64])
    return job_out(job)


def duplicates_scan(state: ServiceState) -> Scan:
    """The work of a duplicates scan job (the job runner runs it, jobs/scan.py): its answer as a dict."""
    def scan(job: JobRecord) -> dict[str, Any]:
        params = job.progress.get("params") or {}
        answer = _duplicates(state, state.galleries.collection(job.collection), params.get("min_score"),
                             params.get("max_false_alarm"), int(params.get("limit", 100)),
                             int(params.get("evidence", 3)))
        return answer.model_dump(mode="json")
    return scan


def _duplicates(state: ServiceState, gallery: GalleryBackend, min_score: float | None, max_false_alarm: float | None,
                limit: int, evidence: int) -> DuplicatesResponse:
    scan, target = _scan_duplicates(state, gallery, min_score, max_false_alarm, limit, evidence)
    log.info("duplicates scanned", extra={"collection": gallery.name, "faces": scan.faces_scanned,
                                          "pairs": len(scan.pairs), "elapsed_ms": scan.elapsed_ms})
    return DuplicatesResponse(
        pairs=[DuplicatePairOut(identity_a=p.identity_a, identity_b=p.identity_b, score=p.score,
                                false_alarm_probability=p.false_alarm_probability,
                                evidence=[DuplicateEvidence(face_a=e.face_a, face_b=e.face_b, score=e.score)
                                          for e in p.evidence]) for p in scan.pairs],
        min_score=scan.min_score, max_false_alarm=target, comparisons=scan.comparisons,
        family_comparisons=scan.family_comparisons, faces_scanned=scan.faces_scanned, elapsed_ms=scan.elapsed_ms,
        model_id=gallery.model_id)


def _scan_duplicates(state: ServiceState, gallery: GalleryBackend, min_score: float | None,
                     max_false_alarm: float | None, limit: int, evidence: int) -> tuple[DuplicateScan, float | None]:
    decision = state.open_set_threshold(gallery)
    comparisons = comparisons_for(gallery)
    target = None
    if min_score is None:
        if decision.tail is None:  # nothing to size a false-alarm rate with: the collection's 1:N threshold
            min_score = decision.threshold
        else:
            target = max_false_alarm if max_false_alarm is not None else state.settings.duplicates_max_false_alarm
            min_score = listing_score(decision.tail, target, comparisons)
    scan = find_duplicates(gallery, decision.tail, min_score, state.served_for(gallery).verify_threshold, comparisons,
                           limit, evidence, ef=scan_ef(state.settings.duplicates_scan_ef, gallery.face_count),
                           method=state.settings.duplicates_scan)
    return scan, target


@router.get("/outliers", response_model=OutliersResponse, summary="Faces that do not match their own identity")
async def outliers(
    state: StateDep,
    gallery: CollectionDep,
    limit: Limit = 100,
    min_score: Annotated[float | None, Query(ge=-1.0, le=1.0, description="A face whose best score against its "
                                             "identity's other faces is below this is listed (default: the 1:1 "
                                             "verify threshold in force).")] = None,
) -> OutliersResponse:
    """Faces that match their own identity's other faces worse than the 1:1 threshold (probably filed
    under the wrong identity, or a poor photo), worst first, each with the other identity it matches
    best at or above the threshold (`best_other`, null when none does). Only identities with two or
    more faces are checked."""
    return await run_in_threadpool(_outliers, state, gallery, min_score, limit)


@router.post("/outliers/jobs", status_code=202, response_model=JobCreated,
             summary="Scan for outliers in the background")
async def start_outliers_job(state: StateDep, gallery: CollectionDep, actor: ActorDep,
                             body: OutliersJobRequest) -> JobCreated:
    """The scan of `GET /outliers` (the same parameters and answer) as a job, for a collection whose
    scan outlasts a request. Answers 202 with the job; `GET .../outliers/jobs/{job_id}` reads it (its
    `outliers` once `done`). One job per collection at a time (a scan or a migration): 409
    `job_running`. A job cancelled (`POST /jobs/{id}/cancel`, admin) finishes its scan and drops the
    answer."""
    return await _start_scan_job(state, gallery, actor, OUTLIERS, body.model_dump())


@router.get("/outliers/jobs/{job_id}", response_model=Job, summary="Read an outliers scan job")
async def get_outliers_job(job_id: Annotated[str, Path(max_length=64, pattern=NO_NUL)], state: StateDep,
                           gallery: CollectionDep) -> Job:
    """Its state and, once `done`, `outliers`: what `GET /outliers` would have answered. 404
    `job_not_found` for a job that is not an outliers scan of this collection."""
    return await _scan_job(state, gallery, OUTLIERS, job_id)


def outliers_scan(state: ServiceState) -> Scan:
    """The work of an outliers scan job (the job runner runs it, jobs/scan.py): its answer as a dict."""
    def scan(job: JobRecord) -> dict[str, Any]:
        params = job.progress.get("params") or {}
        answer = _outliers(state, state.galleries.collection(job.collection), params.get("min_score"),
                           int(params.get("limit", 100)))
        return answer.model_dump(mode="json")
    return scan


def _outliers(state: ServiceState, gallery: GalleryBackend, min_score: float | None, limit: int) -> OutliersResponse:
    threshold = min_score if min_score is not None else state.served_for(gallery).verify_threshold
    scan: OutlierScan = find_outliers(gallery, threshold, limit)
    log.info("outliers scanned", extra={"collection": gallery.name, "faces": scan.faces_scanned,
                                        "outliers": len(scan.faces)})
    return OutliersResponse(
        faces=[OutlierOut(identity_id=o.identity_id, face_id=o.face_id, own_score=o.own_score,
                          best_other=None if o.best_other is None else BestOtherOut(
                              identity_id=o.best_other.identity_id, score=o.best_other.score,
                              face_id=o.best_other.face_id)) for o in scan.faces],
        threshold=threshold, identities_checked=scan.identities_checked, faces_scanned=scan.faces_scanned,
        model_id=gallery.model_id)
