"""The gallery reads the hygiene scans stand on, on both backends (the ``backend`` fixture of
test_collections.py): ``face_embeddings`` (by face id, this collection only) and ``iter_faces``
(every face, by identity then face id, in pages), and the scans' grouping of pages into whole
identities (service/gallery/hygiene/outliers.py)."""

from __future__ import annotations

import numpy as np
import pytest

from service.config import Settings
from service.gallery.api import DEFAULT_COLLECTION
from service.gallery.hygiene.duplicates import comparisons_for, find_duplicates, scan_ef
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
