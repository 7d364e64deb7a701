"""Duplicate people: pairs of different identities that are probably one person, with their evidence.

A kNN self-join through the gallery's own index, never all pairs: every face of the collection is
searched (``search``, in batches) for its ``TOP_K`` best other identities (its own identity is asked
for too and dropped), and each hit at or above the listing score becomes evidence (face a, face b,
score) for the pair of identities; a pair's score is its best face pair. Cost: faces x one kNN
search, O(F log F) with the index, instead of F^2 / 2 comparisons.

A face that does not match its own identity's other faces (an outlier: outliers.py, below the 1:1
threshold) is no evidence that two identities are one person: it is probably filed under the wrong
one, which ``/outliers`` reports. Its hits, and the hits of other faces on it, are left out.

**How sure**: for two different people the chance that a face pair scores at least s is the model's
impostor FAR(s) (the contract's ``face.impostor_tail``, or the gallery's own calibration). A scan
looks at every pair of faces of different identities at once, so the false-alarm probability of a
listed pair is family-wise: ``1 - (1 - FAR(s))^M`` over the M independent face-pair chances of the
scan (``family_comparisons``). Without ``min_score``, pairs are listed from the score at which that
probability is ``max_false_alarm``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ...model.calibration import ImpostorTail, far_for_fpir, fpir_for_far
from ..api import GalleryBackend
from .outliers import SCAN_BATCH, identities_of

SCAN_EF = 48  # FACE_DUPLICATES_SCAN_EF auto up to SCAN_EF_MAX_FACES: measured lossless at 100k (bench/README.md)
SCAN_EF_MAX_FACES = 100_000  # above: the gallery's own ef (at 1M ef 48 missed ~4% of pairs that ef 384 found)
TOP_K = 3  # other identities asked per face: one person under up to 3 other ids, or a lookalike ranked above
SEARCH_BATCH = 1024  # faces per gallery search


@dataclass(frozen=True)
class Evidence:
    face_a: int  # a face of identity_a
    face_b: int  # a face of identity_b
    score: float


@dataclass
class DuplicatePair:
    identity_a: str  # identity_a < identity_b
    identity_b: str
    score: float  # the best face pair
    false_alarm_probability: float | None  # None without an impostor tail
    evidence: list[Evidence] = field(default_factory=list)  # best first


@dataclass(frozen=True)
class DuplicateScan:
    pairs: list[DuplicatePair]  # best first, at most ``limit``
    min_score: float
    comparisons: int  # face x identity comparisons made (each face against every other identity)
    family_comparisons: float  # independent face-pair chances the false-alarm estimate counts
    faces_scanned: int
    identities_scanned: int
    elapsed_ms: float


def family_comparisons(identities: int, counted_faces: int) -> float:
    """Independent impostor chances in a scan of the whole collection: every pair of faces of two
    different identities, F (F - F/N) / 2 for F counted faces (each identity's faces up to
    FACES_COUNTED_PER_IDENTITY, as the open-set threshold counts them) over N identities."""
    if identities < 2:
        return 0.0
    faces = float(max(counted_faces, identities))
    return faces * (faces - faces / identities) / 2


def listing_score(tail: ImpostorTail, max_false_alarm: float, comparisons: float) -> float:
    """The score above which a pair's family-wise false-alarm probability is at most ``max_false_alarm``."""
    return tail.threshold_at(far_for_fpir(max_false_alarm, max(comparisons, 1.0)))


def false_alarm(tail: ImpostorTail | None, score: float, comparisons: float) -> float | None:
    if tail is None:
        return None
    return fpir_for_far(tail.far_at(score), max(comparisons, 1.0))


def find_duplicates(gallery: GalleryBackend, tail: ImpostorTail | None, min_score: float, outlier_below: float,
                    comparisons: float, limit: int = 100, evidence: int = 3, top_k: int = TOP_K,
                    batch: int = SCAN_BATCH, ef: int | None = None) -> DuplicateScan:
    """Pairs of identities with a face pair at or above ``min_score``, best first, with up to
    ``evidence`` face pairs each; faces scoring below ``outlier_below`` against their own identity's
    other faces give no evidence. ``comparisons``: the family the false-alarm probability counts.
    ``ef``: the search breadth of the scan (FACE_DUPLICATES_SCAN_EF), None: the gallery's own."""
    started = time.perf_counter()
    found: dict[tuple[str, str], dict[tuple[int, int], float]] = {}
    faces_scanned = identities = 0
    probes: list[np.ndarray] = []
    owners: list[tuple[str, int]] = []  # (identity, face id) of each pending probe
    outliers: set[int] = set()  # faces that do not match their own identity's other faces

    def flush() -> None:
        if not probes:
            return
        for (owner, face_id), matches in zip(owners, gallery.search(np.stack(probes), top_k + 1, ef)):
            for m in matches:
                if m.identity_id == owner or m.score < min_score:
                    continue
                if owner < m.identity_id:
                    key, pair = (owner, m.identity_id), (face_id, m.face_id)
                else:
                    key, pair = (m.identity_id, owner), (m.face_id, face_id)
                seen = found.setdefault(key, {})
                seen[pair] = max(seen.get(pair, -1.0), m.score)
        probes.clear()
        owners.clear()

    for group in identities_of(gallery, batch):
        for faces in group:
            identities += 1
            faces_scanned += len(faces.face_ids)
            judged = len(faces.face_ids) >= 2
            for i, face_id in enumerate(faces.face_ids):
                if judged and faces.own[i] < outlier_below:
                    outliers.add(face_id)  # probably filed under the wrong identity: no evidence either way
                    continue
                probes.append(faces.vectors[i])
                owners.append((faces.identity_id, face_id))
                if len(probes) >= SEARCH_BATCH:
                    flush()
    flush()
    pairs = []
    for (a, b), evidences in found.items():
        # a hit on an outlier face is no evidence either (it may have been searched before it was known)
        ranked = sorted(((pair, score) for pair, score in evidences.items() if outliers.isdisjoint(pair)),
                        key=lambda e: (-e[1], e[0]))
        if not ranked:
            continue
        best = float(ranked[0][1])
        pairs.append(DuplicatePair(a, b, round(best, 6), false_alarm(tail, best, comparisons),
                                   [Evidence(fa, fb, round(float(s), 6)) for (fa, fb), s in ranked[:evidence]]))
    pairs.sort(key=lambda p: (-p.score, p.identity_a, p.identity_b))
    return DuplicateScan(pairs[:limit], min_score, faces_scanned * max(identities - 1, 0), comparisons,
                         faces_scanned, identities, round((time.perf_counter() - started) * 1000, 1))


def scan_ef(setting: int | str, faces: int) -> int | None:
    """The scan's search breadth for FACE_DUPLICATES_SCAN_EF: a number, or auto (None: the gallery's own)."""
    if setting != "auto":
        return int(setting)
    return SCAN_EF if faces <= SCAN_EF_MAX_FACES else None


def comparisons_for(gallery: GalleryBackend) -> float:
    """The family of the gallery as its counters know it now (cheap; the scan may see a few more)."""
    return family_comparisons(gallery.identity_count, gallery.counted_faces)

