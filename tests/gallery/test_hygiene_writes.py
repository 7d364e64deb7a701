"""Merge two identities, move a face, delete a face (GalleryBackend, service/gallery/api.py) on both
backends: one transaction each, audited in it, counts right afterwards, a deleted face erased as a
deleted identity is (embedded: in no file of the data dir; postgres: no row), and concurrent enrolls
into a merge's target neither lose a face nor overshoot ``max_faces``."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from service.gallery.api import (
    AuditQuery,
    FaceNotFound,
    IdentityChanged,
    IdentityExists,
    IdentityNotFound,
    IdentityUpdate,
    TooManyFacesForIdentity,
)
from service.gallery.results import FaceDeletion, FacesDeleted
from service.model.calibration import counted_faces
from tests.gallery import test_collections as shared
from tests.gallery.test_collections import ALICE, BOB
from tests.gallery.test_gallery import unit
from tests.gallery.traces import find_vector

backend, galleries = shared.backend, shared.galleries  # the fixtures: both backends, as test_collections.py


def audit_of(g, action: str) -> list:
    return [e for e in g.audit(AuditQuery(limit=1000)) if e.action == action]


def check_counts(g, col, expected: dict[str, int]) -> None:
    """The collection's cheap counts, its CollectionInfo and its stats all say ``expected`` (id -> faces)."""
    counted = sum(counted_faces(n) for n in expected.values())
    assert (col.identity_count, col.face_count, col.counted_faces) == (len(expected), sum(expected.values()), counted)
    info = g.collection_info(col.name)
    assert (info.identities, info.faces, info.counted_faces) == (len(expected), sum(expected.values()), counted)
    stats = col.stats()
    assert (stats.identities, stats.faces, stats.index_live) == (len(expected), sum(expected.values()),
                                                                 sum(expected.values()))
    listed = {r.identity_id: r.face_count for r in col.list_identities(1000, None)}
    assert listed == expected


def test_merge_moves_every_face_to_the_target_and_deletes_the_source(backend):
    rng = np.random.default_rng(1)
    g = backend()
    g.create_collection("m")
    col = g.collection("m")
    a, b, c = unit(rng, 2), unit(rng, 3), unit(rng, 1)
    a_ids = col.enroll("a", a, metadata={"who": "a"}).face_ids
    b_ids = col.enroll("b", b, metadata={"who": "b"}).face_ids
    col.enroll("c", c)
    merged = col.merge_identities("a", "b", actor=ALICE)
    assert (merged.target_id, merged.faces_moved, merged.face_count) == ("b", 2, 5)
    assert col.get_identity("a") is None
    target = col.get_identity("b")
    assert target is not None and target.record.metadata == {"who": "b"}  # the target's metadata is kept
    assert [f.face_id for f in target.faces] == sorted(a_ids + b_ids)  # face ids kept
    for vector in a:  # the source's faces are found, as the target's
        assert col.search(vector[None], 1)[0][0].identity_id == "b"
    check_counts(g, col, {"b": 5, "c": 1})
    [entry] = audit_of(g, "identity.merged")
    assert (entry.collection, entry.identity_id, entry.key_id, entry.request_id) == ("m", "b", "key-alice", "req-1")
    assert entry.details == {"merged_from": "a", "faces_moved": 2, "face_count": 5}
    # refused merges write nothing
    with pytest.raises(IdentityNotFound):
        col.merge_identities("a", "b", actor=ALICE)
    with pytest.raises(IdentityNotFound):
        col.merge_identities("c", "nobody", actor=ALICE)
    with pytest.raises(ValueError):
        col.merge_identities("b", "b", actor=ALICE)
    with pytest.raises(TooManyFacesForIdentity):
        col.merge_identities("b", "c", max_faces=5, actor=ALICE)
    check_counts(g, col, {"b": 5, "c": 1})
    assert len(audit_of(g, "identity.merged")) == 1
    # after a restart (embedded: the label -> identity map is rebuilt from the store, whatever snapshot)
    g.close()
    g = backend()
    col = g.collection("m")
    for vector in a:
        assert col.search(vector[None], 1)[0][0].identity_id == "b"
    check_counts(g, col, {"b": 5, "c": 1})


def test_move_face_creates_the_target_and_deletes_an_emptied_source(backend):
    rng = np.random.default_rng(2)
    g = backend()
    col = g.collection("default")
    a, b = unit(rng, 2), unit(rng, 1)
    a_ids = col.enroll("a", a).face_ids
    [b_id] = col.enroll("b", b).face_ids
    moved = col.move_face(a_ids[0], "new", actor=BOB)
    assert (moved.face_id, moved.from_identity, moved.to_identity, moved.target_created, moved.source_deleted) == (
        a_ids[0], "a", "new", True, False)
    assert col.get_identity("new").record.metadata == {}
    assert [f.face_id for f in col.get_identity("new").faces] == [a_ids[0]]
    assert col.search(a[0][None], 1)[0][0].identity_id == "new"
    assert col.search(a[1][None], 1)[0][0].identity_id == "a"
    check_counts(g, col, {"a": 1, "b": 1, "new": 1})
    moved = col.move_face(b_id, "a", actor=BOB)  # b's last face: b is deleted
    assert (moved.target_created, moved.source_deleted) == (False, True)
    assert col.get_identity("b") is None
    assert col.search(b, 1)[0][0].identity_id == "a"
    check_counts(g, col, {"a": 2, "new": 1})
    entries = audit_of(g, "face.moved")
    assert [(e.identity_id, e.request_id, e.details["face_id"], e.details["from"], e.details["to"]) for e in entries] == [
        ("a", "req-2", b_id, "b", "a"), ("new", "req-2", a_ids[0], "a", "new")]
    assert entries[0].details["source_deleted"] is True and entries[1].details["target_created"] is True
    with pytest.raises(FaceNotFound):
        col.move_face(10**9, "a", actor=BOB)
    with pytest.raises(ValueError):
        col.move_face(b_id, "a", actor=BOB)  # already a's
    with pytest.raises(TooManyFacesForIdentity):
        col.move_face(a_ids[0], "a", max_faces=2, actor=BOB)
    g.create_collection("other")
    with pytest.raises(FaceNotFound):  # a face of another collection is not this one's
        g.collection("other").move_face(b_id, "x", actor=BOB)
    check_counts(g, col, {"a": 2, "new": 1})
    assert len(audit_of(g, "face.moved")) == 2
    g.close()
    g = backend()
    col = g.collection("default")
    assert col.search(b, 1)[0][0].identity_id == "a"
    check_counts(g, col, {"a": 2, "new": 1})


def test_delete_face_erases_it_as_deleting_an_identity_does(backend):
    rng = np.random.default_rng(3)
    g = backend()
    col = g.collection("default")
    for i in range(20):
        col.enroll(f"k{i}", unit(rng, 1))
    secret = unit(rng, 2)
    ids = col.enroll("secret", secret).face_ids
    if backend.name == "embedded":
        col._run(lambda e: e.gallery.snapshot())  # noqa: SLF001 - the snapshot on disk holds the vectors ...
        assert find_vector(backend.settings.data_dir, secret[0])
    assert col.delete_faces([ids[0]], actor=ALICE) == FacesDeleted([FaceDeletion(ids[0], "secret", False)], [])
    assert all(m.identity_id != "secret" or m.score < 0.99 for m in col.search(secret[:1], 5)[0])
    assert [f.face_id for f in col.get_identity("secret").faces] == [ids[1]]
    check_counts(g, col, {**{f"k{i}": 1 for i in range(20)}, "secret": 1})
    # its last face: the identity goes too
    assert col.delete_faces([ids[1]], actor=ALICE).deleted == [FaceDeletion(ids[1], "secret", True)]
    assert col.get_identity("secret") is None
    check_counts(g, col, {f"k{i}": 1 for i in range(20)})
    assert col.delete_faces([ids[1]], actor=ALICE) == FacesDeleted([], [ids[1]])  # gone: nothing written
    with pytest.raises(FaceNotFound):
        col.delete_faces([ids[1]], actor=ALICE).raise_if_missing()
    entries = audit_of(g, "face.deleted")
    assert [(e.identity_id, e.request_id, e.details) for e in entries] == [
        ("secret", "req-1", {"face_id": ids[1], "face_count": 0, "identity_deleted": True}),
        ("secret", "req-1", {"face_id": ids[0], "face_count": 1, "identity_deleted": False})]
    if backend.name == "embedded":  # ... until it is erased: from the database, the WAL and the snapshot
        for v in secret:
            assert not find_vector(backend.settings.data_dir, v), find_vector(backend.settings.data_dir, v)
    else:
        with g._read_connection() as conn:  # noqa: SLF001
            assert conn.execute("SELECT count(*) FROM faces WHERE face_id = ANY(%s)", (ids,)).fetchone()[0] == 0
    g.close()
    if backend.name == "embedded":
        for v in secret:
            assert not find_vector(backend.settings.data_dir, v)


def test_delete_faces_erases_many_in_one_write_and_names_the_missing(backend):
    """Faces of three identities at once: one keeps a face, two are deleted with their last; an unknown
    id and a repeated one are reported, not refused; each face has its audit record and its vector is
    gone from the search, the database and (embedded) the snapshot files."""
    rng = np.random.default_rng(5)
    g = backend()
    col = g.collection("default")
    for i in range(20):
        col.enroll(f"k{i}", unit(rng, 1))
    a, b, c = unit(rng, 3), unit(rng, 2), unit(rng, 1)
    fa, fb, fc = (col.enroll(name, v).face_ids for name, v in (("a", a), ("b", b), ("c", c)))
    if backend.name == "embedded":
        col._run(lambda e: e.gallery.snapshot())  # noqa: SLF001
        assert find_vector(backend.settings.data_dir, b[0])
    gone = [fc[0], fb[1], fa[0], fb[0], fa[1]]
    result = col.delete_faces([*gone, 10**9, fa[0]], actor=ALICE)
    assert result == FacesDeleted([FaceDeletion(fa[0], "a", False), FaceDeletion(fa[1], "a", False),
                                   FaceDeletion(fb[0], "b", True), FaceDeletion(fb[1], "b", True),
                                   FaceDeletion(fc[0], "c", True)], [10**9])
    assert [f.face_id for f in col.get_identity("a").faces] == [fa[2]]
    assert col.get_identity("b") is None and col.get_identity("c") is None
    check_counts(g, col, {**{f"k{i}": 1 for i in range(20)}, "a": 1})
    for probe in (a[0], a[1], b[0], b[1], c[0]):
        assert all(m.score < 0.99 for m in col.search(probe[None], 5)[0])
    details = {e.details["face_id"]: (e.identity_id, e.details) for e in audit_of(g, "face.deleted")}
    assert details == {fa[0]: ("a", {"face_id": fa[0], "face_count": 2, "identity_deleted": False}),
                       fa[1]: ("a", {"face_id": fa[1], "face_count": 1, "identity_deleted": False}),
                       fb[0]: ("b", {"face_id": fb[0], "face_count": 1, "identity_deleted": False}),
                       fb[1]: ("b", {"face_id": fb[1], "face_count": 0, "identity_deleted": True}),
                       fc[0]: ("c", {"face_id": fc[0], "face_count": 0, "identity_deleted": True})}
    assert col.delete_faces(gone, actor=ALICE) == FacesDeleted([], sorted(gone))  # again: nothing, no record
    assert len(audit_of(g, "face.deleted")) == 5
    if backend.name == "embedded":
        for v in (*a[:2], *b, *c):
            assert not find_vector(backend.settings.data_dir, v)
    g.close()


def test_overlapping_bulk_deletes_and_moves_erase_each_face_once(galleries):
    """Four writers delete overlapping random sets of faces (two replicas sweeping one backlog, a client
    cleaning up) while another moves faces between identities: every face is erased exactly once, and
    the counts match what is left."""
    rng = np.random.default_rng(6)
    col = galleries.collection("default")
    faces = [f for i in range(40) for f in col.enroll(f"p{i}", unit(rng, 3)).face_ids]
    erased: list[int] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def delete(seed: int) -> None:
        r = np.random.default_rng(seed)
        for _ in range(12):
            got = col.delete_faces([int(f) for f in r.choice(faces, 16, replace=False)], actor=ALICE)
            with lock:
                erased.extend(d.face_id for d in got.deleted)

    def move() -> None:
        for f in faces[::7]:
            try:
                col.move_face(f, f"moved{f % 3}", actor=ALICE)
            except FaceNotFound:
                continue

    def run(body, *args) -> None:
        try:
            body(*args)
        except BaseException as exc:  # noqa: BLE001 - a deadlock or any error fails the test below
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(delete, s)) for s in range(4)] + [
        threading.Thread(target=run, args=(move,))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    assert len(erased) == len(set(erased))
    left = {r.identity_id: r.face_count for r in col.list_identities(1000, None)}
    assert sum(left.values()) == len(faces) - len(erased) == col.face_count
    assert col.identity_count == len(left)
    assert col.delete_faces(faces, actor=ALICE).not_found == sorted(erased)


def test_enrolls_into_the_target_while_merging_never_lose_a_face_or_overshoot(galleries):
    """Writers append one face at a time to the target (max_faces 40) while sources are merged into
    it: every acknowledged face ends in the target, a merge that would overshoot is refused whole
    (its source keeps its faces), and the target never holds more than 40."""
    rng = np.random.default_rng(4)
    col = galleries.collection("default")
    limit = 40
    col.enroll("target", unit(rng, 2))
    sources = {f"s{i}": col.enroll(f"s{i}", unit(rng, 3)).face_ids for i in range(8)}
    acknowledged: list[int] = []
    merged: list[str] = []
    lock = threading.Lock()

    def append(seed: int) -> None:
        r = np.random.default_rng(seed)
        for _ in range(15):
            try:
                ids = col.enroll("target", unit(r, 1), max_faces=limit).face_ids
            except TooManyFacesForIdentity:
                continue
            with lock:
                acknowledged.extend(ids)

    def merge() -> None:
        for source in sources:
            try:
                col.merge_identities(source, "target", max_faces=limit, actor=ALICE)
            except TooManyFacesForIdentity:
                continue
            with lock:
                merged.append(source)

    threads = [threading.Thread(target=append, args=(s,)) for s in range(3)] + [threading.Thread(target=merge)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    target = {f.face_id for f in col.get_identity("target").faces}
    assert len(target) <= limit
    assert set(acknowledged) <= target
    for source, ids in sources.items():
        if source in merged:
            assert col.get_identity(source) is None and set(ids) <= target
        else:
            assert [f.face_id for f in col.get_identity(source).faces] == ids
    assert len(target) == 2 + len(acknowledged) + 3 * len(merged)
    remaining = {s: 3 for s in sources if s not in merged}
    check_counts(galleries, col, {"target": len(target), **remaining})
    assert len(audit_of(galleries, "identity.merged")) == len(merged)


def test_update_identity_renames_and_sets_metadata_in_one_audited_write(backend):
    rng = np.random.default_rng(7)
    g = backend()
    g.create_collection("u")
    col = g.collection("u")
    a, other = unit(rng, 3), unit(rng, 1)
    enrolled = col.enroll("a", a, metadata={"desk": 1, "team": "x"})
    col.enroll("other", other)
    before = col.get_identity("a")
    assert before is not None

    def edit(stored: dict) -> dict:
        return {**stored, "desk": 2}

    result = col.update_identity("a", IdentityUpdate(new_id="a2", metadata=edit), actor=ALICE)
    assert result.changed and result.renamed_from == "a" and result.metadata_keys == ["desk"]
    after = col.get_identity("a2")
    assert after is not None and after == result.details and col.get_identity("a") is None
    assert after.record.metadata == {"desk": 2, "team": "x"} and after.faces == before.faces  # ids, enrollment times
    assert after.record.created_at == before.record.created_at and after.record.updated_at > before.record.updated_at
    assert [f.face_id for f in after.faces] == enrolled.face_ids
    for vector in a:  # the index answers with the new id
        assert col.search(vector[None], 1)[0][0].identity_id == "a2"
    check_counts(g, col, {"a2": 3, "other": 1})
    [entry] = audit_of(g, "identity.updated")
    assert (entry.collection, entry.identity_id, entry.key_id) == ("u", "a2", "key-alice")
    assert entry.details == {"renamed_from": "a", "metadata_keys": ["desk"], "face_count": 3}
    # refused: nothing written, no record
    with pytest.raises(IdentityExists):
        col.update_identity("a2", IdentityUpdate(new_id="other", metadata=lambda m: {"changed": True}), actor=ALICE)
    with pytest.raises(IdentityNotFound):
        col.update_identity("a", IdentityUpdate(new_id="a3"), actor=ALICE)

    def refuse(stored: dict) -> dict:
        raise ValueError("too large")

    with pytest.raises(ValueError):
        col.update_identity("a2", IdentityUpdate(new_id="a4", metadata=refuse), actor=ALICE)
    assert col.get_identity("a2") == after and col.get_identity("a4") is None
    # an edit from a stale read: IdentityChanged, nothing written
    with pytest.raises(IdentityChanged) as stale:
        col.update_identity("a2", IdentityUpdate(new_id="a5", expected_updated_at=before.record.updated_at))
    assert stale.value.updated_at == after.record.updated_at and col.get_identity("a5") is None
    # nothing to change: nothing written
    same = col.update_identity("a2", IdentityUpdate(new_id="a2", metadata=lambda m: dict(m)), actor=ALICE)
    assert not same.changed and same.details == after
    assert len(audit_of(g, "identity.updated")) == 1
    # a rename survives a reopen (embedded: the label map is built from the store)
    g.close()
    g = backend()
    col = g.collection("u")
    assert col.search(a[0][None], 1)[0][0].identity_id == "a2"
    check_counts(g, col, {"a2": 3, "other": 1})
