"""Identity metadata is checked on the way in, so whatever is stored can always be read back and served.

Free JSON is stored with an identity and returned by GET /identities and GET /identities/{id}. One
bad value there would break those pages for everyone (pydantic refuses to serialise structures
nested ~255 deep; a lone surrogate such as "\\ud800" cannot be encoded as UTF-8), and a huge value
makes every page that lists it huge. So metadata must be: an object with string keys, nested at
most ``max_depth`` (objects and arrays), finite numbers only (NaN and Infinity are not JSON), text
that is valid Unicode, and at most ``max_bytes`` as UTF-8 JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from ..errors import ErrorCode, ServiceError


@dataclass(frozen=True)
class MetadataLimits:
    max_bytes: int = 16 * 1024
    max_depth: int = 16


def check_metadata(value: Any, limits: MetadataLimits) -> None:
    """Raise ``invalid_metadata`` (422) or ``metadata_too_large`` (413) unless ``value`` is storable."""
    if value is None:
        return
    if not isinstance(value, dict):
        raise _invalid("metadata must be a JSON object")
    _check_structure(value, limits.max_depth)
    try:
        encoded = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _invalid("metadata holds text that is not valid Unicode (a lone surrogate?)") from exc
    if len(encoded) > limits.max_bytes:
        raise ServiceError(ErrorCode.metadata_too_large,
                           f"metadata is {len(encoded)} bytes as JSON; the limit is {limits.max_bytes}",
                           limit=limits.max_bytes, size=len(encoded))


def _check_structure(root: dict, max_depth: int) -> None:
    """Depth, key types and numbers, walked without recursion (the input may be deep on purpose)."""
    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)) and depth > max_depth:
            raise _invalid(f"metadata is nested deeper than {max_depth} levels", limit=max_depth)
        if isinstance(node, dict):
            for key, child in node.items():
                if not isinstance(key, str):
                    raise _invalid("metadata keys must be strings")
                stack.append((child, depth + 1))
        elif isinstance(node, list):
            stack.extend((child, depth + 1) for child in node)
        elif isinstance(node, float) and not math.isfinite(node):
            raise _invalid("metadata numbers must be finite (NaN and Infinity are not JSON)")
        elif not isinstance(node, (str, int, float, bool)) and node is not None:
            raise _invalid(f"metadata holds a {type(node).__name__}, which is not JSON")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON Merge Patch: ``patch`` applied to ``target`` (neither is changed). An object patch
    merges key by key, recursively: a key set to null is removed, any other value replaces (or is
    merged into an object); a patch that is not an object replaces the target whole."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _invalid(message: str, **details: Any) -> ServiceError:
    return ServiceError(ErrorCode.invalid_metadata, message, **details)
