"""Snapshot integrity, dirty index, erasure and replay, on the Gallery itself (real files, real hnswlib)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from service.gallery import Gallery, GalleryOptions
from tests.gallery.test_gallery import DIM, crash, unit  # unit() makes DIM-wide vectors
from tests.gallery.traces import find_vector, holds_vector


def opened(path, **options) -> Gallery:
    g = Gallery(path, "m@1", DIM, options=GalleryOptions(snapshot_interval_s=0, **options))
    g.open()
    return g


def seeded(path, n=200):
    rng = np.random.default_rng(11)
    vectors = {f"p{i}": unit(rng, 1) for i in range(n)}
    g = opened(path)
    for identity, v in vectors.items():
        g.enroll(identity, v)
    g.close()  # snapshot written
    return vectors


def answers_correctly(g: Gallery, vectors: dict) -> None:
    assert g.stats()["index_live"] == g.stats()["faces"] == len(vectors)
    for identity in list(vectors)[::17]:
        assert g.search(vectors[identity], 1)[0][0].identity_id == identity


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip(path):
    data = bytearray(path.read_bytes())
    for pos in range(40, len(data), 997):  # header fields and links included
        data[pos] ^= 0xFF
    path.write_bytes(bytes(data))


def header_lies(path):
    data = bytearray(path.read_bytes())
    data[16:24] = (10**9).to_bytes(8, "little")  # element count far past the end of the file
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [
    truncate, flip, header_lies,
    lambda p: p.unlink(),
    lambda p: (p.parent / "index.json").write_text("{not json"),
    lambda p: (p.parent / "index.json").write_text(json.dumps({"format": 2, "model_id": "m@1", "dim": DIM})),
    lambda p: (p.parent / "index.json").unlink(),
], ids=["truncated", "flipped-bytes", "header-lies", "missing-file", "garbage-meta", "meta-without-checksum",
        "missing-meta"])
def test_damaged_snapshot_is_rebuilt_from_the_store(tmp_path, damage, caplog):
    vectors = seeded(tmp_path)
    damage(tmp_path / "index.hnsw")
    g = opened(tmp_path)
    answers_correctly(g, vectors)
    g.close()
    g = opened(tmp_path)  # and the snapshot written at close is good again
    answers_correctly(g, vectors)
    g.close()


def test_meta_is_invalidated_while_loading(tmp_path):
    """A snapshot that kills the loader must not be tried again: its meta is gone until the load succeeded."""
    seeded(tmp_path)
    g = Gallery(tmp_path, "m@1", DIM, options=GalleryOptions(snapshot_interval_s=0))
    g.open_store()
    seen = []
    real_load = g._index.load  # noqa: SLF001

    def load_and_look(path, live):
        seen.append((tmp_path / "index.json").exists())
        real_load(path, live)

    g._index.load = load_and_look  # noqa: SLF001 - observe the file state at the moment hnswlib reads
    g.load()
    assert seen == [False] and (tmp_path / "index.json").exists()
    g.close()


def test_failed_index_update_is_never_snapshotted_and_gets_repaired(tmp_path):
    rng = np.random.default_rng(12)
    g = opened(tmp_path)
    g.enroll("a", unit(rng, 1))
    g.snapshot()
    before = json.loads((tmp_path / "index.json").read_text())
    late = unit(rng, 1)
    g._index.fail_next_add = MemoryError("resize failed")  # noqa: SLF001 - the wrapper's own failure path
    g.enroll("late", late)  # committed to the store: acknowledged, durable
    assert g.stats()["index_dirty"] == 1
    assert g.snapshot() is False
    assert json.loads((tmp_path / "index.json").read_text()) == before  # the older snapshot stays the base
    g.maintain()  # repairs from the store
    assert g.stats()["index_dirty"] == 0
    assert g.search(late, 1)[0][0].identity_id == "late"
    crash(g)
    g = opened(tmp_path)
    assert g.search(late, 1)[0][0].identity_id == "late"
    g.close()


def test_dirty_index_at_close_writes_no_snapshot(tmp_path):
    rng = np.random.default_rng(13)
    g = opened(tmp_path)
    g.enroll("a", unit(rng, 1))
    late = unit(rng, 1)
    g._index.fail_next_add = RuntimeError("add failed")  # noqa: SLF001
    g.enroll("late", late)
    g.close()
    assert not (tmp_path / "index.json").exists()
    g = opened(tmp_path)
    assert g.search(late, 1)[0][0].identity_id == "late"
    g.close()


def test_replay_after_crash_uses_snapshot_plus_changes(tmp_path, caplog):
    vectors = seeded(tmp_path, 300)
    rng = np.random.default_rng(14)
    g = opened(tmp_path)
    for i in range(0, 30):
        g.delete(f"p{i}")
        vectors.pop(f"p{i}")
    for i in range(40):
        vectors[f"n{i}"] = unit(rng, 1)
        g.enroll(f"n{i}", vectors[f"n{i}"])
    crash(g)
    with caplog.at_level("INFO", logger="service.gallery.embedded.gallery"):
        g = opened(tmp_path)
    ready = [r for r in caplog.records if r.getMessage() == "gallery index ready"][-1]
    assert (ready.source, ready.replayed_added, ready.replayed_erased) == ("snapshot", 40, 30)
    answers_correctly(g, vectors)
    for i in range(30):
        assert all(m.identity_id != f"p{i}" for m in g.search(unit(rng, 1), 10)[0])
    g.close()


def test_deleted_slots_stay_until_tombstones_are_compacted(tmp_path):
    rng = np.random.default_rng(15)
    g = opened(tmp_path, compact_min_tombstones=50, compact_tombstone_ratio=0.5)
    vectors = {f"x{i}": unit(rng, 1) for i in range(400)}
    for identity, v in vectors.items():
        g.enroll(identity, v)
    for i in range(100):
        g.delete(f"x{i}")
    assert g.stats()["index_tombstones"] == 100
    for i in range(60):
        g.enroll(f"y{i}", unit(rng, 1))
    assert g.stats()["index_tombstones"] == 100 and g._index.count == 460  # noqa: SLF001 - new slots
    for i in range(100, 390):
        g.delete(f"x{i}")
    assert g.stats()["index_tombstones"] == 390
    g.maintain()
    stats = g.stats()
    assert stats["index_tombstones"] == 0 and stats["index_live"] == stats["faces"] == 70
    for i in range(390, 400):
        assert g.search(vectors[f"x{i}"], 1)[0][0].identity_id == f"x{i}"
    g.close()


@pytest.mark.parametrize("ending", ["close", "crash"])
def test_erased_vector_leaves_no_trace_in_any_file(tmp_path, ending):
    rng = np.random.default_rng(16)
    g = opened(tmp_path)
    for i in range(50):
        g.enroll(f"k{i}", unit(rng, 1))
    secret = unit(rng, 2)
    g.enroll("secret", secret)
    g.snapshot()  # the snapshot on disk holds the secret vector ...
    assert find_vector(tmp_path, secret[0])
    g.enroll("more", unit(rng, 1))
    assert g.delete("secret") == 2  # ... until it is erased
    if ending == "close":
        g.close()
    else:
        crash(g)
    for v in secret:
        assert not find_vector(tmp_path, v), find_vector(tmp_path, v)
    g = opened(tmp_path)
    assert all(m.identity_id != "secret" for m in g.search(secret, 5)[0])
    g.close()
    for v in secret:
        assert not find_vector(tmp_path, v)


def test_periodic_snapshot_in_background(tmp_path):
    rng = np.random.default_rng(17)
    g = Gallery(tmp_path, "m@1", DIM, options=GalleryOptions(snapshot_interval_s=0.2))
    g.open()
    g.enroll("a", unit(rng, 1))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (tmp_path / "index.json").exists():
        time.sleep(0.05)
    meta = json.loads((tmp_path / "index.json").read_text())
    assert meta["generation"] == g.stats()["generation"] and meta["faces"] == 1
    g.close()


def test_face_erased_while_a_snapshot_is_written_is_not_in_it(tmp_path):
    """The save holds the lock; checksumming does not: a delete in between must still reach the new file."""
    rng = np.random.default_rng(18)
    g = opened(tmp_path)
    for i in range(30):
        g.enroll(f"k{i}", unit(rng, 1))
    secret = unit(rng, 1)
    g.enroll("secret", secret)
    real_prepare = g._files.prepare  # noqa: SLF001

    def prepare_while_deleting(tmp, meta, dim, *size):
        assert holds_vector(tmp, secret[0])  # saved with the secret in it,
        assert not (tmp_path / "index.hnsw.tmp").exists()  # to a file with no name in the data dir
        assert g.delete("secret") == 1  # a writer gets in between save and install
        return real_prepare(tmp, meta, dim, *size)

    g._files.prepare = prepare_while_deleting  # noqa: SLF001
    assert g.snapshot()
    crash(g)
    assert not find_vector(tmp_path, secret[0])
    g = opened(tmp_path)
    assert all(m.identity_id != "secret" for m in g.search(secret, 5)[0]) and g.stats()["index_live"] == 30
    g.close()


def test_shutdown_during_a_rebuild_cancels_it_and_leaves_the_store_intact(tmp_path, caplog):
    from bench.gallery_fill import fill_store

    fill_store(tmp_path, "m@1", DIM, faces=30_000, per_identity=1)
    g = Gallery(tmp_path, "m@1", DIM, options=GalleryOptions(snapshot_interval_s=0))
    g.open_store()
    g.start_loading()
    with caplog.at_level("INFO", logger="service.gallery.embedded.gallery"):
        g.close()  # at once: the rebuild stops at its next 10k-face chunk instead of running to the end
    assert g.load_state == "loading" and "gallery load cancelled by shutdown" in caplog.text
    assert not (tmp_path / "index.json").exists()  # nothing half-built was snapshotted
    g = opened(tmp_path)
    assert g.stats()["index_live"] == g.stats()["faces"] == 30_000
    g.close()


def test_snapshot_left_half_written_by_a_crash_is_removed(tmp_path):
    rng = np.random.default_rng(19)
    g = opened(tmp_path)
    secret = unit(rng, 1)
    g.enroll("secret", secret)
    g.enroll("other", unit(rng, 1))
    g._index.save(g._files.temp)  # noqa: SLF001 - a snapshot saved, then the process died before install
    g.delete("secret")
    crash(g)
    assert "index.hnsw.tmp" in find_vector(tmp_path, secret[0])
    g = opened(tmp_path)
    assert not find_vector(tmp_path, secret[0])
    g.close()


def run_aside(action) -> None:
    """Run ``action`` in another thread and wait for it: a write that waited for a lock the calling
    thread holds would never finish (the test then fails instead of hanging)."""
    errors: list[BaseException] = []

    def target():
        try:
            action()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(exc)

    worker = threading.Thread(target=target)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "the write waited for the gallery lock"
    if errors:
        raise errors[0]


def test_writes_go_on_while_a_compaction_builds_and_its_deletes_are_honoured(tmp_path):
    """The next graph is built off the lock: writes made meanwhile land in it (replayed), faces
    erased meanwhile are never searchable and never reach a snapshot file."""
    rng = np.random.default_rng(20)
    g = opened(tmp_path, compact_min_tombstones=10, compact_tombstone_ratio=0.5)
    g.COMPACTION_CHUNK = 40  # two chunks: one copied before the writes below, one after
    vectors = {f"x{i}": unit(rng, 1) for i in range(200)}
    for identity, v in vectors.items():
        g.enroll(identity, v)
    g.snapshot()
    for i in range(120):
        g.delete(f"x{i}")
        vectors.pop(f"x{i}")
    erased = {"x130": vectors.pop("x130"), "x190": vectors.pop("x190"), "gone": unit(rng, 2)}
    vectors["new"] = unit(rng, 1)
    calls = []

    def writes():
        assert g.delete("x130") == 1  # copied into the new graph already: replayed as a delete
        assert g.delete("x190") == 1  # not copied yet: left out
        g.enroll("new", vectors["new"])  # replayed as an add
        g.enroll("gone", erased["gone"])
        assert g.delete("gone") == 2  # added and erased during the build
        assert g.search(vectors["new"], 1)[0][0].identity_id == "new"  # the graph in use has it

    def hook():
        calls.append(g.stats()["index_tombstones"])
        if len(calls) == 1:
            run_aside(writes)

    g.compaction_hook = hook
    g.maintain()
    assert len(calls) == 2 and calls[0] == 120  # the hook ran during the build, before the swap
    stats = g.stats()
    assert stats["index_live"] == stats["faces"] == len(vectors) == 79
    assert g._index.count < 90  # noqa: SLF001 - compacted: 120 tombstones gone
    answers_correctly(g, vectors)
    for identity, v in erased.items():
        assert all(m.identity_id != identity for m in g.search(v, 10)[0])
    assert g.snapshot()
    crash(g)
    for v in erased.values():
        assert not find_vector(tmp_path, v[0])
    g = opened(tmp_path)
    answers_correctly(g, vectors)
    for identity, v in erased.items():
        assert all(m.identity_id != identity for m in g.search(v, 10)[0])
    g.close()


def test_crash_during_a_compaction_loses_nothing_acknowledged(tmp_path):
    rng = np.random.default_rng(21)
    g = opened(tmp_path, compact_min_tombstones=10, compact_tombstone_ratio=0.5)
    g.COMPACTION_CHUNK = 40
    vectors = {f"x{i}": unit(rng, 1) for i in range(100)}
    for identity, v in vectors.items():
        g.enroll(identity, v)
    for i in range(60):
        g.delete(f"x{i}")
        vectors.pop(f"x{i}")
    secret = vectors.pop("x99")
    vectors["late"] = unit(rng, 1)

    def hook():
        g.compaction_hook = None
        run_aside(lambda: (g.enroll("late", vectors["late"]), g.delete("x99")))  # acknowledged ...
        crash(g)  # ... then the process dies mid-build
        raise SystemExit  # nothing after this runs

    g.compaction_hook = hook
    with pytest.raises(SystemExit):
        g.maintain()
    assert not find_vector(tmp_path, secret[0])
    g = opened(tmp_path)
    answers_correctly(g, vectors)
    assert all(m.identity_id != "x99" for m in g.search(secret, 10)[0])
    g.close()


@pytest.mark.parametrize("ending", ["completes", "crash"])
def test_writes_go_on_while_a_snapshot_is_written(tmp_path, monkeypatch, ending):
    """The lock is held for the fork only: a delete and an enroll made while the child writes the
    file get in; the deleted vector is zeroed in the new file before it gets a name in the data dir
    (a crash leaves nothing of it), and the enrolled face is replayed after a crash."""
    from service.gallery.embedded.index import BackgroundSave

    rng = np.random.default_rng(22)
    g = opened(tmp_path)
    vectors = {f"k{i}": unit(rng, 1) for i in range(30)}
    for identity, v in vectors.items():
        g.enroll(identity, v)
    secret = unit(rng, 1)
    g.enroll("secret", secret)
    vectors["late"] = unit(rng, 1)
    real_wait = BackgroundSave.wait

    def wait_while_writing(saving, timeout):
        run_aside(lambda: (g.delete("secret"), g.enroll("late", vectors["late"])))
        real_wait(saving, timeout)  # the child forked before the delete: its file has the secret,
        assert holds_vector(g._writing.file, secret[0])  # noqa: SLF001
        assert not find_vector(tmp_path, secret[0])  # and that file has no name in the data dir
        if ending == "crash":
            crash(g)
            raise SystemExit  # the process is gone; nothing after this runs

    monkeypatch.setattr(BackgroundSave, "wait", wait_while_writing)
    if ending == "crash":
        with pytest.raises(SystemExit):
            g.snapshot()
    else:
        assert g.snapshot()
        assert not find_vector(tmp_path, secret[0])
        crash(g)
    monkeypatch.undo()
    g = opened(tmp_path)
    assert not find_vector(tmp_path, secret[0])
    answers_correctly(g, vectors)
    assert all(m.identity_id != "secret" for m in g.search(secret, 5)[0])
    g.close()


def test_snapshot_without_fork_is_written_under_the_lock(tmp_path, monkeypatch):
    def no_fork():
        raise OSError(12, "Cannot allocate memory")

    rng = np.random.default_rng(23)
    g = opened(tmp_path)
    vectors = {f"k{i}": unit(rng, 1) for i in range(20)}
    for identity, v in vectors.items():
        g.enroll(identity, v)
    monkeypatch.setattr("os.fork", no_fork)
    assert g.snapshot()
    monkeypatch.undo()
    crash(g)
    g = opened(tmp_path)
    assert g.stats()["generation"] == json.loads((tmp_path / "index.json").read_text())["generation"]
    answers_correctly(g, vectors)
    g.close()


def test_failed_snapshot_writer_is_reported_and_cleaned_up(tmp_path, monkeypatch):
    from service.gallery.embedded.index import HnswIndex

    rng = np.random.default_rng(24)
    g = opened(tmp_path)
    vectors = {"a": unit(rng, 1), "b": unit(rng, 1)}
    g.enroll("a", vectors["a"])
    assert g.snapshot()
    g.enroll("b", vectors["b"])
    real_save = HnswIndex.save_in_background
    monkeypatch.setattr(HnswIndex, "save_in_background",
                        lambda self, path, keep=None: real_save(self, path.parent / "missing" / path.name, keep))
    assert g.snapshot() is False  # the child could not write: exit status 1, no file half-written
    assert not (tmp_path / "index.hnsw.tmp").exists()
    monkeypatch.undo()
    assert g.snapshot()
    crash(g)
    g = opened(tmp_path)
    answers_correctly(g, vectors)
    g.close()


def test_a_snapshot_written_short_is_refused_and_the_previous_one_kept(tmp_path, monkeypatch, caplog):
    """hnswlib's save reports no write error: on a full disk it leaves a cut file and returns. A file
    shorter than hnswlib's own count of the bytes is refused before it is put in place; the previous
    snapshot (in place, scrubbed of every erase) stays the base of the next start."""
    from service.gallery.embedded.index import HnswIndex

    vectors = seeded(tmp_path, 300)
    g = opened(tmp_path)
    g._fork_snapshots = False  # noqa: SLF001 - the in-process save, whose file this test cuts
    for i in range(20):
        vectors[f"n{i}"] = unit(np.random.default_rng(i), 1)
        g.enroll(f"n{i}", vectors[f"n{i}"])
    g.delete("p3")
    vectors.pop("p3")
    real_save = HnswIndex.save

    def short_save(self, path):
        real_save(self, path)
        with open(path, "r+b") as f:  # what ENOSPC leaves: the tail never written
            f.truncate(path.stat().st_size - 4096)

    monkeypatch.setattr(HnswIndex, "save", short_save)
    with caplog.at_level("WARNING", logger="service.gallery.embedded.gallery"):
        assert g.snapshot() is False
    assert any("written short" in r.getMessage() or "written short" in str(r.exc_info) for r in caplog.records)
    assert not (tmp_path / "index.hnsw.tmp").exists()
    assert (tmp_path / "index.json").exists()  # the previous snapshot still counts
    monkeypatch.undo()
    crash(g)
    caplog.clear()
    with caplog.at_level("INFO", logger="service.gallery.embedded.gallery"):
        g = opened(tmp_path)
    ready = [r for r in caplog.records if r.getMessage() == "gallery index ready"][-1]
    assert (ready.source, ready.replayed_added, ready.replayed_erased) == ("snapshot", 20, 1)
    answers_correctly(g, vectors)
    g.close()


def test_killed_server_leaves_no_snapshot_writer_holding_the_data_dir(tmp_path):
    """kill -9 while the forked child writes a snapshot: the child dies with its parent and never
    held the data-dir lock (it closed what it inherited), so the next start is not refused. The
    child is kept writing by making its file a FIFO nobody reads."""
    script = f"""
import os, signal, sys
import numpy as np
from service.gallery import Gallery, GalleryOptions
from service.gallery.embedded.index import BackgroundSave
g = Gallery({str(tmp_path)!r}, "m@1", {DIM}, options=GalleryOptions(snapshot_interval_s=0))
g.open()
g.enroll("a", np.ones((1, {DIM}), np.float32))
g._files.unnamed = lambda: None  # the named temp, so that the FIFO is what the child writes to
os.mkfifo(g._files.temp)
def die(saving, timeout):
    print(saving.pid, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
BackgroundSave.wait = die
g.snapshot()
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    child = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and Path(f"/proc/{child}").exists() and "zombie" not in Path(
            f"/proc/{child}/status").read_text():
        time.sleep(0.05)
    assert not Path(f"/proc/{child}").exists() or "zombie" in Path(f"/proc/{child}/status").read_text()
    g = opened(tmp_path)  # not DataDirLocked
    assert g.search(np.ones((1, DIM), np.float32), 1)[0][0].identity_id == "a"
    g.close()


def test_a_face_erased_before_a_written_snapshot_is_put_in_place_is_in_no_file_after_kill_9(tmp_path):
    """The forked writer has written the snapshot (the secret face in it), the face is erased (the
    delete acknowledged), and the process is killed before the snapshot is put in place: no file of
    the data dir holds the face. Before, the written file was the named index.hnsw.tmp, left by the
    kill with the face in it until the next start removed it (CI met it: test_data_dir's kill case)."""
    secret = np.random.default_rng(31).normal(size=(1, DIM)).astype(np.float32)
    script = f"""
import os, signal
import numpy as np
from service.gallery import Gallery, GalleryOptions
g = Gallery({str(tmp_path)!r}, "m@1", {DIM}, options=GalleryOptions(snapshot_interval_s=0))
g.open()
for i in range(20):
    g.enroll(f"k{{i}}", np.random.default_rng(i).normal(size=(1, {DIM})).astype(np.float32))
g.enroll("secret", np.array({secret.tolist()!r}, np.float32))
with g._snapshot_mutex:
    assert g._start_snapshot()
    g._writing.saving.wait(60)  # the child has written the file and exited; it is not in place yet
    assert g.delete("secret") == 1
    os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not find_vector(tmp_path, secret[0])
    g = opened(tmp_path)
    assert all(m.identity_id != "secret" for m in g.search(secret, 5)[0]) and g.stats()["index_live"] == 20
    g.close()


KILLED_MID_MAINTENANCE = """
import os, sys, threading
import numpy as np
from service.gallery import Gallery, GalleryOptions

def vec(i):
    v = np.random.default_rng(i).normal(size=(1, {dim})).astype(np.float32)
    return v / np.linalg.norm(v)

g = Gallery({path!r}, "m@1", {dim}, options=GalleryOptions(
    snapshot_interval_s=0, compact_min_tombstones=10, compact_tombstone_ratio=0.5))
g.open()
for i in range(300):
    g.enroll(f"s{{i}}", vec(i))
g.snapshot()
for i in range(160):
    g.delete(f"s{{i}}")

def writer():
    j = 0
    while True:
        g.enroll(f"w{{j}}", vec(10_000 + j))
        print(f"+w{{j}}", flush=True)  # acknowledged
        if j % 3 == 0 and g.delete(f"s{{160 + j // 3}}"):
            print(f"-s{{160 + j // 3}}", flush=True)
        j += 1

if {during!r} == "compaction":
    g.COMPACTION_CHUNK = 10
    def hook():  # the build stops in its first chunk, holding no lock, until the process is killed
        print("maintaining", flush=True)
        threading.Thread(target=writer, daemon=True).start()
        threading.Event().wait()
    g.compaction_hook = hook
    g.maintain()
    sys.exit("no compaction ran")
else:
    g._files.unnamed = lambda: None  # the named temp, made a FIFO:
    os.mkfifo(g._files.temp)  # the forked writer blocks on it: the snapshot never ends
    threading.Thread(target=writer, daemon=True).start()
    print("maintaining", flush=True)
    g.snapshot()
"""


@pytest.mark.parametrize("during", ["compaction", "snapshot"])
def test_kill_9_during_maintenance_loses_no_acknowledged_write(tmp_path, during):
    """A real process enrolls and deletes while a compaction builds (or a snapshot is written), and
    is killed with SIGKILL mid-way: after a restart every acknowledged enrollment is found, no
    acknowledged delete comes back."""
    script = KILLED_MID_MAINTENANCE.format(path=str(tmp_path), dim=DIM, during=during)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=Path(__file__).resolve().parents[2])
    lines: list[str] = []
    assert proc.stdout is not None
    watchdog = threading.Timer(120, proc.kill)  # writes that wait for the maintenance: fail, do not hang
    watchdog.start()
    try:
        for line in proc.stdout:
            lines.append(line.strip())
            if "maintaining" in lines and sum(x.startswith("-") for x in lines) >= 10:
                break  # enrolls and deletes acknowledged while the maintenance runs
    finally:
        proc.kill()  # SIGKILL
        out, err = proc.communicate(timeout=60)
        watchdog.cancel()
    lines += out.split()
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    assert "maintaining" in lines and sum(x.startswith("-") for x in lines) >= 10, err[-2000:]
    enrolled = [x[1:] for x in lines if x.startswith("+")]
    deleted = [f"s{i}" for i in range(160)] + [x[1:] for x in lines if x.startswith("-")]

    def vec(i):
        v = np.random.default_rng(i).normal(size=(1, DIM)).astype(np.float32)
        return v / np.linalg.norm(v)

    g = opened(tmp_path)
    try:
        for name in enrolled:
            assert g.get_identity(name) is not None
            assert g.search(vec(10_000 + int(name[1:])), 1)[0][0].identity_id == name
        for name in deleted:
            assert g.get_identity(name) is None
            assert all(m.identity_id != name for m in g.search(vec(int(name[1:])), 5)[0])
        assert g.stats()["index_live"] == g.stats()["faces"]
    finally:
        g.close()



def test_stats_beside_writes_never_break_a_write(tmp_path):
    """/readyz (``stats``, no gallery lock) read the generation through the writer's own SQLite
    connection: a statement of it still open when a delete checkpointed the WAL failed the delete with
    'database table is locked' (a 500 in the CI soak of 2026-12-04). Reads use the readers' connections."""
    g = opened(tmp_path)
    rng = np.random.default_rng(21)
    errors: list[str] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                g.stats()
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(f"stats: {exc!r}")

    readers = [threading.Thread(target=read)]
    for t in readers:
        t.start()
    try:
        deadline = time.monotonic() + 8
        i = 0
        while time.monotonic() < deadline and not errors:
            try:
                g.enroll(f"x{i}", unit(rng, 1))
                g.delete(f"x{i}")
            except Exception as exc:  # noqa: BLE001
                errors.append(f"write {i}: {exc!r}")
            i += 1
    finally:
        stop.set()
        for t in readers:
            t.join()
    assert errors == [], errors[:3]
    assert g.stats()["generation"] == 2 * i
    g.close()
