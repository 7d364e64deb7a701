"""What the operator commands share: the backend flags and settings (``gallery``, ``keys``, ``audit``), the
backend ``keys`` and ``audit`` open, and who they say made a change.

They open the backend the server would (FACE_DATABASE_URL: PostgreSQL, else the embedded catalog in
FACE_DATA_DIR) and may run while a server serves the same data dir or database: keys and the audit
trail live in the embedded catalog (SQLite's own locking, not the data-dir lock) or in PostgreSQL.
"""

from __future__ import annotations

import argparse
import getpass
import os
import socket
import sqlite3
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from pydantic import ValidationError

from ..config import ModelConfigError, Settings
from ..gallery.api import Actor, CatalogDamaged, Galleries, GalleryModelMismatch, GalleryUnavailable, StorageFull
from ..gallery.crops import CropKeyError
from ..gallery.embedded.lock import DataDirUnusable, usable_data_dir
from ..gallery.embedded.sqlite import is_damaged
from ..gallery.embedded.store import StoreDamaged, damage_in
from ..gallery.open import make_gallery
from ..model.serving import check_model_files


class CommandError(Exception):
    """A refusal to report on stderr with exit status 2 (bad arguments, unknown names, no backend)."""


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, help="embedded gallery directory (FACE_DATA_DIR)")
    parser.add_argument("--database-url", help="PostgreSQL URL (FACE_DATABASE_URL); set: the postgres backend")
    parser.add_argument("--model", type=Path, help="ONNX model or directory (FACE_MODEL); default: SFace")


def settings_from(args: argparse.Namespace) -> Settings:
    overrides = {k: v for k, v in {"data_dir": args.data_dir, "model": args.model,
                                   "database_url": args.database_url}.items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise CommandError(f"invalid settings: {exc}") from exc
    return models_checked(settings)


def models_checked(settings: Settings) -> Settings:
    """``settings``, once every configured model file is there: the commands read the served models'
    contracts, and a file missing is a CommandError naming the model and the file, not a traceback."""
    try:
        check_model_files(settings)
    except ModelConfigError as exc:
        raise CommandError(str(exc)) from exc
    return settings


def model_identity(settings: Settings) -> tuple[str, int]:
    """(model id, embedding size) of the model the service would load with these settings, without loading it."""
    from ..model.contract import read_contract
    from ..model.serving import served_model_path

    contract = read_contract(served_model_path(settings))
    return contract.model_id, contract.embedding_size


def served_identities(settings: Settings) -> dict[str, int]:
    """model id -> embedding size of every model the service would serve (FACE_MODELS), unloaded: the
    pins a backend opened here accepts, as the server's do."""
    from ..model.contract import read_contract
    from ..model.serving import served_model_path

    contracts = [read_contract(served_model_path(settings, path)) for _, path in settings.served_models()]
    return {c.model_id: c.embedding_size for c in contracts}


@contextmanager
def opened_backend(settings: Settings) -> Iterator[Galleries]:
    """The configured backend, ready for keys, audit and the list of collections (closed on leaving).

    The embedded one is left unopened: its catalog and the stores' audit tables serve all of that, and
    opening would take the data dir's lock, which a running server holds. PostgreSQL is opened (its
    connection pools; migrations and the model check as a server does). A crop key file that is no key
    (FACE_CROP_KEY_FILE) or a data dir that cannot be used is a CommandError naming it."""
    try:
        if settings.database_url is None:
            usable_data_dir(settings.data_dir)  # now, not at the first use of its catalog
        galleries = make_gallery(settings, *model_identity(settings), served=served_identities(settings))
    except (CropKeyError, DataDirUnusable) as exc:
        raise CommandError(str(exc)) from exc
    try:
        if galleries.backend == "postgres":
            galleries.open()
    except (GalleryModelMismatch, GalleryUnavailable) as exc:
        galleries.close()
        raise CommandError(str(exc)) from exc
    try:
        yield galleries
    except (StorageFull, StoreDamaged, CatalogDamaged) as exc:  # no room for a key, a damaged store: one line
        raise CommandError(str(exc)) from exc
    except sqlite3.DatabaseError as exc:  # a damaged page read outside a store's own checks (the keys')
        if galleries.backend == "postgres" or not is_damaged(exc):
            raise
        raise CommandError(str(damage_in(settings.data_dir, exc))) from exc
    finally:
        galleries.close()


def cli_actor() -> Actor:
    """The audit trail's "who" for a change made here: the CLI, by user@host (no key)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container's uid without a passwd entry
        user = f"uid{os.getuid()}"
    return Actor(key_id=None, client=f"{user}@{socket.gethostname()}", request_id=None, via="cli")


def iso(at: float | None) -> str:
    """A unix time as UTC ISO 8601 to the second ("" for None)."""
    if at is None:
        return ""
    try:
        return datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, ValueError, OSError):  # past the year 9999 (stored before the limit): as it is
        return f"unix time {at:.0f}"


def parse_time(text: str) -> float:
    """ISO 8601 (a date, or a date and time; without a zone: UTC) to unix seconds."""
    try:
        moment = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    except ValueError as exc:
        raise CommandError(f"{text!r} is not an ISO 8601 date or time (e.g. 2026-12-01 or "
                           "2026-12-01T08:30:00+01:00)") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


MAX_SKIP_EXAMPLES = 20  # "path: reason" lines a folder run keeps for its summary


def count_skip(counts: Counter, examples: list[str], path: Path, reason: str, detail: object = None) -> None:
    """A file a folder run leaves out: counted under ``reason``, and the first few named with their
    ``detail`` (the reason itself when None)."""
    counts[reason] += 1
    if len(examples) < MAX_SKIP_EXAMPLES:
        examples.append(f"{path}: {reason if detail is None else detail}")


def fail(exc: Exception) -> int:
    sys.stderr.write(f"error: {exc}\n")
    return 2
