"""Request and response models: the OpenAPI reference is generated from these."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from ..access.limits import MAX_RATE, MIN_RATE
from ..errors import STATUS, ErrorCode
from ..gallery import identity_ids
from ..gallery.api import MAX_ROW_ID

Base64Image = Annotated[
    str,
    Field(description="An image (JPEG, PNG, WebP or BMP), base64-encoded; a data URL is accepted. An aligned "
          "112x112 face, or a photo when `image_type` is `photo`."),
]
ImageType = Annotated[
    Literal["aligned", "photo", "auto"],
    Field(description="`aligned`: every image is already an aligned crop of the model's input size. "
          "`photo`: every image is a photo; faces are detected and aligned by the service. "
          "`auto`: images of exactly the model's input size are taken as aligned, others as photos."),
]
MultiFace = Annotated[
    Literal["largest", "center", "all"],
    Field(description="Photos with several faces: `largest` face, the face nearest the image `center`, "
          "or `all` faces (each becomes its own result, with its box)."),
]
SingleFace = Annotated[
    Literal["largest", "center"],
    Field(description="Photos with several faces: use the `largest` one, or the one nearest the image `center`."),
]


def check_identity_ref(value: str) -> str:
    """Ids a client could not address as a path segment, or the gallery could not serve back."""
    if value in (".", ".."):
        raise PydanticCustomError("invalid_identity_id", "'.' and '..' are not identity ids (URLs resolve them away)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise PydanticCustomError("invalid_identity_id", "the identity id is not valid Unicode") from None
    return value


def check_identity_id(value: str) -> str:
    """A new identity's id: NFC, nothing invisible (service.gallery.identity_ids)."""
    value = identity_ids.normalise(check_identity_ref(value))
    why = identity_ids.problem(value)
    if why is not None:
        raise PydanticCustomError("invalid_identity_id", why)
    return value


ID_PATTERN = r"^[^/]+$"  # one path segment (a schema violation: invalid_request); characters: identity_ids
IdentityId = Annotated[
    str,
    Field(description="Your identifier for a person: 1-128 characters, no '/', not '.' or '..'; normalised to "
          "Unicode NFC; no control or invisible format characters (e.g. U+202E, U+200B), not blank.",
          min_length=1, max_length=identity_ids.MAX_LENGTH, pattern=ID_PATTERN, examples=["employee-4711"]),
    AfterValidator(check_identity_id),
]
# an id that names a stored identity: ids stored before the NFC rule are still found (identity_ids.find_identity)
IdentityRef = Annotated[
    str,
    Field(description="An enrolled identity's id (found as given, or in its NFC or NFD form).", min_length=1,
          max_length=identity_ids.MAX_LENGTH, pattern=ID_PATTERN, examples=["employee-4711"]),
    AfterValidator(check_identity_ref),
]
Threshold = Annotated[float | None, Field(ge=-1.0, le=1.0, description="Cosine threshold; omit for the default.")]
Embedding = Annotated[
    list[float],
    Field(description="An embedding made by the served model (e.g. from /embed), instead of an image: exactly "
          "the model's dimension, finite, not (near) zero; L2-normalised by the service."),
]
ModelId = Annotated[
    str | None,
    Field(description="name@version of the model that made the request's embeddings; required with embeddings "
          "and must equal the served model's (`model_mismatch` otherwise).", examples=["sface@2021dec-int8bq"]),
]


def _whole(value: Any) -> Any:
    """JSON Schema's integer: 3.0 is 3 (a float a client computed, whole); 3.5, "3" and true stay refused."""
    return int(value) if type(value) is float and value.is_integer() else value


Int = Annotated[int, BeforeValidator(_whole)]  # a request's integer field (the models are strict)


class Strict(BaseModel):
    # strict: "0.5" is not a number and true is not an integer (multipart text is converted first,
    # in payload.py); unknown fields are refused
    model_config = ConfigDict(extra="forbid", strict=True)


class StrictFinite(Strict):
    # and no infinite number (1e999 parses as inf): the bodies without images (collections, keys,
    # aliases, scan and migrate jobs)
    model_config = ConfigDict(allow_inf_nan=False)  # merged with Strict's (extra forbidden, strict)


class ImageOptions(Strict):
    """How the request's images are read. A photo without any face is refused (`no_face`, 422)."""

    image_type: ImageType = "aligned"


class PhotoOptions(ImageOptions):
    multi_face: MultiFace = "largest"


class SingleFacePhotoOptions(ImageOptions):
    multi_face: SingleFace = "largest"


class FaceLocation(BaseModel):
    """Where a face was found in a photo, in the pixels of the upright photo (EXIF orientation applied)."""

    image_index: int = Field(description="Which image of the request the face is in (0-based).")
    box: list[float] = Field(description="x, y (top-left), width, height.")
    landmarks: list[list[float]] = Field(
        description="5 points (x, y): right eye, left eye, nose tip, right and left mouth corners (the subject's)."
    )
    score: float = Field(description="Detector confidence, 0..1.")


# --- errors -----------------------------------------------------------------------------------
class ErrorBody(BaseModel):
    # every code with its HTTP status, as a vendor extension (an `enum` would make generated clients refuse a
    # code added later); clients are checked against it (tests/clients/test_openapi_client.py)
    code: str = Field(description="A code of the README's \"Bad input\" table (`x-error-codes`: each with "
                      "its HTTP status).", json_schema_extra={"x-error-codes": {c.value: STATUS[c] for c in ErrorCode}})
    message: str
    details: dict[str, Any] | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# --- quality ----------------------------------------------------------------------------------
class QualityPart(BaseModel):
    value: float | None = Field(description="The measured value; null when not measured (see reason).")
    min: float | None = Field(None, description="The lowest value allowed (null: no lower limit).")
    max: float | None = Field(None, description="The highest value allowed (null: no upper limit).")
    passed: bool | None = Field(None, description="Whether the value is within its limits.")
    reason: str | None = Field(None, description="Why the part was not measured.")


class QualityFailure(BaseModel):
    part: str = Field(description="`score` or a part's name.")
    value: float
    limit: float
    by: float = Field(description="How far the value is beyond the limit (positive).")


class FaceQuality(BaseModel):
    """How fit a face is for recognition. Parts: `size` (inter-ocular distance in the photo's pixels),
    `yaw`/`pitch`/`roll` (degrees, estimated from the 5 landmarks), `sharpness` (variance of the
    Laplacian of the aligned face), `exposure` (mean gray level of the aligned face), `clipping` (share of
    its pixels at black or white), `detector` (the detector's score), `norm` (the model's raw output
    norm). Aligned crops have no size, pose or detector score (null, with a reason)."""

    score: float | None = Field(
        description="The fitted chance, 0..1, that a genuine comparison of this face succeeds at FMR 1e-3 (the "
        "model's `face.quality`); null when the model has no fitted quality (then only part limits hold).")
    min_score: float | None = Field(None, description="The score limit this face was judged against.")
    passed: bool = Field(description="True when the score and every part are within their limits.")
    failed: list[QualityFailure] = Field(description="Each limit missed, with by how much.")
    fitted: bool = Field(description="Whether the model ships a fitted quality.")
    parts: dict[str, QualityPart]


# free text in a path or a query (a job or key id, a filter): no NUL, which no id holds and PostgreSQL's text
# cannot (a lookup would fail there instead of finding nothing)
NO_NUL = r"^[^\x00]*$"


QualityLimit = Annotated[float | None, Field(ge=0.0, le=1.0)]


def _split_face_ids(value: Any) -> Any:
    """A form sends face ids as one comma list ("3,5") or a repeated field (joined by the form reader)."""
    if isinstance(value, int) and not isinstance(value, bool):  # a form's single id, read as a number
        return [value]
    if isinstance(value, str):
        try:
            return [int(part) for part in value.split(",") if part.strip()]
        except ValueError:
            raise PydanticCustomError("face_ids", "face_ids must be integers") from None
    return value


# a face id as both galleries store it (larger ones would fail in the database)
FaceId = Annotated[Int, Field(ge=1, le=MAX_ROW_ID)]
FaceIds = Annotated[list[FaceId] | None, BeforeValidator(_split_face_ids)]


# --- embed ------------------------------------------------------------------------------------
class EmbedRequest(PhotoOptions):
    images: list[Base64Image] = Field(min_length=1, description="One or more aligned faces or photos.")
    model: str | None = Field(None, max_length=63, description="A served model's name (FACE_MODELS; also the `model` "
                              "query parameter); empty: the default model. Unknown: 404 `model_not_found`.")


class EmbedResponse(BaseModel):
    model_id: str = Field(description="name@version of the model that made the embeddings.")
    model: str | None = Field(None, description="The served name of that model.")
    dimension: int
    embeddings: list[list[float]] = Field(description="L2-normalised float32 vectors, in request order.")
    faces: list[FaceLocation | None] | None = Field(
        None, description="For photos: where each embedded face was found (parallel to `embeddings`; null for "
        "an aligned image). Absent when every image was aligned.")
    quality: list[FaceQuality] = Field(
        description="Each face's quality, parallel to `embeddings`, judged against the enrollment limits.")


# --- enroll -----------------------------------------------------------------------------------
class EnrollRequest(SingleFacePhotoOptions):
    identity_id: IdentityId
    images: list[Base64Image] | None = Field(None, min_length=1, description="Faces or photos (or `embeddings`).")
    embeddings: list[Embedding] | None = Field(None, min_length=1, description="Instead of `images`.")
    model_id: ModelId = None
    metadata: dict[str, Any] | None = Field(
        None, description="Free JSON stored with the identity (an object; at most FACE_MAX_METADATA_BYTES as "
        "UTF-8 JSON, nested at most FACE_MAX_METADATA_DEPTH deep, finite numbers). On an existing identity "
        "it replaces the old metadata."
    )
    replace: bool = Field(
        False,
        description="Existing identity: false (default) appends these faces to its faces; "
        "true atomically replaces all its faces with these.",
    )
    min_quality: QualityLimit = Field(
        None, description="Raise the quality score every face must reach (a lower value than "
        "FACE_ENROLL_MIN_QUALITY is ignored unless `force_quality`).")
    force_quality: bool = Field(
        False, description="Admin: lower the limit to `min_quality`, or with no `min_quality` skip the quality "
        "checks (score and parts) and store the faces whatever their quality.")


class PossibleDuplicate(BaseModel):
    identity_id: str = Field(description="An enrolled identity one of the new faces matches.")
    score: float
    face_id: int = Field(description="Its face that scored best.")


class EnrollResponse(BaseModel):
    identity_id: str
    created: bool = Field(description="True when the identity did not exist before.")
    face_ids: list[int] = Field(description="Ids of the faces just stored, in request order.")
    faces_replaced: int = Field(0, description="Faces removed because replace was true.")
    face_count: int = Field(description="The identity's faces after this request.")
    model_id: str
    faces: list[FaceLocation | None] | None = Field(
        None, description="For photos: the face enrolled from each image, in request order.")
    quality: list[FaceQuality] | None = Field(
        None, description="Each enrolled face's quality, in request order; null for client embeddings.")
    possible_duplicates: list[PossibleDuplicate] | None = Field(
        None, description="With FACE_ENROLL_DUPLICATE_POLICY=warn, for a new identity: the other identities its faces "
        "match at or above the collection's open-set threshold (null otherwise).")


# --- verify -----------------------------------------------------------------------------------
class VerifyRequest(SingleFacePhotoOptions):
    image_a: Base64Image | None = Field(None, description="The face to verify (or `embedding_a`).")
    image_b: Base64Image | None = Field(None, description="Face vs face: the second face.")
    embedding_a: Embedding | None = Field(None, description="Instead of `image_a` (then `embedding_b`, not `image_b`).")
    embedding_b: Embedding | None = Field(None, description="Instead of `image_b`.")
    model_id: ModelId = None
    identity_id: IdentityRef | None = Field(None, description="Face vs enrolled identity (instead of image_b).")
    threshold: Threshold = None


class VerifyResponse(BaseModel):
    similarity: float = Field(description="Cosine similarity; against an identity, the best over its faces.")
    threshold: float
    match: bool = Field(description="similarity >= threshold")
    model_id: str
    identity_id: str | None = None
    face_a: FaceLocation | None = Field(None, description="For a photo: where the compared face is.")
    face_b: FaceLocation | None = None


# --- identify ---------------------------------------------------------------------------------
MAX_AMONG = 1000  # identities one /identify may be limited to (each is read whole: its faces' vectors)


class IdentifyRequest(PhotoOptions):
    images: list[Base64Image] | None = Field(
        None, min_length=1, description="One or more probe faces or photos (with `multi_face: all`, every face of "
        "a photo is a probe), or `embeddings`.")
    embeddings: list[Embedding] | None = Field(None, min_length=1, description="Probe embeddings, instead of `images`.")
    model_id: ModelId = None
    top_k: Int = Field(5, ge=1, le=1000, description="Candidates returned per probe.")
    threshold: Threshold = None
    min_quality: QualityLimit = Field(
        None, description="Probes below this quality score (or outside a part's limits) are not "
        "searched: their result carries `error` `low_quality` instead of a guess.")
    face_ids: FaceIds = Field(
        None, min_length=1, description="Enrolled faces as probes, instead of `images`/`embeddings`: one result "
        "per face id, in order; the probe's own identity is never a candidate. Forms: repeated or comma-separated.")
    identity_id: IdentityRef | None = Field(
        None, description="An enrolled identity as the probe, instead of `images`/`embeddings`: one result; each "
        "candidate is scored by its best score over the identity's faces; the identity itself is never a candidate.")
    among: list[IdentityRef] | None = Field(
        None, min_length=1, max_length=MAX_AMONG, description="Identify among these enrolled identities only (an "
        "access list: \"is this one of the people allowed here?\"), with `images` or `embeddings`: every face of "
        "each is scored exactly, and the open-set threshold is the one for a gallery of just these identities "
        "(fewer chances to resemble someone: a lower threshold than the whole collection's). An id not enrolled: "
        "404 `identity_not_found` (details: `identity_ids`).")


class Candidate(BaseModel):
    identity_id: str
    score: float = Field(description="Best cosine similarity between the probe and the identity's faces.")
    face_id: int = Field(description="The enrolled face that scored best.")
    stranger_probability: float | None = Field(
        None, description="Estimated chance that a never-enrolled face scores at least this high against "
        "someone in a gallery of this size (from the impostor tail; null without one). Near 0: the match "
        "is unlikely to be chance; near `fpir_target`: at the threshold.")


class ProbeResult(BaseModel):
    image_index: int = Field(description="The request image this probe came from.")
    face: FaceLocation | None = Field(None, description="For photos: where the probe face is.")
    identity_id: str | None = Field(description="The best identity at or above the threshold; null = unknown.")
    known: bool
    score: float | None = Field(description="The best candidate's score, whether or not it passed.")
    candidates: list[Candidate] = Field(description="Top-k identities, best first, including those below the threshold.")
    quality: FaceQuality | None = Field(None, description="The probe's quality (null for client embeddings).")
    error: ErrorBody | None = Field(
        None, description="`low_quality` when the probe was refused by `min_quality` (then no candidates).")
    probe_face_id: int | None = Field(None, description="With `face_ids`: the enrolled face this result is for.")


class IdentifyResponse(BaseModel):
    results: list[ProbeResult]
    threshold: float
    threshold_source: str = Field(
        "fpir", description="request, setting (FACE_IDENTIFY_THRESHOLD), fpir (holds the collection's "
        "identify_fpir, else FACE_IDENTIFY_FPIR, for this gallery size), model (the contract's fixed one) or verify.")
    fpir_target: float | None = Field(None, description="With threshold_source fpir: the FPIR targeted.")
    fpir_estimated: float | None = Field(
        None, description="The FPIR the threshold used gives in this gallery, by the impostor tail.")
    gallery_identities: int
    gallery_faces: int | None = None
    model_id: str


# --- detect -----------------------------------------------------------------------------------
class DetectRequest(Strict):
    images: list[Base64Image] = Field(min_length=1, description="One or more photos.")
    return_crops: bool = Field(False, description="Also return each face aligned for the model, as base64 PNG.")
    model: str | None = Field(None, max_length=63, description="A served model's name (FACE_MODELS; also the `model` "
                              "query parameter); empty: the default model. Unknown: 404 `model_not_found`.")


class DetectedFaceOut(FaceLocation):
    crop: str | None = Field(None, description="With return_crops: the aligned face, base64 PNG.")
    quality: FaceQuality = Field(description="The face's quality, judged against the enrollment limits.")


class DetectedImage(BaseModel):
    width: int = Field(description="Of the upright photo.")
    height: int
    faces: list[DetectedFaceOut] = Field(description="Every face found, highest score first (may be empty).")


class DetectResponse(BaseModel):
    detector: str
    alignment: str
    model: str | None = Field(None, description="The served model whose alignment and quality were used.")
    model_id: str | None = None
    images: list[DetectedImage]


# --- identities -------------------------------------------------------------------------------
class IdentitySummary(BaseModel):
    identity_id: str
    metadata: dict[str, Any]
    face_count: int
    created_at: float
    updated_at: float


class StoredFace(BaseModel):
    face_id: int
    enrolled_at: float = Field(description="When the face was enrolled (Unix time; a migration keeps the source's).")
    expires_at: float | None = Field(None, description="When the collection's retention_days erases it (the sweep "
                                     "after this time); null: the collection has no retention.")


class IdentityDetail(IdentitySummary):
    face_ids: list[int]
    faces: list[StoredFace] = Field(default_factory=list, description="Its faces in face-id order (as face_ids), "
                                    "with when each was enrolled and will be erased.")


class IdentityPage(BaseModel):
    items: list[IdentitySummary]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


class DeleteResponse(BaseModel):
    identity_id: str
    deleted_faces: int


class IdentityUpdateRequest(Strict):
    """At least one field; `metadata` and `metadata_patch` not both."""

    identity_id: IdentityId | None = Field(
        None, description="A new id for the identity (rename): its faces keep their ids, vectors, enrollment times "
        "and kept crops; taken by another identity: 409 `identity_exists`.")
    metadata: dict[str, Any] | None = Field(
        None, description="Replaces the stored metadata (the limits of /enroll's `metadata`).")
    metadata_patch: dict[str, Any] | None = Field(
        None, description="An RFC 7396 JSON merge patch applied to the stored metadata, in the write's own "
        "transaction: a key set to null is removed, objects merge key by key, anything else replaces. The "
        "result must keep the limits of /enroll's `metadata`.", examples=[{"desk": 12, "badge": None}])
    expected_updated_at: float | None = Field(
        None, description="The identity's `updated_at` as you read it: the change is made only if no write has "
        "touched the identity since (else 409 `identity_changed`, nothing written), so an edit made from "
        "what you read cannot overwrite a change you did not see.")

    @model_validator(mode="after")
    def _one_change(self) -> IdentityUpdateRequest:
        if self.identity_id is None and self.metadata is None and self.metadata_patch is None:
            raise ValueError("give `identity_id`, `metadata` or `metadata_patch`")
        if self.metadata is not None and self.metadata_patch is not None:
            raise ValueError("give `metadata` (replace) or `metadata_patch` (merge), not both")
        return self


class MergeRequest(Strict):
    into: IdentityRef = Field(description="The identity that receives every face of the one in the path.")


class MergeResponse(BaseModel):
    identity_id: str = Field(description="The target: it now holds the merged faces.")
    merged_from: str = Field(description="The identity merged (deleted).")
    faces_moved: int
    face_count: int = Field(description="The target's faces right after the merge.")


class MoveFaceRequest(Strict):
    identity_id: IdentityId = Field(description="The identity the face moves to (created if not enrolled).")


class MoveFaceResponse(BaseModel):
    face_id: int
    from_identity: str
    to_identity: str
    target_created: bool
    source_deleted: bool = Field(description="The face was its identity's last: that identity was deleted.")


class FaceDeleteResponse(BaseModel):
    face_id: int
    identity_id: str
    identity_deleted: bool = Field(description="The face was its identity's last: the identity was deleted too.")


MAX_DELETE_FACES = 1000  # faces one POST /faces/delete erases (one transaction, an audit record each)


class FacesDeleteRequest(Strict):
    face_ids: list[FaceId] = Field(min_length=1, max_length=MAX_DELETE_FACES,
                                   description=f"The faces to erase (1-{MAX_DELETE_FACES}; a repeated id counts once).")


class FacesDeleteResponse(BaseModel):
    deleted: list[FaceDeleteResponse] = Field(description="The faces erased, by ascending face id; `identity_deleted`: "
                                              "its identity had no face left after this request and was deleted.")
    not_found: list[int] = Field(description="The ids asked for that are not faces of the collection (already "
                                 "deleted, or never enrolled): nothing to erase, not an error.")


# --- ops --------------------------------------------------------------------------------------
class ReadyStatus(BaseModel):
    """/readyz for a request without the API key when the service has one: the status alone."""

    status: str


class ModelStatus(BaseModel):
    model_id: str
    dim: int
    provider: str | None = Field(description="The execution provider it runs on first.")
    ready: bool
    default: bool
    impostor_tail_source: str | None = Field(None, description="Where its impostor tail comes from: `gallery` (this "
                                             "data dir's calibration of it, `python -m service calibrate --model "
                                             "NAME`), `model` (its contract), null (none).")
    quality_source: str | None = Field(None, description="Where its fitted face quality comes from: `gallery` (this "
                                       "data dir's refit of it), `model` (its contract), null (none: generic limits "
                                       "only).")


class ReadyResponse(BaseModel):
    status: str
    model_id: str
    model_path: str
    providers: list[str]
    embedding_size: int
    verify_threshold: float
    identify_threshold: float | None = Field(None, description="The default collection's 1:N threshold (an unscoped "
                                             "key only: a scoped one finds its collections' in `collections`).")
    identify_threshold_source: str | None = Field(None, description="As in /identify answers.")
    identify_fpir: float | None = Field(None, description="The FPIR the identify threshold targets (source fpir).")
    impostor_tail: dict | None = Field(
        None, description="The impostor tail in use: `gallery` (python -m service calibrate) or `model` "
        "(the contract's), what it was measured on, over how many pairs, the smallest FAR it measured, and "
        "whether the current threshold lies beyond it (extrapolated); null: none.")
    quality: dict = Field(
        description="Face quality in force: `fitted` (the model ships a fitted quality), the enrollment "
        "`min_score` and each part's limits, and a `note` when only part limits hold.")
    inference_ms: float = Field(
        description="Latency of the real inference of the last check (re-run at most once per FACE_READYZ_CACHE_MS).")
    gallery: dict[str, int] | None = Field(None, description="Totals over every collection (an unscoped key only).")
    default_model: str | None = Field(None, description="The default model's served name.")
    models: dict[str, ModelStatus] = Field(
        default_factory=dict, description="Every served model by name (FACE_MODELS; one model: `default`).")
    collections: dict[str, CollectionThreshold] = Field(
        default_factory=dict, description="Each collection the key may see: its size and its own open-set "
        "threshold (it follows that collection's size; `identify_threshold` above is the default collection's).")


# --- collections, keys, audit -------------------------------------------------------------------

class CollectionThreshold(BaseModel):
    identities: int
    faces: int
    identify_threshold: float = Field(description="The 1:N threshold in force for this collection's size now.")
    damaged: bool = Field(False, description="Its stored data cannot be read (GET /collections: `damaged`).")


MAX_RETENTION_DAYS = 36_500.0
RETENTION_DAYS = ("Each face of the collection is erased this many days after it was enrolled (fractions allowed), "
                  "with its kept crop and, with its last face, its identity; audited (`face.deleted`, `via: "
                  "retention`). Null: kept until deleted.")


MAX_FACES = ("The most faces the collection may hold: an enroll (or import) that would leave it more is refused "
             "whole, 413 `too_many_faces_for_collection`, counted inside the write (concurrent enrolls on every "
             "replica cannot overshoot it); one that adds no net face never is. Null: no limit.")
IDENTIFY_FPIR = ("The collection's own target false-positive identification rate (the share of never-enrolled "
                 "faces /identify may name as someone), over FACE_IDENTIFY_FPIR and a fixed FACE_IDENTIFY_THRESHOLD "
                 "alike; its threshold follows from it and the collection's size. Null: the service's.")


class CollectionCreate(StrictFinite):
    name: str = Field(description="Lower-case letters, digits, `-` and `_`, 1-63 characters, starting with a letter "
                      "or digit.", examples=["front-desk"])
    keep_crops: bool = Field(False, description="Keep the aligned crop of every face enrolled from an image, "
                             "encrypted with FACE_CROP_KEY_FILE, so the collection can be re-embedded by another "
                             "model later. Enrolling embeddings into it is then refused (409 `crops_required`).")
    model: str | None = Field(None, max_length=63, description="The served model (FACE_MODELS) the collection is "
                              "pinned to: it embeds every face and probe of it. Empty: the default model. Unknown: "
                              "404 `model_not_found`.")
    retention_days: float | None = Field(None, gt=0, le=MAX_RETENTION_DAYS, description=RETENTION_DAYS)
    max_faces: Int | None = Field(None, ge=1, le=MAX_ROW_ID, description=MAX_FACES)
    identify_fpir: float | None = Field(None, gt=0, lt=1, description=IDENTIFY_FPIR)


class CollectionUpdate(StrictFinite):
    """The settings to change (at least one); those not given stay as they are; null: the default."""

    retention_days: float | None = Field(None, description=RETENTION_DAYS + " Shortened, the faces already past "
                                         "it are erased by the next sweep; null: kept from now on.",
                                         gt=0, le=MAX_RETENTION_DAYS)
    max_faces: Int | None = Field(None, ge=1, le=MAX_ROW_ID, description=MAX_FACES + " Lowered under the faces it "
                                  "holds: nothing is erased, only writes that add faces are refused.")
    identify_fpir: float | None = Field(None, gt=0, lt=1, description=IDENTIFY_FPIR)

    @model_validator(mode="after")
    def _one_setting(self) -> CollectionUpdate:
        if not self.model_fields_set:
            raise ValueError("give at least one of `retention_days`, `max_faces`, `identify_fpir`")
        return self

    def changes(self) -> dict[str, Any]:
        """The settings the body names (null included: back to the default)."""
        return {name: getattr(self, name) for name in self.model_fields_set}


class CollectionOut(BaseModel):
    name: str
    model_id: str
    model: str | None = Field(None, description="The served name of the collection's model (null: not served here).")
    dim: int = Field(0, description="The embedding size of the collection's model.")
    created_at: float
    identities: int
    faces: int
    identify_threshold: float = Field(description="The 1:N threshold in force for this collection's size now.")
    keep_crops: bool = Field(False, description="Whether faces enrolled into it keep their aligned crop (encrypted).")
    retention_days: float | None = Field(None, description="Each face is erased this many days after its "
                                         "enrollment (null: kept until deleted).")
    max_faces: int | None = Field(None, description="The most faces it may hold (null: no limit).")
    identify_fpir: float | None = Field(None, description="Its own target FPIR for /identify (null: the service's, "
                                        "FACE_IDENTIFY_FPIR); `identify_threshold` is the threshold it gives now.")
    damaged: bool = Field(False, description="Its stored data cannot be read (an embedded store file that is "
                          "damaged): its requests are answered 503 `collection_damaged` until the operator restores "
                          "it from a backup or deletes it; `identities` and `faces` are 0, not known. PostgreSQL: "
                          "always false (damage is found by the reads it breaks).")


class CollectionList(BaseModel):
    items: list[CollectionOut]


class CollectionDeleted(BaseModel):
    name: str
    deleted_identities: int
    deleted_faces: int


class KeyCreate(StrictFinite):
    role: Literal["admin", "write", "read", "embed"]
    collections: list[str] | None = Field(None, max_length=1000,
                                          description="The collections the key may touch (at most 1000); null: all.")
    note: str | None = Field(None, max_length=500)
    expires_at: float | None = Field(None, description="Unix time (seconds) after which the key is refused; "
                                     "null: never. A time already past: 422 `invalid_request`.")
    rate_limit_rps: float | None = Field(None, ge=MIN_RATE, le=MAX_RATE, description="This key's requests per "
                                         "second (else FACE_RATE_LIMIT_RPS).")
    rate_limit_faces_per_s: float | None = Field(None, ge=MIN_RATE, le=MAX_RATE, description="This key's faces per "
                                                 "second (else FACE_RATE_LIMIT_FACES_PER_S).")


class KeyOut(BaseModel):
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


class KeyCreated(KeyOut):
    secret: str = Field(description="The key itself: shown this once, never stored (only its hash is).")


class KeyList(BaseModel):
    items: list[KeyOut]


class KeyRevoked(BaseModel):
    key_id: str
    revoked_at: float


class AuditOut(BaseModel):
    entry_id: str
    at: float
    action: str
    key_id: str | None
    client: str | None
    request_id: str | None
    collection: str | None
    identity_id: str | None
    details: dict


class AuditPage(BaseModel):
    items: list[AuditOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next (older) page; null: no more.")


class WhoAmI(BaseModel):
    key_id: str | None
    role: str
    collections: list[str] | None
    open_mode: bool


class AliasSet(StrictFinite):
    collection: str = Field(max_length=200, description="The collection the alias points to (a collection, not "
                            "another alias).", examples=["faces-v2"])


class AliasOut(BaseModel):
    alias: str
    collection: str = Field(description="The collection the alias points to now.")
    updated_at: float = Field(description="When it was last set (created or re-pointed), unix time.")


class AliasList(BaseModel):
    items: list[AliasOut]
# --- gallery hygiene: duplicates, outliers, the enroll guard -------------------------------------
class DuplicateEvidence(BaseModel):
    face_a: int = Field(description="A face of identity_a.")
    face_b: int = Field(description="A face of identity_b.")
    score: float


class DuplicatePairOut(BaseModel):
    identity_a: str = Field(description="identity_a < identity_b.")
    identity_b: str
    score: float = Field(description="The best face-pair score between the two identities.")
    false_alarm_probability: float | None = Field(
        description="Estimated chance that some pair of two different people scores this high in a scan of "
        "this many comparisons (family-wise, from the impostor tail); null without a tail.")
    evidence: list[DuplicateEvidence] = Field(description="The best face pairs, best first.")


class DuplicatesResponse(BaseModel):
    pairs: list[DuplicatePairOut] = Field(description="Best first.")
    min_score: float = Field(description="Pairs scoring at least this are listed.")
    max_false_alarm: float | None = Field(description="The family-wise target min_score was chosen for (null: "
                                          "min_score was given).")
    comparisons: int = Field(description="Face x identity comparisons made (each face against every other identity).")
    family_comparisons: float = Field(description="Independent face-pair chances the false-alarm estimate counts.")
    faces_scanned: int
    elapsed_ms: float
    model_id: str


class DuplicatesJobRequest(StrictFinite):
    """The scan ``GET /duplicates`` runs, as a job (the same parameters and defaults)."""

    min_score: float | None = Field(None, ge=-1.0, le=1.0, description="List pairs whose best face pair scores "
                                    "at least this (instead of max_false_alarm).")
    max_false_alarm: float | None = Field(None, gt=0.0, lt=1.0, description="Without min_score: list pairs from the "
                                          "score at which the family-wise false-alarm probability of the scan is "
                                          "this (default FACE_DUPLICATES_MAX_FALSE_ALARM).")
    limit: Int = Field(100, ge=1, le=1000, description="At most this many pairs.")
    evidence: Int = Field(3, ge=1, le=20, description="Face pairs shown per identity pair.")


class OutliersJobRequest(StrictFinite):
    """The scan ``GET /outliers`` runs, as a job (the same parameters and defaults)."""

    min_score: float | None = Field(None, ge=-1.0, le=1.0, description="A face whose best score against its "
                                    "identity's other faces is below this is listed (default: the 1:1 verify "
                                    "threshold in force).")
    limit: Int = Field(100, ge=1, le=1000, description="At most this many faces.")


class BestOtherOut(BaseModel):
    identity_id: str
    score: float
    face_id: int


class OutlierOut(BaseModel):
    identity_id: str
    face_id: int
    own_score: float = Field(description="Best cosine to the identity's other faces.")
    best_other: BestOtherOut | None = Field(
        description="The other identity the face matches best at or above the threshold; null: none does.")


class OutliersResponse(BaseModel):
    faces: list[OutlierOut] = Field(description="Worst own_score first.")
    threshold: float
    identities_checked: int = Field(description="Identities with 2+ faces (one face alone cannot be judged).")
    faces_scanned: int = Field(0, description="Every face of the collection read by the scan.")
    model_id: str


ReadyResponse.model_rebuild()


# --- cluster ----------------------------------------------------------------------------------
class ClusterRequest(ImageOptions):
    images: list[Base64Image] | None = Field(
        None, min_length=1, description="Photos or aligned faces (or `embeddings`); with `multi_face: all` "
        "(the default here) every face of a photo is clustered.")
    embeddings: list[Embedding] | None = Field(None, min_length=1, description="Instead of `images`.")
    model_id: ModelId = None
    multi_face: MultiFace = "all"
    threshold: Threshold = Field(
        None, description="Average-linkage cosine; omit for the default: the cosine that two faces of different people "
        "reach with probability 1e-5 by the impostor tail (never below the 1:1 threshold).")
    model: str | None = Field(None, max_length=63, description="A served model's name (FACE_MODELS; also the `model` "
                              "query parameter) that embeds the faces and whose impostor tail (its calibration, else "
                              "its contract's) sets the default threshold; empty: the default model. Unknown: 404 "
                              "`model_not_found`.")


class ClusterFace(BaseModel):
    image_index: int = Field(description="The request image (or embedding) the face came from.")
    face: FaceLocation | None = Field(None, description="For photos: where the face is; null for an aligned image "
                                      "or an embedding.")
    face_index: int = Field(description="The face's position among all faces of the request (0-based).")


class Cluster(BaseModel):
    cluster_id: int = Field(description="0-based; biggest cluster first, singletons last.")
    size: int
    faces: list[ClusterFace]


class ClusterResponse(BaseModel):
    clusters: list[Cluster] = Field(description="Biggest first; a face alone is a cluster of size 1 (at the end).")
    threshold: float = Field(description="The average-linkage cosine used.")
    method: str = Field(description="The clustering method (`average-linkage-knn`).")
    faces: int = Field(description="Faces clustered.")
    model: str | None = Field(None, description="The served name of the model that embedded (or whose embeddings "
                              "were given).")
    model_id: str


# --- jobs (service/jobs): migrating a collection to another model ---------------------------------
class MigrateRequest(StrictFinite):
    model: str = Field(max_length=63, description="The served model (FACE_MODELS name) that re-embeds the faces. "
                       "Unknown: 404 `model_not_found`.", examples=["new"])
    into: str = Field(max_length=63, description="The new collection, created pinned to `model` with "
                      "`keep_crops: true`. Taken (a collection or an alias): 409 `collection_exists`.",
                      examples=["people-v2"])
    batch_size: Int = Field(64, ge=1, le=256, description="Crops per model call; several identities share one.")
    shadow: bool = Field(False, description="Once done, run each /identify on the source also on the new "
                         "collection, off the request path, and count the agreement on /metrics.")


class JobProgress(BaseModel):
    phase: str = Field(description="A migration: `copy`, `catch_up` (writes to the source made meanwhile), `compare`, "
                       "`done`; a scan: `scan`, `done`.")
    identities_done: int
    identities_total: int
    faces_done: int
    faces_total: int
    faces_per_s: float | None = Field(None, description="Faces re-embedded per second by this run so far.")
    fenced_s: float | None = Field(None, description="Once done: seconds the last pass held writes to the source "
                                   "(its write fence).")
    fence_wait_s: float | None = Field(None, description="Once done: seconds the job waited for writes in flight "
                                       "before it held the fence.")
    fenced_synced: int | None = Field(None, description="Once done: identities the fenced pass synced or deleted.")
    fenced_mode: str | None = Field(None, description="Once done: `changes` (the fenced pass synced what the "
                                    "source's audit log names since the last full pass: writes wait O(writes)) or "
                                    "`full` (it listed both collections: a resumed job, or very many writes).")


class JobError(BaseModel):
    code: str
    message: str


class CollectionRank(BaseModel):
    collection: str
    model_id: str
    identities: int
    faces: int
    probes: int = Field(description="Probe faces searched: faces of identities with two or more (or a seeded sample).")
    rank1: float | None = Field(description="Leave-one-face-out rank-1: share of probes whose best other face is "
                                "their own identity's. null: no probe.")


class ChangedProbe(BaseModel):
    identity_id: str
    source_top1: str | None
    target_top1: str | None
    source_score: float | None
    target_score: float | None
    source_face_id: int
    target_face_id: int


class ComparisonReport(BaseModel):
    """service/jobs/compare.py's report of a migration (README, Comparing a migration)."""

    source: CollectionRank
    target: CollectionRank
    paired_probes: int
    unpaired_identities: int = Field(description="Identities left out: face counts differ, or one side lacks them.")
    top1_agreement: float | None = Field(description="Share of paired probes whose top-1 identity is the same.")
    changed_count: int
    identities_changed: int
    changed: list[ChangedProbe] = Field(description="Up to 100 paired probes whose top-1 differs.")
    sampled: bool
    max_probes: int
    seed: int
    seconds: float


class Job(BaseModel):
    id: str = Field(examples=["job_3f2a9c1b7d04"])
    kind: str = Field(description="`migrate`, or a scan: `duplicates` (POST .../duplicates/jobs) or `outliers` "
                      "(POST .../outliers/jobs).")
    state: str = Field(description="`queued`, `running`, `done`, `failed` or `cancelled`.")
    collection: str = Field(description="The source collection (an alias given at start is resolved).")
    into: str = Field(description="The new collection (empty for a scan).")
    model: str = Field(description="The served name of the new collection's model.")
    model_id: str
    source_model_id: str
    shadow: bool
    progress: JobProgress
    created_at: float
    updated_at: float
    finished_at: float | None = None
    started_by: str | None = Field(None, description="The key id that started it (None: open mode, the CLI).")
    error: JobError | None = None
    report: ComparisonReport | None = Field(None, description="The comparison of the two collections (rank-1, "
                                            "top-1 agreement, changed identities), once the job is done.")
    duplicates: DuplicatesResponse | None = Field(None, description="A `duplicates` scan's answer, once the job is "
                                                  "done: what GET /duplicates answers.")
    outliers: OutliersResponse | None = Field(None, description="An `outliers` scan's answer, once the job is done: "
                                              "what GET /outliers answers.")


class JobCreated(BaseModel):
    job: Job


class JobList(BaseModel):
    items: list[Job]
