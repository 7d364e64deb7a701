"""``python -m service audit export|prune``: the audit trail, from the operator's shell.

* ``export [--collection C] [--identity ID] [--key ID] [--since T] [--until T] [--output FILE]``: the
  entries that match every filter given, as JSON Lines, OLDEST FIRST (one object per line, the fields
  of ``GET /audit``'s items: entry_id, at (unix seconds), action, key_id, client, request_id,
  collection, identity_id, details), to stdout or to FILE (written whole, then renamed: a file that
  exists is complete). Times are ISO 8601; one without a zone is UTC. ``--since`` is inclusive,
  ``--until`` exclusive, as in ``GET /audit``.
* ``prune --older-than-days N``: delete the entries older than N days now (what
  FACE_AUDIT_RETENTION_DAYS does on its own); prints how many.

The backend pages newest first (``Galleries.audit``); export turns that around without holding the
trail in memory: each page goes, reversed, to a spool file, and the pages are copied out last first.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import IO

from ..gallery.api import AuditQuery, Galleries
from ..model.files import replace_atomically
from .backend import CommandError, add_backend_arguments, fail, opened_backend, parse_time, settings_from

PAGE = 1000  # entries per Galleries.audit call (GET /audit's largest page)


def export_audit(galleries: Galleries, query: AuditQuery, out: IO[str]) -> int:
    """Write every entry matching ``query`` (its limit and cursor are ignored) to ``out`` oldest first."""
    pages: list[tuple[int, int]] = []  # (offset, length) in the spool, newest page first
    count = 0
    with tempfile.TemporaryFile("w+b") as spool:
        cursor = None
        while True:
            entries = galleries.audit(AuditQuery(collection=query.collection, identity_id=query.identity_id,
                                                 key_id=query.key_id, since=query.since, until=query.until,
                                                 limit=PAGE, cursor=cursor))
            if not entries:
                break
            chunk = "".join(json.dumps(asdict(e)) + "\n" for e in reversed(entries)).encode()
            pages.append((spool.tell(), len(chunk)))
            spool.write(chunk)
            count += len(entries)
            if len(entries) < PAGE:
                break
            cursor = entries[-1].entry_id
        for offset, length in reversed(pages):
            spool.seek(offset)
            out.write(spool.read(length).decode())
    return count


def _export(args: argparse.Namespace, galleries: Galleries) -> None:
    query = AuditQuery(collection=args.collection, identity_id=args.identity, key_id=args.key,
                       since=parse_time(args.since) if args.since else None,
                       until=parse_time(args.until) if args.until else None)
    if args.output is None:
        count = export_audit(galleries, query, sys.stdout)
        sys.stdout.flush()
    else:
        output: Path = args.output
        counted: list[int] = []

        def write(part: Path) -> None:
            with open(part, "w", encoding="utf-8") as out:
                counted.append(export_audit(galleries, query, out))

        try:  # a file of this export's own, fsynced and renamed whole (two exports at once each rename theirs)
            replace_atomically(output, write, durable=True, private=True)
        except OSError as exc:
            raise CommandError(f"cannot write {output}: {exc.strerror or exc}") from exc
        count = counted[0]
    sys.stderr.write(f"{count} audit entries exported\n")


def _prune(args: argparse.Namespace, galleries: Galleries) -> None:
    before = time.time() - args.older_than_days * 86400
    removed = galleries.prune_audit(before)
    sys.stdout.write(json.dumps({"removed": removed, "before": before}) + "\n")


def _days(value: str) -> float:
    number = float(value)
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of days, not {value}")
    return number


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m service audit",
        description="The audit trail: export it as JSON Lines (oldest first), prune old entries. The backend is "
        "the server's: FACE_* settings (FACE_DATABASE_URL for PostgreSQL, else FACE_DATA_DIR) and these flags; "
        "a server may be running on it.")
    add_backend_arguments(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="write the entries matching every filter given, oldest first")
    export.add_argument("--collection", help="entries of this collection only")
    export.add_argument("--identity", metavar="ID", help="entries of this identity id only")
    export.add_argument("--key", metavar="KEY_ID", help="changes made with this key only")
    export.add_argument("--since", metavar="ISO8601", help="entries at or after this time (no zone: UTC)")
    export.add_argument("--until", metavar="ISO8601", help="entries before this time (no zone: UTC)")
    export.add_argument("--output", type=Path, metavar="FILE", help="write here (whole, then renamed); default: stdout")
    prune = sub.add_parser("prune", help="delete entries older than N days")
    prune.add_argument("--older-than-days", type=_days, required=True, metavar="N")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from ..ops.logging import configure_logging

    configure_logging("warning", False)
    try:
        settings = settings_from(args)
        if args.command == "export" and args.since and args.until and parse_time(args.since) >= parse_time(args.until):
            raise CommandError("--since must be before --until")
        with opened_backend(settings) as galleries:
            _export(args, galleries) if args.command == "export" else _prune(args, galleries)
    except CommandError as exc:
        return fail(exc)
    return 0
