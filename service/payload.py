"""Request bodies in either form the API accepts: JSON with base64 images, or multipart uploads.

Both end in the same place: a validated pydantic model plus the raw bytes of each image field, so
routes never care how the images arrived.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from .errors import ErrorCode, ServiceError
from .images import decode_base64

T = TypeVar("T", bound=BaseModel)

_PLACEHOLDER = "multipart"  # stands in for uploaded files while the rest of the form is validated


def _validation_error(exc: ValidationError) -> ServiceError:
    errors = [
        {"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]}
        for e in exc.errors(include_url=False, include_input=False)
    ]
    return ServiceError(ErrorCode.invalid_request, "the request body is not valid: " + errors[0]["message"]
                        + f" ({errors[0]['field']})", errors=errors)


async def read_payload(
    request: Request, model: type[T], list_fields: tuple[str, ...], single_fields: tuple[str, ...] = (),
    max_images: int = 64,
) -> tuple[T, dict[str, list[bytes]]]:
    """Parse and validate a body; returns the model and {image field: [bytes, ...]}."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    images: dict[str, list[bytes]] = {}
    if content_type == "multipart/form-data":
        data, images = await _read_multipart(request, model, list_fields, single_fields, max_images)
        try:
            payload = model.model_validate(data)
        except ValidationError as exc:
            raise _validation_error(exc) from exc
        return payload, images
    if content_type not in ("application/json", ""):
        raise ServiceError(
            ErrorCode.unsupported_media_type,
            f"content type {content_type!r} is not accepted; send application/json or multipart/form-data",
        )
    body = await request.body()
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ServiceError(ErrorCode.malformed_json, f"the body is not valid JSON: {exc}") from exc
    if isinstance(data, dict):
        count = sum(len(v) if isinstance(v, list) else 0 for k, v in data.items() if k in list_fields)
        _check_count(count, max_images)  # before validation: do not walk a huge list twice
    try:
        payload = model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from exc
    index = 0
    for field in list_fields + single_fields:
        value = getattr(payload, field)
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        images[field] = []
        for text in values:
            images[field].append(decode_base64(text, index))
            index += 1
    return payload, images


def _check_count(count: int, max_images: int) -> None:
    if count > max_images:
        raise ServiceError(
            ErrorCode.too_many_faces, f"{count} images in one request; the limit is {max_images}", limit=max_images
        )


async def _read_multipart(request, model, list_fields, single_fields, max_images):
    try:
        form = await request.form(max_files=max_images + 1, max_fields=100)
    except Exception as exc:  # noqa: BLE001 - starlette raises several types for bad forms
        message = str(exc) or type(exc).__name__
        if "Too many files" in message:
            raise ServiceError(ErrorCode.too_many_faces, f"too many files; the limit is {max_images}") from exc
        raise ServiceError(ErrorCode.invalid_request, f"the multipart form cannot be read: {message}") from exc
    data: dict[str, Any] = {}
    images: dict[str, list[bytes]] = {}
    fields = model.model_fields
    for key in set(form.keys()):
        values = form.getlist(key)
        if key in list_fields or key in single_fields:
            blobs = []
            for v in values:
                blobs.append(await v.read() if isinstance(v, UploadFile) else str(v).encode())
            images[key] = blobs
            data[key] = [_PLACEHOLDER] * len(blobs) if key in list_fields else _PLACEHOLDER
            continue
        value = values[-1]
        if isinstance(value, UploadFile):
            raise ServiceError(ErrorCode.invalid_request, f"field {key!r} must not be a file")
        if key in fields and fields[key].annotation not in (str, "str") and value.strip()[:1] in "{[":
            try:  # JSON-valued form fields, e.g. metadata={"team": "a"}
                value = json.loads(value)
            except ValueError as exc:
                raise ServiceError(ErrorCode.malformed_json, f"form field {key!r} is not valid JSON") from exc
        data[key] = value
    _check_count(sum(len(v) for v in images.values()), max_images)
    return data, images


def body_docs(model: type[BaseModel], list_fields: tuple[str, ...], single_fields: tuple[str, ...] = ()) -> dict:
    """OpenAPI for a route that reads its body itself: the JSON schema and the multipart form."""
    schema = model.model_json_schema()
    form = json.loads(json.dumps(schema))
    for field in list_fields:
        form["properties"][field] = {"type": "array", "items": {"type": "string", "format": "binary"},
                                     "description": "Image files (repeat the field for several)."}
    for field in single_fields:
        form["properties"][field] = {"type": "string", "format": "binary", "description": "An image file."}
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schema}, "multipart/form-data": {"schema": form}},
        }
    }
