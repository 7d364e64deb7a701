"""``python -m service keys create|list|revoke``: API keys, from the operator's shell.

This is how the first admin key of a fresh install is made (``keys create --role admin``); after that
an admin key can make the others over HTTP (``POST /keys``) or here. The backend is the one the server
uses (FACE_DATA_DIR or FACE_DATABASE_URL), and a server may be running on it: a key made or revoked
here is seen by every replica within FACE_KEY_CACHE_S. Only the hash of a secret is stored
(service/access/keys.py, peppered with FACE_KEY_PEPPER_FILE when set); ``create`` prints the secret
once, on stdout alone (``KEY=$(python -m service keys create --role admin)``), how to use it on
stderr. Every change is audited as made ``via="cli"`` by user@host.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from ..access.keys import LATEST_EXPIRY, PepperFileError, key_view, load_pepper, new_key
from ..access.limits import MAX_RATE, MIN_RATE
from ..access.policy import SCOPED_ADMIN, Role
from ..gallery.api import CollectionNotFound, Galleries, valid_collection_name
from .backend import CommandError, add_backend_arguments, cli_actor, fail, iso, opened_backend, settings_from

ROLES = ("admin", "write", "read", "embed")
NOTE_MAX = 500  # as POST /keys (http/schemas.py KeyCreate)


def _scope(text: str | None, galleries: Galleries) -> tuple[str, ...] | None:
    """--collections a,b: each must be a valid name of an existing collection (None: all collections)."""
    if text is None:
        return None
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise CommandError("--collections names no collection (leave it out for a key on all collections)")
    for name in names:
        if not valid_collection_name(name):
            raise CommandError(f"{name!r} is not a collection name (lower-case letters, digits, '-' and '_')")
        try:
            galleries.collection_info(name)
        except CollectionNotFound as exc:
            raise CommandError(f"{exc}: create it first (POST /collections), or check the spelling") from exc
    return names


def _positive(value: str) -> float:
    number = float(value)
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {value}")
    return number


def _rate(value: str) -> float:
    """A key's own limit, as POST /keys takes it (smaller: a key that never gets a second request)."""
    number = _positive(value)
    if not MIN_RATE <= number <= MAX_RATE:
        raise argparse.ArgumentTypeError(f"must be {MIN_RATE} to {MAX_RATE:g} a second, not {value}")
    return number


def _note(value: str) -> str:
    if len(value) > NOTE_MAX:
        raise argparse.ArgumentTypeError(f"at most {NOTE_MAX} characters (POST /keys's limit), not {len(value)}")
    return value


def create(args: argparse.Namespace, galleries: Galleries, pepper: bytes, header: str) -> None:
    now = time.time()
    expires_at = now + args.expires_in_days * 86400 if args.expires_in_days is not None else None
    if expires_at is not None and expires_at >= LATEST_EXPIRY:  # as POST /keys: nothing stored
        raise CommandError(f"--expires-in-days {args.expires_in_days:g} ends in the year 5000 or later: "
                           "leave it out for a key that never expires")
    if args.role == Role.admin.value and args.collections is not None:
        raise CommandError(f"--role admin with --collections: {SCOPED_ADMIN} (--role write --collections ...)")
    made = new_key(args.role, _scope(args.collections, galleries), args.note or None, expires_at, pepper,
                   args.rate_limit_rps, args.rate_limit_faces_per_s, now=now)
    try:
        galleries.add_key(made.stored, actor=cli_actor())
    except CollectionNotFound as exc:  # deleted since _scope looked
        raise CommandError(f"{exc}: create it first (POST /collections), or check the spelling") from exc
    view = key_view(made.stored)
    if args.json:
        del view["revoked_at"], view["last_used_at"]  # the shape of POST /keys's answer
        sys.stdout.write(json.dumps({"key_id": made.stored.key_id, "secret": made.secret, **view}) + "\n")
        return
    scope = ", ".join(made.stored.collections) if made.stored.collections is not None else "all"
    expires = f", expires {iso(made.stored.expires_at)}" if made.stored.expires_at is not None else ""
    sys.stderr.write(f"key {made.stored.key_id}: role {made.stored.role}, collections {scope}{expires}.\n"
                     "The secret follows, shown this once: only its hash is stored, it cannot be shown again.\n"
                     f"Send it in the {header} header: curl -H '{header}: <secret>' http://HOST:PORT/whoami\n")
    sys.stdout.write(made.secret + "\n")


def list_keys(args: argparse.Namespace, galleries: Galleries) -> None:
    keys = galleries.list_keys()
    if args.json:
        sys.stdout.write(json.dumps({"items": [key_view(k) for k in keys]}) + "\n")
        return
    now = time.time()
    header = ("id", "role", "collections", "note", "created", "expires", "last used", "revoked")
    rows = [header]
    for k in keys:
        expired = k.expires_at is not None and k.expires_at <= now and k.revoked_at is None
        rows.append((k.key_id, k.role, ",".join(k.collections) if k.collections is not None else "*",
                     (k.note or "").replace("\n", " ")[:40], iso(k.created_at),
                     iso(k.expires_at) + (" (expired)" if expired else ""), iso(k.last_used_at) or "never",
                     iso(k.revoked_at)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        sys.stdout.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n")
    if not keys:
        sys.stdout.write("(no keys: the service runs in open mode unless FACE_API_KEY is set)\n")


def revoke(args: argparse.Namespace, galleries: Galleries) -> None:
    key = galleries.get_key(args.key_id)
    if key is None:
        raise CommandError(f"no key with id {args.key_id!r} (python -m service keys list shows them)")
    if key.revoked_at is None:
        revoked = galleries.revoke_key(args.key_id, actor=cli_actor())
        if revoked is None:  # gone between the two reads
            raise CommandError(f"no key with id {args.key_id!r}")
        key = revoked
        said = f"key {key.key_id} revoked: refused from now on (within FACE_KEY_CACHE_S on other replicas)"
    else:  # no second audit record
        said = f"key {key.key_id} was already revoked at {iso(key.revoked_at)}"
    if args.json:
        sys.stdout.write(json.dumps({"key_id": key.key_id, "revoked_at": key.revoked_at}) + "\n")
    else:
        sys.stdout.write(said + "\n")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m service keys",
        description="API keys: create (the secret is printed once), list, revoke. The backend is the server's: "
        "FACE_* settings (FACE_DATABASE_URL for PostgreSQL, else FACE_DATA_DIR) and these flags; a server may "
        "be running on it.")
    add_backend_arguments(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("create", help="make a key; prints its secret once, on stdout")
    make.add_argument("--role", required=True, choices=ROLES,
                      help="admin: everything; write: enroll, delete and read; read: identify, verify, list "
                      "and read identities; embed: /embed and /detect only")
    make.add_argument("--collections", metavar="A,B",
                      help="comma-separated collections the key may touch (each must exist); default: all. Not for "
                      "--role admin (its routes reach every collection: scope a write key instead)")
    make.add_argument("--note", type=_note, help="what the key is for (shown by list and in the audit trail)")
    make.add_argument("--expires-in-days", type=_positive, metavar="N", help="refused after N days (default: never)")
    make.add_argument("--rate-limit-rps", type=_rate, metavar="X",
                      help="this key's requests per second (default: FACE_RATE_LIMIT_RPS)")
    make.add_argument("--rate-limit-faces-per-s", type=_rate, metavar="Y",
                      help="this key's faces per second (default: FACE_RATE_LIMIT_FACES_PER_S)")
    make.add_argument("--json", action="store_true", help="print POST /keys's JSON answer (secret included)")
    show = sub.add_parser("list", help="every key (revoked and expired ones too); never a secret")
    show.add_argument("--json", action="store_true", help='print {"items": [...]} as GET /keys does')
    drop = sub.add_parser("revoke", help="refuse a key from now on (it stays listed, for the audit trail)")
    drop.add_argument("key_id")
    drop.add_argument("--json", action="store_true", help='print {"key_id", "revoked_at"}')
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from ..ops.logging import configure_logging

    configure_logging("warning", False)
    try:
        settings = settings_from(args)
        pepper = load_pepper(settings) if args.command == "create" else b""
        with opened_backend(settings) as galleries:
            if args.command == "create":
                create(args, galleries, pepper, settings.api_key_header)
            elif args.command == "list":
                list_keys(args, galleries)
            else:
                revoke(args, galleries)
    except (CommandError, PepperFileError) as exc:
        return fail(exc)
    return 0
