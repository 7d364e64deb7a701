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
  is left out until it catches up. The standbys are checked at once, each in a thread of its own: one
  that does not answer holds up no other's checks.
* **Failure.** A standby that cannot be reached, or fails during a read, is left out at once (the
  read runs again on the primary) and taken back when the checker reaches it again. A standby's
  failure never fails a request that the primary can answer.
* **A standby that stops answering** (a paused VM, a partition that resets no connection: its
  statement_timeout, enforced by the server, never fires). Each check of the lag has a deadline
  (``FACE_DATABASE_TIMEOUT_S``): a standby that does not answer it is left out, the reads waiting on it
  are answered by the primary at once (their connections are cut), and it is taken back once it answers
  a check again. Each read on a standby runs in a worker thread that the request waits for with a
  deadline of its own too, the server's statement timeout and ``FACE_DATABASE_TIMEOUT_S`` more: past it,
  unless the checker has heard from the standby since the read began (a read of many statements, each
  within the timeout), the standby is left out the same way. Over TCP
  its connections also have keepalives and a ``tcp_user_timeout`` (unless its URL sets them), so a
  connection to a host that is gone ends.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import math
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import wait as wait_for
from contextlib import contextmanager
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
# how often a read waiting on a standby looks whether the checker has left that standby out
READ_WATCH_S = 0.05
# a standby's TCP connections (ignored on a Unix socket): a peer silent this long is gone
KEEPALIVES = {"keepalives": "1", "keepalives_idle": "5", "keepalives_interval": "2", "keepalives_count": "3"}
TCP_USER_TIMEOUT_MS = 10000


def with_keepalives(url: str) -> str:
    """A standby's URL with TCP keepalives and ``tcp_user_timeout`` added (those it sets are kept): a
    connection to a host that stopped answering ends instead of waiting for ever."""
    try:
        given = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return url  # the connection reports it
    added = {k: v for k, v in (KEEPALIVES | {"tcp_user_timeout": str(TCP_USER_TIMEOUT_MS)}).items() if k not in given}
    return psycopg.conninfo.make_conninfo(url, **added) if added else url


def cut(conn: psycopg.Connection) -> None:
    """Shut the connection's socket down (from another thread): a call waiting on it fails at once
    (OperationalError) and the connection is broken (the pool discards it). For a server that does not
    answer, which a cancel request cannot reach either."""
    try:
        fd = conn.pgconn.socket
    except psycopg.Error:
        return  # closed already
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class Watchdog:
    """Cuts the connections whose calls run past their deadline (:func:`cut`), all from one thread: a
    deadline costs no thread of its own, so the pools can watch each connection they check."""

    def __init__(self) -> None:
        self._due: dict[object, tuple[float, psycopg.Connection]] = {}
        self._changed = threading.Condition()
        self._wakes_at = math.inf
        self._thread: threading.Thread | None = None

    @contextmanager
    def within(self, conn: psycopg.Connection, timeout_s: float) -> Iterator[None]:
        """Calls on ``conn`` in the block fail (OperationalError) once ``timeout_s`` has passed. Never cut
        once the block is over (both under the lock): a connection closed since may have its fd reused."""
        token, due = object(), time.monotonic() + timeout_s
        with self._changed:
            self._due[token] = (due, conn)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="face-db-deadlines", daemon=True)
                self._thread.start()
            if due < self._wakes_at:
                self._changed.notify()
        try:
            yield
        finally:
            with self._changed:
                self._due.pop(token, None)

    def _run(self) -> None:
        with self._changed:
            while True:
                now = time.monotonic()
                for token, (due, conn) in list(self._due.items()):
                    if due <= now:
                        del self._due[token]
                        cut(conn)
                self._wakes_at = min((due for due, _ in self._due.values()), default=math.inf)
                self._changed.wait(None if self._wakes_at == math.inf else self._wakes_at - now)


WATCHDOG = Watchdog()


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
        self.outages = 0  # times left out: a read waiting on it gives up when this changes
        self.answered_at = 0.0  # when (monotonic) it last answered a check
        # the connections its reads hold now (cut when it is left out for not answering)
        self.reading: set[psycopg.Connection] = set()
        self._reading_lock = threading.Lock()

    def in_rotation(self, max_lag_s: float) -> bool:
        return self.up and self.lag_s is not None and self.lag_s <= max_lag_s

    def left_out(self, why: str) -> None:
        self.failures += 1
        self.outages += 1
        if self.up:
            log.warning("standby left out", extra={"standby": self.name, "reason": why})
        self.up = False
        self.lag_s = None

    def silent(self, why: str) -> None:
        """It does not answer (a check or a read past its deadline): left out, and the connections its
        reads hold are cut, so that they end now rather than when it answers again. (Under the lock: a
        connection in the set is not given back to the pool, so not closed, while it is cut.)"""
        self.left_out(why)
        with self._reading_lock:
            for conn in self.reading:
                cut(conn)

    def holding(self, conn: psycopg.Connection, held: bool) -> None:
        with self._reading_lock:
            if held:
                self.reading.add(conn)
            else:
                self.reading.discard(conn)

    def damaged(self, why: str) -> None:
        """A read met data this standby holds damaged (XX001, XX002): the primary answers it instead; the
        standby stays in rotation for its other reads (its damage is its own, not the primary's)."""
        self.failures += 1
        if not self.damage_logged:
            self.damage_logged = True
            log.error("standby holds damaged data: the reads that meet it are answered by the primary; rebuild "
                      "the standby (pg_basebackup)", extra={"standby": self.name, "reason": why})

    def replay_lsn(self, timeout_s: float) -> int:
        """Its replayed WAL position, over the checker's own connection (reconnected when lost; the
        connection's connect_timeout bounds that). No answer within ``timeout_s``: the connection is cut
        (psycopg.OperationalError)."""
        fresh = self._check_conn is None or self._check_conn.closed
        if fresh:
            self._check_conn = psycopg.connect(with_keepalives(self.url), **self._connect_kwargs)
        conn = self._check_conn
        assert conn is not None
        lock, checking = threading.Lock(), [True]

        def expired() -> None:
            with lock:  # never once the check is over (the connection may be closed, its fd reused)
                if checking[0]:
                    cut(conn)

        watchdog = threading.Timer(timeout_s, expired)
        watchdog.daemon = True
        watchdog.start()
        try:
            if fresh:
                self.buffers = check_buffer_fit(conn, self._schema, f"standby {self.name}")
            row = conn.execute(REPLAY_LSN_SQL).fetchone()
        finally:
            watchdog.cancel()
            with lock:
                checking[0] = False
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
                 wait_s: float, check_interval_s: float, timeout_s: float = 5.0,
                 statement_timeout_s: float = 15.0) -> None:
        self.standbys = standbys
        # a check unanswered this long leaves the standby out; a read unanswered for its statement
        # timeout and this long (the server would have ended it) is answered by the primary
        self.timeout_s = timeout_s
        self.read_deadline_s = statement_timeout_s + timeout_s
        # the standby reads run here, the request waiting with a deadline: a read on a standby that does
        # not answer can hang in the pool's check of its connection, out of reach of any cut. A read
        # never waits for a worker: with none free it goes on as with every connection busy
        workers = max(4, sum(2 * s.pool.size + 2 for s in standbys))
        self._workers = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="face-standby-read")
        self._free_workers = threading.BoundedSemaphore(workers)
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
        # each standby's check in a thread of its own, at most one at a time: a round does not wait for a
        # check still waiting out its deadline (a standby that does not answer), it checks the others
        self._checks = ThreadPoolExecutor(max_workers=max(1, len(standbys)), thread_name_prefix="face-standby-probe")
        self._checking: list[Future[None] | None] = [None] * len(standbys)
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
        self._checks.shutdown(wait=False, cancel_futures=True)
        wait_for([f for f in self._checking if f is not None], timeout=10)
        if self._primary_conn is not None:
            self._primary_conn.close()
        for standby in self.standbys:
            standby.close()
        self._workers.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        while not self._stop.wait(self.check_interval_s):
            try:
                self.check(wait=False)
            except Exception:  # noqa: BLE001 - the checker must outlive anything one round meets
                log.exception("standby check failed")

    # --- the lag checker ---------------------------------------------------------------------------
    def _primary_lsn(self) -> int | None:
        try:
            if self._primary_conn is None or self._primary_conn.closed:
                self._primary_conn = psycopg.connect(self.primary_url, **self._connect_kwargs)
            with WATCHDOG.within(self._primary_conn, self.timeout_s):  # a primary that does not answer
                row = self._primary_conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
            return consistency.parse_lsn(row[0]) if row else None
        except psycopg.Error:
            if self._primary_conn is not None:
                self._primary_conn.close()
            return None  # the primary is down: lags cannot be measured now, they keep their last value

    def check(self, wait: bool = True) -> None:
        """One round: the primary's position, then each standby's replayed position and lag, all standbys
        at once. ``wait``: until their checks end (each within its deadline); else a standby whose last
        check has not ended yet is left to it, and the others are checked on time."""
        primary = self._primary_lsn()
        now = time.monotonic()
        if primary is not None:
            self._samples.append((now, primary))
        samples = list(self._samples)
        for i, standby in enumerate(self.standbys):
            running = self._checking[i]
            if running is None or running.done():
                self._checking[i] = self._checks.submit(self._check_one, standby, primary, samples, now)
        if wait:
            wait_for([f for f in self._checking if f is not None])

    def _check_one(self, standby: Standby, primary: int | None, samples: list[tuple[float, int]], now: float) -> None:
        try:
            self._check(standby, primary, samples, now)
        except Exception:  # noqa: BLE001 - the checks must outlive anything one meets
            log.exception("standby check failed", extra={"standby": standby.name})

    def _check(self, standby: Standby, primary: int | None, samples: list[tuple[float, int]], now: float) -> None:
        started = time.monotonic()
        try:
            replayed = standby.replay_lsn(self.timeout_s)
        except psycopg.Error as exc:
            if standby._check_conn is not None:  # noqa: SLF001
                standby._check_conn.close()  # noqa: SLF001
            if time.monotonic() - started >= self.timeout_s:  # no answer: the reads waiting there too
                standby.silent(f"no answer to the lag check within {self.timeout_s:g}s")
            else:
                standby.left_out(f"{type(exc).__name__}: {str(exc).strip()[:200]}")
            return
        if primary is None:
            if standby.lag_s is None:
                return  # nothing to measure against yet
        else:
            # the lag: since when the primary has had WAL that this standby has not replayed
            behind_since = next((t for t, lsn in samples if lsn > replayed), None)
            standby.lag_s = 0.0 if behind_since is None else now - behind_since
        was = standby.in_rotation(self.max_lag_s)
        standby.up = True
        standby.answered_at = time.monotonic()
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

    def _on_standby(self, standby: Standby, body: Callable[[psycopg.Connection], T], floor: int | None
                    ) -> tuple[bool, T | None]:
        """``body`` on one of the standby's connections (in a worker thread): (False, None) when the
        standby has not replayed ``floor`` within the wait."""
        try:
            with standby.pool.connection(timeout_s=STANDBY_BORROW_TIMEOUT_S) as conn:
                standby.holding(conn, True)
                try:
                    if floor is not None and not caught_up(conn, floor, self.wait_s):
                        return False, None
                    return True, body(conn)
                finally:
                    standby.holding(conn, False)
        finally:
            self._free_workers.release()

    def _wait(self, standby: Standby, attempt: Future[tuple[bool, T | None]]) -> tuple[bool, T | None]:
        """The attempt's outcome; GalleryUnavailable when the standby does not answer: it was left out
        meanwhile (the checker got no answer, or another read failed there), or the read ran past its
        deadline while the checker has not heard from it since the read began."""
        outages, began = standby.outages, time.monotonic()
        deadline = began + self.read_deadline_s
        while True:
            try:
                return attempt.result(timeout=READ_WATCH_S)
            except FutureTimeout:
                pass
            if standby.outages != outages:
                raise GalleryUnavailable(f"standby {standby.name} left out during the read")
            if time.monotonic() >= deadline:
                if standby.answered_at > began:  # it answers: a long read of many statements
                    deadline += self.read_deadline_s
                    continue
                standby.silent(f"no answer to a read within {self.read_deadline_s:g}s")
                raise GalleryUnavailable(f"standby {standby.name}: no answer to a read within "
                                         f"{self.read_deadline_s:g}s")

    def read(self, body: Callable[[psycopg.Connection], T], primary: Pool) -> T:
        """``body`` on a standby in rotation that has replayed what the request must see, else on the
        primary's read pool. ``body`` only reads, so it runs again on the primary after a failure. In
        :func:`consistency.on_primary` (the lookups that decide a write) it runs on the primary."""
        floor = consistency.required()
        for standby in [] if consistency.primary_only() else self._rotation():
            try:
                if not self._free_workers.acquire(blocking=False):
                    raise GalleryBusy("every standby read worker is in use")
                context = contextvars.copy_context()  # the request's, in the worker thread too
                try:
                    attempt = self._workers.submit(context.run, self._on_standby, standby, body, floor)
                except RuntimeError:  # shut down (the gallery is closing)
                    self._free_workers.release()
                    raise
                done, result = self._wait(standby, attempt)
                if not done:
                    standby.behind += 1
                    break  # another standby is likely no further along: the primary has it
            except GalleryBusy:
                continue  # its connections are all in use: the next one, else the primary
            except GalleryUnavailable as exc:
                standby.left_out(str(exc))
                continue
            except DAMAGED_DATA as exc:
                standby.damaged(f"{type(exc).__name__}: {str(exc).strip()[:300]}")
                continue
            standby.reads += 1
            return result  # type: ignore[return-value]  # done: body's own result
        with primary.connection() as conn:
            result = body(conn)
        self.primary_reads += 1
        return result

    def targets(self) -> list[ReadTarget]:
        return [ReadTarget("primary", "primary", True, 0.0, self.primary_reads)] + [
            ReadTarget(s.name, "standby", s.in_rotation(self.max_lag_s), s.lag_s, s.reads, s.behind, s.failures,
                       s.buffers.counters() if s.buffers else {})
            for s in self.standbys]
