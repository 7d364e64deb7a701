"""Embeddings of a dataset of aligned crops, computed once with the service's model and cached.

``images/<person>/<file>.jpg`` (LFW-112, CelebA-299-112) -> ``.cache/embeddings/<dataset>-<model>.npz``
holding ``embeddings`` (N x D float32, L2-normalised), ``labels`` (N int) and ``names`` (person per
label), in sorted person/file order. The open-set protocol (bench/open_set.py) and the default
model's impostor table (service/model/sface_impostor_tail.json) are computed from these.

    nice -n 19 python -m bench.embeddings ../shared/data/lfw-112
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness.server import MODEL_CACHE, REPO

CACHE = REPO / ".cache" / "embeddings"
log = logging.getLogger(__name__)


@dataclass
class Embedded:
    embeddings: np.ndarray  # N x D
    labels: np.ndarray  # N, index into names
    names: list[str]
    files: list[str]


def list_dataset(root: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    people = sorted(p for p in (Path(root) / "images").iterdir() if p.is_dir())
    files, labels = [], []
    for label, person in enumerate(people):
        for f in sorted(person.iterdir()):
            if f.suffix.lower() in (".jpg", ".jpeg", ".png"):
                files.append(f)
                labels.append(label)
    return files, np.asarray(labels, dtype=np.int32), [p.name for p in people]


def _model():
    from service.config import Settings
    from service.model.prepare import default_model
    from service.model.runtime import EmbeddingModel

    settings = Settings(providers="cpu", model_cache_dir=MODEL_CACHE)
    model = EmbeddingModel(default_model(settings.model_cache_dir), settings)
    model.initialize()
    return model


def embed_dataset(root: Path, batch: int = 64) -> Embedded:
    """Embed every crop of ``root`` with the default model, or read them from the cache."""
    from PIL import Image

    root = Path(root)
    files, labels, names = list_dataset(root)
    from service.model.contract import read_contract
    from service.model.prepare import default_model

    # the cache key needs only the contract: start an inference session only on a cache miss
    model_id = read_contract(default_model(MODEL_CACHE)).model_id
    cache = CACHE / f"{root.name}-{model_id.replace('@', '-')}.npz"
    rel = [str(f.relative_to(root)) for f in files]
    if cache.exists():
        data = np.load(cache, allow_pickle=False)
        if list(data["files"]) == rel:
            return Embedded(data["embeddings"], data["labels"], list(data["names"]), rel)
    model = _model()
    out = np.empty((len(files), model.contract.embedding_size), dtype=np.float32)
    for start in range(0, len(files), batch):
        chunk = files[start:start + batch]
        faces = np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.uint8) for f in chunk])
        out[start:start + len(chunk)] = model.execute(faces)
        if start // batch % 20 == 0:
            log.info("embedded %d/%d", start + len(chunk), len(files))
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp.npz")
    np.savez(tmp, embeddings=out, labels=labels, names=np.asarray(names), files=np.asarray(rel))
    tmp.replace(cache)
    return Embedded(out, labels, names, rel)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="+", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    for root in args.datasets:
        got = embed_dataset(root)
        log.info("%s: %d faces of %d people", root, len(got.labels), len(got.names))


if __name__ == "__main__":
    main()
