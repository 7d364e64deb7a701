"""Soak: a mixed workload against a real server on the embedded backend, then consistency checks,
then rounds of ``kill -9`` during enrollments.

N clients (default 32) for T seconds (default 600) run enroll / identify / verify / embed / delete
on real aligned LFW crops. Each LFW person is enrolled under at most one identity at a time (so
"top-1 for its own image" is well defined); deletes free the person again. Recorded:

* requests and errors per route and code, p50/p99 latency per route;
* the server's RSS over time (from /proc) and the index's tombstones (from /readyz);
* violations: an identity returned by /identify after its delete was acknowledged;
* afterwards: every listed identity must be top-1 for the image it was enrolled with, and no
  deleted identity may be listed or found;
* K rounds: enrollments from several clients, ``kill -9`` mid-flight, restart, every acknowledged
  enrollment must be there (and every acknowledged delete still gone).

    nice -n 19 python -m bench.soak [--clients 32] [--duration 600] [--kill-rounds 3]

Saves bench/results/soak_<clients>c_<duration>s.json (or --name).
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.common import machine, percentile_ms, rss_mb, save
from harness.server import MODEL_CACHE, REPO, ServerProcess, listed_identities
from service.model.prepare import default_model

LFW = REPO.parent / "shared" / "data" / "lfw-112"
WEIGHTS = {"enroll": 25, "identify": 35, "verify": 15, "embed": 15, "delete": 10}


def load_people(lfw: Path, count: int, seed: int) -> dict[str, list[str]]:
    """``count`` LFW people with 2+ images: name -> base64 images (first one is the enrolled one)."""
    rows = [line.split("\t") for line in (lfw / "identities.tsv").read_text().splitlines()[1:]]
    names = sorted(name for name, n in rows if int(n) >= 2)
    random.Random(seed).shuffle(names)
    people = {}
    for name in names[:count]:
        files = sorted((lfw / "images" / name).glob("*.jpg"))[:3]
        people[name] = [base64.b64encode(f.read_bytes()).decode() for f in files]
    return people


def _rounded(mb: float | None) -> float | None:
    return None if mb is None else round(mb, 1)


@dataclass
class Shared:
    people: dict[str, list[str]]
    free: list[str]
    enrolled: dict[str, str] = field(default_factory=dict)   # identity -> person
    deleted_at: dict[str, float] = field(default_factory=dict)  # identity -> when its delete was acknowledged
    lock: threading.Lock = field(default_factory=threading.Lock)
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    codes: Counter = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    counter: int = 0


class Client(threading.Thread):
    def __init__(self, url: str, shared: Shared, stop: threading.Event, seed: int) -> None:
        super().__init__(daemon=True)
        self.url, self.shared, self.stop, self.rng = url, shared, stop, random.Random(seed)

    def run(self) -> None:
        ops, weights = zip(*WEIGHTS.items())
        with httpx.Client(base_url=self.url, timeout=120) as c:
            while not self.stop.is_set():
                op = self.rng.choices(ops, weights)[0]
                try:
                    getattr(self, op)(c)
                except httpx.HTTPError as exc:
                    self.record(op, 0, f"transport:{type(exc).__name__}", 0.0)

    def record(self, route: str, status: int, code: str, seconds: float) -> None:
        with self.shared.lock:
            self.shared.latencies[route].append(seconds)
            self.shared.codes[(route, status, code)] += 1

    def call(self, c: httpx.Client, route: str, method: str, path: str, **kwargs) -> httpx.Response:
        started = time.monotonic()
        r = c.request(method, path, **kwargs)
        code = "ok" if r.status_code < 400 else r.json().get("error", {}).get("code", "?")
        self.record(route, r.status_code, code, time.monotonic() - started)
        return r

    def pick_enrolled(self) -> tuple[str, str] | None:
        with self.shared.lock:
            if not self.shared.enrolled:
                return None
            identity = self.rng.choice(list(self.shared.enrolled))
            return identity, self.shared.enrolled[identity]

    def enroll(self, c: httpx.Client) -> None:
        s = self.shared
        with s.lock:
            if not s.free:
                return
            person = s.free.pop(self.rng.randrange(len(s.free)))
            s.counter += 1
            identity = f"{person}~{s.counter}"
        r = self.call(c, "enroll", "POST", "/enroll", json={"identity_id": identity, "images": [s.people[person][0]]})
        with s.lock:
            if r.status_code == 200:
                s.enrolled[identity] = person
            else:
                s.free.append(person)

    def delete(self, c: httpx.Client) -> None:
        s = self.shared
        with s.lock:
            if not s.enrolled:
                return
            identity = self.rng.choice(list(s.enrolled))
            person = s.enrolled.pop(identity)  # nobody else picks it while the delete runs
        r = self.call(c, "delete", "DELETE", f"/identities/{identity}")
        with s.lock:
            if r.status_code == 200:
                s.deleted_at[identity] = time.monotonic()
                s.free.append(person)
            else:
                s.enrolled[identity] = person

    def identify(self, c: httpx.Client) -> None:
        picked = self.pick_enrolled()
        person = picked[1] if picked else self.rng.choice(list(self.shared.people))
        sent = time.monotonic()
        r = self.call(c, "identify", "POST", "/identify",
                      json={"images": [self.rng.choice(self.shared.people[person][1:])], "top_k": 5})
        if r.status_code == 200:
            with self.shared.lock:
                for result in r.json()["results"]:
                    for cand in result["candidates"]:
                        gone = self.shared.deleted_at.get(cand["identity_id"])
                        if gone is not None and gone < sent:
                            self.shared.violations.append(f"deleted {cand['identity_id']} returned by /identify")

    def verify(self, c: httpx.Client) -> None:
        picked = self.pick_enrolled()
        if picked is None:
            return
        identity, person = picked
        self.call(c, "verify", "POST", "/verify", json={"image_a": self.shared.people[person][1], "identity_id": identity})

    def embed(self, c: httpx.Client) -> None:
        person = self.rng.choice(list(self.shared.people))
        self.call(c, "embed", "POST", "/embed", json={"images": self.shared.people[person][:2]})


class Sampler(threading.Thread):
    """RSS of the server process and the index's tombstones, every ``every`` seconds."""

    def __init__(self, server: ServerProcess, every: float) -> None:
        super().__init__(daemon=True)
        self.server, self.every, self.stop = server, every, threading.Event()
        self.samples: list[dict] = []
        self.started = time.monotonic()

    def run(self) -> None:
        with httpx.Client(base_url=self.server.url, timeout=30) as c:
            while not self.stop.wait(self.every):
                sample = {"t": round(time.monotonic() - self.started, 1),
                          "rss_mb": _rounded(rss_mb(self.server.proc.pid))}
                try:
                    gallery = c.get("/readyz").json().get("gallery", {})
                    sample |= {k: gallery.get(k) for k in ("faces", "index_tombstones", "index_capacity")}
                except (httpx.HTTPError, ValueError):
                    pass
                self.samples.append(sample)


def logged_errors(log_path: Path, limit: int = 20) -> list[str]:
    """The server's error records (and anything not JSON: a traceback, a native crash), so that a soak
    that saw a 5xx or a dropped connection says why, even where its temporary files are gone (CI)."""
    found = []
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            if line.strip() and not line.startswith("[ WARN"):
                found.append(line[:2000])
            continue
        if isinstance(record, dict) and record.get("level") in ("error", "critical"):
            found.append(line[:4000])
    return found[:limit]


def consistency(url: str, shared: Shared) -> dict:
    """Every listed identity is top-1 for its own enrolled image; nothing deleted is listed or found."""
    problems: list[str] = []
    with httpx.Client(base_url=url, timeout=120) as c:
        listed = listed_identities(c)
        if listed != set(shared.enrolled):
            problems.append(f"listed vs acknowledged: {len(listed - set(shared.enrolled))} extra, "
                            f"{len(set(shared.enrolled) - listed)} missing")
        identities = sorted(listed & set(shared.enrolled))
        for start in range(0, len(identities), 16):
            part = identities[start:start + 16]
            r = c.post("/identify", json={"images": [shared.people[shared.enrolled[i]][0] for i in part], "top_k": 5})
            r.raise_for_status()
            for identity, result in zip(part, r.json()["results"]):
                top = result["candidates"][0]["identity_id"] if result["candidates"] else None
                if top != identity:
                    problems.append(f"{identity}: top-1 is {top}")
                for cand in result["candidates"]:
                    if cand["identity_id"] in shared.deleted_at and cand["identity_id"] not in shared.enrolled:
                        problems.append(f"deleted {cand['identity_id']} returned")
        stats = c.get("/readyz").json()["gallery"]
    return {"listed": len(listed), "checked_top1": len(identities), "problems": problems[:50],
            "problem_count": len(problems), "gallery": stats}


def kill_round(data: Path, model: Path, env: dict, shared: Shared, clients: int, seconds: float, seed: int) -> dict:
    """Enroll from several clients, kill -9 mid-flight, restart, check every acknowledged enrollment."""
    server = ServerProcess(data, model=model, env=env)
    server.wait_ready(timeout=600)
    acknowledged: list[str] = []
    stop = threading.Event()
    rng = random.Random(seed)
    people = list(shared.people)

    def enroll_until_killed(worker: int) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            i = 0
            while not stop.is_set():
                identity = f"kill{seed}-{worker}-{i}"
                try:
                    r = c.post("/enroll", json={"identity_id": identity,
                                                "images": [shared.people[people[(worker * 7919 + i) % len(people)]][1]]})
                except httpx.HTTPError:
                    return
                if r.status_code == 200:
                    acknowledged.append(identity)
                i += 1

    threads = [threading.Thread(target=enroll_until_killed, args=(w,), daemon=True) for w in range(clients)]
    for t in threads:
        t.start()
    time.sleep(seconds * rng.uniform(0.5, 1.0))
    server.kill()
    stop.set()
    for t in threads:
        t.join(60)
    started = time.monotonic()
    server = ServerProcess(data, model=model, env=env)
    try:
        server.wait_ready(timeout=600)
        restart_s = time.monotonic() - started
        with httpx.Client(base_url=server.url, timeout=120) as c:
            listed = listed_identities(c)
            ready = c.get("/readyz").json()["gallery"]
    finally:
        server.stop()
    lost = sorted(set(acknowledged) - listed)
    resurrected = sorted(i for i in shared.deleted_at if i in listed and i not in shared.enrolled)
    return {"acknowledged": len(acknowledged), "lost": lost[:20], "lost_count": len(lost),
            "deleted_resurrected": resurrected[:20], "restart_to_ready_s": round(restart_s, 2),
            "index_live": ready["index_live"], "faces": ready["faces"]}


def run(clients: int = 32, duration: float = 600, kill_rounds: int = 3, people: int = 1500, seed: int = 0,
        data_dir: Path | None = None, sample_every: float = 5.0, env: dict | None = None, name: str | None = None,
        save_result: bool = True, kill_after: float = 5.0) -> dict:
    model = default_model(MODEL_CACHE)
    data = data_dir or Path(tempfile.mkdtemp(prefix="soak-")) / "data"
    env = {"FACE_SNAPSHOT_INTERVAL_S": "10", "FACE_COMPACT_MIN_TOMBSTONES": "200", **(env or {})}
    shared = Shared(people=load_people(LFW, people, seed), free=[])
    shared.free = list(shared.people)
    server = ServerProcess(data, model=model, env=env)
    try:
        server.wait_ready(timeout=600)
        sampler = Sampler(server, sample_every)
        sampler.start()
        stop = threading.Event()
        workers = [Client(server.url, shared, stop, seed * 1000 + i) for i in range(clients)]
        started = time.monotonic()
        for w in workers:
            w.start()
        stop.wait(duration)
        stop.set()
        for w in workers:
            w.join(180)
        elapsed = time.monotonic() - started
        sampler.stop.set()
        sampler.join(30)
        check = consistency(server.url, shared)
    finally:
        server.stop()
        logged = logged_errors(server.log_path)
    rounds = [kill_round(data, model, env, shared, min(clients, 8), kill_after, seed + r) for r in range(kill_rounds)]

    routes = {route: {"requests": len(v), "p50_ms": round(percentile_ms(v, 50), 1),
                      "p99_ms": round(percentile_ms(v, 99), 1)} for route, v in shared.latencies.items()}
    codes = [{"route": r, "status": s, "code": c, "count": n} for (r, s, c), n in sorted(shared.codes.items())]
    rss = [s["rss_mb"] for s in sampler.samples if s.get("rss_mb")]
    result = {
        "config": {"clients": clients, "duration_s": duration, "kill_rounds": kill_rounds, "kill_after_s": kill_after,
                   "people": people,
                   "seed": seed, "weights": WEIGHTS, "env": env},
        "elapsed_s": round(elapsed, 1),
        "requests": sum(r["requests"] for r in routes.values()),
        "throughput_rps": round(sum(r["requests"] for r in routes.values()) / elapsed, 1),
        "routes": routes,
        "codes": codes,
        "server_errors": sum(x["count"] for x in codes if x["status"] >= 500 or x["status"] == 0),
        "server_log_errors": logged,
        "violations": shared.violations[:50], "violation_count": len(shared.violations),
        "rss_mb": {"first": rss[0] if rss else None, "last": rss[-1] if rss else None,
                   "max": max(rss) if rss else None},
        "samples": sampler.samples,
        "consistency": check,
        "kill_rounds": rounds,
        "machine": machine(),
    }
    if save_result:
        print(f"saved {save(name or f'soak_{clients}c_{int(duration)}s', result)}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=600)
    parser.add_argument("--kill-rounds", type=int, default=3)
    parser.add_argument("--people", type=int, default=1500, help="LFW people with 2+ images in the pool")
    parser.add_argument("--kill-after", type=float, default=5.0,
                        help="each kill round: kill -9 after 0.5-1x this many seconds of enrollments")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--sample-every", type=float, default=5.0)
    parser.add_argument("--name", help="result file name (bench/results/<name>.json)")
    args = parser.parse_args(argv)
    result = run(args.clients, args.duration, args.kill_rounds, args.people, args.seed, args.data_dir,
                 args.sample_every, name=args.name, kill_after=args.kill_after)
    summary = {k: result[k] for k in ("requests", "throughput_rps", "server_errors", "violation_count", "rss_mb")}
    print(summary, {r: (v["p50_ms"], v["p99_ms"]) for r, v in result["routes"].items()})
    print("consistency:", result["consistency"]["problem_count"], "problems;",
          "kill rounds lost:", [r["lost_count"] for r in result["kill_rounds"]])


if __name__ == "__main__":
    main()
