"""``face``: the service from the command line.

    face identify PHOTO...          face verify A B           face enroll DIR
    face identities list|show ID|delete ID|update ID [--rename NEW] [--metadata JSON | --metadata-patch JSON]
    face faces delete FACE_ID...    (or - : the ids from stdin, whitespace-separated)
    face faces crop FACE_ID [-o FILE|-] [--force]   (a keep_crops collection's crop, as PNG: face-ID.png)
    face collections list|create NAME|delete NAME|retention NAME DAYS|set NAME [--max-faces N] [--identify-fpir R]
    face keys create ROLE|list|revoke KEY_ID
    face aliases list|set NAME COLLECTION|delete NAME
    face duplicates [--job]         face outliers [--job]     face merge SRC INTO
    face cluster PHOTO...

The server and key: --url / --key, or FACE_URL / FACE_API_KEY. --json prints the answers as JSON (for
scripts); otherwise readable lines. Exit codes: 0 ok, 1 the API answered an error, 2 usage, 3 no connection
(or an incompatible server).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel

from .client import KEEP, FaceClient, without_user_info
from .errors import FaceConnectionError, FaceServiceError, IncompatibleServerError
from .models import Collection, Identity

OK, API_ERROR, USAGE, CONNECTION = 0, 1, 2, 3
SILENT = object()  # run's answer when the command wrote its output itself (face faces crop -o -): nothing to print


def _seconds(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


def _retention_days(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of days, not {text}")
    return value


def _retention_days_or_none(text: str) -> float | None:
    return None if text.lower() == "none" else _retention_days(text)


def _max_faces(text: str) -> int | None:
    if text.lower() == "none":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number of faces, or none, not {text}")
    return int(text)


def _fpir(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a rate between 0 and 1 (e.g. 0.001), or none, not {text}")
    return value


def _limits(x: Collection) -> str:
    return (f"{'no face limit' if x.max_faces is None else f'at most {x.max_faces} faces'}	"
            f"identify FPIR {'of the service' if x.identify_fpir is None else f'{x.identify_fpir:g}'}")


def _kept(days: float | None) -> str:
    return "faces kept until deleted" if days is None else f"faces erased {days:g} days after enrollment"


def _face_id(text: str) -> int:
    if not text.isdecimal() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a face id (a whole number from 1), not {text!r}")
    return int(text)


def _face_id_or_stdin(text: str) -> int | str:
    return text if text == "-" else _face_id(text)


def _stdin_face_ids(parser: argparse.ArgumentParser) -> list[int]:
    """The whitespace-separated face ids of stdin (``face faces delete -``); a usage error for anything else."""
    ids = []
    for word in sys.stdin.read().split():
        try:
            ids.append(_face_id(word))
        except argparse.ArgumentTypeError as e:
            parser.error(f"stdin: {e}")
    if not ids:
        parser.error("no face id on stdin")
    return ids


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"must be a JSON object, not {text!r} ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object ({{...}}), not {text!r}")
    return value


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _identity_lines(i: Identity) -> list[str]:
    """The identity: its id, face count and metadata (compact JSON), then one line per face."""
    return [f"{i.identity_id}\t{i.face_count} faces\tmetadata {json.dumps(i.metadata, ensure_ascii=False)}"] + [
        f"face {f.face_id}\tenrolled {_when(f.enrolled_at)}\t"
        + ("kept until deleted" if f.expires_at is None else f"expires {_when(f.expires_at)}") for f in i.faces]


def _among(text: str) -> list[str]:
    """--among's ids; none at all is a usage error: an empty access list must not mean the whole gallery."""
    ids = [i for i in text.split(",") if i]
    if not ids:
        raise argparse.ArgumentTypeError(f"must name at least one identity id (ID,ID,...), not {text!r}")
    return ids


def _service_url(text: str) -> str:
    try:
        parts = urlsplit(text)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # e.g. http://[::1, or a port that is no number from 0 to 65535 (.port)
        ok = False
    if not ok:  # the URL as said without its user info: a password is never printed
        raise argparse.ArgumentTypeError(f"must be http://HOST[:PORT] or https://..., not {without_user_info(text)!r}")
    return text


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="face", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--url", type=_service_url, default=os.environ.get("FACE_URL", "http://127.0.0.1:8000"),
                        help="the service (default: FACE_URL, else http://127.0.0.1:8000)")
    parser.add_argument("--key", default=os.environ.get("FACE_API_KEY"), help="API key (default: FACE_API_KEY)")
    parser.add_argument("--collection", default="default", help="the collection to use (default: default)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--timeout", type=_seconds, default=60.0, help="seconds each step of a request may wait: "
                        "connecting, sending, each read of the answer (not the whole request; default 60)")
    parser.add_argument("--ca-file", default=os.environ.get("FACE_CA_FILE"),
                        help="for an https:// service: a PEM file of the certificate authorities to trust (a private "
                        "CA, or a self-signed server's certificate); default: FACE_CA_FILE, else the usual ones")
    parser.add_argument("--client-cert", default=os.environ.get("FACE_CLIENT_CERT_FILE"),
                        help="for a service that asks for client certificates (mutual TLS): this client's, a PEM file "
                        "(with its key, or --client-key); default: FACE_CLIENT_CERT_FILE")
    parser.add_argument("--client-key", default=os.environ.get("FACE_CLIENT_KEY_FILE"),
                        help="the key of --client-cert when it is a file of its own; default: FACE_CLIENT_KEY_FILE")
    commands = parser.add_subparsers(dest="command", required=True)

    identify = commands.add_parser("identify", help="who is in each photo")
    identify.add_argument("photos", nargs="+")
    identify.add_argument("--top-k", type=int, default=1)
    identify.add_argument("--among", type=_among, metavar="ID,ID,...",
                          help="only these enrolled identities are candidates (an access list: at least one)")
    verify = commands.add_parser("verify", help="are A and B the same person")
    verify.add_argument("a")
    verify.add_argument("b")
    enroll = commands.add_parser("enroll", help="enroll a folder: one sub-folder per person")
    enroll.add_argument("folder")
    enroll.add_argument("--replace", action="store_true")
    enroll.add_argument("--concurrency", type=int, default=4)

    identities = commands.add_parser("identities", help="list, show, update (rename, metadata) or delete "
                                     "identities").add_subparsers(dest="action", required=True)
    identities.add_parser("list").add_argument("--prefix", help="only the ids that start with this")
    identities.add_parser("show", help="one identity: its metadata and faces").add_argument("identity_id")
    identities.add_parser("delete").add_argument("identity_id")
    update = identities.add_parser("update", help="rename an identity, or replace or merge-patch its metadata")
    update.add_argument("identity_id")
    update.add_argument("--rename", metavar="NEW", help="its new id (its faces keep their ids)")
    new_metadata = update.add_mutually_exclusive_group()
    new_metadata.add_argument("--metadata", type=_json_object, metavar="JSON", help="replace its metadata")
    new_metadata.add_argument("--metadata-patch", type=_json_object, metavar="JSON",
                              help="an RFC 7396 merge patch of its metadata (a key set to null is removed)")

    faces = commands.add_parser("faces", help="delete faces by id, or save a face's kept crop").add_subparsers(
        dest="action", required=True)
    delete_faces = faces.add_parser("delete", help="erase these faces (an identity left without a face goes too); "
                                    "more than 1000 ids are sent 1000 a request, each request all-or-nothing")
    delete_faces.add_argument("face_ids", nargs="+", type=_face_id_or_stdin, metavar="FACE_ID",
                              help="face ids, or a single - to read them (whitespace-separated) from stdin")
    crop = faces.add_parser("crop", help="save the aligned crop a keep_crops collection kept of a face (PNG, "
                            "112x112); needs a write key")
    crop.add_argument("face_id", type=_face_id, metavar="FACE_ID")
    crop.add_argument("-o", "--output", metavar="FILE",
                      help="where to write it (default: face-FACE_ID.png here); - writes the PNG to stdout")
    crop.add_argument("--force", action="store_true", help="overwrite FILE if it exists")

    collections = commands.add_parser("collections", help="list, create or delete collections, or change their "
                                      "settings").add_subparsers(dest="action", required=True)
    collections.add_parser("list")
    create_collection = collections.add_parser("create")
    create_collection.add_argument("name")
    create_collection.add_argument("--retention-days", type=_retention_days, default=None,
                                   help="erase each face this many days after its enrollment")
    create_collection.add_argument("--max-faces", type=_max_faces, default=None, help="the most faces it may hold")
    create_collection.add_argument("--identify-fpir", type=_fpir, default=None,
                                   help="its own open-set target (e.g. 0.001; default: the server's)")
    settings = collections.add_parser("set", help="change settings: those not given stay as they are")
    settings.add_argument("name")
    settings.add_argument("--retention-days", type=_retention_days_or_none, default=KEEP, metavar="DAYS|none")
    settings.add_argument("--max-faces", type=_max_faces, default=KEEP, metavar="N|none")
    settings.add_argument("--identify-fpir", type=_fpir, default=KEEP, metavar="RATE|none")
    collections.add_parser("delete").add_argument("name")
    retention = collections.add_parser("retention", help="how long the collection keeps each face")
    retention.add_argument("name")
    retention.add_argument("days", type=_retention_days_or_none, help="days (fractions allowed), or 'none': kept")

    aliases = commands.add_parser("aliases", help="list, set or delete collection aliases").add_subparsers(
        dest="action", required=True)
    aliases.add_parser("list")
    alias_set = aliases.add_parser("set")
    alias_set.add_argument("name")
    alias_set.add_argument("target", metavar="collection")
    aliases.add_parser("delete").add_argument("name")

    duplicates = commands.add_parser("duplicates", help="identities that are probably one person")
    duplicates.add_argument("--min-score", type=float)
    duplicates.add_argument("--max-false-alarm", type=float)
    duplicates.add_argument("--limit", type=int, default=100)
    outliers = commands.add_parser("outliers", help="faces that do not match their own identity")
    outliers.add_argument("--min-score", type=float)
    outliers.add_argument("--limit", type=int, default=100)
    for scan in (duplicates, outliers):
        scan.add_argument("--job", action="store_true",
                          help="scan in a job on the server and wait for it (a large collection: no request waits)")
    merge = commands.add_parser("merge", help="merge identity SRC into INTO (SRC is deleted)")
    merge.add_argument("source", metavar="SRC")
    merge.add_argument("into", metavar="INTO")
    cluster = commands.add_parser("cluster", help="group the faces of photos by person")
    cluster.add_argument("photos", nargs="+")
    cluster.add_argument("--threshold", type=float)

    keys = commands.add_parser("keys", help="create, list or revoke API keys (admin)").add_subparsers(dest="action", required=True)
    create = keys.add_parser("create")
    create.add_argument("role", choices=["admin", "write", "read", "embed"])
    create.add_argument("--collections", nargs="+", metavar="NAME",
                        help="the collections the key may use (default: every collection)")
    create.add_argument("--note")
    create.add_argument("--rate-limit-rps", type=float)
    keys.add_parser("list")
    keys.add_parser("revoke").add_argument("key_id")
    args = parser.parse_args(argv)
    if args.client_key and not args.client_cert:
        parser.error("--client-key needs --client-cert (FACE_CLIENT_CERT_FILE)")
    if args.command == "faces" and args.action == "crop":
        args.output = args.output or f"face-{args.face_id}.png"
        if args.output != "-" and not args.force and os.path.lexists(args.output):
            crop.error(f"{args.output} exists: give --force to overwrite it, or -o another file")
    if args.command == "faces" and args.action == "delete" and "-" in args.face_ids:
        if len(args.face_ids) > 1:
            delete_faces.error("give face ids, or - alone to read them from stdin")
        args.face_ids = _stdin_face_ids(delete_faces)
    if args.command == "identities" and args.action == "update" and \
            args.rename is None and args.metadata is None and args.metadata_patch is None:
        update.error("give --rename, --metadata or --metadata-patch")
    if args.command == "collections" and args.action == "set" and \
            all(v is KEEP for v in (args.retention_days, args.max_faces, args.identify_fpir)):
        settings.error("give --retention-days, --max-faces or --identify-fpir")
    return args


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def run(face: FaceClient, args: argparse.Namespace) -> tuple[Any, list[str]]:
    """The command's answer (for --json) and its readable lines."""
    c = args.collection
    if args.command == "identify":
        results = face.identify_many(args.photos, top_k=args.top_k, collection=c,
                                     **({"among": args.among} if args.among is not None else {}))
        lines = [f"{args.photos[r.image_index]}\t" + (r.error.code if r.error else
                 f"{r.identity_id or 'unknown'}\t{r.score if r.score is not None else ''}") for r in results]
        return [{"photo": args.photos[r.image_index], **r.model_dump(mode="json")} for r in results], lines
    if args.command == "verify":
        v = face.verify(args.a, args.b, collection=c)
        return v, [f"{'match' if v.match else 'no match'}\tsimilarity {v.similarity:.4f}\tthreshold {v.threshold:.4f}"]
    if args.command == "enroll":
        s = face.enroll_folder(args.folder, replace=args.replace, concurrency=args.concurrency, collection=c)
        lines = [f"people {s.people}\tenrolled {s.enrolled}\talready {s.already}\tfaces {s.faces}\t"
                 f"skipped files {s.skipped_files}\tpartial {len(s.partial)}\tfailed {len(s.failed)}"]
        lines += [f"skipped\t{p.identity_id}\t{f.file}\t{f.code}" for p in s.persons.values() for f in p.skipped]
        lines += [f"resumed\t{p.identity_id}\tfewer faces than files were stored: enrolled again, {p.face_count} "
                  f"faces now" for p in s.persons.values() if p.resumed and p.error is None]
        lines += [f"partial\t{i}\t{s.persons[i].face_count} stored, {s.persons[i].files} files\t{e.code}: "
                  f"{e.message}" for i, e in s.partial.items()]
        lines += [f"failed\t{i}\t{e.code}: {e.message}" for i, e in s.failed.items()]
        return s, lines
    if args.command == "identities":
        if args.action == "list":
            items = list(face.iter_identities(prefix=args.prefix, collection=c))
            return items, [f"{i.identity_id}\t{i.face_count} faces" for i in items]
        if args.action == "show":
            shown = face.get_identity(args.identity_id, collection=c)
            return shown, _identity_lines(shown)
        if args.action == "update":
            u = face.update_identity(args.identity_id, rename_to=args.rename, metadata=args.metadata,
                                     metadata_patch=args.metadata_patch, collection=c)
            renamed = [f"renamed {args.identity_id} to {u.identity_id}"] if args.rename and u.identity_id != args.identity_id else []
            return u, renamed + _identity_lines(u)
        d = face.delete_identity(args.identity_id, collection=c)
        return d, [f"deleted {d.identity_id}\t{d.deleted_faces} faces"]
    if args.command == "faces" and args.action == "crop":
        return _crop(face, args)
    if args.command == "faces":
        f = face.delete_faces(args.face_ids, collection=c)
        lines = [f"deleted face {d.face_id}\t{d.identity_id}" + ("\tidentity deleted" if d.identity_deleted else "")
                 for d in f.deleted] + [f"not found\tface {i}" for i in f.not_found]
        gone = sum(d.identity_deleted for d in f.deleted)
        return f, lines + [f"{len(f.deleted)} faces deleted\t{len(f.not_found)} not found\t{gone} identities deleted"]
    if args.command == "collections":
        if args.action == "list":
            cs = face.list_collections()
            return cs, [f"{x.name}\t{x.identities} identities\t{x.faces} faces\t{_kept(x.retention_days)}\t{_limits(x)}"
                        for x in cs]
        if args.action == "create":
            x = face.create_collection(args.name, retention_days=args.retention_days, max_faces=args.max_faces,
                                       identify_fpir=args.identify_fpir)
            return x, [f"created {x.name}\t{_kept(x.retention_days)}\t{_limits(x)}"]
        if args.action == "set":
            x = face.update_collection(args.name, retention_days=args.retention_days, max_faces=args.max_faces,
                                       identify_fpir=args.identify_fpir)
            return x, [f"{x.name}\t{_kept(x.retention_days)}\t{_limits(x)}"]
        if args.action == "retention":
            x = face.update_collection(args.name, retention_days=args.days)
            return x, [f"{x.name}\t{_kept(x.retention_days)}"]
        d2 = face.delete_collection(args.name)
        return d2, [f"deleted {d2.name}\t{d2.deleted_identities} identities\t{d2.deleted_faces} faces"]
    if args.command == "aliases":
        if args.action == "list":
            al = face.list_aliases()
            return al, [f"{a.alias}\t{a.collection}" for a in al]
        if args.action == "set":
            a1 = face.set_alias(args.name, args.target)
            return a1, [f"{a1.alias}\t-> {a1.collection}"]
        a2 = face.delete_alias(args.name)
        return a2, [f"deleted alias {a2.alias}\t(was -> {a2.collection})"]
    if args.command in HYGIENE:
        return HYGIENE[args.command](face, args)
    if args.action == "create":
        k = face.create_key(args.role, collections=args.collections, note=args.note,
                            rate_limit_rps=args.rate_limit_rps)
        return k, [f"{k.key_id}\t{k.role}\tsecret {k.secret}  (shown once)"]
    if args.action == "list":
        ks = face.list_keys()
        return ks, [f"{k.key_id}\t{k.role}\t{_scope(k.collections)}\t"
                    f"{'revoked' if k.revoked_at else 'active'}\t{k.note or ''}" for k in ks]
    r = face.revoke_key(args.key_id)
    return r, [f"revoked {r.key_id}"]


def _scope(collections: list[str] | None) -> str:
    """A key's collections: ``*`` for every one (None), ``none`` for a key scoped to none ([])."""
    return "*" if collections is None else ",".join(collections) or "none"


def _crop(face: FaceClient, args: argparse.Namespace) -> tuple[Any, list[str]]:
    """The crop fetched, then written (nothing is written when the server refuses): to stdout for ``-o -``
    (then nothing else is printed), else to the file, created anew unless --force (FileExistsError: one made
    since parse_args looked)."""
    png = face.face_crop(args.face_id, collection=args.collection)
    if args.output == "-":
        sys.stdout.buffer.write(png)
        sys.stdout.flush()
        return SILENT, []
    with open(args.output, "wb" if args.force else "xb") as out:
        out.write(png)
    return {"face_id": args.face_id, "path": args.output, "bytes": len(png)}, [args.output]


def _duplicates(face: FaceClient, args: argparse.Namespace) -> tuple[Any, list[str]]:
    scan = face.scan_duplicates if args.job else face.duplicates
    d = scan(min_score=args.min_score, max_false_alarm=args.max_false_alarm, limit=args.limit,
             collection=args.collection)
    lines = [f"{p.identity_a}\t{p.identity_b}\tscore {p.score:.4f}" + (
        "" if p.false_alarm_probability is None else f"\tfalse alarm {p.false_alarm_probability:.2g}") + "\tfaces " +
        ", ".join(f"{e.face_a}~{e.face_b}" for e in p.evidence) for p in d.pairs]
    return d, lines + [f"{len(d.pairs)} pairs from score {d.min_score:.4f}\t{d.faces_scanned} faces scanned"]


def _outliers(face: FaceClient, args: argparse.Namespace) -> tuple[Any, list[str]]:
    scan = face.scan_outliers if args.job else face.outliers
    o = scan(min_score=args.min_score, limit=args.limit, collection=args.collection)
    lines = [f"{f.identity_id}\tface {f.face_id}\town {f.own_score:.4f}\t" + (
        "" if f.best_other is None else f"matches {f.best_other.identity_id} {f.best_other.score:.4f}")
        for f in o.faces]
    return o, lines + [f"{len(o.faces)} outliers below {o.threshold:.4f}\t{o.identities_checked} identities checked"]


def _merge(face: FaceClient, args: argparse.Namespace) -> tuple[Any, list[str]]:
    m = face.merge_identities(args.source, args.into, collection=args.collection)
    return m, [f"merged {m.merged_from} into {m.identity_id}\t{m.faces_moved} faces moved\t{m.face_count} faces now"]


def _cluster(face: FaceClient, args: argparse.Namespace) -> tuple[Any, list[str]]:
    r = face.cluster(args.photos, threshold=args.threshold)
    lines = [f"cluster {c.cluster_id}\t{c.size} faces\t" + " ".join(args.photos[f.image_index] for f in c.faces)
             for c in r.clusters]
    return r, lines + [f"{r.faces} faces in {len(r.clusters)} clusters\tthreshold {r.threshold:.4f}"]


HYGIENE = {"duplicates": _duplicates, "outliers": _outliers, "merge": _merge, "cluster": _cluster}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:
        return USAGE if e.code else OK
    try:
        client_cert = (args.client_cert, args.client_key) if args.client_key else args.client_cert
        client = FaceClient(args.url, args.key, timeout=args.timeout, collection=args.collection,
                            ca_file=args.ca_file, client_cert=client_cert)
    except ValueError as e:  # a key that cannot be sent (the message never shows it)
        print(f"error: {e}", file=sys.stderr)
        return USAGE
    except OSError as e:  # a CA or certificate file that cannot be read
        print(f"error: {e}", file=sys.stderr)
        return USAGE
    try:
        with client as face:
            answer, lines = run(face, args)
    except FaceServiceError as e:
        error = {"code": e.code, "message": e.message, "details": e.details, "request_id": e.request_id,
                 "status": e.status}
        print(json.dumps({"error": error}) if args.json else f"error: {e}", file=sys.stderr)
        return API_ERROR
    except (FaceConnectionError, IncompatibleServerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return CONNECTION
    except OSError as e:  # a photo or folder that cannot be read
        print(f"error: {e}", file=sys.stderr)
        return USAGE
    if answer is not SILENT:
        print(json.dumps(_plain(answer), indent=2) if args.json else "\n".join(lines))
    return OK


if __name__ == "__main__":
    sys.exit(main())
