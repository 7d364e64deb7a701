"""``python -m service audit export|prune``: real subprocesses on a real data dir or PostgreSQL schema.

Export writes JSON Lines, oldest first, across the backend's pages (more entries than one page), with
every filter; --output writes the same lines to a file; prune removes what is older. Both backends.
"""

from __future__ import annotations

import argparse
import json
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import numpy as np

from service.cli import audit as audit_cli
from service.gallery.api import Actor

FRONT = Actor(key_id="aaaaaaaaaaaa", client="10.0.0.7", request_id="req-front")
HR = Actor(key_id="bbbbbbbbbbbb", client="10.0.0.8", request_id="req-hr")


def unit(rng, n: int, dim: int) -> np.ndarray:
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def iso(at: float) -> str:
    return datetime.fromtimestamp(at, timezone.utc).isoformat()


def lines_of(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_export_oldest_first_with_filters(operator_backend, tmp_path):
    b = operator_backend
    rng = np.random.default_rng(7)
    galleries = b.open()
    try:
        dim = galleries.dim
        galleries.create_collection("hr", actor=HR)
        default, hr = galleries.collection("default"), galleries.collection("hr")
        default.enroll("alice", unit(rng, 2, dim), actor=FRONT)
        hr.enroll("alice", unit(rng, 1, dim), actor=HR)  # another person, same id, another collection
        time.sleep(1.1)
        middle = time.time()
        time.sleep(0.1)
        default.enroll("alice", unit(rng, 1, dim), actor=FRONT)  # appended
        default.enroll("bob", unit(rng, 1, dim), actor=HR)
        hr.delete("alice", actor=HR)
        # more entries than one page of Galleries.audit (1000): export pages through them
        hr.import_identities([(f"p{i:04d}", unit(rng, 1, dim), None) for i in range(1200)], actor=HR)
    finally:
        galleries.close()

    r = b.run("audit", "export")
    assert r.returncode == 0, r.stderr
    every = lines_of(r.stdout)
    assert len(every) == 1 + 2 + 3 + 1200  # collection.created, 2 enrolls, append + enroll + delete, imports
    ats = [e["at"] for e in every]
    assert ats == sorted(ats)  # oldest first
    assert len({e["entry_id"] for e in every}) == len(every)
    assert set(every[0]) == {"entry_id", "at", "action", "key_id", "client", "request_id", "collection",
                             "identity_id", "details"}
    assert [(e["action"], e["collection"], e["identity_id"]) for e in every[:6]] == [
        ("collection.created", "hr", None), ("identity.created", "default", "alice"),
        ("identity.created", "hr", "alice"), ("identity.appended", "default", "alice"),
        ("identity.created", "default", "bob"), ("identity.deleted", "hr", "alice")]
    assert {e["identity_id"] for e in every if e["action"] == "identity.imported"} == {f"p{i:04d}" for i in range(1200)}
    assert (every[1]["key_id"], every[1]["client"], every[1]["request_id"]) == ("aaaaaaaaaaaa", "10.0.0.7", "req-front")

    def export(*args: str) -> list[dict]:
        r = b.run("audit", "export", *args)
        assert r.returncode == 0, r.stderr
        found = lines_of(r.stdout)
        assert [e["at"] for e in found] == sorted(e["at"] for e in found)
        return found

    assert [e for e in every if e["collection"] == "default"] == export("--collection", "default")
    assert len(export("--collection", "hr")) == 1 + 1 + 1 + 1200
    assert [e["action"] for e in export("--identity", "alice")] == \
        [e["action"] for e in every if e["identity_id"] == "alice"]
    assert [(e["action"], e["collection"]) for e in export("--identity", "alice", "--collection", "default")] == \
        [("identity.created", "default"), ("identity.appended", "default")]
    front = export("--key", FRONT.key_id)
    assert [e["action"] for e in front] == ["identity.created", "identity.appended"]
    assert all(e["key_id"] == FRONT.key_id for e in front)
    assert export("--until", iso(middle)) == every[:3]
    assert all(e["at"] < middle for e in every[:3]) and every[3]["at"] >= middle
    assert export("--since", iso(middle)) == [e for e in every if e["at"] >= middle]
    assert len(export("--since", iso(middle))) == 3 + 1200
    assert export("--since", iso(middle), "--key", HR.key_id, "--collection", "default") == \
        [e for e in every if e["identity_id"] == "bob"]
    assert export("--since", datetime.fromtimestamp(middle, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")) == \
        [e for e in every if e["at"] >= middle]
    assert export("--collection", "nosuch") == []

    out = tmp_path / "audit.jsonl"
    out.write_text("an older export, readable by all\n")
    out.chmod(0o644)
    r = b.run("audit", "export", "--output", str(out), "--collection", "default")
    assert r.returncode == 0 and r.stdout == "", r.stderr
    assert lines_of(out.read_text()) == [e for e in every if e["collection"] == "default"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o600  # who did what, from where: its owner's alone (0644 before)

    for bad in (("--since", "yesterday"), ("--since", iso(middle), "--until", iso(middle - 10))):
        r = b.run("audit", "export", *bad)
        assert r.returncode == 2 and r.stdout == "", r.stderr


def test_prune_older_than(operator_backend):
    b = operator_backend
    rng = np.random.default_rng(8)
    galleries = b.open()
    try:
        default = galleries.collection("default")
        default.enroll("old", unit(rng, 1, galleries.dim), actor=FRONT)
        old_at = time.time()
        time.sleep(6)
        default.enroll("new", unit(rng, 1, galleries.dim), actor=FRONT)
    finally:
        galleries.close()
    for bad in ("0", "-3", "soon"):
        r = b.run("audit", "prune", "--older-than-days", bad)
        assert r.returncode == 2, r.stdout
    r = b.run("audit", "prune", "--older-than-days", "30")
    assert r.returncode == 0 and json.loads(r.stdout)["removed"] == 0, r.stderr
    # older than (now - old_at - 1 s): the first enroll's entry, not the second's (made 6 s later; the
    # command starts within those seconds)
    days = (time.time() - (old_at + 1)) / 86400
    r = b.run("audit", "prune", "--older-than-days", f"{days:.12f}")
    assert r.returncode == 0 and json.loads(r.stdout)["removed"] == 1, r.stdout + r.stderr
    assert [e["identity_id"] for e in lines_of(b.run("audit", "export").stdout)] == ["new"]


class PausedAudit:
    """Real galleries whose audit listing waits until released the first time it is asked: an export
    paused after opening its output, so that another export can run beside it."""

    def __init__(self, real) -> None:
        self.real = real
        self.reached, self.go = threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.real, name)

    def audit(self, query):
        if not self.go.is_set():
            self.reached.set()
            assert self.go.wait(30)
        return self.real.audit(query)


def test_two_exports_to_one_file_at_once_both_succeed_with_the_whole_trail(operator_backend, tmp_path):
    """``audit export --output F`` twice at once: each writes a file of its own and renames it whole.
    Both wrote through one fixed ``F.part``: the second truncated and renamed the first's file, and the
    first then failed on its own rename ("cannot write")."""
    rng = np.random.default_rng(3)
    galleries = operator_backend.open()
    try:
        galleries.collection("default").import_identities(
            [(f"p{i}", unit(rng, 1, galleries.dim), None) for i in range(5)], actor=FRONT)
        output = tmp_path / "out" / "trail.jsonl"
        output.parent.mkdir()
        args = argparse.Namespace(collection=None, identity=None, key=None, since=None, until=None, output=output)
        paused = PausedAudit(galleries)
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(audit_cli._export, args, paused)
            assert paused.reached.wait(30)  # its output opened, nothing written yet
            audit_cli._export(args, galleries)  # a whole export meanwhile
            paused.go.set()
            first.result(30)  # raised CommandError("cannot write ...") before
    finally:
        galleries.close()
    entries = lines_of(output.read_text())
    assert sorted(e["identity_id"] for e in entries) == [f"p{i}" for i in range(5)]
    assert [p.name for p in output.parent.iterdir()] == ["trail.jsonl"]  # no temporary file left
