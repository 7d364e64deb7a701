"""Reads on PostgreSQL streaming-replication standbys (``FACE_DATABASE_READ_URLS``).

Writes go to the primary; searches, lookups and lists go to a standby in rotation (round robin),
else to the primary. What keeps that correct:

* **Read-your-writes.** A read that must see a WAL position (the request's consistency token,
  :mod:`.consistency`) asks the standby's ``pg_last_wal_replay_lsn()`` on the very connection it then
  reads on (replay only moves forward, so the read's snapshot holds the write), waiting up to
  ``FACE_DATABASE_READ_WAIT_MS``; a standby still behind sends the read to the primary.
* **Lag.** A checker thread per process compares, every ``FACE_DATABASE_LAG_CHECK_MS``, each standby's
  replayed position with the primary's recent positions: its lag is how long ago the primary had
  written what the standby has not yet replayed. A standby lagging more than ``FACE_DATABASE_MAX_LAG_MS``
  is left out until it catches up.
* **Failure.** A standby that cannot be reached, or fails during a read, is left out at once (the
  read runs again on the primary) and taken back when the checker reaches it again. A standby's
  failure never fails a request that the primary can answer.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import psycopg

from ..api import GalleryBusy, GalleryUnavailable, ReadTarget
from . import consistency
from .memory import BufferFit, check_buffer_fit

if TYPE_CHECKING:
    from .backend import Pool

log = logging.getLogger(__name__)

# data PostgreSQL finds damaged (XX001 data_corrupted, XX002 index_corrupted: a disk fault, a bad
# restore): nothing a retry mends
DAMAGED_DATA = (psycopg.errors.DataCorrupted, psycopg.errors.IndexCorrupted)
T = TypeVar("T")

# a standby's pool is only borrowed from briefly: when all its connections are busy the primary reads
STANDBY_BORROW_TIMEOUT_S = 0.25
REPLAY_POLL_S = 0.005
# the replayed position of a standby; a primary listed as a read URL counts as never behind
REPLAY_LSN_SQL = "SELECT COALESCE(pg_last_wal_replay_lsn(), pg_current_wal_lsn())::text"


class Standby:
    def __init__(self, name: str, url: str, pool: Pool, connect_kwargs: dict, schema: str) -> None:
        self.name = name
        self.url = url
        self.pool = pool
        self._connect_kwargs = connect_kwargs
        self._schema = schema
        self._check_conn: psycopg.Connection | None = None
        # its own shared_buffers against the index, read (and logged when the index does not fit) each time
        # the checker connects: a setting that changes only with a restart, which drops the connection
        self.buffers: BufferFit | None = None
        self.up = False  # the last check or read reached it
        self.lag_s: float | None = None
        self.reads = 0
        self.behind = 0
        self.failures = 0
        self.damage_logged = False  # a read met damaged data here (logged once; each such read went to the primary)

    def in_rotation(self, max_lag_s: float) -> bool:
        return self.up and self.lag_s is not None and self.lag_s <= max_lag_s

    def left_out(self, why: str) -> None:
        self.failures += 1
        if self.up:
            log.warning("standby left out", extra={"standby": self.name, "reason": why})
        self.up = False
        self.lag_s = None

    def damaged(self, why: str) -> None:
        """A read met data this standby holds damaged (XX001, XX002): the primary answers it instead; the
        standby stays in rotation for its other reads (its damage is its own, not the primary's)."""
        self.failures += 1
        if not self.damage_logged:
            self.damage_logged = True
            log.error("standby holds damaged data: the reads that meet it are answered by the primary; rebuild "
                      "the standby (pg_basebackup)", extra={"standby": self.name, "reason": why})

    def replay_lsn(self) -> int:
        """Its replayed WAL position, over the checker's own connection (reconnected when lost)."""
        if self._check_conn is None or self._check_conn.closed:
            self._check_conn = psycopg.connect(self.url, **self._connect_kwargs)
            self.buffers = check_buffer_fit(self._check_conn, self._schema, f"standby {self.name}")
        row = self._check_conn.execute(REPLAY_LSN_SQL).fetchone()
        return consistency.parse_lsn(row[0]) if row and row[0] else 0

    def close(self) -> None:
        if self._check_conn is not None:
            self._check_conn.close()
        self.pool.close()


def caught_up(conn: psycopg.Connection, lsn: int, wait_s: float) -> bool:
    """True once the server behind ``conn`` has replayed ``lsn`` (polled for at most ``wait_s``)."""
    deadline = time.monotonic() + wait_s
    while True:
        row = conn.execute(REPLAY_LSN_SQL).fetchone()
        if row and row[0] and consistency.parse_lsn(row[0]) >= lsn:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(REPLAY_POLL_S)


class Standbys:
    """The standbys of one gallery: rotation, read routing with fallback to the primary, the lag checker."""

    def __init__(self, standbys: list[Standby], primary_url: str, connect_kwargs: dict, *, max_lag_s: float,
                 wait_s: float, check_interval_s: float) -> None:
        self.standbys = standbys
        self.primary_url = primary_url
        self._connect_kwargs = connect_kwargs
        self.max_lag_s = max_lag_s
        self.wait_s = wait_s
        self.check_interval_s = check_interval_s
        self.primary_reads = 0
        self._next = itertools.count()
        # (when, the primary's WAL position then): long enough to measure lags up to twice the bound
        self._samples: deque[tuple[float, int]] = deque(maxlen=max(16, int(2 * max_lag_s / check_interval_s) + 2))
        self._primary_conn: psycopg.Connection | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------------
    def open(self) -> None:
        """Open the standbys' pools without waiting (a standby that is down does not stop the start),
        check them once, then keep checking in the background."""
        for standby in self.standbys:
            standby.pool.open(wait=False)
        self.check()
        self._thread = threading.Thread(target=self._run, name="face-standby-check", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self._primary_conn is not None:
            self._primary_conn.close()
        for standby in self.standbys:
            standby.close()

    def _run(self) -> None:
        while not self._stop.wait(self.check_interval_s):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - the checker must outlive anything one round meets
                log.exception("standby check failed")

    # --- the lag checker ---------------------------------------------------------------------------
    def _primary_lsn(self) -> int | None:
        try:
            if self._primary_conn is None or self._primary_conn.closed:
                self._primary_conn = psycopg.connect(self.primary_url, **self._connect_kwargs)
            row = self._primary_conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
            return consistency.parse_lsn(row[0]) if row else None
        except psycopg.Error:
            if self._primary_conn is not None:
                self._primary_conn.close()
            return None  # the primary is down: lags cannot be measured now, they keep their last value

    def check(self) -> None:
        """One round: the primary's position, then each standby's replayed position and lag."""
        primary = self._primary_lsn()
        now = time.monotonic()
        if primary is not None:
            self._samples.append((now, primary))
        for standby in self.standbys:
            try:
                replayed = standby.replay_lsn()
            except psycopg.Error as exc:
                if standby._check_conn is not None:  # noqa: SLF001
                    standby._check_conn.close()  # noqa: SLF001
                standby.left_out(f"{type(exc).__name__}: {str(exc).strip()[:200]}")
                continue
            if primary is None:
                if standby.lag_s is None:
                    continue  # nothing to measure against yet
            else:
                # the lag: since when the primary has had WAL that this standby has not replayed
                behind_since = next((t for t, lsn in self._samples if lsn > replayed), None)
                standby.lag_s = 0.0 if behind_since is None else now - behind_since
            was = standby.in_rotation(self.max_lag_s)
            standby.up = True
            if standby.in_rotation(self.max_lag_s) != was:
                log.info("standby in rotation" if not was else "standby left out: lagging",
                         extra={"standby": standby.name, "lag_s": round(standby.lag_s or 0.0, 3)})

    # --- reads ---------------------------------------------------------------------------------------
    def _rotation(self) -> list[Standby]:
        ready = [s for s in self.standbys if s.in_rotation(self.max_lag_s)]
        if not ready:
            return []
        first = next(self._next) % len(ready)
        return ready[first:] + ready[:first]

    def read(self, body: Callable[[psycopg.Connection], T], primary: Pool) -> T:
        """``body`` on a standby in rotation that has replayed what the request must see, else on the
        primary's read pool. ``body`` only reads, so it runs again on the primary after a failure. In
        :func:`consistency.on_primary` (the lookups that decide a write) it runs on the primary."""
        floor = consistency.required()
        for standby in [] if consistency.primary_only() else self._rotation():
            try:
                with standby.pool.connection(timeout_s=STANDBY_BORROW_TIMEOUT_S) as conn:
                    if floor is not None and not caught_up(conn, floor, self.wait_s):
                        standby.behind += 1
                        break  # another standby is likely no further along: the primary has it
                    result = body(conn)
            except GalleryBusy:
                continue  # its connections are all in use: the next one, else the primary
            except GalleryUnavailable as exc:
                standby.left_out(str(exc))
                continue
            except DAMAGED_DATA as exc:
                standby.damaged(f"{type(exc).__name__}: {str(exc).strip()[:300]}")
                continue
            standby.reads += 1
            return result
        with primary.connection() as conn:
            result = body(conn)
        self.primary_reads += 1
        return result

    def targets(self) -> list[ReadTarget]:
        return [ReadTarget("primary", "primary", True, 0.0, self.primary_reads)] + [
            ReadTarget(s.name, "standby", s.in_rotation(self.max_lag_s), s.lag_s, s.reads, s.behind, s.failures,
                       s.buffers.counters() if s.buffers else {})
            for s in self.standbys]
