"""A migration whose job another runner took (service/jobs/runner.py): cancelled, resumed and taken by
another replica, or taken over as stale while its runner's heartbeats did not reach the store (a paused
process, a partition). The first run, when it comes back, writes nothing more into the job's row (not
its cursor or progress over the new run's, not ``done`` while the new run copies) nor its batch into
the new collection. On both backends, with the store and the runner's run_job; the model call is the
test's, held in the first batch. The same for scan jobs is in test_scan.py. And a job whose run ended
without writing its end (the database gone) is taken again by its own runner."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from service.config import Settings
from service.gallery.api import Galleries, GalleryUnavailable
from service.gallery.crops import encode_crop, write_key_file
from service.gallery.open import make_gallery
from service.jobs.migrate import start_migration
from service.jobs.runner import JobRunner, run_job, run_scan, take
from service.jobs.scan import DUPLICATES, start_scan
from service.jobs.store import JobRecord
from tests.pg import PgTestServer

MODEL, DIM = "m@1", 8
INTO_DIM = 4
IDENTITIES = 6


@pytest.fixture
def stores(gallery_settings, tmp_path):
    """(replica A's galleries, replica B's): on PostgreSQL two pools on one schema; the embedded catalog
    is one process's, so one object (what differs is the runner, its owner)."""
    key = tmp_path / "crop.key"
    write_key_file(key)
    settings = gallery_settings.model_copy(update={"crop_key_file": key})
    a = make_gallery(settings, MODEL, DIM)
    a.open()
    b = a
    if settings.database_url is not None:
        b = make_gallery(settings, MODEL, DIM)
        b.open()
    yield a, b
    if b is not a:
        b.close()
    a.close()


def embed(crops: np.ndarray) -> np.ndarray:
    vectors = np.random.default_rng(len(crops)).standard_normal((len(crops), INTO_DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def source(galleries: Galleries) -> None:
    galleries.create_collection("a", keep_crops=True, model_id=MODEL, dim=DIM)
    rng = np.random.default_rng(0)
    for i in range(IDENTITIES):
        vector = rng.standard_normal((1, DIM)).astype(np.float32)
        crop = encode_crop(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
        galleries.collection("a").enroll(f"p{i}", vector / np.linalg.norm(vector), crops=[crop])


def held_run(galleries: Galleries, job: JobRecord, stale_s: float = 30.0):
    """Run ``job`` (taken by "runner-a") in a thread whose first model call waits to be released;
    (release, thread, ended)."""
    release, embedding = threading.Event(), threading.Event()

    def held(crops: np.ndarray) -> np.ndarray:
        embedding.set()
        assert release.wait(30)
        return embed(crops)

    ended: list[JobRecord] = []
    thread = threading.Thread(target=lambda: ended.append(
        run_job(galleries, lambda name: held, job, "runner-a", compare=False, stale_s=stale_s)))
    thread.start()
    assert embedding.wait(30)
    return release, thread, ended


@pytest.mark.parametrize("how", ["resumed", "stale"])
def test_a_migration_another_runner_took_writes_nothing_more_into_its_job(stores, how):
    a, b = stores
    source(a)
    job = start_migration(a, "a", "tiny", "t@1", INTO_DIM, "b", batch_size=2)
    taken = take(a, job, "runner-a")
    assert taken is not None
    release, thread, ended = held_run(a, taken, stale_s=30.0 if how == "resumed" else 3600)
    if how == "resumed":  # cancelled (it stops after its batch), resumed, and replica B is first to take it
        assert a.update_job(job.job_id, {"state": "cancelled", "finished_at": time.time()},
                            expect_state=("queued", "running"))
        assert a.update_job(job.job_id, {"state": "queued", "finished_at": None, "heartbeat": None, "owner": None},
                            expect_state=("cancelled",))
        queued = b.get_job(job.job_id)
        assert queued is not None
        mine = take(b, queued, "runner-b")
    else:  # A's heartbeats stopped reaching the store: B's runner takes the job as stale
        runner = JobRunner(b, None, stale_s=0.01)
        runner.owner = "runner-b"
        time.sleep(0.05)  # older than B's stale_s
        mine = runner.claim()
    assert mine is not None and (mine.job_id, mine.state, mine.owner) == (job.job_id, "running", "runner-b")

    release.set()  # A comes back: its batch, then its checkpoint
    thread.join(60)
    assert ended
    row = b.get_job(job.job_id)
    assert row is not None
    assert (row.state, row.owner, row.cursor, row.finished_at) == ("running", "runner-b", None, None)
    assert row.progress == mine.progress  # nothing of A's run

    done = run_job(b, lambda name: embed, mine, "runner-b", compare=False)
    assert (done.state, done.owner, done.error) == ("done", "runner-b", None)
    assert done.progress["identities_done"] == IDENTITIES
    assert sorted(r.identity_id for r in b.collection("b").list_identities(100, None)) == [f"p{i}" for i in range(IDENTITIES)]


@pytest.mark.parametrize("how", ["resumed", "stale"])
def test_a_migration_another_runner_took_does_not_write_its_batch_over_the_new_runs_copy(stores, how):
    """Replica A holds a batch it read from the source (p0 as it was) in its model call when the job
    passes to replica B; p0 is written in the source (acknowledged), B copies it and says done. A's batch,
    embedded at last, is not written into the new collection over B's: p0 keeps its acknowledged write."""
    a, b = stores
    source(a)
    job = start_migration(a, "a", "tiny", "t@1", INTO_DIM, "b", batch_size=2)
    taken = take(a, job, "runner-a")
    assert taken is not None
    release, thread, ended = held_run(a, taken, stale_s=30.0 if how == "resumed" else 3600)
    vector = np.ones((1, DIM), np.float32) / np.sqrt(DIM)
    crop = encode_crop(np.zeros((16, 16, 3), np.uint8))
    b.collection("a").enroll("p0", vector, {"badge": "revoked"}, replace=True, crops=[crop])
    if how == "resumed":
        assert a.update_job(job.job_id, {"state": "cancelled", "finished_at": time.time()},
                            expect_state=("queued", "running"))
        assert a.update_job(job.job_id, {"state": "queued", "finished_at": None, "heartbeat": None, "owner": None},
                            expect_state=("cancelled",))
        queued = b.get_job(job.job_id)
        assert queued is not None
        mine = take(b, queued, "runner-b")
    else:
        runner = JobRunner(b, None, stale_s=0.01)
        runner.owner = "runner-b"
        time.sleep(0.05)
        mine = runner.claim()
    assert mine is not None and mine.owner == "runner-b"
    done = run_job(b, lambda name: embed, mine, "runner-b", compare=False)
    assert done.state == "done"
    copied = b.collection("b").get_identity("p0")
    assert copied is not None and copied.record.metadata == {"badge": "revoked"}

    release.set()
    thread.join(60)
    assert ended
    copied = b.collection("b").get_identity("p0")
    assert copied is not None and copied.record.metadata == {"badge": "revoked"}


def test_a_job_whose_run_ended_without_a_word_in_its_row_is_taken_again_by_the_same_runner():
    """The database goes away while a scan stores its answer (a failover, a restart): neither its answer
    nor its failure can be written, and the row stays ``running`` under this runner with no run behind
    it. Once the database is back and the heartbeat is stale the runner takes it again, as another
    replica would: on a single replica nobody else will (before, the job stayed ``running`` until the
    process restarted, holding its collection's one place for a job: 409 ``job_running``)."""
    database = PgTestServer()
    try:
        env = database.gallery_env()
        settings = Settings(database_url=env["FACE_DATABASE_URL"], database_schema=env["FACE_DATABASE_SCHEMA"],
                            database_timeout_s=2)
        galleries = make_gallery(settings, MODEL, DIM)
        galleries.open()
        try:
            def scan(job: JobRecord) -> dict:
                if not answered:
                    database.stop()  # while the scan runs: its answer finds no database
                answered.append(job.job_id)
                return {"pairs": [], "faces_scanned": 0}

            answered: list[str] = []
            runner = JobRunner(galleries, None, stale_s=0.5, scans={DUPLICATES: scan})
            job = start_scan(galleries, DUPLICATES, "default", "sface", {})
            taken = runner.claim()
            assert taken is not None and taken.job_id == job.job_id
            with pytest.raises(GalleryUnavailable):  # neither the answer nor the failure is written
                run_scan(galleries, scan, taken, stale_s=runner.stale_s)
            database.start()
            deadline = time.monotonic() + 60
            while True:  # the pool reconnects by itself; the heartbeat then gets older than stale_s
                assert time.monotonic() < deadline
                try:
                    row = galleries.get_job(job.job_id)
                except GalleryUnavailable:
                    row = None
                if row is not None and time.time() - (row.heartbeat or 0) > runner.stale_s:
                    break
                time.sleep(0.1)
            assert (row.state, row.owner) == ("running", runner.owner)
            again = runner.claim()
            assert again is not None and (again.job_id, again.owner) == (job.job_id, runner.owner)
            done = run_scan(galleries, scan, again, stale_s=runner.stale_s)
            assert done.state == "done" and answered == [job.job_id, job.job_id]
        finally:
            galleries.close()
    finally:
        database.close()
