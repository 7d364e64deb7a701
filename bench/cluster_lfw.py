"""Clustering LFW by person: the service's method against two baselines, in one run.

    nice -n 10 python -m bench.cluster_lfw          # -> bench/results/cluster_lfw.json

Every one of the 13,233 faces of ../shared/data/lfw-112 goes through the path ``python -m service
cluster`` takes (``service.cli.cluster.embed_tree``: decode, the served model, in this process; the
crops are aligned 112x112, so ``auto`` takes them as aligned), cached in
``.cache/cluster/lfw-112-<model>.npz`` so reruns skip it. Then, on random subsets of 1,000 and 5,000
faces (3 seeds each) and on all 13,233:

* ``average_linkage``: the service's method (``service.gallery.hygiene.cluster``), at the default
  threshold its impostor-tail rule gives (the cosine two faces of different people reach with
  probability 1e-5), plus other false-merge rates, the per-face rule that grows with the number of
  faces (``per_face_threshold``), a sweep of fixed thresholds (where the rule lands against the best),
  and at all faces k = 30 neighbours instead of 10;
* candidates on the same pruned kNN graph: connected components, Chinese whispers;
* baselines, exact (every pair, blocked matrix products, no kNN truncation): connected components at
  the model's 1:1 threshold, and DBSCAN on cosine distance as the face_recognition examples do
  (sklearn's defaults ``min_samples=5``, eps = 1 - the 1:1 threshold; also ``min_samples=2``),
  each also swept over its threshold (an oracle-tuned best, to be fair to it). scikit-learn is not
  in the environment, so DBSCAN is implemented here (core points: >= min_samples points within eps
  counting itself; clusters: the components of core points; a border point joins its most similar
  core neighbour's cluster; noise: singletons).

Scores: pairwise precision/recall/F (over pairs of faces put together / of the same person) and
BCubed precision/recall/F (per face: the share of its cluster that is its person / of its person in
its cluster, averaged); a singleton is a cluster of one.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import time
from pathlib import Path

import numpy as np

from bench.common import current_commit, machine, save
from harness.server import MODEL_CACHE, REPO
from service.gallery.hygiene.cluster import (
    DEFAULT_FALSE_MERGE,
    DEFAULT_K,
    average_linkage,
    knn_graph,
    numbered,
    per_face_threshold,
    tail_threshold,
)

LFW = REPO.parent / "shared" / "data" / "lfw-112"
CACHE = REPO / ".cache" / "cluster"
log = logging.getLogger("bench.cluster_lfw")


# --- data ----------------------------------------------------------------------------------------

def _state():
    from service.cli.calibrate import _service_state
    from service.config import Settings

    return _service_state(Settings(providers="cpu", model_cache_dir=MODEL_CACHE))


def bench_cache_embeddings(state, sample: int = 256) -> tuple[np.ndarray, np.ndarray, list[str], dict]:
    """The LFW embeddings bench/embeddings.py cached (the same model on the same crops, read with PIL and
    run through ``model.execute``), checked against the CLI's path on a random sample of them: for when
    the machine is too loaded to run all 13,233 through the pipeline in time (``--reuse-bench-embeddings``)."""
    import tempfile

    from bench.embeddings import embed_dataset
    from service.cli.cluster import embed_tree

    data = embed_dataset(LFW)
    vectors = data.embeddings / np.linalg.norm(data.embeddings, axis=1, keepdims=True)
    pick = np.sort(np.random.default_rng(7).choice(len(vectors), sample, replace=False))
    with tempfile.TemporaryDirectory() as tmp:
        for i in pick:  # one folder per face keeps the walk in pick's order
            folder = Path(tmp) / f"{i:06d}"
            folder.mkdir()
            (folder / Path(data.files[i]).name).symlink_to(LFW / data.files[i])
        started = time.perf_counter()
        found = embed_tree(state, Path(tmp), "auto")
        seconds = time.perf_counter() - started
    cosine = (found.vectors * vectors[pick]).sum(axis=1)
    check = {"sample": sample, "min_cosine_pipeline_vs_cached": round(float(cosine.min()), 6),
             "mean_cosine": round(float(cosine.mean()), 6), "pipeline_seconds": round(seconds, 2),
             "pipeline_faces_per_second": round(sample / seconds, 1),
             "load_average_before": os.getloadavg()}
    files = [str(Path(f).relative_to("images")) for f in data.files]
    return vectors.astype(np.float32), data.labels.astype(np.int64), files, check


def lfw_embeddings(state) -> tuple[np.ndarray, np.ndarray, list[str], float]:
    """(embeddings, person label per face, files, seconds it took to embed; 0 when cached)."""
    from service.cli.cluster import embed_tree

    model_id = state.contract.model_id
    cache = CACHE / f"lfw-112-{model_id.replace('@', '-')}.npz"
    if cache.exists():
        data = np.load(cache, allow_pickle=False)
        return data["embeddings"], data["labels"], list(data["files"]), float(data["seconds"])
    started = time.perf_counter()
    found = embed_tree(state, LFW / "images", "auto",
                       progress=lambda p, f: p % 1000 == 0 and log.info("embedded %d photos", p))
    seconds = time.perf_counter() - started
    if found.skipped:
        log.warning("skipped: %s", dict(found.skipped))
    people = [Path(f).parts[0] for f in found.files]
    names = sorted(set(people))
    index = {n: i for i, n in enumerate(names)}
    labels = np.asarray([index[p] for p in people], np.int64)
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp.npz")
    np.savez(tmp, embeddings=found.vectors, labels=labels, files=np.asarray(found.files), seconds=seconds)
    tmp.replace(cache)
    return found.vectors, labels, found.files, seconds


# --- scores --------------------------------------------------------------------------------------

def scores(predicted: np.ndarray, truth: np.ndarray) -> dict:
    """Pairwise and BCubed precision / recall / F of a clustering against the people."""
    _, p = np.unique(predicted, return_inverse=True)
    _, t = np.unique(truth, return_inverse=True)
    pairs, joint = np.unique(np.stack([p, t]), axis=1, return_counts=True)
    cluster_size = np.bincount(p)
    class_size = np.bincount(t)

    def c2(x: np.ndarray) -> float:
        return float((x.astype(np.float64) * (x - 1) / 2).sum())

    together, same, both = c2(cluster_size), c2(class_size), c2(joint)
    pp = both / together if together else 1.0
    pr = both / same if same else 1.0
    n = len(predicted)
    # BCubed: sum over faces of |C ∩ L| / |C| = sum over cells of n_cl^2 / |C|
    bp = float((joint.astype(np.float64) ** 2 / cluster_size[pairs[0]]).sum()) / n
    br = float((joint.astype(np.float64) ** 2 / class_size[pairs[1]]).sum()) / n

    def f(a: float, b: float) -> float:
        return 2 * a * b / (a + b) if a + b else 0.0

    return {"pairwise_precision": round(pp, 4), "pairwise_recall": round(pr, 4), "pairwise_f": round(f(pp, pr), 4),
            "bcubed_precision": round(bp, 4), "bcubed_recall": round(br, 4), "bcubed_f": round(f(bp, br), 4),
            "clusters": int(cluster_size.size), "singletons": int((cluster_size == 1).sum())}


# --- exact pairs (baselines) and graph candidates ------------------------------------------------

def pairs_above(vectors: np.ndarray, floor: float, block: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair i < j with cosine >= floor (exact, blocked matrix products)."""
    rows, cols, sims = [], [], []
    for start in range(0, len(vectors), block):
        s = vectors[start:start + block] @ vectors.T
        i, j = np.nonzero(s >= floor)
        i = i + start
        keep = j > i
        rows.append(i[keep])
        cols.append(j[keep])
        sims.append(s[i[keep] - start, j[keep]])
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(sims).astype(np.float32)


def components(n: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Connected components of an edge list (label propagation with pointer jumping; numpy only)."""
    label = np.arange(n)
    while True:
        before = label.copy()
        low = np.minimum(label[rows], label[cols])
        np.minimum.at(label, rows, low)
        np.minimum.at(label, cols, low)
        label = label[label]
        if np.array_equal(label, before):
            return label


def dbscan(n: int, rows: np.ndarray, cols: np.ndarray, sims: np.ndarray, min_samples: int) -> np.ndarray:
    """DBSCAN over the eps-neighbourhood edges given (see the module docstring)."""
    count = np.bincount(rows, minlength=n) + np.bincount(cols, minlength=n) + 1  # itself included
    core = count >= min_samples
    both = core[rows] & core[cols]
    label = components(n, rows[both], cols[both])
    result = np.where(core, label, -1 - np.arange(n))  # non-core: its own (noise) until it borders a core
    best = np.full(n, -np.inf)
    for a, b in ((rows, cols), (cols, rows)):  # a border point a joins its most similar core neighbour b
        mask = ~core[a] & core[b]
        order = np.argsort(sims[mask])  # ascending: the last write per point is its best
        aa, bb = a[mask][order], b[mask][order]
        better = sims[mask][order] > best[aa]
        result[aa[better]] = label[bb[better]]
        best[aa[better]] = sims[mask][order][better]
    return result


def graph_edges(neighbours: np.ndarray, cosines: np.ndarray, threshold: float):
    r, c = np.nonzero(cosines >= threshold)
    return r, neighbours[r, c], cosines[r, c]


def chinese_whispers(n: int, rows: np.ndarray, cols: np.ndarray, sims: np.ndarray, rounds: int = 20,
                     seed: int = 0) -> np.ndarray:
    adjacency: list[dict[int, float]] = [{} for _ in range(n)]
    for a, b, s in zip(rows.tolist(), cols.tolist(), sims.tolist()):
        if a != b:
            adjacency[a][b] = max(adjacency[a].get(b, 0.0), s)
            adjacency[b][a] = adjacency[a][b]
    label = list(range(n))
    order = list(range(n))
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        changed = 0
        for node in order:
            if not adjacency[node]:
                continue
            weight: dict[int, float] = {}
            for other, s in adjacency[node].items():
                weight[label[other]] = weight.get(label[other], 0.0) + s
            best = max(weight, key=lambda lab: (weight[lab], -lab))
            if best != label[node]:
                label[node] = best
                changed += 1
        if not changed:
            break
    return np.asarray(label)


# --- the run -------------------------------------------------------------------------------------

def timed(fn, *args):
    started = time.perf_counter()
    out = fn(*args)
    return out, round(time.perf_counter() - started, 3)


def evaluate(vectors: np.ndarray, truth: np.ndarray, tail, verify: float, sweep: list[float], k: int) -> dict:
    n = len(vectors)
    out: dict = {"faces": n, "people": int(len(np.unique(truth)))}
    (neighbours, cosines), knn_s = timed(knn_graph, vectors, k, os.cpu_count() or 1)
    out["knn_seconds"] = knn_s
    chosen = tail_threshold(tail, DEFAULT_FALSE_MERGE, floor=verify)
    out["service_threshold"] = round(chosen, 4)

    def linkage(t: float) -> tuple[dict, float]:
        labels, seconds = timed(average_linkage, vectors, neighbours, cosines, t)
        return scores(numbered(labels), truth), seconds

    result, seconds = linkage(chosen)
    out["average_linkage"] = {"threshold": round(chosen, 4), "false_merge": DEFAULT_FALSE_MERGE, **result,
                              "seconds": seconds, "seconds_with_knn": round(seconds + knn_s, 3), "k": k}
    out["average_linkage_by_false_merge"] = {}
    for far in (1e-4, 3e-5, 3e-6):
        t = tail_threshold(tail, far, floor=verify)
        out["average_linkage_by_false_merge"][f"{far:g}"] = {"threshold": round(t, 4), **linkage(t)[0]}
    out["average_linkage_per_face_rule"] = {}
    for alpha in (0.01, 0.1):
        t = per_face_threshold(tail, n, alpha, floor=verify)
        out["average_linkage_per_face_rule"][f"max_false_link={alpha:g}"] = {"threshold": round(t, 4),
                                                                            **linkage(t)[0]}
    if n >= 10_000:
        (wide, wide_cos), wide_s = timed(knn_graph, vectors, 30, os.cpu_count() or 1)
        labels, seconds = timed(average_linkage, vectors, wide, wide_cos, chosen)
        out["average_linkage_k30"] = {**scores(numbered(labels), truth), "seconds": seconds, "knn_seconds": wide_s}
    out["average_linkage_sweep"] = {f"{t:.2f}": linkage(t)[0] for t in sweep}
    # candidates on the same pruned kNN graph, at the same threshold
    r, c, s = graph_edges(neighbours, cosines, chosen)
    out["knn_components"] = {"threshold": round(chosen, 4), **scores(components(n, r, c), truth)}
    labels, seconds = timed(chinese_whispers, n, r, c, s)
    out["chinese_whispers"] = {"threshold": round(chosen, 4), **scores(labels, truth), "seconds": seconds}
    out["knn_components_sweep"] = {f"{t:.2f}": scores(components(n, *graph_edges(neighbours, cosines, t)[:2]), truth)
                                   for t in sweep}
    # exact baselines
    floor = min([verify, *sweep])
    (rows, cols, sims), pair_s = timed(pairs_above, vectors, floor)
    out["exact_pairs_seconds"] = pair_s

    def at(t: float):
        keep = sims >= t
        return rows[keep], cols[keep], sims[keep]

    labels, seconds = timed(components, n, *at(verify)[:2])
    out["baseline_components_at_verify"] = {"threshold": round(verify, 4), **scores(labels, truth),
                                            "seconds": round(seconds + pair_s, 3)}
    out["baseline_components_sweep"] = {f"{t:.2f}": scores(components(n, *at(t)[:2]), truth) for t in sweep}
    for min_samples in (5, 2):
        labels, seconds = timed(dbscan, n, *at(verify), min_samples)
        out[f"baseline_dbscan_min{min_samples}"] = {"eps": round(1 - verify, 4), "min_samples": min_samples,
                                                    **scores(labels, truth), "seconds": round(seconds + pair_s, 3)}
        out[f"baseline_dbscan_min{min_samples}_sweep"] = {
            f"eps={1 - t:.2f}": scores(dbscan(n, *at(t), min_samples), truth) for t in sweep}
    for name in ("average_linkage", "knn_components", "baseline_components", "baseline_dbscan_min5",
                 "baseline_dbscan_min2"):
        table = out[f"{name}_sweep"]
        best = max(table, key=lambda key: table[key]["bcubed_f"])
        out.setdefault("best_over_sweep", {})[name] = {"at": best, "bcubed_f": table[best]["bcubed_f"],
                                                       "pairwise_f": table[best]["pairwise_f"]}
    return out


def summary_row(result: dict) -> dict:
    row = {"faces": result["faces"], "seed": result.get("seed"), "threshold": result["service_threshold"],
           "seconds_with_knn": result["average_linkage"]["seconds_with_knn"]}
    for name in ("average_linkage", "knn_components", "chinese_whispers", "baseline_components_at_verify",
                 "baseline_dbscan_min5", "baseline_dbscan_min2"):
        row[name] = {"bcubed_f": result[name]["bcubed_f"], "pairwise_f": result[name]["pairwise_f"]}
    row["best_over_sweep"] = result["best_over_sweep"]
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 0], help="0: all faces")
    parser.add_argument("--seeds", type=int, default=3, help="random subsets per size below all")
    parser.add_argument("--k", type=int, default=DEFAULT_K)
    parser.add_argument("--output", type=Path)
    parser.add_argument("--reuse-bench-embeddings", action="store_true",
                        help="use bench/embeddings.py's cache, checked against the pipeline on 256 faces")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    state = _state()
    check = None
    if args.reuse_bench_embeddings:
        vectors, truth, files, check = bench_cache_embeddings(state)
        embed_seconds = float("nan")
        log.info("cached vs pipeline: %s", check)
    else:
        vectors, truth, files, embed_seconds = lfw_embeddings(state)
    tail = state.contract.impostor_tail
    verify = state.verify_threshold
    sweep = [round(x, 2) for x in np.arange(0.30, 0.62, 0.02)]
    runs = []
    for size in args.sizes:
        for seed in range(args.seeds if 0 < size < len(vectors) else 1):
            if 0 < size < len(vectors):
                pick = np.sort(np.random.default_rng(seed).choice(len(vectors), size, replace=False))
            else:
                pick = np.arange(len(vectors))
            log.info("size %d seed %d", len(pick), seed)
            result = evaluate(vectors[pick], truth[pick], tail, verify, sweep, args.k)
            result["seed"] = seed if len(pick) < len(vectors) else None
            runs.append(result)
            log.info("%s", summary_row(result))
    payload = {
        "benchmark": "cluster_lfw", "machine": machine(), "commit": current_commit(),
        "load_average_at_end": os.getloadavg(),
        "note": "2 CPU cores shared with other engineers' work (load average 15-21): times are indicative. "
                "A full run of all 13,233 faces through the CLI's path was stopped by its 15-minute timeout at "
                "5,000 faces (~5.5 faces/s at that load), so this run reuses bench/embeddings.py's cache of "
                "the same model on the same crops, checked against the CLI's path on 256 faces (cache_check)",
        "config": {"data": str(LFW.name), "faces": len(vectors), "people": int(len(np.unique(truth))),
                   "model_id": state.contract.model_id, "verify_threshold": verify, "k": args.k,
                   "embed_path": ("bench/embeddings.py cache (PIL decode -> model.execute), checked against "
                                  "service.cli.cluster.embed_tree" if check else
                                  "service.cli.cluster.embed_tree (decode -> served model, in process)"),
                   "cache_check": check,
                   "embed_seconds_all_faces": round(embed_seconds, 1), "subsets": "random faces, seeds 0..2",
                   "service_rule": f"average linkage over the kNN graph (k={args.k}), threshold = the impostor "
                                   f"tail's cosine at FAR {DEFAULT_FALSE_MERGE:g} (at least the 1:1 threshold)",
                   "sweep": sweep},
        "summary": [summary_row(r) for r in runs],
        "runs": runs,
    }
    path = save("cluster_lfw", payload, args.output)
    log.info("wrote %s", path)


if __name__ == "__main__":
    main()
