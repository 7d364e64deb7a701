"""``python -m service cluster DIR``: group the faces of a folder of photos by person.

Every image under DIR (recursively; photos or aligned crops) goes through the service's own data path
in this process (decode -> detect -> align -> model; every face of a photo), one photo at a time and
the model in batches, so memory holds one batch of crops plus each face's embedding (512 bytes with
the default model), never the photos: any number of photos. The faces are clustered as POST /cluster
does (``service.gallery.hygiene.cluster``: average linkage over the kNN graph, the threshold from the
model's impostor tail, or ``--threshold``).

Writes ``--output`` (default ``clusters.json``): each cluster's faces with their file (relative to
DIR), box and landmarks, biggest cluster first and singletons last; and next to it the faces'
embeddings (``clusters.npy``, row = ``face_index``), which ``--enroll`` reads. ``--folders DIR2``
also writes one folder per cluster of 2+ faces, ``DIR2/cluster-0007/``, holding a symlink per face
named ``face-000123--<photo name>`` that points at its photo.

Naming clusters, then ``--enroll NAMES`` (with the same ``--output``): NAMES is either

* the folders directory: rename a folder to the person's identity id (``cluster-0007`` -> ``alice``);
  folders still called ``cluster-NNNN`` are left out; delete a link whose face is not that person,
  or move it into the right folder (the ``face-N`` prefix says which face it is); or
* a names file: one ``cluster_id identity_id`` per line (tab or spaces; ``#`` comments), or a JSON
  object ``{"7": "alice"}``; clusters not named are left out.

The named faces are enrolled (appended to an identity that exists; ``--replace`` replaces its faces)
into ``--collection`` through the gallery (FACE_DATA_DIR / FACE_DATABASE_URL, as the gallery tools;
run it while no server holds an embedded data dir) or, with ``--url``, through a running service's
POST /enroll with ``--key`` (default FACE_API_KEY).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import Settings
from ..faces.images import image_suffixes
from ..gallery import identity_ids
from ..gallery.api import DEFAULT_COLLECTION, CollectionNotFound, GalleryModelMismatch, GalleryUnavailable
from ..gallery.hygiene.cluster import DEFAULT_FALSE_MERGE, DEFAULT_K, Clustering, cluster_faces, tail_threshold
from ..gallery.openset import choose_tail
from ..model.files import replace_atomically
from .backend import CommandError, cli_actor, count_skip, fail, model_identity, models_checked

if TYPE_CHECKING:  # the pipeline is imported lazily, at run time
    from ..faces.pipeline import ImageType
    from ..state import ServiceState

log = logging.getLogger(__name__)

FORMAT, VERSION = "face-clusters", 1
FOLDER = re.compile(r"^cluster-\d+$")  # a folder nobody has named yet
LINK = re.compile(r"^face-(\d+)--")


@dataclass
class EmbeddedFaces:
    """Every face found under a folder: its embedding, file and location, in walk order."""

    vectors: np.ndarray  # [n, dim] float32, L2-normalised
    files: list[str]  # relative to the root
    faces: list[dict | None]  # box, landmarks, score; None for an aligned crop
    photos: int = 0
    skipped: Counter = field(default_factory=Counter)  # error code -> photos
    examples: list[str] = field(default_factory=list)


def image_files(root: Path, formats: tuple[str, ...]) -> Iterator[Path]:
    """Image files of ``formats`` (FACE_IMAGE_FORMATS) under ``root``, recursively, in a stable (sorted)
    order; symlinks followed."""
    suffixes = image_suffixes(formats)
    for folder, dirs, names in os.walk(root, followlinks=True):
        dirs.sort()
        for name in sorted(names):
            path = Path(folder) / name
            if path.suffix.lower() in suffixes:
                yield path


def embed_tree(state: ServiceState, root: Path, image_type: ImageType = "auto", batch: int = 64,
               progress: Callable[[int, int], None] | None = None) -> EmbeddedFaces:
    """Stream every image under ``root`` through the service's data path (all faces of each photo)."""
    from ..errors import ServiceError
    from ..faces.pipeline import decode_faces
    from ..model.preprocess import l2_normalise

    chunks: list[np.ndarray] = []
    crops: list[np.ndarray] = []
    found = EmbeddedFaces(np.empty((0, state.contract.embedding_size), np.float32), [], [])

    def flush() -> None:
        if crops:
            chunks.append(l2_normalise(state.model.execute_raw(np.stack(crops))).astype(np.float32))
            crops.clear()

    for path in image_files(root, state.settings.image_formats):
        found.photos += 1
        try:
            faces = decode_faces(state, [path.read_bytes()], image_type, "all")
        except ServiceError as exc:  # not an image, no face, too big...: counted, named, left out
            count_skip(found.skipped, found.examples, path, exc.code.value)
            continue
        except OSError as exc:
            count_skip(found.skipped, found.examples, path, "unreadable_file", exc)
            continue
        relative = str(path.relative_to(root))
        for crop, located in zip(faces.crops, faces.located):
            crops.append(crop)
            found.files.append(relative)
            found.faces.append(None if located is None else located.as_dict())
        if len(crops) >= batch:
            flush()
        if progress:
            progress(found.photos, len(found.files))
    flush()
    if chunks:
        found.vectors = np.concatenate(chunks)
    return found


def cluster_document(root: Path, found: EmbeddedFaces, clustering: Clustering, model_id: str,
                     embeddings_file: str, false_merge: float | None) -> dict[str, Any]:
    clusters: list[dict[str, Any]] = [{"cluster_id": cid, "size": len(members),
                                       "faces": [{"face_index": i, "file": found.files[i], "face": found.faces[i]}
                                                 for i in members]}
                                      for cid, members in enumerate(clustering.members())]
    return {"format": FORMAT, "version": VERSION, "root": str(root.resolve()), "model_id": model_id,
            "method": clustering.method, "threshold": round(clustering.threshold, 4),
            "false_merge": false_merge, "faces": len(found.files), "photos": found.photos,
            "clusters_of_2_or_more": sum(1 for members in clustering.members() if len(members) > 1),
            "skipped": dict(found.skipped), "skipped_examples": found.examples,
            "embeddings": embeddings_file, "clusters": clusters}


def write_folders(document: dict[str, Any], into: Path) -> int:
    """One folder per cluster of 2+ faces with a symlink per face to its photo; returns the folders made."""
    root = Path(document["root"])
    into.mkdir(parents=True, exist_ok=True)
    made = 0
    for cluster in document["clusters"]:
        if cluster["size"] < 2:
            continue
        folder = into / f"cluster-{cluster['cluster_id']:04d}"
        folder.mkdir(exist_ok=True)
        for face in cluster["faces"]:
            link = folder / f"face-{face['face_index']:06d}--{Path(face['file']).name}"
            if not link.is_symlink():
                link.symlink_to((root / face["file"]).resolve())
        made += 1
    return made


def run_cluster(settings: Settings, root: Path, output: Path, threshold: float | None = None,
                false_merge: float = DEFAULT_FALSE_MERGE, image_type: ImageType = "auto",
                k: int = DEFAULT_K, folders: Path | None = None) -> dict[str, Any]:
    from .calibrate import _service_state

    state = _service_state(settings)
    started = time.perf_counter()
    found = embed_tree(state, root, image_type, progress=_progress)
    embedded = time.perf_counter()
    if threshold is None:
        # the data dir's own calibration (python -m service calibrate), else the model's tail
        tail, _ = choose_tail(state.gallery_tail.current(), state.contract.impostor_tail)
        threshold = tail_threshold(tail, false_merge, floor=state.verify_threshold)
        link: float | None = false_merge
    else:
        link = None
    clustering = cluster_faces(found.vectors, threshold, k, threads=os.cpu_count() or 1)
    embeddings_file = output.with_suffix(".npy")
    replace_atomically(embeddings_file, lambda tmp: _save_npy(tmp, found.vectors), private=True)
    document = cluster_document(root, found, clustering, state.contract.model_id, embeddings_file.name, link)
    document["seconds"] = {"embed": round(embedded - started, 2),
                           "cluster": round(time.perf_counter() - embedded, 2)}
    replace_atomically(output, lambda tmp: tmp.write_text(json.dumps(document, indent=1) + "\n"), private=True)
    summary = {key: document[key] for key in ("faces", "photos", "threshold", "method", "clusters_of_2_or_more",
                                                "skipped", "seconds")}
    summary["clusters"] = len(document["clusters"])
    summary["output"] = str(output)
    if folders is not None:
        summary["folders"] = write_folders(document, folders)
        summary["folders_dir"] = str(folders)
    return summary


def _save_npy(path: Path, vectors: np.ndarray) -> None:
    with open(path, "wb") as out:  # a file object: np.save given a path would add ".npy" to the temporary name
        np.save(out, vectors)


# --- naming and enrolling ------------------------------------------------------------------------

def read_names(path: Path, document: dict[str, Any]) -> dict[str, list[int]]:
    """identity id -> face indices, from renamed folders or a names file (see the module docstring)."""
    faces_of = {c["cluster_id"]: [f["face_index"] for f in c["faces"]] for c in document["clusters"]}
    named: dict[str, list[int]] = {}
    if path.is_dir():
        for folder in sorted(p for p in path.iterdir() if p.is_dir()):
            if FOLDER.match(folder.name):
                continue
            indices = [int(m.group(1)) for p in sorted(folder.iterdir()) if (m := LINK.match(p.name))]
            if indices:
                named.setdefault(_identity(folder.name, folder), []).extend(indices)
    else:
        text = path.read_text(encoding="utf-8")
        if text.lstrip().startswith("{"):
            try:
                pairs = [(str(k), v) for k, v in json.loads(text).items()]
            except ValueError as exc:
                raise CommandError(f"{path} is not a JSON object of cluster_id -> identity id: {exc}") from exc
        else:
            pairs = []
            for number, line in enumerate(text.splitlines(), start=1):
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                parts = line.split(None, 1)
                if len(parts) != 2:
                    raise CommandError(f"{path} line {number}: expected 'cluster_id identity_id'")
                pairs.append((parts[0], parts[1].strip()))
        for cluster, identity in pairs:
            if not cluster.isdigit() or int(cluster) not in faces_of:
                raise CommandError(f"{path}: there is no cluster {cluster!r} in the clusters file")
            if not isinstance(identity, str):
                raise CommandError(f"{path}: cluster {cluster}: the identity id must be a string")
            named.setdefault(_identity(identity, path), []).extend(faces_of[int(cluster)])
    return named


def _identity(name: str, where: Path) -> str:
    identity = identity_ids.normalise(name)
    why = identity_ids.problem(identity)
    if why is not None:
        raise CommandError(f"{where}: {name!r} is not a valid identity id: {why}")
    return identity


def load_clusters(output: Path) -> tuple[dict[str, Any], np.ndarray]:
    try:
        document = json.loads(output.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CommandError(f"cannot read the clusters file {output}: {exc}") from exc
    if document.get("format") != FORMAT or document.get("version") != VERSION:
        raise CommandError(f"{output} is not a clusters file of this command")
    vectors = np.load(output.parent / document["embeddings"])
    if len(vectors) != document["faces"]:
        raise CommandError(f"{document['embeddings']} holds {len(vectors)} embeddings; {output} has "
                           f"{document['faces']} faces")
    return document, vectors


def enroll_named(settings: Settings, output: Path, names: Path, collection: str, replace: bool = False,
                 url: str | None = None, key: str | None = None) -> dict[str, Any]:
    document, vectors = load_clusters(output)
    named = read_names(names, document)
    if not named:
        raise CommandError(f"{names} names no cluster: rename a cluster folder or list 'cluster_id identity_id'")
    for identity, indices in named.items():
        if any(not 0 <= i < len(vectors) for i in indices):
            raise CommandError(f"{identity}: a face index is not in {output}")
    enrolled: dict[str, int] = {}
    if url is not None:
        for identity, indices in named.items():
            enrolled[identity] = _enroll_over_http(url, key, settings.api_key_header, collection, identity,
                                                   vectors[sorted(set(indices))], document["model_id"], replace)
    else:
        enrolled = _enroll_in_gallery(settings, document["model_id"], collection, named, vectors, replace)
    return {"collection": collection, "identities": len(enrolled), "faces": sum(enrolled.values()),
            "enrolled": enrolled, "via": url or "gallery"}


def _enroll_in_gallery(settings: Settings, model_id: str, collection: str, named: dict[str, list[int]],
                       vectors: np.ndarray, replace: bool) -> dict[str, int]:
    from ..gallery.open import open_gallery

    configured, dim = model_identity(settings)
    if configured != model_id:
        raise CommandError(f"the clusters were embedded by {model_id!r}; the configured model is {configured!r}")
    galleries = open_gallery(settings, configured, dim)
    try:
        gallery = galleries.collection(collection)
        actor = cli_actor()
        done = {}
        for identity, indices in named.items():
            result = gallery.enroll(identity, vectors[sorted(set(indices))], None, replace,
                                    settings.max_faces_per_identity, actor)
            done[identity] = len(result.face_ids)
        return done
    finally:
        galleries.close()


def _enroll_over_http(url: str, key: str | None, header: str, collection: str, identity: str, vectors: np.ndarray,
                      model_id: str, replace: bool) -> int:
    path = "/enroll" if collection == DEFAULT_COLLECTION else f"/collections/{collection}/enroll"
    body = json.dumps({"identity_id": identity, "embeddings": vectors.tolist(), "model_id": model_id,
                       "replace": replace}).encode()
    request = urllib.request.Request(url.rstrip("/") + path, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **({header: key} if key else {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return len(json.loads(response.read())["face_ids"])
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:500]
        raise CommandError(f"enrolling {identity!r}: HTTP {exc.code}: {detail}") from exc
    except urllib.error.URLError as exc:
        raise CommandError(f"enrolling {identity!r}: {exc.reason}") from exc


# --- the command line ----------------------------------------------------------------------------

def _progress(photos: int, faces: int) -> None:
    if photos % 200 == 0:
        end = "\r" if sys.stderr.isatty() else "\n"
        sys.stderr.write(f"photos {photos}, faces {faces}{end}")
        sys.stderr.flush()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m service cluster",
                                     description="Group the faces of a folder of photos by person (clusters.json); "
                                     "--enroll turns the clusters you name into identities.",
                                     epilog="Name clusters, then: python -m service cluster --enroll NAMES "
                                     "(renamed --folders, or a names file 'cluster_id identity_id').")
    parser.add_argument("dir", type=Path, nargs="?", help="photos (or aligned crops), searched recursively")
    parser.add_argument("--output", type=Path, default=Path("clusters.json"),
                        help="the clusters file to write (or, with --enroll, read); embeddings go next to it (.npy)")
    parser.add_argument("--threshold", type=float,
                        help="cosine for average linkage; default: from the model's impostor tail (--false-merge)")
    parser.add_argument("--false-merge", type=float, default=DEFAULT_FALSE_MERGE,
                        help="without --threshold: the chance that two faces of different people reach the "
                        f"threshold, by the model's impostor tail (default {DEFAULT_FALSE_MERGE:g})")
    parser.add_argument("--k", type=int, default=DEFAULT_K, help=f"neighbours per face in the graph ({DEFAULT_K})")
    parser.add_argument("--image-type", choices=["auto", "photo", "aligned"], default="auto",
                        help="auto (default): images of the model's input size are aligned faces, others photos")
    parser.add_argument("--folders", type=Path, help="also write a folder of symlinks per cluster of 2+ faces here")
    parser.add_argument("--model", type=Path, help="ONNX model or directory (FACE_MODEL); default: SFace")
    parser.add_argument("--enroll", type=Path, metavar="NAMES",
                        help="enroll the named clusters of --output: renamed --folders, or a names file")
    parser.add_argument("--collection", default=DEFAULT_COLLECTION, help="--enroll: the collection (it must exist)")
    parser.add_argument("--replace", action="store_true", help="--enroll: replace an existing identity's faces")
    parser.add_argument("--url", help="--enroll through this running service instead of the gallery")
    parser.add_argument("--key", default=os.environ.get("FACE_API_KEY"), help="--url: API key (default FACE_API_KEY)")
    parser.add_argument("--data-dir", type=Path, help="--enroll: embedded gallery directory (FACE_DATA_DIR)")
    parser.add_argument("--database-url", help="--enroll: PostgreSQL URL (FACE_DATABASE_URL)")
    args = parser.parse_args(argv)
    if (args.dir is None) == (args.enroll is None):
        parser.error("give DIR (to cluster) or --enroll NAMES (to enroll named clusters), not both")
    if args.threshold is not None and not -1.0 <= args.threshold <= 1.0:
        parser.error("--threshold is a cosine in [-1, 1]")
    if not 0.0 < args.false_merge < 1.0:
        parser.error("--false-merge lies in (0, 1)")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from pydantic import ValidationError

    from ..ops.logging import configure_logging

    configure_logging("warning", False)
    overrides = {k: v for k, v in {"model": args.model, "data_dir": args.data_dir,
                                   "database_url": args.database_url}.items() if v is not None}
    try:
        try:
            settings = models_checked(Settings(**overrides))
        except ValidationError as exc:
            raise CommandError(f"invalid settings: {exc}") from exc
        if args.enroll is not None:
            if not args.enroll.exists():
                raise CommandError(f"{args.enroll} does not exist")
            report = enroll_named(settings, args.output, args.enroll, args.collection, args.replace, args.url, args.key)
        else:
            if not args.dir.is_dir():
                raise CommandError(f"{args.dir} is not a directory")
            report = run_cluster(settings, args.dir, args.output, args.threshold, args.false_merge,
                                 args.image_type, args.k, args.folders)
            sys.stderr.write("\n")
    except (CommandError, GalleryModelMismatch, GalleryUnavailable, CollectionNotFound, OSError) as exc:
        return fail(exc)
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0
