"""Duplicate people: pairs of different identities that are probably one person, with their evidence.

A kNN self-join through the gallery's own index, never all pairs: every face of the collection is
searched (``search``, in batches) for its ``TOP_K`` best other identities (its own identity is asked
for too and dropped), and each hit at or above the listing score becomes evidence (face a, face b,
score) for the pair of identities; a pair's score is its best face pair. Cost: faces x one kNN
search, O(F log F) with the index, instead of F^2 / 2 comparisons. The default join
(FACE_DUPLICATES_SCAN hashed, below) keeps the same evidence without the index: faces sharing a
sign-hash bucket are compared exactly, the buckets sized for the listing score (1M faces: 156 s
instead of ~33 min for the kNN join at the gallery's ef, bench/README.md).

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
                    batch: int = SCAN_BATCH, ef: int | None = None, method: str = "knn",
                    bands: tuple[int, int] | None = None) -> DuplicateScan:
    """Pairs of identities with a face pair at or above ``min_score``, best first, with up to
    ``evidence`` face pairs each; faces scoring below ``outlier_below`` against their own identity's
    other faces give no evidence. ``comparisons``: the family the false-alarm probability counts.
    ``ef``: the search breadth of the scan (FACE_DUPLICATES_SCAN_EF), None: the gallery's own.
    ``method``: "knn" (the join through the gallery's index) or "hashed" (the join in hash buckets,
    below; ``bands``: (bits, bands), None sizes it, (0, 1) compares every pair; where the collection is
    too large for the bands that ``min_score`` needs, the kNN join)."""
    started = time.perf_counter()
    if method == "hashed" and (bands is not None or hashed_bands(gallery.face_count, min_score) is not None):
        return _find_hashed(gallery, tail, min_score, outlier_below, comparisons, limit, evidence, top_k, batch,
                            bands, started)
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


def comparisons_for(gallery: GalleryBackend) -> float:
    """The family of the gallery as its counters know it now (cheap; the scan may see a few more)."""
    return family_comparisons(gallery.identity_count, gallery.counted_faces)



# --- the hashed join (FACE_DUPLICATES_SCAN hashed) ----------------------------------------------------
#
# No index: every face's vector is read once (``iter_faces``, both backends alike, no gallery lock) and
# hashed: SKETCH_BITS random hyperplanes (seeded) give each face a sign sketch; two faces at cosine s
# agree on a hyperplane with probability 1 - arccos(s) / pi. Each of L bands takes b of the sketch's
# bits (drawn at random) as a bucket key; the faces sharing a bucket are compared exactly (float32).
# b ~ log2(faces) + 3 keeps the buckets small (a face meets ~1/8 of a random face per band); L is
# sized so that a pair at ``min_score`` shares no bucket with probability MISS at most: a join sized
# for the threshold (the higher, the cheaper), each face keeping its ``top_k`` best other identities
# at or above ``min_score``, the evidence the kNN join keeps. Up to EXACT_FACES faces, or where the
# bands would exceed MAX_BANDS (a low ``min_score`` on a large collection), it compares every pair
# (small) or leaves the scan to the kNN join (``hashed_bands`` is None). Memory: every face's vector
# at once (faces x dim x 4 bytes: 512 MB at 1M x 128) and its sketch (faces x SKETCH_BITS bytes: 512 MB).

SKETCH_BITS = 512  # hyperplanes of each face's sketch; the bands draw their bits from these
MISS = 1e-4  # the chance a pair at min_score is compared in no band (independent bands)
MAX_BANDS = 1000  # above: too low a min_score for hashing (the kNN join instead)
EXACT_FACES = 4096  # up to here every pair is compared (no hashing)
BLOCK = 65536  # faces per matmul / pairs per exact comparison


def hashed_bands(faces: int, min_score: float) -> tuple[int, int] | None:
    """(bits per band, bands) of a hashed join of ``faces`` faces at ``min_score``; (0, 1): compare
    every pair; None: too many bands for that score (the kNN join instead)."""
    if faces <= EXACT_FACES:
        return 0, 1
    bits = int(min(24, np.ceil(np.log2(faces)) + 3))
    agree = 1.0 - float(np.arccos(np.clip(min_score, -1.0, 1.0))) / np.pi
    bands = int(np.ceil(np.log(1 / MISS) / agree ** bits))
    return (bits, bands) if bands <= MAX_BANDS else None


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


def _bucket_order(key: np.ndarray) -> np.ndarray:
    """The faces ordered by bucket key (up to 32 bits): two stable 16-bit passes (numpy sorts 16-bit
    keys by radix: 3.5x faster than one argsort of 1M 32-bit keys, measured)."""
    low = np.argsort((key & 0xFFFF).astype(np.uint16), kind="stable")
    return low[np.argsort((key[low] >> 16).astype(np.uint16), kind="stable")]


def hashed_join(owners: np.ndarray, vectors: np.ndarray, min_score: float, top_k: int = TOP_K,
                bands: tuple[int, int] | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each face (row of ``vectors``, unit float32; ``owners``: its identity as an int), its ``top_k``
    best other identities scoring at least ``min_score`` among the faces it shares a bucket with,
    each by its best face: (face rows, their match rows, scores). ``bands``: (bits per band, bands),
    None: ``hashed_bands`` (MAX_BANDS where that is None); (0, 1): every pair."""
    faces = len(vectors)
    bits, count = bands if bands is not None else (
        hashed_bands(faces, min_score)  # None (more faces than the gallery's counters said): at most MAX_BANDS
        or (int(min(24, np.ceil(np.log2(faces)) + 3)), MAX_BANDS))
    rows: list[np.ndarray] = []
    matches: list[np.ndarray] = []
    scores: list[np.ndarray] = []

    def compare(face: np.ndarray, match: np.ndarray) -> None:
        for start in range(0, len(face), BLOCK):
            f, m = face[start:start + BLOCK], match[start:start + BLOCK]
            score = np.einsum("ij,ij->i", vectors[f], vectors[m])
            hit = (score >= min_score) & (owners[f] != owners[m])
            if hit.any():  # a comparison is evidence for both faces: each way round
                f, m, score = f[hit], m[hit], score[hit]
                f, m, score = _top_identities(owners, np.r_[f, m], np.r_[m, f], np.r_[score, score], top_k)
                rows.append(f)
                matches.append(m)
                scores.append(score)

    if bits == 0:  # every pair, in blocks of rows
        for start in range(0, faces, 1024):
            gram = vectors[start:start + 1024] @ vectors.T
            r, c = np.nonzero(gram >= min_score)
            r = r + start
            keep = (owners[r] != owners[c]) & (r < c)
            compare(r[keep], c[keep])
    else:
        rng = np.random.default_rng(seed)
        planes = rng.standard_normal((vectors.shape[1], SKETCH_BITS)).astype(np.float32)
        sketch = np.empty((SKETCH_BITS, faces), dtype=np.uint8)  # bit per hyperplane, by hyperplane
        for start in range(0, faces, BLOCK):
            sketch[:, start:start + BLOCK] = (vectors[start:start + BLOCK] @ planes > 0).T
        for _ in range(count):
            key = np.zeros(faces, dtype=np.uint32)
            for shift, plane in enumerate(rng.choice(SKETCH_BITS, bits, replace=False)):
                key |= sketch[plane].astype(np.uint32) << np.uint32(shift)
            order = _bucket_order(key)
            ordered = key[order]
            starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
            lengths = np.diff(np.r_[starts, faces])
            length = np.repeat(lengths, lengths)
            place = np.arange(faces) - np.repeat(starts, lengths)  # a face's place in its bucket
            active = np.flatnonzero(length >= 2)
            step = 1
            while active.size:  # the pairs (place, place + step) of each bucket
                active = active[place[active] + step < length[active]]
                if active.size:
                    compare(order[active], order[active + step])
                step += 1
    if not rows:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, np.empty(0, dtype=np.float32)
    # a face was compared in several bands: its best identities of all
    return _top_identities(owners, np.concatenate(rows), np.concatenate(matches), np.concatenate(scores), top_k)


def _find_hashed(gallery: GalleryBackend, tail: ImpostorTail | None, min_score: float, outlier_below: float,
                      comparisons: float, limit: int, evidence: int, top_k: int, batch: int,
                      bands: tuple[int, int] | None, started: float) -> DuplicateScan:
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
        rows, matches, scores = hashed_join(owner, np.concatenate(vectors), min_score, top_k, bands)
        owned = owner.tolist()
        for i, j, score in zip(rows.tolist(), matches.tolist(), scores.tolist()):
            a, b = names[owned[i]], names[owned[j]]
            key, pair = ((a, b), (face_ids[i], face_ids[j])) if a < b else ((b, a), (face_ids[j], face_ids[i]))
            seen = found.setdefault(key, {})
            seen[pair] = max(seen.get(pair, -1.0), score)
    return _listed(found, set(), tail, min_score, comparisons, limit, evidence, faces_scanned, len(names), started)
