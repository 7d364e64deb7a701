"""Error codes and their HTTP statuses, in one place.

Every error the API returns has the body ``{"error": {"code": ..., "message": ..., "details": ...}}``;
``code`` is stable and machine-readable, ``message`` is for people.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Any


class ErrorCode(str, Enum):
    # request shape
    invalid_request = "invalid_request"
    malformed_json = "malformed_json"
    payload_too_large = "payload_too_large"
    headers_too_large = "headers_too_large"
    too_many_faces = "too_many_faces"
    no_images = "no_images"
    invalid_base64 = "invalid_base64"
    unsupported_media_type = "unsupported_media_type"
    # images
    empty_image = "empty_image"
    image_too_large = "image_too_large"
    not_an_image = "not_an_image"
    truncated_image = "truncated_image"
    wrong_image_size = "wrong_image_size"
    alpha_channel = "alpha_channel"
    unsupported_color_mode = "unsupported_color_mode"
    no_face = "no_face"
    low_quality = "low_quality"
    photo_not_supported = "photo_not_supported"
    # embeddings given instead of images
    model_mismatch = "model_mismatch"
    wrong_dimension = "wrong_dimension"
    invalid_embedding = "invalid_embedding"
    # models
    model_not_found = "model_not_found"
    # gallery
    identity_not_found = "identity_not_found"
    invalid_identity_id = "invalid_identity_id"
    gallery_loading = "gallery_loading"
    gallery_unavailable = "gallery_unavailable"
    invalid_metadata = "invalid_metadata"
    metadata_too_large = "metadata_too_large"
    too_many_faces_for_identity = "too_many_faces_for_identity"
    too_many_faces_for_collection = "too_many_faces_for_collection"
    implausible_face = "implausible_face"
    face_not_found = "face_not_found"
    same_identity = "same_identity"
    identity_exists = "identity_exists"
    identity_changed = "identity_changed"
    possible_duplicate = "possible_duplicate"
    # collections
    collection_not_found = "collection_not_found"
    collection_exists = "collection_exists"
    collection_protected = "collection_protected"
    invalid_collection_name = "invalid_collection_name"
    collection_in_use = "collection_in_use"
    alias_not_found = "alias_not_found"
    # jobs (migrating a collection to another model)
    no_source_crops = "no_source_crops"
    job_running = "job_running"
    job_not_found = "job_not_found"
    job_finished = "job_finished"
    migration_unfinished = "migration_unfinished"
    # kept crops (keep_crops collections)
    crops_required = "crops_required"
    crop_key_missing = "crop_key_missing"
    crop_not_kept = "crop_not_kept"
    # keys, roles, limits
    unauthorized = "unauthorized"
    forbidden = "forbidden"
    key_not_found = "key_not_found"
    rate_limited = "rate_limited"
    # server
    host_not_allowed = "host_not_allowed"
    cross_origin_refused = "cross_origin_refused"
    not_found = "not_found"
    method_not_allowed = "method_not_allowed"
    model_not_ready = "model_not_ready"
    overloaded = "overloaded"
    inference_timeout = "inference_timeout"
    database_unavailable = "database_unavailable"
    write_outcome_unknown = "write_outcome_unknown"
    storage_full = "storage_full"
    collection_damaged = "collection_damaged"
    catalog_damaged = "catalog_damaged"
    internal_error = "internal_error"


STATUS: dict[ErrorCode, int] = {
    ErrorCode.invalid_request: 422,
    ErrorCode.malformed_json: 400,
    ErrorCode.payload_too_large: 413,
    ErrorCode.headers_too_large: 431,
    ErrorCode.too_many_faces: 413,
    ErrorCode.no_images: 422,
    ErrorCode.invalid_base64: 422,
    ErrorCode.unsupported_media_type: 415,
    ErrorCode.empty_image: 422,
    ErrorCode.image_too_large: 413,
    ErrorCode.not_an_image: 422,
    ErrorCode.truncated_image: 422,
    ErrorCode.wrong_image_size: 422,
    ErrorCode.alpha_channel: 422,
    ErrorCode.unsupported_color_mode: 422,
    ErrorCode.no_face: 422,
    ErrorCode.low_quality: 422,
    ErrorCode.photo_not_supported: 422,
    ErrorCode.model_mismatch: 422,
    ErrorCode.wrong_dimension: 422,
    ErrorCode.invalid_embedding: 422,
    ErrorCode.model_not_found: 404,
    ErrorCode.identity_not_found: 404,
    ErrorCode.invalid_identity_id: 422,
    ErrorCode.gallery_loading: 503,
    ErrorCode.gallery_unavailable: 503,
    ErrorCode.invalid_metadata: 422,
    ErrorCode.metadata_too_large: 413,
    ErrorCode.too_many_faces_for_identity: 413,
    ErrorCode.too_many_faces_for_collection: 413,
    ErrorCode.implausible_face: 422,
    ErrorCode.face_not_found: 404,
    ErrorCode.same_identity: 422,
    ErrorCode.identity_exists: 409,
    ErrorCode.identity_changed: 409,
    ErrorCode.possible_duplicate: 409,
    ErrorCode.collection_not_found: 404,
    ErrorCode.collection_exists: 409,
    ErrorCode.collection_protected: 409,
    ErrorCode.invalid_collection_name: 422,
    ErrorCode.collection_in_use: 409,
    ErrorCode.alias_not_found: 404,
    ErrorCode.no_source_crops: 409,
    ErrorCode.job_running: 409,
    ErrorCode.job_not_found: 404,
    ErrorCode.job_finished: 409,
    ErrorCode.migration_unfinished: 409,
    ErrorCode.crops_required: 409,
    ErrorCode.crop_key_missing: 409,
    ErrorCode.crop_not_kept: 404,
    ErrorCode.unauthorized: 401,
    ErrorCode.forbidden: 403,
    ErrorCode.key_not_found: 404,
    ErrorCode.rate_limited: 429,
    ErrorCode.host_not_allowed: 421,
    ErrorCode.cross_origin_refused: 403,
    ErrorCode.not_found: 404,
    ErrorCode.method_not_allowed: 405,
    ErrorCode.model_not_ready: 503,
    ErrorCode.overloaded: 503,
    ErrorCode.inference_timeout: 504,
    ErrorCode.database_unavailable: 503,
    ErrorCode.write_outcome_unknown: 503,
    ErrorCode.storage_full: 507,
    ErrorCode.collection_damaged: 503,
    ErrorCode.catalog_damaged: 503,
    ErrorCode.internal_error: 500,
}


# seconds a client should wait before retrying (the Retry-After header of these errors); never for
# write_outcome_unknown: a blind retry of a write that may have been stored can store it twice
RETRY_AFTER_S: dict[ErrorCode, int] = {ErrorCode.overloaded: 1}
# errors answered before the request's body was read whole: the connection is closed after them
# (Connection: close), not left waiting for the rest of a body nobody reads; what still comes meanwhile is
# read and dropped, within bounds, before the close (http/connections.py: a close with data unread resets
# the connection, and its client could miss the answer)
CLOSE_CONNECTION = frozenset({ErrorCode.payload_too_large, ErrorCode.headers_too_large})


class ServiceError(Exception):
    """An error with a stable code; the API turns it into a JSON error response."""

    def __init__(self, code: ErrorCode, message: str, retry_after_s: float | None = None, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details
        self.retry_after_s = retry_after_s  # overrides RETRY_AFTER_S (a rate limit knows when)

    @property
    def status(self) -> int:
        return STATUS[self.code]

    @property
    def headers(self) -> dict[str, str]:
        if self.code in CLOSE_CONNECTION:
            return {"Connection": "close"}
        if self.retry_after_s is not None:
            return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}
        retry_after = RETRY_AFTER_S.get(self.code)
        return {} if retry_after is None else {"Retry-After": str(retry_after)}

    def body(self) -> dict:
        error: dict[str, Any] = {"code": self.code.value, "message": self.message}
        if self.details:
            error["details"] = self.details
        return {"error": error}
