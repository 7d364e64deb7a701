"""How fast the migration job reads its source's crops: one read per face (``get_identity`` then
``face_crop`` for each face: the job before ``identity_crops``) against the batched read it uses now
(``Migration._read``: ``identity_crops`` for a copy batch of identities, then opening each crop).

Per backend (embedded; ``--postgres``: also PostgreSQL from the pgserver wheel, harness/pg.py), a
``keep_crops`` collection of ``--identities`` identities with ``--faces-per-identity`` faces, each
with a sealed crop (a 112x112 PNG of smooth noise), is read ``--rounds`` times both ways, identities
taken ``--batch`` at a time as the copy phase takes them; faces per second of each (crops opened
and checked, not embedded: bench/migration.py measures the whole job).

    nice -n 10 python -m bench.migration_reads [--identities 2000] [--postgres]

Saves bench/results/migration_reads.json (or --output), with the machine and its load averages.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import current_commit, gallery_backends, machine, save
from service.config import Settings
from service.gallery.api import GalleryBackend
from service.gallery.crops import CropCipher, encode_crop, write_key_file
from service.gallery.open import make_gallery
from service.jobs.migrate import Migration, iter_identities
from service.jobs.store import JobRecord

MODEL, DIM = "bench@1", 128


def crop(rng: np.random.Generator) -> bytes:
    small = rng.integers(0, 256, size=(14, 14, 3), dtype=np.uint8)
    return encode_crop(np.kron(small, np.ones((8, 8, 1), dtype=np.uint8)))  # 112x112, compresses like a face


def per_face(gallery: GalleryBackend, cipher: CropCipher, ids: list[str]) -> int:
    faces = 0
    for identity_id in ids:
        details = gallery.get_identity(identity_id)
        assert details is not None
        for face in details.faces:
            blob = gallery.face_crop(face.face_id)
            assert blob is not None
            cipher.open(gallery.name, face.face_id, blob)
            faces += 1
    return faces


def run(backend: str, identities: int, per: int, batch: int, rounds: int, pg_env: dict[str, str] | None) -> dict:
    rng = np.random.default_rng(identities)
    with tempfile.TemporaryDirectory() as tmp:
        key = Path(tmp) / "crop.key"
        write_key_file(key)
        pg = {}
        if pg_env is not None:
            pg = {"database_url": pg_env["FACE_DATABASE_URL"], "database_schema": pg_env["FACE_DATABASE_SCHEMA"]}
        galleries = make_gallery(Settings(data_dir=Path(tmp) / "data", snapshot_interval_s=0, crop_key_file=key,
                                          **pg), MODEL, DIM)
        galleries.open()
        try:
            galleries.create_collection("a", keep_crops=True)
            gallery = galleries.collection("a")
            for i in range(identities):
                vectors = rng.normal(size=(per, DIM)).astype(np.float32)
                gallery.enroll(f"id{i:07d}", vectors / np.linalg.norm(vectors, axis=1, keepdims=True),
                               crops=[crop(rng) for _ in range(per)])
            assert galleries.crop_cipher is not None
            cipher = galleries.crop_cipher
            records = list(iter_identities(gallery))
            job = JobRecord(job_id="bench", collection="a", into="b", model="x", model_id="x@1", source_model_id=MODEL)
            migration = Migration(galleries, job, embed=lambda crops: crops, save=lambda changes: True, compare=False)
            load = os.getloadavg()
            before, after = [], []
            for _ in range(rounds):  # interleaved, so load from elsewhere hits both alike
                began = time.perf_counter()
                faces = sum(per_face(gallery, cipher, [r.identity_id for r in records[s:s + batch]])
                            for s in range(0, len(records), batch))
                before.append(faces / (time.perf_counter() - began))
                began = time.perf_counter()
                faces = sum(sum(len(c) for c in migration._read(gallery, records[s:s + batch]).values())  # noqa: SLF001
                            for s in range(0, len(records), batch))
                after.append(faces / (time.perf_counter() - began))
        finally:
            galleries.close()
    return {"backend": backend, "identities": identities, "faces": identities * per,
            "per_face_reads_faces_per_s": round(statistics.median(before), 1),
            "batched_faces_per_s": round(statistics.median(after), 1),
            "speedup": round(statistics.median(after) / statistics.median(before), 2),
            "rounds": {"per_face": [round(v, 1) for v in before], "batched": [round(v, 1) for v in after]},
            "load_average_before": load, "load_average_after": os.getloadavg()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--identities", type=int, default=2000)
    parser.add_argument("--faces-per-identity", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32, help="identities per read (a copy batch of 64 faces)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--postgres", action="store_true", help="also on PostgreSQL (harness/pg.py)")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    runs = []
    with gallery_backends(args.postgres) as backends:
        for backend, env in backends:
            runs.append(run(backend, args.identities, args.faces_per_identity, args.batch, args.rounds, env))
            r = runs[-1]
            print(f"{backend}: per-face reads {r['per_face_reads_faces_per_s']} faces/s, batched "
                  f"{r['batched_faces_per_s']} faces/s (x{r['speedup']}), load {r['load_average_after'][0]:.2f}",
                  flush=True)
    path = save("migration_reads", {
        "benchmark": "migration_reads", "machine": machine(), "commit": current_commit(),
        "config": {"identities": args.identities, "faces_per_identity": args.faces_per_identity,
                   "batch_identities": args.batch, "rounds": args.rounds,
                   "note": "shared machine (2 cores, other engineers' jobs running): see the load averages"},
        "runs": runs}, args.output)
    print(path)


if __name__ == "__main__":
    main()
