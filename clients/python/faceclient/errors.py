"""The client's exceptions: one class per family of the service's error codes (service/errors.py)."""

from __future__ import annotations

from typing import Any


class FaceClientError(Exception):
    """Anything the client raises on purpose."""


class FaceConnectionError(FaceClientError):
    """The server could not be reached (refused, DNS, timeout before an answer)."""


class IncompatibleServerError(FaceClientError):
    """The server's /healthz answered 200 with another major version than the client's, or with no version
    (not JSON, not the service's: another web server at the URL). An error answer of /healthz raises its
    own FaceServiceError instead."""

    def __init__(self, message: str, server_version: str | None, client_version: str) -> None:
        super().__init__(message)
        self.server_version = server_version
        self.client_version = client_version


class FaceServiceError(FaceClientError):
    """An error answer of the service: ``{"error": {"code", "message", "details"}}``, its HTTP status and
    the request id (X-Request-ID) to find it in the server's log and audit trail."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None,
                 request_id: str | None = None, status: int = 0, retry_after: float | None = None) -> None:
        super().__init__(f"{code}: {message}" + (f" (request {request_id})" if request_id else ""))
        self.code = code
        self.message = message
        self.details = details or {}
        self.request_id = request_id
        self.status = status
        self.retry_after = retry_after


class AuthError(FaceServiceError):
    """401/403: no key, a wrong key, or a key without the permission or collection."""


class NotFoundError(FaceServiceError):
    """404: no such identity, collection, face, key or route; or no kept crop of the face (crop_not_kept)."""


class ConflictError(FaceServiceError):
    """409: the collection (or an alias) has the name, it is protected, or aliases point to it or live keys
    are scoped to it (collection_in_use); a rename's new identity id is another enrolled identity
    (identity_exists)."""


class BadRequestError(FaceServiceError):
    """4xx: the request itself is wrong (shape, image, embedding, id, metadata); retrying will not help."""


class RateLimitedError(FaceServiceError):
    """429: over the key's (or the address's) rate; retried by the client up to its budget."""


class UnavailableError(FaceServiceError):
    """503/504/507: overloaded, loading, database down, inference timeout, storage full; 503s are retried by the
    client (a full disk, 507, is not: it waits for an operator). ``write_outcome_unknown`` (503) is never
    retried: the database connection failed while the write was committed, so it may or may not be stored;
    read it back (get_identity, get_collection, list_keys) before sending it again."""


class ServerError(FaceServiceError):
    """500: a bug on the server (internal_error)."""


# every code of service/errors.py ErrorCode (tests/clients check that none is missing)
_FAMILIES: dict[type[FaceServiceError], tuple[str, ...]] = {
    BadRequestError: (
        "invalid_request", "malformed_json", "payload_too_large", "headers_too_large", "too_many_faces", "no_images", "invalid_base64",
        "unsupported_media_type", "empty_image", "image_too_large", "not_an_image", "truncated_image",
        "wrong_image_size", "alpha_channel", "unsupported_color_mode", "no_face", "low_quality",
        "photo_not_supported", "model_mismatch", "wrong_dimension", "invalid_embedding", "invalid_identity_id",
        "invalid_metadata", "metadata_too_large", "too_many_faces_for_identity", "too_many_faces_for_collection",
        "implausible_face",
        "same_identity",
        "invalid_collection_name", "host_not_allowed", "method_not_allowed"),
    NotFoundError: ("identity_not_found", "collection_not_found", "key_not_found", "alias_not_found", "not_found",
                    "face_not_found", "model_not_found", "job_not_found", "crop_not_kept"),
    ConflictError: ("collection_exists", "collection_protected", "collection_in_use", "crops_required",
                    "crop_key_missing", "possible_duplicate", "no_source_crops", "job_running", "job_finished",
                    "identity_exists", "identity_changed", "migration_unfinished"),
    AuthError: ("unauthorized", "forbidden", "cross_origin_refused"),
    RateLimitedError: ("rate_limited",),
    UnavailableError: ("gallery_loading", "gallery_unavailable", "model_not_ready", "overloaded",
                       "inference_timeout", "database_unavailable", "write_outcome_unknown", "storage_full",
                       "collection_damaged", "catalog_damaged"),
    ServerError: ("internal_error",),
}
# the codes that refuse one image for itself (its ``details.index`` says which): enroll_folder skips that file
IMAGE_CODES = frozenset({
    "invalid_base64", "empty_image", "image_too_large", "not_an_image", "truncated_image", "wrong_image_size",
    "alpha_channel", "unsupported_color_mode", "no_face", "low_quality", "photo_not_supported", "implausible_face"})
ERROR_CLASSES: dict[str, type[FaceServiceError]] = {code: cls for cls, codes in _FAMILIES.items() for code in codes}


def class_for(code: str, status: int) -> type[FaceServiceError]:
    """The class of an error answer: by its code, or (a code this client does not know) by its status."""
    if code in ERROR_CLASSES:
        return ERROR_CLASSES[code]
    if status in (401, 403):
        return AuthError
    if status == 404:
        return NotFoundError
    if status == 409:
        return ConflictError
    if status == 429:
        return RateLimitedError
    if status in (503, 504, 507):
        return UnavailableError
    if 400 <= status < 500:
        return BadRequestError
    return ServerError if status >= 500 else FaceServiceError
