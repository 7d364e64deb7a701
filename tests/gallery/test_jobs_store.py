"""Job rows (service/jobs/store.py) on both backends: one queued-or-running job per source collection,
kept by the store itself (threads racing to create one: exactly one wins), conditional updates that
let only one runner claim a job, and the audit record written with the update."""

from __future__ import annotations

import threading

import pytest

import tests.gallery.test_collections as collections_tests
from service.gallery.api import AuditQuery
from service.jobs.store import JobRecord, JobRunning, new_job_id

backend = collections_tests.backend
galleries = collections_tests.galleries
ALICE = collections_tests.ALICE


def job(collection: str = "src", state: str = "queued", **fields) -> JobRecord:
    return JobRecord(job_id=new_job_id(), collection=collection, into=f"into-{new_job_id()}", model="new",
                     model_id="new@1", source_model_id="old@1", state=state, **fields)


def test_one_active_job_per_collection_whoever_races(galleries):
    made, refused = [], []
    barrier = threading.Barrier(6)

    def create(row: JobRecord) -> None:
        barrier.wait()
        try:
            galleries.create_job(row)
            made.append(row.job_id)
        except JobRunning:
            refused.append(row.job_id)

    threads = [threading.Thread(target=create, args=(job(),)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1 and len(refused) == 5
    galleries.create_job(job(collection="other"))  # another collection: its own place
    # a finished job frees the place; bringing it back while another is active is refused
    assert galleries.update_job(made[0], {"state": "failed"}, expect_state=("queued", "running"))
    second = job()
    galleries.create_job(second)
    with pytest.raises(JobRunning):
        galleries.update_job(made[0], {"state": "queued"}, expect_state=("failed",))
    assert galleries.get_job(made[0]).state == "failed"
    assert [j.job_id for j in galleries.list_jobs(collection="src")] == [second.job_id, made[0]]
    assert [j.job_id for j in galleries.list_jobs(collection="src", state="failed")] == [made[0]]


def test_a_claim_is_a_conditional_update_and_is_audited(galleries):
    row = job(progress={"phase": "copy", "identities_done": 3}, report=None)
    galleries.create_job(row)
    read = galleries.get_job(row.job_id)
    assert read == row
    # two runners read the same heartbeat: only the first conditional update changes the row
    first = galleries.update_job(row.job_id, {"state": "running", "owner": "a", "heartbeat": 10.0},
                                 expect_state=("queued",), expect_heartbeat=read.heartbeat)
    second = galleries.update_job(row.job_id, {"state": "running", "owner": "b", "heartbeat": 11.0},
                                  expect_state=("queued",), expect_heartbeat=read.heartbeat)
    assert (first, second) == (True, False) and galleries.get_job(row.job_id).owner == "a"
    # a stale heartbeat is taken over only by whoever read it as it is
    assert not galleries.update_job(row.job_id, {"owner": "c", "heartbeat": 20.0}, expect_heartbeat=9.0)
    assert galleries.update_job(row.job_id, {"owner": "c", "heartbeat": 20.0}, expect_heartbeat=10.0)
    # a runner writes only while the job is its own: "a" lost it to "c"
    assert not galleries.update_job(row.job_id, {"heartbeat": 21.0}, expect_state=("running",), expect_owner="a")
    assert galleries.update_job(row.job_id, {"heartbeat": 21.0}, expect_state=("running",), expect_owner="c")
    assert not galleries.update_job(row.job_id, {"heartbeat": 22.0}, expect_owner=None)
    assert galleries.get_job(row.job_id).heartbeat == 21.0
    assert galleries.update_job(row.job_id, {"state": "cancelled", "report": {"rank1": 0.5}},
                                expect_state=("running",), audit_as=("job.cancelled", ALICE))
    stored = galleries.get_job(row.job_id)
    assert (stored.state, stored.owner, stored.report) == ("cancelled", "c", {"rank1": 0.5})
    entries = [e for e in galleries.audit(AuditQuery(collection="src")) if e.action == "job.cancelled"]
    assert len(entries) == 1 and entries[0].details["job"] == row.job_id and entries[0].key_id == ALICE.key_id
    with pytest.raises(ValueError):
        galleries.update_job(row.job_id, {"collection": "elsewhere"})  # not updatable
    # a row still being created is never listed, and is the only kind delete_job removes
    creating = job(collection="third", state="creating")
    galleries.create_job(creating)
    assert creating.job_id not in [j.job_id for j in galleries.list_jobs()]
    assert [j.job_id for j in galleries.list_jobs(state="creating")] == [creating.job_id]
    galleries.delete_job(row.job_id)
    galleries.delete_job(creating.job_id)
    assert galleries.get_job(row.job_id) is not None and galleries.get_job(creating.job_id) is None


def test_the_runner_removes_a_start_that_died_halfway(galleries):
    """A POST that stored its job row but died before creating the target leaves a ``creating`` row that
    holds the collection's place: the runner removes it once it is 2 x stale_s old."""
    from service.jobs.runner import JobRunner

    stuck = job(collection="halfway", state="creating", created_at=0.0)
    galleries.create_job(stuck)
    with pytest.raises(JobRunning):
        galleries.create_job(job(collection="halfway"))
    assert JobRunner(galleries, models=None, stale_s=30).claim() is None  # type: ignore[arg-type]
    assert galleries.get_job(stuck.job_id) is None
    galleries.create_job(job(collection="halfway", state="done"))
    galleries.create_job(job(collection="halfway", state="failed"))
