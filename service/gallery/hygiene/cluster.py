"""Group unlabelled faces by person: average linkage over the kNN graph, threshold from the impostor tail.

The method, chosen on LFW by ``bench/cluster_lfw.py`` (numbers in README "Clusters"):

1. the kNN graph: each face's ``k`` (10) most similar other faces (exact matrix products up to
   ``EXACT_MAX`` faces, an hnswlib index above, so memory is linear in the number of faces: never an
   n x n matrix); only edges scoring at least the threshold are kept;
2. average linkage (UPGMA) along those edges: repeatedly merge the two adjacent clusters whose mean
   cosine over all their cross pairs is highest, while it is at least the threshold. The mean over
   every cross pair is exact, not estimated from the sparse edges: for unit vectors the sum of the
   cross dot products is the dot product of the two clusters' vector sums, so each cluster keeps its
   sum. Two clusters with no edge above the threshold cannot have a mean above it (a mean is at most
   the largest term), so restricting candidates to the graph's edges loses no merge, up to the kNN
   graph's own truncation at ``k``.
3. the threshold: two single faces of different people merge only when their cosine reaches it,
   so the impostor tail gives the chance of a false merge per pair of faces directly: the default is
   the tail's cosine at ``DEFAULT_FALSE_MERGE`` = 1e-5 (0.467 for the default model; never below the
   1:1 threshold). A merge of larger clusters compares the mean of many impostor scores with it, far
   less likely to reach it than one score, so this bounds every false merge's chance per pair of
   clusters. On LFW the best threshold barely moved with the number of faces (0.44-0.48 from 1,000 to
   13,233 faces), so the rule does not grow with it as the open-set threshold does (a per-face
   rule, ``per_face_threshold``, overshot at 13k faces: bench/cluster_lfw.py records both).

Clusters are numbered biggest first (ties: the one whose first face comes first), singletons last.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

from ...model.calibration import ImpostorTail, far_for_fpir

METHOD = "average-linkage-knn"
DEFAULT_K = 10  # neighbours per face in the graph (on all of LFW k = 10, 30 and 60 gave the same clusters)
DEFAULT_FALSE_MERGE = 1e-5  # chance that a pair of faces of different people reaches the default threshold
EXACT_MAX = 4096  # up to this many faces the kNN graph is exact (blocked matrix products), above: hnswlib
BLOCK = 1024  # rows per matrix product of the exact graph (BLOCK x n floats at a time)


@dataclass(frozen=True)
class Clustering:
    labels: np.ndarray  # cluster id of each face: 0 = the biggest cluster, singletons last
    threshold: float
    method: str = METHOD

    @property
    def count(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    def members(self) -> list[list[int]]:
        """The face indices of each cluster, by cluster id (each list ascending)."""
        groups: list[list[int]] = [[] for _ in range(self.count)]
        for face, label in enumerate(self.labels.tolist()):
            groups[label].append(face)
        return groups


def tail_threshold(tail: ImpostorTail | None, false_merge: float = DEFAULT_FALSE_MERGE,
                   floor: float | None = None) -> float:
    """The cosine that a pair of faces of different people reaches with probability ``false_merge``
    (the tail, extended below its last row by its last decade's slope), at least ``floor`` (the 1:1
    threshold); without a tail, ``floor``."""
    if tail is None:
        if floor is None:
            raise ValueError("no impostor tail and no floor: give a threshold")
        return floor
    threshold = tail.threshold_at(false_merge)
    return max(threshold, floor) if floor is not None else threshold


def per_face_threshold(tail: ImpostorTail, faces: int, max_false_link: float, floor: float | None = None) -> float:
    """The alternative rule the benchmark compares: the cosine at which each face's ``faces - 1``
    comparisons with strangers reach it with probability ``max_false_link`` (rises with ``faces``)."""
    return tail_threshold(tail, far_for_fpir(max_false_link, max(faces - 1, 1)), floor)


def knn_graph(vectors: np.ndarray, k: int = DEFAULT_K, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(neighbours [n, k'], cosines [n, k']) of each row among the others, best first; k' = min(k, n - 1).
    Exact up to ``EXACT_MAX`` rows, approximate (hnswlib, recall ~0.99 at these settings) above."""
    n = len(vectors)
    k = min(k, n - 1)
    if k <= 0:
        return np.empty((n, 0), np.int64), np.empty((n, 0), np.float32)
    if n <= EXACT_MAX:
        return _exact_knn(vectors, k)
    import hnswlib

    index = hnswlib.Index(space="ip", dim=vectors.shape[1])
    index.init_index(max_elements=n, ef_construction=200, M=16)
    index.set_num_threads(threads)
    index.add_items(vectors, np.arange(n))
    index.set_ef(max(2 * (k + 1), 100))
    labels, distances = index.knn_query(vectors, k=k + 1)
    sims = 1.0 - distances  # hnswlib's "ip" distance is 1 - dot
    neighbours = np.empty((n, k), np.int64)
    cosines = np.empty((n, k), np.float32)
    for row in range(n):  # drop each face itself (wherever the approximate search put it)
        keep = labels[row] != row
        neighbours[row] = labels[row][keep][:k]
        cosines[row] = sims[row][keep][:k]
    return neighbours, cosines


def _exact_knn(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    n = len(vectors)
    neighbours = np.empty((n, k), np.int64)
    cosines = np.empty((n, k), np.float32)
    for start in range(0, n, BLOCK):
        scores = vectors[start:start + BLOCK] @ vectors.T
        rows = np.arange(len(scores))
        scores[rows, start + rows] = -np.inf  # not its own neighbour
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-top_scores, axis=1)
        neighbours[start:start + len(scores)] = np.take_along_axis(top, order, axis=1)
        cosines[start:start + len(scores)] = np.take_along_axis(top_scores, order, axis=1)
    return neighbours, cosines


def average_linkage(vectors: np.ndarray, neighbours: np.ndarray, cosines: np.ndarray, threshold: float) -> np.ndarray:
    """Average-linkage merges along the graph's edges of at least ``threshold``; a raw cluster label
    per face (the index of a member, not yet numbered)."""
    n = len(vectors)
    sums = vectors.astype(np.float64)  # each live cluster's vector sum, at its representative
    size = np.ones(n, np.int64)
    parent = np.arange(n)
    version = np.zeros(n, np.int64)
    adjacent: list[set[int]] = [set() for _ in range(n)]
    rows, cols = np.nonzero(cosines >= threshold)
    heap: list[tuple[float, int, int, int, int]] = []
    for i, j in zip(rows.tolist(), neighbours[rows, cols].tolist()):
        if i != j and j not in adjacent[i]:
            adjacent[i].add(j)
            adjacent[j].add(i)
            a, b = (i, j) if i < j else (j, i)
            heap.append((-float(vectors[a] @ vectors[b]), a, b, 0, 0))
    heapq.heapify(heap)
    while heap:
        negative, a, b, version_a, version_b = heapq.heappop(heap)
        if version[a] != version_a or version[b] != version_b:
            continue  # one of them has merged since this entry was pushed
        if -negative < threshold:
            break
        keep, gone = (a, b) if size[a] >= size[b] else (b, a)
        parent[gone] = keep
        sums[keep] += sums[gone]
        size[keep] += size[gone]
        version[keep] += 1
        version[gone] = -1  # dead
        adjacent[keep] |= adjacent[gone]
        adjacent[keep] -= {keep, gone}
        for other in adjacent[gone]:
            if other != keep:
                adjacent[other].discard(gone)
                adjacent[other].add(keep)
        adjacent[gone] = set()
        others = np.fromiter(adjacent[keep], np.int64, len(adjacent[keep]))
        if not len(others):
            continue
        means = (sums[others] @ sums[keep]) / (size[others] * size[keep])
        for other, mean in zip(others.tolist(), means.tolist()):
            if mean >= threshold:
                x, y = (keep, other) if keep < other else (other, keep)
                heapq.heappush(heap, (-mean, x, y, int(version[x]), int(version[y])))
    return _roots(parent)


def _roots(parent: np.ndarray) -> np.ndarray:
    roots = parent.copy()
    while True:
        following = roots[roots]
        if np.array_equal(following, roots):
            return roots
        roots = following


def numbered(raw: np.ndarray) -> np.ndarray:
    """Raw labels -> 0..m-1, biggest cluster first; equal sizes by their first face (singletons last)."""
    if not len(raw):
        return raw.astype(np.int64)
    _, first, inverse, counts = np.unique(raw, return_index=True, return_inverse=True, return_counts=True)
    order = np.lexsort((first, -counts))  # by size descending, then first face ascending
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return rank[inverse.reshape(-1)]


def cluster_faces(vectors: np.ndarray, threshold: float, k: int = DEFAULT_K, threads: int = 1) -> Clustering:
    """Cluster L2-normalised embeddings [n, dim] at ``threshold`` (see the module docstring)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if not math.isfinite(threshold):
        raise ValueError("the threshold must be finite")
    neighbours, cosines = knn_graph(vectors, k, threads)
    return Clustering(numbered(average_linkage(vectors, neighbours, cosines, threshold)), threshold)
