"""The gallery reads the hygiene scans stand on, on both backends (the ``backend`` fixture of
test_collections.py): ``face_embeddings`` (by face id, this collection only) and ``iter_faces``
(every face, by identity then face id, in pages), and the scans' grouping of pages into whole
identities (service/gallery/hygiene/outliers.py)."""

from __future__ import annotations

import numpy as np
import pytest

from service.config import Settings
from service.gallery.api import DEFAULT_COLLECTION
from service.gallery.hygiene.duplicates import (
    comparisons_for,
    find_duplicates,
    hashed_bands,
    hashed_join,
    scan_ef,
)
from service.gallery.hygiene.outliers import identities_of
from tests.gallery.test_collections import backend, galleries  # noqa: F401 - the fixtures
from tests.gallery.test_gallery import DIM, unit


def _fill(galleries_):  # noqa: ANN001
    galleries_.create_collection("team-a")
    galleries_.create_collection("team-b")
    here, there = galleries_.collection("team-a"), galleries_.collection("team-b")
    rng = np.random.default_rng(7)
    stored: dict[int, tuple[str, np.ndarray]] = {}
    for name, n in (("zed", 2), ("amy", 3), ("mia", 1), ("bob", 4), ("amy", 2)):  # amy twice: appended later
        vectors = unit(rng, n)
        for face_id, v in zip(here.enroll(name, vectors).face_ids, vectors):
            stored[face_id] = (name, v)
    other = there.enroll("amy", unit(rng, 2)).face_ids
    return here, there, stored, other


def test_face_embeddings_answers_this_collections_faces_only(galleries):  # noqa: F811
    here, there, stored, other = _fill(galleries)
    asked = [*stored, *other, 10_000_000]
    got = here.face_embeddings(asked)
    assert set(got) == set(stored)
    for face_id, (name, vector) in stored.items():
        assert got[face_id][0] == name
        np.testing.assert_allclose(got[face_id][1], vector, atol=1e-6)
    assert set(there.face_embeddings(asked)) == set(other)
    assert here.face_embeddings([]) == {}


def test_iter_faces_pages_by_identity_then_face(galleries):  # noqa: F811
    here, _, stored, _ = _fill(galleries)
    pages = list(here.iter_faces(batch=3))
    assert all(0 < len(ids) <= 3 and len(ids) == len(names) == len(vectors) for ids, names, vectors in pages)
    ids = [f for page in pages for f in page[0]]
    names = [n for page in pages for n in page[1]]
    assert list(zip(names, ids)) == sorted((stored[f][0], f) for f in stored)
    flat = np.concatenate([page[2] for page in pages])
    assert flat.dtype == np.float32 and flat.shape == (len(stored), DIM)
    np.testing.assert_allclose(flat, np.stack([stored[f][1] for f in ids]), atol=1e-6)
    # the scans see whole identities, whatever the page size
    for batch in (1, 2, 3, 100):
        groups = [g for chunk in identities_of(here, batch) for g in chunk]
        assert [g.identity_id for g in groups] == ["amy", "bob", "mia", "zed"]
        assert [len(g.face_ids) for g in groups] == [5, 4, 1, 2]
        assert np.isneginf(groups[2].own[0]) and np.all(groups[0].own > -1)


def test_a_search_at_another_ef_searches_that_breadth_and_leaves_the_gallerys(backend):  # noqa: F811
    """``search(..., ef=)``: the scan's own breadth (embedded: hnswlib's ef for that search only;
    postgres: hnsw.ef_search for that transaction). Random vectors are the hardest case of an HNSW
    walk: a breadth of 4 misses nearest neighbours that a breadth of 400 finds; afterwards a plain
    search searches at the gallery's breadth again. (PostgreSQL's planner answered this 3,000-face
    table exactly, by a sequential scan, at every ef: there the answers are checked, not the misses.)"""
    gallery = backend().collection(DEFAULT_COLLECTION)
    rng = np.random.default_rng(11)
    faces = unit(rng, 3000)
    ids = [f for ids in gallery.import_identities([(f"p{i:04d}", faces[i:i + 1], None) for i in range(3000)])
           for f in ids]
    probes = unit(rng, 300)
    exact = [f"p{i:04d}" for i in (probes @ faces.T).argmax(axis=1)]

    def recall(ef: int | None) -> float:
        return float(np.mean([ms[0].identity_id == want for ms, want in zip(gallery.search(probes, 1, ef), exact)]))

    narrow, wide, plain = recall(4), recall(400), recall(None)
    assert len(ids) == 3000
    assert wide >= 0.98 and plain >= 0.95, (wide, plain)
    if backend.name == "embedded":
        assert narrow < wide - 0.05, (narrow, wide)
    assert recall(None) == plain  # the gallery's breadth, untouched by the narrow and wide searches


def test_the_duplicates_scan_at_the_scan_ef_finds_the_planted_pair(galleries):  # noqa: F811
    gallery = galleries.collection(DEFAULT_COLLECTION)
    rng = np.random.default_rng(12)
    faces = unit(rng, 4000).reshape(2000, 2, DIM)
    gallery.import_identities([(f"p{i:04d}", faces[i], None) for i in range(2000)])
    # one person enrolled again under another id: a face at cosine 0.95 to one of p0123's (random
    # 32-d faces: two score 0.9 with a chance of ~1e-11 a pair)
    base = faces[123, 1]
    noise = rng.normal(size=DIM)
    noise -= (noise @ base) * base
    copy = 0.95 * base + np.sqrt(1 - 0.95 ** 2) * noise / np.linalg.norm(noise)
    gallery.enroll("again", copy[None, :].astype(np.float32))
    ef = scan_ef(Settings().duplicates_scan_ef, gallery.face_count)
    assert ef == 48  # narrower than the gallery's own (auto: 128 up to 100k faces)
    assert scan_ef("auto", 1_000_000) is None and scan_ef(64, 1_000_000) == 64  # the gallery's own above 100k
    found = find_duplicates(gallery, None, 0.9, -1.0, comparisons_for(gallery), ef=ef)
    assert [(p.identity_a, p.identity_b) for p in found.pairs] == [("again", "p0123")]
    assert found.pairs[0].score == pytest.approx(0.95, abs=1e-3) and found.faces_scanned == 4001


def _planted(rng: np.random.Generator, people: int, copies: int) -> tuple[np.ndarray, np.ndarray]:
    """``people`` random people of 2 faces (at cosine ~0.8 to each other) and ``copies`` single-face
    people, each a copy at cosine 0.6-0.97 of a face of a random one of them: (faces [2 people +
    copies, DIM], their owners)."""
    faces = np.repeat(unit(rng, people), 2, axis=0) + 0.5 * unit(rng, 2 * people)
    faces /= np.linalg.norm(faces, axis=1, keepdims=True)
    base = faces[rng.choice(2 * people, copies, replace=False)]
    cosine = rng.uniform(0.6, 0.97, copies)[:, None]
    noise = rng.normal(size=base.shape)
    noise -= (noise * base).sum(axis=1, keepdims=True) * base
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    copy = (cosine * base + np.sqrt(1 - cosine ** 2) * noise).astype(np.float32)
    owners = np.r_[np.repeat(np.arange(people), 2), people + np.arange(copies)].astype(np.int32)
    return np.concatenate([faces, copy]), owners


def test_the_hashed_join_finds_what_brute_force_finds():
    """Each face's 3 best other identities at or above the score, by their best face: the join in
    hash buckets (forced at a small size: 80 bands of 8 bits) answers exactly what comparing every
    pair answers, and what numpy's all-pairs matrix says; the bands are sized for the score."""
    faces, owners = _planted(np.random.default_rng(21), 1500, 300)
    exact = hashed_join(owners, faces, 0.8, bands=(0, 1))
    cut = hashed_join(owners, faces, 0.8, bands=(8, 80))
    assert hashed_join(owners, faces, 0.8) is not None and hashed_bands(len(faces), 0.8) == (0, 1)
    assert hashed_bands(1_000_000, 0.925) == (23, 194) and hashed_bands(1_000_000, 0.85) == (23, 804)
    assert hashed_bands(1_000_000, 0.6) is None  # too low a score to hash: the kNN join
    assert sorted(zip(*map(np.ndarray.tolist, cut))) == sorted(zip(*map(np.ndarray.tolist, exact)))
    gram = faces @ faces.T
    gram[owners[:, None] == owners[None, :]] = -1  # own identity (and self)
    best: dict[tuple[int, int], int] = {}  # (face, other identity) -> that identity's best face
    for i, j in zip(*np.nonzero(gram >= 0.8)):  # random 32-d people score < 0.8: fewer than 3 per face
        key = (int(i), int(owners[j]))
        if key not in best or gram[i, j] > gram[i, best[key]]:
            best[key] = int(j)
    assert {(i, j) for i, j in zip(exact[0].tolist(), exact[1].tolist())} == {(i, j) for (i, _), j in best.items()}
    assert len(best) > 200
    np.testing.assert_allclose(exact[2], gram[exact[0], exact[1]], atol=1e-6)


def test_the_hashed_scan_lists_what_the_knn_scan_lists(galleries):  # noqa: F811
    """Over the gallery (both backends): the hashed duplicates scan, its bands forced, lists the
    same pairs with the same evidence as the brute force and as the kNN join at the gallery's ef;
    an outlier face (mislabelled: no match to its own identity's other face) gives no evidence."""
    gallery = galleries.collection(DEFAULT_COLLECTION)
    faces, owners = _planted(np.random.default_rng(22), 1500, 150)
    names = [f"p{o:04d}" for o in owners]
    gallery.import_identities([(names[i], faces[i:i + 2], None) for i in range(0, 3000, 2)]
                              + [(names[i], faces[i:i + 1], None) for i in range(3000, len(faces))])
    gallery.enroll("p0000", faces[3000:3001])  # p1500's face filed under p0000 too: an outlier of p0000
    comparisons = comparisons_for(gallery)

    def listed(**how: object) -> list[tuple[str, str, float, list[tuple[int, int, float]]]]:
        scan = find_duplicates(gallery, None, 0.8, 0.5, comparisons, limit=1000, **how)  # type: ignore[arg-type]
        assert scan.faces_scanned == len(faces) + 1
        return [(p.identity_a, p.identity_b, p.score, [(e.face_a, e.face_b, e.score) for e in p.evidence])
                for p in scan.pairs]

    exact = listed(method="hashed", bands=(0, 1))
    assert listed(method="hashed", bands=(8, 80)) == exact
    assert listed(method="hashed") == exact  # 3,151 faces: every pair
    knn = listed(method="knn", ef=400)
    assert [p[:2] for p in knn] == [p[:2] for p in exact] and len(exact) > 50
    assert [p[2] for p in knn] == pytest.approx([p[2] for p in exact], abs=1e-5)
    assert not any("p0000" in p[:2] and "p1500" in p[:2] for p in exact)  # the outlier's match: no evidence
