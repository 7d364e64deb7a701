"""Identify at scale: latency and recall@1 of the HNSW gallery against exact search.

Builds a gallery of N face vectors (default 100k: 50k identities x 2 faces) whose similarity
structure resembles real embeddings (same-person cosine ~0.6-0.7, different-person ~0), runs probes
of enrolled people through ``Gallery.search`` (index search + grouping by identity, exactly what
/identify does after embedding), and compares with exact brute-force cosine search.

Optionally (--http) it also starts the real server on that gallery and times /identify end to end
with a real face image (decode + embed + search).

    python -m bench.gallery_search [--faces 100000] [--dim 128] [--probes 2000] [--seed 0] [--http]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import machine, percentiles, save
from service.gallery import Gallery


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def synthetic_faces(identities: int, per_identity: int, dim: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Identity centres on the sphere; faces at cosine ~0.8 to their centre (~0.65 to each other)."""
    centres = unit(rng.normal(size=(identities, dim)))
    noise = unit(rng.normal(size=(identities, per_identity, dim)))
    faces = unit(0.8 * centres[:, None, :] + 0.6 * noise)
    return centres, faces


def synthetic_gallery(identities: int, per_identity: int, dim: int, probes: int, rng):
    """Faces (identities x per_identity x dim), their owners (flat), and probes: a probe is a new image
    of an enrolled person, near the centre of that person's faces. Returns (faces, owner, probes)."""
    _, faces = synthetic_faces(identities, per_identity, dim, rng)
    owner = np.repeat(np.arange(identities), per_identity)
    probe_ids = rng.choice(identities, size=probes, replace=False)
    probe_vectors = unit(faces[probe_ids].mean(axis=1) + 0.45 * unit(rng.normal(size=(probes, dim))))
    return faces, owner, probe_vectors


def person_id(i: int) -> str:
    """The identity id synthetic person ``i`` is imported under (the recall checks look it up again)."""
    return f"person-{i:07d}"


def import_gallery(gallery, faces: np.ndarray, chunk: int) -> None:
    """Import every person of ``faces`` (identities x per_identity x dim) into ``gallery`` (embedded or
    postgres: anything with ``import_identities``), ``chunk`` identities per call."""
    for start in range(0, len(faces), chunk):
        gallery.import_identities([(person_id(i), faces[i], None) for i in range(start, min(len(faces), start + chunk))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=int, default=100_000)
    parser.add_argument("--per-identity", type=int, default=2)
    parser.add_argument("--dim", type=int, default=128, help="128 = the default model (SFace)")
    parser.add_argument("--probes", type=int, default=2000)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--ef", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--http", action="store_true", help="also time /identify over HTTP on this gallery")
    parser.add_argument("--seed", type=int, default=0, help="another seed, another synthetic gallery")
    parser.add_argument("--output", type=Path, help="where to write the JSON (default bench/results/gallery_search_<faces>.json)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rng = np.random.default_rng(args.seed)

    identities = args.faces // args.per_identity
    faces, owner, probes = synthetic_gallery(identities, args.per_identity, args.dim, args.probes, rng)
    flat = faces.reshape(-1, args.dim)

    exact_started = time.perf_counter()
    # in chunks of probes: 2,000 probes x 1M faces would be an 8 GB matrix at once
    exact_top1_face = np.concatenate([(chunk @ flat.T).argmax(axis=1) for chunk in np.array_split(probes, max(1, len(probes) // 250))])
    exact_seconds = time.perf_counter() - exact_started

    data_dir = Path(tempfile.mkdtemp(prefix="gallery-bench-"))
    model_id = "sface@2021dec-int8bq" if args.dim == 128 else f"synthetic@{args.dim}"
    gallery = Gallery(data_dir / "data", model_id, args.dim)
    gallery.open()
    started = time.perf_counter()
    import_gallery(gallery, faces, chunk=5000)
    build_seconds = time.perf_counter() - started
    label_of_face = np.arange(1, len(flat) + 1)  # face ids are assigned 1..N in import order

    results = []
    for ef in args.ef:
        gallery._index._index.set_ef(ef)  # noqa: SLF001 - a sweep of the search-time knob
        latencies, face_hits, identity_hits = [], 0, 0
        for i, probe in enumerate(probes):
            t = time.perf_counter()
            best = gallery.search(probe[None, :], args.top_k)[0]
            latencies.append((time.perf_counter() - t) * 1000)
            face_hits += best[0].face_id == label_of_face[exact_top1_face[i]]
            identity_hits += best[0].identity_id == person_id(owner[exact_top1_face[i]])
        t = time.perf_counter()
        gallery.search(probes, args.top_k)
        batch_qps = len(probes) / (time.perf_counter() - t)
        row = {"ef": ef, "recall_at_1_face": face_hits / len(probes),
               "recall_at_1_identity": identity_hits / len(probes),
               "single_probe": percentiles(latencies), "batch_probes_per_s": round(batch_qps, 1)}
        results.append(row)
        print(f"ef={ef:4d} recall@1 face={row['recall_at_1_face']:.4f} identity={row['recall_at_1_identity']:.4f} "
              f"p50={row['single_probe']['p50_ms']:.3f}ms p99={row['single_probe']['p99_ms']:.3f}ms "
              f"batch={batch_qps:.0f}/s")
    gallery._index._ef = 0  # noqa: SLF001 - back to the setting's ef (auto: from the gallery size)
    gallery._index._apply_ef()  # noqa: SLF001
    gallery.close()

    http = None
    if args.http and args.dim == 128:
        http = http_identify(data_dir / "data", args.top_k)
    shutil.rmtree(data_dir, ignore_errors=True)

    payload = {
        "benchmark": "gallery_search", "machine": machine(),
        "config": {"faces": len(flat), "identities": identities, "dim": args.dim, "probes": args.probes,
                   "seed": args.seed, "top_k": args.top_k, "hnsw_m": gallery._index.m,
                   "ef_construction": gallery._index.ef_construction,
                   "data": "synthetic: identity centres + noise, same-person cosine ~0.65"},
        "build_seconds": round(build_seconds, 2),
        "exact_search_ms_per_probe": round(exact_seconds / len(probes) * 1000, 3),
        "hnsw": results, "http_identify": http,
    }
    path = save(f"gallery_search_{len(flat)}", payload, args.output)
    print(f"saved {path}")


def http_identify(data_dir: Path, top_k: int, requests: int = 200) -> dict:
    import httpx

    from harness.fixtures import FACES, b64
    from harness.server import ServerProcess

    face = next(FACES.glob("*.jpg"))
    body = {"images": [b64(face)], "top_k": top_k}
    server = ServerProcess(data_dir, env={"FACE_LOG_LEVEL": "warning"})
    ready = server.wait_ready(timeout=600)
    latencies = []
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for _ in range(20):
            c.post("/identify", json=body)
        for _ in range(requests):
            t = time.perf_counter()
            r = c.post("/identify", json=body)
            latencies.append((time.perf_counter() - t) * 1000)
            assert r.status_code == 200, r.text
    server.stop()
    out = {"gallery_faces": ready["gallery"]["faces"], "requests": requests, **percentiles(latencies)}
    print(f"HTTP /identify over {out['gallery_faces']} faces: p50={out['p50_ms']}ms p99={out['p99_ms']}ms")
    return out


if __name__ == "__main__":
    main()
