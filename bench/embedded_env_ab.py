"""The embedded gallery's search under two process environments, in interleaved rounds of one run.

What it was written for: transparent huge pages for hnswlib's graph. glibc (2.35+) puts its mmap'd
allocations, hnswlib's one block of ~1 GB at 1M faces among them, on transparent huge pages when the
process starts with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (the kernel's THP mode ``madvise`` or
``always``); PostgreSQL's shared buffers on huge pages measured 12-15% faster per search
(``bench.pg_settings_ab``). A search is a walk over random parts of that block, as pgvector's is over
its pages.

Each variant is a worker process with its own environment (``NAME:KEY=VALUE,...``; ``NAME:`` alone: this
process's environment) that opens its own copy of the gallery that ``gallery_backends --backends
embedded --phase build`` left (``WORKDIR/embedded_<faces>``; copies ``embedded_<faces>_ab<i>`` made once),
loads it, and searches when told. After a warm-up pass of every probe in each, rounds alternate between
the workers, the order rotating: per round and variant ``--round-probes`` probes (the next slice) at each
ef, one ``EmbeddedGallery.search`` each, timed inside the worker. Reported per variant and ef: pooled
p50/p99, the medians of the per-round p50 and p99, identity recall@1 against exact search; against the
first variant the per-round p50 difference (median, quartiles, rounds faster); each worker's RSS and
AnonHugePages after the run.

    python -m bench.gallery_backends --faces 1000000 --workdir /work/bench-emb1m --backends embedded --phase build
    python -m bench.embedded_env_ab --faces 1000000 --workdir /work/bench-emb1m \\
        --variants plain: thp:GLIBC_TUNABLES=glibc.malloc.hugetlb=1 --ef auto 128 --rounds 30
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import machine, percentiles, save
from bench.gallery_backends import MODEL_ID, Data
from bench.gallery_search import person_id
from harness.server import REPO
from service.gallery.ef import AUTO

log = logging.getLogger("bench.embedded_env_ab")


def proc_status_kb(pid: int | str, fields: tuple[str, ...]) -> dict:
    out = {}
    for path in (f"/proc/{pid}/status", f"/proc/{pid}/smaps_rollup"):
        for line in Path(path).read_text().splitlines():
            key = line.split(":")[0]
            if key in fields and key not in out:
                out[key] = int(line.split()[1])
    return out


def worker(data_dir: Path, probes_file: Path, top_k: int) -> None:
    """Opens the gallery, then answers one JSON command a line on stdin: {"ef", "start", "n"} -> the
    latencies (ms) and top-1 identity ids of probes[start:start+n] at that ef; {"stats": true} -> memory."""
    from service.gallery.embedded.backend import EmbeddedGallery
    from service.gallery.embedded.gallery import Gallery

    probes = np.load(probes_file)
    gallery = EmbeddedGallery(Gallery(data_dir, MODEL_ID, probes.shape[1], ef_search=AUTO))
    gallery.open()
    index = gallery.gallery._index  # noqa: SLF001 - the search-time knob, as gallery_backends sweeps it
    print(json.dumps({"ready": True, "faces": gallery.face_count}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command.get("stats"):
            print(json.dumps(proc_status_kb("self", ("VmRSS", "VmHWM", "AnonHugePages"))), flush=True)
            continue
        index.ef_search, index._ef = command["ef"], 0  # noqa: SLF001
        index._apply_ef()  # noqa: SLF001
        latencies, found = [], []
        n = len(probes)
        for j in range(command["n"]):
            probe = probes[(command["start"] + j) % n][None, :]
            began = time.perf_counter()
            best = gallery.search(probe, top_k)[0]
            latencies.append((time.perf_counter() - began) * 1000)
            found.append(best[0].identity_id if best else None)
        print(json.dumps({"ef_used": index.ef, "latencies": latencies, "found": found}), flush=True)
    gallery.close()


class Worker:
    def __init__(self, name: str, env: dict[str, str], data_dir: Path, probes_file: Path, top_k: int) -> None:
        self.name, self.env = name, env
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.embedded_env_ab", "--worker", "--data-dir", str(data_dir),
             "--probes-file", str(probes_file), "--top-k", str(top_k)],
            cwd=REPO, env={**os.environ, **env}, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready = self._read()

    def _read(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name} exited with {self.proc.wait()}")
        return json.loads(line)

    def ask(self, command: dict) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(60)


def copy_of(workdir: Path, faces: int, i: int) -> Path:
    base = workdir / f"embedded_{faces}"
    if i == 0:
        return base / "data"
    copy = workdir / f"embedded_{faces}_ab{i}"
    if not copy.exists():
        subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(copy)], check=True)
    return copy / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--probes-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--faces", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, help="where gallery_backends --phase build put embedded_<faces>")
    parser.add_argument("--probes", type=int, default=1000)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="the build's")
    parser.add_argument("--variants", nargs="+", default=["plain:", "thp:GLIBC_TUNABLES=glibc.malloc.hugetlb=1"],
                        help="NAME:KEY=VALUE,...; the first is the baseline")
    parser.add_argument("--ef", nargs="+", default=[AUTO, "128"], help="auto or numbers")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--round-probes", type=int, default=200)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    if args.worker:
        worker(args.data_dir, args.probes_file, args.top_k)
        return
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    workdir = args.workdir.resolve()
    data = Data(args.faces, args.probes, args.seed)
    owners = [person_id(int(data.owner[data.exact_face[i]])) for i in range(len(data.probes))]
    efs = [AUTO if ef == AUTO else int(ef) for ef in args.ef]
    variants = [(text.partition(":")[0], dict(item.split("=", 1) for item in text.partition(":")[2].split(",") if item))
                for text in args.variants]
    payload: dict = {"benchmark": "embedded_env_ab", "machine": machine(), "load_average_start": os.getloadavg(),
                     "config": {"faces": len(data.flat), "probes": args.probes, "top_k": args.top_k, "ef": efs,
                                "rounds": args.rounds, "round_probes": args.round_probes, "seed": args.seed,
                                "variants": dict(variants),
                                "thp_mode": Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip(),
                                "data": "synthetic (gallery_backends.Data): identity centres + noise, 2 faces each"}}
    with tempfile.TemporaryDirectory(prefix="face-embedded-ab-") as tmp:
        probes_file = Path(tmp) / "probes.npy"
        np.save(probes_file, data.probes)
        workers: list[Worker] = []
        try:
            for i, (name, env) in enumerate(variants):
                started = time.perf_counter()
                workers.append(Worker(name, env, copy_of(workdir, args.faces, i), probes_file, args.top_k))
                log.warning("%s: open %.1f s, %s", name, time.perf_counter() - started, workers[-1].ready)
            for w in workers:  # warm-up
                w.ask({"ef": max(efs, key=lambda e: 10**9 if e == AUTO else e), "start": 0, "n": len(data.probes)})
            cells = [(w.name, ef) for w in workers for ef in efs]
            rounds: dict = {cell: [] for cell in cells}
            hits: dict = {cell: [0, 0] for cell in cells}
            used: dict = {}
            for r in range(args.rounds):
                start = (r * args.round_probes) % len(data.probes)
                for w in workers[r % len(workers):] + workers[:r % len(workers)]:
                    for ef in efs:
                        answer = w.ask({"ef": ef, "start": start, "n": args.round_probes})
                        used[ef] = answer["ef_used"]
                        rounds[(w.name, ef)].append(answer["latencies"])
                        hits[(w.name, ef)][0] += sum(f == owners[(start + j) % len(owners)]
                                                     for j, f in enumerate(answer["found"]))
                        hits[(w.name, ef)][1] += len(answer["found"])
                log.warning("round %d/%d: %s (load %.2f)", r + 1, args.rounds, "  ".join(
                    f"{name}/{ef} {np.percentile(rounds[(name, ef)][-1], 50):.3f}" for name, ef in cells),
                    os.getloadavg()[0])
            payload["memory_kb"] = {w.name: w.ask({"stats": True}) for w in workers}
        finally:
            for w in workers:
                w.close()
    first = variants[0][0]
    payload["results"] = []
    for name, ef in cells:
        per_round = rounds[(name, ef)]
        p50s = np.asarray([np.percentile(x, 50) for x in per_round])
        row = {"variant": name, "ef": ef, "ef_used": used[ef],
               "recall_at_1_identity": round(hits[(name, ef)][0] / hits[(name, ef)][1], 4),
               **percentiles([v for x in per_round for v in x]),
               "round_p50_median_ms": round(float(np.median(p50s)), 4),
               "round_p99_median_ms": round(float(np.median([np.percentile(x, 99) for x in per_round])), 4)}
        if name != first:
            diff = p50s - np.asarray([np.percentile(x, 50) for x in rounds[(first, ef)]])
            row["vs_" + first] = {"round_p50_diff_median_ms": round(float(np.median(diff)), 4),
                                  "round_p50_diff_quartiles_ms": [round(float(q), 4) for q in np.percentile(diff, [25, 75])],
                                  "rounds_faster": int((diff < 0).sum()), "rounds": len(diff)}
        payload["results"].append(row)
    payload["load_average_end"] = os.getloadavg()
    path = save(f"embedded_env_ab_{len(data.flat)}{args.tag}", payload)
    log.warning("saved %s", path)
    print(json.dumps({"results": payload["results"], "memory_kb": payload["memory_kb"]}, indent=1))


if __name__ == "__main__":
    main()
