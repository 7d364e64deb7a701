"""The migration's comparison report (service/jobs/compare.py) on both backends, with vectors whose
leave-one-face-out answers are known: each test also computes them by brute force here."""

from __future__ import annotations

import numpy as np
import pytest

from service.gallery.api import Galleries, GalleryBackend
from service.gallery.open import make_gallery
from service.jobs.compare import compare_collections

MODEL, DIM = "old@1", 32
NEW_MODEL, NEW_DIM = "new@1", 16


@pytest.fixture
def galleries(gallery_settings):
    g = make_gallery(gallery_settings, MODEL, DIM, served={MODEL: DIM, NEW_MODEL: NEW_DIM})
    g.open()
    yield g
    g.close()


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def people(dim: int, seed: int, identities: int = 12, faces: int = 3, spread: float = 0.15,
           loners: int = 4) -> dict[str, np.ndarray]:
    """Identity -> its faces: tight clusters around random centres, plus single-face distractors."""
    rng = np.random.default_rng(seed)
    out = {f"p{i:02d}": unit(rng.normal(size=dim) + spread * rng.normal(size=(faces, dim)))
           for i in range(identities)}
    out |= {f"z{i:02d}": unit(rng.normal(size=(1, dim))) for i in range(loners)}
    return out


def fill(galleries: Galleries, name: str, faces: dict[str, np.ndarray], model_id: str = MODEL,
         dim: int = DIM) -> GalleryBackend:
    galleries.create_collection(name, model_id=model_id, dim=dim)
    gallery = galleries.collection(name)
    for identity_id, vectors in faces.items():
        for vector in vectors:  # one face per write: face ids follow the order given
            gallery.enroll(identity_id, vector[None, :])
    return gallery


def brute_top1(faces: dict[str, np.ndarray]) -> dict[tuple[str, int], str]:
    """(identity, k) -> the identity of the best other face, by a plain loop over every pair."""
    flat = [(i, k, v) for i, vs in faces.items() for k, v in enumerate(vs)]
    out = {}
    for i, k, v in flat:
        if len(faces[i]) < 2:
            continue
        others = [(float(v @ w), j) for j, m, w in flat if (j, m) != (i, k)]
        out[(i, k)] = max(others)[1]
    return out


def rank1(top1: dict[tuple[str, int], str]) -> float:
    return sum(best == key[0] for key, best in top1.items()) / len(top1)


def confuse(faces: dict[str, np.ndarray], identity_id: str, like: list[str], seed: int) -> dict[str, np.ndarray]:
    """A copy where ``identity_id``'s faces are replaced, one each, by look-alikes of ``like``'s people
    (nearer to them than to each other): exactly that identity's probes change their answer."""
    rng = np.random.default_rng(seed)
    out = dict(faces)
    dim = faces[identity_id].shape[1]
    out[identity_id] = unit(np.stack([faces[other].mean(axis=0) + 0.3 * rng.normal(size=dim) / np.sqrt(dim)
                                      for other in like]))
    return out


def test_identical_collections_agree_fully_with_the_exact_rank1(galleries):
    faces = people(DIM, seed=1)
    # one identity whose second face looks like another's: its probes miss on both sides
    faces["p03"] = np.concatenate([faces["p03"][:1], unit(faces["p07"].mean(axis=0, keepdims=True))])
    expected = brute_top1(faces)
    a, b = fill(galleries, "a", faces), fill(galleries, "b", faces)

    report = compare_collections(a, b)

    assert rank1(expected) < 1.0  # the look-alike misses: rank-1 is not trivially 1
    for side, gallery in ((report.source, a), (report.target, b)):
        assert (side.collection, side.model_id, side.identities, side.faces) == (gallery.name, MODEL, 16, 39)
        assert side.probes == len(expected) == 12 * 3 - 1
        assert side.rank1 == pytest.approx(rank1(expected))
    assert report.top1_agreement == 1.0
    assert (report.paired_probes, report.unpaired_identities, report.changed_count, report.changed) == (35, 0, 0, ())
    assert report.sampled is False
    out = report.as_dict()
    assert out["source"]["rank1"] == report.source.rank1 and out["changed"] == []


def test_an_identity_given_look_alike_faces_in_the_target_is_exactly_the_one_changed(galleries):
    old = people(DIM, seed=2)
    new = confuse(people(NEW_DIM, seed=3), "p05", ["p01", "p09", "p11"], seed=4)
    expected_old, expected_new = brute_top1(old), brute_top1(new)
    assert {k for k in expected_old if expected_old[k] != expected_new[k]} == {("p05", 0), ("p05", 1), ("p05", 2)}
    a = fill(galleries, "a", old)
    b = fill(galleries, "b", new, model_id=NEW_MODEL, dim=NEW_DIM)

    report = compare_collections(a, b)

    assert (report.source.model_id, report.target.model_id) == (MODEL, NEW_MODEL)
    assert report.source.rank1 == 1.0
    assert report.target.rank1 == pytest.approx(rank1(expected_new)) == pytest.approx(33 / 36)
    assert (report.changed_count, report.identities_changed) == (3, 1)
    assert report.top1_agreement == pytest.approx(33 / 36)
    a_faces = {f for ids, who, _ in a.iter_faces() for f, i in zip(ids, who) if i == "p05"}
    b_faces = {f for ids, who, _ in b.iter_faces() for f, i in zip(ids, who) if i == "p05"}
    assert [(c.identity_id, c.source_top1, c.target_top1) for c in report.changed] == [
        ("p05", "p05", "p01"), ("p05", "p05", "p09"), ("p05", "p05", "p11")]
    assert {c.source_face_id for c in report.changed} == a_faces and {c.target_face_id for c in report.changed} == b_faces
    for c in report.changed:
        assert c.source_score is not None and c.target_score is not None and -1 <= c.target_score <= 1
    assert len(compare_collections(a, b, changed_limit=1).changed) == 1


def test_identities_whose_face_counts_differ_are_left_out_and_counted(galleries):
    faces = people(DIM, seed=5)
    other = dict(faces)
    other["p02"] = faces["p02"][:2]  # one face fewer
    del other["p04"]  # only in the source
    other["new"] = people(DIM, seed=50, identities=1, loners=0)["p00"]  # only in the target
    report = compare_collections(fill(galleries, "a", faces), fill(galleries, "b", other))
    assert report.unpaired_identities == 3
    assert report.paired_probes == (12 - 2) * 3  # p02 and p04 are not paired; "new" has no partner
    assert (report.source.probes, report.target.probes) == (36, 3 * 11 + 2)
    assert report.top1_agreement == 1.0


def test_sampling_is_seeded_deterministic_and_the_same_on_both_sides(galleries):
    faces = people(DIM, seed=6, identities=20, spread=1.2)  # loose clusters: about half the probes miss
    expected = brute_top1(faces)
    a, b = fill(galleries, "a", faces), fill(galleries, "b", faces)
    assert 0.2 < rank1(expected) < 0.9

    runs = [compare_collections(a, b, max_probes=10, seed=seed) for seed in (0, 0, 1, 2, 3, 4)]

    first = {k: v for k, v in runs[0].as_dict().items() if k != "seconds"}
    assert {k: v for k, v in runs[1].as_dict().items() if k != "seconds"} == first
    for run in runs:
        assert run.sampled and run.source.probes == run.target.probes == 10
        assert run.paired_probes == 10 and run.top1_agreement == 1.0  # paired identities: the same probes
    assert len({run.source.rank1 for run in runs}) > 1  # another seed, another sample
    assert compare_collections(a, b, max_probes=60).sampled is False
    with pytest.raises(ValueError):
        compare_collections(a, b, max_probes=0)


def stored(gallery: GalleryBackend) -> dict[str, np.ndarray]:
    """identity -> its vectors in face-id order, as stored."""
    faces: dict[str, list[np.ndarray]] = {}
    for _, identities, vectors in gallery.iter_faces():
        for identity_id, vector in zip(identities, vectors):
            faces.setdefault(identity_id, []).append(vector)
    return {identity_id: np.stack(v) for identity_id, v in faces.items()}


def test_lfw_faces_embedded_by_sface_and_by_the_tiny_model(service):
    """Real vectors: the LFW fixture faces enrolled over HTTP, one request per photo, into a collection
    on SFace and one on the tiny model (what a migration would leave, face order included)."""
    from harness.fixtures import FACES, b64

    for name, model in (("lfw", "sface"), ("lfw-tiny", "tiny")):
        assert service.post("/collections", json={"name": name, "model": model}).status_code == 201
        for path in sorted(FACES.glob("*.jpg")):
            r = service.post(f"/collections/{name}/enroll", json={"identity_id": path.stem.rsplit("_", 1)[0],
                                                                   "images": [b64(path)]})
            assert r.status_code == 200, r.text
    a, b = service.galleries.collection("lfw"), service.galleries.collection("lfw-tiny")

    report = compare_collections(a, b)

    old, new = brute_top1(stored(a)), brute_top1(stored(b))
    assert report.source.probes == report.target.probes == report.paired_probes == len(old) == 24
    assert report.target.model_id == "tiny@1"
    assert report.source.rank1 == pytest.approx(rank1(old)) and report.target.rank1 == pytest.approx(rank1(new))
    assert report.source.rank1 == 1.0  # SFace on 8 people's aligned LFW crops
    assert report.target.rank1 < 0.9  # pooled pixels through a random projection: a worse model, as it must show
    differ = sorted(k for k in old if old[k] != new[k])
    assert report.changed_count == len(differ) > 0
    assert report.top1_agreement == pytest.approx(1 - len(differ) / 24)
    assert [(c.identity_id, c.source_top1, c.target_top1) for c in report.changed] == [
        (k[0], old[k], new[k]) for k in differ]
    assert report.unpaired_identities == 0 and report.identities_changed == len({k[0] for k in differ})
