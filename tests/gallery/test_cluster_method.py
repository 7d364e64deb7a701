"""The clustering method (service/gallery/hygiene/cluster.py) against a plain O(n^3) average linkage over
every pair: the sparse kNN-graph version with the vector-sum means must give the same partition."""

from __future__ import annotations

import numpy as np
import pytest

from service.gallery.hygiene.cluster import EXACT_MAX, cluster_faces, knn_graph, numbered


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def people(n_people: int, per: int, spread: float, seed: int, dim: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(n_people, dim)))
    return unit(np.repeat(centres, per, axis=0) + spread * rng.normal(size=(n_people * per, dim)))


def plain_average_linkage(vectors: np.ndarray, threshold: float) -> np.ndarray:
    clusters = [[i] for i in range(len(vectors))]
    sims = vectors.astype(np.float64) @ vectors.T.astype(np.float64)
    while len(clusters) > 1:
        best, pair = -np.inf, None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                mean = sims[np.ix_(clusters[a], clusters[b])].mean()
                if mean > best:
                    best, pair = mean, (a, b)
        if best < threshold or pair is None:
            break
        a, b = pair
        clusters[a] += clusters.pop(b)
    labels = np.empty(len(vectors), np.int64)
    for label, members in enumerate(clusters):
        labels[members] = label
    return numbered(labels)


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    return len(set(zip(a.tolist(), b.tolist()))) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_sparse_average_linkage_is_plain_average_linkage(seed, threshold):
    vectors = people(12, 5, 0.6, seed)
    expected = plain_average_linkage(vectors, threshold)
    for k in (len(vectors) - 1, 10):  # the whole graph, and the default k (each person has 4 others)
        got = cluster_faces(vectors, threshold, k=k).labels
        assert same_partition(got, expected), (k, got, expected)


def test_numbering_is_biggest_first_singletons_last():
    vectors = people(3, 4, 0.05, 3)
    vectors = np.concatenate([vectors[:2], vectors[4:], unit(np.eye(32, dtype=np.float32)[:1] * -1)])
    result = cluster_faces(vectors, 0.5)
    assert [len(m) for m in result.members()] == [4, 4, 2, 1]
    assert result.labels[-1] == 3


def test_the_approximate_graph_above_the_exact_limit_finds_the_neighbours():
    vectors = people(EXACT_MAX // 4 + 50, 4, 0.05, 4)
    assert len(vectors) > EXACT_MAX  # the hnswlib path
    neighbours, cosines = knn_graph(vectors, 3)
    assert (neighbours != np.arange(len(vectors))[:, None]).all()  # never itself
    truth = np.arange(len(vectors)) // 4
    assert (truth[neighbours] == truth[:, None]).mean() > 0.99
    assert np.allclose(cosines, (vectors[:, None, :] * vectors[neighbours]).sum(-1), atol=1e-5)
