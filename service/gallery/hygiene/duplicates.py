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
PARTITIONED_FROM_FACES = 100_000  # auto: the partitioned join above (bench/README.md)
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
                    batch: int = SCAN_BATCH, ef: int | None = None, method: str = "knn",
                    cells: int | None = None) -> DuplicateScan:
    """Pairs of identities with a face pair at or above ``min_score``, best first, with up to
    ``evidence`` face pairs each; faces scoring below ``outlier_below`` against their own identity's
    other faces give no evidence. ``comparisons``: the family the false-alarm probability counts.
    ``ef``: the search breadth of the scan (FACE_DUPLICATES_SCAN_EF), None: the gallery's own.
    ``method``: "knn" (the join through the gallery's index) or "partitioned" (the exact join in
    cells, below; ``cells``: None sizes it, 1 is the brute force)."""
    started = time.perf_counter()
    if method == "partitioned":
        return _find_partitioned(gallery, tail, min_score, outlier_below, comparisons, limit, evidence, top_k, batch,
                                 cells, started)
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
    return _listed(found, outliers, tail, min_score, comparisons, limit, evidence, faces_scanned, identities, started)


def _listed(found: dict[tuple[str, str], dict[tuple[int, int], float]], outliers: set[int], tail: ImpostorTail | None,
            min_score: float, comparisons: float, limit: int, evidence: int, faces_scanned: int, identities: int,
            started: float) -> DuplicateScan:
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


def scan_method(setting: str, faces: int) -> str:
    """The scan's join for FACE_DUPLICATES_SCAN: knn, partitioned, or auto (by the collection's size)."""
    if setting != "auto":
        return setting
    return "knn" if faces <= PARTITIONED_FROM_FACES else "partitioned"


def comparisons_for(gallery: GalleryBackend) -> float:
    """The family of the gallery as its counters know it now (cheap; the scan may see a few more)."""
    return family_comparisons(gallery.identity_count, gallery.counted_faces)



# --- the partitioned exact join (FACE_DUPLICATES_SCAN partitioned) -------------------------------------
#
# No index: every face's vector is read once (``iter_faces``, both backends alike, no gallery lock), the
# faces are cut into C cells (spherical k-means on a seeded sample), each face is filed in its
# ``probes`` nearest cells, and each face is compared exactly (float32 matmul) with every face filed in
# its own nearest cell, keeping its ``top_k`` best other identities at or above ``min_score``: the
# evidence the kNN join keeps. A pair of faces is found when one of them is filed in the other's
# nearest cell (either way round): at 2 probes that missed none of the planted pairs at or above the
# listing score (bench/README.md). Cost: F x C (filing) + F x probes x F / C (the cells) dot products;
# C = sqrt(probes x F) balances the two. Memory: every face's vector at once (F x dim float32: 512 MB
# at 1M x 128).

PARTITION_PROBES = 2  # cells of each partition a face is filed in
PARTITION_REPEATS = 3  # independent pairs of partitions
CELL_FACES = 250  # faces per intersection cell
EXACT_FACES = 4096  # up to here one cell: every pair compared (the brute force)
KMEANS_SAMPLE = 32  # sampled faces per cell the centroids are fitted on
KMEANS_ITERATIONS = 4
FILE_BLOCK = 8192  # faces filed per matmul


def partition_cells(faces: int) -> int:
    """Cells per partition of a join of ``faces`` faces (1: brute force): about CELL_FACES faces in
    each of the cells x cells intersections."""
    if faces <= EXACT_FACES:
        return 1
    return max(2, int(round(np.sqrt(faces / CELL_FACES))))


def _centroids(vectors: np.ndarray, cells: int, rng: np.random.Generator) -> np.ndarray:
    sample = vectors[np.sort(rng.choice(len(vectors), min(len(vectors), cells * KMEANS_SAMPLE), replace=False))]
    centroids = sample[rng.choice(len(sample), cells, replace=False)].copy()
    for _ in range(KMEANS_ITERATIONS):
        nearest = np.concatenate([np.argmax(sample[i:i + FILE_BLOCK] @ centroids.T, axis=1)
                                  for i in range(0, len(sample), FILE_BLOCK)])
        sums = np.zeros_like(centroids)
        order = np.argsort(nearest, kind="stable")
        starts = np.searchsorted(nearest[order], np.arange(cells))
        filled = np.bincount(nearest, minlength=cells) > 0
        sums[filled] = np.add.reduceat(sample[order], starts[filled], axis=0)
        norms = np.linalg.norm(sums, axis=1)
        keep = norms > 0  # an empty cell keeps its centroid
        centroids[keep] = sums[keep] / norms[keep, None]
    return np.ascontiguousarray(centroids, dtype=np.float32)


def _file(vectors: np.ndarray, centroids: np.ndarray, probes: int) -> np.ndarray:
    """Each face's ``probes`` nearest cells [F, probes], nearest first."""
    probes = min(probes, len(centroids))
    out = np.empty((len(vectors), probes), dtype=np.int32)
    for i in range(0, len(vectors), FILE_BLOCK):
        scores = vectors[i:i + FILE_BLOCK] @ centroids.T
        if probes == 1:
            out[i:i + FILE_BLOCK, 0] = np.argmax(scores, axis=1)
            continue
        top = np.argpartition(-scores, probes - 1, axis=1)[:, :probes]
        ranked = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        out[i:i + FILE_BLOCK] = np.take_along_axis(top, ranked, axis=1)
    return out


def _top_identities(owners: np.ndarray, face: np.ndarray, match: np.ndarray, score: np.ndarray,
                    top_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Of candidate (face, match, score) triples: each face's best match of each other identity, then
    its ``top_k`` best identities."""
    order = np.lexsort((-score, owners[match], face))
    face, match, score = face[order], match[order], score[order]
    first = np.ones(len(face), dtype=bool)
    first[1:] = (face[1:] != face[:-1]) | (owners[match][1:] != owners[match][:-1])
    face, match, score = face[first], match[first], score[first]
    order = np.lexsort((-score, face))
    face, match, score = face[order], match[order], score[order]
    starts = np.flatnonzero(np.r_[True, face[1:] != face[:-1]])
    rank = np.arange(len(face)) - np.repeat(starts, np.diff(np.r_[starts, len(face)]))
    keep = rank < top_k
    return face[keep], match[keep], score[keep]


def _cells(filed: np.ndarray, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Faces by cell from each face's cells [F, n]: (face rows ordered by cell, where each cell starts)."""
    flat = filed.ravel()
    order = np.argsort(flat, kind="stable")
    return order // filed.shape[1], np.searchsorted(flat[order], np.arange(cells + 1))


def partitioned_join(owners: np.ndarray, vectors: np.ndarray, min_score: float, top_k: int = TOP_K,
                     cells: int | None = None, probes: int = PARTITION_PROBES, repeats: int = PARTITION_REPEATS,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each face (row of ``vectors``, unit float32; ``owners``: its identity as an int), its ``top_k``
    best other identities scoring at least ``min_score``, each by its best face: (face rows, their
    match rows, scores). ``repeats`` times: two k-means partitions of ``cells`` cells each (None: sized
    by ``partition_cells``; 1: one cell, every pair compared once) cut the faces into cells x cells
    cells (their intersections); each face is filed in the ``probes`` x ``probes`` of them nearest to
    it and compared with every face filed in its own nearest one (each comparison counts for both
    faces, so a pair is found when either face is filed in the other's nearest cell)."""
    faces = len(vectors)
    cells = partition_cells(faces) if cells is None else max(1, min(cells, faces))
    rng = np.random.default_rng(seed)
    rows: list[np.ndarray] = []
    matches: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    for _ in range(repeats if cells > 1 else 1):
        if cells == 1:
            filed = np.zeros((faces, 1), dtype=np.int32)
        else:
            first, second = (_file(vectors, _centroids(vectors, cells, rng), probes) for _ in range(2))
            filed = (first[:, :, None] * cells + second[:, None, :]).reshape(faces, -1)  # nearest first
        fine = cells * cells
        queries, query_starts = _cells(filed[:, :1], fine)
        members_all, member_starts = _cells(filed, fine)
        for cell in range(fine):
            members = members_all[member_starts[cell]:member_starts[cell + 1]]
            cell_queries = queries[query_starts[cell]:query_starts[cell + 1]]
            if len(cell_queries) == 0 or len(members) < 2:
                continue
            member_vectors = vectors[members]
            for q in range(0, len(cell_queries), FILE_BLOCK):
                block = cell_queries[q:q + FILE_BLOCK]
                gram = vectors[block] @ member_vectors.T
                r, c = np.nonzero(gram >= min_score)
                face, match = block[r], members[c]
                other = owners[face] != owners[match]
                if other.any():
                    # a comparison is evidence for both faces: each way round
                    face, match, score = face[other], match[other], gram[r, c][other]
                    face, match, score = _top_identities(owners, np.r_[face, match], np.r_[match, face],
                                                         np.r_[score, score], top_k)
                    rows.append(face)
                    matches.append(match)
                    scores.append(score)
    if not rows:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, np.empty(0, dtype=np.float32)
    # a face was compared in several cells (its own, and others' as a member): its best identities of all
    return _top_identities(owners, np.concatenate(rows), np.concatenate(matches), np.concatenate(scores), top_k)


def _find_partitioned(gallery: GalleryBackend, tail: ImpostorTail | None, min_score: float, outlier_below: float,
                      comparisons: float, limit: int, evidence: int, top_k: int, batch: int,
                      cells: int | None, started: float) -> DuplicateScan:
    names: list[str] = []
    owners: list[np.ndarray] = []
    face_ids: list[int] = []
    vectors: list[np.ndarray] = []
    faces_scanned = 0
    for group in identities_of(gallery, batch):
        for faces in group:
            faces_scanned += len(faces.face_ids)
            keep = (faces.own >= outlier_below) if len(faces.face_ids) >= 2 else np.ones(1, dtype=bool)
            if keep.any():  # an outlier is probably filed under the wrong identity: no evidence either way
                owners.append(np.full(int(keep.sum()), len(names), dtype=np.int32))
                face_ids.extend(f for f, k in zip(faces.face_ids, keep) if k)
                vectors.append(faces.vectors[keep])
            names.append(faces.identity_id)
    found: dict[tuple[str, str], dict[tuple[int, int], float]] = {}
    if vectors:
        owner = np.concatenate(owners)
        rows, matches, scores = partitioned_join(owner, np.concatenate(vectors), min_score, top_k, cells=cells)
        owned = owner.tolist()
        for i, j, score in zip(rows.tolist(), matches.tolist(), scores.tolist()):
            a, b = names[owned[i]], names[owned[j]]
            key, pair = ((a, b), (face_ids[i], face_ids[j])) if a < b else ((b, a), (face_ids[j], face_ids[i]))
            seen = found.setdefault(key, {})
            seen[pair] = max(seen.get(pair, -1.0), score)
    return _listed(found, set(), tail, min_score, comparisons, limit, evidence, faces_scanned, len(names), started)
