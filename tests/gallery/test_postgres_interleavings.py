"""The postgres backend's row and advisory locks under forced interleavings of concurrent writes.

Each test makes PostgreSQL interleave two or three transactions in one exact order: a raw connection
holds a row (or a table) as a write in flight on it would, the backend's write runs in a thread until
it waits (``pg_blocking_pids``), then the holder goes on. What must hold: no deadlock (PostgreSQL would
abort one write, answered as an outage), no acknowledged face lost, and counts and audit records that
say what was stored.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import psycopg
import pytest

from service.gallery.api import (
    Actor,
    AuditQuery,
    CollectionNotFound,
    GalleryUnavailable,
    IdentityUpdate,
    TooManyFacesForCollection,
)
from tests.gallery import test_postgres as shared
from tests.gallery.test_postgres import unit

pair = shared.pair  # the fixture: two open backends (two replicas) on one fresh schema
ALICE = Actor(key_id="k", client="c", request_id="r")


@pytest.fixture
def connect(postgres, pair):
    """Raw connections to the schema of ``pair`` (test_postgres.py's two replicas), closed at the end."""
    opened: list[psycopg.Connection] = []

    def open_one(autocommit: bool = False) -> psycopg.Connection:
        conn = psycopg.connect(postgres.url, autocommit=autocommit)
        conn.execute(f"SET search_path TO {pair[0].options.schema}")
        if not autocommit:
            conn.commit()
        opened.append(conn)
        return conn

    yield open_one
    for conn in opened:
        conn.close()


def _blocking(watch: psycopg.Connection, holder: psycopg.Connection) -> int:
    """How many backends wait for a lock ``holder``'s transaction holds."""
    return int(watch.execute("SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
                             (holder.info.backend_pid,)).fetchone()[0])


def _lock_waits(watch: psycopg.Connection) -> int:
    """How many backends wait for a lock (a row's, a transaction's, an advisory one)."""
    return int(watch.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'").fetchone()[0])


def _until(condition: Callable[[], bool], what: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


class Runs:
    """Calls run in threads; each one's result or exception, by name."""

    def __init__(self) -> None:
        self.results: dict[str, object] = {}
        self.threads: dict[str, threading.Thread] = {}

    def start(self, name: str, body: Callable[[], object]) -> threading.Thread:
        def run() -> None:
            try:
                self.results[name] = body()
            except BaseException as exc:  # noqa: BLE001 - asserted by the test
                self.results[name] = exc

        thread = self.threads[name] = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def join(self) -> None:
        for thread in self.threads.values():
            thread.join(30)
        assert not any(t.is_alive() for t in self.threads.values()), "a write never ended"

    def ok(self, name: str) -> object:
        result = self.results[name]
        assert not isinstance(result, BaseException), f"{name}: {result!r}"
        return result


def test_a_face_moved_into_an_identity_made_anew_is_not_erased_by_a_delete_waiting_on_its_old_row(pair, connect):
    """A delete of faces h (of a) and q, m (of b) waits for a's row, which another transaction deletes
    (h with it) while a third waits with b locked; that one then makes a anew and moves q into it. The
    waiting delete's lock skips a's deleted row: it must lock the new a before erasing q from it. Then
    a face k is moved into a while that delete still runs: the delete, finding a emptied by its own
    erasure, deletes it only if k is not there (unlocked, it erased k with a: ON DELETE CASCADE, unaudited
    and uncounted)."""
    col = pair[0].default
    rng = np.random.default_rng(9)
    (h,) = col.enroll("a", unit(rng, 1)).face_ids
    q, m, _ = col.enroll("b", unit(rng, 3)).face_ids
    (k,) = col.enroll("c", unit(rng, 1)).face_ids
    c = col.collection_id
    watch, deleter, mover, row_holder = connect(autocommit=True), connect(), connect(), connect()
    lock_identity = "SELECT 1 FROM identities WHERE collection_id = %s AND identity_id = %s FOR UPDATE"
    deleter.execute(lock_identity, (c, "a"))  # a delete of a (and h), half way
    mover.execute(lock_identity, (c, "b"))  # a move of q out of b, half way
    row_holder.execute("SELECT 1 FROM faces WHERE face_id = %s FOR UPDATE", (m,))  # keeps the delete running
    runs = Runs()
    runs.start("delete", lambda: col.delete_faces([h, q, m]))
    _until(lambda: _blocking(watch, deleter) == 1, "the delete waits for a")
    deleter.execute("DELETE FROM faces WHERE face_id = %s", (h,))
    deleter.execute("DELETE FROM identities WHERE collection_id = %s AND identity_id = 'a'", (c,))
    deleter.execute("UPDATE counters SET identities = identities - 1, faces = faces - 1, "
                    "counted_faces = counted_faces - 1 WHERE collection_id = %s AND slot = 0", (c,))
    deleter.commit()
    _until(lambda: _blocking(watch, mover) == 1, "the delete waits for b")
    mover.execute("INSERT INTO identities (collection_id, identity_id, metadata, created_at, updated_at) "
                  "VALUES (%s, 'a', '{}', 0, 0)", (c,))
    mover.execute("UPDATE faces SET identity_id = 'a' WHERE face_id = %s", (q,))
    mover.execute("UPDATE counters SET identities = identities + 1 WHERE collection_id = %s AND slot = 0", (c,))
    mover.commit()
    _until(lambda: _blocking(watch, row_holder) == 1, "the delete waits for m's row")
    move = runs.start("move", lambda: pair[1].default.move_face(k, "a"))
    _until(lambda: not move.is_alive() or _lock_waits(watch) == 2, "the move is done or waits for the delete")
    row_holder.rollback()
    runs.join()
    erased = runs.ok("delete")
    assert sorted(d.face_id for d in erased.deleted) == sorted([q, m]) and erased.not_found == [h]
    runs.ok("move")
    assert [f.face_id for f in col.get_identity("a").faces] == [k]  # the moved face is where it was moved
    assert {r.identity_id: r.face_count for r in col.list_identities(100, None)} == {"a": 1, "b": 1}
    stats = col.stats()
    assert (stats.identities, stats.faces) == (2, 2)


def test_the_counts_a_write_keeps_include_a_write_that_committed_while_it_ran(pair, connect):
    """A write (w1) waits, its counts done, for its audit record (the audit table locked by another
    transaction) while a write without one (w2) commits: w1 commits last, and the counts it keeps (read
    by the next plan and threshold at no cost) hold w2's face too."""
    col = pair[0].default
    rng = np.random.default_rng(10)
    col.enroll("x0", unit(rng, 1))
    watch, holder = connect(autocommit=True), connect()
    holder.execute("LOCK TABLE audit IN SHARE MODE")
    runs = Runs()
    runs.start("w1", lambda: col.enroll("w1", unit(rng, 1), actor=ALICE))
    _until(lambda: _blocking(watch, holder) == 1, "w1 waits for the audit table")
    col.enroll("w2", unit(rng, 1))  # no actor: no audit record to wait for
    holder.rollback()
    runs.join()
    runs.ok("w1")
    assert (col.identity_count, col.face_count) == (3, 3)


def test_a_rename_and_a_move_into_the_new_name_take_their_locks_in_one_order(pair, connect):
    """A rename of x to a (a new id that sorts first) holds x while a move of one of x's faces to a
    creates a and waits for x: the rename must not then wait for that a (a deadlock, one of them aborted
    as an outage). Renames take their two ids in id order, as moves and merges do."""
    col = pair[0].default
    rng = np.random.default_rng(3)
    f1, f2 = col.enroll("x", unit(rng, 2)).face_ids
    watch = connect(autocommit=True)
    planning, go = threading.Event(), threading.Event()

    def hold(metadata: dict) -> dict:  # called in the rename's transaction, its locks taken
        planning.set()
        go.wait(30)
        return metadata

    runs = Runs()
    runs.start("rename", lambda: col.update_identity("x", IdentityUpdate(new_id="a", metadata=hold), actor=ALICE))
    assert planning.wait(20)
    runs.start("move", lambda: pair[1].default.move_face(f1, "a", actor=ALICE))
    _until(lambda: _lock_waits(watch) == 1, "the move waits for the rename")
    go.set()
    runs.join()
    assert runs.ok("rename").renamed_from == "x"
    move = runs.results["move"]  # the face is a's already once the rename is in: nothing to move
    assert isinstance(move, ValueError) and not isinstance(move, GalleryUnavailable), repr(move)
    assert [f.face_id for f in col.get_identity("a").faces] == [f1, f2] and col.get_identity("x") is None


WRITES = {
    "append": lambda col, b, rng: col.enroll("b", unit(rng, 1), actor=ALICE),
    "replace": lambda col, b, rng: col.enroll("b", unit(rng, 1), replace=True, actor=ALICE),
    "delete": lambda col, b, rng: col.delete("b", actor=ALICE),
    "delete_faces": lambda col, b, rng: col.delete_faces([b[0]], actor=ALICE),
    "move": lambda col, b, rng: col.move_face(b[0], "c", actor=ALICE),
    "merge": lambda col, b, rng: col.merge_identities("b", "c", actor=ALICE),
}


@pytest.mark.parametrize("write", list(WRITES))
def test_a_write_into_a_collection_being_deleted_waits_and_finds_it_gone(pair, connect, write):
    """A collection's delete stops on its first identity's row (held as a write in flight on it holds
    it) after erasing its faces; meanwhile a write to another of its identities begins. The delete waits
    for the writes in flight and holds new ones back until it commits (the collection's write fence):
    the write then finds the collection gone (CollectionNotFound, nothing stored), never a deadlock,
    and the delete's answer and audit record count every face it erased."""
    g = pair[0]
    g.create_collection("c1")
    col = g.collection("c1")
    rng = np.random.default_rng(1)
    col.enroll("a0", unit(rng, 1))
    b = col.enroll("b", unit(rng, 2)).face_ids
    col.enroll("c", unit(rng, 1))
    watch, holder = connect(autocommit=True), connect()
    holder.execute("SELECT 1 FROM identities WHERE collection_id = %s AND identity_id = 'a0' FOR UPDATE",
                   (col.collection_id,))
    runs = Runs()
    runs.start("delete_collection", lambda: g.delete_collection("c1", actor=ALICE))
    _until(lambda: _blocking(watch, holder) == 1, "the collection's delete waits for a0's row")
    writing = runs.start("write", lambda: WRITES[write](col, b, rng))
    _until(lambda: not writing.is_alive() or _lock_waits(watch) == 2, "the write is done or waits")
    holder.rollback()
    runs.join()
    deleted = runs.ok("delete_collection")
    assert isinstance(runs.results["write"], CollectionNotFound), repr(runs.results["write"])
    assert (deleted.identities, deleted.faces) == (3, 4)
    (record,) = [e for e in g.audit(AuditQuery(limit=100)) if e.action == "collection.deleted"]
    assert (record.details["identities"], record.details["faces"]) == (3, 4)
    assert watch.execute("SELECT count(*) FROM faces WHERE collection_id = %s", (col.collection_id,)).fetchone()[0] == 0


def test_a_limit_set_while_a_write_runs_holds_for_every_write_after_it(pair, connect):
    """An append that read the collection's max_faces as unset is still in flight (held in its counts)
    when max_faces is set to 10 with 9 faces stored: the setting waits for it, so a second append
    that starts after the setting counts the first one's face and is refused. (Not waiting, the two
    appends made 11 faces under a limit of 10 set before either committed.)"""
    g = pair[0]
    g.create_collection("c1")
    col = g.collection("c1")
    rng = np.random.default_rng(2)
    for n in range(9):
        col.enroll(f"p{n}", unit(rng, 1))
    watch, holder = connect(autocommit=True), connect()
    holder.execute("SELECT 1 FROM counters WHERE collection_id = %s FOR UPDATE", (col.collection_id,))
    runs = Runs()
    runs.start("e1", lambda: col.enroll("p0", unit(rng, 1)))
    _until(lambda: _blocking(watch, holder) == 1, "e1 waits in its counts, past its room check")
    setting = runs.start("limit", lambda: g.update_collection("c1", {"max_faces": 10}, actor=ALICE))
    _until(lambda: not setting.is_alive() or _lock_waits(watch) == 2, "the setting is made or waits for e1")
    second = runs.start("e2", lambda: col.enroll("p1", unit(rng, 1)))
    _until(lambda: not second.is_alive() or _lock_waits(watch) >= (3 if setting.is_alive() else 2),
           "e2 is done or waits")
    holder.rollback()
    runs.join()
    runs.ok("e1")
    assert runs.ok("limit").max_faces == 10
    assert isinstance(runs.results["e2"], TooManyFacesForCollection), repr(runs.results["e2"])
    assert g.collection_info("c1").faces == 10


def test_two_imports_of_the_same_new_ids_in_other_orders_answer_identity_exists(pair, connect):
    """Import B [q, h, p] waits (h held by a slow import of h) while import A [p, q] runs: imports insert
    their identities in id order, so one of them is refused with IdentityExists, never a deadlock."""
    col = pair[0].default
    rng = np.random.default_rng(4)
    col.enroll("z", unit(rng, 1))
    watch, holder = connect(autocommit=True), connect()
    holder.execute("INSERT INTO identities (collection_id, identity_id, metadata, created_at, updated_at) "
                   "VALUES (%s, 'h', '{}', 0, 0)", (col.collection_id,))
    runs = Runs()
    runs.start("B", lambda: col.import_identities([("q", unit(rng, 1), None), ("h", unit(rng, 1), None),
                                                   ("p", unit(rng, 1), None)]))
    _until(lambda: _blocking(watch, holder) == 1, "B waits for h")
    importing = runs.start("A", lambda: col.import_identities([("p", unit(rng, 1), None), ("q", unit(rng, 1), None)]))
    _until(lambda: not importing.is_alive() or _lock_waits(watch) == 2, "A is done or waits")
    holder.rollback()
    runs.join()
    outcomes = sorted(type(runs.results[n]).__name__ for n in ("A", "B"))
    assert outcomes == ["IdentityExists", "list"], {n: runs.results[n] for n in ("A", "B")}
    assert {r.identity_id for r in col.list_identities(10, None)} in ({"z", "p", "q"}, {"z", "h", "p", "q"})


def test_a_write_aborted_to_break_a_deadlock_is_run_again_and_stores_once(pair, connect, caplog):
    """Another transaction holds b, and then waits for a, which a merge of a into b holds (waiting for
    b): PostgreSQL aborts the merge to break the deadlock (the other one waits longer before it looks).
    Nothing of the merge was stored, so it is run again once the other one is done: it is merged once,
    audited once, and no outage is reported (the database answered)."""
    g = pair[0]
    col = g.default
    rng = np.random.default_rng(11)
    col.enroll("a", unit(rng, 2))
    col.enroll("b", unit(rng, 1))
    watch, other = connect(autocommit=True), connect()
    other.execute("SET deadlock_timeout = '60s'")  # the merge's backend finds the deadlock (after 1 s)
    other.execute("SELECT 1 FROM identities WHERE collection_id = %s AND identity_id = 'b' FOR UPDATE",
                  (col.collection_id,))
    runs = Runs()
    runs.start("merge", lambda: col.merge_identities("a", "b", actor=ALICE))
    _until(lambda: _blocking(watch, other) == 1, "the merge holds a and waits for b")
    other.execute("SELECT 1 FROM identities WHERE collection_id = %s AND identity_id = 'a' FOR UPDATE",
                  (col.collection_id,))  # returns once the merge is aborted
    _until(lambda: _blocking(watch, other) == 1, "the merge runs again and waits")
    other.rollback()
    runs.join()
    assert runs.ok("merge").face_count == 3
    assert col.get_identity("a") is None and len(col.get_identity("b").faces) == 3
    assert len([e for e in g.audit(AuditQuery(limit=100)) if e.action == "identity.merged"]) == 1
    assert "gallery database unavailable" not in caplog.text
