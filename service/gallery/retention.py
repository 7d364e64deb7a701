"""Retention: a collection that forgets its faces a set time after they were enrolled.

A collection's ``retention_days`` (``POST /collections``, ``PATCH /collections/{name}``; None: kept
until deleted) bounds how long the service holds each face, as data-protection law asks of biometric
data kept for a purpose with an end (a visitor's badge photo, an event's attendees). The sweep, run by
the service (timed as below), erases each face enrolled more than that long ago,
oldest first, exactly as ``POST /faces/delete`` would: the vector from the store, the index, the
snapshot and the WAL, its kept crop, and its identity with its last face; each erasure has its
``face.deleted`` audit entry, in the same transaction, with ``via: "retention"``. A write erases
``CHUNK`` faces (one transaction, one snapshot scrub, one fsync), short enough that an enrollment
beside it waits milliseconds.

Faces, not identities, expire: an identity enrolled again keeps its new faces for the full period
and loses the old ones on time. A face moved or merged keeps its enrollment time, and so does one
re-embedded by a migration (``enroll(..., enrolled_at=)``, whose new collection gets the old one's
retention) or moved by a gallery file (``import_identities(..., enrolled_at=)``): neither extends how
long a face is kept.

The service's sweeper follows a :class:`Schedule`: each round is timed for the soonest expiry it knows
of (each collection's oldest face plus its retention), at least ``MIN_GAP_S`` after the last and at
most ``FACE_RETENTION_SWEEP_S``, so a face is erased about a second after its expiry (plus the time a
backlog takes: thousands of faces a second, bench/README.md "Retention sweeps"). A full round, every
``FACE_RETENTION_SWEEP_S``, sweeps every collection with a retention; the rounds between sweep only
the collections due by then, new ones and those whose retention changed (the catalog's retentions are
read each round), so a steady stream of expiries in one collection costs a round of that collection a
second, not of every collection (bench/README.md "Retention rounds"). What a round cannot know of
beforehand waits at most ``FACE_RETENTION_SWEEP_S``, for the next full round: a face imported with an
old enrollment time, one enrolled into a collection with nothing else to expire less than that before
its own expiry. Every replica sweeps;
two replicas that reach the same face erase it once (the other finds it gone), and each takes the
page of oldest faces in its own random order.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field

from .api import Actor, CollectionNotFound, Galleries, GalleryBackend
from .embedded.gallery import GalleryLoading

DAY_S = 86_400.0
MIN_GAP_S = 1.0  # sweeps timed for an expiry start at least this far apart (a steady stream of expiries)
LATE_S = 0.01  # a sweep timed for an expiry starts this much after it (its cutoff is strict)
BATCH = 256  # expired faces read per query
CHUNK = 64  # of which each write erases this many, in one transaction (delete_faces)
RETENTION = Actor(via="retention")  # who the audit entry names: no key, no client


@dataclass
class SweepResult:
    erased: dict[str, int] = field(default_factory=dict)  # collection -> faces erased
    identities_deleted: dict[str, int] = field(default_factory=dict)  # collection -> identities gone with them
    failed: dict[str, str] = field(default_factory=dict)  # collection -> why its sweep stopped (retried next time)


def sweep(galleries: Galleries, now: float | None = None, stop: threading.Event | None = None,
          batch: int = BATCH, chunk: int = CHUNK) -> SweepResult:
    """Erase every face past its collection's retention as of ``now`` (default: the time of the call);
    returns what it erased. ``stop`` set: returns after the erasure in progress (the service stopping)."""
    now = time.time() if now is None else now
    result = SweepResult()
    for name, days in galleries.retentions().items():
        try:
            _sweep_collection(galleries.collection(name), now - days * DAY_S, stop, batch, chunk, result)
        except (CollectionNotFound, GalleryLoading):  # deleted since the list was read; its index still loading
            continue
        except Exception as exc:  # noqa: BLE001 - one collection (its disk full, its database away) does not stop the others
            result.failed[name] = f"{type(exc).__name__}: {exc}"
    return result


def _sweep_collection(gallery: GalleryBackend, cutoff: float, stop: threading.Event | None, batch: int,
                      chunk: int, result: SweepResult) -> None:
    name = gallery.name
    while True:
        expired = gallery.expired_faces(cutoff, batch)
        before = result.erased.get(name, 0)
        # the oldest page, in a random order: replicas sweeping one backlog at once (each reads the same
        # page) mostly erase different faces instead of queueing on the same rows
        shuffled = random.sample(expired, len(expired))
        for start in range(0, len(shuffled), chunk):
            if stop is not None and stop.is_set():
                return
            # faces erased meanwhile (a client, another replica's sweep) come back not_found
            erased = gallery.delete_faces(shuffled[start:start + chunk], RETENTION).deleted
            result.erased[name] = result.erased.get(name, 0) + len(erased)
            result.identities_deleted[name] = (result.identities_deleted.get(name, 0)
                                               + len({d.identity_id for d in erased if d.identity_deleted}))
        if len(expired) < batch or result.erased.get(name, 0) == before:  # the last page, or none erasable
            return


@dataclass
class Schedule:
    """Which collections the sweeper's rounds sweep and when (module docstring): ``round`` sweeps,
    ``wait_s`` says how long until the next round."""

    every_s: float  # FACE_RETENTION_SWEEP_S: the most between two rounds, and between two full rounds
    # collection -> (its retention in days, when its next face expires: None for none, or unknown
    # until the next full round after its sweep failed)
    known: dict[str, tuple[float, float | None]] = field(default_factory=dict)
    full_at: float = float("-inf")  # when the next full round is due (Unix time)
    # collection -> when the oldest face it still holds past its retention expired: left by a sweep
    # that failed (a read may still tell) or stopped; gone once a sweep leaves nothing expired
    held: dict[str, float] = field(default_factory=dict)

    def round(self, galleries: Galleries, now: float | None = None, stop: threading.Event | None = None,
              full: bool | None = None, batch: int = BATCH, chunk: int = CHUNK) -> SweepResult:
        """Sweep the collections due as of ``now`` (every one with a retention when the full round is due,
        or ``full``), then read their next expiry; as ``sweep`` otherwise."""
        now = time.time() if now is None else now
        retentions = galleries.retentions()
        previous = self.known
        if full or (full is None and now >= self.full_at):
            self.full_at = now + self.every_s
            self.known = {}
        self.known = {name: known for name, known in self.known.items() if name in retentions}
        self.held = {name: expiry for name, expiry in self.held.items() if name in retentions}
        result = SweepResult()
        for name, days in retentions.items():
            known = self.known.get(name)
            if known is not None and known[0] == days and (known[1] is None or known[1] > now):
                if name in self.held:  # its sweep failed: are its faces still held? (a read, no erasure: a
                    # client or replica may have erased them; still failing, it stays held as it was)
                    self._held(name, self._expiry_after_failure(galleries, name, days, None), now)
                continue  # nothing of it expires before its next expiry, or before the next full round
            if stop is not None and stop.is_set():
                break
            expiry: float | None = None
            try:
                gallery = galleries.collection(name)
                _sweep_collection(gallery, now - days * DAY_S, stop, batch, chunk, result)
                expiry = _expiry(gallery, days)
            except CollectionNotFound:  # deleted since the list was read
                self.held.pop(name, None)
                continue
            except GalleryLoading:  # its index still loading: tried again in MIN_GAP_S
                expiry = now
            except Exception as exc:  # noqa: BLE001 - one collection (its disk full, its database away) does not stop the others
                result.failed[name] = f"{type(exc).__name__}: {exc}"
                self._held(name, self._expiry_after_failure(galleries, name, days, previous.get(name)), now)
            else:
                self._held(name, expiry, now)
            self.known[name] = (days, expiry)
        return result

    def _expiry_after_failure(self, galleries: Galleries, name: str, days: float,
                              previous: tuple[float, float | None] | None) -> float | None:
        """The collection's next expiry after its sweep failed: read again (a read may work where an
        erasure did not: a full disk, deletes refused), else the soonest known: what it held, or
        ``previous`` (the schedule's before the round) at the same retention."""
        try:
            return _expiry(galleries.collection(name), days)
        except Exception:  # noqa: BLE001 - its database away: what the schedule knew is the best left
            known = [t for t in (self.held.get(name), previous[1] if previous and previous[0] == days else None)
                     if t is not None]
            return min(known, default=None)

    def _held(self, name: str, expiry: float | None, now: float) -> None:
        if expiry is not None and expiry <= now:
            self.held[name] = expiry
        else:
            self.held.pop(name, None)

    def overdue_s(self, now: float) -> dict[str, float]:
        """Each collection's seconds past the expiry of the oldest face it still holds past its retention,
        as far as the schedule knows (0: none; a face due is erased within about a second): what a sweep
        left (failed, stopped) and each next expiry that passed without a round to sweep it (the
        sweeper stalled). Read by /metrics from another thread: copies only."""
        known, held = self.known.copy(), self.held.copy()
        overdue = {name: 0.0 for name in known.keys() | held.keys()}
        for name, (_, expiry) in known.items():
            if expiry is not None and expiry < now:
                overdue[name] = now - expiry
        for name, expiry in held.items():
            overdue[name] = max(overdue[name], now - expiry)
        return overdue

    def next_due(self) -> float | None:
        """The soonest next expiry known (Unix time); None: none."""
        return min((expiry for _, expiry in self.known.values() if expiry is not None), default=None)

    def wait_s(self, now: float) -> float:
        """Seconds until the next round: the soonest expiry, or the next full round, whichever is first."""
        return wait_s(self.next_due(), now, max(MIN_GAP_S, min(self.every_s, self.full_at - now)))


def _expiry(gallery: GalleryBackend, days: float) -> float | None:
    oldest = gallery.oldest_enrollment()
    return None if oldest is None else oldest + days * DAY_S


def next_expiry(galleries: Galleries, skip: set[str] | frozenset[str] = frozenset()) -> float | None:
    """When the next face of any collection with a retention expires (Unix time), the collections in
    ``skip`` (their last sweep failed) left out; None: no face will."""
    due: float | None = None
    for name, days in galleries.retentions().items():
        if name in skip:
            continue
        try:
            expiry = _expiry(galleries.collection(name), days)
        except Exception:  # noqa: BLE001 - deleted since, loading, failing: its sweep reports it; the others are timed
            continue
        if expiry is not None:
            due = expiry if due is None else min(due, expiry)
    return due


def wait_s(due: float | None, now: float, every_s: float) -> float:
    """How long the sweeper waits for its next sweep: until ``due`` (just after), but at least MIN_GAP_S
    and at most ``every_s`` (FACE_RETENTION_SWEEP_S)."""
    if due is None:
        return every_s
    return min(every_s, max(MIN_GAP_S, due - now + LATE_S))
