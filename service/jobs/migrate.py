"""Migrating a collection (A) to another served model: every identity of A is re-embedded from its
kept crops by the new model and written to B, then B is kept up with A until nothing differs.

The algorithm (one job, :func:`run_migration`; the runner calls it in its thread, the CLI in the
foreground):

1. **copy**: page through A's identities in ``list_identities`` order (identity id). For each,
   "sync" it: its record as listed (metadata, ``updated_at``), its faces (face-id order) with their
   sealed crops read for a batch of identities at once (``identity_crops``: one query, not one per
   face), open each crop (bound to A + face id), decode the PNG, embed it with B's model, and write
   the identity to B with one ``enroll(identity, embeddings, metadata, replace=True, crops=<the same
   PNGs>, enrolled_at=<A's enrollment times>)``: B seals them for B's own face ids, and its faces keep
   when they were first enrolled (a collection's retention counts from then, not from the migration);
   a write to A between the listing and the read leaves an ``updated_at`` the next pass re-syncs.
   Re-running a sync gives the same B (idempotent); the k-th face of X in A is the k-th in B. Crops
   of several identities make one model batch (``batch_size``). B takes A's ``max_faces``: an identity
   copied before A lost faces of it (or lost it) holds room in B that a later identity, grown in A
   meanwhile, needs; a write B refuses for its max_faces first syncs every identity B holds more faces
   of than A now does (``_make_room``), then is made again.
   After every batch the cursor (the last identity synced), the progress and the heartbeat are
   written: a resumed job continues after the cursor.
2. **catch_up**: writes to A while the job runs (from this process, another replica, the CLI) must
   reach B before the job says ``done``. Every write that changes an identity's faces or metadata
   bumps its ``updated_at`` on both backends (enroll, replace, merge, move, delete_face, update), so a pass
   lists A and B (identity id, updated_at, face count) and syncs each identity of A that was written
   since the job was created and not synced at that ``updated_at`` by this run, or whose face count
   differs from B's, or that B lacks; and deletes from B every identity A no longer has. Passes
   repeat until one finds nothing, or ``CATCH_UP_PASSES`` passes (writers that never pause: the
   fenced pass below takes what is left). Chosen over an in-process write hook because it also sees
   writes of other processes (PostgreSQL replicas, the CLI); the price is one listing of both
   collections per pass (about a second per 100k identities).
3. **compare**: ``service.jobs.compare.compare_collections(A, B)``, its ``as_dict()`` stored as the
   job's ``report`` (B as it was after step 2; step 4 adds what was written to A meanwhile).
4. **fenced pass and done**: catch-up passes again (unfenced: what was written during the compare),
   then ONE pass holding the exclusive side of A's write fence (``GalleryBackend.write_fence``), and
   the ``done`` flip of the job row (``finish``) before the fence is released. Every write to A holds
   the fence's shared side for its transaction (embedded: a per-collection readers-writer lock in the
   process that owns the data dir; PostgreSQL: ``pg_advisory_xact_lock_shared`` in each write
   transaction against ``pg_advisory_lock`` here, so writers on every replica and the CLI wait), so
   the fenced pass sees A with no write in flight and none starting: **every write to A answered
   before the job's ``finished_at`` is in B**; a write after it is not the job's. Searches and reads
   never touch the fence. Writes to A wait only while the fenced pass syncs what was written since
   the last unfenced pass began: the identities A's audit log names since then (every write to A
   records its identity, and a merge's, a move's or a rename's source, in the write's own transaction), less
   ``FENCE_LOOKBACK_S`` for transactions that began earlier and committed later. That is O(writes),
   not O(identities): listing both collections under the fence held writes ~4 s per 100k identities
   (~45 s at 1M, past PostgreSQL's statement timeout). Without a full pass of this run to start from
   (a resumed job), or past one written identity in 500 (``FENCED_CHANGES_PER_IDENTITY``: where
   syncing them one by one is no faster than listing), the fenced pass lists A and B as the others
   do (``fenced_mode``: ``changes`` or ``full``, with ``fenced_s`` in the job's stored progress and
   the log; bench/migration_fence.py measures it).

Each pass (the copy, every catch-up pass, the comparison, and the check of A's crops at the start)
reads with a floor, ``GalleryBackend.read_floor``: with PostgreSQL standbys the primary's WAL position
at the pass's start (the job runs without a client's token: unfloored, its reads would go to any standby
in rotation, up to FACE_DATABASE_MAX_LAG_MS behind, and miss writes answered before the pass). A pass
syncs the identities that lose faces in B before those that gain some (``_shrinking_first``): B takes
A's ``max_faces``, and in id order a grown identity synced before a shrunk one would need more room
than A ever held. No alias may point at B until the job is done (``set_alias`` reads the job in its
own write: PUT /aliases 409 ``migration_unfinished``, the CLI refuses); should one point there anyway,
the job fails with that code before its next write of B rather than overwrite or delete what clients
wrote through it (``_check_unaliased``).

A face of A without a crop (a collection made without ``keep_crops``, or faces enrolled before) is
``no_source_crops``: nothing to re-embed from (re-enroll from folders instead).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from ..errors import ErrorCode
from ..gallery.api import (
    Actor,
    AuditQuery,
    CollectionExists,
    CollectionNotFound,
    Galleries,
    GalleryBackend,
    GalleryUnavailable,
    WriteOutcomeUnknown,
)
from ..gallery.crops import CropCipher, CropsUnavailable, decode_crop
from ..gallery.results import IdentityRecord, TooManyFacesForCollection
from ..model.runtime import EmbeddingModel
from .compare import compare_collections
from .store import JobRecord, JobRunning, new_job_id

log = logging.getLogger(__name__)

PAGE = 500  # identities listed per page
SLACK_S = 5.0  # a write's updated_at is taken before its commit: passes look this much further back
CATCH_UP_PASSES = 5  # unfenced passes at most, before the fenced one (writers that never pause)
FENCE_LOOKBACK_S = 2 * SLACK_S  # an audit record's time is taken before its commit: the fenced pass looks this much earlier
# the fenced pass syncs written identities one by one (~5-15 ms each) and lists everything in ~4 s per
# 100k identities: past this share of the collection (at least MIN_FENCED_CHANGES) listing is no slower
FENCED_CHANGES_PER_IDENTITY = 1 / 500
MIN_FENCED_CHANGES = 100
AUDIT_PAGE = 1000


class JobFailed(RuntimeError):
    """The job cannot go on: ``code`` (an ErrorCode value) and the message are stored as its error."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class JobStopped(RuntimeError):
    """The job's row left ``running`` (cancelled) or another runner took it: stop without writing more."""


Embed = Callable[[np.ndarray], np.ndarray]  # N x H x W x 3 uint8 aligned crops -> N x D normalised


@dataclass
class _SourceFaces:
    crops: list[bytes]  # encoded, face-id order
    enrolled_at: list[float]  # when each was enrolled into A: B keeps it (the collection's retention counts from it)


@dataclass
class _Batch:
    identities: list[tuple[IdentityRecord, _SourceFaces]] = field(default_factory=list)
    faces: int = 0


def model_embed(model: EmbeddingModel) -> Embed:
    """The model's session as the migration calls it; crops of another size than the model's input
    (a model aligned to another crop size) end the job with ``wrong_image_size``, naming both."""
    height, width = model.contract.input_size

    def embed(crops: np.ndarray) -> np.ndarray:
        if crops.shape[1:3] != (height, width):
            raise JobFailed(ErrorCode.wrong_image_size, f"the kept crops are {crops.shape[2]}x{crops.shape[1]}, the "
                            f"model {model.contract.model_id} takes {width}x{height}: re-enroll from the photos instead")
        return model.execute(crops)

    return embed


def no_source_crops(collection: str) -> str:
    return (f"collection {collection!r} holds faces without a kept crop (it was not created with keep_crops, or "
            "faces were enrolled before): nothing to re-embed from. Re-enroll its people from folders into the "
            f"new collection: `python -m service gallery enroll DIR --collection B`")


def check_source(source: GalleryBackend) -> None:
    """Raise JobFailed(no_source_crops) unless every face of ``source`` has a kept crop. The faces are
    counted first (the primary's), the crops then with that moment as the read's floor (a standby
    that lags would count fewer crops than the primary has faces)."""
    if not source.keep_crops:
        raise JobFailed(ErrorCode.no_source_crops, no_source_crops(source.name))
    faces = source.stats().faces
    with source.read_floor():
        crops = source.crop_count()
    if crops < faces:
        raise JobFailed(ErrorCode.no_source_crops, no_source_crops(source.name))


def start_migration(galleries: Galleries, collection: str, model: str, model_id: str, dim: int, into: str,
                    batch_size: int = 64, shadow: bool = False, actor: Actor | None = None) -> JobRecord:
    """Store a new migrate job of ``collection`` (a collection's own name) and create ``into`` pinned
    to the model (keep_crops, audited), then queue the job (``job.started`` audited with that write).
    JobFailed with the API's code otherwise, and then nothing stays: the job row (state ``creating``
    until then) holds the one-active-job-per-collection place while the collection is created, and is
    removed again if that fails."""
    try:
        source = galleries.collection(collection)
    except CollectionNotFound:
        raise JobFailed(ErrorCode.collection_not_found, f"no collection named {collection!r}") from None
    if galleries.crop_cipher is None:
        raise JobFailed(ErrorCode.crop_key_missing, "migrating needs the crop key: start the service with "
                        "FACE_CROP_KEY_FILE (the one the source's crops were sealed with)")
    check_source(source)
    job = JobRecord(job_id=new_job_id(), collection=collection, into=into, model=model, model_id=model_id,
                    source_model_id=source.model_id, state="creating", shadow=shadow, batch_size=batch_size,
                    started_by=actor.key_id if actor is not None else None)
    reserve(galleries, job, "wait for it or cancel it (POST /jobs/{id}/cancel)")
    try:
        settings = galleries.collection_info(collection)  # the new one keeps the old one's settings
        galleries.create_collection(into, actor, keep_crops=True, model_id=model_id, dim=dim,
                                    retention_days=settings.retention_days, max_faces=settings.max_faces,
                                    identify_fpir=settings.identify_fpir)
    except BaseException as exc:
        galleries.delete_job(job.job_id)
        if isinstance(exc, CollectionExists):
            raise JobFailed(ErrorCode.collection_exists, f"a collection or alias named {into!r} already exists") from None
        if isinstance(exc, CropsUnavailable):
            raise JobFailed(ErrorCode.crop_key_missing, str(exc)) from None
        if isinstance(exc, ValueError):
            raise JobFailed(ErrorCode.invalid_collection_name, str(exc)) from None
        raise
    try:
        return queue(galleries, job, actor)
    except WriteOutcomeUnknown:
        raise
    except GalleryUnavailable as exc:  # `into` is stored: database_unavailable would say nothing was
        raise WriteOutcomeUnknown(f"collection {into!r} created, its job {job.job_id} not queued: {exc}") from exc


def reserve(galleries: Galleries, job: JobRecord, wait: str) -> None:
    """Store ``job`` (state ``creating``): it holds its collection's one place for an active job. JobFailed
    ``job_running`` (``wait``: what the caller can do) when another job holds it."""
    try:
        galleries.create_job(job)
    except JobRunning:
        raise JobFailed(ErrorCode.job_running, f"a job of collection {job.collection!r} is queued or running; "
                        f"{wait}") from None


def queue(galleries: Galleries, job: JobRecord, actor: Actor | None) -> JobRecord:
    """A reserved job (``creating``) made ``queued`` for the runner, ``job.started`` audited in that write;
    the job as stored."""
    galleries.update_job(job.job_id, {"state": "queued", "updated_at": time.time()}, expect_state=("creating",),
                         audit_as=("job.started", actor or Actor()))
    stored = galleries.get_job(job.job_id)
    assert stored is not None
    return stored


def _shrinking_first(records: list[IdentityRecord], in_b: dict[str, int]) -> list[IdentityRecord]:
    """Identities of A to sync, those that lose faces in B first, then those that keep their count,
    then those that gain (``in_b``: B's face count of each it has), each group in id order: synced in
    id order, one that grew in A (a_x) before one that shrank (a_y) would make B need more room than A
    ever held, failing ``too_many_faces_for_collection`` against the max_faces B took from A."""
    return sorted(records, key=lambda r: (r.face_count - in_b.get(r.identity_id, 0) > 0,
                                          r.face_count - in_b.get(r.identity_id, 0) >= 0, r.identity_id))


def iter_identities(gallery: GalleryBackend, after: str | None = None) -> Iterator[IdentityRecord]:
    while True:
        page = gallery.list_identities(PAGE, after)
        yield from page
        if len(page) < PAGE:
            return
        after = page[-1].identity_id


class Migration:
    """One run of a migrate job (module docstring). ``save(changes)`` writes the job row while it is
    still ``running`` and this runner's (False: it is not: stop, before the next write of B too);
    ``embed`` is B's model."""

    def __init__(self, galleries: Galleries, job: JobRecord, embed: Embed,
                 save: Callable[[dict], bool], compare: bool = True,
                 finish: Callable[[dict | None], None] | None = None) -> None:
        self.galleries = galleries
        self.finish = finish  # flips the job to done (the runner's), called holding A's write fence
        self.job = job
        self.embed = embed
        self.save = save
        self.compare = compare
        self.synced: dict[str, float] = {}  # identity -> A's updated_at when this run synced it
        self.pass_started: float | None = None  # when the last full pass of this run began listing A (time.time)
        self.progress = dict(job.progress)
        self._started = time.monotonic()
        self._faces_this_run = 0

    # --- one identity ------------------------------------------------------------------------
    def _cipher(self) -> CropCipher:
        cipher = self.galleries.crop_cipher
        if cipher is None:
            raise JobFailed(ErrorCode.crop_key_missing, "migrating needs the crop key (FACE_CROP_KEY_FILE)")
        return cipher

    def _read(self, source: GalleryBackend, records: list[IdentityRecord]) -> dict[str, _SourceFaces]:
        """The encoded crops (face-id order) of each of these identities A still has, with when each face
        was enrolled: one batched read (``identity_crops``), each identity's faces and crops from one statement."""
        cipher = self._cipher()
        out = {}
        for identity_id, faces in source.identity_crops([r.identity_id for r in records]).items():
            crops, times = [], []
            for face_id, blob, enrolled_at in faces:
                if blob is None:
                    raise JobFailed(ErrorCode.no_source_crops, no_source_crops(source.name))
                crops.append(cipher.open(source.name, face_id, blob))
                times.append(enrolled_at)
            out[identity_id] = _SourceFaces(crops, times)
        return out

    def _write(self, source: GalleryBackend, target: GalleryBackend, batch: _Batch) -> None:
        """Embed the batch's crops (``batch_size`` per model call) and write each identity to B. A write
        that B's max_faces (A's) refuses is made once more after ``_make_room``."""
        arrays = [decode_crop(c) for _, faces in batch.identities for c in faces.crops]
        size = max(1, self.job.batch_size)
        vectors = (np.concatenate([self.embed(np.stack(arrays[i:i + size])) for i in range(0, len(arrays), size)])
                   if arrays else np.zeros((0, target.dim), np.float32))
        self._hold()
        start = 0
        for record, faces in batch.identities:
            crops = faces.crops
            embeddings = vectors[start:start + len(crops)]
            start += len(crops)
            if not crops:  # an identity without faces (cannot stay so in A): mirror by deleting
                target.delete(record.identity_id)
            else:
                try:
                    target.enroll(record.identity_id, embeddings, record.metadata, replace=True, crops=crops,
                                  enrolled_at=faces.enrolled_at)
                except TooManyFacesForCollection:
                    if not self._make_room(source, target):
                        raise
                    target.enroll(record.identity_id, embeddings, record.metadata, replace=True, crops=crops,
                                  enrolled_at=faces.enrolled_at)
            self.synced[record.identity_id] = record.updated_at
        self._faces_this_run += len(arrays)

    def _sync(self, source: GalleryBackend, target: GalleryBackend, records: list[IdentityRecord]) -> int:
        """Sync these identities of A as listed (one A no longer has is deleted from B) in batches;
        faces synced."""
        batch, faces = _Batch(), 0
        self._check_unaliased(target)
        crops_of = self._read(source, records)
        self._hold()
        for record in records:
            faces_of = crops_of.get(record.identity_id)
            if faces_of is None:
                target.delete(record.identity_id)
                self.synced.pop(record.identity_id, None)
                continue
            batch.identities.append((record, faces_of))
            batch.faces += len(faces_of.crops)
            if batch.faces >= self.job.batch_size:
                self._write(source, target, batch)
                faces += batch.faces
                batch = _Batch()
        if batch.identities:
            self._write(source, target, batch)
            faces += batch.faces
        return faces

    def _make_room(self, source: GalleryBackend, target: GalleryBackend) -> int:
        """B is full (A's max_faces) while A, within its limit, has more to write: B still holds faces A
        has lost since they were synced (the copy in id order wrote an identity before A deleted some of
        its faces or all of it, and a later one grew). Sync every identity B holds more faces of than A
        does now, deleting those A lacks; how many (0: B holds nothing stale, the refusal stands)."""
        with source.read_floor():  # A as it is now, not as the copy's floor saw it
            in_a = {r.identity_id: r for r in iter_identities(source)}
            in_b = {r.identity_id: r.face_count for r in iter_identities(target)}
            gone = sorted(i for i in in_b if i not in in_a)
            shrunk = [in_a[i] for i in sorted(in_b) if i in in_a and in_a[i].face_count < in_b[i]]
            if gone:
                self._check_unaliased(target)
            for identity_id in gone:
                target.delete(identity_id)
                self.synced.pop(identity_id, None)
            if shrunk:
                self._sync(source, target, shrunk)
        if gone or shrunk:
            log.info("migration made room", extra={"job": self.job.job_id, "synced": len(shrunk), "deleted": len(gone)})
        return len(gone) + len(shrunk)

    def _check_unaliased(self, target: GalleryBackend) -> None:
        """JobFailed ``migration_unfinished`` when an alias points at B: clients would write to B, and
        this job's syncs (A's identities as they are: replaced, deleted where A lacks them) would erase
        what they wrote. ``set_alias`` refuses it while the job is not done; this is the second guard
        (an alias written otherwise: a replica of an older release), checked before each write of B."""
        aliases = sorted(a.name for a in self.galleries.list_aliases() if a.collection == target.name)
        if aliases:
            raise JobFailed(ErrorCode.migration_unfinished, f"alias {aliases[0]!r} points at {target.name!r}, the "
                            "new collection of this unfinished migration: the job stops rather than overwrite what "
                            "was written through it. Point the alias back at the source, then resume the job")

    def _hold(self) -> None:
        """JobStopped unless the job is still this run's (``save``: running, this runner's), checked right
        before writing B: what this run read of A (then embedded, which takes long) may be older than what
        a run that took the job since (cancelled, resumed and taken by another replica; taken over as
        stale) wrote to B, and must not overwrite it."""
        if not self.save({"heartbeat": time.time()}):
            raise JobStopped(self.job.job_id)

    # --- the phases --------------------------------------------------------------------------
    def _checkpoint(self, **progress: object) -> None:
        self.progress.update(progress)
        elapsed = time.monotonic() - self._started
        self.progress["faces_per_s"] = round(self._faces_this_run / elapsed, 2) if elapsed > 0 and self._faces_this_run else None
        changes: dict = {"progress": dict(self.progress), "updated_at": time.time(), "heartbeat": time.time()}
        if "cursor" in progress:
            changes["cursor"] = self.progress.pop("cursor")
            changes["progress"] = dict(self.progress)
        if not self.save(changes):
            raise JobStopped(self.job.job_id)

    def copy(self, source: GalleryBackend, target: GalleryBackend) -> None:
        with source.read_floor():  # what was committed before the copy began (a lagging standby has less)
            self._copy(source, target)

    def _copy(self, source: GalleryBackend, target: GalleryBackend) -> None:
        stats = source.stats()
        self._checkpoint(phase="copy", identities_total=stats.identities, faces_total=stats.faces)
        cursor = self.job.cursor
        pending: list[IdentityRecord] = []
        pending_faces = 0
        for record in iter_identities(source, cursor):
            pending.append(record)
            pending_faces += record.face_count
            if pending_faces >= self.job.batch_size:
                self._copy_batch(source, target, pending)
                pending, pending_faces = [], 0
        if pending:
            self._copy_batch(source, target, pending)

    def _copy_batch(self, source: GalleryBackend, target: GalleryBackend, records: list[IdentityRecord]) -> None:
        faces = self._sync(source, target, records)
        self._checkpoint(cursor=records[-1].identity_id,
                         identities_done=int(self.progress.get("identities_done", 0)) + len(records),
                         faces_done=int(self.progress.get("faces_done", 0)) + faces)

    def catch_up(self, source: GalleryBackend, target: GalleryBackend, passes: int = CATCH_UP_PASSES) -> int:
        """Passes until one finds nothing, at most ``passes``; returns how many identities were synced or deleted."""
        total = 0
        self._checkpoint(phase="catch_up")
        for _ in range(passes):
            found = self._pass(source, target)
            if not found:
                break
            total += found
        return total

    def _pass(self, source: GalleryBackend, target: GalleryBackend) -> int:
        """One catch-up pass: list A and B, sync what differs; how many identities it synced or deleted.
        Its reads see every write committed before it began (``read_floor``: never a lagging standby's
        older A). B loses faces before it gains any (``_shrinking_first``): with A's max_faces, B never
        needs more room than A held."""
        with source.read_floor():
            return self._listed_pass(source, target)

    def _listed_pass(self, source: GalleryBackend, target: GalleryBackend) -> int:
        since = self.job.created_at - SLACK_S
        self.pass_started = time.time()
        in_a = {r.identity_id: r for r in iter_identities(source)}
        in_b = {r.identity_id: r.face_count for r in iter_identities(target)}
        stale = _shrinking_first([r for i, r in in_a.items()
                                  if i not in in_b or in_b[i] != r.face_count
                                  or (r.updated_at >= since and self.synced.get(i) != r.updated_at)], in_b)
        gone = [i for i in in_b if i not in in_a]
        if not stale and not gone:
            return 0
        if gone:
            self._check_unaliased(target)
            self._hold()
        for identity_id in gone:
            target.delete(identity_id)
        for start in range(0, len(stale), PAGE):
            self._sync(source, target, stale[start:start + PAGE])
            self._checkpoint()
        log.info("migration catch-up pass", extra={"job": self.job.job_id, "synced": len(stale), "deleted": len(gone)})
        self._checkpoint(identities_total=len(in_a), identities_done=len(in_a),
                         faces_total=sum(r.face_count for r in in_a.values()),
                         faces_done=sum(r.face_count for r in in_a.values()))
        return len(stale) + len(gone)

    def fenced_pass(self, source: GalleryBackend, target: GalleryBackend, report: dict | None) -> None:
        """The last pass and the done flip, holding A's write fence (module docstring, step 4)."""
        waited = time.monotonic()
        with source.write_fence():
            held = time.monotonic()
            synced, mode = self.fenced_sync(source, target)
            self.progress.update(phase="done", fenced_s=round(time.monotonic() - held, 3),
                                 fence_wait_s=round(held - waited, 3), fenced_synced=synced, fenced_mode=mode)
            if self.finish is not None:
                self.finish(report)
        log.info("migration fenced pass", extra={"job": self.job.job_id, "synced": synced, "mode": mode,
                                                 "fenced_s": self.progress["fenced_s"]})

    def fenced_sync(self, source: GalleryBackend, target: GalleryBackend) -> tuple[int, str]:
        """The fenced pass's sync, called holding A's write fence (A cannot change meanwhile): what A's
        audit log says was written since the last full pass of this run began (``changes``), else a
        full pass (``full``); returns (identities synced or deleted, the mode)."""
        limit = max(MIN_FENCED_CHANGES, int(source.stats().identities * FENCED_CHANGES_PER_IDENTITY))
        changed = (None if self.pass_started is None
                   else self._written_since(source, self.pass_started - FENCE_LOOKBACK_S, limit))
        if changed is None:
            return self._pass(source, target), "full"
        return self._sync_changed(source, target, changed), "changes"

    def _written_since(self, source: GalleryBackend, since: float, limit: int) -> set[str] | None:
        """Every identity of A that a write since ``since`` touched, from A's audit log (the primary's);
        None past ``limit`` identities (the caller lists everything instead)."""
        touched: set[str] = set()
        cursor = None
        while True:
            page = self.galleries.audit(AuditQuery(collection=source.name, since=since, limit=AUDIT_PAGE, cursor=cursor))
            for entry in page:
                if entry.identity_id is not None:
                    touched.add(entry.identity_id)
                for key in ("merged_from", "from", "renamed_from"):  # a merge's, a move's, a rename's source
                    if isinstance(entry.details.get(key), str):
                        touched.add(entry.details[key])
            if len(touched) > limit:
                return None
            if len(page) < AUDIT_PAGE:
                return touched
            cursor = page[-1].entry_id

    def _sync_changed(self, source: GalleryBackend, target: GalleryBackend, identity_ids: set[str]) -> int:
        """Sync these identities of A (deleted from B where A has them no more), skipping those this run
        synced at A's current ``updated_at``; how many it synced or deleted."""
        stale: list[IdentityRecord] = []
        gone = 0
        present = source.identity_crops(sorted(identity_ids)).keys()  # one query: which of them A still has
        absent = identity_ids - present
        lingering = sorted(target.identity_crops(sorted(absent)).keys())  # those B still has
        if lingering:
            self._check_unaliased(target)
            self._hold()
        for identity_id in lingering:
            if target.delete(identity_id) is not None:
                gone += 1
        for identity_id in absent:
            self.synced.pop(identity_id, None)
        in_b: dict[str, int] = {}
        for identity_id in sorted(present):
            details = source.get_identity(identity_id)
            if details is None:
                continue
            mirrored = target.get_identity(identity_id)
            if mirrored is not None:
                in_b[identity_id] = mirrored.record.face_count
            if self.synced.get(identity_id) != details.record.updated_at or in_b.get(identity_id) != details.record.face_count:
                stale.append(details.record)
        stale = _shrinking_first(stale, in_b)
        for start in range(0, len(stale), PAGE):
            self._sync(source, target, stale[start:start + PAGE])
        return len(stale) + gone

    def report(self, source: GalleryBackend, target: GalleryBackend) -> dict | None:
        """The comparison report of A and B (compare.py); None when ``compare`` is off."""
        if not self.compare:
            return None
        self._checkpoint(phase="compare")
        with source.read_floor():
            return compare_collections(source, target).as_dict()

    def run(self) -> dict | None:
        """Copy, catch up, compare, the fenced pass and ``finish``; returns the report. JobFailed /
        JobStopped end it early."""
        source = self.galleries.collection(self.job.collection)
        target = self.galleries.collection(self.job.into)
        self._cipher()
        check_source(source)
        self.copy(source, target)
        self.catch_up(source, target)
        report = self.report(source, target)
        self.catch_up(source, target)  # what was written during the comparison, off the fence
        self.fenced_pass(source, target, report)
        return report
