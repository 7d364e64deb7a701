"""Collections, keys and audit on PostgreSQL: what only this backend has to get right.

The shared behaviour is in test_collections.py (both backends). Here: migration 3 upgrading a round-2
database in place, the filtered-search trap (a small collection beside a big one in one HNSW index),
audit records committed with their change (or neither), keys revoked on one replica refused by
another at once, and a deleted collection leaving no row behind, even under concurrent enrolls.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector

from service.gallery.api import (
    DEFAULT_COLLECTION,
    Actor,
    AuditQuery,
    CollectionNotFound,
    StoredKey,
)
from service.gallery.postgres.backend import (
    MIGRATIONS,
    PostgresGalleries,
    PostgresOptions,
    collection_index_name,
    hnsw_index_name,
)
from service.model.calibration import FACES_COUNTED_PER_IDENTITY
from tests.gallery.test_gallery import DIM, unit

MODEL = "m@1"
ALICE = Actor(key_id="key-alice", client="10.0.0.1", request_id="req-1")


@pytest.fixture
def options(postgres) -> PostgresOptions:
    return PostgresOptions(url=postgres.url, schema=postgres.fresh_schema())


@pytest.fixture
def opened():
    """Opens PostgresGalleries (closed at the end of the test)."""
    backends: list[PostgresGalleries] = []

    def open_(options: PostgresOptions) -> PostgresGalleries:
        g = PostgresGalleries(options, MODEL, DIM)
        g.open()
        backends.append(g)
        return g

    yield open_
    for g in backends:
        g.close()


def sql_connection(options: PostgresOptions) -> psycopg.Connection:
    conn = psycopg.connect(options.url, autocommit=True, options=f"-c search_path={options.schema},public")
    register_vector(conn)
    return conn


# --- migration 3 -----------------------------------------------------------------------------------

def make_round_two_database(options: PostgresOptions, people: dict[str, np.ndarray]) -> None:
    """A database as round 2's service left it: migrations 1 and 2 (its statements, as they shipped),
    its meta, and identities, faces and counters written as round 2's enroll wrote them."""
    with psycopg.connect(options.url, autocommit=True) as conn:
        with conn.transaction():
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            conn.execute(f"CREATE SCHEMA {options.schema}")
            conn.execute(f"SET LOCAL search_path = {options.schema}, public")
            conn.execute("CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL)")
            conn.execute("CREATE TABLE schema_migrations (version int PRIMARY KEY, description text NOT NULL, "
                         "applied_at timestamptz NOT NULL DEFAULT now())")
            for migration in MIGRATIONS[:2]:
                for statement in migration.statements:
                    conn.execute(statement.format(dim=DIM, m=16, ef_construction=64))
                conn.execute("INSERT INTO schema_migrations(version, description) VALUES (%s, %s)",
                             (migration.version, migration.description))
            conn.execute("INSERT INTO meta(key, value) VALUES ('model_id', %s), ('embedding_size', %s), "
                         "('counted_faces_cap', %s)", (MODEL, str(DIM), str(FACES_COUNTED_PER_IDENTITY)))
    with sql_connection(options) as conn, conn.transaction():
        for slot, (identity_id, faces) in enumerate(people.items()):
            conn.execute("INSERT INTO identities(identity_id, metadata, created_at, updated_at) "
                         "VALUES (%s, %s, 1.0, 2.0)", (identity_id, '{"round": 2}'))
            for face in faces:
                conn.execute("INSERT INTO faces(identity_id, embedding, created_at) VALUES (%s, %s, 1.0)",
                             (identity_id, face))
            conn.execute("UPDATE counters SET identities = identities + 1, faces = faces + %s, "
                         "counted_faces = counted_faces + %s WHERE slot = %s",
                         (len(faces), min(len(faces), FACES_COUNTED_PER_IDENTITY), slot % 16))


def test_migration_3_upgrades_a_round_two_database_in_place(options, opened):
    rng = np.random.default_rng(0)
    people = {f"old{i}": unit(rng, 1 + i % 3) for i in range(12)}
    people["many"] = unit(rng, FACES_COUNTED_PER_IDENTITY + 2)
    make_round_two_database(options, people)
    with sql_connection(options) as conn:
        face_ids = {r[1]: [] for r in conn.execute("SELECT face_id, identity_id FROM faces")}
        for face_id, identity_id in conn.execute("SELECT face_id, identity_id FROM faces ORDER BY face_id"):
            face_ids[identity_id].append(face_id)

    g = opened(options)  # applies migration 3
    faces = sum(len(v) for v in people.values())
    counted = sum(min(len(v), FACES_COUNTED_PER_IDENTITY) for v in people.values())
    [info] = g.list_collections()
    assert (info.name, info.model_id, info.identities, info.faces, info.counted_faces, info.dim) == (
        DEFAULT_COLLECTION, MODEL, len(people), faces, counted, DIM)
    default = g.collection(DEFAULT_COLLECTION)
    assert (default.identity_count, default.face_count, default.counted_faces) == (len(people), faces, counted)
    for identity_id, vectors in people.items():
        found = default.get_identity(identity_id)
        assert found.record.metadata == {"round": 2} and (found.record.created_at, found.record.updated_at) == (1.0, 2.0)
        assert [f.face_id for f in found.faces] == face_ids[identity_id]  # the same rows, not copies
        assert default.search(vectors[:1], 1)[0][0].identity_id == identity_id
    # writes go on as before, and the new parts work on the upgraded schema
    assert default.enroll("old0", unit(rng, 1), actor=ALICE).face_count == 2
    g.create_collection("new", actor=ALICE)
    assert g.collection("new").enroll("old0", unit(rng, 1)).created  # another person in another collection
    assert [e.action for e in g.audit(AuditQuery())] == ["collection.created", "identity.appended"]
    with sql_connection(options) as conn:
        assert [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY 1")] == sorted(
            m.version for m in MIGRATIONS)  # 3, and every later one (6: faces of several dimensions)
    again = opened(options)  # a second replica finds the work done
    assert again.collection(DEFAULT_COLLECTION).stats().identities == len(people)


# --- the filtered-search trap ----------------------------------------------------------------------

def normed(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def exact_best(probes: np.ndarray, vectors: np.ndarray, owners: list[str]) -> list[str]:
    return [owners[i] for i in (probes @ vectors.T).argmax(axis=1)]


@pytest.mark.parametrize("exact_max", [None, 0], ids=["design", "hnsw_path"])
def test_small_collections_beside_a_big_one_find_what_exact_search_finds(options, opened, exact_max):
    """20 faces and 3000 faces beside 20k in one table and one HNSW index: identify in each returns
    the identity exact search over that collection returns, for its own people and for people it does
    not hold (whose nearest faces in the table all belong to the big collection). With a plain filtered
    HNSW scan it does not (the 3000 one: the planner takes the HNSW index, whose walk finds none or
    too few of its faces). ``hnsw_path``: exact_search_max_faces 0, so the 3000-face collection (13% of
    the table) gets the widened iterative HNSW scan: its own people are still found as exactly."""
    options = PostgresOptions(url=options.url, schema=options.schema, statement_timeout_ms=0,  # a busy machine
                              **({} if exact_max is None else {"exact_search_max_faces": exact_max}))
    g = opened(options)
    rng = np.random.default_rng(1)
    centres = unit(rng, 10_000)
    big = [normed(c + 0.4 * unit(rng, 2)) for c in centres]
    probes_unknown = normed(centres[:60] + 0.3 * unit(rng, 60))  # people of the big collection only
    collections = {name: unit(rng, people * 2) for name, people in (("tiny", 10), ("medium", 1500))}
    with g.index_built_after():  # one HNSW index over all three, built once
        g.collection(DEFAULT_COLLECTION).import_identities([(f"big{i}", f, None) for i, f in enumerate(big)])
        for name, vectors in collections.items():
            g.create_collection(name)
            g.collection(name).import_identities([(f"{name}{i}", vectors[2 * i:2 * i + 2], None)
                                                  for i in range(len(vectors) // 2)])
    with sql_connection(options) as conn:  # the planner's statistics, as autovacuum keeps them
        conn.execute("ANALYZE faces")
    for name, vectors in collections.items():
        people = len(vectors) // 2
        owners = [f"{name}{i // 2}" for i in range(people * 2)]
        known = normed(vectors[:80:2] + 0.3 * unit(rng, min(40, people)))  # new images of its people
        probes = np.concatenate([known, probes_unknown])
        found = [g.collection(name).search(p[None], 5)[0][0].identity_id for p in probes]
        expected = exact_best(probes, vectors, owners)
        hnsw = not g.collection(name)._plan(20).exact  # noqa: SLF001 - which path this collection took
        assert hnsw == (exact_max == 0 and name == "medium"), name
        if hnsw:  # an ANN walk: exact for the collection's own people, near-exact for strangers
            assert found[:len(known)] == expected[:len(known)], name
            assert np.mean([f == e for f, e in zip(found, expected)]) >= 0.8, name
        else:
            assert found == expected, name
    assert g.collection(DEFAULT_COLLECTION).face_count == 20_000


def own_index(options: PostgresOptions, collection_id: int) -> tuple[bool, str] | None:
    """(valid, definition) of a collection's own HNSW index, None when it has none."""
    with sql_connection(options) as conn:
        row = conn.execute("SELECT x.indisvalid, pg_get_indexdef(x.indexrelid) FROM pg_index x JOIN pg_class c "
                           "ON c.oid = x.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
                           "WHERE n.nspname = %s AND c.relname = %s",
                           (options.schema, collection_index_name(collection_id))).fetchone()
    return None if row is None else (bool(row[0]), row[1])


def index_exists(options: PostgresOptions, name: str) -> bool:
    with sql_connection(options) as conn:
        return conn.execute("SELECT to_regclass(%s)", (f"{options.schema}.{name}",)).fetchone()[0] is not None


def test_a_collection_that_grows_big_beside_others_gets_an_index_of_its_own(options, opened, caplog):
    """Searched exactly while small (under a tenth of the table), a collection that reaches
    collection_index_min_faces gets an HNSW index of its own, built in the background, and every replica's
    searches of it go through that index (its own statement, which the planner can serve from it) and
    find what exact search finds; deleting the collection drops the index. (bench/pg_collection_index.py:
    10.4 ms exact vs 1.1 ms through its own index, for 30k faces beside 1M.)"""
    options = PostgresOptions(url=options.url, schema=options.schema, collection_index_min_faces=300,
                              exact_search_max_faces=100)
    g = opened(options)
    rng = np.random.default_rng(11)
    g.default.import_identities([(f"big{i}", v, None) for i, v in enumerate(unit(rng, 4000).reshape(2000, 2, DIM))])
    centres = unit(rng, 200)
    faces = centres.repeat(2, axis=0) + 0.3 * unit(rng, 400)
    faces /= np.linalg.norm(faces, axis=1, keepdims=True)
    mid = g.create_collection("mid") and g.collection("mid")
    mid.import_identities([(f"mid{i}", faces[2 * i:2 * i + 2], None) for i in range(100)])  # 200 faces: 5%
    assert mid._plan(20).exact and own_index(options, mid.collection_id) is None  # noqa: SLF001
    mid.import_identities([(f"mid{i}", faces[2 * i:2 * i + 2], None) for i in range(100, 200)])  # 400: past 300

    deadline = time.monotonic() + 60
    while not mid._plan(20).own_index:  # noqa: SLF001 - the index is built in the background
        assert time.monotonic() < deadline, "the collection's own index was not built"
        time.sleep(0.2)
        mid.stats()  # the counts, and whether the index is there
    valid, definition = own_index(options, mid.collection_id)
    assert valid and f"WHERE (collection_id = {mid.collection_id})" in definition, definition
    with sql_connection(options) as conn:  # /metrics' index size counts it beside the shared one
        sizes = [conn.execute("SELECT pg_relation_size(%s::regclass)", (f"{options.schema}.{name}",)).fetchone()[0]
                 for name in (hnsw_index_name(DIM), collection_index_name(mid.collection_id))]
    assert g.stats().extra["hnsw_index_bytes"] == sum(sizes) and min(sizes) > 0
    # its statement can be served from the index (the planner picks it once the collection is big
    # enough to beat a sort of its rows; here, with sorts ruled out)
    with sql_connection(options) as conn:
        conn.execute("SET enable_sort = off")
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + mid.own_sql, {"p": faces[0], "k": 20}).fetchall())
    assert collection_index_name(mid.collection_id) in plan, plan

    probes = centres[:50] + 0.3 * unit(rng, 50)
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)
    owners = [f"mid{i // 2}" for i in range(400)]
    expected = exact_best(probes, faces, owners)
    assert [mid.search(p[None], 5)[0][0].identity_id for p in probes] == expected
    other = opened(options)  # another replica: its first counts say the index is there
    replica_mid = other.collection("mid")
    replica_mid.stats()
    assert replica_mid._plan(20).own_index  # noqa: SLF001
    assert [replica_mid.search(p[None], 5)[0][0].identity_id for p in probes] == expected
    # the big one (over half the table) is served by the table's index: none of its own
    assert not other.default._plan(20).own_index and own_index(options, 1) is None  # noqa: SLF001

    g.delete_collection("mid")  # the index is dropped in the background
    # (by name only: pg_get_indexdef of an index being dropped concurrently fails, "cache lookup failed")
    while index_exists(options, collection_index_name(mid.collection_id)):
        assert time.monotonic() < deadline + 60, "the deleted collection's index is still there"
        time.sleep(0.2)


def test_a_build_that_gets_the_lock_after_its_collection_was_deleted_builds_nothing(options, opened):
    """A replica asks for a collection's own index (its counts said the collection had grown big); the
    collection is deleted (on another replica, whose drop finds no index yet) before the build gets the
    index builds' lock. The build then finds the collection gone and builds nothing; it built an index
    of no rows, an orphan that only the next start dropped."""
    options = PostgresOptions(url=options.url, schema=options.schema, collection_index_min_faces=300)
    g = opened(options)
    rng = np.random.default_rng(5)
    gone = g.create_collection("gone") and g.collection("gone")
    gone.import_identities([(f"p{i}", v[None], None) for i, v in enumerate(unit(rng, 10))])
    collection_id = gone.collection_id
    g.delete_collection("gone")
    g._build_collection_index(collection_id, DIM)  # noqa: SLF001 - the build thread's work, run here
    assert not index_exists(options, collection_index_name(collection_id))


# --- audit in the transaction of the change ---------------------------------------------------------

def test_a_change_whose_audit_record_fails_is_not_made(options, opened):
    """The record is written in the change's transaction: when the database refuses the record, the
    change is rolled back with it (and a change that fails leaves no record: test_collections.py)."""
    g = opened(options)
    rng = np.random.default_rng(2)
    g.create_collection("kept")
    g.collection("kept").enroll("someone", unit(rng, 2), actor=ALICE)
    with sql_connection(options) as conn:  # a record the database will refuse
        conn.execute("ALTER TABLE audit ADD CONSTRAINT refuse CHECK (identity_id IS DISTINCT FROM 'poison' "
                     "AND action <> 'collection.deleted')")
    default = g.collection(DEFAULT_COLLECTION)
    before = (default.stats().identities, default.stats().faces, len(g.audit(AuditQuery())))
    with pytest.raises(psycopg.errors.CheckViolation):
        default.enroll("poison", unit(rng, 2), actor=ALICE)
    with pytest.raises(psycopg.errors.CheckViolation):
        default.import_identities([("fine", unit(rng, 1), None), ("poison", unit(rng, 1), None)], actor=ALICE)
    with pytest.raises(psycopg.errors.CheckViolation):
        g.delete_collection("kept", actor=ALICE)
    assert (default.stats().identities, default.stats().faces, len(g.audit(AuditQuery()))) == before
    assert default.get_identity("poison") is None and default.get_identity("fine") is None
    assert g.collection("kept").get_identity("someone").record.face_count == 2  # not erased


# --- keys across replicas --------------------------------------------------------------------------

def test_a_key_revoked_on_one_replica_is_revoked_on_another_at_once(options, opened):
    a, b = opened(options), opened(options)
    key = StoredKey("k1", "h" * 64, "write", (DEFAULT_COLLECTION,), "badge office", time.time())
    assert b.get_key("k1") is None and not b.has_keys()
    a.add_key(key, actor=ALICE)
    assert b.get_key("k1") == key and b.has_keys()  # created on A: known to B at once
    revoked = a.revoke_key("k1", actor=ALICE)
    assert b.get_key("k1").revoked_at == revoked.revoked_at and not b.has_keys()  # no cache between
    b.touch_keys({"k1": 123.0})
    assert a.get_key("k1").last_used_at == 123.0


# --- deleting a collection --------------------------------------------------------------------------

def test_deleting_a_collection_leaves_no_row_even_under_concurrent_enrolls(options, opened):
    g = opened(options)
    other = opened(options)  # a second replica enrolls while the first deletes
    rng = np.random.default_rng(3)
    g.collection(DEFAULT_COLLECTION).enroll("bystander", unit(rng, 1))
    for round_ in range(3):
        g.create_collection("doomed")
        secret = unit(rng, 40)
        g.collection("doomed").import_identities([(f"s{i}", secret[i:i + 1], None) for i in range(20)])
        stop, outcomes = threading.Event(), {"stored": 0, "not_found": 0}

        def enroller():
            i = 20
            while not stop.is_set():
                try:
                    other.collection("doomed").enroll(f"s{i}", secret[i % 40:i % 40 + 1])
                    outcomes["stored"] += 1
                except CollectionNotFound:
                    outcomes["not_found"] += 1
                    return
                i += 1

        thread = threading.Thread(target=enroller)
        thread.start()
        time.sleep(0.05)
        deleted = g.delete_collection("doomed", actor=ALICE)
        stop.set()
        thread.join(30)
        assert deleted.identities >= 20 and outcomes["not_found"] + outcomes["stored"] > 0
        with sql_connection(options) as conn:
            orphans = conn.execute(
                "SELECT (SELECT count(*) FROM faces WHERE collection_id NOT IN (SELECT collection_id FROM collections)), "
                "(SELECT count(*) FROM identities WHERE collection_id NOT IN (SELECT collection_id FROM collections)), "
                "(SELECT count(*) FROM counters WHERE collection_id NOT IN (SELECT collection_id FROM collections))"
            ).fetchone()
            assert orphans == (0, 0, 0), round_
            for v in secret:  # no face of it is left, under any collection
                assert conn.execute("SELECT count(*) FROM faces WHERE embedding <=> %s < 1e-6", (v,)).fetchone()[0] == 0
    assert g.collection(DEFAULT_COLLECTION).stats().identities == 1


# --- a lagging standby ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    """A PostgreSQL of its own with a streaming standby (the suite's server keeps no standby)."""
    from harness.pg import PgTestServer

    primary = PgTestServer()
    standby = primary.standby()
    yield primary, standby
    primary.close()


def test_collections_and_keys_are_read_on_the_primary_while_a_standby_lags(cluster, opened):
    """A collection created (or a key revoked) a moment ago is there for another replica even when
    its searches read on a standby that has not replayed it yet: no 404 for a collection that exists."""
    primary, standby = cluster
    options = PostgresOptions(url=primary.url, schema=primary.fresh_schema(), read_urls=(standby.url,),
                              max_lag_ms=60_000, lag_check_ms=100)
    a, b = opened(options), opened(options)
    rng = np.random.default_rng(4)
    face = unit(rng, 1)
    a.collection(DEFAULT_COLLECTION).enroll("before", face)
    deadline = time.monotonic() + 30
    while not b.collection(DEFAULT_COLLECTION).search(face, 1)[0]:  # the standby has the schema and the face
        assert time.monotonic() < deadline
        time.sleep(0.1)
    standby.pause_replay()
    try:
        a.create_collection("fresh", actor=ALICE)
        a.add_key(StoredKey("k1", "h" * 64, "read", ("fresh",), None, time.time()), actor=ALICE)
        standby_reads = b.read_targets()[1].reads
        fresh = b.collection("fresh")  # found on the primary
        assert fresh.search(face, 5) == [[]]  # read on the standby, which has no such collection yet
        assert b.read_targets()[1].reads == standby_reads + 1
        assert [c.name for c in b.list_collections()] == [DEFAULT_COLLECTION, "fresh"]
        assert b.get_key("k1").role == "read" and b.has_keys()
        a.revoke_key("k1", actor=ALICE)
        assert b.get_key("k1").revoked_at is not None and not b.has_keys()
        fresh.enroll("new", face, actor=ALICE)  # writes go to the primary
        assert [e.action for e in b.audit(AuditQuery(collection="fresh"))] == ["identity.created", "collection.created"]
    finally:
        standby.resume_replay()
