"""Fill a data dir's store with synthetic faces through the store's bulk path (no index): a large
gallery in seconds, for restart benchmarks and tests. The server then builds the index itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.gallery.embedded.gallery import Gallery
from service.gallery.embedded.store import Store


def fill_store(data_dir: Path, model_id: str, dim: int, faces: int, per_identity: int = 2, seed: int = 0,
               prefix: str = "syn", batch_identities: int = 5000) -> int:
    """Add ``faces`` unit vectors (``per_identity`` per identity) to the store; returns identities added."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    store = Store(data_dir / Gallery.STORE_FILE)
    try:
        if store.get_meta("model_id") is None:
            store.set_meta("model_id", model_id)
            store.set_meta("embedding_size", str(dim))
        rng = np.random.default_rng(seed)
        identities = faces // per_identity
        for start in range(0, identities, batch_identities):
            n = min(batch_identities, identities - start)
            v = rng.normal(size=(n, per_identity, dim)).astype(np.float32)
            v /= np.linalg.norm(v, axis=-1, keepdims=True)
            store.add_new_identities([(f"{prefix}{start + i:08d}", v[i], None) for i in range(n)])
        return identities
    finally:
        store.close()
