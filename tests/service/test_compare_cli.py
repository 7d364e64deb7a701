"""``python -m service gallery compare --collection A --with B``: the migration's comparison report
(service/jobs/compare.py) as JSON, from a real subprocess on both backends."""

from __future__ import annotations

import json

import numpy as np

from service.jobs.compare import compare_collections


def test_compare_prints_the_report_of_the_two_collections(operator_backend):
    b = operator_backend
    rng = np.random.default_rng(0)
    galleries = b.open()
    try:
        dim = galleries.dim
        for name in ("people-v1", "people-v2"):
            galleries.create_collection(name)
        v1, v2 = galleries.collection("people-v1"), galleries.collection("people-v2")
        centres = rng.normal(size=(8, dim))
        for i in range(8):
            faces = centres[i] + 0.2 * rng.normal(size=(3, dim))
            v1.enroll(f"p{i}", (faces / np.linalg.norm(faces, axis=1, keepdims=True)).astype(np.float32))
            if i == 0:  # in v2, p0's three faces look like p1, p2 and p3: its probes find them
                faces = centres[1:4] + 0.5 * rng.normal(size=(3, dim))  # nearer them than each other
            v2.enroll(f"p{i}", (faces / np.linalg.norm(faces, axis=1, keepdims=True)).astype(np.float32))
        expected = compare_collections(v1, v2, max_probes=100, seed=3).as_dict()
    finally:
        galleries.close()

    done = b.run("gallery", "compare", "--collection", "people-v1", "--with", "people-v2", "--max-probes", "100",
                 "--seed", "3")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report.pop("command") == "compare" and report.pop("backend") == b.kind
    assert report.pop("seconds") >= 0
    expected.pop("seconds")
    assert report == expected
    assert not report["sampled"] and report["source"]["probes"] == report["target"]["probes"] == 24
    assert report["source"]["rank1"] == 1.0 and report["target"]["rank1"] == 21 / 24
    assert (report["changed_count"], report["identities_changed"]) == (3, 1)
    assert [(c["identity_id"], c["source_top1"], c["target_top1"]) for c in report["changed"]] == [
        ("p0", "p0", "p1"), ("p0", "p0", "p2"), ("p0", "p0", "p3")]

    missing = b.run("gallery", "compare", "--collection", "people-v1", "--with", "nope")
    assert missing.returncode == 2 and "nope" in missing.stderr
    bad = b.run("gallery", "compare", "--collection", "people-v1", "--with", "people-v2", "--max-probes", "0")
    assert bad.returncode == 2 and "--max-probes" in bad.stderr
