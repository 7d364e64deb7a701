"""The job runner: one background thread per process that runs the stored jobs (store.py).

Every ``poll_s`` (or at once when woken by a new job) it takes one job it may run:

* a ``queued`` one (a new job, a resumed one), or
* a ``running`` one whose heartbeat is older than ``stale_s``: its runner died (a killed server, a
  replica gone), or its run ended without a word in its row (the database went away as it wrote its
  end); the job continues after its cursor (migrate.py).

Taking a job is a conditional UPDATE on the row's state and heartbeat as read (``update_job`` with
``expect_state``/``expect_heartbeat``): of several replicas (PostgreSQL) only one changes the row;
the others see no row changed and leave it. While a job runs, a ticker writes its heartbeat every
``stale_s / 6`` seconds, so a long phase (a catch-up listing, the comparison) is never taken for dead.
Every write of a run (progress, heartbeat, ``done``, ``failed``) is conditioned on the row being
``running`` *and* this runner's (``expect_owner``): a run cancelled, then resumed and taken by another
replica, or one taken over as stale (a paused process, a partition), would otherwise still store its
late answer over the new run's, or write its progress into the new run's row.
Rows of a POST that died between its job row and its target collection (``creating``) are removed
after ``2 * stale_s``, freeing their collection for a new job.

A job of kind ``migrate`` is a migration (``run_job``: migrate.py); one of the scans the app gave the
runner (``scans``: kind -> the work; ``run_scan``: scan.py) runs whole, from the start. A job of any
other kind (a newer replica's, during a rolling upgrade) is neither taken nor resumed here.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

from ..errors import ErrorCode
from ..gallery.api import CatalogDamaged, CollectionDamaged, CollectionNotFound, Galleries, TooManyFacesForCollection
from ..gallery.crops import CropAuthenticationFailed
from ..model.registry import ModelRegistry
from .migrate import Embed, JobFailed, JobStopped, Migration, model_embed
from .scan import Scan, of_its_collection
from .store import MIGRATE, JobRecord

log = logging.getLogger(__name__)

STALE_S = 30.0


def runner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def embedder_of(models: ModelRegistry) -> Callable[[str], Embed]:
    """The served model of a name as the migration embeds with it (its session, off the batcher's loop)."""
    return lambda name: model_embed(models.get(name).model)


def run_job(galleries: Galleries, embedder: Callable[[str], Embed], job: JobRecord, owner: str,
            on_done: Callable[[JobRecord], None] | None = None, compare: bool = True,
            stopping: threading.Event | None = None, stale_s: float = STALE_S) -> JobRecord:
    """Run a job this process holds (state ``running``, owner ``owner``) to its end; returns the row
    as stored at the end. Used by the runner thread and by the CLI's in-process migration.
    ``stopping`` set (the process stops): the job ends after its batch, left ``running``, and the
    next runner takes it once its heartbeat is stale."""
    def save(changes: dict) -> bool:
        if stopping is not None and stopping.is_set():
            return False
        return galleries.update_job(job.job_id, changes, expect_state=("running",), expect_owner=owner)

    ticker = _heartbeat(galleries, job, owner, stale_s, stopping)
    migration: Migration | None = None
    try:
        try:
            embed = embedder(job.model)
        except KeyError:
            raise JobFailed(ErrorCode.model_not_found, f"no model named {job.model!r} is served here") from None
        def finish(report: dict | None) -> None:  # holding the source's write fence (migrate.py)
            if stopping is not None and stopping.is_set():
                raise JobStopped(job.job_id)
            assert migration is not None
            now = time.time()
            if not galleries.update_job(job.job_id, {"state": "done", "progress": migration.progress, "report": report,
                                                     "updated_at": now, "finished_at": now, "heartbeat": now},
                                        expect_state=("running",), expect_owner=owner):
                raise JobStopped(job.job_id)

        migration = Migration(galleries, job, embed, save, compare=compare, finish=finish)
        log.info("job started", extra={"job": job.job_id, "collection": job.collection, "into": job.into})
        migration.run()
    except JobStopped:
        log.info("job stopped (cancelled or taken over)", extra={"job": job.job_id})
    except Exception as exc:  # noqa: BLE001 - any failure ends the job as failed, with its reason
        _fail(galleries, job, owner, exc, None if migration is None else migration.progress)
    finally:
        ticker()
    return _ended(galleries, job, on_done)


def _heartbeat(galleries: Galleries, job: JobRecord, owner: str | None, stale_s: float,
               stopping: threading.Event | None) -> Callable[[], None]:
    """Start writing the job's heartbeat every ``stale_s / 6`` s (while it is ``running`` and ``owner``'s: a
    long phase is never taken for dead); returns the function that stops it."""
    stop_ticker = threading.Event()

    def tick() -> None:
        while not stop_ticker.wait(stale_s / 6) and not (stopping is not None and stopping.is_set()):
            try:
                if not galleries.update_job(job.job_id, {"heartbeat": time.time()}, expect_state=("running",),
                                            expect_owner=owner):
                    return
            except Exception:  # noqa: BLE001 - the next tick tries again; the job itself reports failures
                log.warning("job heartbeat failed", extra={"job": job.job_id}, exc_info=True)

    ticker = threading.Thread(target=tick, name=f"job-heartbeat-{job.job_id}", daemon=True)
    ticker.start()

    def stop() -> None:
        stop_ticker.set()
        ticker.join()
    return stop


def run_scan(galleries: Galleries, scan: Scan, job: JobRecord, on_done: Callable[[JobRecord], None] | None = None,
             stale_s: float = STALE_S) -> JobRecord:
    """Run a scan job this process holds (scan.py; the job as taken: its ``owner``) to its end: its answer
    stored as the report, state ``done`` (if the job is still ``running`` and this run's: a cancelled
    one's answer is dropped, and so is one that comes in after another runner took the job), or ``failed``.
    The scan reads with the primary's WAL position at its start as its floor (``read_floor``): run without
    the client's token, it would otherwise read a standby in rotation that has not applied the writes
    answered before the job was queued."""
    ticker = _heartbeat(galleries, job, job.owner, stale_s, None)
    started = time.perf_counter()
    try:
        log.info("job started", extra={"job": job.job_id, "kind": job.kind, "collection": job.collection})
        _same_collection(galleries, job)
        with galleries.collection(job.collection).read_floor():  # no client token: not a lagging standby's
            report = scan(job)
        _same_collection(galleries, job)  # (not one deleted while it was scanned, nor made anew)
        now = time.time()
        faces = int(report.get("faces_scanned", 0))
        progress = {**job.progress, "phase": "done", "faces_done": faces, "faces_total": faces,
                    "faces_per_s": round(faces / max(time.perf_counter() - started, 1e-6), 1)}
        galleries.update_job(job.job_id, {"state": "done", "progress": progress, "report": report,
                                          "updated_at": now, "finished_at": now, "heartbeat": now},
                             expect_state=("running",), expect_owner=job.owner)
    except Exception as exc:  # noqa: BLE001 - any failure ends the job as failed, with its reason
        _fail(galleries, job, job.owner, exc)
    finally:
        ticker()
    return _ended(galleries, job, on_done)


def _same_collection(galleries: Galleries, job: JobRecord) -> None:
    """JobFailed ``collection_not_found`` unless the scan job's collection is the one it was queued on."""
    if not of_its_collection(galleries, job):
        raise JobFailed(ErrorCode.collection_not_found,
                        f"collection {job.collection!r} was deleted (or made anew under its name) since the scan was queued")


def _fail(galleries: Galleries, job: JobRecord, owner: str | None, exc: Exception, progress: dict | None = None) -> None:
    """The job ``failed`` with its reason (if it is still ``running`` and ``owner``'s), and its progress when given."""
    code, message = _failure(exc, job)
    log.warning("job failed", extra={"job": job.job_id, "code": code, "reason": str(exc)},
                exc_info=code == ErrorCode.internal_error.value)  # a stack for what has no code only
    now = time.time()
    changes: dict = {"state": "failed", "error": {"code": code, "message": message}, "updated_at": now,
                     "finished_at": now}
    if progress is not None:
        changes["progress"] = progress
    galleries.update_job(job.job_id, changes, expect_state=("running",), expect_owner=owner)


def _ended(galleries: Galleries, job: JobRecord, on_done: Callable[[JobRecord], None] | None) -> JobRecord:
    """The job as stored once its run ended, after ``on_done`` has seen it."""
    final = galleries.get_job(job.job_id) or job
    if on_done is not None:
        on_done(final)
    return final


def _failure(exc: Exception, job: JobRecord) -> tuple[str, str]:
    if isinstance(exc, JobFailed):
        return exc.code.value, str(exc)
    if isinstance(exc, CollectionNotFound):
        return ErrorCode.collection_not_found.value, f"collection {exc.name!r} no longer exists"
    if isinstance(exc, CropAuthenticationFailed):  # the key opened the check value at start: its bytes changed
        return ErrorCode.collection_damaged.value, (
            f"a kept crop of {job.collection!r} does not open: {exc}; it was altered in the store (a disk fault, "
            "a bad restore): restore the collection from a backup, or delete that face, then resume the job")
    if isinstance(exc, CollectionDamaged):  # the file it names is for the log (job.failed), not for clients
        return ErrorCode.collection_damaged.value, (
            f"the stored data of collection {exc.collection!r} is damaged (a disk fault, a bad restore): restore it "
            "from a backup, then resume the job")
    if isinstance(exc, CatalogDamaged):
        return ErrorCode.catalog_damaged.value, ("the service's catalog (collections, keys, jobs) is damaged: "
                                                 "restore it from a backup")
    if isinstance(exc, TooManyFacesForCollection):
        return ErrorCode.too_many_faces_for_collection.value, (
            f"{exc}: raise its max_faces (PATCH /collections/{exc.collection}), then resume the job")
    return ErrorCode.internal_error.value, f"{type(exc).__name__}: {exc}"


def shadow_pairs(galleries: Galleries) -> list[tuple[str, str, list[str]]]:
    """(source, target, aliases pointing at the source) of each finished shadow migration whose
    shadow traffic still applies (jobs/shadow.py): both collections exist and no alias points at the
    target yet (an alias re-pointed from the source to the target ends it). Newest job per source."""
    done = [job for job in galleries.list_jobs(state="done", limit=1000, kind=MIGRATE) if job.shadow]  # newest first
    if not done:  # every replica reads this every FACE_SHADOW_REFRESH_S: one query when nothing shadows
        return []
    collections = {info.name for info in galleries.list_collections()}
    aliases = {a.name: a.collection for a in galleries.list_aliases()}
    pairs: dict[str, tuple[str, str, list[str]]] = {}
    for job in done:
        if job.collection in pairs:
            continue
        if {job.collection, job.into} <= collections and job.into not in aliases.values():
            pairs[job.collection] = (job.collection, job.into,
                                     sorted(a for a, c in aliases.items() if c == job.collection))
    return list(pairs.values())


class JobRunner:
    """The process's job thread (module docstring). ``start()``/``stop()`` from the app's lifespan."""

    def __init__(self, galleries: Galleries, models: ModelRegistry, poll_s: float = 1.0,
                 stale_s: float = STALE_S, on_done: Callable[[JobRecord], None] | None = None,
                 scans: dict[str, Scan] | None = None) -> None:
        """``scans``: kind -> the work of a scan job of that kind (scan.py). A job of kind ``migrate`` is a
        migration; one of any other kind is left for a runner that knows it (``runs``)."""
        self.galleries = galleries
        self.scans = scans or {}
        self.models = models
        self.poll_s = poll_s
        self.stale_s = stale_s
        self.on_done = on_done
        self.owner = runner_id()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="jobs-runner", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop taking jobs. A job running now keeps its row ``running``: its heartbeat stops, and the
        next start (this replica's or another's) takes it after ``stale_s``."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self.claim()
                if job is not None and job.kind in self.scans:
                    run_scan(self.galleries, self.scans[job.kind], job, self.on_done, stale_s=self.stale_s)
                    continue
                if job is not None:
                    run_job(self.galleries, embedder_of(self.models), job, self.owner, self.on_done, stopping=self._stop,
                            stale_s=self.stale_s)
                    continue
            except Exception:  # noqa: BLE001 - keep the thread; the store stays the truth
                log.exception("job runner round failed")
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def runs(self, kind: str) -> bool:
        """Whether this runner knows jobs of ``kind``: a migration, or one of its scans. A job of a kind
        it does not know (one a newer replica started, in a rolling upgrade) is left for a replica that
        does, instead of being run as a migration and failed."""
        return kind == MIGRATE or kind in self.scans

    def claim(self) -> JobRecord | None:
        """Take one job this process may run, or None (a conditional UPDATE: one replica wins). Called
        between this runner's runs only: a stale ``running`` row of its own is one whose run ended
        without writing its end (the database went away as it stored its answer or its failure), taken
        again like any other's (on a single replica nobody else would)."""
        now = time.time()
        for job in self.galleries.list_jobs(state="creating", limit=100):
            if now - job.created_at > 2 * self.stale_s:  # its POST died before creating the target
                log.warning("removing a job whose start was interrupted", extra={"job": job.job_id})
                self.galleries.delete_job(job.job_id)
        for job in reversed(self.galleries.list_jobs(state="queued", limit=100)):  # oldest first
            if not self.runs(job.kind):
                continue
            taken = take(self.galleries, job, self.owner)
            if taken is not None:
                return taken
        for job in self.galleries.list_jobs(state="running", limit=100):
            if self.runs(job.kind) and (job.heartbeat is None or now - job.heartbeat > self.stale_s):
                taken = take(self.galleries, job, self.owner)  # (its own too: no run of it is in flight now)
                if taken is not None:
                    log.info("resuming a job whose runner stopped", extra={"job": job.job_id, "owner": job.owner})
                    return taken
        return None


def take(galleries: Galleries, job: JobRecord, owner: str) -> JobRecord | None:
    """Make ``job`` (as read) this runner's: state running, its owner and heartbeat, if nobody changed
    its state or heartbeat since it was read (else None: another runner was first)."""
    now = time.time()
    if galleries.update_job(job.job_id, {"state": "running", "owner": owner, "heartbeat": now, "updated_at": now},
                            expect_state=(job.state,), expect_heartbeat=job.heartbeat):
        return galleries.get_job(job.job_id)
    return None
