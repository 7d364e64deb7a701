"""Mislabelled faces: faces that match their own identity's other faces worse than the 1:1 threshold.

Over the gallery interface only (``iter_faces``, ``search``), so both backends answer alike. The faces
come ordered by identity, so each identity's faces are compared with each other in memory (an
identity holds at most FACE_MAX_FACES_PER_IDENTITY faces); only the faces found wanting are then
searched in the gallery, for the other identity they match best. Identities with one face cannot be
judged and are skipped. Advisory: a scan is not one consistent read of a gallery being written.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..api import GalleryBackend

SCAN_BATCH = 4096  # faces per iter_faces page
SEARCH_BATCH = 256  # outlier faces per gallery search


@dataclass(frozen=True)
class IdentityFaces:
    """One identity's faces, whole: ids, vectors, and each face's best cosine to the identity's
    other faces (``own``; -inf for an identity of one face)."""

    identity_id: str
    face_ids: list[int]
    vectors: np.ndarray
    own: np.ndarray


def own_scores(vectors: np.ndarray) -> np.ndarray:
    """Per face, the best cosine to the other faces of the same identity (-inf when it is alone)."""
    if len(vectors) < 2:
        return np.full(len(vectors), -np.inf, dtype=np.float32)
    gram = vectors @ vectors.T
    np.fill_diagonal(gram, -np.inf)
    return np.asarray(gram.max(axis=1), dtype=np.float32)


def identities_of(gallery: GalleryBackend, batch: int = SCAN_BATCH) -> Iterator[list[IdentityFaces]]:
    """The gallery's faces in batches of whole identities (an identity cut by a page boundary is held
    back and completed by the next page), each with its faces' own scores."""
    held: tuple[list[int], list[str], np.ndarray] | None = None
    for ids, names, vectors in gallery.iter_faces(batch):
        if held is not None:
            ids, names, vectors = held[0] + ids, held[1] + names, np.concatenate([held[2], vectors])
        cut = len(names)
        while cut > 0 and names[cut - 1] == names[-1]:
            cut -= 1
        held = (ids[cut:], names[cut:], vectors[cut:])  # the last identity may go on in the next page
        if cut:
            yield _group(ids[:cut], names[:cut], vectors[:cut])
    if held is not None and held[0]:
        yield _group(*held)


def _group(ids: list[int], names: list[str], vectors: np.ndarray) -> list[IdentityFaces]:
    out: list[IdentityFaces] = []
    start = 0
    for end in range(1, len(names) + 1):
        if end == len(names) or names[end] != names[start]:
            part = np.ascontiguousarray(vectors[start:end], dtype=np.float32)
            out.append(IdentityFaces(names[start], ids[start:end], part, own_scores(part)))
            start = end
    return out


@dataclass(frozen=True)
class BestOther:
    identity_id: str
    score: float
    face_id: int


@dataclass(frozen=True)
class Outlier:
    identity_id: str
    face_id: int
    own_score: float  # best cosine to its identity's other faces
    best_other: BestOther | None  # the other identity it matches best at or above the threshold


@dataclass(frozen=True)
class OutlierScan:
    faces: list[Outlier]  # worst own_score first, at most ``limit``
    threshold: float
    identities_checked: int  # identities with 2+ faces
    faces_scanned: int


def find_outliers(gallery: GalleryBackend, threshold: float, limit: int, batch: int = SCAN_BATCH) -> OutlierScan:
    """Faces whose best score against their own identity's other faces is below ``threshold`` (the
    1:1 verify threshold by default), worst first, each with the best other identity that it matches
    at or above ``threshold`` (None when none does: a poor photo rather than someone else's)."""
    found: list[tuple[float, str, int, np.ndarray]] = []
    checked = scanned = 0
    for group in identities_of(gallery, batch):
        for faces in group:
            scanned += len(faces.face_ids)
            if len(faces.face_ids) < 2:
                continue
            checked += 1
            for i in np.flatnonzero(faces.own < threshold):
                found.append((float(faces.own[i]), faces.identity_id, faces.face_ids[i], faces.vectors[i]))
    found.sort(key=lambda f: (f[0], f[1], f[2]))
    found = found[:limit]
    others = _best_others(gallery, [f[3] for f in found], [f[1] for f in found], threshold)
    listed = [Outlier(identity_id, face_id, round(own, 6), other)
              for (own, identity_id, face_id, _), other in zip(found, others)]
    return OutlierScan(listed, threshold, checked, scanned)


def _best_others(gallery: GalleryBackend, vectors: list[np.ndarray], own: list[str],
                 threshold: float) -> list[BestOther | None]:
    out: list[BestOther | None] = []
    for start in range(0, len(vectors), SEARCH_BATCH):
        probes = np.stack(vectors[start:start + SEARCH_BATCH])
        for identity_id, matches in zip(own[start:start + SEARCH_BATCH], gallery.search(probes, 2)):
            best = next((m for m in matches if m.identity_id != identity_id), None)
            out.append(BestOther(best.identity_id, round(best.score, 6), best.face_id)
                       if best is not None and best.score >= threshold else None)
    return out
