"""Request and response models: the OpenAPI reference is generated from these."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

Base64Image = Annotated[
    str,
    Field(description="An aligned 112x112 face (JPEG, PNG, WebP or BMP), base64-encoded; a data URL is accepted."),
]
IdentityId = Annotated[
    str,
    Field(min_length=1, max_length=128, pattern=r"^[^/\x00-\x1f\x7f]+$",
          description="Your identifier for a person: 1-128 characters, no '/' or control characters.",
          examples=["employee-4711"]),
]
Threshold = Annotated[float | None, Field(ge=-1.0, le=1.0, description="Cosine threshold; omit for the default.")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- embed ------------------------------------------------------------------------------------
class EmbedRequest(Strict):
    images: list[Base64Image] = Field(min_length=1, description="One or more aligned faces.")


class EmbedResponse(BaseModel):
    model_id: str = Field(description="name@version of the model that made the embeddings.")
    dimension: int
    embeddings: list[list[float]] = Field(description="L2-normalised float32 vectors, in request order.")


# --- enroll -----------------------------------------------------------------------------------
class EnrollRequest(Strict):
    identity_id: IdentityId
    images: list[Base64Image] = Field(min_length=1)
    metadata: dict[str, Any] | None = Field(
        None, description="Free JSON stored with the identity. On an existing identity it replaces the old metadata."
    )
    replace: bool = Field(
        False,
        description="Existing identity: false (default) appends these faces to its faces; "
        "true atomically replaces all its faces with these.",
    )


class EnrollResponse(BaseModel):
    identity_id: str
    created: bool = Field(description="True when the identity did not exist before.")
    face_ids: list[int] = Field(description="Ids of the faces just stored, in request order.")
    faces_replaced: int = Field(0, description="Faces removed because replace was true.")
    face_count: int = Field(description="The identity's faces after this request.")
    model_id: str


# --- verify -----------------------------------------------------------------------------------
class VerifyRequest(Strict):
    image_a: Base64Image
    image_b: Base64Image | None = Field(None, description="Face vs face: the second face.")
    identity_id: IdentityId | None = Field(None, description="Face vs enrolled identity (instead of image_b).")
    threshold: Threshold = None


class VerifyResponse(BaseModel):
    similarity: float = Field(description="Cosine similarity; against an identity, the best over its faces.")
    threshold: float
    match: bool = Field(description="similarity >= threshold")
    model_id: str
    identity_id: str | None = None


# --- identify ---------------------------------------------------------------------------------
class IdentifyRequest(Strict):
    images: list[Base64Image] = Field(min_length=1, description="One or more probe faces.")
    top_k: int = Field(5, ge=1, le=1000, description="Candidates returned per probe.")
    threshold: Threshold = None


class Candidate(BaseModel):
    identity_id: str
    score: float = Field(description="Best cosine similarity between the probe and the identity's faces.")
    face_id: int = Field(description="The enrolled face that scored best.")


class ProbeResult(BaseModel):
    identity_id: str | None = Field(description="The best identity at or above the threshold; null = unknown.")
    known: bool
    score: float | None = Field(description="The best candidate's score, whether or not it passed.")
    candidates: list[Candidate] = Field(description="Top-k identities, best first, including those below the threshold.")


class IdentifyResponse(BaseModel):
    results: list[ProbeResult]
    threshold: float
    gallery_identities: int
    model_id: str


# --- identities -------------------------------------------------------------------------------
class IdentitySummary(BaseModel):
    identity_id: str
    metadata: dict[str, Any]
    face_count: int
    created_at: float
    updated_at: float


class IdentityDetail(IdentitySummary):
    face_ids: list[int]


class IdentityPage(BaseModel):
    items: list[IdentitySummary]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


class DeleteResponse(BaseModel):
    identity_id: str
    deleted_faces: int


# --- ops --------------------------------------------------------------------------------------
class ErrorBody(BaseModel):
    code: str
    message: str
    details: dict[str, Any] | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class ReadyResponse(BaseModel):
    status: str
    model_id: str
    model_path: str
    providers: list[str]
    embedding_size: int
    verify_threshold: float
    identify_threshold: float
    inference_ms: float = Field(description="Latency of the real inference this check just ran.")
    gallery: dict[str, int]
