"""faceclient's bulk helpers against hand-written httpx code and a one-request-per-photo loop.

One server (this checkout, embedded gallery, no key). Images: ``--data lfw-250`` (default, issue 24's
sizes): the 1,000 unaligned LFW originals of ../shared/data/lfw-250-subset (500 people x 2 photos; the
service detects and aligns each face), or ``--data lfw-112``: LFW's aligned crops. The people folder is a
tree of symlinks in a temp dir (nothing is copied). Per round, interleaved so that load from elsewhere hits
every variant alike (each round starts at another variant):

* **enroll** ``--people`` folders into a fresh collection per variant: ``FaceClient.enroll_folder`` (its
  defaults: multipart, concurrency 4, checks each person first so it is resumable), the best hand-written
  httpx (threads, one multipart request per person, the same concurrency, the same skip of a refused file),
  and a plain loop of one base64 JSON request per photo (as people write it by hand);
* **identify** ``--photos`` probes: ``FaceClient.identify_many`` (multipart, batch 16, concurrency 4), the
  same with ``transport="json"`` (base64: what multipart saves), hand-written httpx with the same batches,
  concurrency and transport, and a loop of one base64 JSON request per photo.

Figures: faces per second, median over rounds; the client's ratio to the hand-written code, the median of
the per-round ratios (a shared machine's load swings between rounds).

    nice -n 10 python -m bench.client_bulk --people 500 --photos 1000 --rounds 3 --output bench/results/client_bulk_issue24.json

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
from typing import Any

import httpx
from faceclient import FaceClient

from bench.common import current_commit, machine, save
from harness.server import MODEL_CACHE, REPO, ServerProcess

DATA = {"lfw-250": REPO.parent / "shared" / "data" / "lfw-250-subset" / "images",
        "lfw-112": REPO.parent / "shared" / "data" / "lfw-112" / "images"}
BATCH, CONCURRENCY = 16, 4


def people(root: Path, n: int, per_person: int) -> list[tuple[str, list[Path]]]:
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        images = sorted(folder.glob("*.jpg"))
        if len(images) >= 2:
            found.append((folder.name, images[:per_person]))
        if len(found) == n:
            break
    return found


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def form(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]


def timed(work: Callable[[], int]) -> float:
    started = time.perf_counter()
    faces = work()
    return faces / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=sorted(DATA), default="lfw-250")
    parser.add_argument("--people", type=int, default=500)
    parser.add_argument("--photos", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", help="run only the variants whose names start with this (enroll, identify)")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    load_before = os.getloadavg()

    from service.model.prepare import default_model

    folks = people(DATA[args.data], args.people, 4)
    probes = [p for _, images in people(DATA[args.data], args.photos, 2) for p in images][:args.photos]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "people"
        for identity, images in folks:
            (root / identity).mkdir(parents=True)
            for image in images:
                os.symlink(image, root / identity / image.name)
        proc = ServerProcess(Path(tmp) / "data", model=default_model(MODEL_CACHE), env={"FACE_ENROLL_HUB_ALPHA": "0"})
        try:
            proc.wait_ready()
            face = FaceClient(proc.url, retry_budget_s=300, timeout=300)
            face_json = FaceClient(proc.url, retry_budget_s=300, timeout=300, transport="json")
            http = httpx.Client(base_url=proc.url, timeout=300, limits=httpx.Limits(max_keepalive_connections=32))
            rates: dict[str, list[float]] = {}
            counter = iter(range(10**6))

            def collection() -> str:
                name = f"b{next(counter)}"
                face.create_collection(name)
                return name

            def enroll_hand() -> int:
                """One multipart request per person, CONCURRENCY threads; a refused file (422 with its index)
                is dropped and the rest sent again, as enroll_folder does."""
                name = collection()

                def one(person: tuple[str, list[Path]]) -> int:
                    files = list(person[1])
                    while files:
                        r = http.post(f"/collections/{name}/enroll", files=form(files),
                                      data={"identity_id": person[0], "image_type": "auto"})
                        if r.status_code != 422:
                            r.raise_for_status()
                            return len(r.json()["face_ids"])
                        index = (r.json()["error"].get("details") or {}).get("index")
                        files.pop(index if isinstance(index, int) and index < len(files) else 0)
                    return 0

                with ThreadPoolExecutor(CONCURRENCY) as pool:
                    return sum(pool.map(one, folks))

            def enroll_loop() -> int:
                name, faces = collection(), 0
                for identity, images in folks:
                    for image in images:
                        r = http.post(f"/collections/{name}/enroll", json={"identity_id": identity, "image_type": "auto",
                                                                           "images": [b64(image)]})
                        faces += r.status_code == 200
                return faces

            def identify_hand(body: Callable[[list[Path]], dict[str, Any]]) -> int:
                """Batches of BATCH, CONCURRENCY threads; a refused batch is sent again one photo at a time,
                as identify_many does."""
                def one(batch: list[Path]) -> int:
                    r = http.post("/identify", **body(batch))
                    if r.status_code == 422:
                        return sum(http.post("/identify", **body([p])).status_code == 200 for p in batch)
                    r.raise_for_status()
                    return len(r.json()["results"])

                with ThreadPoolExecutor(CONCURRENCY) as pool:
                    return sum(pool.map(one, [probes[i:i + BATCH] for i in range(0, len(probes), BATCH)]))

            def identify_loop() -> int:
                return sum(http.post("/identify", json={"images": [b64(p)], "image_type": "auto"}).status_code == 200
                           for p in probes)

            def identified(results: list[Any]) -> int:
                return sum(r.error is None for r in results)

            variants: dict[str, Callable[[], int]] = {
                "enroll_folder": lambda: face.enroll_folder(root, concurrency=CONCURRENCY, progress=False,
                                                            collection=collection()).faces,
                "enroll_folder_replace": lambda: face.enroll_folder(root, concurrency=CONCURRENCY, progress=False,
                                                                    replace=True, collection=collection()).faces,
                "enroll_httpx_threads": enroll_hand,
                "enroll_loop": enroll_loop,
                "identify_many": lambda: identified(face.identify_many(
                    probes, batch_size=BATCH, concurrency=CONCURRENCY, progress=False)),
                "identify_many_json": lambda: identified(face_json.identify_many(
                    probes, batch_size=BATCH, concurrency=CONCURRENCY, progress=False)),
                "identify_httpx_batched": lambda: identify_hand(lambda b: {"files": form(b), "data": {"image_type": "auto"}}),
                "identify_httpx_batched_json": lambda: identify_hand(
                    lambda b: {"json": {"images": [b64(p) for p in b], "image_type": "auto"}}),
                "identify_loop": identify_loop,
            }
            gallery = face.enroll_folder(root, concurrency=CONCURRENCY, progress=False)  # what the probes search
            print(f"gallery: {gallery.enrolled} of {gallery.people} people, {gallery.faces} faces, "
                  f"{gallery.skipped_files} files skipped", flush=True)
            names = [name for name in variants if name.startswith(args.only or "")]
            for n in range(args.rounds):  # each round starts at another variant: no position favoured
                for name in names[n % len(names):] + names[:n % len(names)]:
                    rates.setdefault(name, []).append(timed(variants[name]))
                    print(f"round {n} {name}: {rates[name][-1]:.1f} faces/s, load {os.getloadavg()[0]:.2f}",
                          flush=True)
                results(args, rates, n + 1, folks, probes, gallery, load_before)
        finally:
            proc.stop()


def results(args: argparse.Namespace, rates: dict[str, list[float]], rounds: int, folks: list[Any], probes: list[Path],
            gallery: Any, load_before: tuple[float, float, float]) -> None:
    """Save what the rounds so far measured (after each round: a long run stopped early keeps its rounds)."""
    median = {name: round(statistics.median(r), 1) for name, r in rates.items()}

    def ratio(a: str, b: str) -> float:  # the median of the per-round ratios (load swings between rounds)
        return round(statistics.median(x / y for x, y in zip(rates[a], rates[b], strict=True)), 3)

    payload = {
        "benchmark": "client_bulk", "machine": machine(), "commit": current_commit(),
        "config": {
            "data": args.data, "images": str(DATA[args.data].relative_to(REPO.parent)), "image_type": "auto",
            "people": len(folks), "faces_offered": sum(len(i) for _, i in folks), "photos": len(probes),
            "rounds": rounds, "rounds_asked": args.rounds, "variants": args.only or "all", "batch": BATCH, "concurrency": CONCURRENCY,
            "gallery_for_identify": {"people": gallery.enrolled, "faces": gallery.faces}, "niced": os.nice(0)},
        "faces_per_s_median": median, "faces_per_s_rounds": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        "ratios_median_of_rounds": {f"{a}_vs_{b}": ratio(a, b) for a, b in [
            ("enroll_folder", "enroll_httpx_threads"), ("enroll_folder_replace", "enroll_httpx_threads"),
            ("enroll_folder", "enroll_loop"), ("identify_many", "identify_httpx_batched"),
            ("identify_many_json", "identify_httpx_batched_json"), ("identify_many", "identify_many_json"),
            ("identify_many", "identify_loop")] if a in rates and b in rates},
        "load_average_before_after": [load_before, os.getloadavg()],
    }
    print(median, payload["ratios_median_of_rounds"], "load", payload["load_average_before_after"])
    print("saved", save("client_bulk", payload, args.output))


if __name__ == "__main__":
    main()
