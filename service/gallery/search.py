"""What a gallery search means, on every backend, and the model guard: one copy of the semantics.

A leaf module (it imports no other gallery module), so the embedded gallery (gallery.py), the
backend interface (api.py) and the postgres backend (postgres.py) all use it without importing each
other.

* Identity scoring: an identity's score for a probe is the highest cosine similarity between the
  probe and any of its enrolled faces (max-over-faces).
* Oversampling: the vector index is asked for ``top_k * OVERSAMPLE`` faces, so an identity with many
  faces near the probe cannot crowd the others out of the top k; when those faces still belong to
  fewer than ``top_k`` identities and the gallery holds more faces, the ask widens (x ``WIDEN``) for
  that probe until it has enough identities or the gallery ran out of faces.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

OVERSAMPLE = 4  # faces fetched per wanted identity, before grouping by identity
WIDEN = 4  # factor by which a probe's face budget grows when too few identities came back

# (face id, identity id, similarity); identity id None: a label the backend cannot name (never returned)
Hit = tuple[int, "str | None", float]
# the k nearest faces of each probe, nearest first: (probes (n, dim), k) -> n lists of up to k hits
NearestFaces = Callable[[np.ndarray, int], Sequence[Sequence[Hit]]]


class GalleryModelMismatch(RuntimeError):
    """The gallery holds embeddings of another model."""


@dataclass
class Match:
    identity_id: str
    score: float
    face_id: int


def check_model(stored_model: str | None, stored_dim: int | None, model_id: str, dim: int, where: str) -> None:
    """The model-id guard: embeddings of different models are not comparable, so refuse to mix them.
    ``stored_model`` None: a new gallery (the caller records the model)."""
    if stored_model is None:
        return
    if stored_model != model_id or int(stored_dim or 0) != dim:
        raise GalleryModelMismatch(
            f"the gallery in {where} holds {stored_dim}-d embeddings of model {stored_model!r}; "
            f"the loaded model is {model_id!r} ({dim}-d). Embeddings of different models "
            "are not comparable: use another gallery, or re-enroll with the new model."
        )


def check_served(pins: list[tuple[str, str, int]], served: dict[str, int], where: str) -> None:
    """The start-up guard of a store of collections: each (collection, model id, dim) must be pinned to
    a served model (``served``: model id -> dim), else GalleryModelMismatch naming every collection
    that is not (its embeddings could be compared with no served model)."""
    missing = [(name, model_id, dim) for name, model_id, dim in pins if served.get(model_id) != int(dim)]
    if not missing:
        return
    if len(served) == 1 and [name for name, _, _ in missing] == ["default"]:  # one model: the message of old
        model_id, dim = next(iter(served.items()))
        check_model(missing[0][1], missing[0][2], model_id, dim, where)
    pinned = ", ".join(f"{name!r} ({model_id!r}, {dim}-d)" for name, model_id, dim in missing)
    raise GalleryModelMismatch(
        f"collections in {where} are pinned to models that are not served: {pinned}; served: "
        f"{', '.join(f'{m!r} ({d}-d)' for m, d in served.items())}. Serve their models too (FACE_MODELS=NAME=PATH,... "
        "or --model NAME=PATH), or delete those collections: embeddings of different models are not comparable.")


def group_by_identity(hits: Iterable[Hit]) -> list[Match]:
    """Max-over-faces: hits -> one Match per identity, best first. A hit without an identity (a face
    deleted, or a label the backend does not know) is skipped: it must never be returned. A similarity
    that is not a number (pgvector's cosine to a zero vector, stored by versions that let 1e308 values
    overflow to zeros) scores 0.0, as hnswlib scores it: no answer carries NaN (JSON null)."""
    best: dict[str, Match] = {}
    for face_id, identity_id, score in hits:
        if identity_id is None:
            continue
        if not math.isfinite(score):
            score = 0.0
        if identity_id not in best or score > best[identity_id].score:
            best[identity_id] = Match(identity_id, float(score), int(face_id))
    return sorted(best.values(), key=lambda m: m.score, reverse=True)


def search_identities(nearest: NearestFaces, probes: np.ndarray, top_k: int,
                      max_faces: int | None = None) -> list[list[Match]]:
    """Top-k identities for each probe (n, dim) from a backend's nearest-faces search.

    The first ask is ``top_k * OVERSAMPLE`` faces for every probe at once; the probes whose faces
    belong to fewer than ``top_k`` identities are asked again, together, for ``WIDEN`` times more,
    until each has enough identities or the backend ran out of faces (it returned fewer than asked,
    or the ask reached ``max_faces``, the faces it holds, where known).
    """
    def cap(k: int) -> int:
        return k if max_faces is None else min(k, max_faces)

    results: list[list[Match]] = [[] for _ in range(len(probes))]
    pending = list(range(len(probes)))
    k = cap(top_k * OVERSAMPLE)
    while pending and k > 0:
        short: list[int] = []
        for row, hits in zip(pending, nearest(probes[pending], k)):
            best = group_by_identity(hits)
            exhausted = len(hits) < k or (max_faces is not None and k >= max_faces)
            results[row] = best[:top_k]
            if len(best) < top_k and not exhausted:
                short.append(row)  # rare: few identities own all the nearest faces
        pending, k = short, cap(k * WIDEN)
    return results


def score_among(probes: np.ndarray, faces: dict[str, tuple[list[int], np.ndarray]], top_k: int) -> list[list[Match]]:
    """Exact search of a few identities (``faces``: identity id -> (face ids, vectors) in face-id order):
    each probe against every one of their faces, each identity scored by its best face (max over faces,
    as ``search_identities``; a tie goes to the lower face id), best first, ``top_k``. The embedded
    backend's ``search_among``; PostgreSQL scores in SQL the same way."""
    probes = np.atleast_2d(np.asarray(probes, dtype=np.float32))
    if not faces or not len(probes):
        return [[] for _ in range(len(probes))]
    names = list(faces)
    sims = probes @ np.concatenate([faces[name][1] for name in names]).T
    best = np.empty((len(probes), len(names)), dtype=np.float32)
    best_face = np.empty((len(probes), len(names)), dtype=np.int64)
    start = 0
    for column, name in enumerate(names):
        ids = faces[name][0]
        block = sims[:, start:start + len(ids)]
        where = block.argmax(axis=1)
        best[:, column] = block[np.arange(len(probes)), where]
        best_face[:, column] = np.asarray(ids, dtype=np.int64)[where]
        start += len(ids)
    out = []
    for row in range(len(probes)):
        order = np.argsort(-best[row], kind="stable")[:top_k]
        out.append([Match(names[c], float(best[row, c]), int(best_face[row, c])) for c in order])
    return out
