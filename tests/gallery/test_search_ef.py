"""HNSW search breadth: ``auto`` widens ef with the gallery (recall at 1M), a number stays fixed.

The embedded index is real hnswlib (its ef is read back from the library); the sizes are made small
by lowering ``BASE_FACES``, the size up to which auto keeps the base ef.
"""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from service.config import Settings
from service.gallery import Gallery, ef
from service.gallery.embedded.backend import EmbeddedGallery

DIM = 16


def unit(rng, n):
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_auto_ef_grows_with_the_gallery_and_stays_bounded():
    assert ef.auto_ef(0) == ef.auto_ef(10_000) == ef.auto_ef(100_000) == ef.EF_BASE
    sizes = [100_000, 200_000, 500_000, 1_000_000, 5_000_000, 100_000_000]
    values = [ef.auto_ef(n) for n in sizes]
    assert values == sorted(values) and values[0] < values[3] <= values[-1] == ef.EF_MAX
    assert all(v % 16 == 0 for v in values if v < ef.EF_MAX)  # steps, not a new ef per enrollment
    assert ef.search_ef(ef.AUTO, 1_000_000) >= 384  # what 0.99 recall@1 at 1M took (bench/README.md)
    assert ef.search_ef(200, 1_000_000) == 200  # a number is kept at every size ...
    assert ef.search_ef(200, 10, k=500) == 500  # ... but a search asks for at least k candidates


def test_setting_is_auto_by_default_or_a_number(monkeypatch):
    assert Settings().hnsw_ef_search == "auto"
    monkeypatch.setenv("FACE_HNSW_EF_SEARCH", "300")
    assert Settings().hnsw_ef_search == 300
    for bad in ("5", "fast", "-1"):
        monkeypatch.setenv("FACE_HNSW_EF_SEARCH", bad)
        with pytest.raises(ValidationError):
            Settings()


def hnswlib_ef(g: EmbeddedGallery) -> int:
    return g.gallery._index._index.ef  # noqa: SLF001 - what hnswlib itself searches with


def test_embedded_index_ef_follows_live_faces_through_enroll_delete_and_reopen(tmp_path, monkeypatch):
    monkeypatch.setattr(ef, "BASE_FACES", 100)
    rng = np.random.default_rng(0)
    g = EmbeddedGallery(Gallery(tmp_path, "m@1", DIM, ef_search="auto"))
    g.open()
    assert hnswlib_ef(g) == ef.EF_BASE  # an empty index, not hnswlib's default of 10
    g.import_identities([(f"p{i}", unit(rng, 2), None) for i in range(200)])  # 400 faces
    assert hnswlib_ef(g) == ef.auto_ef(400) > ef.EF_BASE
    for i in range(150):  # 100 faces left
        g.delete(f"p{i}")
    assert hnswlib_ef(g) == ef.EF_BASE
    g.enroll("p-new", unit(rng, 300))
    assert hnswlib_ef(g) == ef.auto_ef(400)
    g.close()

    reopened = EmbeddedGallery(Gallery(tmp_path, "m@1", DIM, ef_search="auto"))
    reopened.open()  # from the snapshot: hnswlib does not save ef, so it must be set again
    assert hnswlib_ef(reopened) == ef.auto_ef(400)
    reopened.close()
    fixed = EmbeddedGallery(Gallery(tmp_path, "m@1", DIM, ef_search=40))
    fixed.open()
    assert hnswlib_ef(fixed) == 40
    fixed.close()


@pytest.mark.parametrize("name", ["embedded", "postgres"])
def test_auto_ef_finds_the_exact_nearest_identity(name, tmp_path, request):
    """Recall@1 of the auto setting against exact search, on both backends, at a size where it is 1."""
    rng = np.random.default_rng(1)
    centres = unit(rng, 1500)
    faces = [c + 0.3 * unit(rng, 2) for c in centres]
    faces = [f / np.linalg.norm(f, axis=1, keepdims=True) for f in faces]
    if name == "embedded":
        g = EmbeddedGallery(Gallery(tmp_path, "m@1", DIM, ef_search="auto"))
    else:
        from service.gallery.postgres.backend import PostgresGalleries, PostgresOptions

        server = request.getfixturevalue("postgres")
        backend = PostgresGalleries(PostgresOptions(url=server.url, schema=server.fresh_schema()), "m@1", DIM)
    (g if name == "embedded" else backend).open()
    if name == "postgres":
        g = backend.default
    try:
        g.import_identities([(f"p{i:04d}", f, None) for i, f in enumerate(faces)])
        probes = centres[:200] + 0.3 * unit(rng, 200)
        probes /= np.linalg.norm(probes, axis=1, keepdims=True)
        flat = np.concatenate(faces)
        exact_owner = (probes @ flat.T).argmax(axis=1) // 2
        found = [g.search(p[None], 5)[0][0].identity_id for p in probes]
        assert found == [f"p{i:04d}" for i in exact_owner]
    finally:
        (g if name == "embedded" else backend).close()
