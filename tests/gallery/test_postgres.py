"""The postgres backend as several replicas see it: two galleries on one real database.

Start-up races, the same new identity enrolled by two replicas at once, cross-replica visibility of
enrollments and deletes, the pgvector index really used, and a database outage and its return.
"""

from __future__ import annotations

import logging
import resource
import threading
import time
from dataclasses import replace

import numpy as np
import psycopg
import pytest

from service.gallery.api import GalleryUnavailable
from service.gallery.postgres.backend import MIGRATIONS, PostgresGalleries, PostgresOptions, hnsw_index_name
from service.model.calibration import FACES_COUNTED_PER_IDENTITY
from tests.pg import PgTestServer

DIM = 32
# a kNN over the faces of DIM values, as the backend asks it (its index's cast and predicate)
KNN_SQL = (f"EXPLAIN SELECT face_id FROM faces WHERE vector_dims(embedding) = {DIM} "
           f"ORDER BY embedding::vector({DIM}) <=> %b LIMIT 20")


def unit(rng, n):
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture
def pair(postgres):
    """Two open backends (replica A and B) on one fresh schema of the test database."""
    options = PostgresOptions(url=postgres.url, schema=postgres.fresh_schema())
    both = [PostgresGalleries(options, "m@1", DIM) for _ in range(2)]
    for g in both:
        g.open()
    yield both
    for g in both:
        g.close()


@pytest.fixture
def replicas(pair):
    """The default collections of replica A and B."""
    return [g.default for g in pair]


def test_replicas_starting_together_migrate_once(postgres):
    options = PostgresOptions(url=postgres.url, schema=postgres.fresh_schema())
    galleries = [PostgresGalleries(options, "m@1", DIM) for _ in range(6)]
    start, errors = threading.Barrier(len(galleries)), []

    def open_one(g):
        start.wait()
        try:
            g.open()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=open_one, args=(g,)) for g in galleries]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    with psycopg.connect(postgres.url) as conn:
        versions = [r[0] for r in conn.execute(f"SELECT version FROM {options.schema}.schema_migrations ORDER BY 1")]
        meta = dict(conn.execute(f"SELECT key, value FROM {options.schema}.meta").fetchall())
    assert versions == sorted(m.version for m in MIGRATIONS)  # applied in version order, whatever the tuple's
    assert meta == {"model_id": "m@1", "embedding_size": str(DIM),
                    "counted_faces_cap": str(FACES_COUNTED_PER_IDENTITY)}
    galleries[0].default.enroll("x", unit(np.random.default_rng(0), 1))
    assert all(g.stats().identities == 1 for g in galleries)
    for g in galleries:
        g.close()


def test_same_new_identity_enrolled_by_two_replicas_at_once(replicas):
    a, b = replicas
    rng = np.random.default_rng(1)
    for round_ in range(20):
        identity, faces = f"new{round_}", unit(rng, 2)
        barrier, results, errors = threading.Barrier(2), {}, []

        def enroll(name, g, face):
            barrier.wait()
            try:
                results[name] = g.enroll(identity, face[None])
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=enroll, args=("a", a, faces[0])),
                   threading.Thread(target=enroll, args=("b", b, faces[1]))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors
        assert sorted([results["a"].created, results["b"].created]) == [False, True]  # exactly one created it
        found = b.get_identity(identity)
        assert found.record.face_count == 2
        assert sorted(f.face_id for f in found.faces) == sorted(results["a"].face_ids + results["b"].face_ids)
    assert a.stats().identities == 20 and a.stats().faces == 40


def test_enrollment_and_delete_cross_replicas_at_once(replicas):
    a, b = replicas
    rng = np.random.default_rng(2)
    for i in range(30):
        a.enroll(f"bg{i}", unit(rng, 1))
    face = unit(rng, 1)
    a.enroll("carol", face)
    assert b.search(face, 1)[0][0].identity_id == "carol"  # acknowledged by A, found by B at once
    assert b.identity_count == 31
    assert a.delete("carol") == 1
    assert all(m.identity_id != "carol" for m in b.search(face, 50)[0])
    assert b.get_identity("carol") is None and b.identity_embeddings("carol") is None
    assert b.delete("carol") is None


def test_deletes_are_never_returned_under_concurrent_search(replicas):
    a, b = replicas
    rng = np.random.default_rng(3)
    vectors = {f"p{i}": unit(rng, 1) for i in range(60)}
    for identity, v in vectors.items():
        a.enroll(identity, v)
    deleted: set[str] = set()
    lock, stop, errors = threading.Lock(), threading.Event(), []

    def searcher():
        try:
            while not stop.is_set():
                with lock:
                    gone = set(deleted)  # deletes acknowledged before this search started
                for identity in list(vectors)[::7]:
                    hits = b.search(vectors[identity], 5)[0]
                    returned = {m.identity_id for m in hits} & gone
                    assert not returned, f"deleted but returned: {returned}"
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for t in threads:
        t.start()
    for identity in list(vectors)[::2]:
        assert a.delete(identity) == 1
        with lock:
            deleted.add(identity)
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors


def test_search_uses_the_hnsw_index(replicas):
    a, _ = replicas
    rng = np.random.default_rng(4)
    a.import_identities([(f"i{i}", unit(rng, 1), None) for i in range(3000)])
    probe = unit(rng, 1)[0]
    with a._transaction() as conn:
        plan = "\n".join(r[0] for r in conn.execute(
            KNN_SQL, (probe,)))
    assert hnsw_index_name(DIM) in plan, plan


def test_search_sets_ef_for_its_own_scan_only(postgres):
    """A search is one pipeline ended by one Sync: its set_config(.., true) must reach its kNN scans
    (with iterative scans off, an HNSW scan returns at most ef_search rows) and end with it."""
    options = PostgresOptions(url=postgres.url, schema=postgres.fresh_schema(), hnsw_ef_search=16,
                              iterative_scan="off", read_pool_size=1)
    backend = PostgresGalleries(options, "m@1", DIM)
    backend.open()
    g = backend.default
    try:
        rng = np.random.default_rng(5)
        g.import_identities([(f"i{i}", unit(rng, 2), None) for i in range(150)])
        probes = unit(rng, 3)
        # top_k 60 asks for 240 faces: pgvector's default ef (40) or the setting (16) would give too few
        results = g.search(probes, 60)
        assert [len(r) for r in results] == [60, 60, 60]
        with g._read_connection() as conn:  # the read pool's only connection: the search's settings are gone
            assert conn.execute("SELECT current_setting('hnsw.ef_search', true)").fetchone()[0] in (None, "", "40")
    finally:
        backend.close()


def test_database_outage_answers_unavailable_then_recovers():
    server = PgTestServer()  # a server of its own: the shared one stays up
    options = PostgresOptions(url=server.url, schema="gallery", timeout_s=2)
    backend = PostgresGalleries(options, "m@1", DIM)
    g = backend.default
    try:
        backend.open()
        face = unit(np.random.default_rng(5), 1)
        g.enroll("before", face)
        server.stop()
        for call in (lambda: g.search(face, 1), lambda: g.enroll("during", face), lambda: g.stats(),
                     lambda: g.list_identities(10, None)):
            started = time.monotonic()
            with pytest.raises(GalleryUnavailable):
                call()
            assert time.monotonic() - started < options.timeout_s + 5  # answered, not hung
        server.start()
        deadline = time.monotonic() + 30
        while True:  # the same pool, never reopened by us
            try:
                hits = g.search(face, 1)[0]
                break
            except GalleryUnavailable:
                assert time.monotonic() < deadline, "the pool did not reconnect"
                time.sleep(0.5)
        assert hits[0].identity_id == "before"
        while True:  # the write pool has its own reconnection (its own backoff): healed too, maybe later
            try:
                g.enroll("after", face)
                break
            except GalleryUnavailable:
                assert time.monotonic() < deadline, "the write pool did not reconnect"
                time.sleep(0.5)
        assert g.stats().identities == 2  # the enroll attempted during the outage was not stored
    finally:
        backend.close()
        server.close()


def _plan_uses_index(gallery, probe) -> bool:
    with gallery._transaction() as conn:  # noqa: SLF001
        plan = "\n".join(r[0] for r in conn.execute(
            KNN_SQL, (probe,)))
    return hnsw_index_name(DIM) in plan


def test_bulk_load_builds_the_index_after_and_a_crash_midway_heals_at_start(replicas, postgres):
    a, b = replicas
    rng = np.random.default_rng(6)
    vectors = unit(rng, 3000)
    with a.index_built_after():
        assert not _plan_uses_index(b, vectors[0])  # meanwhile: exact scans on every replica
        a.import_identities([(f"bulk{i}", vectors[i : i + 1], None) for i in range(3000)])
        assert b.search(vectors[7:8], 1)[0][0].identity_id == "bulk7"  # still correct
    assert _plan_uses_index(b, vectors[0])
    assert b.search(vectors[42:43], 1)[0][0].identity_id == "bulk42"

    with a._transaction() as conn:  # noqa: SLF001 - as if a bulk load died after dropping the index
        conn.execute(f"DROP INDEX {hnsw_index_name(DIM)}")
    restarted = PostgresGalleries(a.options, "m@1", DIM)
    restarted.open()  # builds it again
    try:
        assert _plan_uses_index(restarted.default, vectors[0])
        assert restarted.default.search(vectors[99:100], 1)[0][0].identity_id == "bulk99"
    finally:
        restarted.close()


def test_a_replica_warns_when_the_hnsw_index_outgrows_shared_buffers(caplog):
    server = PgTestServer()  # a server of its own: shared_buffers takes a restart
    options = PostgresOptions(url=server.url, schema="gallery")
    vectors = unit(np.random.default_rng(8), 3000)

    def reopen() -> list:
        caplog.clear()
        backend = PostgresGalleries(options, "m@1", DIM)
        with caplog.at_level(logging.INFO, logger="service.gallery.postgres"):
            backend.open()
        backend.close()
        return [r for r in caplog.records if r.name.startswith("service.gallery.postgres")]

    try:
        backend = PostgresGalleries(options, "m@1", DIM)
        backend.open()
        backend.default.import_identities([(f"p{i}", vectors[i : i + 1], None) for i in range(len(vectors))])
        backend.close()
        with psycopg.connect(server.url, autocommit=True) as conn:
            index_bytes = conn.execute("SELECT pg_relation_size(%s::regclass)",
                                       (f"gallery.{hnsw_index_name(DIM)}",)).fetchone()[0]
        assert index_bytes > 256 * 1024

        # PostgreSQL's default 128MB holds it: no warning, the figures in the ready line
        records = reopen()
        ready = next(r for r in records if r.getMessage() == "postgres gallery ready")
        assert (ready.hnsw_index_bytes, ready.shared_buffers_bytes) == (index_bytes, 128 * 1024 * 1024)
        assert ready.huge_pages in ("on", "off")  # PostgreSQL 18 says which
        assert not [r for r in records if r.levelno >= logging.WARNING]

        # and in the stats (/readyz, /metrics) at every call
        backend = PostgresGalleries(options, "m@1", DIM)
        backend.open()
        try:
            extra = backend.stats().extra
        finally:
            backend.close()
        assert (extra["hnsw_index_bytes"], extra["shared_buffers_bytes"]) == (index_bytes, 128 * 1024 * 1024)
        assert extra.get("huge_pages") in (0, 1)

        with psycopg.connect(server.url, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET shared_buffers = '256kB'")
        server.stop()
        server.start()
        warned = [r for r in reopen() if r.levelno == logging.WARNING]
        assert [r.getMessage().startswith("the pgvector HNSW index is larger than shared_buffers") for r in warned] == [True]
        assert (warned[0].hnsw_index_bytes, warned[0].shared_buffers_bytes) == (index_bytes, 256 * 1024)

        # a standby has shared_buffers of its own: checked (and warned about) when its checker connects,
        # and shown as its read target's
        standby = server.standby({"shared_buffers": "512kB"})
        with_standby = replace(options, read_urls=(standby.url,))
        caplog.clear()
        backend = PostgresGalleries(with_standby, "m@1", DIM)
        with caplog.at_level(logging.INFO, logger="service.gallery.postgres"):
            backend.open()
        try:
            target = next(t for t in backend.read_targets() if t.role == "standby")
            assert target.memory["shared_buffers_bytes"] == 512 * 1024
            assert backend.stats().extra["shared_buffers_bytes"] == 256 * 1024  # the primary's
        finally:
            backend.close()
        warned = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert sorted((r.where.startswith("standby "), r.shared_buffers_bytes) for r in warned) == [
            (False, 256 * 1024), (True, 512 * 1024)]
        assert all(r.hnsw_index_bytes == index_bytes for r in warned)
    finally:
        server.close()


def test_an_index_build_without_shared_memory_for_its_workers_builds_with_one_process(caplog):
    """A parallel HNSW build puts its graph in maintenance_work_mem (512MB) of dynamic shared memory, a
    file in /dev/shm, of which a container gets 64 MB unless told otherwise (docker's --shm-size; the
    pgvector/pgvector image of docker-compose.scale.yml). The build failed there (DiskFull, answered as
    503s), so the index of a bulk import was never built and every replica start failed on it."""
    server = PgTestServer()  # a server of its own: its file size limit and settings
    options = PostgresOptions(url=server.url, schema="gallery")
    try:
        backend = PostgresGalleries(options, "m@1", DIM)
        backend.open()  # the schema made first (its small indexes would go parallel too with the setting below)
        backend.close()
        with psycopg.connect(server.url, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET min_parallel_table_scan_size = 0")  # a parallel build for a small table
        # the segment cannot be allocated, as in a 64 MB /dev/shm: here the server runs under a 32 MB
        # file size limit (EFBIG: out_of_memory, where a full tmpfs gives ENOSPC: disk_full); its
        # backends and workers inherit it from the postmaster, whose start inherits it from this process
        server.stop()
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (32 << 20, hard))
        try:
            server.start()
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        backend = PostgresGalleries(options, "m@1", DIM)
        backend.open()
        vectors = unit(np.random.default_rng(9), 3000)
        with caplog.at_level(logging.WARNING, logger="service.gallery.postgres"):
            with backend.default.index_built_after():
                backend.default.import_identities([(f"bulk{i}", vectors[i : i + 1], None) for i in range(len(vectors))])
        assert [r for r in caplog.records if r.getMessage().startswith("the parallel HNSW build could not get its shared memory")]
        assert _plan_uses_index(backend.default, vectors[0])
        assert backend.default.search(vectors[42:43], 1)[0][0].identity_id == "bulk42"
        backend.close()
        restarted = PostgresGalleries(options, "m@1", DIM)
        restarted.open()  # a valid index: nothing left to build
        try:
            assert restarted.default.search(vectors[7:8], 1)[0][0].identity_id == "bulk7"
            with restarted._transaction() as conn:  # noqa: SLF001
                assert conn.execute("SELECT count(*) FROM pg_index x JOIN pg_class c ON c.oid = x.indexrelid "
                                    "WHERE c.relname = %s AND x.indisvalid", (hnsw_index_name(DIM),)).fetchone()[0] == 1
        finally:
            restarted.close()
    finally:
        server.close()

