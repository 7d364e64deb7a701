"""Writes to the source, and to the target, while a migration copies (service/jobs/migrate.py), on both
backends over real HTTP: the job is held after its first copy batch (``Migration._copy_batch``, as it
runs, then a wait) so the writes land exactly between two batches.

* A source at its ``max_faces`` whose already-copied identity shrinks while a not-yet-copied one grows:
  the target (the source's max_faces) must not need more room than the source holds.
* An alias pointing at the target while the job runs (``set_alias`` refuses it: only a row written
  without that check can be one): the job stops ``migration_unfinished``; what was written through
  the alias stays.
* PUT /aliases racing the POST that creates the target: the alias is refused, never left pointing at
  an unfinished migration's collection."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from harness.fixtures import FIXTURES, b64
from service.jobs import migrate
from tests.jobs.test_fence import service  # noqa: F401 - the fixture (in-process server with a crop key)
from tests.service.test_migrate_api import identities

FACES = sorted((FIXTURES / "faces").glob("*.jpg"))  # 32 aligned LFW crops


def enroll(c: httpx.Client, collection: str, identity: str, faces: list) -> None:
    r = c.post(f"/collections/{collection}/enroll", json={"identity_id": identity, "images": [b64(f) for f in faces]})
    assert r.status_code == 200, r.text


def wait_for(c: httpx.Client, job_id: str) -> dict:
    deadline = time.monotonic() + 120
    while (job := c.get(f"/jobs/{job_id}").json())["state"] not in ("done", "failed", "cancelled"):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    return job


@pytest.fixture
def held(monkeypatch):
    """(held, go): ``held`` is set once the job's first copy batch is written and checkpointed; the
    job then waits for ``go``."""
    first, go = threading.Event(), threading.Event()
    copy_batch = migrate.Migration._copy_batch

    def holding(self, source, target, records):
        copy_batch(self, source, target, records)
        if not first.is_set():
            first.set()
            go.wait(120)

    monkeypatch.setattr(migrate.Migration, "_copy_batch", holding)
    yield first, go
    go.set()


def test_a_copied_identity_shrinks_and_an_uncopied_one_grows_with_the_source_at_its_max_faces(service, held):  # noqa: F811
    """The copy wrote in id order: "a" copied with 3 faces, then 2 of them deleted in the source and 2
    appended to "z" (the source stays at its limit, 6), the target held a's 3 when z's 4 came:
    8 > 6, too_many_faces_for_collection (and again on resume, the copy going on after its cursor)."""
    c, (first, go) = service, held
    assert c.post("/collections", json={"name": "v1", "keep_crops": True, "max_faces": 6}).status_code == 201
    enroll(c, "v1", "a", FACES[0:3])
    enroll(c, "v1", "m", FACES[3:4])
    enroll(c, "v1", "z", FACES[4:6])
    r = c.post("/collections/v1/migrate", json={"model": "tiny", "into": "v2", "batch_size": 1})
    assert r.status_code == 202, r.text
    job_id = r.json()["job"]["id"]
    assert first.wait(120), c.get(f"/jobs/{job_id}").json()
    assert identities(c, "v2") == {"a": 3}  # the first batch: one identity
    a_faces = c.get("/collections/v1/identities/a").json()["face_ids"]
    assert c.post("/collections/v1/faces/delete", json={"face_ids": a_faces[:2]}).status_code == 200
    enroll(c, "v1", "z", FACES[6:8])
    assert c.get("/collections/v1").json()["faces"] == 6
    go.set()
    job = wait_for(c, job_id)
    assert job["state"] == "done", job["error"]
    assert identities(c, "v2") == identities(c, "v1") == {"a": 1, "m": 1, "z": 4}


def alias_row(galleries, name: str, collection: str) -> None:
    """The alias written as a release before ``set_alias`` checked its target in its own write wrote it
    (a replica not yet upgraded, a catalog restored from such a release): the row, with no check."""
    from service.gallery.postgres.backend import PostgresGalleries

    if isinstance(galleries, PostgresGalleries):
        with galleries._transaction() as conn:
            conn.execute("INSERT INTO aliases(name, collection_id, updated_at) SELECT %s, collection_id, %s "
                         "FROM collections WHERE name = %s", (name, time.time(), collection))
    else:
        with galleries._catalog._write() as conn:
            conn.execute("INSERT INTO aliases(name, collection, updated_at) VALUES (?, ?, ?)",
                         (name, collection, time.time()))


def test_an_alias_at_the_target_stops_the_job_and_what_was_written_through_it_stays(service, held):  # noqa: F811
    """PUT /aliases, the CLI and the catalog's set_alias refuse an alias at an unfinished migration's
    collection; one written otherwise (``alias_row``) meets the job's second guard
    (``_check_unaliased``, before each write of B): it stops ``migration_unfinished``. Its next copy
    batch would have replaced "z" with A's, its catch-up deleted "new", both written through the alias
    and acknowledged."""
    c, (first, go) = service, held
    assert c.post("/collections", json={"name": "v1", "keep_crops": True}).status_code == 201
    enroll(c, "v1", "a", FACES[0:2])
    enroll(c, "v1", "m", FACES[2:3])
    enroll(c, "v1", "z", FACES[3:4])
    r = c.post("/collections/v1/migrate", json={"model": "tiny", "into": "v2", "batch_size": 1})
    assert r.status_code == 202, r.text
    job_id = r.json()["job"]["id"]
    assert first.wait(120), c.get(f"/jobs/{job_id}").json()
    alias_row(c.galleries, "people", "v2")
    deadline = time.monotonic() + 30  # each replica follows a re-point within FACE_ALIAS_CACHE_S
    body = {"identity_id": "z", "images": [b64(FACES[10])]}
    while (r := c.post("/collections/people/enroll", json=body)).status_code == 404:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.1)
    assert r.status_code == 200, r.text
    enroll(c, "people", "new", FACES[11:12])
    written = {"a": 2, "z": 1, "new": 1}
    z_face = c.get("/collections/v2/identities/z").json()["face_ids"]
    assert identities(c, "v2") == written
    go.set()
    job = wait_for(c, job_id)
    assert job["state"] == "failed" and job["error"]["code"] == "migration_unfinished", job["error"]
    assert "'people'" in job["error"]["message"], job["error"]
    assert identities(c, "v2") == written
    assert c.get("/collections/v2/identities/z").json()["face_ids"] == z_face


def test_an_alias_put_racing_the_post_that_creates_its_target_is_refused(service, held, monkeypatch):  # noqa: F811
    """PUT /aliases checked for an unfinished migration into its target, then set the alias: a POST
    .../migrate that created the target in between (its name was free at the check) left the alias
    pointing at the half-copied collection (200). The catalog's set_alias is held here until such a
    POST is answered."""
    c, (_, go) = service, held
    assert c.post("/collections", json={"name": "v1", "keep_crops": True}).status_code == 201
    enroll(c, "v1", "a", FACES[0:1])
    enroll(c, "v1", "b", FACES[1:2])
    set_alias, started = c.galleries.set_alias, []

    def after_a_migration_into_it(name, collection, actor=None):
        if collection == "v2" and not started:
            with httpx.Client(base_url=str(c.base_url), timeout=60) as other:
                r = other.post("/collections/v1/migrate", json={"model": "tiny", "into": "v2", "batch_size": 1})
            assert r.status_code == 202, r.text
            started.append(r.json()["job"]["id"])
        return set_alias(name, collection, actor)

    monkeypatch.setattr(c.galleries, "set_alias", after_a_migration_into_it)
    r = c.put("/aliases/people", json={"collection": "v2"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "migration_unfinished", r.text
    assert started and r.json()["error"]["details"]["job_id"] == started[0]
    assert c.get(f"/jobs/{started[0]}").json()["state"] in ("queued", "running")  # held, never failed by an alias
    assert c.get("/aliases/people").status_code == 404
    go.set()
    assert wait_for(c, started[0])["state"] == "done"
    assert c.put("/aliases/people", json={"collection": "v2"}).status_code == 200
