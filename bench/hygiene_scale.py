"""Time of a duplicates (and outliers) scan of a large collection, on the embedded and postgres backends.

The galleries are bench.gallery_backends' synthetic ones (identity centres + noise, 2 faces per
identity, 128-d), built by its ``build`` into a persistent work dir (reused when already built):

    nice -n 10 python -m bench.hygiene_scale --faces 100000 --workdir /tmp/hygiene-100k
    nice -n 10 python -m bench.hygiene_scale --faces 1000000 --workdir /work/bench-1m --backends embedded

Each backend is opened in-process and scanned by service.gallery.hygiene at the service's defaults
(the listing score for FACE_DUPLICATES_MAX_FALSE_ALARM 0.01 over the collection's family of
comparisons, from the model contract's impostor tail; the outlier threshold: the model's 1:1 one).
Different synthetic people score ~0 with each other, so nearly nothing is listed: what is measured is
the scan itself (every face's kNN search, the pages of faces by identity). JSON:
bench/results/hygiene_scale_<faces>.json.

**Scan breadth** (``--scan-ef``, FACE_DUPLICATES_SCAN_EF): ``--plant N`` enrolls N single-face
identities ``planted-*`` (kept in the work dir), each at a cosine drawn from [0.55, 0.95] to a random
synthetic face: N duplicate people of known score. Then, for every ef of ``--scan-ef`` (``auto``: the
gallery's own, FACE_HNSW_EF_SEARCH):
* ``--full-scans``: a whole duplicates scan at ``--min-score`` (default 0.6: below the listing score,
  so that more pairs are compared): time, faces/s, the pairs found and their recall against the
  list at the gallery's own ef (the first of the efs, ``auto``, when it is in ``--scan-ef``),
  overall and at or above the service's listing score, and the planted pairs found;
* always (cheap, also at 1M where a full scan per ef costs too much): the planted faces and the
  faces they copy searched as the scan searches them (top 3 other identities), one way and both.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import numpy as np

from bench.common import machine, save
from bench.gallery_backends import MODEL_ID, Data, PgServer, build, pg_options
from bench.gallery_search import person_id, unit
from harness.server import MODEL_CACHE
from service.gallery.ef import AUTO
from service.gallery.embedded.backend import EmbeddedGallery
from service.gallery.embedded.gallery import Gallery
from service.gallery.hygiene.duplicates import (
    SCAN_EF,
    SEARCH_BATCH,
    TOP_K,
    comparisons_for,
    find_duplicates,
    hashed_bands,
    listing_score,
)
from service.gallery.hygiene.outliers import find_outliers

log = logging.getLogger("bench.hygiene_scale")


def scan(gallery, tail, verify: float, method: str = "knn", max_false_alarm: float = 0.01) -> dict:
    comparisons = comparisons_for(gallery)
    min_score = listing_score(tail, max_false_alarm, comparisons)
    load = os.getloadavg()
    started = time.perf_counter()
    found = find_duplicates(gallery, tail, min_score, verify, comparisons, limit=10**9, ef=SCAN_EF, method=method)
    seconds = time.perf_counter() - started
    started = time.perf_counter()
    outliers = find_outliers(gallery, verify, 100)
    outlier_seconds = time.perf_counter() - started
    out = {"method": method, "max_false_alarm": max_false_alarm, "bands": hashed_bands(found.faces_scanned, min_score),
           "scan_ef": SCAN_EF, "faces": found.faces_scanned, "identities": found.identities_scanned, "min_score": round(min_score, 4),
           "family_comparisons": comparisons, "pairs_listed": len(found.pairs),
           "duplicates_seconds": round(seconds, 1),
           "duplicates_faces_per_s": round(found.faces_scanned / seconds, 1),
           "outliers_seconds": round(outlier_seconds, 1), "outliers_listed": len(outliers.faces),
           "load_average_before": load, "load_average_after": os.getloadavg()}
    log.warning("%s", out)
    return out


def planted(data: Data, n: int, seed: int) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """N duplicate people: (their ids, the ids of the people they copy, their faces, the pair scores)."""
    rng = np.random.default_rng(seed + 1)
    people = rng.choice(data.identities, n, replace=False)
    base = data.faces[people, rng.integers(0, data.faces.shape[1], n)]
    cosine = rng.uniform(0.55, 0.95, n)
    noise = rng.normal(size=base.shape)
    noise = unit(noise - (noise * base).sum(axis=1, keepdims=True) * base)
    faces = unit(cosine[:, None] * base + np.sqrt(1 - cosine[:, None] ** 2) * noise)
    scores = np.einsum("nd,nfd->nf", faces, data.faces[people]).max(axis=1)  # the best face pair
    return [f"planted-{i:07d}" for i in range(n)], [person_id(int(p)) for p in people], faces, scores


def plant(gallery, ids: list[str], faces: np.ndarray) -> None:
    if ids and gallery.get_identity(ids[0]) is None:
        for start in range(0, len(ids), 500):
            gallery.import_identities([(ids[i], faces[i:i + 1], None) for i in range(start, min(len(ids), start + 500))])


BANDS = (0.55, 0.7, 0.8, 0.85, 0.9, 0.96)  # pair scores the planted recall is broken down by


def planted_found(gallery, plants, ef: int | None) -> dict:
    """The planted faces and the faces they copy, searched as the scan searches them."""
    ids, copied, faces, scores = plants
    own = gallery.identity_embeddings
    started = time.perf_counter()
    one_way = [copied[i] in {m.identity_id for m in ms} for i, ms in enumerate(gallery.search(faces, TOP_K + 1, ef))]
    back = np.stack([own(c) for c in copied])  # each copied person's faces: does one of them find the plant?
    hits = gallery.search(back.reshape(-1, back.shape[-1]), TOP_K + 1, ef)
    per = back.shape[1]
    other_way = [any(ids[i] in {m.identity_id for m in hits[i * per + j]} for j in range(per)) for i in range(len(ids))]
    seconds = time.perf_counter() - started
    both = np.logical_or(one_way, other_way)
    return {"ef": "auto" if ef is None else ef, "one_way": round(float(np.mean(one_way)), 4),
            "both_ways": round(float(np.mean(both)), 4), "missed_both_ways": int((~both).sum()),
            "both_ways_by_score": {f"{lo}-{hi}": round(float(both[(scores >= lo) & (scores < hi)].mean()), 4)
                                   for lo, hi in zip(BANDS, BANDS[1:]) if ((scores >= lo) & (scores < hi)).any()},
            "searches_per_s": round(len(ids) * (1 + per) / seconds, 1)}


def full_scan(gallery, tail, verify: float, ef: int | None, min_score: float, listing: float, plants,
              method: str = "knn") -> tuple[dict, set, set]:
    comparisons = comparisons_for(gallery)
    load = os.getloadavg()
    started = time.perf_counter()
    found = find_duplicates(gallery, tail, min_score, verify, comparisons, limit=10**9, evidence=1, ef=ef,
                            method=method)
    seconds = time.perf_counter() - started
    pairs = {(p.identity_a, p.identity_b) for p in found.pairs}
    listed = {(p.identity_a, p.identity_b) for p in found.pairs if p.score >= listing}
    ids, copied, _, scores = plants
    expected = {tuple(sorted(pair)) for pair, s in zip(zip(ids, copied), scores) if s >= min_score}
    out = {"method": method, "ef": "auto" if ef is None else ef, "seconds": round(seconds, 1),
           "faces_per_s": round(found.faces_scanned / seconds, 1), "pairs": len(pairs), "pairs_listable": len(listed),
           "planted_found": len(expected & pairs), "planted_at_min_score": len(expected),
           "planted_at_listing_found": len({p for p in expected & pairs if p in listed}),
           "planted_at_listing": len({tuple(sorted(pair)) for pair, s in zip(zip(ids, copied), scores) if s >= listing}),
           "load_average_before": load, "load_average_after": os.getloadavg()}
    log.warning("%s", out)
    return out, pairs, listed


def sweep(gallery, tail, verify: float, efs: list[int | None], plants, min_score: float, full: bool,
          methods: tuple[str, ...] = ("knn",)) -> dict:
    listing = listing_score(tail, 0.01, comparisons_for(gallery))
    out: dict = {"planted": len(plants[0]), "min_score": min_score, "listing_score_0.01": round(listing, 4),
                 "planted_searches": [], "full_scans": []}
    for ef in efs:
        row = planted_found(gallery, plants, ef)
        log.warning("%s", row)
        out["planted_searches"].append(row)
    reference: tuple[set, set] | None = None  # the first full scan's pairs (--scan-ef auto ...: the gallery's ef)
    for method, ef in [(m, ef) for m in methods for ef in (efs if m == "knn" else efs[:1])] if full else []:
        row, pairs, listed = full_scan(gallery, tail, verify, ef, min_score, listing, plants, method)
        if reference is None:
            reference = (pairs, listed)
        else:
            row["recall_vs_first"] = round(len(pairs & reference[0]) / max(1, len(reference[0])), 4)
            row["recall_vs_first_listable"] = round(len(listed & reference[1]) / max(1, len(reference[1])), 4)
        out["full_scans"].append(row)
    return out


def sampled(gallery, efs: list[int | None], n: int) -> list[dict]:
    """The scan's searches (batches of SEARCH_BATCH, top 3 other identities + its own) for the first
    ``n`` faces only: the rate of the part that is ~90% of a scan, where a whole one costs too much."""
    vectors: list[np.ndarray] = []
    for _, _, batch in gallery.iter_faces():
        vectors.append(batch)
        if sum(len(v) for v in vectors) >= n:
            break
    probes = np.concatenate(vectors)[:n]
    rows = []
    for ef in efs:
        load = os.getloadavg()
        started = time.perf_counter()
        for start in range(0, len(probes), SEARCH_BATCH):
            gallery.search(probes[start:start + SEARCH_BATCH], TOP_K + 1, ef)
        seconds = time.perf_counter() - started
        rows.append({"ef": "auto" if ef is None else ef, "faces": len(probes), "seconds": round(seconds, 1),
                     "searches_per_s": round(len(probes) / seconds, 1), "load_average_before": load,
                     "load_average_after": os.getloadavg()})
        log.warning("%s", rows[-1])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=int, default=100_000)
    parser.add_argument("--workdir", type=Path, required=True, help="persistent: the built galleries (outside the repo)")
    parser.add_argument("--backends", nargs="+", choices=["embedded", "postgres"], default=["embedded", "postgres"])
    parser.add_argument("--import-batch", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="", help="suffix of the result file name")
    parser.add_argument("--plant", type=int, default=0, help="duplicate people planted (single-face identities)")
    parser.add_argument("--scan-ef", nargs="*", default=[], help="scan breadths to compare (auto: the gallery's)")
    parser.add_argument("--min-score", type=float, default=0.6, help="listing score of the compared scans")
    parser.add_argument("--full-scans", action="store_true", help="a whole scan per --scan-ef")
    parser.add_argument("--skip-default-scan", action="store_true", help="only the --scan-ef comparison")
    parser.add_argument("--method", nargs="+", choices=["knn", "hashed"], default=["knn"],
                        help="the duplicates join(s) of the scans (FACE_DUPLICATES_SCAN)")
    parser.add_argument("--max-false-alarm", type=float, default=0.01, help="the default scan's listing score")
    parser.add_argument("--sample-faces", type=int, default=0,
                        help="also time the scan's searches alone for this many faces at each --scan-ef")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    args.workdir = args.workdir.resolve()
    from service.model.contract import read_contract
    from service.model.prepare import default_model

    contract = read_contract(default_model(MODEL_CACHE))
    data = Data(args.faces, 1, args.seed)
    missing = [b for b in args.backends
               if not (args.workdir / (f"embedded_{args.faces}" if b == "embedded" else f"pg_{args.faces}")).exists()]
    built = build(argparse.Namespace(**{**vars(args), "backends": missing}), data) if missing else None
    results: dict = {}
    if "embedded" in args.backends:
        gallery = EmbeddedGallery(Gallery(args.workdir / f"embedded_{args.faces}" / "data", MODEL_ID, 128,
                                          ef_search=AUTO))
        gallery.open()
        try:
            if not args.skip_default_scan:
                for method in args.method:
                    results[f"embedded_{method}"] = scan(gallery, contract.impostor_tail, contract.threshold, method,
                                                         args.max_false_alarm)
            if args.sample_faces:
                results["embedded_sampled_searches"] = sampled(
                    gallery, [None if e == "auto" else int(e) for e in args.scan_ef], args.sample_faces)
            if args.scan_ef and args.plant:
                plants = planted(data, args.plant, args.seed)
                plant(gallery, plants[0], plants[2])
                efs = [None if e == "auto" else int(e) for e in args.scan_ef]
                results["embedded_scan_ef"] = sweep(gallery, contract.impostor_tail, contract.threshold, efs,
                                                    plants, args.min_score, args.full_scans, tuple(args.method))
        finally:
            gallery.close()
    if "postgres" in args.backends:
        from service.gallery.postgres.backend import PostgresGalleries

        server = PgServer(args.workdir / f"pg_{args.faces}")
        try:
            galleries = PostgresGalleries(pg_options(server.url), MODEL_ID, 128)
            galleries.open()
            try:
                for method in args.method:
                    results[f"postgres_{method}"] = scan(galleries.collection("default"), contract.impostor_tail,
                                                         contract.threshold, method, args.max_false_alarm)
            finally:
                galleries.close()
        finally:
            server.stop()
    payload = {"benchmark": "hygiene_scale", "machine": machine(),
               "config": {"faces": len(data.flat), "identities": data.identities, "dim": 128, "model": MODEL_ID,
                          "data": "synthetic (bench.gallery_backends): identity centres + noise, 2 faces each",
                          "top_k": 3, "search_batch": 1024, "note": "a machine shared with other engineers: "
                          "see the load averages"},
               "build": built, "results": results}
    path = save(f"hygiene_scale_{len(data.flat)}{args.tag}", payload)
    log.warning("saved %s", path)


if __name__ == "__main__":
    main()
