"""``python -m service backup DEST``: a consistent copy of the embedded gallery, taken while the server
runs.

Copying the data dir's files while a server writes them can catch a database between a write and its
WAL, or the WAL between two frames. This copies each SQLite database of the data dir (the catalog: the
collections, aliases, keys' hashes and their audit; each collection's store: its identities, faces,
kept crops, still sealed, and audit) with SQLite's online backup, each in one read transaction, so each
copy is the database as of one moment, while the server goes on answering and writing; and the
operator's calibration files (``calibration/<model id>/``: the impostor tail and refitted quality that
``python -m service calibrate`` measured), each whole. The HNSW index is not copied: it is derived
from the stores, and a server started on the copy rebuilds it (minutes at 1M faces). DEST is written
under a temporary name, checked (``PRAGMA integrity_check``), fsynced and renamed into place: a DEST
that exists is whole.

The catalog is copied first: it is the backup's moment, and the stores copied are those of the
collections it lists (and the default one's), each as of a moment of its own after it. A collection
created after that moment is not in the copy (its store is left out: a server on the copy would erase
it, as a delete's leftover). A collection deleted before its store's copy is done (its catalog row
gone, or another collection of its name in its place, when the copy ends) is left out whole: its
store, its row in the copy's catalog and the aliases there that point at it (the delete needed them
gone first), as though it had been deleted at the backup's moment; the report lists it (``left_out``)
and a warning line says so. A store half-erased by such a delete is never kept.

A database SQLite cannot read (a damaged collection store, which the server answers 503
``collection_damaged`` for and never writes to) fails the backup, naming it; with ``--copy-damaged``
such a collection store is copied as its bytes instead and listed as ``damaged`` in the report, so the
copy serves the healthy collections and holds that one as damaged as the data dir does (to restore it
from an older backup later). The catalog is never copied that way: nothing can be served without it.

Restore: stop the server, and start one with ``FACE_DATA_DIR`` pointing at the copy (or move it where
the data dir was). Kept crops also need the key file (``FACE_CROP_KEY_FILE``), which is not in the data
dir, by design. A face deleted after the backup is in it until the backup is deleted (the erasure
guarantee covers the data dir). On PostgreSQL, back up the database with its own tools (``pg_dump``,
``pg_basebackup``, or the provider's snapshots): this command refuses.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import sys
import time
from pathlib import Path

from ..config import Settings
from ..faces.quality import GALLERY_QUALITY_FILE
from ..gallery.api import DEFAULT_COLLECTION
from ..gallery.embedded.catalog import Catalog
from ..gallery.embedded.galleries import EmbeddedGalleries
from ..gallery.embedded.gallery import Gallery
from ..gallery.embedded.sqlite import is_damaged, is_storage_full
from ..gallery.openset import CALIBRATION_FILE
from ..model.calibration import CALIBRATION_DIR
from ..model.files import fsync_dir, fsync_file

USAGE, FAILED = 2, 1


class BackupError(Exception):
    """Something the operator fixes: named in one line (exit 2)."""


class CopyDamaged(Exception):
    """The copy of a database does not pass ``integrity_check``: its source is damaged."""


def calibration_files(data_dir: Path) -> list[Path]:
    """The operator's calibration files of an embedded data dir, relative to it: each model's
    (``calibration/<model id>/``) and those older versions kept at its root. Not derived data (they are
    measured on the operator's own faces by ``python -m service calibrate``); each is replaced whole
    (files.replace_atomically), so a copy taken while a calibration runs is the old file or the new."""
    found = [path for path in (data_dir / CALIBRATION_DIR).rglob("*") if path.is_file()]
    found += [data_dir / name for name in (CALIBRATION_FILE, GALLERY_QUALITY_FILE) if (data_dir / name).is_file()]
    return sorted(path.relative_to(data_dir) for path in found)


def copy_file(source: Path, target: Path) -> None:
    shutil.copyfile(source, target)
    fsync_file(target)
    target.chmod(0o600)


def databases(data_dir: Path) -> list[Path]:
    """Every SQLite database of an embedded data dir, relative to it (the catalog, each collection's
    store), in a stable order."""
    return sorted(path.relative_to(data_dir) for path in data_dir.rglob("*.sqlite3") if path.is_file())


def copy_database(source: Path, target: Path, copy_damaged: bool = False) -> dict:
    """One database, as of one moment (the backup API in a single step: one read transaction), into
    ``target`` (a new file, in rollback-journal mode so that it is one file), checked and fsynced. One
    SQLite cannot read is a BackupError naming it, or with ``copy_damaged`` its bytes (with its WAL)."""
    try:
        return _copy_database(source, target)
    except (sqlite3.DatabaseError, CopyDamaged) as exc:
        if isinstance(exc, sqlite3.DatabaseError) and not is_damaged(exc):
            raise
        for leftover in (target, target.with_name(target.name + "-journal")):
            leftover.unlink(missing_ok=True)
        if not copy_damaged or source.name == Catalog.FILE:
            hint = (" (the catalog: restore the data dir from an earlier backup)" if source.name == Catalog.FILE else
                    "; --copy-damaged copies it as it is, the rest as usual, or restore its collection from an "
                    "earlier backup (or delete it) first")
            raise BackupError(f"{source} is damaged ({exc}): nothing was kept{hint}") from exc
    for suffix in ("", "-wal"):  # no server writes to it (its collection is refused): its bytes are the state
        found, copy = source.with_name(source.name + suffix), target.with_name(target.name + suffix)
        if found.is_file() and (suffix == "" or found.stat().st_size):
            copy_file(found, copy)
    return {"bytes": target.stat().st_size, "damaged": True}


def _copy_database(source: Path, target: Path) -> dict:
    # a URI of the path percent-encoded: '#', '?' and '%' in it are part of a file name, not of a URI
    src = sqlite3.connect(f"{source.absolute().as_uri()}?mode=ro", uri=True, timeout=30)
    try:
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)
            dst.execute("PRAGMA journal_mode=DELETE")  # the copy is one file; a server puts it back in WAL
            check = dst.execute("PRAGMA integrity_check").fetchone()[0]
            if check != "ok":
                raise CopyDamaged(f"integrity_check: {check}")
            tables = {row[0] for row in dst.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            counts = {table: dst.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]  # names from the tuple below
                      for table in ("identities", "faces", "collections", "keys", "audit") if table in tables}
        finally:
            dst.close()
    finally:
        src.close()
    fsync_file(target)
    target.chmod(0o600)  # faces are biometric data: the copy is its owner's alone, as a key file is
    return {"bytes": target.stat().st_size, **counts}


def _incarnations(catalog: Path) -> dict[str, float]:
    """name -> created_at of each collection of a catalog (a name's created_at tells its incarnations
    apart), read only."""
    conn = sqlite3.connect(f"{catalog.absolute().as_uri()}?mode=ro", uri=True, timeout=30)
    try:
        return {name: created for name, created in conn.execute("SELECT name, created_at FROM collections")}
    finally:
        conn.close()


def _store(name: str) -> Path:
    """A collection's store, relative to the data dir."""
    directory = Path() if name == DEFAULT_COLLECTION else Path(EmbeddedGalleries.COLLECTIONS_DIR) / name
    return directory / Gallery.STORE_FILE


def _forget(catalog: Path, gone: dict[str, float]) -> dict[str, list[str]]:
    """The copy's catalog without the collections deleted during the backup (name -> created_at) and
    the aliases pointing at them: name -> its aliases removed. Fsynced."""
    conn = sqlite3.connect(catalog)
    try:
        conn.execute("PRAGMA secure_delete=ON")
        with conn:
            aliases = {name: [r[0] for r in conn.execute("SELECT name FROM aliases WHERE collection = ? ORDER BY name",
                                                         (name,))] for name in gone}
            for name, created in gone.items():
                conn.execute("DELETE FROM aliases WHERE collection = ?", (name,))
                conn.execute("DELETE FROM collections WHERE name = ? AND created_at = ?", (name, created))
    finally:
        conn.close()
    fsync_file(catalog)
    return aliases


def backup(data_dir: Path, dest: Path, copy_damaged: bool = False) -> dict:
    started = time.perf_counter()
    if not data_dir.is_dir():
        raise BackupError(f"the data dir {data_dir} is not a directory (FACE_DATA_DIR, --data-dir)")
    found = databases(data_dir)
    if not found:
        raise BackupError(f"{data_dir} holds no gallery (no *.sqlite3): is FACE_DATA_DIR right?")
    if dest.exists() or dest.is_symlink():
        raise BackupError(f"{dest} exists: a backup is written to a new path, never over another")
    if dest.resolve().is_relative_to(data_dir.resolve()):
        raise BackupError(f"{dest} is inside the data dir {data_dir}: a backup there is lost with it (and copied "
                          "again by the next backup); write it elsewhere")
    if not dest.parent.is_dir():
        raise BackupError(f"{dest.parent} is not a directory")
    partial = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    copied: list[dict] = []
    left_out: list[dict] = []
    catalog = Path(Catalog.FILE)

    def copy(relative: Path) -> dict:
        target = partial / relative
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        return {"database": str(relative), **copy_database(data_dir / relative, target, copy_damaged)}

    try:
        partial.mkdir(mode=0o700)
        if catalog in found:
            copied.append(copy(catalog))
            listed = _incarnations(partial / catalog)  # the backup's moment
        else:  # no catalog (a server makes it at its start, listing the default collection only)
            listed = {}
        gone: dict[str, float] = {}
        for name in sorted(listed.keys() | {DEFAULT_COLLECTION}):
            relative = _store(name)
            try:
                done = copy(relative) if (data_dir / relative).is_file() else None
            except (BackupError, OSError, sqlite3.Error):
                done = None
                if name == DEFAULT_COLLECTION or _incarnations(data_dir / catalog).get(name) == listed[name]:
                    raise  # not a delete's doing
            if name != DEFAULT_COLLECTION and _incarnations(data_dir / catalog).get(name) != listed[name]:
                gone[name] = listed[name]  # deleted before its store's copy was done: whatever it read is not kept
                shutil.rmtree(partial / relative.parent, ignore_errors=True)
            elif done is not None:
                copied.append(done)
        if gone:
            aliases = _forget(partial / catalog, gone)
            copied[0].update(collections=len(listed) - len(gone), bytes=(partial / catalog).stat().st_size)
        for relative in databases(data_dir):
            if relative != catalog and relative.parent.parent == Path(EmbeddedGalleries.COLLECTIONS_DIR) \
                    and relative.parent.name not in listed:
                left_out.append({"collection": relative.parent.name,
                                 "why": "not in the catalog copied (created after it, or left by an interrupted delete)"})
        left_out += [{"collection": name, "why": "deleted during the backup", "aliases": aliases[name]} for name in gone]
        files = calibration_files(data_dir)
        for relative in files:
            (partial / relative).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            copy_file(data_dir / relative, partial / relative)
        for folder in sorted({(partial / c["database"]).parent for c in copied} | {(partial / r).parent for r in files},
                             key=lambda p: len(p.parts), reverse=True):
            fsync_dir(folder)
        partial.rename(dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return {"command": "backup", "data_dir": str(data_dir), "dest": str(dest), "databases": copied,
            "files": [str(relative) for relative in files], "left_out": sorted(left_out, key=lambda x: x["collection"]),
            "bytes": sum(c["bytes"] for c in copied) + sum((dest / r).stat().st_size for r in files),
            "seconds": round(time.perf_counter() - started, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service backup", description=__doc__.split("\n\n")[0] if __doc__
                                     else None)
    parser.add_argument("dest", type=Path, help="the new directory to write the copy to (must not exist)")
    parser.add_argument("--data-dir", type=Path, help="the gallery's data dir (default: FACE_DATA_DIR, else ./data)")
    parser.add_argument("--copy-damaged", action="store_true",
                        help="copy a collection store SQLite cannot read as its bytes (listed damaged) instead of "
                             "failing the backup")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return USAGE if exc.code else 0
    settings = Settings()
    if settings.database_url is not None:
        print("error: the gallery is on PostgreSQL (FACE_DATABASE_URL): back it up with the database's own tools "
              "(pg_dump, pg_basebackup, or your provider's snapshots)", file=sys.stderr)
        return USAGE
    data_dir = args.data_dir or settings.data_dir
    try:
        report = backup(data_dir, args.dest, args.copy_damaged)
    except BackupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE
    except (OSError, sqlite3.Error) as exc:
        why = "no space left" if is_storage_full(exc) else str(exc)
        print(f"error: the backup to {args.dest} failed, nothing was kept: {why}", file=sys.stderr)
        return FAILED
    for gone in (x for x in report["left_out"] if "aliases" in x):
        print(f"warning: the collection {gone['collection']} was deleted during the backup: left out of the copy"
              + (f" with its aliases {', '.join(gone['aliases'])}" if gone["aliases"] else ""), file=sys.stderr)
    for damaged in (c["database"] for c in report["databases"] if c.get("damaged")):
        print(f"warning: {damaged} is damaged: copied as it is (its collection is refused until restored)",
              file=sys.stderr)
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0
