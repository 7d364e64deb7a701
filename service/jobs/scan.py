"""Scans of a whole collection as jobs (kinds ``duplicates`` and ``outliers``): ``GET /duplicates`` at a
million faces takes minutes (156 s on 2 CPU cores), ``GET /outliers`` 7-29 s, and both grow with the
collection: longer than a proxy or a client waits for one answer.

``POST .../{kind}/jobs`` stores a job of that kind with the scan's parameters (in its ``progress``,
under ``params``) and answers 202; the process's job runner (runner.py) runs the scan off the request
path and stores its answer, the same as ``GET /{kind}`` gives, as the job's ``report``;
``GET .../{kind}/jobs/{id}`` reads it with the same scoped ``read`` permission. The
scan itself (what the route runs) is given to the runner by the app (``Scan``), so that this room
does not import the HTTP one. One job per collection at a time, scans and migrations alike (the job
store's rule): a second one is 409 ``job_running``. A scan cannot stop half-way: a cancelled one
finishes its scan and its answer is dropped; one whose runner died runs again from the start.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import ErrorCode
from ..gallery.api import Actor, CollectionNotFound, Galleries
from .migrate import JobFailed, queue, reserve
from .store import JobRecord, new_job_id

DUPLICATES = "duplicates"
OUTLIERS = "outliers"
SCANS = (DUPLICATES, OUTLIERS)  # the kinds of scan job (a migration is kind MIGRATE, store.py)

# runs a scan job's work (the job as stored: its collection, its progress["params"]); returns the report
Scan = Callable[[JobRecord], dict[str, Any]]
# in a scan job's progress: when the collection it scans was made. A collection deleted and made again
# under its name is another one (on the embedded backend its face ids start again at 1, naming other
# people): the scan is not its own (of_its_collection)
INCARNATION = "collection_created_at"


def start_scan(galleries: Galleries, kind: str, collection: str, model: str, params: dict[str, Any],
               actor: Actor | None = None) -> JobRecord:
    """Store a queued scan job of ``collection`` (a collection's own name), ``job.started`` audited in
    the write that queues it. JobFailed ``collection_not_found`` / ``job_running``; nothing stays then."""
    try:
        source = galleries.collection(collection)
        made = galleries.collection_info(collection).created_at
    except CollectionNotFound:
        raise JobFailed(ErrorCode.collection_not_found, f"no collection named {collection!r}") from None
    job = JobRecord(job_id=new_job_id(), kind=kind, collection=collection, into="", model=model,
                    model_id=source.model_id, source_model_id=source.model_id, state="creating", batch_size=0,
                    progress={"phase": "scan", "params": params, INCARNATION: made},
                    started_by=actor.key_id if actor is not None else None)
    reserve(galleries, job, "wait for it (a scan cannot be cut short)")
    return queue(galleries, job, actor)


def of_its_collection(galleries: Galleries, job: JobRecord) -> bool:
    """Whether the collection named by the scan job is still the one it was queued on (not deleted, nor
    made again under its name since). A job stored before INCARNATION was kept counts as its own."""
    made = job.progress.get(INCARNATION)
    try:
        return made is None or galleries.collection_info(job.collection).created_at == made
    except CollectionNotFound:
        return False
