"""Do writes stall while the embedded gallery compacts its graph or writes a snapshot?

A gallery of ``--faces`` synthetic faces (2 per identity, 128-d; the store filled by
bench.gallery_fill, the index built once and snapshotted in ``WORKDIR/base_N``, reused by later
runs), copied per variant, opened from its snapshot; ``--delete-identities`` identities deleted (the
tombstones that make the compaction due). Then, while one thread enrolls one new face at a time
through ``Gallery.enroll`` (in-process, the path every HTTP enroll takes; ``--rate`` per second,
back to back when an enroll is late), the main thread runs

1. idle (``--idle-s``): the enroll latency with nothing else going on;
2. one maintenance round, ``Gallery.maintain()``: the compaction;
3. ``Gallery.snapshot()``: the snapshot (its own phase: the snapshot is held off in round 2);

and ``--readers`` threads identify meanwhile (``Gallery.search``, top 5, ``--reader-rate`` each per
second). The script reports, per phase, enroll latency p50/p99/max and the slowest enrolls with their
start times, the longest stall (the longest enroll, and the longest gap between two successive
acknowledged enrolls), the identify latency, the phase's duration, the RSS the process
grew by during the snapshot, and the gallery's own log figures (seconds under the write lock, for
the snapshot under the read lock). With ``--baseline REF`` the same runs first against the
``service`` package of ``git archive REF`` (a child process with it first on ``sys.path``), so
before and after come from one run on one machine.

    nice -n 10 python -m bench.write_stalls --faces 200000 --baseline 1df8f80 --workdir /work/bench-stall

Saves bench/results/write_stalls_<faces>.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import current_commit, machine, percentiles, rss_mb, save, unpack
from harness.server import REPO

MODEL_ID = "bench@1"
DIM = 128
log = logging.getLogger("bench.write_stalls")


def options(**extra):
    from service.gallery import GalleryOptions

    # no maintenance thread (the bench runs the rounds itself); snapshots only when asked for
    return GalleryOptions(snapshot_interval_s=0, snapshot_min_changes=10**12, **extra)


def build_base(path: Path, faces: int) -> float:
    """Store filled, index built from it, snapshot written at close. Returns the build seconds."""
    from bench.gallery_fill import fill_store
    from service.gallery import Gallery

    if (path / "index.json").exists():
        return 0.0
    shutil.rmtree(path, ignore_errors=True)
    started = time.perf_counter()
    fill_store(path, MODEL_ID, DIM, faces=faces, per_identity=2)
    gallery = Gallery(path, MODEL_ID, DIM, options=options())
    gallery.open()
    gallery.close()
    return time.perf_counter() - started


class Reader(threading.Thread):
    """Identifies a random probe (top 5) every 1/rate s; records (start, seconds) of each search."""

    def __init__(self, gallery, rate: float, seed: int) -> None:
        super().__init__(name=f"reader{seed}", daemon=True)
        self.gallery, self.interval, self.seed = gallery, 1.0 / rate, seed
        self.done = threading.Event()
        self.records: list[tuple[float, float]] = []

    def run(self) -> None:
        rng = np.random.default_rng(100 + self.seed)
        while not self.done.is_set():
            v = rng.normal(size=(1, DIM)).astype(np.float32)
            started = time.perf_counter()
            self.gallery.search(v / np.linalg.norm(v), 5)
            self.records.append((started, time.perf_counter() - started))
            time.sleep(self.interval)


def longest_gap_ms(records: list, start: float, end: float) -> float | None:
    """The longest time in [start, end) without an acknowledged enroll (between two successive ones)."""
    done = sorted(r[0] + r[1] for r in records if start <= r[0] + r[1] < end)
    if not done:
        return None
    marks = [start, *done]
    return round(max(b - a for a, b in zip(marks, marks[1:])) * 1000, 1)


def reads_stats(readers: list, start: float, end: float) -> dict:
    ms = [r[1] * 1000 for reader in readers for r in reader.records if r[0] < end and r[0] + r[1] >= start]
    return {"searches": len(ms), **percentiles(ms), "max_ms": round(max(ms), 1) if ms else None}


class Enroller(threading.Thread):
    """Enrolls one new identity with one face every 1/rate s (at once when behind); records each."""

    def __init__(self, gallery, rate: float) -> None:
        super().__init__(name="enroller", daemon=True)
        self.gallery, self.interval = gallery, 1.0 / rate
        self.done = threading.Event()
        self.records: list[tuple[float, float, float]] = []  # (start, seconds, rss MB after)

    def run(self) -> None:
        rng = np.random.default_rng(1)
        next_at, i = time.perf_counter(), 0
        while not self.done.is_set():
            v = rng.normal(size=(1, DIM)).astype(np.float32)
            started = time.perf_counter()
            self.gallery.enroll(f"w{i:07d}", v / np.linalg.norm(v))
            self.records.append((started, time.perf_counter() - started, rss_mb() or 0.0))
            i += 1
            next_at += self.interval
            time.sleep(max(0.0, next_at - time.perf_counter()))
            next_at = max(next_at, time.perf_counter() - self.interval)


def phase_stats(records: list, start: float, end: float) -> dict:
    """Enrolls that started in [start, end) or were in flight at start."""
    rows = [r for r in records if r[0] < end and r[0] + r[1] >= start]
    ms = [r[1] * 1000 for r in rows]
    slowest = sorted(rows, key=lambda r: -r[1])[:5]
    return {"seconds": round(end - start, 3), "enrolls": len(rows), **percentiles(ms),
            "max_ms": round(max(ms), 1) if ms else None, "rss_max_mb": round(max((r[2] for r in rows), default=0), 1),
            "slowest": [{"started_at_s": round(r[0] - start, 3), "ms": round(r[1] * 1000, 1)} for r in slowest]}


class Figures(logging.Handler):
    """The gallery's own log records of a compaction and a snapshot (their extra fields)."""

    FIELDS = ("seconds", "read_lock_seconds", "write_lock_seconds", "replayed_under_write_lock", "tombstones_removed", "live")

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: dict[str, dict] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() in ("index compacted", "index snapshot written"):
            self.records[record.getMessage()] = {k: getattr(record, k) for k in self.FIELDS if hasattr(record, k)}


def measure(data_dir: Path, rate: float, delete_identities: int, idle_s: float, readers: int = 0,
            reader_rate: float = 20.0) -> dict:
    """One variant, in this process (its ``service`` is whichever is first on sys.path)."""
    import service
    from service.gallery import Gallery

    figures = Figures()
    gallery_log = logging.getLogger("service.gallery.embedded.gallery")
    gallery_log.addHandler(figures)
    gallery_log.setLevel(logging.INFO)
    gallery = Gallery(data_dir, MODEL_ID, DIM, options=options(compact_min_tombstones=1, compact_tombstone_ratio=0.0))
    started = time.perf_counter()
    gallery.open()
    open_s = time.perf_counter() - started
    faces = gallery.face_count
    for i in range(delete_identities):
        gallery.delete(f"syn{i:08d}")
    enroller = Enroller(gallery, rate)
    searchers = [Reader(gallery, reader_rate, i) for i in range(readers)]
    marks = {"idle": time.perf_counter()}
    enroller.start()
    for reader in searchers:
        reader.start()
    time.sleep(idle_s)
    marks["compaction"] = time.perf_counter()
    tombstones = gallery.stats()["index_tombstones"]
    gallery.maintain()
    marks["gap"] = time.perf_counter()
    compacted = gallery.stats()
    time.sleep(1.0)
    marks["snapshot"] = time.perf_counter()
    rss_before_snapshot = rss_mb() or 0.0
    wrote = gallery.snapshot()
    marks["tail"] = time.perf_counter()
    time.sleep(1.0)
    enroller.done.set()
    enroller.join()
    for reader in searchers:
        reader.done.set()
        reader.join()
    end = time.perf_counter()
    gallery.close()
    names = list(marks)
    phases = {}
    for i, name in enumerate(names):
        until = marks[names[i + 1]] if i + 1 < len(names) else end
        phases[name] = {**phase_stats(enroller.records, marks[name], until),
                        "longest_gap_ms": longest_gap_ms(enroller.records, marks[name], until),
                        "identify": reads_stats(searchers, marks[name], until)}
    busy = {**phase_stats(enroller.records, marks["compaction"], marks["tail"]),
            "longest_gap_ms": longest_gap_ms(enroller.records, marks["compaction"], marks["tail"]),
            "identify": reads_stats(searchers, marks["compaction"], marks["tail"])}
    return {"service": str(Path(service.__file__).parent), "faces": faces, "open_seconds": round(open_s, 2),
            "deleted_faces": 2 * delete_identities, "tombstones_before": tombstones,
            "after_compaction": {k: compacted[k] for k in ("index_live", "index_tombstones", "index_capacity")},
            "snapshot_written": wrote, "phases": phases,
            "during_compaction_and_snapshot": busy, "longest_stall_ms": busy["max_ms"],
            "longest_gap_between_enrolls_ms": busy["longest_gap_ms"],
            "snapshot_rss_growth_mb": round(phases["snapshot"]["rss_max_mb"] - rss_before_snapshot, 1),
            "peak_rss_mb": rss_mb(field="VmHWM"), "gallery_log": figures.records}


class Ticker(threading.Thread):
    """Wakes every ms: the longest gap between wake-ups is the longest time another thread kept the GIL."""

    def __init__(self) -> None:
        super().__init__(name="ticker", daemon=True)
        self.done, self.longest = threading.Event(), 0.0

    def run(self) -> None:
        last = time.perf_counter()
        while not self.done.is_set():
            time.sleep(0.001)
            now = time.perf_counter()
            self.longest, last = max(self.longest, now - last), now

    def stop(self) -> float:
        self.done.set()
        self.join()
        return round(self.longest * 1000, 1)


def timed(action) -> dict:
    ticker = Ticker()
    ticker.start()
    rss = rss_mb() or 0.0
    started = time.perf_counter()
    value = action()
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 3), "longest_gil_hold_ms": ticker.stop(),
            "rss_growth_mb": round((rss_mb() or 0.0) - rss, 1), "value": value}


def graph_copy(faces: int, work: Path) -> dict:
    """What a snapshot holds the lock for at ``faces`` elements, without building such a graph: a
    small real graph (2000 faces) tiled to ``faces`` elements (labels 0..faces-1, same levels and
    links) and loaded into hnswlib through its pickle state; a save costs what the sizes say,
    whatever the links point to. Before: ``save_index`` (under the read lock, holding the GIL);
    after: the fork (under the read lock) and the wait for the child (no lock)."""
    import hnswlib

    from service.gallery.embedded.index import HnswIndex

    small = HnswIndex(DIM, 16, 200, 64)
    small.build_empty(2000)
    small.add(np.random.default_rng(0).normal(size=(2000, DIM)).astype(np.float32), np.arange(2000))
    state = small._live_index.__getstate__()[0]  # noqa: SLF001
    capacity, per_element, label_at = int(faces * 1.25), state["size_data_per_element"], state["label_offset"]
    level0 = np.zeros(capacity * per_element, np.int8)
    rows = level0.reshape(capacity, per_element)
    rows[:faces] = np.resize(state["data_level0"][:2000 * per_element].reshape(2000, per_element), (faces, per_element))
    rows[:faces, label_at:label_at + 8] = np.arange(faces, dtype=np.int64)[:, None].view(np.int8)
    levels = np.zeros(capacity, np.int32)  # upper levels as in the small graph, repeated
    levels[:faces] = np.resize(state["element_levels"][:2000], faces)
    links = np.tile(state["link_lists"], faces // 2000 + 1)[:int(levels.sum()) * state["size_links_per_element"]]
    index = hnswlib.Index.__new__(hnswlib.Index)
    index.__setstate__(({**state, "max_elements": capacity, "cur_element_count": faces, "data_level0": level0,
                         "element_levels": levels, "link_lists": links,
                         "label_lookup_external": np.arange(faces, dtype=np.uint64),
                         "label_lookup_internal": np.arange(faces, dtype=np.uint32)},))
    del level0, rows, levels, links
    wrapper = HnswIndex(DIM, 16, 200, 64)
    wrapper._index = index  # noqa: SLF001 - the synthetic graph behind the service's own wrapper
    path = work / "graph_copy.bin"
    out = {"faces": faces, "file_bytes": 0, "before_save_index_under_lock": timed(lambda: wrapper.save(path))}
    out["file_bytes"] = path.stat().st_size
    path.unlink()
    forked = timed(lambda: wrapper.save_in_background(path))
    saving = forked.pop("value")
    out["after_fork_under_lock"] = forked
    out["after_child_writes_without_lock"] = timed(lambda: saving.wait(900))
    for row in out.values():
        if isinstance(row, dict):
            row.pop("value", None)
    path.unlink()
    log.warning("graph of %d: %s", faces, out)
    return out


def run_variant(name: str, source: Path | None, base: Path, work: Path, args) -> dict:
    """``measure`` in a child process on a copy of the base gallery, ``source``'s service first on sys.path."""
    data_dir = work / f"run_{name}"
    shutil.rmtree(data_dir, ignore_errors=True)
    shutil.copytree(base, data_dir, ignore=shutil.ignore_patterns("lock"))
    paths = [str(source)] if source else []
    # bench.write_stalls imports no ``service`` module itself: measure() imports the one first on sys.path
    code = (f"import sys, json; from bench.write_stalls import measure; sys.path[:0] = {paths!r}; "
            f"print(json.dumps(measure({str(data_dir)!r}, {args.rate}, {args.delete_identities}, {args.idle_s}, "
            f"{args.readers}, {args.reader_rate})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, stdout=subprocess.PIPE, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    shutil.rmtree(data_dir, ignore_errors=True)
    busy = result["during_compaction_and_snapshot"]
    log.warning("%s: compaction %.1fs, snapshot %.2fs, enrolls p50 %.1f p99 %.1f max %.1f ms, longest gap %s ms, "
                "snapshot RSS +%.0f MB", name, result["phases"]["compaction"]["seconds"],
                result["phases"]["snapshot"]["seconds"], busy["p50_ms"], busy["p99_ms"], busy["max_ms"],
                busy["longest_gap_ms"], result["snapshot_rss_growth_mb"])
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=int, default=100_000)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "face-bench-write-stalls",
                        help="keeps the base gallery between runs")
    parser.add_argument("--baseline", help="git ref to measure first (e.g. 1df8f80, before this change)")
    parser.add_argument("--rate", type=float, default=20.0, help="enrolls per second")
    parser.add_argument("--delete-identities", type=int, default=250, help="deleted before the compaction")
    parser.add_argument("--idle-s", type=float, default=3.0)
    parser.add_argument("--readers", type=int, default=2, help="identify threads beside the enroller")
    parser.add_argument("--reader-rate", type=float, default=20.0, help="searches per second per reader")
    parser.add_argument("--graph-copy-faces", type=int, nargs="*", default=[],
                        help="also time the lock-held part of a snapshot on synthetic graphs of these sizes")
    parser.add_argument("--skip-stalls", action="store_true", help="only the --graph-copy-faces part")
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)

    args.workdir.mkdir(parents=True, exist_ok=True)
    result: dict = {"machine": machine(), "load_average_start": os.getloadavg(),
                    "config": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                               "dim": DIM, "current": current_commit()}}
    if args.graph_copy_faces:
        result["graph_copy"] = [graph_copy(n, args.workdir) for n in args.graph_copy_faces]
    if args.skip_stalls:
        print(save(f"write_stalls_graph_copy{args.tag}", result))
        return
    base = args.workdir / f"base_{args.faces}"
    result["config"]["base_build_seconds"] = round(build_base(base, args.faces), 1)
    if args.baseline:
        source = args.workdir / "baseline"
        shutil.rmtree(source, ignore_errors=True)
        source.mkdir()
        result["config"]["baseline_commit"] = unpack(args.baseline, source)
        result["before"] = run_variant("before", source, base, args.workdir, args)
    result["after"] = run_variant("after", None, base, args.workdir, args)
    result["load_average_end"] = os.getloadavg()
    print(json.dumps({k: v for k, v in result.items() if k in ("before", "after")}, indent=1))
    print(save(f"write_stalls_{args.faces}{args.tag}", result))


if __name__ == "__main__":
    main()
