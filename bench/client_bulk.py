"""faceclient's bulk helpers against hand-written httpx code and a one-request-per-photo loop.

One server (this checkout, embedded gallery, no key) and LFW's aligned 112x112 crops
(../shared/data/lfw-112). Per round, interleaved so that load from elsewhere hits every variant alike:

* **enroll**: ``people`` folders (one sub-folder per person, up to 4 crops each) into a fresh collection
  per variant: ``FaceClient.enroll_folder`` (its default: checks each person first, so resumable),
  the same with ``replace=True`` (no check), the best hand-written httpx (threads, one JSON request
  per person, the same concurrency), and a plain loop (one request per person, sequential);
* **identify**: ``photos`` probes: ``FaceClient.identify_many`` (batch 16, concurrency 4), hand-written
  httpx with the same batches and concurrency, and a loop of one request per photo.

Figures: faces per second, median over rounds; the client's ratio to the hand-written code, the median of
the per-round ratios (a shared machine's load swings between rounds; each round starts at another variant).

    nice -n 10 python -m bench.client_bulk --people 100 --photos 300 --rounds 3

Results: bench/results/client_bulk.json (``--output`` to choose), with the machine and its load average.
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from faceclient import FaceClient

from bench.common import current_commit, machine, save
from harness.server import MODEL_CACHE, REPO, ServerProcess

DATA = REPO.parent / "shared" / "data" / "lfw-112" / "images"
BATCH, CONCURRENCY = 16, 4


def people(n: int) -> list[tuple[str, list[Path]]]:
    found = []
    for folder in sorted(p for p in DATA.iterdir() if p.is_dir()):
        images = sorted(folder.glob("*.jpg"))
        if len(images) >= 2:
            found.append((folder.name, images[:4]))
        if len(found) == n:
            break
    return found


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def timed(work: Callable[[], int]) -> float:
    started = time.perf_counter()
    faces = work()
    return faces / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--people", type=int, default=100)
    parser.add_argument("--photos", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    load_before = os.getloadavg()

    from service.model.prepare import default_model

    folks = people(args.people)
    probes = [p for _, images in people(args.photos) for p in images[:1]][:args.photos]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "people"
        for identity, images in folks:
            (root / identity).mkdir(parents=True)
            for image in images:
                os.symlink(image, root / identity / image.name)
        proc = ServerProcess(Path(tmp) / "data", model=default_model(MODEL_CACHE), env={"FACE_ENROLL_HUB_ALPHA": "0"})
        try:
            proc.wait_ready()
            face = FaceClient(proc.url, retry_budget_s=300)
            http = httpx.Client(base_url=proc.url, timeout=300)
            rates: dict[str, list[float]] = {}
            counter = iter(range(10**6))

            def collection() -> str:
                name = f"b{next(counter)}"
                face.create_collection(name)
                return name

            def enroll_hand(parallel: bool) -> int:
                name = collection()

                def one(person: tuple[str, list[Path]]) -> int:
                    r = http.post(f"/collections/{name}/enroll", json={
                        "identity_id": person[0], "images": [b64(p) for p in person[1]], "image_type": "auto"})
                    if r.status_code == 422:  # e.g. low_quality: skipped, as enroll_folder does
                        return 0
                    r.raise_for_status()
                    return len(r.json()["face_ids"])

                if parallel:
                    with ThreadPoolExecutor(CONCURRENCY) as pool:
                        return sum(pool.map(one, folks))
                return sum(one(person) for person in folks)

            def identify_hand(batched: bool) -> int:
                def one(batch: list[Path]) -> int:
                    r = http.post("/identify", json={"images": [b64(p) for p in batch], "image_type": "auto"})
                    r.raise_for_status()
                    return len(r.json()["results"])

                if not batched:
                    return sum(one([p]) for p in probes)
                with ThreadPoolExecutor(CONCURRENCY) as pool:
                    return sum(pool.map(one, [probes[i:i + BATCH] for i in range(0, len(probes), BATCH)]))

            variants: dict[str, Callable[[], int]] = {
                "enroll_folder": lambda: face.enroll_folder(root, concurrency=CONCURRENCY,
                                                            collection=collection()).faces,
                "enroll_folder_replace": lambda: face.enroll_folder(root, concurrency=CONCURRENCY, replace=True,
                                                                    collection=collection()).faces,
                "enroll_httpx_threads": lambda: enroll_hand(True),
                "enroll_loop": lambda: enroll_hand(False),
                "identify_many": lambda: len(face.identify_many(probes, batch_size=BATCH, concurrency=CONCURRENCY)),
                "identify_httpx_batched": lambda: identify_hand(True),
                "identify_loop": lambda: identify_hand(False),
            }
            refused = face.enroll_folder(root, concurrency=CONCURRENCY).failed  # the default gallery probes search
            print(f"{len(refused)} of {len(folks)} people refused:", sorted({e.code for e in refused.values()}))
            names = list(variants)
            for n in range(args.rounds):  # each round starts at another variant: no position favoured
                for name in names[n % len(names):] + names[:n % len(names)]:
                    rates.setdefault(name, []).append(timed(variants[name]))
        finally:
            proc.stop()

    median = {name: round(statistics.median(r), 1) for name, r in rates.items()}

    def ratio(a: str, b: str) -> float:  # the median of the per-round ratios (load swings between rounds)
        return round(statistics.median(x / y for x, y in zip(rates[a], rates[b], strict=True)), 3)

    payload = {
        "benchmark": "client_bulk", "machine": machine(), "commit": current_commit(),
        "config": {
            "people": len(folks), "faces_offered": sum(len(i) for _, i in folks), "photos": len(probes), "rounds": args.rounds,
            "batch": BATCH, "concurrency": CONCURRENCY, "images": "lfw-112 aligned crops (image_type auto)"},
        "faces_per_s_median": median, "faces_per_s_rounds": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        "ratios_median_of_rounds": {
            "enroll_folder_vs_httpx": ratio("enroll_folder", "enroll_httpx_threads"),
            "enroll_folder_replace_vs_httpx": ratio("enroll_folder_replace", "enroll_httpx_threads"),
            "enroll_folder_vs_loop": ratio("enroll_folder", "enroll_loop"),
            "identify_many_vs_httpx": ratio("identify_many", "identify_httpx_batched"),
            "identify_many_vs_loop": ratio("identify_many", "identify_loop")},
        "load_average_before_after": [load_before, os.getloadavg()],
    }
    print(median, payload["ratios_median_of_rounds"], "load", payload["load_average_before_after"])
    print("saved", save("client_bulk", payload, args.output))


if __name__ == "__main__":
    main()
