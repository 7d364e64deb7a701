"""Typed results: pydantic models mirroring the service's answers (service/http/schemas.py).

Unknown fields are ignored (a newer server may add some); tests/clients checks that every field of the
server's models is here. Embeddings come out as numpy arrays (float32) when numpy is installed, else lists.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

try:
    import numpy as np
except ImportError:  # numpy is an extra
    np = None  # type: ignore[assignment]


def _vectors(value: Any) -> Any:
    return value if np is None else np.asarray(value, dtype=np.float32)


Vectors = Annotated[Any, BeforeValidator(_vectors)]  # numpy (n, dim) float32, or lists without numpy


class Model(BaseModel):
    model_config = ConfigDict(extra="ignore", arbitrary_types_allowed=True, protected_namespaces=())


class ErrorBody(Model):
    code: str
    message: str
    details: dict[str, Any] | None = None


class FaceLocation(Model):
    image_index: int
    box: list[float]
    landmarks: list[list[float]]
    score: float


class QualityPart(Model):
    value: float | None
    min: float | None = None
    max: float | None = None
    passed: bool | None = None
    reason: str | None = None


class QualityFailure(Model):
    part: str
    value: float
    limit: float
    by: float


class FaceQuality(Model):
    score: float | None
    min_score: float | None = None
    passed: bool
    failed: list[QualityFailure]
    fitted: bool
    parts: dict[str, QualityPart]


class EmbedResult(Model):
    model_id: str
    model: str | None = None  # the served model's name
    dimension: int
    embeddings: Vectors
    faces: list[FaceLocation | None] | None = None
    quality: list[FaceQuality]


class DetectedFace(FaceLocation):
    crop: str | None = None
    quality: FaceQuality


class DetectedImage(Model):
    width: int
    height: int
    faces: list[DetectedFace]


class DetectResult(Model):
    detector: str
    alignment: str
    model: str | None = None
    model_id: str | None = None
    images: list[DetectedImage]


class PossibleDuplicate(Model):
    """An enrolled identity a newly enrolled face matches (FACE_ENROLL_DUPLICATE_POLICY=warn)."""

    identity_id: str
    score: float
    face_id: int


class EnrollResult(Model):
    identity_id: str
    created: bool
    face_ids: list[int]
    faces_replaced: int = 0
    face_count: int
    model_id: str
    faces: list[FaceLocation | None] | None = None
    quality: list[FaceQuality] | None = None
    possible_duplicates: list[PossibleDuplicate] | None = None


class VerifyResult(Model):
    similarity: float
    threshold: float
    match: bool
    model_id: str
    identity_id: str | None = None
    face_a: FaceLocation | None = None
    face_b: FaceLocation | None = None


class Candidate(Model):
    identity_id: str
    score: float
    face_id: int
    stranger_probability: float | None = None


class ProbeResult(Model):
    image_index: int
    face: FaceLocation | None = None
    identity_id: str | None
    known: bool
    score: float | None
    candidates: list[Candidate]
    quality: FaceQuality | None = None
    error: ErrorBody | None = None
    probe_face_id: int | None = None  # identify(face_ids=...): the enrolled face this result is for


class IdentifyResult(Model):
    results: list[ProbeResult]
    threshold: float
    threshold_source: str = "fpir"
    fpir_target: float | None = None
    fpir_estimated: float | None = None
    gallery_identities: int
    gallery_faces: int | None = None
    model_id: str


class IdentitySummary(Model):
    identity_id: str
    metadata: dict[str, Any]
    face_count: int
    created_at: float
    updated_at: float


class StoredFace(Model):
    face_id: int
    enrolled_at: float
    expires_at: float | None = None  # when the collection's retention erases it (None: no retention)


class Identity(IdentitySummary):
    face_ids: list[int]
    faces: list[StoredFace] = []


class IdentityPage(Model):
    items: list[IdentitySummary]
    next_cursor: str | None


class IdentityDeleted(Model):
    identity_id: str
    deleted_faces: int


class Collection(Model):
    name: str
    model_id: str
    model: str | None = None  # the served name of its model (None: not served here)
    dim: int = 0
    created_at: float
    identities: int
    faces: int
    identify_threshold: float
    keep_crops: bool = False
    retention_days: float | None = None  # each face is erased this many days after its enrollment (None: kept)
    max_faces: int | None = None  # the most faces it may hold (None: no limit)
    identify_fpir: float | None = None  # its own open-set FPIR target (None: the server's)
    damaged: bool = False  # its stored data cannot be read: requests to it fail (collection_damaged) until restored


class CollectionDeleted(Model):
    name: str
    deleted_identities: int
    deleted_faces: int


class Alias(Model):
    """A second name of a collection (``PUT /aliases/{name}``); every collection route accepts it."""

    alias: str
    collection: str
    updated_at: float


class AliasList(Model):
    items: list[Alias]


class JobProgress(Model):
    phase: str  # a migration: copy, catch_up, compare, done; a scan: scan, done
    identities_done: int
    identities_total: int
    faces_done: int
    faces_total: int
    faces_per_s: float | None = None
    fenced_s: float | None = None  # once done: how long the last pass held writes to the source
    fence_wait_s: float | None = None
    fenced_synced: int | None = None
    fenced_mode: str | None = None  # changes (O(writes since the last pass)) or full (both listed)


class JobError(Model):
    code: str
    message: str


class CollectionRank(Model):
    collection: str
    model_id: str
    identities: int
    faces: int
    probes: int
    rank1: float | None = None  # leave-one-face-out rank-1; None: no probe


class ChangedProbe(Model):
    identity_id: str
    source_top1: str | None = None
    target_top1: str | None = None
    source_score: float | None = None
    target_score: float | None = None
    source_face_id: int
    target_face_id: int


class ComparisonReport(Model):
    """A migration's comparison: each collection's rank-1 and how often their top-1 answers agree."""

    source: CollectionRank
    target: CollectionRank
    paired_probes: int
    unpaired_identities: int
    top1_agreement: float | None = None
    changed_count: int
    identities_changed: int
    changed: list[ChangedProbe] = []
    sampled: bool
    max_probes: int
    seed: int
    seconds: float


class Job(Model):
    """A background job: a migration (``POST /collections/{c}/migrate``; its ``report`` once done) or a
    scan (``POST .../duplicates/jobs`` or ``.../outliers/jobs``, kind ``duplicates`` or ``outliers``; its
    field of that name once done)."""

    id: str
    kind: str
    state: str  # queued, running, done, failed, cancelled
    collection: str
    into: str
    model: str
    model_id: str
    source_model_id: str
    shadow: bool = False
    progress: JobProgress
    created_at: float
    updated_at: float
    finished_at: float | None = None
    started_by: str | None = None
    error: JobError | None = None
    report: ComparisonReport | None = None
    duplicates: DuplicatesResult | None = None
    outliers: OutliersResult | None = None

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")


class JobCreated(Model):
    job: Job


class JobList(Model):
    items: list[Job]


class Key(Model):
    key_id: str
    role: str
    collections: list[str] | None
    note: str | None
    created_at: float
    expires_at: float | None
    revoked_at: float | None = None
    last_used_at: float | None = None
    rate_limit_rps: float | None = None
    rate_limit_faces_per_s: float | None = None


class KeyCreated(Key):
    secret: str


class KeyRevoked(Model):
    key_id: str
    revoked_at: float


class AuditEntry(Model):
    entry_id: str
    at: float
    action: str
    key_id: str | None
    client: str | None
    request_id: str | None
    collection: str | None
    identity_id: str | None
    details: dict[str, Any]


class AuditPage(Model):
    items: list[AuditEntry]
    next_cursor: str | None


class CollectionList(Model):
    items: list[Collection]


class KeyList(Model):
    items: list[Key]


class WhoAmI(Model):
    """/whoami: the calling key's id (None: the admin key from the environment, or open mode), its role and
    collections (None: all)."""

    key_id: str | None
    role: str
    collections: list[str] | None
    open_mode: bool


class Health(Model):
    status: str
    version: str | None = None


class CollectionThreshold(Model):
    """/readyz, per collection: its size and the 1:N threshold in force for that size."""

    identities: int
    faces: int
    identify_threshold: float
    damaged: bool = False  # its stored data cannot be read (collection_damaged): its counts are 0, not known


class ModelStatus(Model):
    """/readyz ``models``: one served model."""

    model_id: str
    dim: int
    provider: str | None
    ready: bool
    default: bool
    impostor_tail_source: str | None = None  # "gallery": the data dir's calibration of it; "model": its contract's
    quality_source: str | None = None


class Ready(Model):
    """/readyz: `status` always; the rest only for a request with a valid key (or a server without keys)."""

    status: str
    model_id: str | None = None
    model_path: str | None = None
    providers: list[str] | None = None
    embedding_size: int | None = None
    verify_threshold: float | None = None
    identify_threshold: float | None = None
    identify_threshold_source: str | None = None
    identify_fpir: float | None = None
    impostor_tail: dict[str, Any] | None = None
    quality: dict[str, Any] | None = None
    inference_ms: float | None = None
    gallery: dict[str, int] | None = None
    collections: dict[str, CollectionThreshold] = Field(default_factory=dict)
    default_model: str | None = None
    models: dict[str, ModelStatus] = Field(default_factory=dict)


class DuplicateEvidence(Model):
    face_a: int
    face_b: int
    score: float


class DuplicatePair(Model):
    """Two identities that are probably one person: their best face-pair score and the best pairs."""

    identity_a: str
    identity_b: str
    score: float
    false_alarm_probability: float | None
    evidence: list[DuplicateEvidence]


class DuplicatesResult(Model):
    """``duplicates()``: identity pairs best first, and how the scan chose its listing score."""

    pairs: list[DuplicatePair]
    min_score: float
    max_false_alarm: float | None
    comparisons: int
    family_comparisons: float
    faces_scanned: int
    elapsed_ms: float
    model_id: str


class BestOther(Model):
    identity_id: str
    score: float
    face_id: int


class Outlier(Model):
    """A face that matches its own identity's other faces worse than the threshold."""

    identity_id: str
    face_id: int
    own_score: float
    best_other: BestOther | None


class OutliersResult(Model):
    faces: list[Outlier]
    threshold: float
    identities_checked: int
    model_id: str
    faces_scanned: int = 0  # every face the scan read (0 from an older server, which did not say)


class MergeResult(Model):
    identity_id: str  # the target: it now holds the merged faces
    merged_from: str  # deleted
    faces_moved: int
    face_count: int


class MoveResult(Model):
    face_id: int
    from_identity: str
    to_identity: str
    target_created: bool
    source_deleted: bool


class FaceDeleted(Model):
    face_id: int
    identity_id: str
    identity_deleted: bool


class FacesDeleted(Model):
    """``delete_faces()``: the faces erased, by face id, each as ``delete_face`` answers (``identity_deleted``:
    its identity had no face left and went with it), and the ids not in the collection (ascending)."""

    deleted: list[FaceDeleted]
    not_found: list[int]


class ClusterFace(Model):
    image_index: int  # the request image (or embedding) the face came from
    face: FaceLocation | None = None
    face_index: int  # among all faces of the request


class Cluster(Model):
    cluster_id: int
    size: int
    faces: list[ClusterFace]


class ClusterResult(Model):
    """``cluster()``: clusters biggest first, singletons last."""

    clusters: list[Cluster]
    threshold: float
    method: str
    faces: int
    model_id: str
    model: str | None = None  # the served model's name


class SkippedFile(Model):
    """A file enroll_folder left out: the service refused it for itself (``code``: not_an_image, no_face...)."""

    file: str
    code: str
    message: str


class PersonResult(Model):
    """One person of enroll_folder: faces enrolled by this run, files skipped, and why it failed if it did."""

    identity_id: str
    files: int = 0
    faces: int = 0
    # the identity's faces in the gallery as this run last saw them: read before it, or its last enrollment's
    # answer (0: none stored)
    face_count: int = 0
    already: bool = False  # stored before with at least as many faces as files (not replace): left as it was
    resumed: bool = False  # stored before with fewer faces than files (a run cut short): enrolled again, replace
    # an error stopped it after some of its faces were stored (by this run, or by the earlier one it resumed):
    # ``error`` says why, ``face_count`` how many are stored; a rerun enrolls it again
    partial: bool = False
    skipped: list[SkippedFile] = Field(default_factory=list)
    error: ErrorBody | None = None  # a refusal of the person, or none of its files could be enrolled


class FolderSummary(Model):
    """What enroll_folder did: people found, enrolled (``resumed``: of them, people found partly enrolled
    and enrolled again), already there (left alone), each partly enrolled person's error (``partial``: some
    faces stored), each failed person's (``failed``: none stored by this run), files skipped (in
    ``persons``: every person's result)."""

    people: int = 0
    enrolled: int = 0
    already: int = 0
    resumed: int = 0
    faces: int = 0
    skipped_files: int = 0
    partial: dict[str, ErrorBody] = Field(default_factory=dict)
    failed: dict[str, ErrorBody] = Field(default_factory=dict)
    persons: dict[str, PersonResult] = Field(default_factory=dict)

    @property
    def done(self) -> int:
        """People finished, whichever way (progress)."""
        return self.enrolled + self.already + len(self.partial) + len(self.failed)

    def add(self, person: PersonResult) -> None:
        self.persons[person.identity_id] = person
        self.faces += person.faces
        self.skipped_files += len(person.skipped)
        if person.resumed and person.error is None:
            self.resumed += 1
        if person.already:
            self.already += 1
        elif person.error is not None:
            (self.partial if person.partial else self.failed)[person.identity_id] = person.error
        else:
            self.enrolled += 1


Job.model_rebuild()  # its duplicates field names a model defined after it


# the server's OpenAPI components (its answers) and the client model that reads each: tests/clients checks that
# every answer the served document declares is here, with every field
SERVER_MODELS: dict[str, type[Model]] = {
    "AliasList": AliasList, "AliasOut": Alias, "AuditOut": AuditEntry, "BestOtherOut": BestOther, "Cluster": Cluster,
    "ClusterFace": ClusterFace, "ClusterResponse": ClusterResult, "DuplicateEvidence": DuplicateEvidence,
    "DuplicatePairOut": DuplicatePair, "DuplicatesResponse": DuplicatesResult, "FaceDeleteResponse": FaceDeleted,
    "FacesDeleteResponse": FacesDeleted,
    "MergeResponse": MergeResult, "ModelStatus": ModelStatus, "MoveFaceResponse": MoveResult, "OutlierOut": Outlier,
    "OutliersResponse": OutliersResult, "PossibleDuplicate": PossibleDuplicate, "AuditPage": AuditPage,
    "Candidate": Candidate, "CollectionDeleted": CollectionDeleted,
    "CollectionList": CollectionList, "CollectionOut": Collection,
    "CollectionThreshold": CollectionThreshold, "DeleteResponse": IdentityDeleted,
    "DetectResponse": DetectResult, "DetectedFaceOut": DetectedFace, "DetectedImage": DetectedImage,
    "EmbedResponse": EmbedResult, "EnrollResponse": EnrollResult, "ErrorBody": ErrorBody,
    "FaceLocation": FaceLocation, "FaceQuality": FaceQuality, "IdentifyResponse": IdentifyResult,
    "IdentityDetail": Identity, "IdentityPage": IdentityPage, "IdentitySummary": IdentitySummary,
    "KeyCreated": KeyCreated, "KeyList": KeyList, "KeyOut": Key, "KeyRevoked": KeyRevoked, "ProbeResult": ProbeResult,
    "QualityFailure": QualityFailure, "QualityPart": QualityPart, "ReadyResponse": Ready, "ReadyStatus": Ready,
    "VerifyResponse": VerifyResult, "WhoAmI": WhoAmI, "StoredFace": StoredFace,
    "ComparisonReport": ComparisonReport, "CollectionRank": CollectionRank, "ChangedProbe": ChangedProbe,
    "Job": Job, "JobProgress": JobProgress, "JobError": JobError, "JobCreated": JobCreated, "JobList": JobList,
}

__all__ = [
    "ChangedProbe",
    "CollectionRank",
    "ComparisonReport",
    "Job",
    "JobCreated",
    "JobError",
    "JobList",
    "JobProgress",
    "Alias",
    "AliasList",
    "AuditEntry",
    "AuditPage",
    "BestOther",
    "Candidate",
    "Cluster",
    "ClusterFace",
    "ClusterResult",
    "Collection",
    "CollectionDeleted",
    "CollectionList",
    "CollectionThreshold",
    "DetectResult",
    "DetectedFace",
    "DetectedImage",
    "DuplicateEvidence",
    "DuplicatePair",
    "DuplicatesResult",
    "EmbedResult",
    "EnrollResult",
    "ErrorBody",
    "FaceDeleted",
    "FacesDeleted",
    "FaceLocation",
    "FaceQuality",
    "FolderSummary",
    "Health",
    "IdentifyResult",
    "Identity",
    "IdentityDeleted",
    "IdentityPage",
    "StoredFace",
    "IdentitySummary",
    "Key",
    "KeyCreated",
    "KeyList",
    "KeyRevoked",
    "MergeResult",
    "ModelStatus",
    "MoveResult",
    "Outlier",
    "OutliersResult",
    "PersonResult",
    "PossibleDuplicate",
    "ProbeResult",
    "QualityFailure",
    "QualityPart",
    "Ready",
    "SkippedFile",
    "VerifyResult",
    "WhoAmI",
]
