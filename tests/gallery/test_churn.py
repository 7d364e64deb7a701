"""Every live face stays findable by its own vector through enroll/delete churn, on both backends.

The trace (tests/fixtures/index/soak_churn_trace.npz) is the soak of 2026-12-05: 240 enrollments and
deletions of 80 LFW people in commit order, with the vectors they were enrolled with. On the embedded
backend, reusing deleted slots (hnswlib's ``replace_deleted``: ``updatePoint`` rewires a slot's
outgoing links only) left face 134 with no incoming link, and /identify with its own photo answered
another identity. Each live face must be its own nearest identity after the churn and after a restart.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.gallery.open import make_gallery

TRACE = Path(__file__).parents[1] / "fixtures" / "index" / "soak_churn_trace.npz"
MODEL = "sface@2021dec-int8bq"


def test_every_face_stays_reachable_through_enroll_delete_churn(gallery_settings):
    settings = gallery_settings
    trace = np.load(TRACE)
    vectors, ops = trace["vectors"], trace["ops"].tolist()
    galleries = make_gallery(settings, MODEL, vectors.shape[1])
    galleries.open()
    g = galleries.collection("default")
    created: list[str] = []
    live: dict[str, np.ndarray] = {}
    for op in ops:
        if op > 0:
            identity = f"p{op - 1}~{len(created) + 1}"
            created.append(identity)
            g.enroll(identity, vectors[op - 1][None])
            live[identity] = vectors[op - 1]
        else:
            identity = created[-op - 1]
            assert g.delete(identity) == 1
            del live[identity]
    assert len(live) == 80

    def lost(gallery) -> list[str]:
        return [i for i, v in live.items() if gallery.search(v[None], 1)[0][0].identity_id != i]

    assert lost(g) == []
    galleries.close()
    galleries = make_gallery(settings, MODEL, vectors.shape[1])
    galleries.open()
    try:
        assert lost(galleries.collection("default")) == []
    finally:
        galleries.close()
