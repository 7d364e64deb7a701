"""Fill a data dir's store with synthetic faces through the store's bulk path (no index): a large
gallery in seconds, for restart benchmarks and tests. The server then builds the index itself."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from service.gallery.embedded.gallery import Gallery
from service.gallery.embedded.store import Store


@contextmanager
def _store(data_dir: Path, model_id: str, dim: int) -> Iterator[Store]:
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    store = Store(data_dir / Gallery.STORE_FILE)
    try:
        if store.get_meta("model_id") is None:
            store.set_meta("model_id", model_id)
            store.set_meta("embedding_size", str(dim))
        yield store
    finally:
        store.close()


def fill_store(data_dir: Path, model_id: str, dim: int, faces: int, per_identity: int = 2, seed: int = 0,
               prefix: str = "syn", batch_identities: int = 5000) -> int:
    """Add ``faces`` unit vectors (``per_identity`` per identity) to the store; returns identities added."""
    with _store(data_dir, model_id, dim) as store:
        rng = np.random.default_rng(seed)
        identities = faces // per_identity
        for start in range(0, identities, batch_identities):
            n = min(batch_identities, identities - start)
            v = rng.normal(size=(n, per_identity, dim)).astype(np.float32)
            v /= np.linalg.norm(v, axis=-1, keepdims=True)
            store.add_new_identities([(f"{prefix}{start + i:08d}", v[i], None) for i in range(n)])
        return identities


def fill_store_with(data_dir: Path, model_id: str, faces: np.ndarray, name: Callable[[int], str],
                    batch_identities: int = 5000) -> int:
    """Add given faces (identities x per_identity x dim; identity ``i`` as ``name(i)``) to the store,
    e.g. a bench's synthetic gallery whose exact answers it knows; returns identities added."""
    with _store(data_dir, model_id, faces.shape[-1]) as store:
        for start in range(0, len(faces), batch_identities):
            store.add_new_identities([(name(i), faces[i], None)
                                      for i in range(start, min(len(faces), start + batch_identities))])
        return len(faces)
