"""``python -m service gallery ...``: move a gallery between backends, enroll a folder of people.

* ``export FILE``: every identity with its metadata and embeddings, to a gallery file.
* ``import FILE``: a gallery file into the configured gallery (embedded, or PostgreSQL with
  FACE_DATABASE_URL), refused unless it holds embeddings of the configured model.
* ``enroll DIR``: one sub-folder per person (the folder name is the identity id), photos or aligned
  crops, through the model in batches; prints progress and a summary of what was skipped and why.
  Resumable: a person already enrolled is skipped (``--replace`` enrolls them again).
* ``migrate --collection A --model NEW --into B`` / ``jobs [JOB_ID]``: a collection re-embedded by
  another served model (cli/migrate.py).
* ``compare --collection A --with B [--max-probes N] [--seed S]``: the comparison report of a migration
  (service/jobs/compare.py: leave-one-face-out rank-1 of each, top-1 agreement, changed identities).
* ``alias set NAME COLLECTION | list | delete NAME``: aliases (``PUT /aliases/{name}``), beside a
  running server (the embedded catalog is outside the data-dir lock); every replica follows within
  FACE_ALIAS_CACHE_S. Audited as made ``via="cli"`` by user@host.

The gallery file (JSON Lines, UTF-8), format ``face-gallery`` version 1:

* line 1, the header: ``{"format": "face-gallery", "version": 1, "model_id": "sface@2021dec-int8bq",
  "embedding_size": 128, "dtype": "float32", "exported_at": <unix time>}``
* one line per identity: ``{"identity_id": "...", "metadata": {...}, "created_at": <unix time>,
  "embeddings": ["<base64 of embedding_size little-endian float32>", ...], "enrolled_at": [<unix time>,
  ...]}``; ``enrolled_at`` (optional: files of earlier versions lack it) is when each face was enrolled,
  kept by the import, so that a collection's retention counts from the first enrollment, not the import;
  ``created_at`` (optional) is when the identity was created, kept too. Each identity id is on one line
  only, with at most FACE_MAX_FACES_PER_IDENTITY embeddings. The file is written 0600 (biometric data).
* last line: ``{"end": true, "identities": N, "faces": M}`` (exactly that object: N identity lines and M
  embeddings before it); a file without it (cut short), with other counts, or with a line after it is refused.

The gallery is opened as the service opens it (same settings), so run export/import against an
embedded data dir while no server is using it; on PostgreSQL, replicas may keep serving (an export reads
one snapshot: the collection as of one moment, whatever they write meanwhile).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from ..config import Settings
from ..errors import ServiceError
from ..faces.images import DEFAULT_FORMATS, image_suffixes
from ..faces.metadata import MetadataLimits, check_metadata
from ..gallery import identity_ids
from ..gallery.api import (
    DEFAULT_COLLECTION,
    Actor,
    AliasInfo,
    AliasNotFound,
    CatalogDamaged,
    CollectionDamaged,
    CollectionExists,
    CollectionNotFound,
    Galleries,
    GalleryBackend,
    GalleryModelMismatch,
    GalleryUnavailable,
    IdentityExists,
    StorageFull,
    TooManyFacesForCollection,
    TooManyFacesForIdentity,
)
from ..gallery.crops import CropKeyError, encode_crop
from ..gallery.embedded.lock import DataDirLock, DataDirLocked, DataDirUnusable
from ..gallery.embedded.store import StoreDamaged
from ..gallery.open import open_gallery
from ..jobs.store import MigrationUnfinished
from ..model.files import replace_atomically
from ..model.preprocess import unit_direction
from . import migrate
from .backend import (
    MAX_SKIP_EXAMPLES,
    CommandError,
    add_backend_arguments,
    cli_actor,
    count_skip,
    fail,
    model_identity,
    opened_backend,
    served_identities,
    settings_from,
)

if TYPE_CHECKING:  # the pipeline is imported lazily, at run time
    from ..faces.pipeline import ImageType
    from ..model.registry import ServedModel
    from ..state import ServiceState

log = logging.getLogger(__name__)

FORMAT, VERSION = "face-gallery", 1
CLI = Actor(via="cli")  # who the audit trail names for a change made by these commands
CLOCK_SKEW_S = 3600.0  # an enrolled_at this far ahead of this host's clock is refused (a file from a host whose clock is ahead)


class GalleryFileError(ValueError):
    """The gallery file is not one this command can import (format, model, or cut short)."""


def open_configured(settings: Settings) -> Galleries:
    return open_gallery(settings, *model_identity(settings), served=served_identities(settings))


# --- export / import -----------------------------------------------------------------------------

def _encode(vector: np.ndarray) -> str:
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()


def _decode(text: object, dim: int) -> np.ndarray:
    """One embedding of a gallery file: base64 of ``dim`` little-endian float32s, finite and not (near)
    zero; a vector that is not unit length is normalised, as the API normalises a client's vectors
    (exported ones are unit vectors already and come back bit for bit)."""
    if not isinstance(text, str):
        raise GalleryFileError(f"an embedding is {type(text).__name__}, not base64 text")
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError as exc:  # binascii.Error
        raise GalleryFileError(f"an embedding is not base64: {exc}") from None
    if len(raw) != 4 * dim:
        raise GalleryFileError(f"an embedding has {len(raw) / 4:g} values, the header says {dim}")
    vector = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if not np.isfinite(vector).all():
        raise GalleryFileError("an embedding has NaN or infinite values")
    unit, norm = unit_direction(vector)  # the API's arithmetic (http/vectors.normalise)
    if unit is None:
        raise GalleryFileError(f"an embedding has norm {norm:.3g}: it cannot be normalised")
    return vector if abs(norm - 1.0) < 1e-3 else unit.astype(np.float32)


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


@dataclass
class Transfer:
    identities: int = 0
    faces: int = 0
    skipped: list[str] = field(default_factory=list)


def export_gallery(gallery: GalleryBackend, path: Path, page: int = 500) -> Transfer:
    """Write every identity to ``path`` (atomically and durably: a temporary file of this export's own,
    fsynced and renamed when complete, so two exports to one path at once each rename a whole file),
    readable by its owner only (0600)."""
    done = Transfer()
    # one moment: on PostgreSQL every read of the export in one snapshot (replicas may write meanwhile: a
    # face merged onto an identity already written would be in no line); the embedded gallery's data dir
    # is this process's alone (its lock), so nothing else writes while it runs
    snapshot = getattr(gallery, "one_snapshot", None)
    with snapshot() if snapshot is not None else contextlib.nullcontext():
        # faces are biometric data: the file is its owner's alone (as backup's copy), whatever the umask, and
        # the rename puts this mode in place of an existing file's
        replace_atomically(path, lambda tmp: _write_gallery(gallery, tmp, page, done), durable=True, private=True)
    return done


def _write_gallery(gallery: GalleryBackend, tmp: Path, page: int, done: Transfer) -> None:
    with open(tmp, "w", encoding="utf-8") as out:
        header = {"format": FORMAT, "version": VERSION, "model_id": gallery.model_id,
                  "embedding_size": gallery.dim, "dtype": "float32", "exported_at": time.time()}
        out.write(json.dumps(header) + "\n")
        after = None
        while records := gallery.list_identities(page, after):
            for record in records:
                faces = _faces_of(gallery, record.identity_id)
                if faces is None:  # deleted while we export
                    continue
                embeddings, enrolled_at = faces
                out.write(json.dumps({"identity_id": record.identity_id, "metadata": record.metadata,
                                      "created_at": record.created_at,
                                      "embeddings": [_encode(v) for v in embeddings],
                                      "enrolled_at": enrolled_at}) + "\n")
                done.identities += 1
                done.faces += len(embeddings)
            after = records[-1].identity_id
        out.write(json.dumps({"end": True, "identities": done.identities, "faces": done.faces}) + "\n")


def _faces_of(gallery: GalleryBackend, identity_id: str) -> tuple[np.ndarray, list[float]] | None:
    """An identity's embeddings and each face's enrollment time (face-id order), or None once it is gone:
    its faces, then their vectors by face id; a face deleted or moved between the two reads is seen, and
    both are read again."""
    while True:
        details = gallery.get_identity(identity_id)
        if details is None or not details.faces:
            return None
        vectors = gallery.face_embeddings([f.face_id for f in details.faces])
        if all(vectors.get(f.face_id, ("",))[0] == identity_id for f in details.faces):
            return (np.stack([vectors[f.face_id][1] for f in details.faces]),
                    [f.created_at for f in details.faces])


def read_gallery_file(path: Path, model_id: str, dim: int, metadata: MetadataLimits | None = None,
                      max_faces: int | None = None) -> Iterator[Imported]:
    """Yield (identity id, embeddings, metadata, each face's enrollment time or None, the identity's
    created_at or None) from a gallery file after checking its header. Each line is checked as the API
    checks a request (strict JSON, the identity id rule, embeddings, at most ``max_faces`` of them
    (FACE_MAX_FACES_PER_IDENTITY), the metadata rule within ``metadata``, one enrollment time per
    embedding), the ids are each on one line only and the end line counts the lines before it: a file
    someone else made is refused with the line that is wrong (``GalleryFileError``), never stored
    half-valid."""
    limits = metadata or MetadataLimits()
    with open(path, "rb") as lines:  # bytes: each line is decoded on its own, so a bad byte is named by its line
        try:
            header = _read_header(next(lines, None))
        except GalleryFileError as exc:
            raise GalleryFileError(f"{path} is not a gallery file (line 1, the header: {exc})") from None
        if header.get("format") != FORMAT or header.get("version") != VERSION:
            raise GalleryFileError(f"{path}: format {header.get('format')!r} version {header.get('version')!r}; "
                                   f"this service reads {FORMAT!r} version {VERSION}")
        if header.get("model_id") != model_id or header.get("embedding_size") != dim:
            raise GalleryFileError(
                f"{path} holds {header.get('embedding_size')}-d embeddings of model {header.get('model_id')!r}; "
                f"the configured model is {model_id!r} ({dim}-d). Embeddings of different models are not "
                "comparable: re-enroll the photos with this model instead.")
        seen: dict[str, int] = {}  # identity id (as the id rule makes it) -> its line
        faces, end = 0, None
        for number, line in enumerate(lines, start=2):
            try:
                if end is not None:  # whatever follows the end line was never exported: edited, or two files
                    raise GalleryFileError(f"a line after the end line (line {end})")
                item = _read_line(_text(line), dim, limits, max_faces)
                if isinstance(item, EndLine):
                    if item != EndLine(len(seen), faces):  # lines lost (or added) on the way
                        raise GalleryFileError(f"the end line counts {item.identities} identities and {item.faces} "
                                               f"faces; the file holds {len(seen)} identities and {faces} faces")
                    end = number
                    continue
                if item.identity_id in seen:  # one import transaction could never hold both
                    raise GalleryFileError(f"identity {item.identity_id!r} already appears on line "
                                           f"{seen[item.identity_id]}")
            except GalleryFileError as exc:
                raise GalleryFileError(f"{path} line {number}: {exc}") from None
            seen[item.identity_id] = number
            faces += len(item.embeddings)
            yield item
    if end is None:
        raise GalleryFileError(f"{path} ends without its end line: the file is incomplete")


def _is_unix_time(value: object) -> bool:
    """A JSON number (not true/false) that is a finite float, not negative (an integer too large for a
    float is not: it overflowed the check)."""
    if type(value) not in (int, float):
        return False
    try:
        seconds = float(value)  # type: ignore[arg-type]  # int or float, checked above
    except OverflowError:
        return False
    return math.isfinite(seconds) and seconds >= 0


def _text(line: bytes) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GalleryFileError(f"not UTF-8 (byte {exc.start + 1} of the line is {line[exc.start]:#04x})") from None


def _read_header(line: bytes | None) -> dict:
    if line is None:
        raise GalleryFileError("the file is empty")
    try:
        header = json.loads(_text(line), parse_constant=_refuse_constant)
    except GalleryFileError:
        raise
    except (ValueError, RecursionError) as exc:
        raise GalleryFileError(f"not JSON: {str(exc)[:200]}") from None
    if not isinstance(header, dict):
        raise GalleryFileError(f"a {type(header).__name__}, not a JSON object")
    return header


class Imported(NamedTuple):
    """One identity line of a gallery file, as checked."""

    identity_id: str
    embeddings: np.ndarray
    metadata: dict
    enrolled_at: list[float] | None  # each face's enrollment time (None: the import's)
    created_at: float | None  # the identity's (None: the import's)


class EndLine(NamedTuple):
    """The last line of a gallery file: how many identity lines and embeddings are before it."""

    identities: int
    faces: int


def _end_line(item: dict) -> EndLine:
    """An object holding "end" is exactly the end line export writes (every version), or no line at all."""
    counts = [item.get("identities"), item.get("faces")]
    if item.keys() != {"end", "identities", "faces"} or item["end"] is not True or not all(
            type(n) is int and n >= 0 for n in counts):
        raise GalleryFileError('not the end line ({"end": true, "identities": N, "faces": M}) nor an identity')
    return EndLine(item["identities"], item["faces"])


def _read_line(line: str, dim: int, limits: MetadataLimits, max_faces: int | None = None) -> Imported | EndLine:
    """One identity of a gallery file, or its end line."""
    try:
        item = json.loads(line, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise GalleryFileError(f"not JSON: {str(exc)[:200]}") from None
    if not isinstance(item, dict):
        raise GalleryFileError(f"a {type(item).__name__}, not an identity object")
    if "end" in item:
        return _end_line(item)
    # the API's rule for new ids (identity_ids): NFC, nothing invisible
    identity = identity_ids.normalise(item["identity_id"]) if isinstance(item.get("identity_id"), str) else None
    why = "not a string" if identity is None else identity_ids.problem(identity)
    if identity is None or why is not None:
        raise GalleryFileError(f"{item.get('identity_id')!r} is not a valid identity id: {why}")
    vectors = item.get("embeddings")
    if not isinstance(vectors, list) or not vectors:
        raise GalleryFileError(f"identity {identity!r} has no embeddings (a list of base64 vectors)")
    if max_faces is not None and len(vectors) > max_faces:  # as /enroll refuses them (413)
        raise GalleryFileError(f"identity {identity!r} has {len(vectors)} embeddings; an identity holds at most "
                               f"{max_faces} faces (FACE_MAX_FACES_PER_IDENTITY)")
    embeddings = np.stack([_decode(v, dim) for v in vectors])
    enrolled_at = item.get("enrolled_at")
    if enrolled_at is not None and not (
            isinstance(enrolled_at, list) and len(enrolled_at) == len(vectors)
            and all(_is_unix_time(t) for t in enrolled_at)):
        raise GalleryFileError(f"identity {identity!r}: enrolled_at is not one Unix time per embedding")
    if enrolled_at is not None and max(enrolled_at) > time.time() + CLOCK_SKEW_S:
        raise GalleryFileError(f"identity {identity!r}: enrolled_at is in the future ({max(enrolled_at):.0f}); a face "
                               "enrolled later than now would be kept past its collection's retention (the clock of "
                               "the host that wrote the file?)")
    created_at = item.get("created_at")  # optional: a file made by hand may lack it (the import's time then)
    if created_at is not None and not _is_unix_time(created_at):
        raise GalleryFileError(f"identity {identity!r}: created_at is not a Unix time")
    if created_at is not None and created_at > time.time() + CLOCK_SKEW_S:
        raise GalleryFileError(f"identity {identity!r}: created_at is in the future ({created_at:.0f}; the clock of "
                               "the host that wrote the file?)")
    metadata = item.get("metadata") or {}
    try:
        check_metadata(metadata, limits)
    except ServiceError as exc:
        raise GalleryFileError(f"identity {identity!r}: {exc.message}") from None
    # numbers, checked above: the backends take them as floats
    return Imported(identity, embeddings, metadata, enrolled_at, None if created_at is None else float(created_at))


def import_gallery(gallery: GalleryBackend, path: Path, batch: int = 1000,
                   progress: Callable[[Transfer], None] | None = None, metadata: MetadataLimits | None = None,
                   max_faces: int | None = None) -> Transfer:
    """Import a gallery file; identities already in the gallery are skipped (so an import can resume).

    The file is checked whole (header, model, end line) before anything is written. A keep_crops
    collection refuses it (a gallery file holds no crops: its faces could never be re-embedded).
    """
    if gallery.keep_crops:
        raise GalleryFileError(f"the collection {gallery.name!r} keeps face crops (keep_crops) and a gallery file "
                               "holds embeddings only: enroll the photos instead (python -m service gallery enroll)")
    for _ in read_gallery_file(path, gallery.model_id, gallery.dim, metadata, max_faces):
        pass
    done = Transfer()
    pending: list[Imported] = []

    def _import(items: list[Imported]) -> list[list[int]]:
        return gallery.import_identities([(i.identity_id, i.embeddings, i.metadata) for i in items], actor=CLI,
                                         enrolled_at=[i.enrolled_at for i in items],
                                         created_at=[i.created_at for i in items])

    def flush() -> None:
        try:
            ids = _import(pending)
            fresh = pending
        except IdentityExists:  # some exist already (an earlier, interrupted import): skip those
            existing = {item.identity_id for item in pending if gallery.get_identity(item.identity_id) is not None}
            fresh = [item for item in pending if item.identity_id not in existing]
            done.skipped += sorted(existing)
            ids = _import(fresh) if fresh else []
        done.identities += len(fresh)
        done.faces += sum(len(x) for x in ids)
        pending.clear()
        if progress:
            progress(done)

    for item in read_gallery_file(path, gallery.model_id, gallery.dim, metadata, max_faces):
        pending.append(item)
        if len(pending) >= batch:
            flush()
    if pending:
        flush()
    return done


# --- enroll a folder of people -------------------------------------------------------------------

@dataclass
class EnrollSummary:
    people: int = 0
    enrolled: int = 0
    faces: int = 0
    already: int = 0
    skipped_images: Counter = field(default_factory=Counter)  # reason -> count
    skipped_people: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # a few "path: reason" lines


def people_in(root: Path, formats: tuple[str, ...] = DEFAULT_FORMATS) -> list[tuple[str, list[Path]]]:
    """(identity id, image files of ``formats``, FACE_IMAGE_FORMATS) per sub-folder, sorted, so a rerun walks
    them in the same order. The id is the folder name in NFC (macOS file systems hand out NFD names), as
    the API stores ids."""
    suffixes = image_suffixes(formats)
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
        found.append((identity_ids.normalise(folder.name), images))
    return found


async def _embed_person(state: ServiceState, images: list[Path], image_type: ImageType, summary: EnrollSummary,
                        served: ServedModel | None = None) -> tuple[np.ndarray, list[np.ndarray]] | None:
    """One embedding per usable image (by ``served``, the collection's model), and the crop the model
    saw for it; an image with no face, several faces or unreadable is skipped."""
    from ..errors import ServiceError
    from ..faces.pipeline import embed_images

    vectors, crops = [], []
    for path in images:
        try:
            found, faces = await embed_images(state, [path.read_bytes()], image_type, "all", served=served)
        except ServiceError as exc:
            count_skip(summary.skipped_images, summary.examples, path, exc.code.value)
            continue
        except OSError as exc:
            count_skip(summary.skipped_images, summary.examples, path, "unreadable_file", exc)
            continue
        if len(found) > 1:
            count_skip(summary.skipped_images, summary.examples, path, "several_faces", f"several_faces ({len(found)})")
            continue
        vectors.append(found[0])
        crops.append(faces.crops[0])
    return (np.stack(vectors), crops) if vectors else None


async def enroll_folder(settings: Settings, root: Path, image_type: ImageType = "auto", replace: bool = False,
                        concurrency: int = 8, progress: Callable[[EnrollSummary], None] | None = None,
                        collection: str = DEFAULT_COLLECTION) -> EnrollSummary:
    """Enroll every person folder under ``root`` through the real data path (model, batcher, gallery),
    into ``collection`` (CollectionNotFound if there is none of that name)."""
    from starlette.concurrency import run_in_threadpool

    from ..app import finalize, initialize
    from ..ops.metrics import Metrics

    state = await initialize(settings, Metrics())
    try:
        galleries: Galleries = state.galleries
        gallery = galleries.collection(collection)
    except BaseException:
        await finalize(state)
        raise
    summary, people = EnrollSummary(), people_in(root, settings.image_formats)
    summary.people = len(people)
    gate = asyncio.Semaphore(concurrency)  # several people in flight fill the batcher's batches

    async def one(identity: str, images: list[Path]) -> None:
        async with gate:
            if identity_ids.problem(identity) is not None:
                summary.skipped_people["invalid_identity_id"] += 1
            elif not replace and await run_in_threadpool(gallery.get_identity, identity) is not None:
                summary.already += 1
            elif not images:
                summary.skipped_people["no_images"] += 1
            else:
                embedded = await _embed_person(state, images, image_type, summary, state.served_for(gallery))
                if embedded is None:
                    summary.skipped_people["no_usable_face"] += 1
                else:
                    vectors, crops = embedded

                    def write() -> None:  # a keep_crops collection keeps the crops the model saw, as /enroll
                        kept = [encode_crop(crop) for crop in crops] if gallery.keep_crops else None
                        # at most FACE_MAX_FACES_PER_IDENTITY, counted inside the write as /enroll counts them
                        gallery.enroll(identity, vectors, None, replace, settings.max_faces_per_identity, CLI, kept)

                    try:
                        await run_in_threadpool(write)
                    except TooManyFacesForIdentity as exc:  # the API's 413: this person is left out, nothing written
                        summary.skipped_people["too_many_faces_for_identity"] += 1
                        if len(summary.examples) < MAX_SKIP_EXAMPLES:
                            summary.examples.append(f"{images[0].parent}: too_many_faces_for_identity ({exc})")
                    else:
                        summary.enrolled += 1
                        summary.faces += len(vectors)
            if progress:
                progress(summary)

    try:
        await asyncio.gather(*(one(identity, images) for identity, images in people))
    finally:
        await finalize(state)
    return summary


# --- the command line ----------------------------------------------------------------------------

def _progress_line(text: str) -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\r" + text)
    else:
        sys.stderr.write(text + "\n")
    sys.stderr.flush()


# --- aliases -------------------------------------------------------------------------------------

def _alias_view(info: AliasInfo) -> dict:
    return {"alias": info.name, "collection": info.collection, "updated_at": info.updated_at}


def run_alias(args: argparse.Namespace, galleries: Galleries) -> dict:
    """``alias set|list|delete``: what PUT/GET/DELETE /aliases do, as JSON of the same shape."""
    if args.action == "list":
        return {"items": [_alias_view(a) for a in galleries.list_aliases()]}
    if args.action == "set":
        try:
            return _alias_view(galleries.set_alias(args.name, args.collection, cli_actor()))
        except MigrationUnfinished as exc:
            raise CommandError(str(exc)) from exc
        except CollectionExists as exc:
            raise CommandError(f"a collection is named {args.name!r}: an alias needs a name no collection has") from exc
        except CollectionNotFound as exc:
            raise CommandError(f"{exc} (an alias points at a collection, not at another alias)") from exc
        except ValueError as exc:  # an invalid name
            raise CommandError(str(exc)) from exc
    return _alias_view(galleries.delete_alias(args.name, cli_actor()))


# --- compare -------------------------------------------------------------------------------------

def run_compare(settings: Settings, source: str, target: str, max_probes: int, seed: int) -> dict:
    """``compare --collection A --with B``: the migration's comparison report of two collections
    (service/jobs/compare.py), computed here from the stored vectors; no model is loaded."""
    from ..gallery import DataDirLocked
    from ..jobs.compare import compare_collections

    if max_probes < 1:
        raise CommandError("--max-probes must be at least 1")
    try:
        galleries = open_configured(settings)
    except DataDirLocked as exc:
        raise CommandError(f"{exc}: compare reads every vector of both collections and needs the data dir; stop the "
                           "server (or run it on PostgreSQL, where it may keep serving)") from exc
    try:
        report = compare_collections(galleries.collection(source), galleries.collection(target),
                                     max_probes=max_probes, seed=seed)
    finally:
        galleries.close()
    return {"command": "compare", "backend": galleries.backend, **report.as_dict()}


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (``--concurrency 0`` waited forever, holding the data dir)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1: it must be at least 1")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m service gallery",
        description="Gallery tools. The gallery and model are the ones the service would use: FACE_* settings "
        "(FACE_DATABASE_URL for PostgreSQL, else FACE_DATA_DIR), and these flags.",
    )
    add_backend_arguments(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="write a collection to a file (JSON Lines, with the model id)")
    export.add_argument("file", type=Path)
    imp = sub.add_parser("import", help="add a gallery file's identities (same model only; existing ids skipped)")
    imp.add_argument("file", type=Path)
    imp.add_argument("--batch", type=positive_int, default=1000, help="identities per transaction (default 1000)")
    imp.add_argument("--build-index-after", action="store_true",
                     help="PostgreSQL: drop the HNSW index, load, build it in one pass (much faster for a large "
                     "import; searches meanwhile are exact and slow)")
    enroll = sub.add_parser("enroll", help="enroll DIR/<identity id>/<images> through the model")
    enroll.add_argument("dir", type=Path)
    enroll.add_argument("--image-type", choices=["auto", "photo", "aligned"], default="auto",
                        help="auto (default): crops of the model's input size are aligned faces, others photos")
    enroll.add_argument("--replace", action="store_true",
                        help="enroll people already in the gallery again, replacing their faces")
    enroll.add_argument("--concurrency", type=positive_int, default=8, help="people embedded at once (default 8)")
    alias = sub.add_parser("alias", help="aliases: set NAME COLLECTION | list | delete NAME").add_subparsers(
        dest="action", required=True)
    alias_set = alias.add_parser("set", help="point NAME at COLLECTION (create or re-point: one atomic write)")
    alias_set.add_argument("name")
    alias_set.add_argument("collection")
    alias.add_parser("list", help="every alias and its collection")
    alias.add_parser("delete", help="remove the alias (the collection is untouched)").add_argument("name")
    migrate.add_arguments(sub)  # migrate, jobs (cli/migrate.py)
    compare = sub.add_parser("compare", help="rank-1 of two collections (e.g. a migration's source and copy) and "
                             "how often their top-1 answers agree, as JSON")
    compare.add_argument("--with", dest="target", required=True, help="the collection to compare with")
    compare.add_argument("--max-probes", type=int, default=10_000,
                         help="probe faces per collection; more are sampled, seeded (default 10000)")
    compare.add_argument("--seed", type=int, default=0, help="the sample's seed (default 0)")
    for command in (export, imp, enroll, compare):
        command.add_argument("--collection", default=DEFAULT_COLLECTION,
                             help=f"the collection to read or write (default {DEFAULT_COLLECTION!r}); it must exist")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from ..ops.logging import configure_logging

    configure_logging("warning", False)
    # the data dir lock logs a holder for a server's log; here the command's own error line says it (one line)
    logging.getLogger(DataDirLock.__module__).setLevel(logging.CRITICAL)
    try:
        check_file_argument(args)
        settings = settings_from(args)
        if args.command in ("migrate", "jobs"):
            return migrate.main(args, settings)
        if args.command == "alias":
            with opened_backend(settings) as galleries:
                report = run_alias(args, galleries)
        elif args.command == "compare":
            report = run_compare(settings, args.collection, args.target, args.max_probes, args.seed)
        elif args.command == "enroll":
            if not args.dir.is_dir():
                raise GalleryFileError(f"{args.dir} is not a directory")
            summary = asyncio.run(enroll_folder(
                settings, args.dir, args.image_type, args.replace, args.concurrency, collection=args.collection,
                progress=lambda s: _progress_line(
                    f"people {s.enrolled + s.already + sum(s.skipped_people.values())}/{s.people}, "
                    f"faces {s.faces}, images skipped {sum(s.skipped_images.values())}")))
            sys.stderr.write("\n")
            report = {"collection": args.collection, "people": summary.people, "enrolled": summary.enrolled, "faces": summary.faces,
                      "already_enrolled": summary.already, "people_skipped": dict(summary.skipped_people),
                      "images_skipped": dict(summary.skipped_images), "examples": summary.examples}
        else:
            galleries = open_configured(settings)
            try:
                gallery = galleries.collection(args.collection)
                if args.command == "export":
                    done = export_gallery(gallery, args.file)
                else:
                    bulk = getattr(gallery, "index_built_after", None) if args.build_index_after else None
                    with bulk() if bulk else contextlib.nullcontext():
                        done = import_gallery(gallery, args.file, args.batch, progress=lambda d: _progress_line(
                            f"imported {d.identities} identities, {d.faces} faces, skipped {len(d.skipped)}"),
                            metadata=MetadataLimits(settings.max_metadata_bytes, settings.max_metadata_depth),
                            max_faces=settings.max_faces_per_identity)
            finally:
                galleries.close()
            report = {"command": args.command, "file": str(args.file), "backend": galleries.backend,
                      "collection": args.collection,
                      "identities": done.identities, "faces": done.faces, "skipped_existing": len(done.skipped)}
    except (GalleryFileError, GalleryModelMismatch, GalleryUnavailable, CollectionNotFound, CollectionExists,
            CollectionDamaged, AliasNotFound, CommandError, CropKeyError,  # CropKeyError: a key that does not open the crops
            DataDirLocked, DataDirUnusable, StorageFull, StoreDamaged, CatalogDamaged,
            TooManyFacesForCollection,  # the batches before it are in: raise max_faces, import again
            IdentityExists) as exc:  # enrolled by another client between an import batch's two tries
        return fail(exc)
    except OSError as exc:  # a file that went away or could not be written after the checks: no traceback
        return fail(exc)
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


def check_file_argument(args: argparse.Namespace) -> None:
    """The gallery file of ``import`` is a file, and ``export``'s can be written, before the gallery is
    opened (or, for a data dir not made yet, made): ``GalleryFileError`` naming it otherwise."""
    file: Path | None = getattr(args, "file", None)
    if file is None or args.command not in ("import", "export"):
        return
    if args.command == "import" and not file.is_file():
        raise GalleryFileError(f"{file} is {'not a file' if file.exists() else 'not there'}: name a gallery file")
    if args.command == "export":
        if file.is_dir():
            raise GalleryFileError(f"{file} is a directory: name the file to write")
        if not file.parent.is_dir() or not os.access(file.parent, os.W_OK | os.X_OK):
            raise GalleryFileError(f"{file} cannot be written: {file.parent} is not a directory this process can write")
