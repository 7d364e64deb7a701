"""Retention (``retention_days``, service/gallery/retention.py) on both backends: a sweep erases each face
of a collection enrolled longer ago than its retention, oldest first, as ``delete_face`` does, each with
its audit entry; faces enrolled later, other collections and collections without one are untouched;
the setting is audited, kept across a restart, and a sweep does not open an idle embedded collection
to find that nothing has expired."""

from __future__ import annotations

import sqlite3
import threading
import time

import numpy as np
import pytest

import tests.gallery.test_collections as collections_tests
from service.gallery.api import DEFAULT_COLLECTION, AuditQuery, CollectionNotFound
from service.gallery.retention import DAY_S, LATE_S, MIN_GAP_S, Schedule, next_expiry, sweep, wait_s
from tests.damage import deletes_refused
from tests.gallery.test_gallery import unit
from tests.gallery.traces import find_vector

# the Galleries of one backend per test, as tests/gallery/test_collections.py opens them
backend = collections_tests.backend
galleries = collections_tests.galleries
ALICE = collections_tests.ALICE


def enrolled_between(galleries, rng) -> tuple[float, dict[str, np.ndarray]]:
    """In `visitors` (retention 1 day): `old` (2 faces) and `mixed`'s first face, then the returned moment,
    then `mixed`'s second face and `new`; `keeper` in default (no retention) before the moment."""
    visitors = galleries.collection("visitors")
    vectors = {name: unit(rng, n) for name, n in (("old", 2), ("mixed", 2), ("new", 1), ("keeper", 1))}
    visitors.enroll("old", vectors["old"], actor=ALICE)
    visitors.enroll("mixed", vectors["mixed"][:1], actor=ALICE)
    galleries.collection(DEFAULT_COLLECTION).enroll("keeper", vectors["keeper"], actor=ALICE)
    time.sleep(0.05)
    moment = time.time()
    time.sleep(0.05)
    visitors.enroll("mixed", vectors["mixed"][1:], actor=ALICE)  # appended: the identity is older than its face
    visitors.enroll("new", vectors["new"], actor=ALICE)
    return moment, vectors


def test_a_sweep_erases_the_faces_past_retention_and_nothing_else(backend, tmp_path):
    galleries = backend()
    info = galleries.create_collection("visitors", actor=ALICE, retention_days=1.0)
    assert info.retention_days == 1.0
    assert galleries.collection_info("visitors").retention_days == 1.0
    assert {c.name: c.retention_days for c in galleries.list_collections()} == {"default": None, "visitors": 1.0}
    assert galleries.retentions() == {"visitors": 1.0}
    created = galleries.audit(AuditQuery(collection="visitors"))[-1]
    assert (created.action, created.details["retention_days"]) == ("collection.created", 1.0)

    moment, vectors = enrolled_between(galleries, np.random.default_rng(3))
    visitors = galleries.collection("visitors")
    assert sweep(galleries, now=moment - 10).erased == {}  # a day has not passed for anyone
    assert visitors.face_count == 5

    swept = sweep(galleries, now=moment + DAY_S)  # a day after the moment: what came before it is past
    assert (swept.erased, swept.identities_deleted, swept.failed) == ({"visitors": 3}, {"visitors": 1}, {})
    assert visitors.get_identity("old") is None
    mixed = visitors.get_identity("mixed")
    assert mixed is not None and len(mixed.faces) == 1
    assert visitors.get_identity("new") is not None
    assert galleries.collection(DEFAULT_COLLECTION).get_identity("keeper") is not None  # no retention there
    assert (visitors.identity_count, visitors.face_count) == (2, 2)
    for probe, gone in ((vectors["old"][0], "old"), (vectors["mixed"][0], None)):
        best = visitors.search(probe[None, :], top_k=3)[0]
        assert gone is None or gone not in [m.identity_id for m in best]
        if gone is None:  # mixed's erased face no longer matches itself: its best is the face left
            assert all(m.score < 0.999 for m in best)

    expired = [e for e in galleries.audit(AuditQuery(collection="visitors")) if e.action == "face.deleted"]
    assert sorted(e.identity_id for e in expired) == ["mixed", "old", "old"]
    assert all(e.details["via"] == "retention" and e.key_id is None and e.client is None for e in expired)
    assert [e.details["identity_deleted"] for e in expired if e.identity_id == "old"].count(True) == 1

    assert sweep(galleries, now=moment + DAY_S).erased == {}  # nothing left to erase
    later = sweep(galleries, now=time.time() + DAY_S + 1)
    assert later.erased == {"visitors": 2} and visitors.identity_count == 0
    if backend.name == "embedded":  # nothing of an expired face is left in any file of the data dir
        galleries.close()
        for vector in (*vectors["old"], *vectors["mixed"], *vectors["new"]):
            assert find_vector(tmp_path / "data", vector) == []
        assert find_vector(tmp_path / "data", vectors["keeper"][0]) != []


def test_retention_is_set_audited_kept_across_a_restart_and_cleared(backend):
    galleries = backend()
    info = galleries.update_collection(DEFAULT_COLLECTION, {"retention_days": 0.5}, ALICE)
    assert info.retention_days == 0.5 and info.name == DEFAULT_COLLECTION
    galleries.update_collection(DEFAULT_COLLECTION, {"retention_days": 0.5}, ALICE)  # as it is: nothing written
    updates = [e for e in galleries.audit(AuditQuery()) if e.action == "collection.updated"]
    assert [(e.collection, e.key_id, e.details) for e in updates] == [
        (DEFAULT_COLLECTION, "key-alice", {"retention_days": 0.5, "previous_retention_days": None})]
    with pytest.raises(CollectionNotFound):
        galleries.update_collection("nothing-by-that-name", {"retention_days": 1.0}, ALICE)
    galleries.close()

    again = backend()
    assert again.retentions() == {DEFAULT_COLLECTION: 0.5}
    assert again.update_collection(DEFAULT_COLLECTION, {"retention_days": None}, ALICE).retention_days is None
    assert again.retentions() == {}
    assert again.audit(AuditQuery(limit=1))[0].details == {"retention_days": None, "previous_retention_days": 0.5}


def test_the_next_sweep_is_timed_for_the_soonest_expiry(backend):
    """next_expiry: each collection's oldest face plus its own retention, the soonest of them; none
    without faces, the collections whose sweep failed left out; wait_s: until just after it, at least
    MIN_GAP_S, at most the interval."""
    galleries = backend()
    assert next_expiry(galleries) is None  # no collection with a retention
    galleries.create_collection("day", actor=ALICE, retention_days=1.0)
    galleries.create_collection("hour", actor=ALICE, retention_days=1 / 24)
    galleries.collection(DEFAULT_COLLECTION).enroll("kept", unit(np.random.default_rng(1), 1), actor=ALICE)
    assert next_expiry(galleries) is None  # their faces: none yet (default keeps its own)
    galleries.collection("day").enroll("d", unit(np.random.default_rng(2), 1), actor=ALICE)
    day = galleries.collection("day").get_identity("d").faces[0].created_at
    assert next_expiry(galleries) == pytest.approx(day + DAY_S)
    galleries.collection("hour").enroll("h", unit(np.random.default_rng(3), 2), actor=ALICE)
    hour = min(f.created_at for f in galleries.collection("hour").get_identity("h").faces)
    assert next_expiry(galleries) == pytest.approx(hour + DAY_S / 24)
    assert next_expiry(galleries, skip={"hour"}) == pytest.approx(day + DAY_S)
    assert galleries.collection("hour").oldest_enrollment() == pytest.approx(hour)
    if backend.name == "embedded":  # the open gallery's own answer (EmbeddedGallery), beside the store's peek
        opened = galleries.collection("hour")._run(lambda gallery: gallery.oldest_enrollment())  # noqa: SLF001
        assert opened == pytest.approx(hour)

    now = 1000.0
    assert wait_s(None, now, 60) == 60  # nothing to time: the interval
    assert wait_s(now + 10, now, 60) == pytest.approx(10 + LATE_S)
    assert wait_s(now + 3600, now, 60) == 60  # at most the interval
    assert wait_s(now - 5, now, 60) == MIN_GAP_S  # still past (a backlog, faces it could not erase): not a spin
    assert wait_s(now + 10, now, 0.2) == 0.2  # an interval under the gap is kept



def test_the_rounds_between_full_rounds_sweep_only_what_is_due(backend):
    """Schedule: a full round sweeps every collection with a retention and learns each one's next expiry;
    a round before the next full one sweeps only the collections due by then, a collection given a
    retention since and one whose retention changed; what it cannot see (a face imported with an old
    enrollment time into a collection not due) waits for the next full round, at most ``every_s``
    away; ``wait_s`` is the time to the soonest expiry, or to the next full round."""
    galleries = backend()
    rng = np.random.default_rng(5)
    start = time.time()
    for name in ("soon", "later"):
        galleries.create_collection(name, actor=ALICE, retention_days=1.0)
    galleries.collection("soon").import_identities([("s", unit(rng, 1), None)], enrolled_at=[[start - DAY_S + 100]])
    galleries.collection("later").import_identities([("l", unit(rng, 1), None)], enrolled_at=[[start - DAY_S + 500]])
    schedule = Schedule(every_s=1000.0)
    assert schedule.round(galleries, now=start).erased == {}  # the first round is a full one
    assert schedule.next_due() == pytest.approx(start + 100)
    assert schedule.wait_s(start) == pytest.approx(100 + LATE_S)

    # not due: an import of an old face into "later" is not seen by the rounds between full ones
    galleries.collection("later").import_identities([("old", unit(rng, 1), None)], enrolled_at=[[start - DAY_S - 5]])
    swept = schedule.round(galleries, now=start + 101)
    assert swept.erased == {"soon": 1} and galleries.collection("later").face_count == 2
    assert schedule.next_due() == pytest.approx(start + 500)
    assert schedule.wait_s(start + 101) == pytest.approx(399 + LATE_S)

    galleries.create_collection("new", actor=ALICE, retention_days=1.0)  # new to the schedule: swept
    galleries.collection("new").import_identities([("n", unit(rng, 1), None)], enrolled_at=[[start - DAY_S - 1]])
    galleries.update_collection("soon", {"retention_days": 0.5}, actor=ALICE)  # changed: swept
    galleries.collection("soon").import_identities([("h", unit(rng, 1), None)], enrolled_at=[[start - DAY_S / 2 - 1]])
    swept = schedule.round(galleries, now=start + 102)
    assert swept.erased == {"new": 1, "soon": 1}, swept
    assert galleries.collection("later").face_count == 2  # still not due
    swept = schedule.round(galleries, now=start + 1001)  # the full round: every collection
    assert swept.erased == {"later": 2}, swept
    assert schedule.next_due() is None and schedule.wait_s(start + 1001) == pytest.approx(1000)  # the next full one

    galleries.update_collection("later", {"retention_days": None}, actor=ALICE)
    galleries.delete_collection("new", actor=ALICE)
    assert schedule.round(galleries, now=start + 1002).erased == {}
    assert set(schedule.known) == {"soon"}  # what has no retention, or is gone, is forgotten

def test_a_sweep_reads_an_idle_embedded_collection_without_opening_it(tmp_path):
    """Every minute, each collection with a retention is asked what has expired: an idle one is read
    from its store beside whoever writes it, and opened (its index loaded) only when a face must go. A
    store from before the age index is opened, which gives it the index."""
    base = collections_tests.Settings(data_dir=tmp_path / "data", snapshot_interval_s=0)
    make = collections_tests.make_gallery
    galleries = make(base, collections_tests.MODEL, collections_tests.DIM)
    galleries.open()
    galleries.create_collection("idle", retention_days=1.0)
    galleries.collection("idle").enroll("someone", unit(np.random.default_rng(1), 2))
    galleries.close()
    store = tmp_path / "data" / "collections" / "idle" / "gallery.sqlite3"
    assert store.exists()

    galleries = make(base, collections_tests.MODEL, collections_tests.DIM)
    galleries.open()
    try:
        assert sweep(galleries).erased == {}
        assert "idle" not in galleries.open_collections()
        with sqlite3.connect(store) as conn:  # a store as older versions left it: no age index
            conn.execute("DROP INDEX faces_by_age")
        assert sweep(galleries).erased == {}
        assert "idle" in galleries.open_collections()  # opened to ask: and given the index again
        with sqlite3.connect(store) as conn:
            assert conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'faces_by_age'").fetchone()
        assert sweep(galleries, now=time.time() + DAY_S + 1).erased == {"idle": 2}
    finally:
        galleries.close()


def test_two_sweeps_at_once_erase_each_face_once(backend):
    """Replicas sweep the same backlog at the same time (on PostgreSQL two Galleries on one schema; embedded,
    two threads of one process): every expired face is erased exactly once, with one audit entry, none fails."""
    galleries = backend()
    other = backend() if backend.name == "postgres" else galleries
    galleries.create_collection("crowd", retention_days=1.0)
    rng = np.random.default_rng(9)
    galleries.collection("crowd").import_identities([(f"p{i}", unit(rng, 2), None) for i in range(150)])
    later = time.time() + DAY_S + 1
    results = []
    threads = [threading.Thread(target=lambda g=g: results.append(sweep(g, now=later, batch=64)))
               for g in (galleries, other)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(r.erased.get("crowd", 0) for r in results) == 300 and all(not r.failed for r in results)
    assert sum(r.identities_deleted.get("crowd", 0) for r in results) == 150
    # read from the store: a replica's own face_count is as of its last write, and the other may have had the last
    assert (galleries.collection_info("crowd").identities, galleries.collection_info("crowd").faces) == (0, 0)
    deleted = [e for e in galleries.audit(AuditQuery(collection="crowd", limit=1000)) if e.action == "face.deleted"]
    assert len(deleted) == 300 and len({e.details["face_id"] for e in deleted}) == 300


def refused(backend, collection: str):
    """deletes_refused on the storage of ``backend``'s Galleries."""
    settings = backend.settings
    if backend.name == "embedded":
        return deletes_refused(collection, data_dir=settings.data_dir)
    return deletes_refused(collection, database=(settings.database_url.get_secret_value(), settings.database_schema))


def test_a_collection_whose_erasure_fails_is_overdue_until_a_sweep_erases_it(backend):
    """Schedule.overdue_s (/metrics' face_retention_overdue_seconds): a collection whose faces past their
    retention could not be erased (its database refuses the deletes) is overdue by its oldest one's time
    since expiry, through the rounds that skip it (which read it again: erased by another, it is not
    overdue), until a round erases them (0 then); a collection whose
    next expiry passes without a round (the sweeper stalled) is overdue by that much."""
    galleries = backend()
    rng = np.random.default_rng(8)
    start = time.time()
    for name in ("held", "fine"):
        galleries.create_collection(name, actor=ALICE, retention_days=1.0)
    galleries.collection("held").import_identities([("h", unit(rng, 2), None)],
                                                   enrolled_at=[[start - DAY_S - 50, start - DAY_S - 20]])
    galleries.collection("fine").import_identities([("f", unit(rng, 1), None)], enrolled_at=[[start - DAY_S - 30]])
    schedule = Schedule(every_s=1000.0)
    assert schedule.overdue_s(start) == {}  # nothing known before the first round
    with refused(backend, "held"):
        swept = schedule.round(galleries, now=start)
        assert set(swept.failed) == {"held"} and swept.erased == {"fine": 1}, swept
        assert "deletes refused by the test" in swept.failed["held"]
        assert schedule.overdue_s(start + 10) == {"held": pytest.approx(60), "fine": 0.0}
        assert schedule.round(galleries, now=start + 5).erased == {}  # not retried before the full round
        assert schedule.overdue_s(start + 20)["held"] == pytest.approx(70)
    assert galleries.collection("held").face_count == 2  # nothing lost to the failed erasure
    galleries.collection("held").import_identities([("i", unit(rng, 1), None)], enrolled_at=[[start - DAY_S - 40]])
    assert schedule.round(galleries, now=start + 6).erased == {}  # not retried before the full round, but
    assert schedule.overdue_s(start + 20)["held"] == pytest.approx(70)  # read again: still held
    galleries.collection("held").delete("h", actor=ALICE)  # erased by another (a client, a replica)
    assert schedule.round(galleries, now=start + 7).erased == {}
    assert schedule.overdue_s(start + 20)["held"] == pytest.approx(60)  # its oldest held face now
    swept = schedule.round(galleries, now=start + 1001)  # the full round
    assert swept.erased == {"held": 1} and not swept.failed, swept
    assert schedule.overdue_s(start + 1002) == {"held": 0.0, "fine": 0.0}

    # a next expiry that passes with no round after it: overdue by the time since
    galleries.collection("fine").import_identities([("g", unit(rng, 1), None)], enrolled_at=[[start - DAY_S + 1100]])
    schedule.round(galleries, now=start + 1002, full=True)
    assert schedule.overdue_s(start + 1099)["fine"] == 0.0
    assert schedule.overdue_s(start + 1130)["fine"] == pytest.approx(30)
    galleries.update_collection("fine", {"retention_days": None}, actor=ALICE)
    schedule.round(galleries, now=start + 1131)
    assert set(schedule.overdue_s(start + 1140)) == {"held"}  # a collection without retention is not listed
