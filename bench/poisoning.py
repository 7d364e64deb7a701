"""Gallery poisoning through the real API: stuffing one identity, and hub faces (issue 19, items 2 and 5).

A real server over HTTP (harness/server.py), on both gallery backends (PostgreSQL from harness/pg.py),
fed LFW embeddings made by the service's own model (bench/embeddings.py cache) through /enroll's and
/identify's ``embeddings``. Seeds fixed. One gallery per run:

* 200 LFW people with at least two images: the first enrolled, the second a *genuine* probe; 500
  other people's first images are *stranger* probes (never enrolled).
* Baseline: threshold (the server's, FPIR 1%), genuine probes named correctly, strangers named.
* Hub attack (item 5): an identity holding the 4 spherical k-means centroids of the 200 enrolled
  embeddings, then one holding their plain mean: accepted or refused, strangers it captures (named as
  it), strangers named in all, strangers for which it is the closest candidate. Deleted after.
* Stuffing attack (item 2): one identity stuffed with 10,000 near-duplicates (the mean of the 200
  enrolled faces plus N(0, 0.02) noise per dimension, normalised), 64 per /enroll: faces accepted,
  the threshold and the figures again. Deleted after. ``stuffing_plain_face``: the same around one
  ordinary face (another LFW person), which the hub check has no reason to refuse: what the cap and
  the counted n_eff alone do.
* Genuine enrollments: 1,000 further LFW people enrolled one per request: how many are refused
  (implausible_face; target none), and /enroll latency.

Runs: ``before`` (another source tree, e.g. ``--before 1df8f80``: ``git archive`` of that commit),
``after`` (this checkout, default settings) and ``after_no_hub_no_cap`` (this checkout with
FACE_ENROLL_HUB_ALPHA=0 and a cap above 10,000: the robust n_eff alone, and /enroll latency without
the hub search). The machine is shared: the JSON records the load average.

Offline (cached embeddings, no server): ``hub_null`` is the hub probability of every LFW image
against a gallery of 1,000-4,749 other people (one face each), the distribution a real face's
enrollment draws from; ``chances_vs_faces`` measures, on LFW people with many photos, how a
stranger's chance to reach a score against one identity grows with its faces (what
FACES_COUNTED_PER_IDENTITY caps).

    nice -n 10 python -m bench.poisoning --before 1df8f80     # -> bench/results/poisoning.json
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np

from bench.common import machine, percentiles, save
from bench.embeddings import Embedded, embed_dataset
from bench.open_set import LFW, by_person
from harness.server import REPO, ServerProcess
from service.model.calibration import FACES_COUNTED_PER_IDENTITY, HUB_RANKS, hub_probability
from service.model.prepare import packaged_impostor_tail

log = logging.getLogger(__name__)
BATCH = 64  # faces per request (FACE_MAX_FACES_PER_REQUEST's default)


def kmeans_sphere(x: np.ndarray, k: int, rng: np.random.Generator, rounds: int = 50) -> np.ndarray:
    """Spherical k-means: unit centroids maximising the summed cosine of each point to its centroid."""
    centres = x[rng.choice(len(x), k, replace=False)]
    for _ in range(rounds):
        assign = (x @ centres.T).argmax(axis=1)
        new = np.stack([x[assign == j].sum(axis=0) if np.any(assign == j) else centres[j] for j in range(k)])
        new /= np.linalg.norm(new, axis=1, keepdims=True)
        if np.allclose(new, centres):
            break
        centres = new
    return centres.astype(np.float32)


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


class Protocol:
    """Who is enrolled, who probes, who enrolls later (fixed by the seed)."""

    def __init__(self, data: Embedded, seed: int = 0, gallery: int = 200, strangers: int = 500, genuine: int = 1000):
        rows = by_person(data)
        rng = np.random.default_rng(seed)
        order = rng.permutation(sorted(rows))
        multi = [p for p in order if len(rows[p]) >= 2][:gallery]
        rest = [p for p in order if p not in set(multi)]
        self.people = multi
        self.enrolled = data.embeddings[[rows[p][0] for p in multi]]
        self.genuine = data.embeddings[[rows[p][1] for p in multi]]
        self.strangers = data.embeddings[[rows[p][0] for p in rest[:strangers]]]
        self.later = data.embeddings[[rows[p][0] for p in rest[strangers:strangers + genuine]]]
        self.later_people = rest[strangers:strangers + genuine]
        self.mean = unit(self.enrolled.mean(axis=0))
        self.centroids = kmeans_sphere(self.enrolled, 4, rng)
        noise = rng.normal(scale=0.02, size=(10_000, self.enrolled.shape[1]))
        self.stuffing = unit(self.mean[None, :] + noise)
        # the same stuffing around an ordinary face (a real person not otherwise used): no hub
        plain = data.embeddings[rows[rest[strangers + genuine]][0]]
        self.stuffing_plain = unit(plain[None, :] + noise)


class Client:
    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=300)
        self.model_id = self.http.get("/readyz").json()["model_id"]

    def enroll(self, identity: str, vectors: np.ndarray) -> httpx.Response:
        return self.http.post("/enroll", json={"identity_id": identity, "embeddings": vectors.tolist(),
                                               "model_id": self.model_id})

    def identify(self, probes: np.ndarray) -> tuple[list[dict], float]:
        results, threshold = [], float("nan")
        for start in range(0, len(probes), BATCH):
            r = self.http.post("/identify", json={"embeddings": probes[start:start + BATCH].tolist(),
                                                  "model_id": self.model_id, "top_k": 1})
            r.raise_for_status()
            body = r.json()
            results += body["results"]
            threshold = body["threshold"]
        return results, threshold


def figures(client: Client, p: Protocol, attacker: str | None = None) -> dict:
    genuine, threshold = client.identify(p.genuine)
    strangers, _ = client.identify(p.strangers)
    out = {
        "threshold": round(threshold, 4),
        "genuine_correct": sum(r["identity_id"] == f"lfw-{person}" for r, person in zip(genuine, p.people)),
        "genuine_probes": len(p.genuine),
        "strangers_named": sum(r["known"] for r in strangers),
        "strangers": len(p.strangers),
    }
    if attacker is not None:
        def top(results: list[dict]) -> list[str | None]:
            return [r["candidates"][0]["identity_id"] if r["candidates"] else None for r in results]

        out["strangers_captured"] = sum(r["identity_id"] == attacker for r in strangers)
        out["strangers_closest_to_attacker"] = sum(t == attacker for t in top(strangers))
        # a genuine probe whose top candidate is the attacker lost its own identity (score or search)
        out["genuine_closest_to_attacker"] = sum(t == attacker for t in top(genuine))
    return out


def attack_hub(client: Client, p: Protocol, name: str, faces: np.ndarray) -> dict:
    r = client.enroll(name, faces)
    out: dict = {"status": r.status_code, "faces": len(faces)}
    if r.status_code != 200:
        error = r.json()["error"]
        out["code"] = error["code"]
        out["probability"] = error.get("details", {}).get("probability")
    out |= figures(client, p, attacker=name)
    if r.status_code == 200:
        client.http.delete(f"/identities/{name}")
    return out


def attack_stuffing(client: Client, p: Protocol, faces: np.ndarray) -> dict:
    started, accepted, codes = time.perf_counter(), 0, {}
    for start in range(0, len(faces), BATCH):
        r = client.enroll("stuffer", faces[start:start + BATCH])
        if r.status_code == 200:
            accepted += len(r.json()["face_ids"])
        else:
            code = r.json()["error"]["code"]
            codes[code] = codes.get(code, 0) + 1
    out = {"faces_sent": len(faces), "faces_accepted": accepted, "refusals": codes,
           "seconds": round(time.perf_counter() - started, 1)}
    out |= figures(client, p, attacker="stuffer")
    if accepted:
        client.http.delete("/identities/stuffer")
        time.sleep(3)  # the embedded index compacts the stuffer's tombstones (maintenance tick: 1 s)
    return out


def genuine_enrollments(client: Client, p: Protocol) -> dict:
    refused, times = [], []
    for vector, person in zip(p.later, p.later_people):
        started = time.perf_counter()
        r = client.enroll(f"lfw-{person}", vector[None])
        times.append((time.perf_counter() - started) * 1000)
        if r.status_code != 200:
            refused.append({"person": int(person), "status": r.status_code, "code": r.json()["error"]["code"]})
    return {"enrolled": len(p.later), "refused": len(refused), "refusals": refused[:20], "enroll_ms": percentiles(times)}


def run(label: str, backend: str, p: Protocol, workdir: Path, pg_url: str | None, schema: str | None,
        source: Path | None = None, env: dict[str, str] | None = None) -> dict:
    env = {"FACE_WARMUP": "false", "FACE_LOG_LEVEL": "warning", **(env or {})}
    if backend == "postgres":
        env |= {"FACE_DATABASE_URL": str(pg_url), "FACE_DATABASE_SCHEMA": str(schema)}
    own = Path(tempfile.mkdtemp(dir=workdir, prefix=f"{label}-{backend}-"))  # a fresh gallery per run
    server = ServerProcess(own / "data", env=env, source=source)
    try:
        server.wait_ready()
        client = Client(server.url)
        for person, vector in zip(p.people, p.enrolled):
            client.enroll(f"lfw-{person}", vector[None]).raise_for_status()
        result = {"label": label, "backend": backend, "env": env | {"FACE_DATABASE_URL": "(test server)"},
                  "baseline": figures(client, p)}
        result["hub_4_centroids"] = attack_hub(client, p, "hub4", p.centroids)
        result["hub_mean"] = attack_hub(client, p, "hub-mean", p.mean[None])
        result["stuffing"] = attack_stuffing(client, p, p.stuffing)
        result["stuffing_plain_face"] = attack_stuffing(client, p, p.stuffing_plain)
        result["genuine_enrollments"] = genuine_enrollments(client, p)
        log.info("%s %s: %s", label, backend, {k: v for k, v in result.items() if k != "env"})
        return result
    finally:
        server.stop()


def hub_null(data: Embedded, sizes: tuple[int, ...] = (1000, 4749), seed: int = 1) -> dict:
    """Hub probabilities of real faces: every image of LFW people outside a gallery of N others (one
    face each), as a new enrollment would be judged, and of the attack faces made from that gallery."""
    tail = packaged_impostor_tail()
    rows = by_person(data)
    out = {}
    for n in sizes:
        order = np.random.default_rng(seed).permutation(sorted(rows))
        gallery_people, outside = order[:n], order[n:]
        gallery = data.embeddings[[rows[q][0] for q in gallery_people]]
        probes = data.embeddings[np.concatenate([rows[q] for q in outside])]
        logs = []
        for start in range(0, len(probes), 2048):
            scores = np.sort(probes[start:start + 2048] @ gallery.T, axis=1)[:, ::-1][:, :HUB_RANKS]
            logs += [np.log10(max(hub_probability(tail, row.tolist(), n)[0], 1e-300)) for row in scores]
        arr = np.asarray(logs)
        attack = {}
        for name, faces in (("mean", unit(gallery.mean(axis=0))[None]),
                            ("4_centroids", kmeans_sphere(gallery, 4, np.random.default_rng(seed)))):
            scores = np.sort(faces @ gallery.T, axis=1)[:, ::-1][:, :HUB_RANKS]
            attack[name] = [round(float(np.log10(max(hub_probability(tail, s.tolist(), n)[0], 1e-300))), 1) for s in scores]
        out[str(n)] = {"faces": len(arr), "log10_p_min": round(float(arr.min()), 2),
                       "log10_p_quantiles": {q: round(float(np.quantile(arr, float(q))), 2)
                                             for q in ("0.0001", "0.001", "0.01", "0.5")},
                       "below_1e-4": int((arr < -4).sum()), "below_1e-6": int((arr < -6).sum()),
                       "below_1e-8": int((arr < -8).sum()), "attack_log10_p": attack}
    return out


def chances_vs_faces(data: Embedded, counts: tuple[int, ...] = (1, 2, 5, 10, 20, 40), far: float = 1e-3,
                     min_images: int = 41, seed: int = 2) -> dict:
    """For people with more than 40 images: the share of strangers (every image of people with fewer
    images, at most 2 each) whose best score against f of that person's faces reaches the score an
    impostor pair reaches with probability ``far``, divided by the share for one face: how many
    independent chances f faces are worth."""
    tail = packaged_impostor_tail()
    t = tail.threshold_at(far)
    rows = by_person(data)
    rng = np.random.default_rng(seed)
    big = [q for q in sorted(rows) if len(rows[q]) >= min_images]
    strangers = data.embeddings[np.concatenate([rows[q][:2] for q in sorted(rows) if len(rows[q]) < min_images])]
    rates = {f: [] for f in counts}
    for person in big:
        faces = data.embeddings[rng.permutation(rows[person])]
        scores = strangers @ faces.T  # strangers x faces
        for f in counts:
            rates[f].append(float(np.mean(scores[:, :f].max(axis=1) >= t)))
    one = np.mean(rates[1])
    return {"people": len(big), "strangers": len(strangers), "score": round(t, 4), "far": far,
            "rate": {str(f): round(float(np.mean(r)), 6) for f, r in rates.items()},
            "chances": {str(f): round(float(np.mean(r) / one), 2) for f, r in rates.items()},
            "counted_per_identity": FACES_COUNTED_PER_IDENTITY}


def export_tree(rev: str, into: Path) -> Path:
    """The source of commit ``rev`` (git archive), for a run of the code before a change."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", rev], cwd=REPO, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="a commit to run as 'before' (git archive of it)")
    parser.add_argument("--backends", default="embedded,postgres")
    parser.add_argument("--runs", default="before,after,after_no_hub_no_cap")
    parser.add_argument("--no-offline", action="store_true")
    parser.add_argument("--name", default="poisoning")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    data = embed_dataset(LFW)
    p = Protocol(data)
    report: dict = {"machine": machine(), "load_average_start": os.getloadavg(), "before": args.before,
                    "counted_per_identity": FACES_COUNTED_PER_IDENTITY, "hub_ranks": HUB_RANKS,
                    "protocol": {"gallery": len(p.people), "genuine_probes": len(p.genuine),
                                 "strangers": len(p.strangers), "later_enrollments": len(p.later),
                                 "stuffing_faces": len(p.stuffing), "batch": BATCH}, "runs": []}
    if not args.no_offline:
        report["chances_vs_faces"] = chances_vs_faces(data)
        report["hub_null"] = hub_null(data)
        log.info("offline: %s %s", report["chances_vs_faces"], report["hub_null"])
    runs = {"before": {}, "after": {},
            "after_no_hub_no_cap": {"FACE_ENROLL_HUB_ALPHA": "0", "FACE_MAX_FACES_PER_IDENTITY": "20000"}}
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="poisoning-")))
        pg = None
        if "postgres" in args.backends:
            from harness.pg import PgTestServer

            pg = PgTestServer()
            stack.callback(pg.close)
        for label in args.runs.split(","):
            source = None
            if label == "before":
                if not args.before:
                    continue
                source = export_tree(args.before, workdir / "before-src")
            for backend in args.backends.split(","):
                report["runs"].append(run(label, backend, p, workdir, pg.url if pg else None,
                                          pg.fresh_schema() if pg else None, source, runs[label]))
    report["load_average_end"] = os.getloadavg()
    log.info("wrote %s", save(args.name, report))


if __name__ == "__main__":
    main()
