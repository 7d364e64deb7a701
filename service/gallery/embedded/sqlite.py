"""SQLite writes shared by the store, the catalog and the audit trail: one write transaction, and a
full disk and a damaged file told apart from every other failure.

On a full disk SQLite fails the statement that needed a page, or the COMMIT, with ``SQLITE_FULL`` and
may roll the transaction back itself: the rollback here runs only when a transaction is still open
(a second ROLLBACK would raise and hide the first error). Nothing of the transaction is stored and
everything committed before stays readable; the error becomes ``StorageFull`` (507 ``storage_full``).
"""

from __future__ import annotations

import errno
import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

from ..api import StorageFull

log = logging.getLogger(__name__)

FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
SQLITE_FULL = 13  # sqlite3.SQLITE_FULL (Python 3.11+; not in every type stub)
# a file that is no database, or one whose pages SQLite finds inconsistent (a bad restore, a partial
# copy, a disk fault): nothing a retry or the client can mend
SQLITE_DAMAGED = frozenset({11, 26})  # SQLITE_CORRUPT, SQLITE_NOTADB


def is_storage_full(exc: BaseException) -> bool:
    """A full disk (or quota) as SQLite or the OS reports it."""
    if isinstance(exc, sqlite3.Error):
        return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) == SQLITE_FULL
    return isinstance(exc, OSError) and exc.errno in FULL_ERRNOS


def is_damaged(exc: BaseException) -> bool:
    """A database file SQLite cannot read as one (SQLITE_NOTADB) or finds damaged (SQLITE_CORRUPT)."""
    return isinstance(exc, sqlite3.DatabaseError) and (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in SQLITE_DAMAGED


@contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``; rolled back on any error, a full disk raised as ``StorageFull``."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException as exc:
        if conn.in_transaction:  # SQLite may have rolled back by itself (SQLITE_FULL at COMMIT does)
            conn.execute("ROLLBACK")
        if is_storage_full(exc):
            raise StorageFull(f"no space left for the gallery in {database_file(conn)}: {exc}") from exc
        raise


def checkpoint(conn: sqlite3.Connection) -> bool:
    """``PRAGMA wal_checkpoint(TRUNCATE)``: True when the WAL was copied into the database and emptied;
    False when readers kept it busy, or the disk is full (the WAL is kept whole: a later checkpoint, or
    the next open, copies it; nothing committed is lost)."""
    try:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    except sqlite3.OperationalError as exc:
        if not is_storage_full(exc):
            raise
        log.warning("WAL checkpoint not done: the disk is full; the WAL is kept until one succeeds",
                    extra={"database": database_file(conn)})
        return False
    return not busy


def database_file(conn: sqlite3.Connection) -> str:
    try:
        row = conn.execute("PRAGMA database_list").fetchone()
    except sqlite3.Error:
        return "the data dir"
    return str(row[2]) if row and row[2] else "the data dir"
