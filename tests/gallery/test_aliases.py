"""Aliases (``Galleries.set_alias`` / ``delete_alias`` / ``list_aliases`` / ``resolve``) on both backends:
one namespace with the collections, atomic re-points, collection_in_use, audited in the same
transaction; and the PostgreSQL migration runner taking numbered migrations in any order."""

from __future__ import annotations

import threading

import numpy as np
import psycopg
import pytest

import tests.gallery.test_collections as collections_tests
from service.gallery.api import (
    DEFAULT_COLLECTION,
    AliasNotFound,
    AuditQuery,
    CollectionExists,
    CollectionInUse,
    CollectionNotFound,
)
from service.gallery.open import make_gallery
from tests.gallery.test_gallery import DIM, unit

# the Galleries of one backend per test, as tests/gallery/test_collections.py opens them
backend = collections_tests.backend
galleries = collections_tests.galleries
ALICE, MODEL = collections_tests.ALICE, collections_tests.MODEL


def test_an_alias_is_set_listed_resolved_re_pointed_and_deleted(galleries):
    galleries.create_collection("faces-v1")
    galleries.create_collection("faces-v2")
    info = galleries.set_alias("prod", "faces-v1", ALICE)
    assert (info.name, info.collection) == ("prod", "faces-v1")
    assert galleries.resolve("prod") == "faces-v1"
    assert galleries.resolve("faces-v2") == "faces-v2"  # a collection's own name resolves to itself
    assert galleries.resolve(DEFAULT_COLLECTION) == DEFAULT_COLLECTION
    with pytest.raises(CollectionNotFound):
        galleries.resolve("nothing-by-that-name")
    again = galleries.set_alias("prod", "faces-v2", ALICE)  # re-point
    assert again.collection == "faces-v2" and again.updated_at >= info.updated_at
    galleries.set_alias("staging", "faces-v1")
    assert [(a.name, a.collection) for a in galleries.list_aliases()] == [("prod", "faces-v2"), ("staging", "faces-v1")]
    assert galleries.resolve("prod") == "faces-v2"
    gone = galleries.delete_alias("prod", ALICE)
    assert (gone.name, gone.collection) == ("prod", "faces-v2")
    assert [a.name for a in galleries.list_aliases()] == ["staging"]
    with pytest.raises(AliasNotFound):
        galleries.delete_alias("prod")
    with pytest.raises(CollectionNotFound):
        galleries.resolve("prod")
    assert [c.name for c in galleries.list_collections()] == [DEFAULT_COLLECTION, "faces-v1", "faces-v2"]


def test_aliases_and_collections_share_one_namespace(galleries):
    galleries.create_collection("faces-v1")
    with pytest.raises(CollectionExists):
        galleries.set_alias("faces-v1", DEFAULT_COLLECTION)  # a collection's name
    with pytest.raises(CollectionExists):
        galleries.set_alias(DEFAULT_COLLECTION, "faces-v1")
    galleries.set_alias("prod", "faces-v1")
    with pytest.raises(CollectionExists):
        galleries.create_collection("prod")  # an alias's name
    with pytest.raises(CollectionNotFound):
        galleries.set_alias("other", "prod")  # an alias points at a collection, never at an alias
    with pytest.raises(CollectionNotFound):
        galleries.set_alias("other", "missing")
    with pytest.raises(ValueError):
        galleries.set_alias("Not A Name", "faces-v1")
    assert [(a.name, a.collection) for a in galleries.list_aliases()] == [("prod", "faces-v1")]
    assert [c.name for c in galleries.list_collections()] == [DEFAULT_COLLECTION, "faces-v1"]


def test_a_collection_an_alias_points_to_cannot_be_deleted(galleries):
    galleries.create_collection("faces-v1")
    galleries.collection("faces-v1").enroll("ann", unit(np.random.default_rng(1), 1))
    galleries.set_alias("prod", "faces-v1")
    galleries.set_alias("also", "faces-v1")
    with pytest.raises(CollectionInUse) as refused:
        galleries.delete_collection("faces-v1", ALICE)
    assert refused.value.aliases == ["also", "prod"]
    assert galleries.collection("faces-v1").get_identity("ann") is not None  # nothing erased
    assert galleries.collection_info("faces-v1").faces == 1
    galleries.delete_alias("prod")
    galleries.delete_alias("also")
    assert galleries.delete_collection("faces-v1", ALICE).faces == 1


def test_alias_changes_are_audited(galleries):
    galleries.create_collection("faces-v1")
    galleries.create_collection("faces-v2")
    galleries.set_alias("prod", "faces-v1", ALICE)
    galleries.set_alias("prod", "faces-v2", ALICE)
    galleries.delete_alias("prod", ALICE)
    entries = [e for e in galleries.audit(AuditQuery(limit=50)) if e.action.startswith("alias.")]
    assert [(e.action, e.collection, e.details.get("alias"), e.details.get("previous")) for e in reversed(entries)] == [
        ("alias.set", "faces-v1", "prod", None), ("alias.set", "faces-v2", "prod", "faces-v1"),
        ("alias.deleted", "faces-v2", "prod", None)]
    assert all((e.key_id, e.client, e.request_id) == (ALICE.key_id, ALICE.client, ALICE.request_id) for e in entries)
    # a refused change writes nothing
    with pytest.raises(CollectionNotFound):
        galleries.set_alias("prod", "missing", ALICE)
    assert len([e for e in galleries.audit(AuditQuery(limit=50)) if e.action.startswith("alias.")]) == 3


def test_another_process_view_of_the_same_storage_sees_a_re_point_at_once(backend):
    """What the CLI does beside a running server: the embedded catalog is written by an unopened
    Galleries (no data-dir lock), PostgreSQL by another connection; the serving one reads it back."""
    serving = backend()
    serving.create_collection("faces-v1")
    serving.create_collection("faces-v2")
    serving.set_alias("prod", "faces-v1")
    cli = make_gallery(backend.settings, MODEL, DIM)
    if backend.name == "postgres":
        cli.open()
    try:
        cli.set_alias("prod", "faces-v2")
        assert serving.resolve("prod") == "faces-v2"
        assert {a.name: a.collection for a in serving.list_aliases()} == {"prod": "faces-v2"}
    finally:
        cli.close()


def test_a_name_is_taken_once_by_concurrent_collection_creates_and_alias_sets(galleries):
    galleries.create_collection("target")
    for round_ in range(8):
        name = f"contested-{round_}"
        results: list[str] = []
        barrier = threading.Barrier(4)

        def create() -> None:
            barrier.wait()
            try:
                galleries.create_collection(name)
                results.append("collection")
            except CollectionExists:
                results.append("refused")

        def alias() -> None:
            barrier.wait()
            try:
                galleries.set_alias(name, "target")
                results.append("alias")
            except CollectionExists:
                results.append("refused")

        threads = [threading.Thread(target=f) for f in (create, alias, create, alias)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        collection = name in {c.name for c in galleries.list_collections()}
        aliased = name in {a.name for a in galleries.list_aliases()}
        assert collection != aliased, (round_, results)  # exactly one of the two has the name
        assert results.count("collection") == (1 if collection else 0), results  # the other create: refused


def test_the_migration_runner_applies_missing_versions_whatever_their_order(postgres):
    """Migrations 4, 5 and 6 land from different changes: a database that has 5 but not 4 (or the
    tuple written 6, 4, 5) gets exactly the missing ones, in version order, once."""
    from service.gallery.postgres.backend import MIGRATIONS, Migration, PostgresOptions, migrate

    env = postgres.gallery_env()
    options = PostgresOptions(url=env["FACE_DATABASE_URL"], schema=env["FACE_DATABASE_SCHEMA"])
    known = [m for m in MIGRATIONS if m.version != 4]  # a database that has 5 and 6 but not 4
    four = next(m for m in MIGRATIONS if m.version == 4)
    later = Migration(98, "test: a change that landed last", ("CREATE TABLE landed_last (x int)",))
    with psycopg.connect(options.url, **options.connect_kwargs()) as conn:
        assert [v for v in migrate(conn, options, MODEL, DIM, tuple(known)) if isinstance(v, int)] == \
            [m.version for m in known]
        assert [v for v in migrate(conn, options, MODEL, DIM, (later, *known, four)) if isinstance(v, int)] == [4, 98]
        assert [v for v in migrate(conn, options, MODEL, DIM, (later, *known, four)) if isinstance(v, int)] == []
        conn.execute(f"SET search_path = {options.schema}")
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY applied_at, version")]
    assert sorted(versions) == sorted([m.version for m in MIGRATIONS] + [98])


def test_a_replica_alias_map_is_never_older_than_its_bound(galleries):
    """service/gallery/aliases.py: the map is read again once FACE_ALIAS_CACHE_S has passed (a clock
    the test moves), and at once after forget()."""
    from service.gallery.aliases import AliasMap

    galleries.create_collection("faces-v1")
    galleries.create_collection("faces-v2")
    galleries.set_alias("prod", "faces-v1")
    now = [100.0]
    aliases = AliasMap(galleries, cache_s=5.0, clock=lambda: now[0])  # capped at 1 s
    assert aliases.cached() is None
    assert aliases.resolve("prod") == "faces-v1" and aliases.resolve("faces-v2") == "faces-v2"
    galleries.set_alias("prod", "faces-v2")  # another replica re-points
    now[0] += 0.99
    assert aliases.cached() == {"prod": "faces-v1"}  # within the bound: the map read before
    now[0] += 0.02
    assert aliases.cached() is None and aliases.resolve("prod") == "faces-v2"
    galleries.delete_alias("prod")
    aliases.forget()  # this replica deleted it: followed at once
    assert aliases.resolve("prod") == "prod"
