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
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from bench.common import machine, save
from bench.gallery_backends import MODEL_ID, Data, PgServer, build, pg_options
from harness.server import MODEL_CACHE
from service.gallery.ef import AUTO
from service.gallery.embedded.backend import EmbeddedGallery
from service.gallery.embedded.gallery import Gallery
from service.gallery.hygiene.duplicates import comparisons_for, find_duplicates, listing_score
from service.gallery.hygiene.outliers import find_outliers

log = logging.getLogger("bench.hygiene_scale")


def scan(gallery, tail, verify: float) -> dict:
    comparisons = comparisons_for(gallery)
    min_score = listing_score(tail, 0.01, comparisons)
    load = os.getloadavg()
    started = time.perf_counter()
    found = find_duplicates(gallery, tail, min_score, verify, comparisons)
    seconds = time.perf_counter() - started
    started = time.perf_counter()
    outliers = find_outliers(gallery, verify, 100)
    outlier_seconds = time.perf_counter() - started
    out = {"faces": found.faces_scanned, "identities": found.identities_scanned, "min_score": round(min_score, 4),
           "family_comparisons": comparisons, "pairs_listed": len(found.pairs),
           "duplicates_seconds": round(seconds, 1),
           "duplicates_faces_per_s": round(found.faces_scanned / seconds, 1),
           "outliers_seconds": round(outlier_seconds, 1), "outliers_listed": len(outliers.faces),
           "load_average_before": load, "load_average_after": os.getloadavg()}
    log.warning("%s", out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=int, default=100_000)
    parser.add_argument("--workdir", type=Path, required=True, help="persistent: the built galleries (outside the repo)")
    parser.add_argument("--backends", nargs="+", choices=["embedded", "postgres"], default=["embedded", "postgres"])
    parser.add_argument("--import-batch", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="", help="suffix of the result file name")
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
            results["embedded"] = scan(gallery, contract.impostor_tail, contract.threshold)
        finally:
            gallery.close()
    if "postgres" in args.backends:
        from service.gallery.postgres.backend import PostgresGalleries

        server = PgServer(args.workdir / f"pg_{args.faces}")
        try:
            galleries = PostgresGalleries(pg_options(server.url), MODEL_ID, 128)
            galleries.open()
            try:
                results["postgres"] = scan(galleries.collection("default"), contract.impostor_tail, contract.threshold)
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
