"""Gallery: store and index stay consistent through enroll, delete, growth, restart and concurrency.

Every test that is not about one backend's internals runs on both backends (``backend`` fixture):
embedded (SQLite + hnswlib in a data dir) and postgres (a real PostgreSQL + pgvector started by the
suite, a fresh schema per test).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from service.gallery import Gallery, GalleryModelMismatch
from service.gallery.api import IdentityExists, TooManyFacesForIdentity
from service.gallery.embedded.backend import EmbeddedGallery
from service.gallery.embedded.gallery import ReadWriteLock
from service.model.calibration import FACES_COUNTED_PER_IDENTITY

DIM = 32


def unit(rng, n):
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def crash(g: Gallery) -> None:
    """Leave as a killed process would: no snapshot, no checkpoint; only the lock goes (the kernel
    drops a dead process's flock)."""
    g._stop.set()  # noqa: SLF001
    if g._maintainer is not None:  # noqa: SLF001
        g._maintainer.join()  # noqa: SLF001
    g.store._writer.close()  # noqa: SLF001
    g.store = None  # a later close() (fixture teardown) has nothing left to do, as for a dead process
    g.dir_lock.release()


@pytest.fixture(params=["embedded", "postgres"])
def backend(request, tmp_path):
    """Opens galleries of one backend, all on the same storage (a data dir, or one database schema)."""
    if request.param == "embedded":
        def make(model_id, dim, ef_search):
            return EmbeddedGallery(Gallery(tmp_path, model_id, dim, ef_search=ef_search))
    else:
        from service.gallery.postgres.backend import PostgresGalleries, PostgresOptions

        server = request.getfixturevalue("postgres")
        schema = server.fresh_schema()

        def make(model_id, dim, ef_search):
            options = PostgresOptions(url=server.url, schema=schema, hnsw_ef_search=ef_search)
            return PostgresGalleries(options, model_id, dim)
    opened = []

    def open_gallery(model_id: str = "m@1", dim: int = DIM, ef_search: int = 128):
        g = make(model_id, dim, ef_search)
        g.open()
        opened.append(g)
        return g if request.param == "embedded" else g.default  # postgres: its default collection

    open_gallery.name = request.param
    yield open_gallery
    for g in opened:
        g.close()


@pytest.fixture
def gallery(backend):
    return backend(ef_search=64)


def test_search_scores_identities_by_best_face(gallery):
    rng = np.random.default_rng(0)
    faces = unit(rng, 3)
    gallery.enroll("alice", faces)
    gallery.enroll("bob", unit(rng, 2))
    probe = faces[1:2] * 0.9 + unit(rng, 1) * 0.1
    probe /= np.linalg.norm(probe)
    best = gallery.search(probe, 2)[0]
    assert [m.identity_id for m in best] == ["alice", "bob"]
    assert best[0].score == pytest.approx(float((faces @ probe[0]).max()), abs=1e-5)


def test_identity_with_many_faces_cannot_crowd_out_others(gallery):
    rng = np.random.default_rng(1)
    base = unit(rng, 1)
    crowd = base + 0.05 * unit(rng, 40)  # 40 faces all nearer the probe than anyone else
    gallery.enroll("crowd", crowd / np.linalg.norm(crowd, axis=1, keepdims=True))
    for i in range(5):
        gallery.enroll(f"other{i}", unit(rng, 1))
    result = gallery.search(base, 4)[0]
    assert len(result) == 4 and result[0].identity_id == "crowd"
    assert len({m.identity_id for m in result}) == 4


def test_grows_past_capacity_and_deletes_are_final(gallery):
    rng = np.random.default_rng(2)
    vectors = {f"id{i}": unit(rng, 1) for i in range(3000)}  # initial capacity is 1024
    for identity, v in vectors.items():
        gallery.enroll(identity, v)
    assert gallery.stats().extra.get("index_capacity", 3000) >= 3000  # embedded: the hnswlib index grew
    for i in range(0, 3000, 2):
        assert gallery.delete(f"id{i}") == 1
    assert gallery.delete("id0") is None
    for i in range(0, 40):
        hits = gallery.search(vectors[f"id{i}"], 5)[0]
        assert all(int(m.identity_id[2:]) % 2 == 1 for m in hits)
        if i % 2:
            assert hits[0].identity_id == f"id{i}"
    assert gallery.stats().identities == 1500 == gallery.stats().index_live == gallery.identity_count


def test_group_by_identity_scores_an_undefined_similarity_0():
    """NaN (pgvector's cosine distance to a zero vector) is no score: 0.0, as hnswlib scores it."""
    from service.gallery.search import group_by_identity

    best = group_by_identity([(1, "ghost", float("nan")), (2, "alice", 0.5), (3, "ghost", float("nan"))])
    assert [(m.identity_id, m.score) for m in best] == [("alice", 0.5), ("ghost", 0.0)]


def test_group_by_identity_never_returns_a_face_without_an_identity():
    from service.gallery.search import group_by_identity

    hits = [(7, None, 0.99), (3, "a", 0.5), (4, "b", 0.7), (5, "a", 0.8)]  # face 7: deleted / unknown label
    assert [(m.identity_id, m.score, m.face_id) for m in group_by_identity(hits)] == [
        ("a", pytest.approx(0.8), 5), ("b", pytest.approx(0.7), 4)]


def test_a_stored_zero_vector_scores_0_never_nan(gallery):
    """A zero vector has no direction. Before client vectors were scaled first, 1e308 values were stored
    as zeros; such a face (a gallery from then) scores 0.0 where it is found (hnswlib; pgvector's cosine
    gives NaN, which JSON answers showed as null, and its HNSW index leaves zero vectors out), and never
    hides the real matches."""
    rng = np.random.default_rng(4)
    faces = unit(rng, 2)
    gallery.enroll("ghost", np.zeros((1, DIM), np.float32))
    gallery.enroll("alice", faces)
    best = gallery.search(faces[:1], 5)[0]
    assert best[0].identity_id == "alice" and best[0].score == pytest.approx(1.0, abs=1e-5)
    assert [(m.identity_id, m.score) for m in best[1:]] in ([("ghost", 0.0)], [])


def test_enroll_result_counts_the_identity_faces_after_the_write(gallery):
    rng = np.random.default_rng(12)
    assert gallery.enroll("erin", unit(rng, 2)).face_count == 2
    assert gallery.enroll("erin", unit(rng, 3)).face_count == 5  # appended
    replaced = gallery.enroll("erin", unit(rng, 1), replace=True)
    assert (replaced.face_count, replaced.faces_removed, replaced.created) == (1, 5, False)
    assert gallery.get_identity("erin").record.face_count == 1


def test_faces_per_identity_are_capped_inside_the_write(gallery):
    rng = np.random.default_rng(21)
    gallery.enroll("cap", unit(rng, 5), max_faces=8)
    with pytest.raises(TooManyFacesForIdentity) as refused:
        gallery.enroll("cap", unit(rng, 4), metadata={"lost": True}, max_faces=8)
    assert (refused.value.existing, refused.value.adding, refused.value.limit) == (5, 4, 8)
    kept = gallery.get_identity("cap").record
    assert kept.face_count == 5 and kept.metadata == {}  # nothing of the refused write was stored
    with pytest.raises(TooManyFacesForIdentity):
        gallery.enroll("new-too-big", unit(rng, 9), max_faces=8)
    assert gallery.get_identity("new-too-big") is None
    assert gallery.enroll("cap", unit(rng, 8), replace=True, max_faces=8).face_count == 8  # replace: its own count
    assert gallery.stats().faces == gallery.face_count == 8


def test_concurrent_appends_cannot_overshoot_the_cap(gallery):
    rng = np.random.default_rng(22)
    gallery.enroll("busy", unit(rng, 2), max_faces=10)
    faces = unit(rng, 16)
    start, results = threading.Barrier(16), []

    def append(i):
        start.wait()
        try:
            results.append(gallery.enroll("busy", faces[i:i + 1], max_faces=10).face_count)
        except TooManyFacesForIdentity:
            results.append("refused")

    threads = [threading.Thread(target=append, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(r for r in results if r != "refused") == list(range(3, 11))
    assert results.count("refused") == 8
    assert gallery.get_identity("busy").record.face_count == 10


@pytest.mark.parametrize("case", ["mostly_deleted", "one_big_identity"])
def test_search_finds_k_faces_where_the_graph_search_cannot(backend, case):
    """hnswlib raised 'Cannot return the results in a contiguous 2D array' (a 500 on /identify and
    /enroll) when asked for nearly every live face (a probe widening past an identity of many faces)
    or when the graph is mostly deleted slots (300 near-duplicates replaced by 3)."""
    gallery, rng = backend(dim=128, ef_search="auto"), np.random.default_rng(0)

    def unit128(v):
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)

    centre = rng.normal(size=(1, 128))
    gallery.enroll("crowd", unit128(centre + rng.normal(scale=0.02, size=(300, 128))))
    if case == "mostly_deleted":
        gallery.enroll("crowd", unit128(centre + rng.normal(scale=0.02, size=(3, 128))), replace=True)
        found = gallery.search(unit128(rng.normal(size=(4, 128))), 17)
        assert all([m.identity_id for m in row] == ["crowd"] for row in found)
    else:
        others = unit128(rng.normal(size=(30, 128)))
        for i, v in enumerate(others):
            gallery.enroll(f"other{i}", v[None])
        found = gallery.search(unit128(centre + rng.normal(scale=0.02, size=(4, 128))), 17)
        assert all(len(row) == 17 and row[0].identity_id == "crowd" for row in found)


def test_counted_faces_count_each_identity_up_to_the_cap(backend):
    """n_eff's face count: every write keeps sum(min(faces, cap)) exact, and a reopen agrees."""
    rng, cap = np.random.default_rng(23), FACES_COUNTED_PER_IDENTITY
    g = backend()
    g.enroll("many", unit(rng, cap + 7))
    g.enroll("few", unit(rng, 2))
    g.enroll("few", unit(rng, cap))  # append past the cap
    g.enroll("many", unit(rng, 3), replace=True)
    g.import_identities([("imp1", unit(rng, cap + 1), None), ("imp2", unit(rng, 1), None)])
    g.enroll("gone", unit(rng, 4))
    g.delete("gone")
    assert g.counted_faces == 3 + cap + cap + 1
    assert g.face_count == 3 + cap + 2 + cap + 1 + 1
    g.search(unit(rng, 1), 1)  # postgres reads the counts again with a search
    assert g.counted_faces == 3 + cap + cap + 1
    g.close()
    assert backend().counted_faces == 3 + cap + cap + 1


def test_replace_swaps_faces_in_index_too(gallery):
    rng = np.random.default_rng(3)
    old, new = unit(rng, 2), unit(rng, 1)
    gallery.enroll("carol", old)
    result = gallery.enroll("carol", new, replace=True)
    assert (result.created, result.faces_removed) == (False, 2)
    assert gallery.search(old[:1], 1)[0][0].face_id == result.face_ids[0]  # old faces no longer in the index
    assert len(gallery.identity_embeddings("carol")) == 1


@pytest.mark.parametrize("graceful", [True, False])
def test_reopen_restores_exactly_what_was_stored(backend, graceful):
    rng = np.random.default_rng(4)
    g = backend()
    vectors = {f"p{i}": unit(rng, 2) for i in range(50)}
    for identity, v in vectors.items():
        g.enroll(identity, v)
    g.delete("p7")
    if graceful:
        g.close()  # embedded: snapshot written
    elif backend.name == "embedded":
        crash(g.gallery)  # as after a kill: no snapshot of this generation exists
    # (postgres keeps nothing in the replica: the second gallery reads what the database committed)
    g2 = backend()
    assert g2.stats().identities == 49 and g2.stats().index_live == 98
    assert g2.search(vectors["p3"][:1], 1)[0][0].identity_id == "p3"
    assert all(m.identity_id != "p7" for m in g2.search(vectors["p7"][:1], 10)[0])
    g2.enroll("late", unit(rng, 1))  # writes after a reload keep working


def test_stale_snapshot_is_not_used(tmp_path):
    rng = np.random.default_rng(5)
    g = Gallery(tmp_path, "m@1", DIM)
    g.open()
    g.enroll("a", unit(rng, 1))
    g.close()  # snapshot at generation 1
    g = Gallery(tmp_path, "m@1", DIM)
    g.open()
    late = unit(rng, 1)
    g.enroll("b", late)  # generation 2 committed ...
    crash(g)  # ... then a crash: the generation-1 snapshot must be replayed, not trusted as current
    g = Gallery(tmp_path, "m@1", DIM)
    g.open()
    assert g.search(late, 1)[0][0].identity_id == "b"
    g.close()


def test_refuses_other_model(backend):
    backend("m@1", DIM).close()
    with pytest.raises(GalleryModelMismatch, match="m@1"):
        backend("m@2", DIM)
    with pytest.raises(GalleryModelMismatch):
        backend("m@1", DIM * 2)
    assert backend("m@1", DIM).stats().identities == 0  # the refusals changed nothing


def test_concurrent_searches_and_writes(gallery):
    rng = np.random.default_rng(6)
    seeded = {f"s{i}": unit(rng, 1) for i in range(200)}
    for identity, v in seeded.items():
        gallery.enroll(identity, v)
    errors = []

    def reader():
        try:
            for i in range(300):
                identity = f"s{i % 200}"
                assert gallery.search(seeded[identity], 3)[0][0].identity_id == identity
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    def writer(w):
        try:
            local = np.random.default_rng(100 + w)
            for i in range(150):
                gallery.enroll(f"w{w}-{i}", unit(local, 1))
                if i % 3 == 0:
                    gallery.delete(f"w{w}-{i}")
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(4)] + [threading.Thread(target=writer, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    stats = gallery.stats()
    assert stats.identities == 200 + 3 * 100 == gallery.identity_count and stats.index_live == stats.faces


def test_bulk_import_is_all_or_nothing(gallery):
    rng = np.random.default_rng(7)
    items = [(f"bulk{i}", unit(rng, 2), {"i": i}) for i in range(100)]
    ids = gallery.import_identities(items)
    assert len(ids) == 100 and all(len(x) == 2 for x in ids)
    assert gallery.search(items[42][1][:1], 1)[0][0].identity_id == "bulk42"
    # the face ids returned are those stored for that identity, in order, with its embeddings
    assert gallery.search(items[42][1][1:], 1)[0][0].face_id == ids[42][1]
    assert [f.face_id for f in gallery.get_identity("bulk42").faces] == ids[42]
    assert np.allclose(gallery.identity_embeddings("bulk42"), items[42][1], atol=1e-6)
    assert gallery.get_identity("bulk42").record.metadata == {"i": 42}
    with pytest.raises(IdentityExists):
        gallery.import_identities([("fresh", unit(rng, 1), None), ("bulk3", unit(rng, 1), None)])
    assert gallery.get_identity("fresh") is None
    assert gallery.stats().index_live == gallery.stats().faces == 200


def test_backend_implements_the_interface(gallery):
    from service.gallery.api import GalleryBackend

    assert isinstance(gallery, GalleryBackend)
    rng = np.random.default_rng(8)
    result = gallery.enroll("dora", unit(rng, 2), {"team": "x"})
    found = gallery.get_identity("dora")
    assert (found.record.face_count, found.record.metadata) == (2, {"team": "x"})
    assert [f.face_id for f in found.faces] == result.face_ids
    assert gallery.enroll("dora", unit(rng, 1)).created is False
    assert gallery.get_identity("dora").record.metadata == {"team": "x"}  # no metadata given: kept
    assert [r.identity_id for r in gallery.list_identities(10, None)] == ["dora"]
    assert gallery.list_identities(10, "dora") == []


def test_settings_choose_the_backend(tmp_path, postgres):
    from service.config import Settings
    from service.gallery.open import open_gallery

    embedded = open_gallery(Settings(data_dir=tmp_path / "data"), "m@1", DIM)
    remote = open_gallery(Settings(data_dir=tmp_path / "unused", database_url=postgres.url,
                                   database_schema=postgres.fresh_schema()), "m@1", DIM)
    try:
        assert (embedded.backend, remote.backend) == ("embedded", "postgres")
        assert (tmp_path / "data" / "gallery.sqlite3").exists() and not (tmp_path / "unused").exists()
    finally:
        embedded.close()
        remote.close()


def test_index_caps_k_and_scans_exactly_when_the_graph_cannot_answer():
    """HnswIndex.search: k over the live count is capped; when hnswlib cannot return k faces (clustered
    faces: its walk misses some) the live faces are scanned instead. Both are counted by kind."""
    from service.gallery.embedded.index import HnswIndex

    rng, dim = np.random.default_rng(19), 128  # the model's dimension: a 32-d graph is walked whole

    def units(n: int) -> np.ndarray:
        v = rng.normal(size=(n, dim))
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)

    vectors = np.concatenate([c + rng.normal(0, 0.05, size=(500, dim)) for c in units(4)]).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    labels = np.arange(len(vectors), dtype=np.int64)
    index = HnswIndex(dim, 16, 200, 128)
    index.build_empty()
    for start in range(0, len(vectors), 8):  # 8 at a time: one thread, the same graph every run
        index.add(vectors[start:start + 8], labels[start:start + 8])
    probe = units(1)

    def live_faces():
        return [(labels[:500], vectors[:500]), (labels[500:], vectors[500:])]

    found, sims = index.search(probe, len(vectors) + 10, live_faces)
    assert index.fallbacks["capped"] == 1
    exact = np.argsort(-(vectors @ probe[0]), kind="stable")
    assert sorted(found[0].tolist()) == labels.tolist()  # every face, nearest first
    np.testing.assert_allclose(sims[0], (vectors @ probe[0])[exact], atol=1e-5)
    assert index.fallbacks["exact"] == 1
    found, sims = index.search(probe, 5)  # a small k: the graph answers
    assert found[0].tolist() == exact[:5].tolist() and index.fallbacks == {"capped": 1, "exact": 1}


def test_writers_take_turns_one_that_writes_in_a_loop_cannot_starve_another():
    """A thread that writes again the moment it is done (a retention sweep erasing face after face) and
    one that wants to write once (an enroll): the second is next in line, not let in only when the first
    happens to be slow. Counted in the first's turns, not timed."""
    lock = ReadWriteLock()
    turns = 0
    stop = threading.Event()

    def sweeper() -> None:  # a bounded loop: without turns the others would wait for all of it
        nonlocal turns
        while not stop.is_set() and turns < 3000:
            with lock.write():
                turns += 1
                time.sleep(0.0005)  # the erasure's own I/O: the GIL is free meanwhile

    worker = threading.Thread(target=sweeper)
    worker.start()
    try:
        waited = []
        for _ in range(20):
            time.sleep(0.002)
            asked = turns
            with lock.read():  # a reader (a search) is let in between the writer's turns too
                waited.append(turns - asked)
            asked = turns
            with lock.write():
                waited.append(turns - asked)
    finally:
        stop.set()
        worker.join()
    assert max(waited) <= 2, waited  # the turn in progress, and at most the one already queued
