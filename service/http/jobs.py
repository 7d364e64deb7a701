"""Jobs: migrating a collection to another served model (service/jobs), all `admin`; duplicates scans
(service/jobs/scan.py) are started and read through their own routes (http/hygiene.py), and listed,
cancelled and resumed here.

``POST /collections/{collection}/migrate`` starts one (202); ``GET /jobs``, ``GET /jobs/{job_id}``
watch it; ``POST /jobs/{job_id}/cancel`` and ``/resume`` stop and continue it. The work runs in the
process's job runner (service/jobs/runner.py), never on the request path.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from starlette.concurrency import run_in_threadpool

from ..access.policy import Permission
from ..errors import ErrorCode, ServiceError
from ..jobs.migrate import JobFailed, start_migration
from ..jobs.scan import INCARNATION, SCANS
from ..jobs.store import FINISHED_STATES, STATES, JobRecord, JobRunning
from .deps import ActorDep, StateDep, allow, resolve_collection
from .payload import StrictRoute
from .schemas import NO_NUL, ErrorResponse, Job, JobCreated, JobList, MigrateRequest

ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 415, 422)}
router = APIRouter(route_class=StrictRoute, tags=["jobs"], responses=ERRORS)
JobId = Annotated[str, Path(max_length=64, pattern=NO_NUL)]


def job_out(job: JobRecord) -> Job:
    scan = job.kind in SCANS  # its report is the scan's answer, under its kind; its progress holds its parameters
    return Job.model_validate({
        "id": job.job_id, "kind": job.kind, "state": job.state, "collection": job.collection, "into": job.into,
        "model": job.model, "model_id": job.model_id, "source_model_id": job.source_model_id, "shadow": job.shadow,
        "progress": {"phase": "copy", "identities_done": 0, "identities_total": 0, "faces_done": 0,
                     "faces_total": 0, **{k: v for k, v in job.progress.items() if k not in ("params", INCARNATION)}},
        "created_at": job.created_at, "updated_at": job.updated_at, "finished_at": job.finished_at,
        "started_by": job.started_by, "error": job.error, "report": None if scan else job.report,
        **({job.kind: job.report} if scan else {})})


def _failed(exc: JobFailed, **details: Any) -> ServiceError:
    return ServiceError(exc.code, str(exc), **details)


@router.post("/collections/{collection}/migrate", status_code=202, response_model=JobCreated,
             summary="Migrate a collection to another model", dependencies=[allow(Permission.admin, scoped=True)])
async def migrate_collection(collection: str, body: MigrateRequest, state: StateDep, actor: ActorDep,
                             request: Request) -> JobCreated:
    """Creates `into` pinned to `model` (with `keep_crops`), then re-embeds every face of the collection
    from its kept crops in the background; writes to the collection meanwhile reach `into` before the
    job is `done`; then the two are compared (`report`). 404 `collection_not_found` / `model_not_found`,
    409 `no_source_crops` (faces without a kept crop: re-enroll from folders instead), 409
    `collection_exists`, 409 `job_running` (one job per collection at a time), 409 `crop_key_missing`.
    Nothing is created when an error is returned. `{collection}` may be an alias (resolved once here)."""
    served = state.model_named(body.model)
    collection = await resolve_collection(request)  # an alias: the collection it points to now, once
    try:
        job = await run_in_threadpool(start_migration, state.galleries, collection, served.name, served.model_id,
                                      served.dim, body.into, body.batch_size, body.shadow, actor)
    except JobFailed as exc:
        raise _failed(exc, collection=collection, into=body.into) from None
    if state.jobs is not None:
        state.jobs.wake()
    return JobCreated(job=job_out(job))


@router.get("/jobs", response_model=JobList, summary="List jobs", dependencies=[allow(Permission.admin)])
async def list_jobs(state: StateDep, collection: str | None = Query(None, max_length=63, pattern=NO_NUL),
                    job_state: str | None = Query(None, alias="state", pattern=NO_NUL, description=", ".join(STATES),
                                                  json_schema_extra={"enum": list(STATES)}),
                    limit: int = Query(100, ge=1, le=1000)) -> JobList:
    """Newest first; `collection` (the source) and `state` filter."""
    if job_state is not None and job_state not in STATES:
        raise ServiceError(ErrorCode.invalid_request, f"state is one of {', '.join(STATES)}", state=job_state[:50])
    jobs = await run_in_threadpool(state.galleries.list_jobs, collection, job_state, limit)
    return JobList(items=[job_out(j) for j in jobs])


async def _job(state: StateDep, job_id: str) -> JobRecord:
    job = await run_in_threadpool(state.galleries.get_job, job_id)
    if job is None or job.state == "creating":
        raise ServiceError(ErrorCode.job_not_found, f"no job {job_id!r}", job_id=job_id[:64])
    return job


@router.get("/jobs/{job_id}", response_model=Job, summary="Read a job", dependencies=[allow(Permission.admin)])
async def get_job(job_id: JobId, state: StateDep) -> Job:
    """Its state, progress, error and report. 404 `job_not_found`."""
    return job_out(await _job(state, job_id))


@router.post("/jobs/{job_id}/cancel", response_model=Job, summary="Cancel a job",
             dependencies=[allow(Permission.admin)])
async def cancel_job(job_id: JobId, state: StateDep, actor: ActorDep) -> Job:
    """Stops it after its current batch; what was copied into `into` stays (delete it with DELETE
    /collections/{into}, or resume the job). 409 `job_finished` when done or failed."""
    job = await _job(state, job_id)
    now = time.time()
    changed = await run_in_threadpool(
        state.galleries.update_job, job_id, {"state": "cancelled", "finished_at": now, "updated_at": now},
        ("queued", "running"), False, ("job.cancelled", actor))
    job = await _job(state, job_id)
    if not changed and job.state != "cancelled":
        raise ServiceError(ErrorCode.job_finished, f"job {job_id!r} is {job.state} already", job_id=job_id,
                           state=job.state)
    return job_out(job)


@router.post("/jobs/{job_id}/resume", response_model=Job, summary="Resume a job",
             dependencies=[allow(Permission.admin)])
async def resume_job(job_id: JobId, state: StateDep, actor: ActorDep) -> Job:
    """A `failed` or `cancelled` job continues from where it stopped. 409 `job_finished` if done,
    409 `job_running` if queued or running (or another job of its collection is)."""
    job = await _job(state, job_id)
    if job.state == "done":
        raise ServiceError(ErrorCode.job_finished, f"job {job_id!r} is done", job_id=job_id, state=job.state)
    try:
        changed = await run_in_threadpool(
            state.galleries.update_job, job_id, {"state": "queued", "error": None, "finished_at": None,
                                                 "updated_at": time.time(), "heartbeat": None, "owner": None},
            tuple(s for s in FINISHED_STATES if s != "done"), False, ("job.resumed", actor))
    except JobRunning:
        raise ServiceError(ErrorCode.job_running, f"another job of collection {job.collection!r} is queued or "
                           "running", job_id=job_id, collection=job.collection) from None
    if not changed:
        job = await _job(state, job_id)
        code = ErrorCode.job_finished if job.state == "done" else ErrorCode.job_running
        raise ServiceError(code, f"job {job_id!r} is {job.state}", job_id=job_id, state=job.state)
    if state.jobs is not None:
        state.jobs.wake()
    return job_out(await _job(state, job_id))
