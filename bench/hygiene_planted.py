"""Gallery hygiene on LFW with planted errors: precision and recall of GET /duplicates and GET /outliers.

The gallery is all of LFW (lfw-112 aligned crops, embedded once by the served model and cached by
bench.embeddings), enrolled over HTTP into a real server (harness/server.py) as embeddings, twice:

* ``base``: every person under one id, as LFW labels them;
* ``planted``: the same, except ``--duplicates`` people with 4+ photos split in halves under two ids
  (``NAME~a``, ``NAME~b``: a duplicate person), and ``--mislabelled`` photos each filed under another
  person (a person with 3+ photos gives one to a person with 2+ photos: each person plays one part).

Both lists are asked at the service's default settings (limit 1000, to count everything listed).
LFW has errors of its own (the same photo under two names, one person under two spellings, a few
wrong photos): what the scan of ``base`` lists is "LFW's own", and precision is given both raw
(planted / listed) and with LFW's own left out (planted / (listed - LFW's own)). A sweep of
``min_score`` / ``max_false_alarm`` shows where the default sits on the precision-recall curve.

    nice -n 10 python -m bench.hygiene_planted
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from tempfile import TemporaryDirectory

import httpx
import numpy as np

from bench.common import machine, save
from bench.embeddings import embed_dataset
from harness.server import MODEL_CACHE, REPO, ServerProcess

log = logging.getLogger("bench.hygiene_planted")
DATA = REPO.parent / "shared" / "data" / "lfw-112"
CHUNK = 64  # faces per enroll request (FACE_MAX_FACES_PER_REQUEST below)
SWEEP_FLOOR = 0.5  # the lowest listing score of the sweep


def plan(labels: np.ndarray, names: list[str], duplicates: int, mislabelled: int, seed: int) -> dict:
    """Which people are split and which photos are moved (deterministic from the seed)."""
    rng = np.random.default_rng(seed)
    counts = np.bincount(labels, minlength=len(names))
    split = [int(p) for p in rng.choice(np.flatnonzero(counts >= 4), duplicates, replace=False)]
    free = [p for p in rng.permutation(len(names)).tolist() if p not in set(split)]
    givers = [p for p in free if counts[p] >= 3][:mislabelled]
    takers = [p for p in free if counts[p] >= 2 and p not in set(givers)][:mislabelled]
    moved = {}  # face index -> the person it is filed under
    for giver, taker in zip(givers, takers):
        faces = np.flatnonzero(labels == giver)
        moved[int(rng.choice(faces))] = taker
    return {"split": split, "moved": moved}


def identities(labels: np.ndarray, names: list[str], planted: dict | None) -> dict[str, list[int]]:
    out: dict[str, list[int]] = defaultdict(list)
    split = set(planted["split"]) if planted else set()
    moved = planted["moved"] if planted else {}
    for person in range(len(names)):
        faces = np.flatnonzero(labels == person).tolist()
        if person in split:
            half = len(faces) // 2
            out[f"{names[person]}~a"] = faces[:half]
            out[f"{names[person]}~b"] = faces[half:]
            continue
        for face in faces:
            out[names[moved[face]] if face in moved else names[person]].append(face)
    return dict(out)


def enroll_all(client: httpx.Client, collection: str, people: dict[str, list[int]], embeddings: np.ndarray,
               model_id: str) -> dict[int, int]:
    """Every identity over HTTP (embeddings, in chunks); returns face id -> LFW face index."""
    assert client.post("/collections", json={"name": collection}).status_code == 201

    def one(item: tuple[str, list[int]]) -> list[tuple[int, int]]:
        name, faces = item
        pairs = []
        for start in range(0, len(faces), CHUNK):
            part = faces[start:start + CHUNK]
            r = client.post(f"/collections/{collection}/enroll", json={
                "identity_id": name, "embeddings": embeddings[part].tolist(), "model_id": model_id})
            r.raise_for_status()
            pairs += list(zip(r.json()["face_ids"], part))
        return pairs

    with ThreadPoolExecutor(4) as pool:
        return dict(p for pairs in pool.map(one, sorted(people.items())) for p in pairs)


def person(identity: str) -> str:
    return identity.split("~")[0]


def duplicates_score(listed: list[dict], base: set[tuple[str, str]], truth: set[tuple[str, str]],
                     touched: set[str]) -> dict:
    """``touched``: the people planting changed (split, or giving or taking a photo). A listed pair of
    untouched people is LFW's own business (a real duplicate or mislabel of LFW, or a lookalike pair):
    ``precision_planted`` judges only the pairs that involve a touched person."""
    found = [(p["identity_a"], p["identity_b"]) for p in listed]
    hits = [pair for pair in found if pair in truth]
    own = [pair for pair in found if pair not in truth and tuple(sorted(map(person, pair))) in base]
    other = [pair for pair in found if pair not in truth and pair not in own]
    involved = [pair for pair in found if {person(pair[0]), person(pair[1])} & touched]
    return {"listed": len(found), "planted_found": len(hits), "lfw_own": len(own),
            "recall": round(len(hits) / len(truth), 4),
            "precision_raw": round(len(hits) / len(found), 4) if found else None,
            "precision_without_lfw_own": round(len(hits) / (len(found) - len(own)), 4) if len(found) > len(own) else None,
            "listed_involving_planted": len(involved),
            "precision_planted": round(len(hits) / len(involved), 4) if involved else None,
            "false_alarms_involving_planted": [[*p, next(x["score"] for x in listed if (x["identity_a"], x["identity_b"]) == p)]
                                               for p in involved if p not in truth][:20],
            "false_alarms_not_in_base": [list(p) for p in other][:20]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duplicates", type=int, default=50)
    parser.add_argument("--mislabelled", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    from service.model.prepare import default_model

    data = embed_dataset(DATA)
    labels, names = data.labels, data.names
    planted = plan(labels, names, args.duplicates, args.mislabelled, args.seed)
    truth_pairs = {(f"{names[p]}~a", f"{names[p]}~b") for p in planted["split"]}
    truth_faces = {face: names[taker] for face, taker in planted["moved"].items()}
    env = {"FACE_ENROLL_HUB_ALPHA": "0", "FACE_MAX_FACES_PER_IDENTITY": "1000",
           "FACE_MAX_FACES_PER_REQUEST": str(CHUNK)}
    out: dict = {"bench": "hygiene_planted", "machine": machine(), "load_average_before": os.getloadavg(),
                 "config": {"dataset": "lfw-112", "faces": len(labels), "people": len(names),
                            "duplicates_planted": len(truth_pairs), "mislabelled_planted": len(truth_faces),
                            "seed": args.seed, "server_env": env, "settings": "service defaults otherwise",
                            "duplicates_scan_ef": os.environ.get("FACE_DUPLICATES_SCAN_EF", "auto (48 here)")}}
    with TemporaryDirectory() as tmp:
        proc = ServerProcess(Path(tmp) / "data", model=default_model(MODEL_CACHE), env=env)
        try:
            ready = proc.wait_ready()
            with httpx.Client(base_url=proc.url, timeout=1800) as client:
                started = time.perf_counter()
                base_faces = enroll_all(client, "base", identities(labels, names, None), data.embeddings,
                                        ready["model_id"])
                planted_faces = enroll_all(client, "planted", identities(labels, names, planted), data.embeddings,
                                           ready["model_id"])
                out["enroll_seconds"] = round(time.perf_counter() - started, 1)
                log.warning("enrolled %d + %d faces in %.0fs", len(base_faces), len(planted_faces), out["enroll_seconds"])
                touched = {names[p] for p in planted["split"]} | {names[int(labels[f])] for f in planted["moved"]} | \
                    {names[t] for t in planted["moved"].values()}
                out["duplicates"] = measure_duplicates(client, truth_pairs, touched)
                out["outliers"] = measure_outliers(client, truth_faces, base_faces, planted_faces, names, labels)
        finally:
            proc.stop()
    out["load_average_after"] = os.getloadavg()
    log.warning("duplicates default: %s", {k: v for k, v in out["duplicates"]["default"].items() if k != "sweep"})
    log.warning("outliers default: %s", out["outliers"]["default"])
    print(save("hygiene_planted", out, args.output))


def _get(client: httpx.Client, path: str, **params: float) -> dict:
    r = client.get(path, params={"limit": 1000, **params})
    r.raise_for_status()
    return r.json()


def measure_duplicates(client: httpx.Client, truth: set[tuple[str, str]], touched: set[str]) -> dict:
    """The default listing, then one scan of each collection from SWEEP_FLOOR: a pair's score does not
    depend on the listing score, so every point of the sweep is a cut of those lists."""
    default = _get(client, "/collections/planted/duplicates")
    log.warning("duplicates default min_score %.4f, %d pairs in %.0f ms", default["min_score"], len(default["pairs"]),
                default["elapsed_ms"])
    low = _get(client, "/collections/planted/duplicates", min_score=SWEEP_FLOOR)
    base = _get(client, "/collections/base/duplicates", min_score=SWEEP_FLOOR)
    assert len(low["pairs"]) < 1000 and len(base["pairs"]) < 1000, "raise SWEEP_FLOOR: the lists were cut"

    def at(min_score: float, label: str, listed: list[dict] | None = None) -> dict:
        listed = [p for p in low["pairs"] if p["score"] >= min_score] if listed is None else listed
        base_pairs = {(p["identity_a"], p["identity_b"]) for p in base["pairs"] if p["score"] >= min_score}
        return {"params": label, "min_score": round(min_score, 4), **duplicates_score(listed, base_pairs, truth, touched)}

    result = {"default": {**at(default["min_score"], "default", default["pairs"]), "elapsed_ms": default["elapsed_ms"],
                          "faces_scanned": default["faces_scanned"], "comparisons": default["comparisons"],
                          "family_comparisons": default["family_comparisons"],
                          "max_false_alarm": default["max_false_alarm"]}}
    result["default"]["missed_best_scores"] = sorted(
        p["score"] for p in low["pairs"] if (p["identity_a"], p["identity_b"]) in truth and p["score"] < default["min_score"])
    result["planted_not_listed_even_at_floor"] = len(truth - {(p["identity_a"], p["identity_b"]) for p in low["pairs"]})
    from service.gallery.hygiene.duplicates import listing_score
    from service.model.contract import read_contract
    from service.model.prepare import default_model

    tail = read_contract(default_model(MODEL_CACHE)).impostor_tail
    family = default["family_comparisons"]
    result["sweep"] = [at(listing_score(tail, fa, family), f"max_false_alarm={fa}") for fa in (0.01, 0.05, 0.1, 0.2, 0.5)]
    result["sweep"] += [at(score, f"min_score={score}") for score in (0.5, 0.55, 0.6, 0.65, 0.7)]
    for row in result["sweep"]:
        log.warning("duplicates %s: min_score %.3f recall %.3f precision raw %s without LFW's own %s planted %s",
                    row["params"], row["min_score"], row["recall"], row["precision_raw"], row["precision_without_lfw_own"],
                    row["precision_planted"])
    return result


def measure_outliers(client: httpx.Client, truth: dict[int, str], base_faces: dict[int, int],
                     planted_faces: dict[int, int], names: list[str], labels: np.ndarray) -> dict:
    rows = {}
    for params in ({}, {"min_score": 0.25}, {"min_score": 0.35}):
        got = _get(client, "/collections/planted/outliers", **params)
        base = _get(client, "/collections/base/outliers", **params)
        base_own = {base_faces[f["face_id"]] for f in base["faces"]}
        listed = [(planted_faces[f["face_id"]], f) for f in got["faces"]]
        hits = [(face, f) for face, f in listed if truth.get(face) == f["identity_id"]]
        own = [face for face, f in listed if face not in truth and face in base_own]
        named = sum(1 for face, f in hits if f["best_other"] and person(f["best_other"]["identity_id"])
                    == names[labels[face]])
        rows[str(params or "default")] = {
            "threshold": got["threshold"], "listed": len(listed), "planted_found": len(hits), "lfw_own": len(own),
            "recall": round(len(hits) / len(truth), 4),
            "precision_raw": round(len(hits) / len(listed), 4) if listed else None,
            "precision_without_lfw_own": round(len(hits) / (len(listed) - len(own)), 4) if len(listed) > len(own) else None,
            "best_other_is_the_true_person": round(named / len(hits), 4) if hits else None,
            "identities_checked": got["identities_checked"]}
        log.warning("outliers %s: %s", params or "default", rows[str(params or "default")])
    return {"default": rows["default"], "sweep": rows}


if __name__ == "__main__":
    main()
