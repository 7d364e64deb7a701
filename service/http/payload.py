"""Request bodies in either form the API accepts: JSON with base64 images, or multipart uploads.

Both end in the same place: a validated pydantic model plus the raw bytes of each image field, so
routes never care how the images arrived.
"""

from __future__ import annotations

import json
import re
import types
import typing
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from ..errors import ErrorCode, ServiceError
from ..faces.images import decode_base64
from .deps import Allow, charge_faces

T = TypeVar("T", bound=BaseModel)

_PLACEHOLDER = "multipart"  # stands in for uploaded files while the rest of the form is validated
# JSON bodies from this size on are parsed and validated in a worker thread, not on the event loop
LARGE_BODY_BYTES = 1 << 20
# no request model has half as many fields: a body with more is refused as it is read (each unknown
# field would be one validation error, listed: a million of them, an 18 MB body, made a 68 MB answer)
MAX_BODY_FIELDS = 64
# an invalid_request answer lists this many errors at most, and their total (``errors_total``)
MAX_REPORTED_ERRORS = 20


def validation_details(raw: Sequence[Any]) -> dict[str, Any]:
    """The ``details`` of an invalid_request: its first errors as {field, message}, and how many there were."""
    errors = [{"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in raw[:MAX_REPORTED_ERRORS]]
    return {"errors": errors, **({"errors_total": len(raw)} if len(raw) > MAX_REPORTED_ERRORS else {})}


def _too_many_fields() -> ServiceError:
    return ServiceError(ErrorCode.invalid_request, f"the request body has more than {MAX_BODY_FIELDS} fields",
                        errors=[{"field": "body", "message": f"more than {MAX_BODY_FIELDS} fields"}])


def validation_error(raw: Sequence[Any]) -> ServiceError:
    """The answer to a request that fails its model's validation (a body read here, or a body, path or
    query parameter FastAPI validated): ``invalid_request``, or ``invalid_identity_id`` for an identity
    id the gallery cannot hold (see schemas.check_identity_id), whatever route it came in on."""
    details = validation_details(raw)
    first = details["errors"][0]
    code = ErrorCode.invalid_identity_id if any(e["type"] == "invalid_identity_id" for e in raw) \
        else ErrorCode.invalid_request
    return ServiceError(code, "the request is not valid: " + first["message"] + f" ({first['field']})", **details)


def _validation_error(exc: ValidationError) -> ServiceError:
    return validation_error(exc.errors(include_url=False, include_input=False))


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(text: str | bytes, what: str = "the body") -> Any:
    """Strict JSON: NaN and Infinity are refused (they are not JSON and would be stored as null), and
    nesting too deep for the parser is a ``malformed_json`` (400) like any other bad JSON."""
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except RecursionError as exc:
        raise ServiceError(ErrorCode.malformed_json, f"{what} is nested too deeply") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise ServiceError(ErrorCode.malformed_json, f"{what} is not valid JSON: {exc}") from exc


class _ParsedJSONRequest(Request):
    """A request whose JSON body was already parsed (strictly): what FastAPI's ``await request.json()`` gets."""

    parsed: Any = None

    async def json(self) -> Any:
        return self.parsed


def _text_problem(value: Any) -> str | None:
    """What makes ``value`` (a parsed JSON value, at any depth) hold text no store keeps: a NUL
    (PostgreSQL's text refuses it) or a lone surrogate (not Unicode: UTF-8 cannot encode it); else None.
    Walked without recursion: the parser reads bodies nested deeper than the stack would take a call a level."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            if "\x00" in node:
                return "a NUL character (U+0000)"
            if not node.isascii():
                try:
                    node.encode("utf-8")
                except UnicodeEncodeError:
                    return "text that is not valid Unicode (a lone surrogate)"
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return None


def _json_text(body: bytes) -> Any:
    """A JSON body whose text every store can hold: parsed as the image routes' bodies are (``parse_checked``,
    which refuses more than ``MAX_BODY_FIELDS`` top-level fields at the first one over), then
    ``_text_problem``."""
    value = parse_checked(body, NO_CHECKS)
    if problem := _text_problem(value):
        raise ServiceError(ErrorCode.invalid_request, f"the request body holds {problem}",
                           errors=[{"field": "body", "message": f"holds {problem}"}])
    return value


class StrictRoute(APIRoute):
    """The route class of every router. A JSON body that FastAPI itself parses (the routes without
    images: keys, collections, aliases, merges, moves, jobs) is read as ``read_payload`` reads the
    others: strict JSON (``parse_json``: NaN and Infinity refused, nesting too deep for the parser a 400
    ``malformed_json`` like any other bad JSON), in no other content type (415
    ``unsupported_media_type``), and with no NUL or lone surrogate in its text (422 ``invalid_request``:
    PostgreSQL's text cannot hold either); from ``LARGE_BODY_BYTES`` on, in a worker thread. FastAPI
    alone would take NaN and a lone surrogate, and answer bad JSON with a 422 ``invalid_request`` and too
    deep a body with a bare 400. (Free text in a path or a query is refused a NUL by its parameter:
    ``schemas.NO_NUL``.)

    Access is decided first: the route's ``Allow`` rules run before the body is read (FastAPI reads a
    body before it solves dependencies), so a request without a valid key gets its 401, and one its key
    may not make its 403, whatever the body holds, as on the image routes, whose handlers read theirs."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:  # no body, or one that read_payload reads
            return handler
        rules = [d.dependency for d in self.dependencies if isinstance(d.dependency, Allow)]

        async def strict(request: Request) -> Response:
            for rule in rules:  # (each records that it passed: FastAPI's own call of it returns at once)
                await rule(request)
            scope = request.scope
            content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if not content_type:  # JSON, as on every route (a FastAPI with strict content types would refuse it)
                headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
            parsed = _ParsedJSONRequest(scope, request.receive)
            body = await parsed.body()
            if body:
                if content_type not in ("application/json", ""):
                    raise ServiceError(ErrorCode.unsupported_media_type,
                                       f"content type {content_type!r} is not accepted; send application/json")
                parsed.parsed = _json_text(body) if len(body) < LARGE_BODY_BYTES \
                    else await run_in_threadpool(_json_text, body)
            return await handler(parsed)

        return strict


async def read_payload(
    request: Request, model: type[T], list_fields: tuple[str, ...], single_fields: tuple[str, ...] = (),
    max_images: int = 64, vector_fields: tuple[str, ...] = (), single_vector_fields: tuple[str, ...] = (),
    dimension: int | None = None,
) -> tuple[T, dict[str, list[bytes]]]:
    """``_read_payload``, then the faces it carries (images and embeddings) are charged to the caller's
    faces-per-second budget (429 ``rate_limited`` past it), before any image is decoded."""
    payload, images = await _read_payload(request, model, list_fields, single_fields, max_images, vector_fields,
                                          single_vector_fields, dimension)
    count = sum(len(blobs) for blobs in images.values())
    count += sum(len(getattr(payload, f, None) or ()) for f in vector_fields)
    count += sum(getattr(payload, f, None) is not None for f in single_vector_fields)
    charge_faces(request, count)
    return payload, images


async def _read_payload(
    request: Request, model: type[T], list_fields: tuple[str, ...], single_fields: tuple[str, ...] = (),
    max_images: int = 64, vector_fields: tuple[str, ...] = (), single_vector_fields: tuple[str, ...] = (),
    dimension: int | None = None,
) -> tuple[T, dict[str, list[bytes]]]:
    """Parse and validate a body; returns the model and {image field: [bytes, ...]}.

    ``list_fields`` and ``vector_fields`` (lists of images, lists of embeddings) hold at most
    ``max_images`` items each, and an embedding (in ``vector_fields`` or ``single_vector_fields``) at
    most ``dimension`` values: a JSON body is checked as it is parsed and refused (``too_many_faces``,
    ``wrong_dimension``) at the first item over a limit, before the rest of it is parsed or anything
    is validated. Bodies of ``LARGE_BODY_BYTES`` or more are parsed in a worker thread."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        data, images = await _read_multipart(request, model, list_fields, single_fields, max_images)
        return _validate(model, data), images
    if content_type not in ("application/json", ""):
        raise ServiceError(
            ErrorCode.unsupported_media_type,
            f"content type {content_type!r} is not accepted; send application/json or multipart/form-data",
        )
    body = await request.body()
    checks = BodyChecks({**dict.fromkeys(list_fields, "images"), **dict.fromkeys(vector_fields, "embeddings")},
                        max_images, frozenset(vector_fields), {f: i for i, f in enumerate(single_vector_fields)},
                        dimension)
    if len(body) < LARGE_BODY_BYTES:
        return _json_payload(body, model, list_fields, single_fields, checks)
    return await run_in_threadpool(_json_payload, body, model, list_fields, single_fields, checks)


def _validate(model: type[T], data: Any) -> T:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from exc


def _json_payload(body: bytes, model: type[T], list_fields: tuple[str, ...], single_fields: tuple[str, ...],
                  checks: BodyChecks) -> tuple[T, dict[str, list[bytes]]]:
    payload = _validate(model, parse_checked(body, checks))
    images: dict[str, list[bytes]] = {}
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


@dataclass(frozen=True)
class BodyChecks:
    """What the parse of a JSON body checks as it reads the top-level object's fields."""

    lists: dict[str, str]  # fields holding a list of at most ``limit`` items -> what the items are
    limit: int
    vector_lists: frozenset[str]  # those of ``lists`` whose items are embeddings
    vectors: dict[str, int]  # fields holding one embedding -> its index in the request
    dimension: int | None  # the most values an embedding may have (None: not checked)


NO_CHECKS = BodyChecks({}, 0, frozenset(), {}, None)  # a body without images or embeddings: the fields' limit only
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)
_SPACE = re.compile(r"[ \t\n\r]*")


def _skip(text: str, pos: int) -> int:
    """The position of the first non-whitespace character from ``pos`` (JSON's whitespace)."""
    return _SPACE.match(text, pos).end()  # type: ignore[union-attr]  # (an empty match at worst)


def parse_checked(body: bytes, checks: BodyChecks) -> Any:
    """A JSON body, parsed like ``parse_json``, except that in a top-level object the lists of
    ``checks.lists`` are parsed item by item and refused (``too_many_faces``) at the first item over
    ``checks.limit``, and an embedding with more than ``checks.dimension`` values is refused
    (``wrong_dimension``) before its values are parsed: a body of a million embeddings costs the parse
    of ``limit + 1`` of them, and a row of a million values none, never a million Python floats. A
    top-level object of more than ``MAX_BODY_FIELDS`` fields is refused at the first one over.
    Parsing item by item also lets other threads (the event loop) run between items."""
    try:
        text = body.decode(json.detect_encoding(body), "surrogatepass")
        start = _skip(text, 0)
        if text[start:start + 1] != "{":  # (the model refuses non-objects)
            return parse_json(text)
        return _checked_object(text, start + 1, checks)
    except RecursionError as exc:
        raise ServiceError(ErrorCode.malformed_json, "the body is nested too deeply") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise ServiceError(ErrorCode.malformed_json, f"the body is not valid JSON: {exc}") from exc


def _expect(text: str, pos: int, chars: str, what: str) -> str:
    char = text[pos:pos + 1]
    if not char or char not in chars:
        raise json.JSONDecodeError(f"Expecting {what}", text, pos)
    return char


def _checked_object(text: str, pos: int, checks: BodyChecks) -> dict[str, Any]:
    data: dict[str, Any] = {}
    pos = _skip(text, pos)
    if text[pos:pos + 1] != "}":
        while True:
            if len(data) == MAX_BODY_FIELDS:  # (a repeated name counts once, as the parse keeps the last)
                raise _too_many_fields()
            _expect(text, pos, '"', "property name enclosed in double quotes")
            key, pos = _DECODER.raw_decode(text, pos)  # a string: it starts with a quote
            pos = _skip(text, pos)
            _expect(text, pos, ":", "':' delimiter")
            pos = _skip(text, pos + 1)
            if key in checks.lists and text[pos:pos + 1] == "[":
                data[key], pos = _checked_array(text, pos + 1, key, checks)
            elif key in checks.vectors:
                data[key], pos = _checked_vector(text, pos, checks.vectors[key], checks.dimension)
            else:
                data[key], pos = _DECODER.raw_decode(text, pos)
            pos = _skip(text, pos)
            if _expect(text, pos, ",}", "',' delimiter") == "}":
                break
            pos = _skip(text, pos + 1)
    pos = _skip(text, pos + 1)
    if pos != len(text):
        raise json.JSONDecodeError("Extra data", text, pos)
    return data


def _checked_array(text: str, pos: int, key: str, checks: BodyChecks) -> tuple[list[Any], int]:
    items: list[Any] = []
    vectors = key in checks.vector_lists
    pos = _skip(text, pos)
    if text[pos:pos + 1] == "]":
        return items, pos + 1
    while True:
        if len(items) == checks.limit:
            what = checks.lists[key]
            raise ServiceError(ErrorCode.too_many_faces, f"more than {checks.limit} {what} in one request; the "
                               f"limit is {checks.limit}", limit=checks.limit)
        if vectors:
            item, pos = _checked_vector(text, pos, len(items), checks.dimension)
        else:
            item, pos = _DECODER.raw_decode(text, pos)
        if not isinstance(item, list if vectors else str):  # not counted as one more of what it is not
            what = "a list of numbers" if vectors else "a string"
            field = f"{key}.{len(items)}"
            raise ServiceError(ErrorCode.invalid_request, f"the request body is not valid: should be {what} ({field})",
                               errors=[{"field": field, "message": f"should be {what}"}])
        items.append(item)
        pos = _skip(text, pos)
        if _expect(text, pos, ",]", "',' delimiter") == "]":
            return items, pos + 1
        pos = _skip(text, pos + 1)


def _checked_vector(text: str, pos: int, index: int, dimension: int | None) -> tuple[Any, int]:
    """An embedding's value; one with more than ``dimension`` numbers is refused from its commas,
    before any of them is parsed (the same refusal ``vectors.normalise`` gives a parsed one)."""
    if dimension is not None and text[pos:pos + 1] == "[":
        end = text.find("]", pos + 1)
        stop = len(text) if end == -1 else end
        for char in '[{"':  # where the row stops being flat, if before its end (str.find: C speed, no regex)
            found = text.find(char, pos + 1, stop)
            stop = stop if found == -1 else found
        given = text.count(",", pos + 1, stop) + 1  # values before the row ends or stops being flat
        if given > dimension:
            if stop == end:  # a flat row: ``given`` is its length
                raise ServiceError(ErrorCode.wrong_dimension, f"embedding {index} has {given} values; the model's "
                                   f"dimension is {dimension}", index=index, expected=dimension, given=given)
            raise ServiceError(ErrorCode.wrong_dimension, f"embedding {index} has more than {dimension} values",
                               index=index, expected=dimension)
    return _DECODER.raw_decode(text, pos)


def _check_count(count: int, max_images: int) -> None:
    if count > max_images:
        raise ServiceError(
            ErrorCode.too_many_faces, f"{count} images in one request; the limit is {max_images}", limit=max_images
        )


async def _read_multipart(request, model, list_fields, single_fields, max_images):
    try:
        form = await request.form(max_files=max_images + 1, max_fields=100)
    except (ServiceError, ClientDisconnect):  # payload_too_large from the body limit; the client gone (499)
        raise
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
        if len(values) > 1 and key in fields and _takes_integers(fields[key].annotation):
            value = ",".join(str(v) for v in values)  # a repeated field of ids (face_ids=3&face_ids=5)
        if key in fields and value.strip() == "None" and _takes_none(fields[key].annotation):
            continue  # str(None), as generated clients send an optional field left None: not given
        if key in fields and fields[key].annotation is bool:
            value = _form_bool(key, value)
        elif key in fields and not _takes_text(fields[key].annotation):
            value = _form_value(key, value)
        data[key] = value
    _check_count(sum(len(v) for v in images.values()), max_images)
    return data, images


def _takes_text(annotation: Any) -> bool:
    """Is a plain string a valid value of this field (str, or a union with str)?"""
    if annotation is str:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_takes_text(arg) for arg in typing.get_args(annotation))
    return False


def _takes_integers(annotation: Any) -> bool:
    """Is this field a list of integers (``face_ids``: ``list[FaceId]``, optional or not)?"""
    for arg in typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
            else (annotation,):
        if typing.get_origin(arg) is list:
            item = typing.get_args(arg)[0]
            if (typing.get_args(item)[0] if typing.get_origin(item) is typing.Annotated else item) is int:
                return True
    return False


def _takes_none(annotation: Any) -> bool:
    """Is None a valid value of this field (a union with None)?"""
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation)


_LAX_BOOL = TypeAdapter(bool)


def _form_bool(key: str, value: str) -> bool:
    """A boolean form field as HTML forms and form clients spell it, as FastAPI's ``Form(bool)`` reads
    it (pydantic's lax bool): true/false in any case, 1/0, on/off, yes/no, t/f, y/n."""
    try:
        return _LAX_BOOL.validate_python(value.strip())
    except ValidationError as exc:
        raise ServiceError(ErrorCode.invalid_request, f"form field {key!r} is not a boolean: {value[:40]!r}",
                           errors=[{"field": key, "message": "Input should be a valid boolean"}]) from exc


def _form_value(key: str, value: str) -> Any:
    """A form field of a non-text field as the JSON value it spells: ``threshold=0.5`` -> 0.5,
    ``replace=true`` -> True, ``metadata={...}`` -> a dict. The models are strict (a JSON body must
    not send "0.5" for a number), so form text is converted here; anything else (a Literal such as
    ``image_type=photo``) stays text and is validated as such."""
    text = value.strip()
    if text[:1] in "{[":  # JSON-valued form fields, e.g. metadata={"team": "a"}
        return parse_json(text, f"form field {key!r}")
    try:
        parsed = parse_json(text, f"form field {key!r}")
    except ServiceError:
        return value
    return parsed if isinstance(parsed, (bool, int, float)) or parsed is None else value


def json_response(body: BaseModel) -> Response:
    """A response model serialised once, by pydantic's own serialiser. Returned as the model, FastAPI
    dumps it to Python objects, validates them against ``response_model`` again and encodes that: three
    passes over every float of every embedding on each request, for a model the route has just built
    (and validated). The route's ``response_model`` still documents the body in OpenAPI."""
    return Response(body.model_dump_json().encode(), media_type="application/json")


def _has_type(schema: dict, kind: str) -> bool:
    return schema.get("type") == kind or any(_has_type(option, kind) for option in schema.get("anyOf", ()))


def _not_null_in_a_form(prop: dict) -> None:
    """A form cannot send null: an optional field is left out. Declared nullable, a generated client (such
    as openapi-python-client) sends a field set to None as the text "None"; declared as its type alone,
    its type has no None to send (the service also reads "None" as not given: ``_read_multipart``)."""
    options = [o for o in prop.get("anyOf", ()) if o != {"type": "null"}]
    if "anyOf" in prop and len(options) < len(prop["anyOf"]):
        del prop["anyOf"]
        if len(options) == 1:
            prop.update(options[0])
        else:
            prop["anyOf"] = options
    if prop.get("default", 0) is None:
        del prop["default"]


def body_docs(model: type[BaseModel], list_fields: tuple[str, ...], single_fields: tuple[str, ...] = ()) -> dict:
    """OpenAPI for a route that reads its body itself: the JSON schema and the multipart form."""
    schema = model.model_json_schema()
    form = json.loads(json.dumps(schema))
    for field, prop in list(form["properties"].items()):
        if field not in list_fields + single_fields and _has_type(prop, "array"):
            # a list in a form is one field of JSON text (``_form_value``), not one repeated field per item
            # as OpenAPI's form encoding would have a generated client send it
            form["properties"][field] = {
                "type": "string", "contentMediaType": "application/json", "title": prop.get("title", field),
                "description": (prop.get("description", "") + " In a form: one field, its JSON text.").strip()}
    for prop in form["properties"].values():
        _not_null_in_a_form(prop)
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
