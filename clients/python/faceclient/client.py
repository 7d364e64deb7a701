"""FaceClient (sync) and AsyncFaceClient: the same methods over one keep-alive connection pool each.

Both build their requests and read their answers with ``_Base`` (one place for routes, bodies, errors and
retry waits); they differ only in how they wait for the network.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import json
import os
import random
import re
import ssl
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import quote

import httpx

from . import __version__
from .errors import (
    IMAGE_CODES,
    BadRequestError,
    FaceConnectionError,
    FaceServiceError,
    IncompatibleServerError,
    NotFoundError,
    class_for,
)
from .images import Color, ImageInput, as_list, encode
from .models import (
    Alias,
    AliasList,
    AuditEntry,
    AuditPage,
    ClusterResult,
    Collection,
    CollectionDeleted,
    CollectionList,
    DetectResult,
    DuplicatesResult,
    EmbedResult,
    EnrollResult,
    ErrorBody,
    FaceDeleted,
    FacesDeleted,
    FolderSummary,
    Health,
    IdentifyResult,
    Identity,
    IdentityDeleted,
    IdentityPage,
    IdentitySummary,
    Job,
    JobCreated,
    JobList,
    Key,
    KeyCreated,
    KeyList,
    KeyRevoked,
    MergeResult,
    Model,
    MoveResult,
    OutliersResult,
    PersonResult,
    ProbeResult,
    Ready,
    SkippedFile,
    VerifyResult,
    WhoAmI,
)

M = TypeVar("M", bound=Model)
T = TypeVar("T")
ImageType = Literal["aligned", "photo", "auto"]
Progress = Callable[[int, int], None]  # (done, total)
Transport = Literal["multipart", "json"]
DEFAULT_COLLECTION = "default"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
RETRIED = frozenset({429, 503})
# never retried: 503s that waiting does not mend (the operator must act), and write_outcome_unknown (the write may
# have been stored: sent again, an enroll would store its faces twice; the caller reads it back instead)
NOT_RETRIED = frozenset({"collection_damaged", "catalog_damaged", "write_outcome_unknown"})
# the answers after which the service guarantees the request changed nothing: refused before its handler ran
# (rate_limited, model_not_ready, gallery_loading, gallery_unavailable), before or instead of its write
# (overloaded: no model, decode or database room, or a deadlock's victim, rolled back), or its transaction
# rolled back (database_unavailable: the connection failed before the COMMIT). A request that is not
# idempotent (Call.idempotent) is retried after these alone: never after a 503 of another code, or of none
# (a proxy's, which may have passed the request on)
NOTHING_DONE = frozenset({"rate_limited", "model_not_ready", "gallery_loading", "gallery_unavailable", "overloaded",
                          "database_unavailable"})
# enroll_folder: a request refused for its size is split and sent again; a 409 of these refuses the person alone
SPLIT_CODES = frozenset({"payload_too_large", "too_many_faces"})
PERSON_CODES = frozenset({"possible_duplicate", "crops_required"})
# identify_many: a batch refused with one of these is sent again one image at a time (and an image refused
# alone gets it as its result's error); any other error refuses the request itself and is raised
PER_IMAGE_CODES = IMAGE_CODES | SPLIT_CODES
# enroll_folder's default cap on the bytes of files a request carries: well under the server's default body
# limit (FACE_MAX_REQUEST_BYTES, 32 MiB), with room for multipart's own bytes or base64's third more (json)
MAX_BYTES_PER_REQUEST = 16 * 1024 * 1024


@dataclass
class Call:
    method: str
    path: str
    json: dict[str, Any] | None = None
    params: dict[str, Any] | None = None
    content: bytes | None = None  # a multipart form, encoded (its Content-Type in headers)
    headers: dict[str, str] = field(default_factory=lambda: {"X-Request-ID": uuid.uuid4().hex})
    read_timeout: float | None = None  # seconds to wait for the answer (None: the client's timeout)
    # False: sent twice, it would change the gallery twice (an enroll that appends, a merge, a move, a rename,
    # a new collection, key or job): retried only after an answer in NOTHING_DONE
    idempotent: bool = True


# the least a whole-collection scan (duplicates, outliers) waits for its answer: such a scan takes minutes
# at a million faces (156 s for /duplicates on 2 CPU cores), past the 60 s a request waits by default
SCAN_TIMEOUT_S = 1800.0
# the most face ids one POST /faces/delete takes: delete_faces sends more in requests of this many
MAX_DELETE_FACE_IDS = 1000


def _many(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    return list(images) if isinstance(images, (list, tuple)) else [images]


class Keep(enum.Enum):
    """A setting left out of an update (the server keeps it), unlike None (back to the default)."""

    KEEP = "keep"


KEEP = Keep.KEEP


def _drop_none(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if v is not None}


def _code(response: httpx.Response) -> str | None:
    """The error code of an error answer whose body is read (None: none, or not the service's JSON)."""
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError, httpx.ResponseNotRead):
        return None


def _segment(value: str) -> str:
    """``value`` as one path segment: percent-encoded, ``/`` included, and ``.`` / ``..`` as ``%2E`` /
    ``%2E%2E``, which httpx (as any URL resolver) would otherwise remove with the segment before them (an
    identity ``..`` of collection C was ``DELETE /collections/C``); the server then refuses them itself.
    ValueError for an empty one (nothing is sent: it would name the route above)."""
    if not value:
        raise ValueError("an id or name in a URL path must not be empty")
    quoted = quote(value, safe="")
    return quoted.replace(".", "%2E") if quoted in (".", "..") else quoted


def without_user_info(text: str) -> str:
    """``text`` with the user info (``user:password@``) of each URL in it taken out: for messages."""
    return _USER_INFO.sub(r"\1", text)


_USER_INFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/?#\s]*@")  # to its last @, as URLs are read


def _check_url(url: str, shown: str) -> None:
    """ValueError for a URL httpx would refuse (httpx.InvalidURL, e.g. a port that is no number) or a port
    out of range (httpx takes 99999 and fails to connect), naming it as ``shown`` (no user info)."""
    try:
        port = httpx.URL(url).port
    except httpx.InvalidURL as e:
        raise ValueError(f"base_url {shown!r} is not a usable URL: {without_user_info(str(e))}") from None
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"base_url {shown!r}: its port must be 1 to 65535, not {port}")


def _major(version: str) -> str:
    return version.split(".", 1)[0]


def person_folders(root: str | Path) -> list[tuple[str, list[Path]]]:
    """One sub-folder per person (its name is the identity id) with its images, sorted."""
    return [(d.name, sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
            for d in sorted(Path(root).iterdir()) if d.is_dir()]


def _batches(items: Sequence[ImageInput], size: int) -> list[tuple[int, list[ImageInput]]]:
    return [(start, list(items[start:start + size])) for start in range(0, len(items), size)]


def _face_id_chunks(face_ids: Iterable[int]) -> list[list[int]]:
    """delete_faces' ids, each once (in the order given), in requests of at most MAX_DELETE_FACE_IDS; ValueError
    when there is none (nothing is sent)."""
    ids = list(dict.fromkeys(int(f) for f in face_ids))
    if not ids:
        raise ValueError("delete_faces needs at least one face id")
    return [ids[start:start + MAX_DELETE_FACE_IDS] for start in range(0, len(ids), MAX_DELETE_FACE_IDS)]


def _merged_deletions(parts: list[FacesDeleted]) -> FacesDeleted:
    """The answers of delete_faces' requests as one: deleted by face id, not_found ascending. An identity whose
    faces were in several requests and that the last of them deleted is ``identity_deleted`` on each of its
    faces, as one request would have answered."""
    if len(parts) == 1:
        return parts[0]
    emptied: dict[str, bool] = {}  # identity -> deleted by the last request that erased a face of it
    for part in parts:
        emptied |= {d.identity_id: d.identity_deleted for d in part.deleted}
    deleted = [d if d.identity_deleted or not emptied[d.identity_id] else d.model_copy(update={"identity_deleted": True})
               for part in parts for d in part.deleted]
    return FacesDeleted(deleted=sorted(deleted, key=lambda d: d.face_id),
                        not_found=sorted(f for part in parts for f in part.not_found))


def _failed_probe(index: int, error: FaceServiceError) -> ProbeResult:
    return ProbeResult(image_index=index, identity_id=None, known=False, score=None, candidates=[],
                       error=ErrorBody(code=error.code, message=error.message, details=error.details))


def _shift(results: list[ProbeResult], start: int) -> list[ProbeResult]:
    return [r.model_copy(update={"image_index": r.image_index + start}) for r in results]


def _form_text(value: Any) -> str:
    """A field's value as the service reads it in a form: booleans true/false, lists and objects as JSON."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def _noop() -> None:
    pass


async def _all_or_cancel(coroutines: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Their results, in order, run as tasks; the first exception cancels the others and is raised once they
    have ended (as asyncio.TaskGroup, which Python 3.10 lacks). asyncio.gather raised it with the others
    still running: a bulk helper went on sending requests (writes included) after its caller had the
    exception. The caller's cancellation cancels them likewise."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    if not tasks:
        return []
    done: set[asyncio.Future[T]] = set()
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()  # a finished one stays as it is
        await asyncio.wait(tasks)
        for task in tasks:
            if not task.cancelled():
                task.exception()  # read, each: none is logged as "never retrieved"
    for task in tasks:
        if task in done and not task.cancelled() and (error := task.exception()) is not None:
            raise error
    return [task.result() for task in tasks]


def progress_reporter(progress: bool | Progress | None, total: int, what: str) -> tuple[Progress | None,
                                                                                          Callable[[], None]]:
    """The bulk helpers' ``progress``: a callable is called with (done, total); True shows a tqdm bar (tqdm
    must be installed: ``pip install 'faceclient[progress]'``); None (the default) shows one when tqdm is
    installed and stderr is a terminal; False shows nothing. Returns (callback or None, close)."""
    if callable(progress):
        return progress, _noop
    if progress is False or (progress is None and not sys.stderr.isatty()):
        return None, _noop
    try:
        from tqdm import tqdm
    except ImportError:
        if progress:
            raise ImportError("progress=True needs tqdm: pip install 'faceclient[progress]'") from None
        return None, _noop
    bar = tqdm(total=total, desc=what, unit=" " + what.split()[-1])

    def update(done: int, total: int) -> None:
        bar.update(done - bar.n)

    return update, bar.close


class _PersonEnroll:
    """One person of enroll_folder: its files in requests of at most ``size`` files and ``max_bytes`` bytes of
    files; a file the service refuses for itself (IMAGE_CODES: not an image, no face, low quality...) is
    skipped and the rest sent again, so one bad file costs its person nothing but that file. A request the
    service finds too big (SPLIT_CODES: over FACE_MAX_FACES_PER_REQUEST or FACE_MAX_REQUEST_BYTES) is split
    (by its ``details.limit``, else in halves) and its parts sent; a single file still too big is skipped.
    Any other refusal of the person (PERSON_CODES, or a 4xx of its request) ends the person: it goes to
    ``failed``, or to ``partial`` when some of its faces are stored; the run goes on.

    Resuming (not ``replace``): the server does not know which file a stored face came from, only how many
    faces the identity has (``found``). As many as the folder has files, or more, is a person enrolled
    before: left alone (files removed from its folder since change nothing). Fewer is a person a run left
    partly enrolled (cut short, or stopped by a refusal), or one whose folder got files since: enrolled
    again from its whole folder with replace, so that its faces are its folder's, none twice. A face stored
    by other means than this folder is replaced with the rest; a person with a file the service refuses
    (no_face...) has fewer faces than files for good and is enrolled again by each rerun (the same faces)."""

    def __init__(self, identity: str, files: list[Path], size: int, max_bytes: int, replace: bool) -> None:
        self.result = PersonResult(identity_id=identity, files=len(files))
        self.size, self.max_bytes = max(1, size), max(1, max_bytes)
        self.file_bytes = {path: _file_bytes(path) for path in files}
        self.chunks = self._pack(files)
        self.replace = replace  # until a request succeeds: the first one replaces, later ones append

    def found(self, face_count: int) -> None:
        """The identity's faces in the gallery before the run (0: not enrolled): already enrolled (nothing is
        sent), partly (enrolled again, replace), or not at all."""
        self.result.face_count = face_count
        if face_count and face_count >= self.result.files:
            self.result.already = True
        elif face_count:
            self.result.resumed = self.replace = True

    @staticmethod
    def takes(error: FaceServiceError) -> bool:
        """Whether ``error`` refuses this person (or one of its files, or its request's size) rather than the
        whole run (a key, a collection, the server: raised)."""
        return isinstance(error, BadRequestError) or error.code in PERSON_CODES

    def refuse(self, error: FaceServiceError) -> None:
        """The person fails with ``error`` (nothing more is sent for it)."""
        self.result.error = ErrorBody(code=error.code, message=error.message, details=error.details)

    def _pack(self, files: list[Path]) -> list[list[Path]]:
        chunks: list[list[Path]] = []
        held = 0
        for path in files:
            if not chunks or len(chunks[-1]) >= self.size or held + self.file_bytes[path] > self.max_bytes:
                chunks.append([])
                held = 0
            chunks[-1].append(path)
            held += self.file_bytes[path]
        return chunks

    def next(self) -> tuple[list[Path], bool] | None:
        go = self.chunks and self.result.error is None and not self.result.already
        return (self.chunks[0], self.replace) if go else None

    def enrolled(self, result: EnrollResult) -> None:
        self.result.faces += len(result.face_ids)
        self.result.face_count = result.face_count
        self.replace = False
        self.chunks.pop(0)

    def refused(self, error: FaceServiceError) -> None:
        chunk = self.chunks[0]
        index = error.details.get("index")
        if error.code in SPLIT_CODES:
            self._split(error)
        elif error.code not in IMAGE_CODES:
            self.refuse(error)
        elif isinstance(index, int) and 0 <= index < len(chunk):
            self._skip(chunk.pop(index), error)
        elif len(chunk) > 1:  # which file is not said: each on its own
            self.chunks[:1] = [[path] for path in chunk]
        else:
            self._skip(chunk.pop(), error)
        if self.chunks and not self.chunks[0]:
            self.chunks.pop(0)

    def _split(self, error: FaceServiceError) -> None:
        """The first request was too big: its files again in smaller ones (and the rest under the limit said)."""
        chunk = self.chunks[0]
        if len(chunk) == 1:  # one file, too big by itself (or with too many faces in it): skipped
            self._skip(chunk.pop(), error)
            return
        limit = error.details.get("limit")
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            if error.code == "too_many_faces":
                self.size = min(self.size, limit)
            else:  # the body's bytes: room for the form's other parts
                self.max_bytes = min(self.max_bytes, limit * 3 // 4)
        head = self._pack(chunk)
        if len(head) == 1:  # the limit said nothing smaller (or nothing): halves
            head = [chunk[:len(chunk) // 2], chunk[len(chunk) // 2:]]
        self.chunks = head + self._pack([path for rest in self.chunks[1:] for path in rest])

    def _skip(self, path: Path, error: FaceServiceError) -> None:
        self.result.skipped.append(SkippedFile(file=path.name, code=error.code, message=error.message))

    def done(self) -> PersonResult:
        result = self.result
        if result.already:
            return result
        if result.error is None and not result.files:
            result.error = ErrorBody(code="no_images", message="the folder holds no image file ("
                                     + ", ".join(sorted(IMAGE_SUFFIXES)) + ")")
        if result.error is None and result.faces == 0 and result.skipped:
            first = result.skipped[0]
            result.error = ErrorBody(code=first.code, message=f"none of the {result.files} images "
                                     f"could be enrolled (first: {first.file}: {first.message})")
        # some faces stored: by this run's requests, or by the run it resumed (its replace never landed)
        result.partial = result.error is not None and result.face_count > 0
        return result


def _file_bytes(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # read (and its error raised) when it is sent
        return 0


class _Base:
    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = 60.0,
                 collection: str = DEFAULT_COLLECTION, max_retries: int = 3, retry_budget_s: float = 60.0,
                 backoff_s: float = 0.5, check_version: bool = True, transport: Transport = "multipart",
                 ca_file: str | os.PathLike[str] | None = None,
                 client_cert: str | os.PathLike[str] | tuple[str | os.PathLike[str], str | os.PathLike[str]] | None = None,
                 ) -> None:
        """``timeout``: seconds each phase of a request may take (connect, each write, each wait for the
        next bytes of the answer: httpx's timeout), not a deadline for the whole request. 429 and 503 answers are retried up to
        ``max_retries`` times, waiting Retry-After (or ``backoff_s`` doubling) plus jitter, while the
        waits fit in ``retry_budget_s``; never ``write_outcome_unknown`` (the write may be stored: read it
        back), ``collection_damaged`` or ``catalog_damaged``. A call that is not idempotent (an enroll that
        appends, a merge, a move, a rename, creating a collection, key, migration or scan job) is retried
        only after an answer by which the service says nothing ran (NOTHING_DONE: ``rate_limited``,
        ``overloaded``, ``model_not_ready``, ``gallery_loading``, ``gallery_unavailable``,
        ``database_unavailable``), never after another 503 (a proxy's, say). A connection error (no answer)
        is never retried, whatever the call: FaceConnectionError. ``collection``: the default one for gallery calls.
        ``transport``: how images travel: "multipart" (their bytes as uploaded files, the default) or
        "json" (base64 in a JSON body, a third larger: for a proxy that refuses multipart).
        ``ca_file``: a PEM file of the certificate authorities to trust for an ``https://`` service (a
        private CA, or a self-signed server's own certificate), instead of the usual ones (certifi's,
        or ``SSL_CERT_FILE``'s). The certificate is always checked. ``client_cert``: the certificate this
        client shows a service that asks for one (mutual TLS: FACE_TLS_CLIENT_CA_FILE), a PEM file with its
        key in it, or (certificate file, key file)."""
        if api_key and not all("!" <= c <= "~" for c in api_key):  # never shown: it is a secret
            raise ValueError("api_key must be printable ASCII without spaces or control characters (a key read "
                             "from a file with its newline?); the key is not shown")
        self.base_url = base_url.rstrip("/")
        self._shown_url = without_user_info(self.base_url)  # the URL in messages: no password
        _check_url(self.base_url, self._shown_url)
        self._tls_verify: ssl.SSLContext | bool = True
        if ca_file or client_cert:
            context = ssl.create_default_context(cafile=os.fspath(ca_file) if ca_file else None)
            if client_cert:
                cert, key = client_cert if isinstance(client_cert, tuple) else (client_cert, None)
                context.load_cert_chain(os.fspath(cert), os.fspath(key) if key else None)
            self._tls_verify = context
        self.transport = transport
        self.collection = collection
        self.max_retries = max_retries
        self.retry_budget_s = retry_budget_s
        self.backoff_s = backoff_s
        self._check_version = check_version
        self._version_checked = not check_version
        self._api_key = api_key
        self._headers = {"X-API-Key": api_key} if api_key else {}
        self._timeout = httpx.Timeout(timeout)
        self._timeout_s = timeout
        self.server_version: str | None = None

    def _call_timeout(self, call: Call) -> httpx.Timeout:
        if call.read_timeout is None:
            return self._timeout
        return httpx.Timeout(self._timeout_s, read=call.read_timeout)

    def _scan_timeout(self, timeout: float | None) -> float:
        return timeout if timeout is not None else max(self._timeout_s, SCAN_TIMEOUT_S)

    # --- routes and bodies ----------------------------------------------------------------------
    def _prefix(self, collection: str | None) -> str:
        name = collection or self.collection
        return "" if name == DEFAULT_COLLECTION else f"/collections/{_segment(name)}"

    @staticmethod
    def _images(images: ImageInput | Sequence[ImageInput], color: Color | None) -> list[bytes]:
        return [encode(image, color) for image in _many(images)]

    def _body(self, path: str, fields: dict[str, Any], images: dict[str, list[bytes]]) -> Call:
        """A POST of ``fields`` (None: left out) and the encoded ``images`` by field: multipart, the images'
        bytes as files (no base64: a third less to send, nothing to encode or decode), or JSON with base64."""
        fields = _drop_none(fields)
        if self.transport == "json" or not any(images.values()):
            for name, blobs in images.items():
                fields[name] = [base64.b64encode(b).decode("ascii") for b in blobs] if name == "images" else \
                    base64.b64encode(blobs[0]).decode("ascii")
            return Call("POST", path, fields)
        files = [(name, (f"{name}-{i}", blob, "application/octet-stream"))
                 for name, blobs in images.items() for i, blob in enumerate(blobs)]
        # encoded here, sent as one piece: httpx streams a form part by part, and a server refusing the body
        # early (413 payload_too_large) then closes the connection under the writes, so that the client
        # (AsyncClient always) reads a reset instead of the answer
        form = httpx.Request("POST", "http://form", files=files, data={k: _form_text(v) for k, v in fields.items()})
        call = Call("POST", path, content=form.read())
        call.headers["Content-Type"] = form.headers["Content-Type"]
        return call

    def _embed(self, images: Any, image_type: ImageType, multi_face: str, color: Color | None,
               model: str | None = None) -> Call:
        return self._body("/embed", {"image_type": image_type, "multi_face": multi_face, "model": model},
                          {"images": self._images(images, color)})

    def _detect(self, images: Any, return_crops: bool, color: Color | None, model: str | None = None) -> Call:
        return self._body("/detect", {"return_crops": return_crops, "model": model},
                          {"images": self._images(images, color)})

    def _verify(self, a: Any, b: Any, identity_id: str | None, embedding_a: Any, embedding_b: Any,
                threshold: float | None, image_type: ImageType, multi_face: str, color: Color | None,
                model_id: str | None, collection: str | None) -> Call:
        body: dict[str, Any] = {
            "embedding_a": None if embedding_a is None else as_list(embedding_a),
            "embedding_b": None if embedding_b is None else as_list(embedding_b),
            "identity_id": identity_id, "threshold": threshold, "model_id": model_id}
        images = {name: [encode(image, color)] for name, image in (("image_a", a), ("image_b", b)) if image is not None}
        if images:
            body |= {"image_type": image_type, "multi_face": multi_face}
        return self._body(self._prefix(collection) + "/verify", body, images)

    def _identify(self, images: Any, embeddings: Any, top_k: int, threshold: float | None,
                  min_quality: float | None, image_type: ImageType, multi_face: str, color: Color | None,
                  model_id: str | None, collection: str | None, face_ids: Sequence[int] | None = None,
                  identity_id: str | None = None, among: Sequence[str] | None = None) -> Call:
        body: dict[str, Any] = {"top_k": top_k, "threshold": threshold, "min_quality": min_quality,
                                "model_id": model_id, "identity_id": identity_id,
                                "face_ids": None if face_ids is None else [int(f) for f in face_ids],
                                "among": None if among is None else list(among)}
        if images is not None:
            body |= {"image_type": image_type, "multi_face": multi_face}
        if embeddings is not None:
            body["embeddings"] = [as_list(e) for e in embeddings]
        blobs = {} if images is None else {"images": self._images(images, color)}
        return self._body(self._prefix(collection) + "/identify", body, blobs)

    def _enroll(self, identity_id: str, images: Any, embeddings: Any, metadata: dict[str, Any] | None,
                replace: bool, min_quality: float | None, force_quality: bool, image_type: ImageType,
                multi_face: str, color: Color | None, model_id: str | None, collection: str | None) -> Call:
        body: dict[str, Any] = {"identity_id": identity_id, "metadata": metadata, "replace": replace,
                                "min_quality": min_quality, "force_quality": force_quality or None,
                                "model_id": model_id}
        if images is not None:
            body |= {"image_type": image_type, "multi_face": multi_face}
        if embeddings is not None:
            body["embeddings"] = [as_list(e) for e in embeddings]
        blobs = {} if images is None else {"images": self._images(images, color)}
        call = self._body(self._prefix(collection) + "/enroll", body, blobs)
        call.idempotent = replace  # appending faces again would store them twice; a replace stores the same
        return call

    def _identity(self, method: str, identity_id: str, collection: str | None) -> Call:
        return Call(method, f"{self._prefix(collection)}/identities/{_segment(identity_id)}")

    def _identity_update(self, identity_id: str, rename_to: str | None, metadata: dict[str, Any] | None,
                         metadata_patch: dict[str, Any] | None, expected_updated_at: float | None,
                         collection: str | None) -> Call:
        """PATCH of the identity: refused here, before anything is sent, when it would change nothing or
        both replace and patch the metadata (the service answers 422 invalid_request to either)."""
        if rename_to is None and metadata is None and metadata_patch is None:
            raise ValueError("update_identity needs rename_to, metadata or metadata_patch")
        if metadata is not None and metadata_patch is not None:
            raise ValueError("update_identity takes metadata (a replacement) or metadata_patch (a merge patch), "
                             "not both")
        return Call("PATCH", f"{self._prefix(collection)}/identities/{_segment(identity_id)}", _drop_none(
            {"identity_id": rename_to, "metadata": metadata, "metadata_patch": metadata_patch,
             "expected_updated_at": expected_updated_at}), idempotent=rename_to is None)

    def _identities(self, cursor: str | None, page_size: int, prefix: str | None, collection: str | None) -> Call:
        return Call("GET", self._prefix(collection) + "/identities", params=_drop_none(
            {"limit": page_size, "cursor": cursor, "prefix": prefix}))

    @staticmethod
    def _collection_create(name: str, keep_crops: bool, model: str | None, retention_days: float | None,
                           max_faces: int | None, identify_fpir: float | None) -> Call:
        return Call("POST", "/collections", _drop_none({"name": name, "keep_crops": keep_crops or None,
                                                        "model": model, "retention_days": retention_days,
                                                        "max_faces": max_faces, "identify_fpir": identify_fpir}),
                    idempotent=False)

    @staticmethod
    def _collection_update(name: str, settings: dict[str, Any]) -> Call:
        """PATCH of the settings given (KEEP: not sent, the server keeps it; None: back to the default)."""
        body = {key: value for key, value in settings.items() if value is not KEEP}
        if not body:
            raise ValueError("update_collection needs retention_days, max_faces or identify_fpir")
        return Call("PATCH", f"/collections/{_segment(name)}", body)

    def _duplicates(self, min_score: float | None, max_false_alarm: float | None, limit: int, evidence: int,
                    collection: str | None, timeout: float | None) -> Call:
        return Call("GET", self._prefix(collection) + "/duplicates", params=_drop_none(
            {"min_score": min_score, "max_false_alarm": max_false_alarm, "limit": limit, "evidence": evidence}),
            read_timeout=self._scan_timeout(timeout))

    def _outliers(self, min_score: float | None, limit: int, collection: str | None, timeout: float | None) -> Call:
        return Call("GET", self._prefix(collection) + "/outliers",
                    params=_drop_none({"min_score": min_score, "limit": limit}), read_timeout=self._scan_timeout(timeout))

    def _start_duplicates_job(self, min_score: float | None, max_false_alarm: float | None, limit: int,
                              evidence: int, collection: str | None) -> Call:
        return Call("POST", self._prefix(collection) + "/duplicates/jobs", _drop_none(
            {"min_score": min_score, "max_false_alarm": max_false_alarm, "limit": limit, "evidence": evidence}),
            idempotent=False)

    def _start_outliers_job(self, min_score: float | None, limit: int, collection: str | None) -> Call:
        return Call("POST", self._prefix(collection) + "/outliers/jobs",
                    _drop_none({"min_score": min_score, "limit": limit}), idempotent=False)

    def _scan_job(self, kind: str, job_id: str, collection: str | None) -> Call:
        return Call("GET", f"{self._prefix(collection)}/{kind}/jobs/{_segment(job_id)}")

    @staticmethod
    def _scan_answer(job: Job, deadline: float | None, timeout_s: float | None) -> Any:
        """A scan job's answer once done (its field named after its kind; None while it runs);
        FaceServiceError with the job's error when it failed or was cancelled; TimeoutError past ``deadline``."""
        answer = getattr(job, job.kind, None) if job.state == "done" else None
        if answer is not None:
            return answer
        if job.finished:
            code, message = (job.error.code, job.error.message) if job.error else (job.state, f"job {job.id} {job.state}")
            raise FaceServiceError(code, message, {"job_id": job.id, "state": job.state})
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"{job.kind} scan {job.id} is still {job.state} after {timeout_s} s")
        return None

    def _merge(self, identity_id: str, into: str, collection: str | None) -> Call:
        return Call("POST", f"{self._prefix(collection)}/identities/{_segment(identity_id)}/merge",
                    {"into": into}, idempotent=False)

    def _move(self, face_id: int, identity_id: str, collection: str | None) -> Call:
        return Call("POST", f"{self._prefix(collection)}/faces/{int(face_id)}/move", {"identity_id": identity_id},
                    idempotent=False)

    def _face(self, method: str, face_id: int, collection: str | None, action: str = "") -> Call:
        return Call(method, f"{self._prefix(collection)}/faces/{int(face_id)}{action}")

    def _faces_delete(self, face_ids: list[int], collection: str | None) -> Call:
        return Call("POST", f"{self._prefix(collection)}/faces/delete", {"face_ids": face_ids})

    def _cluster(self, images: Any, embeddings: Any, threshold: float | None, image_type: ImageType,
                 multi_face: str, color: Color | None, model_id: str | None, model: str | None = None) -> Call:
        body: dict[str, Any] = {"threshold": threshold, "model_id": model_id, "model": model}
        if images is not None:
            body |= {"image_type": image_type, "multi_face": multi_face}
        if embeddings is not None:
            body["embeddings"] = [as_list(e) for e in embeddings]
        return self._body("/cluster", body, {} if images is None else {"images": self._images(images, color)})

    @staticmethod
    def _alias(method: str, name: str, collection: str | None = None) -> Call:
        return Call(method, f"/aliases/{_segment(name)}", None if collection is None else {"collection": collection})

    @staticmethod
    def _migrate(collection: str, model: str, into: str, batch_size: int, shadow: bool) -> Call:
        return Call("POST", f"/collections/{_segment(collection)}/migrate",
                    {"model": model, "into": into, "batch_size": batch_size, "shadow": shadow}, idempotent=False)

    @staticmethod
    def _audit(cursor: str | None, page_size: int, filters: dict[str, Any]) -> Call:
        return Call("GET", "/audit", params=_drop_none({**filters, "limit": page_size, "cursor": cursor}))

    @staticmethod
    def _key_create(role: str, collections: list[str] | None, note: str | None, expires_at: float | None,
                    rate_limit_rps: float | None, rate_limit_faces_per_s: float | None) -> Call:
        return Call("POST", "/keys", _drop_none({
            "role": role, "collections": collections, "note": note, "expires_at": expires_at,
            "rate_limit_rps": rate_limit_rps, "rate_limit_faces_per_s": rate_limit_faces_per_s}), idempotent=False)

    # --- answers ----------------------------------------------------------------------------------
    def _wait(self, call: Call, attempt: int, response: httpx.Response, started: float) -> float | None:
        """Seconds to wait before retrying ``response`` to ``call``, or None: not retried (or out of budget)."""
        code = _code(response)
        if response.status_code not in RETRIED or attempt >= self.max_retries or code in NOT_RETRIED:
            return None
        if not call.idempotent and code not in NOTHING_DONE:
            return None
        try:
            wait = float(response.headers["Retry-After"]) + random.uniform(0, 0.25)
        except (KeyError, ValueError):
            wait = self.backoff_s * 2 ** attempt * random.uniform(0.5, 1.0)
        return None if time.monotonic() - started + wait > self.retry_budget_s else wait

    @staticmethod
    def _checked(response: httpx.Response, call: Call) -> httpx.Response:
        """``response`` if it is a success (its body read by the caller: JSON, or an image's bytes); else its
        error answer raised as the FaceServiceError of its code."""
        if response.is_success:
            return response
        request_id = response.headers.get("X-Request-ID") or call.headers.get("X-Request-ID")
        try:
            error = response.json()["error"]
            code, message, details = str(error["code"]), str(error["message"]), error.get("details")
        except (ValueError, KeyError, TypeError):
            code, message, details = f"http_{response.status_code}", response.text[:200], None
        retry_after = response.headers.get("Retry-After")
        raise class_for(code, response.status_code)(
            code, message, details, request_id, response.status_code,
            float(retry_after) if retry_after and retry_after.isdigit() else None)

    def _version_ok(self, response: httpx.Response) -> None:
        """The first call's check of the success answer of GET /healthz: IncompatibleServerError when it is
        not the service's (not JSON, no version: another web server at the URL) or of another major version."""
        try:
            version = Health.model_validate(response.json()).version
        except ValueError:  # not JSON, or not /healthz's object (pydantic's ValidationError is a ValueError)
            version = None
        if version is None:
            raise IncompatibleServerError(
                f"the server at {self._shown_url} is not a face service: GET /healthz answered without the "
                "service's version (check the URL)", None, __version__)
        self.server_version = version
        if _major(version) != _major(__version__):
            raise IncompatibleServerError(
                f"faceclient {__version__} does not fit the server at {self._shown_url} (version {version}): "
                "install the client of the server's major version (or pass check_version=False)", version,
                __version__)
        self._version_checked = True

    def _connection_error(self, call: Call, error: httpx.TransportError) -> FaceConnectionError:
        """``error`` as FaceConnectionError, with no secret: the URL without its user info, and no text of a
        LocalProtocolError (httpx's complaint about the request it was to send quotes its headers)."""
        what = type(error).__name__ if isinstance(error, httpx.LocalProtocolError) else repr(error)
        if self._api_key:
            what = what.replace(self._api_key, "<api key>")
        return FaceConnectionError(f"{call.method} {self._shown_url}{call.path}: {without_user_info(what)}")

    def _client_args(self) -> dict[str, Any]:
        return {"base_url": self.base_url, "headers": self._headers, "timeout": self._timeout, "verify": self._tls_verify}


class FaceClient(_Base):
    """The service's API. One ``httpx.Client`` (keep-alive pool): share one instance between threads.

    >>> with FaceClient("http://localhost:8000", api_key="...") as face:
    ...     face.enroll("alice", ["alice1.jpg", "alice2.jpg"])
    ...     face.identify("door.jpg").results[0].identity_id
    """

    def __init__(self, base_url: str, api_key: str | None = None, **options: Any) -> None:
        super().__init__(base_url, api_key, **options)
        self._http = httpx.Client(**self._client_args(), limits=httpx.Limits(max_keepalive_connections=32))
        self._lock = threading.Lock()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> FaceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, call: Call) -> httpx.Response:
        try:
            return self._http.request(call.method, call.path, json=call.json, params=call.params,
                                      content=call.content, headers=call.headers,
                                      timeout=self._call_timeout(call))
        except httpx.TransportError as e:
            raise self._connection_error(call, e) from (None if isinstance(e, httpx.LocalProtocolError) else e)

    def _raw(self, call: Call) -> httpx.Response:
        """The success answer to ``call`` (429/503 retried as the client's settings say); an error answer raises.
        The first call reads /healthz first, the same way (its error answer raises as any other)."""
        if not self._version_checked:
            with self._lock:
                if not self._version_checked:
                    self._version_ok(self._answer(Call("GET", "/healthz")))
        return self._answer(call)

    def _answer(self, call: Call) -> httpx.Response:
        started = time.monotonic()
        attempt = 0
        while True:
            response = self._send(call)
            wait = self._wait(call, attempt, response, started)
            if wait is None:
                return self._checked(response, call)
            time.sleep(wait)
            attempt += 1

    def _do(self, call: Call, model: type[M]) -> M:
        return model.model_validate(self._raw(call).json())

    def _bytes(self, call: Call) -> bytes:
        """The body of a success answer that is not JSON (an image); errors raise as for ``_do``."""
        return self._raw(call).content

    # --- faces --------------------------------------------------------------------------------------
    def embed(self, images: ImageInput | Sequence[ImageInput], *, image_type: ImageType = "auto",
              multi_face: str = "largest", color: Color | None = None, model: str | None = None) -> EmbedResult:
        """``model``: a served model's name (the server's FACE_MODELS; None: its default model)."""
        return self._do(self._embed(images, image_type, multi_face, color, model), EmbedResult)

    def detect(self, images: ImageInput | Sequence[ImageInput], *, return_crops: bool = False,
               color: Color | None = None, model: str | None = None) -> DetectResult:
        return self._do(self._detect(images, return_crops, color, model), DetectResult)

    def verify(self, a: ImageInput | None = None, b: ImageInput | None = None, *, identity_id: str | None = None,
               embedding_a: Any = None, embedding_b: Any = None, threshold: float | None = None,
               image_type: ImageType = "auto", multi_face: str = "largest", color: Color | None = None,
               model_id: str | None = None, collection: str | None = None) -> VerifyResult:
        return self._do(self._verify(a, b, identity_id, embedding_a, embedding_b, threshold, image_type, multi_face,
                                     color, model_id, collection), VerifyResult)

    def identify(self, images: ImageInput | Sequence[ImageInput] | None = None, *, embeddings: Any = None,
                 top_k: int = 5, threshold: float | None = None, min_quality: float | None = None,
                 image_type: ImageType = "auto", multi_face: str = "largest", color: Color | None = None,
                 model_id: str | None = None, collection: str | None = None, face_ids: Sequence[int] | None = None,
                 identity_id: str | None = None, among: Sequence[str] | None = None) -> IdentifyResult:
        """The probes: ``images``, or ``embeddings``, or enrolled faces (``face_ids``: one result each, with
        ``probe_face_id``), or a whole enrolled identity (``identity_id``: one result); exactly one. An
        enrolled probe's own identity is never its candidate. ``among`` (with images or embeddings): only
        these enrolled identities are candidates, at the threshold of a gallery of just them (NotFoundError
        ``identity_not_found`` names any not enrolled)."""
        return self._do(self._identify(images, embeddings, top_k, threshold, min_quality, image_type, multi_face,
                                       color, model_id, collection, face_ids, identity_id, among), IdentifyResult)

    def enroll(self, identity_id: str, images: ImageInput | Sequence[ImageInput] | None = None, *,
               embeddings: Any = None, metadata: dict[str, Any] | None = None, replace: bool = False,
               min_quality: float | None = None, force_quality: bool = False, image_type: ImageType = "auto",
               multi_face: str = "largest", color: Color | None = None, model_id: str | None = None,
               collection: str | None = None) -> EnrollResult:
        return self._do(self._enroll(identity_id, images, embeddings, metadata, replace, min_quality, force_quality,
                                     image_type, multi_face, color, model_id, collection), EnrollResult)

    # --- identities ---------------------------------------------------------------------------------
    def get_identity(self, identity_id: str, *, collection: str | None = None) -> Identity:
        return self._do(self._identity("GET", identity_id, collection), Identity)

    def update_identity(self, identity_id: str, *, rename_to: str | None = None,
                        metadata: dict[str, Any] | None = None, metadata_patch: dict[str, Any] | None = None,
                        expected_updated_at: float | None = None, collection: str | None = None) -> Identity:
        """Rename the identity (``rename_to``: its faces keep their ids, vectors and enrollment times) and/or
        set its metadata: ``metadata`` replaces it, ``metadata_patch`` is an RFC 7396 merge patch (a key set
        to None is removed, dicts merge, anything else replaces); not both. Returns the identity as
        :meth:`get_identity` does, under its new id. ValueError (nothing sent) when none of the three is
        given or both metadata and metadata_patch are; ConflictError ``identity_exists`` when ``rename_to``
        is another enrolled identity. ``expected_updated_at`` (an ``Identity.updated_at`` you read): made
        only if nothing wrote to the identity since, else ConflictError ``identity_changed``. Needs a write key."""
        return self._do(self._identity_update(identity_id, rename_to, metadata, metadata_patch, expected_updated_at,
                                              collection), Identity)

    def delete_identity(self, identity_id: str, *, collection: str | None = None) -> IdentityDeleted:
        return self._do(self._identity("DELETE", identity_id, collection), IdentityDeleted)

    def iter_identities(self, *, page_size: int = 100, prefix: str | None = None,
                        collection: str | None = None) -> Iterator[IdentitySummary]:
        """Every identity (``prefix``: whose id starts with it), by id, fetching one page at a time as the
        iteration reaches it."""
        cursor: str | None = None
        while True:
            page = self._do(self._identities(cursor, page_size, prefix, collection), IdentityPage)
            yield from page.items
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    # --- collections, keys, audit, health -------------------------------------------------------------
    def list_collections(self) -> list[Collection]:
        return self._do(Call("GET", "/collections"), CollectionList).items

    def create_collection(self, name: str, *, keep_crops: bool = False, model: str | None = None,
                          retention_days: float | None = None, max_faces: int | None = None,
                          identify_fpir: float | None = None) -> Collection:
        """``keep_crops``: the collection keeps each enrolled face's aligned crop, encrypted (the server needs
        FACE_CROP_KEY_FILE); enrolling embeddings into it is then refused (crops_required). ``model``: the
        served model it is pinned to (None: the server's default model). ``retention_days``: each face is
        erased that long after its enrollment (None: kept until deleted). ``max_faces``: the most faces it
        may hold (an enroll past it: BadRequestError ``too_many_faces_for_collection``).
        ``identify_fpir``: its own open-set target (None: the server's FACE_IDENTIFY_FPIR)."""
        return self._do(self._collection_create(name, keep_crops, model, retention_days, max_faces, identify_fpir),
                        Collection)

    def update_collection(self, name: str, *, retention_days: float | None | Keep = KEEP,
                          max_faces: int | None | Keep = KEEP, identify_fpir: float | None | Keep = KEEP) -> Collection:
        """Change the settings given (at least one; those left out stay as they are, None: the default):
        ``retention_days`` (faces already past a shorter one are erased by the server's next sweep),
        ``max_faces``, ``identify_fpir``. Needs an admin key."""
        return self._do(self._collection_update(name, {"retention_days": retention_days, "max_faces": max_faces,
                                                       "identify_fpir": identify_fpir}), Collection)

    def get_collection(self, name: str) -> Collection:
        return self._do(Call("GET", f"/collections/{_segment(name)}"), Collection)

    def delete_collection(self, name: str) -> CollectionDeleted:
        return self._do(Call("DELETE", f"/collections/{_segment(name)}"), CollectionDeleted)

    def create_key(self, role: str, *, collections: list[str] | None = None, note: str | None = None,
                   expires_at: float | None = None, rate_limit_rps: float | None = None,
                   rate_limit_faces_per_s: float | None = None) -> KeyCreated:
        return self._do(self._key_create(role, collections, note, expires_at, rate_limit_rps,
                                         rate_limit_faces_per_s), KeyCreated)

    def list_keys(self) -> list[Key]:
        return self._do(Call("GET", "/keys"), KeyList).items

    def revoke_key(self, key_id: str) -> KeyRevoked:
        return self._do(Call("DELETE", f"/keys/{_segment(key_id)}"), KeyRevoked)

    def iter_audit(self, *, collection: str | None = None, identity_id: str | None = None, key_id: str | None = None,
                   since: float | None = None, until: float | None = None,
                   page_size: int = 100) -> Iterator[AuditEntry]:
        """Audit entries, newest first, of these filters (None: any)."""
        filters = {"collection": collection, "identity_id": identity_id, "key_id": key_id, "since": since,
                   "until": until}
        cursor: str | None = None
        while True:
            page = self._do(self._audit(cursor, page_size, filters), AuditPage)
            yield from page.items
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def health(self) -> Health:
        return self._do(Call("GET", "/healthz"), Health)

    # --- aliases (admin): pass an alias as ``collection`` to any gallery method ----------------------
    def set_alias(self, name: str, collection: str) -> Alias:
        """Point ``name`` at ``collection`` (create or re-point, atomically)."""
        return self._do(self._alias("PUT", name, collection), Alias)

    def get_alias(self, name: str) -> Alias:
        return self._do(self._alias("GET", name), Alias)

    def list_aliases(self) -> list[Alias]:
        return self._do(Call("GET", "/aliases"), AliasList).items

    def delete_alias(self, name: str) -> Alias:
        return self._do(self._alias("DELETE", name), Alias)
    # jobs: migrating a collection to another served model (admin)
    def migrate_collection(self, collection: str, model: str, into: str, *, batch_size: int = 64,
                           shadow: bool = False) -> Job:
        """Start re-embedding ``collection``'s kept crops with ``model`` into the new collection ``into``;
        the job runs on the server (watch it with get_job / wait_for_job)."""
        return self._do(self._migrate(collection, model, into, batch_size, shadow), JobCreated).job

    def list_jobs(self, *, collection: str | None = None, state: str | None = None, limit: int = 100) -> list[Job]:
        return self._do(Call("GET", "/jobs", params=_drop_none({"collection": collection, "state": state,
                                                                 "limit": limit})), JobList).items

    def get_job(self, job_id: str) -> Job:
        return self._do(Call("GET", f"/jobs/{_segment(job_id)}"), Job)

    def cancel_job(self, job_id: str) -> Job:
        return self._do(Call("POST", f"/jobs/{_segment(job_id)}/cancel"), Job)

    def resume_job(self, job_id: str) -> Job:
        return self._do(Call("POST", f"/jobs/{_segment(job_id)}/resume"), Job)

    def wait_for_job(self, job_id: str, *, timeout_s: float | None = None, poll_s: float = 1.0,
                     on_progress: Callable[[Job], None] | None = None) -> Job:
        """Poll until the job is done, failed or cancelled (returned as it ended); TimeoutError after
        ``timeout_s``. ``on_progress``: called with each answer."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.get_job(job_id)
            if on_progress is not None:
                on_progress(job)
            if job.finished:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} is still {job.state} after {timeout_s} s")
            time.sleep(poll_s)
    def whoami(self) -> WhoAmI:
        return self._do(Call("GET", "/whoami"), WhoAmI)

    def ready(self) -> Ready:
        return self._do(Call("GET", "/readyz"), Ready)

    # --- bulk -----------------------------------------------------------------------------------------
    def identify_many(self, images: Sequence[ImageInput], *, batch_size: int = 16, concurrency: int = 4,
                      progress: bool | Progress | None = None, **options: Any) -> list[ProbeResult]:
        """Identify many images in batched requests, ``concurrency`` in flight (threads). One result per
        probe, ``image_index`` into ``images``; an image the service refuses (IMAGE_CODES, e.g. no_face; or
        too big for a request) gets a result with ``error`` instead of failing the others. An error of the
        request itself (invalid_request, an ``among`` id not enrolled...) is raised. ``progress``: see
        ``progress_reporter`` (a tqdm bar by default when tqdm is installed and stderr is a terminal)."""
        done, total, lock = 0, len(images), threading.Lock()
        report, close = progress_reporter(progress, total, "identify photos")

        def one(start: int, batch: list[ImageInput]) -> list[ProbeResult]:
            nonlocal done
            try:
                results = _shift(self.identify(batch, **options).results, start)
            except BadRequestError as e:  # one bad image (or the batch's size) refuses it: the images one by one
                if e.code not in PER_IMAGE_CODES:
                    raise  # the request itself (invalid_request...): every image would be refused alike
                results = []
                for i, image in enumerate(batch):
                    try:
                        results += _shift(self.identify([image], **options).results, start + i)
                    except BadRequestError as e:
                        if e.code not in PER_IMAGE_CODES:
                            raise
                        results.append(_failed_probe(start + i, e))
            with lock:
                done += len(batch)
                if report:
                    report(done, total)
            return results

        try:
            with ThreadPoolExecutor(max(1, concurrency)) as pool:
                parts = list(pool.map(lambda b: one(*b), _batches(images, batch_size)))
        finally:
            close()
        return [r for part in parts for r in part]

    def enroll_folder(self, root: str | Path, *, replace: bool = False, concurrency: int = 4,
                      progress: bool | Progress | None = None, max_images_per_request: int = 64,
                      max_bytes_per_request: int = MAX_BYTES_PER_REQUEST, **options: Any) -> FolderSummary:
        """Enroll one sub-folder per person (the folder name is the identity id), as ``python -m service
        gallery enroll`` does on the server's host (which writes each person whole, in one request, and
        skips anyone enrolled). Resumable: someone enrolled with at least as many faces as files is left alone
        (``already``) unless ``replace``; someone with fewer (a run cut short) is enrolled again from the
        folder, replacing those faces (``resumed``; see ``_PersonEnroll``). A file the
        service refuses for itself (not an image, no face, low quality...) is skipped and listed in the
        person's ``skipped``; a person the service refuses (a folder name that is no identity id:
        invalid_identity_id; possible_duplicate, too_many_faces_for_identity...), a folder without image
        files (no_images) and a person none of whose files could be enrolled are in ``failed``, or in
        ``partial`` when some of its faces are stored (a later request refused: a rerun completes it), and
        the run goes on: nothing is raised for bad input (errors of the run itself are: a key, a collection,
        the server). A person's files go in requests of at most ``max_images_per_request`` files and
        ``max_bytes_per_request`` bytes of them (16 MiB: under the server's default body limit); a request
        the server refuses as too big (payload_too_large, too_many_faces) is split and sent again.
        ``progress`` (people done): see ``progress_reporter``."""
        people = person_folders(root)
        summary, lock = FolderSummary(people=len(people)), threading.Lock()
        report, close = progress_reporter(progress, len(people), "enroll people")

        def one(person: tuple[str, list[Path]]) -> None:
            identity, files = person
            work = _PersonEnroll(identity, files, max_images_per_request, max_bytes_per_request, replace)
            if not replace:
                try:
                    work.found(self._face_count(identity, options.get("collection")))
                except BadRequestError as e:  # its folder's name is no identity id (invalid_identity_id...)
                    work.refuse(e)
            while (step := work.next()) is not None:
                try:
                    work.enrolled(self.enroll(identity, step[0], replace=step[1], **options))
                except FaceServiceError as e:
                    if not work.takes(e):
                        raise
                    work.refused(e)
            with lock:
                summary.add(work.done())
                if report:
                    report(summary.done, summary.people)

        try:
            with ThreadPoolExecutor(max(1, concurrency)) as pool:
                list(pool.map(one, people))
        finally:
            close()
        return summary

    def _face_count(self, identity_id: str, collection: str | None) -> int:
        """The identity's faces in the gallery; 0 when it is not enrolled."""
        try:
            return self.get_identity(identity_id, collection=collection).face_count
        except NotFoundError as e:
            if e.code != "identity_not_found":
                raise
            return 0

    # --- gallery hygiene and clustering -----------------------------------------------------------------
    def duplicates(self, *, min_score: float | None = None, max_false_alarm: float | None = None, limit: int = 100,
                   evidence: int = 3, collection: str | None = None, timeout: float | None = None) -> DuplicatesResult:
        """Pairs of identities that are probably one person, best first, each with its best face pairs
        (``evidence`` per pair). Listed from ``min_score``, else from the score whose family-wise false-alarm
        probability is ``max_false_alarm`` (None: the server's FACE_DUPLICATES_MAX_FALSE_ALARM). A scan of the
        whole collection (minutes at a million faces): ``timeout``, the seconds it waits for the answer,
        defaults to the client's timeout but at least ``SCAN_TIMEOUT_S`` (30 min)."""
        return self._do(self._duplicates(min_score, max_false_alarm, limit, evidence, collection, timeout),
                        DuplicatesResult)

    def start_duplicates_job(self, *, min_score: float | None = None, max_false_alarm: float | None = None,
                             limit: int = 100, evidence: int = 3, collection: str | None = None) -> Job:
        """The scan of :meth:`duplicates` as a job on the server (kind ``duplicates``): for a collection whose
        scan outlasts a request. Watch it with :meth:`get_duplicates_job` (the same ``read`` key), or use
        :meth:`scan_duplicates`, which waits for it."""
        return self._do(self._start_duplicates_job(min_score, max_false_alarm, limit, evidence, collection),
                        JobCreated).job

    def get_duplicates_job(self, job_id: str, *, collection: str | None = None) -> Job:
        """A duplicates scan job of the collection; its ``duplicates`` once ``done``."""
        return self._do(self._scan_job("duplicates", job_id, collection), Job)

    def scan_duplicates(self, *, min_score: float | None = None, max_false_alarm: float | None = None,
                        limit: int = 100, evidence: int = 3, collection: str | None = None,
                        timeout_s: float | None = None, poll_s: float = 1.0) -> DuplicatesResult:
        """What :meth:`duplicates` answers, through a job (no request waits for the scan): starts it, polls
        every ``poll_s`` and returns its answer. FaceServiceError if the job fails or is cancelled
        (``job_running`` when another job of the collection runs), TimeoutError after ``timeout_s``."""
        job = self.start_duplicates_job(min_score=min_score, max_false_alarm=max_false_alarm, limit=limit,
                                        evidence=evidence, collection=collection)
        return self._wait_scan(job, collection, timeout_s, poll_s)

    def outliers(self, *, min_score: float | None = None, limit: int = 100,
                 collection: str | None = None, timeout: float | None = None) -> OutliersResult:
        """Faces that match their own identity's other faces below ``min_score`` (None: the 1:1 threshold),
        worst first, each with the other identity it matches best (``best_other``) if any. A scan of the whole
        collection: ``timeout`` as for :meth:`duplicates`."""
        return self._do(self._outliers(min_score, limit, collection, timeout), OutliersResult)

    def start_outliers_job(self, *, min_score: float | None = None, limit: int = 100,
                           collection: str | None = None) -> Job:
        """The scan of :meth:`outliers` as a job on the server (kind ``outliers``). Watch it with
        :meth:`get_outliers_job`, or use :meth:`scan_outliers`, which waits for it."""
        return self._do(self._start_outliers_job(min_score, limit, collection), JobCreated).job

    def get_outliers_job(self, job_id: str, *, collection: str | None = None) -> Job:
        """An outliers scan job of the collection; its ``outliers`` once ``done``."""
        return self._do(self._scan_job("outliers", job_id, collection), Job)

    def scan_outliers(self, *, min_score: float | None = None, limit: int = 100, collection: str | None = None,
                      timeout_s: float | None = None, poll_s: float = 1.0) -> OutliersResult:
        """What :meth:`outliers` answers, through a job: as :meth:`scan_duplicates`."""
        job = self.start_outliers_job(min_score=min_score, limit=limit, collection=collection)
        return self._wait_scan(job, collection, timeout_s, poll_s)

    def _wait_scan(self, job: Job, collection: str | None, timeout_s: float | None, poll_s: float) -> Any:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while (answer := self._scan_answer(job, deadline, timeout_s)) is None:
            time.sleep(poll_s)
            job = self._do(self._scan_job(job.kind, job.id, collection), Job)
        return answer

    def merge_identities(self, identity_id: str, into: str, *, collection: str | None = None) -> MergeResult:
        """Every face of ``identity_id`` becomes a face of ``into`` (ids kept); ``identity_id`` is deleted."""
        return self._do(self._merge(identity_id, into, collection), MergeResult)

    def move_face(self, face_id: int, identity_id: str, *, collection: str | None = None) -> MoveResult:
        """The face (same id) becomes ``identity_id``'s (created if not enrolled); its old identity is deleted
        when this was its last face."""
        return self._do(self._move(face_id, identity_id, collection), MoveResult)

    def delete_face(self, face_id: int, *, collection: str | None = None) -> FaceDeleted:
        """Erase one face; its identity goes too when this was its last face."""
        return self._do(self._face("DELETE", face_id, collection), FaceDeleted)

    def face_crop(self, face_id: int, *, collection: str | None = None) -> bytes:
        """The face's kept crop, as PNG bytes: the aligned 112x112 RGB image the model embedded (write it to a
        ``.png`` file, or ``PIL.Image.open(io.BytesIO(data))``), to see whom a face shows before merging, moving
        or deleting it. Only a collection created with ``keep_crops=True`` keeps crops: NotFoundError
        ``crop_not_kept`` when the collection keeps none or the face has none (enrolled from embeddings, or
        imported); NotFoundError ``face_not_found`` when the face is not in the collection. Needs a write key
        (a read or embed key: AuthError ``forbidden``)."""
        return self._bytes(self._face("GET", face_id, collection, "/crop"))

    def delete_faces(self, face_ids: Iterable[int], *, collection: str | None = None) -> FacesDeleted:
        """Erase these faces (an id given twice counts once): ``deleted``, by face id, as :meth:`delete_face`
        answers each (``identity_deleted``: its identity had no face left and went with it), and
        ``not_found``, the ids not in the collection (not an error: a retry is safe). One request of up to
        1,000 ids is one transaction (all its found faces go, or none); more ids are sent in requests of
        1,000, one after the other, each its own transaction, and their answers merged: if one fails, the
        faces of the requests before it stay deleted and the error is raised. ValueError (nothing sent) for
        no id. Needs a write key."""
        return _merged_deletions([self._do(self._faces_delete(chunk, collection), FacesDeleted)
                                  for chunk in _face_id_chunks(face_ids)])

    def cluster(self, images: ImageInput | Sequence[ImageInput] | None = None, *, embeddings: Any = None,
                threshold: float | None = None, image_type: ImageType = "auto", multi_face: str = "all",
                color: Color | None = None, model_id: str | None = None, model: str | None = None) -> ClusterResult:
        """Group the faces of ``images`` (every face of each photo, by default) or ``embeddings`` by person;
        no gallery is read. ``threshold``: the average-linkage cosine (None: the server's default for this
        many faces, from the model's impostor tail). ``model``: a served model's name (None: the server's
        default model), which embeds the faces (``embeddings`` must carry its ``model_id``). Clusters come
        biggest first; a face alone is a cluster of size 1."""
        return self._do(self._cluster(images, embeddings, threshold, image_type, multi_face, color, model_id,
                                      model), ClusterResult)


class AsyncFaceClient(_Base):
    """FaceClient's methods as coroutines, over one ``httpx.AsyncClient``: share it between tasks."""

    def __init__(self, base_url: str, api_key: str | None = None, **options: Any) -> None:
        super().__init__(base_url, api_key, **options)
        self._http = httpx.AsyncClient(**self._client_args(), limits=httpx.Limits(max_keepalive_connections=32))
        self._lock: asyncio.Lock | None = None

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncFaceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _send(self, call: Call) -> httpx.Response:
        try:
            return await self._http.request(call.method, call.path, json=call.json, params=call.params,
                                            content=call.content, headers=call.headers,
                                            timeout=self._call_timeout(call))
        except httpx.TransportError as e:
            raise self._connection_error(call, e) from (None if isinstance(e, httpx.LocalProtocolError) else e)

    async def _raw(self, call: Call) -> httpx.Response:
        """The success answer to ``call`` (429/503 retried as the client's settings say); an error answer raises.
        The first call reads /healthz first, the same way (its error answer raises as any other)."""
        if not self._version_checked:
            self._lock = self._lock or asyncio.Lock()
            async with self._lock:
                if not self._version_checked:
                    self._version_ok(await self._answer(Call("GET", "/healthz")))
        return await self._answer(call)

    async def _answer(self, call: Call) -> httpx.Response:
        started = time.monotonic()
        attempt = 0
        while True:
            response = await self._send(call)
            wait = self._wait(call, attempt, response, started)
            if wait is None:
                return self._checked(response, call)
            await asyncio.sleep(wait)
            attempt += 1

    async def _do(self, call: Call, model: type[M]) -> M:
        return model.model_validate((await self._raw(call)).json())

    async def _bytes(self, call: Call) -> bytes:
        """The body of a success answer that is not JSON (an image); errors raise as for ``_do``."""
        return (await self._raw(call)).content

    async def embed(self, images: ImageInput | Sequence[ImageInput], *, image_type: ImageType = "auto",
                    multi_face: str = "largest", color: Color | None = None,
                    model: str | None = None) -> EmbedResult:
        return await self._do(self._embed(images, image_type, multi_face, color, model), EmbedResult)

    async def detect(self, images: ImageInput | Sequence[ImageInput], *, return_crops: bool = False,
                     color: Color | None = None, model: str | None = None) -> DetectResult:
        return await self._do(self._detect(images, return_crops, color, model), DetectResult)

    async def verify(self, a: ImageInput | None = None, b: ImageInput | None = None, *,
                     identity_id: str | None = None, embedding_a: Any = None, embedding_b: Any = None,
                     threshold: float | None = None, image_type: ImageType = "auto", multi_face: str = "largest",
                     color: Color | None = None, model_id: str | None = None,
                     collection: str | None = None) -> VerifyResult:
        return await self._do(self._verify(a, b, identity_id, embedding_a, embedding_b, threshold, image_type,
                                           multi_face, color, model_id, collection), VerifyResult)

    async def identify(self, images: ImageInput | Sequence[ImageInput] | None = None, *, embeddings: Any = None,
                       top_k: int = 5, threshold: float | None = None, min_quality: float | None = None,
                       image_type: ImageType = "auto", multi_face: str = "largest", color: Color | None = None,
                       model_id: str | None = None, collection: str | None = None,
                       face_ids: Sequence[int] | None = None, identity_id: str | None = None,
                       among: Sequence[str] | None = None) -> IdentifyResult:
        return await self._do(self._identify(images, embeddings, top_k, threshold, min_quality, image_type,
                                             multi_face, color, model_id, collection, face_ids, identity_id, among),
                              IdentifyResult)

    async def enroll(self, identity_id: str, images: ImageInput | Sequence[ImageInput] | None = None, *,
                     embeddings: Any = None, metadata: dict[str, Any] | None = None, replace: bool = False,
                     min_quality: float | None = None, force_quality: bool = False,
                     image_type: ImageType = "auto", multi_face: str = "largest", color: Color | None = None,
                     model_id: str | None = None, collection: str | None = None) -> EnrollResult:
        return await self._do(self._enroll(identity_id, images, embeddings, metadata, replace, min_quality,
                                           force_quality, image_type, multi_face, color, model_id, collection),
                              EnrollResult)

    async def get_identity(self, identity_id: str, *, collection: str | None = None) -> Identity:
        return await self._do(self._identity("GET", identity_id, collection), Identity)

    async def update_identity(self, identity_id: str, *, rename_to: str | None = None,
                              metadata: dict[str, Any] | None = None, metadata_patch: dict[str, Any] | None = None,
                              expected_updated_at: float | None = None, collection: str | None = None) -> Identity:
        return await self._do(self._identity_update(identity_id, rename_to, metadata, metadata_patch,
                                                    expected_updated_at, collection), Identity)

    async def delete_identity(self, identity_id: str, *, collection: str | None = None) -> IdentityDeleted:
        return await self._do(self._identity("DELETE", identity_id, collection), IdentityDeleted)

    async def iter_identities(self, *, page_size: int = 100, prefix: str | None = None,
                              collection: str | None = None) -> AsyncIterator[IdentitySummary]:
        cursor: str | None = None
        while True:
            page = await self._do(self._identities(cursor, page_size, prefix, collection), IdentityPage)
            for item in page.items:
                yield item
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def list_collections(self) -> list[Collection]:
        return (await self._do(Call("GET", "/collections"), CollectionList)).items

    async def create_collection(self, name: str, *, keep_crops: bool = False,
                                model: str | None = None, retention_days: float | None = None,
                                max_faces: int | None = None, identify_fpir: float | None = None) -> Collection:
        return await self._do(self._collection_create(name, keep_crops, model, retention_days, max_faces,
                                                      identify_fpir), Collection)

    async def update_collection(self, name: str, *, retention_days: float | None | Keep = KEEP,
                                max_faces: int | None | Keep = KEEP,
                                identify_fpir: float | None | Keep = KEEP) -> Collection:
        return await self._do(self._collection_update(name, {"retention_days": retention_days, "max_faces": max_faces,
                                                             "identify_fpir": identify_fpir}), Collection)

    async def get_collection(self, name: str) -> Collection:
        return await self._do(Call("GET", f"/collections/{_segment(name)}"), Collection)

    async def delete_collection(self, name: str) -> CollectionDeleted:
        return await self._do(Call("DELETE", f"/collections/{_segment(name)}"), CollectionDeleted)

    async def create_key(self, role: str, *, collections: list[str] | None = None, note: str | None = None,
                         expires_at: float | None = None, rate_limit_rps: float | None = None,
                         rate_limit_faces_per_s: float | None = None) -> KeyCreated:
        return await self._do(self._key_create(role, collections, note, expires_at, rate_limit_rps,
                                               rate_limit_faces_per_s), KeyCreated)

    async def list_keys(self) -> list[Key]:
        return (await self._do(Call("GET", "/keys"), KeyList)).items

    async def revoke_key(self, key_id: str) -> KeyRevoked:
        return await self._do(Call("DELETE", f"/keys/{_segment(key_id)}"), KeyRevoked)

    async def iter_audit(self, *, collection: str | None = None, identity_id: str | None = None,
                         key_id: str | None = None, since: float | None = None, until: float | None = None,
                         page_size: int = 100) -> AsyncIterator[AuditEntry]:
        filters = {"collection": collection, "identity_id": identity_id, "key_id": key_id, "since": since,
                   "until": until}
        cursor: str | None = None
        while True:
            page = await self._do(self._audit(cursor, page_size, filters), AuditPage)
            for item in page.items:
                yield item
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def health(self) -> Health:
        return await self._do(Call("GET", "/healthz"), Health)

    async def set_alias(self, name: str, collection: str) -> Alias:
        return await self._do(self._alias("PUT", name, collection), Alias)

    async def get_alias(self, name: str) -> Alias:
        return await self._do(self._alias("GET", name), Alias)

    async def list_aliases(self) -> list[Alias]:
        return (await self._do(Call("GET", "/aliases"), AliasList)).items

    async def delete_alias(self, name: str) -> Alias:
        return await self._do(self._alias("DELETE", name), Alias)
    async def migrate_collection(self, collection: str, model: str, into: str, *, batch_size: int = 64,
                                 shadow: bool = False) -> Job:
        return (await self._do(self._migrate(collection, model, into, batch_size, shadow), JobCreated)).job

    async def list_jobs(self, *, collection: str | None = None, state: str | None = None,
                        limit: int = 100) -> list[Job]:
        return (await self._do(Call("GET", "/jobs", params=_drop_none({"collection": collection, "state": state,
                                                                        "limit": limit})), JobList)).items

    async def get_job(self, job_id: str) -> Job:
        return await self._do(Call("GET", f"/jobs/{_segment(job_id)}"), Job)

    async def cancel_job(self, job_id: str) -> Job:
        return await self._do(Call("POST", f"/jobs/{_segment(job_id)}/cancel"), Job)

    async def resume_job(self, job_id: str) -> Job:
        return await self._do(Call("POST", f"/jobs/{_segment(job_id)}/resume"), Job)

    async def wait_for_job(self, job_id: str, *, timeout_s: float | None = None, poll_s: float = 1.0,
                           on_progress: Callable[[Job], None] | None = None) -> Job:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = await self.get_job(job_id)
            if on_progress is not None:
                on_progress(job)
            if job.finished:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} is still {job.state} after {timeout_s} s")
            await asyncio.sleep(poll_s)
    async def whoami(self) -> WhoAmI:
        return await self._do(Call("GET", "/whoami"), WhoAmI)

    async def ready(self) -> Ready:
        return await self._do(Call("GET", "/readyz"), Ready)

    async def identify_many(self, images: Sequence[ImageInput], *, batch_size: int = 16, concurrency: int = 4,
                            progress: bool | Progress | None = None, **options: Any) -> list[ProbeResult]:
        """As FaceClient.identify_many, with ``concurrency`` tasks."""
        gate, done, total = asyncio.Semaphore(max(1, concurrency)), 0, len(images)
        report, close = progress_reporter(progress, total, "identify photos")

        async def one(start: int, batch: list[ImageInput]) -> list[ProbeResult]:
            nonlocal done
            async with gate:
                try:
                    results = _shift((await self.identify(batch, **options)).results, start)
                except BadRequestError as e:  # as FaceClient.identify_many: the images one by one, or raised
                    if e.code not in PER_IMAGE_CODES:
                        raise
                    results = []
                    for i, image in enumerate(batch):
                        try:
                            results += _shift((await self.identify([image], **options)).results, start + i)
                        except BadRequestError as e:
                            if e.code not in PER_IMAGE_CODES:
                                raise
                            results.append(_failed_probe(start + i, e))
            done += len(batch)
            if report:
                report(done, total)
            return results

        try:
            parts = await _all_or_cancel(one(start, batch) for start, batch in _batches(images, batch_size))
        finally:
            close()
        return [r for part in parts for r in part]

    async def enroll_folder(self, root: str | Path, *, replace: bool = False, concurrency: int = 4,
                            progress: bool | Progress | None = None, max_images_per_request: int = 64,
                            max_bytes_per_request: int = MAX_BYTES_PER_REQUEST, **options: Any) -> FolderSummary:
        """As FaceClient.enroll_folder, with ``concurrency`` tasks."""
        people = person_folders(root)
        summary, gate = FolderSummary(people=len(people)), asyncio.Semaphore(max(1, concurrency))
        report, close = progress_reporter(progress, len(people), "enroll people")

        async def one(identity: str, files: list[Path]) -> None:
            async with gate:
                work = _PersonEnroll(identity, files, max_images_per_request, max_bytes_per_request, replace)
                if not replace:
                    try:
                        work.found(await self._face_count(identity, options.get("collection")))
                    except BadRequestError as e:  # its folder's name is no identity id (invalid_identity_id...)
                        work.refuse(e)
                while (step := work.next()) is not None:
                    try:
                        work.enrolled(await self.enroll(identity, step[0], replace=step[1], **options))
                    except FaceServiceError as e:
                        if not work.takes(e):
                            raise
                        work.refused(e)
            summary.add(work.done())
            if report:
                report(summary.done, summary.people)

        try:
            await _all_or_cancel(one(identity, files) for identity, files in people)
        finally:
            close()
        return summary

    async def _face_count(self, identity_id: str, collection: str | None) -> int:
        try:
            return (await self.get_identity(identity_id, collection=collection)).face_count
        except NotFoundError as e:
            if e.code != "identity_not_found":
                raise
            return 0

    async def duplicates(self, *, min_score: float | None = None, max_false_alarm: float | None = None,
                         limit: int = 100, evidence: int = 3, collection: str | None = None,
                         timeout: float | None = None) -> DuplicatesResult:
        return await self._do(self._duplicates(min_score, max_false_alarm, limit, evidence, collection, timeout),
                              DuplicatesResult)

    async def start_duplicates_job(self, *, min_score: float | None = None, max_false_alarm: float | None = None,
                                   limit: int = 100, evidence: int = 3, collection: str | None = None) -> Job:
        return (await self._do(self._start_duplicates_job(min_score, max_false_alarm, limit, evidence, collection),
                               JobCreated)).job

    async def get_duplicates_job(self, job_id: str, *, collection: str | None = None) -> Job:
        return await self._do(self._scan_job("duplicates", job_id, collection), Job)

    async def scan_duplicates(self, *, min_score: float | None = None, max_false_alarm: float | None = None,
                              limit: int = 100, evidence: int = 3, collection: str | None = None,
                              timeout_s: float | None = None, poll_s: float = 1.0) -> DuplicatesResult:
        job = await self.start_duplicates_job(min_score=min_score, max_false_alarm=max_false_alarm, limit=limit,
                                              evidence=evidence, collection=collection)
        return await self._wait_scan(job, collection, timeout_s, poll_s)

    async def outliers(self, *, min_score: float | None = None, limit: int = 100,
                       collection: str | None = None, timeout: float | None = None) -> OutliersResult:
        return await self._do(self._outliers(min_score, limit, collection, timeout), OutliersResult)

    async def start_outliers_job(self, *, min_score: float | None = None, limit: int = 100,
                                 collection: str | None = None) -> Job:
        return (await self._do(self._start_outliers_job(min_score, limit, collection), JobCreated)).job

    async def get_outliers_job(self, job_id: str, *, collection: str | None = None) -> Job:
        return await self._do(self._scan_job("outliers", job_id, collection), Job)

    async def scan_outliers(self, *, min_score: float | None = None, limit: int = 100, collection: str | None = None,
                            timeout_s: float | None = None, poll_s: float = 1.0) -> OutliersResult:
        job = await self.start_outliers_job(min_score=min_score, limit=limit, collection=collection)
        return await self._wait_scan(job, collection, timeout_s, poll_s)

    async def _wait_scan(self, job: Job, collection: str | None, timeout_s: float | None, poll_s: float) -> Any:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while (answer := self._scan_answer(job, deadline, timeout_s)) is None:
            await asyncio.sleep(poll_s)
            job = await self._do(self._scan_job(job.kind, job.id, collection), Job)
        return answer

    async def merge_identities(self, identity_id: str, into: str, *, collection: str | None = None) -> MergeResult:
        return await self._do(self._merge(identity_id, into, collection), MergeResult)

    async def move_face(self, face_id: int, identity_id: str, *, collection: str | None = None) -> MoveResult:
        return await self._do(self._move(face_id, identity_id, collection), MoveResult)

    async def delete_face(self, face_id: int, *, collection: str | None = None) -> FaceDeleted:
        return await self._do(self._face("DELETE", face_id, collection), FaceDeleted)

    async def face_crop(self, face_id: int, *, collection: str | None = None) -> bytes:
        """As FaceClient.face_crop: the face's kept crop, as PNG bytes."""
        return await self._bytes(self._face("GET", face_id, collection, "/crop"))

    async def delete_faces(self, face_ids: Iterable[int], *, collection: str | None = None) -> FacesDeleted:
        """As FaceClient.delete_faces: more than 1,000 ids in requests of 1,000, one after the other (each its
        own transaction), their answers merged."""
        return _merged_deletions([await self._do(self._faces_delete(chunk, collection), FacesDeleted)
                                  for chunk in _face_id_chunks(face_ids)])

    async def cluster(self, images: ImageInput | Sequence[ImageInput] | None = None, *, embeddings: Any = None,
                      threshold: float | None = None, image_type: ImageType = "auto", multi_face: str = "all",
                      color: Color | None = None, model_id: str | None = None,
                      model: str | None = None) -> ClusterResult:
        return await self._do(self._cluster(images, embeddings, threshold, image_type, multi_face, color,
                                            model_id, model), ClusterResult)


__all__ = ["AsyncFaceClient", "FaceClient", "person_folders", "progress_reporter"]
