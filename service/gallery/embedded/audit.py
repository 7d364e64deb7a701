"""The audit table of the embedded backend: one in each collection's store (written in the
transaction of the change it records) and one in the catalog (collections, keys, and the trail of a
deleted collection), read back merged, newest first.

An entry's id is ``<at>:<source>:<seq>``: its time (``repr`` of the float, exact), the table it
lies in (a collection's name, or ``_catalog``, which no collection can be named) and its row number
there. Entries are ordered by (at, source, seq), so a cursor (the last id of a page) says exactly,
in every table, which entries come after it.
"""

from __future__ import annotations

import heapq
import json
import math
import sqlite3
from collections.abc import Iterable
from typing import NamedTuple

from ..api import MAX_ROW_ID, Actor, AuditEntry, AuditQuery, InvalidAuditCursor
from .sqlite import write_transaction

CATALOG_SOURCE = "_catalog"  # not a valid collection name: never confused with one

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    at          REAL NOT NULL,
    action      TEXT NOT NULL,
    key_id      TEXT,
    client      TEXT,
    request_id  TEXT,
    collection  TEXT,
    identity_id TEXT,
    details     TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS audit_by_time ON audit(at, seq);
"""

_COLUMNS = "seq, at, action, key_id, client, request_id, collection, identity_id, details"


class Row(NamedTuple):
    """An audit row as stored (what a collection's trail is copied into the catalog as)."""

    at: float
    action: str
    key_id: str | None
    client: str | None
    request_id: str | None
    collection: str | None
    identity_id: str | None
    details: str  # JSON


def record(conn: sqlite3.Connection, at: float, action: str, actor: Actor, collection: str | None,
           identity_id: str | None, details: dict) -> None:
    """Insert one entry on ``conn``, inside the caller's transaction."""
    insert(conn, [Row(at, action, actor.key_id, actor.client, actor.request_id, collection, identity_id,
                      json.dumps(actor.recorded(details)))])


def insert(conn: sqlite3.Connection, rows: Iterable[Row]) -> None:
    conn.executemany(
        "INSERT INTO audit(at, action, key_id, client, request_id, collection, identity_id, details) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", list(rows))


def all_rows(conn: sqlite3.Connection) -> list[Row]:
    """Every entry of a table, oldest first (a collection's trail, to keep when it is deleted)."""
    return [Row(*r) for r in conn.execute(
        "SELECT at, action, key_id, client, request_id, collection, identity_id, details FROM audit "
        "ORDER BY at, seq")]



class Cursor(NamedTuple):
    at: float
    source: str
    seq: int


def parse_cursor(entry_id: str) -> Cursor:
    """InvalidAuditCursor for an id this backend did not make (its parts are a finite time, a store's
    name and a row number SQLite can hold)."""
    try:
        at, source, seq = entry_id.split(":")
        cursor = Cursor(float(at), source, int(seq))
    except ValueError:
        raise InvalidAuditCursor(entry_id) from None
    if not (math.isfinite(cursor.at) and source and 0 < cursor.seq <= MAX_ROW_ID):
        raise InvalidAuditCursor(entry_id)
    return cursor


def query(conn: sqlite3.Connection, source: str, q: AuditQuery) -> list[tuple[tuple[float, str, int], AuditEntry]]:
    """Up to ``q.limit`` entries of one table matching ``q``, newest first, each with its sort key.
    The filters and the cursor are SQL: a long trail is never read whole."""
    where: list[str] = []
    args: list[str | float | int] = []
    for column, value in (("collection", q.collection), ("identity_id", q.identity_id), ("key_id", q.key_id)):
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value)
    if q.since is not None:
        where.append("at >= ?")
        args.append(q.since)
    if q.until is not None:
        where.append("at < ?")
        args.append(q.until)
    if q.cursor is not None:
        c = parse_cursor(q.cursor)
        if source < c.source:
            where.append("at <= ?")
            args.append(c.at)
        elif source > c.source:
            where.append("at < ?")
            args.append(c.at)
        else:
            where.append("(at < ? OR (at = ? AND seq < ?))")
            args += [c.at, c.at, c.seq]
    sql = f"SELECT {_COLUMNS} FROM audit"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY at DESC, seq DESC LIMIT ?"
    args.append(q.limit)
    out = []
    for seq, at, action, key_id, client, request_id, collection, identity_id, details in conn.execute(sql, args):
        entry = AuditEntry(f"{at!r}:{source}:{seq}", at, action, key_id, client, request_id, collection,
                           identity_id, json.loads(details))
        out.append(((at, source, seq), entry))
    return out


def merge(pages: list[list[tuple[tuple[float, str, int], AuditEntry]]], limit: int) -> list[AuditEntry]:
    """The newest ``limit`` entries of several tables' pages (each newest first)."""
    merged = heapq.merge(*pages, key=lambda item: item[0], reverse=True)
    return [entry for _, entry in (item for _, item in zip(range(limit), merged))]


def prune(conn: sqlite3.Connection, before: float) -> int:
    """Delete entries older than ``before`` in one transaction; how many."""
    with write_transaction(conn):
        count = conn.execute("DELETE FROM audit WHERE at < ?", (before,)).rowcount
    return int(count)
