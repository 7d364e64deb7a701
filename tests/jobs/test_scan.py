"""Scan jobs (service/jobs/scan.py) on both backends, through the store and the runner's run_scan, with
scans that the test controls: one job per collection whatever its kind, the answer stored, a cancelled
scan's answer dropped, a failed one's reason kept. The whole road over HTTP is in
tests/service/test_hygiene_api.py and tests/clients."""

from __future__ import annotations

import threading
import time

import pytest

from service.gallery.api import Actor, AuditQuery, CollectionNotFound, Galleries
from service.gallery.open import make_gallery
from service.jobs.migrate import JobFailed
from service.jobs.runner import JobRunner, run_scan, shadow_pairs, take
from service.jobs.scan import DUPLICATES, start_scan
from service.jobs.store import JobRecord, MigrationUnfinished, new_job_id

MODEL, DIM = "m@1", 8
ALICE = Actor(key_id="key-alice", client="10.0.0.1", request_id="req-1")


@pytest.fixture
def galleries(gallery_settings):
    g = make_gallery(gallery_settings, MODEL, DIM)
    g.open()
    yield g
    g.close()


def scan_of(galleries: Galleries, **params) -> JobRecord:
    job = start_scan(galleries, DUPLICATES, "default", "sface", {"limit": 5, **params}, ALICE)
    taken = take(galleries, job, "this-runner")
    assert taken is not None and taken.state == "running"
    return taken


def test_one_job_per_collection_whatever_its_kind(galleries: Galleries):
    now = time.time()
    migration = JobRecord(job_id=new_job_id(), collection="default", into="copy", model="tiny", model_id="t@1",
                          source_model_id=MODEL, state="running", heartbeat=now, owner="another-runner")
    galleries.create_job(migration)
    with pytest.raises(JobFailed) as refused:
        start_scan(galleries, DUPLICATES, "default", "sface", {}, ALICE)
    assert refused.value.code.value == "job_running"
    assert [j.job_id for j in galleries.list_jobs(collection="default")] == [migration.job_id]  # nothing left
    with pytest.raises(JobFailed) as missing:
        start_scan(galleries, DUPLICATES, "nowhere", "sface", {}, ALICE)
    assert missing.value.code.value == "collection_not_found"
    galleries.update_job(migration.job_id, {"state": "done", "finished_at": now})
    job = start_scan(galleries, DUPLICATES, "default", "sface", {"evidence": 2}, ALICE)
    assert (job.kind, job.state, job.collection, job.into, job.model_id) == (DUPLICATES, "queued", "default", "", MODEL)
    assert job.started_by == ALICE.key_id and job.progress["params"] == {"evidence": 2}
    started = [e for e in galleries.audit(AuditQuery(collection="default", limit=100)) if e.action == "job.started"]
    assert [(e.details["job"], e.details["kind"], e.key_id) for e in started] == [  # in the write that queued it
        (job.job_id, DUPLICATES, ALICE.key_id)]


def test_the_answer_is_stored_a_cancelled_scans_is_dropped_a_failure_says_why(galleries: Galleries):
    job = scan_of(galleries, evidence=2)
    seen: list[dict] = []

    def scan(j: JobRecord) -> dict:
        seen.append(j.progress["params"])
        return {"pairs": [], "faces_scanned": 3, "min_score": 0.7}

    done = run_scan(galleries, scan, job)
    assert seen == [{"limit": 5, "evidence": 2}]
    assert (done.state, done.report, done.error) == ("done", {"pairs": [], "faces_scanned": 3, "min_score": 0.7}, None)
    assert done.progress["phase"] == "done" and done.progress["faces_done"] == 3 and done.finished_at is not None

    job = scan_of(galleries)
    release, running = threading.Event(), threading.Event()

    def slow(j: JobRecord) -> dict:
        running.set()
        release.wait(30)
        return {"pairs": [], "faces_scanned": 1}

    ended: list[JobRecord] = []
    runner = threading.Thread(target=lambda: ended.append(run_scan(galleries, slow, job, stale_s=0.6)))
    runner.start()
    assert running.wait(30)
    time.sleep(0.3)  # heartbeats go on while the scan runs (every stale_s / 6)
    beat = galleries.get_job(job.job_id)
    assert beat is not None and beat.heartbeat is not None and beat.heartbeat > job.heartbeat
    assert galleries.update_job(job.job_id, {"state": "cancelled", "finished_at": time.time()},
                                expect_state=("queued", "running"))
    release.set()
    runner.join(30)
    assert ended and (ended[0].state, ended[0].report) == ("cancelled", None)

    job = scan_of(galleries)

    def gone(j: JobRecord) -> dict:
        raise CollectionNotFound(j.collection)

    failed = run_scan(galleries, gone, job)
    assert failed.state == "failed" and failed.report is None
    assert failed.error is not None and failed.error["code"] == "collection_not_found"


def test_a_runner_leaves_a_job_of_a_kind_it_does_not_know(galleries: Galleries):
    """In a rolling upgrade a replica may meet a job that a newer replica started (a scan it does not
    have): it leaves it, queued or stale, for one that knows it, instead of running it as a migration
    (which failed it: 'collection '' no longer exists')."""
    job = start_scan(galleries, DUPLICATES, "default", "sface", {}, ALICE)
    older = JobRunner(galleries, None, stale_s=0.01)  # knows migrations only
    assert older.claim() is None
    assert galleries.get_job(job.job_id).state == "queued"
    newer = JobRunner(galleries, None, stale_s=0.01, scans={DUPLICATES: lambda j: {}})
    taken = newer.claim()
    assert taken is not None and (taken.job_id, taken.state, taken.owner) == (job.job_id, "running", newer.owner)
    time.sleep(0.05)  # its heartbeat is stale now: still not the older runner's to resume
    assert older.claim() is None
    assert galleries.get_job(job.job_id).owner == newer.owner


@pytest.fixture
def replica(gallery_settings, galleries):
    """Another replica's galleries on the same store (PostgreSQL: its own pool on the same schema; the
    embedded catalog is one process's, so the same object: what differs is the runner, its owner)."""
    if gallery_settings.database_url is None:
        yield galleries
        return
    other = make_gallery(gallery_settings, MODEL, DIM)
    other.open()
    yield other
    other.close()


def _held_scan(galleries: Galleries, job: JobRecord, report: dict, stale_s: float = 30.0):
    """Run ``job``'s scan in a thread that answers ``report`` once released; (release, thread, ended)."""
    release, running = threading.Event(), threading.Event()

    def scan(j: JobRecord) -> dict:
        running.set()
        release.wait(30)
        return report

    ended: list[JobRecord] = []
    thread = threading.Thread(target=lambda: ended.append(run_scan(galleries, scan, job, stale_s=stale_s)))
    thread.start()
    assert running.wait(30)
    return release, thread, ended


def test_a_scan_cancelled_resumed_and_taken_by_another_replica_keeps_that_replicas_answer(
        galleries: Galleries, replica: Galleries):
    """Replica A's scan is cancelled (it cannot stop: it finishes and drops its answer), the job resumed
    and taken by replica B. A's answer, of the collection as it was before, comes in while B scans: it
    is not the job's (B holds it now), and B's is stored."""
    job = scan_of(galleries)
    release, thread, ended = _held_scan(galleries, job, {"pairs": [], "faces_scanned": 1, "run": "A"})
    assert galleries.update_job(job.job_id, {"state": "cancelled", "finished_at": time.time()},
                                expect_state=("queued", "running"))
    assert galleries.update_job(job.job_id, {"state": "queued", "finished_at": None, "heartbeat": None, "owner": None},
                                expect_state=("cancelled",))
    queued = replica.get_job(job.job_id)
    assert queued is not None and queued.state == "queued"
    taken = take(replica, queued, "replica-b")
    assert taken is not None and taken.owner == "replica-b"

    release.set()  # A's late answer
    thread.join(30)
    assert ended
    now = replica.get_job(job.job_id)
    assert now is not None and (now.state, now.owner, now.report) == ("running", "replica-b", None)

    done = run_scan(replica, lambda j: {"pairs": [], "faces_scanned": 2, "run": "B"}, taken)
    assert (done.state, done.report) == ("done", {"pairs": [], "faces_scanned": 2, "run": "B"})


def test_a_runner_whose_job_was_taken_over_writes_nothing_more(galleries: Galleries, replica: Galleries):
    """A runner whose heartbeats stopped reaching the store (a paused process, a partition: here a
    heartbeat period longer than the test) loses its job to another replica after ``stale_s``; when it
    comes back, its answer and its failure are refused, and its heartbeats stop."""
    job = scan_of(galleries)
    release, thread, ended = _held_scan(galleries, job, {"pairs": [], "faces_scanned": 1, "run": "A"}, stale_s=3600)
    b = JobRunner(replica, None, stale_s=0.01, scans={DUPLICATES: lambda j: {}})
    time.sleep(0.05)  # A's heartbeat is older than B's stale_s now
    taken = b.claim()
    assert taken is not None and (taken.job_id, taken.owner) == (job.job_id, b.owner)
    release.set()
    thread.join(30)
    assert ended
    now = replica.get_job(job.job_id)
    assert now is not None and (now.state, now.owner, now.report, now.error) == ("running", b.owner, None, None)

    def gone(j: JobRecord) -> dict:
        raise CollectionNotFound(j.collection)

    stale = job.with_(owner="this-runner")  # A again, failing this time: still not its job
    run_scan(galleries, gone, stale)
    now = replica.get_job(job.job_id)
    assert now is not None and (now.state, now.owner, now.error) == ("running", b.owner, None)


def test_scans_do_not_crowd_a_shadow_migration_out_of_the_jobs_it_is_found_in(galleries: Galleries):
    """Scan jobs are rows of the same store: a thousand later scans (a nightly hygiene scan of a few
    collections, for a year) leave a done shadow migration's pair found (runner.shadow_pairs), and an
    unfinished migration's target still refused an alias (set_alias reads the newest migration into it)."""
    for name in ("people", "people-v2", "people-v3"):
        galleries.create_collection(name)
    made = time.time() - 3600
    galleries.create_job(JobRecord(job_id=new_job_id(), collection="people", into="people-v2", model="tiny",
                                   model_id="t@1", source_model_id=MODEL, state="done", shadow=True,
                                   created_at=made, finished_at=made))
    galleries.create_job(JobRecord(job_id=new_job_id(), collection="default", into="people-v3", model="tiny",
                                   model_id="t@1", source_model_id=MODEL, state="failed", created_at=made))
    for i in range(1001):
        galleries.create_job(JobRecord(job_id=new_job_id(), kind=DUPLICATES, collection="people", into="",
                                       model="sface", model_id=MODEL, source_model_id=MODEL, state="done",
                                       created_at=made + 1 + i, finished_at=made + 1 + i))
    assert shadow_pairs(galleries) == [("people", "people-v2", [])]
    with pytest.raises(MigrationUnfinished) as refused:
        galleries.set_alias("staff", "people-v3")
    assert refused.value.state == "failed"
