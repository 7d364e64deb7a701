"""The gallery reads the hygiene scans stand on, on both backends (the ``backend`` fixture of
test_collections.py): ``face_embeddings`` (by face id, this collection only) and ``iter_faces``
(every face, by identity then face id, in pages), and the scans' grouping of pages into whole
identities (service/gallery/hygiene/outliers.py)."""

from __future__ import annotations

import numpy as np

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
