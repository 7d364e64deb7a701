"""What an identity id may be, in one place: the API (schemas.py), its lookups and the gallery CLI.

An id names a person to the people who read it in a console or a log, so two ids must not look the
same and an id must not be able to hide or reorder what is shown around it:

* it is normalised to Unicode NFC on the way in, so the composed and decomposed forms of an accented
  name ("José" typed on one system, pasted from another) are one identity;
* it may not hold controls (Unicode Cc), format characters (Cf: the right-to-left override U+202E,
  zero-width U+200B-U+200D, word joiner U+2060, BOM U+FEFF, soft hyphen ...), line or paragraph
  separators (Zl, Zp), or lone surrogates (Cs);
* it may not be blank: only whitespace, or characters drawn as nothing (Hangul fillers, braille blank).

Ids stored before these rules stay reachable: a lookup tries the id as given first, then its NFC
and NFD forms (:func:`find_identity`), so an old NFD or otherwise refused id can still be read,
verified against and deleted (by either form). New enrollments always store the NFC form.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from typing import TypeVar

from ..errors import ErrorCode, ServiceError

T = TypeVar("T")

MAX_LENGTH = 128
NEVER_STORED = re.compile(r"[\x00-\x1f\x7f]")  # C0 controls and DEL: refused by every version, so never stored

REFUSED_CATEGORIES = {"Cc": "a control character", "Cf": "an invisible format character",
                      "Zl": "a line separator", "Zp": "a paragraph separator", "Cs": "a lone surrogate"}
# letters and symbols that fonts draw as nothing: an id made only of these (and whitespace) is blank
INVISIBLE = {"\u115f", "\u1160", "\u3164", "\uffa0", "\u2800"}


def normalise(identity_id: str) -> str:
    return unicodedata.normalize("NFC", identity_id)


def problem(identity_id: str) -> str | None:
    """Why ``identity_id`` (already NFC) cannot name a new identity, or None when it can. The API's
    schema refuses the first three cases before (invalid_request); the gallery CLI has only this."""
    if not 1 <= len(identity_id) <= MAX_LENGTH:
        return f"the identity id has {len(identity_id)} characters; 1 to {MAX_LENGTH} are allowed"
    if "/" in identity_id:
        return "the identity id holds '/' (ids are path segments)"
    if identity_id in (".", ".."):
        return "'.' and '..' are not identity ids (URLs resolve them away)"
    for char in identity_id:
        category = unicodedata.category(char)
        if category in REFUSED_CATEGORIES:
            return f"the identity id holds {REFUSED_CATEGORIES[category]} (U+{ord(char):04X})"
    if all(char.isspace() or char in INVISIBLE for char in identity_id):
        return "the identity id is blank (nothing visible)"
    return None


def id_range(after: str | None, prefix: str | None) -> tuple[str, bool, str | None]:
    """A page of ids as one range of the id index: (low, low included, high excluded or None). Ids sort
    by code point on both backends (SQLite's BINARY and PostgreSQL's "C" compare UTF-8 bytes, whose
    order is the code points', as Python's str does), so the ids that start with ``prefix`` are those
    from ``prefix`` up to the prefix with its last character raised by one (past the surrogates, which
    UTF-8 cannot hold); the page starts after ``after`` (the previous page's last id) or at the prefix,
    whichever is later. One lower bound, so the index scan starts there, not at the first id."""
    if not prefix:
        return after or "", False, None
    high = None
    for end in range(len(prefix) - 1, -1, -1):
        point = ord(prefix[end]) + 1
        if 0xD800 <= point <= 0xDFFF:
            point = 0xE000
        if point <= 0x10FFFF:
            high = prefix[:end] + chr(point)
            break
    if after is not None and after >= prefix:
        return after, False, high
    return prefix, True, high


def find_identity(identity_id: str, fetch: Callable[[str], T | None]) -> tuple[str, T]:
    """The stored identity an id names, and the id it is stored under: the id as given (also one stored
    before these rules), else its NFC form, else its NFD form (what older versions stored of a name
    typed decomposed, e.g. a macOS folder name). ``fetch`` (a gallery read or delete) answers None for an
    unknown id. Raises ``invalid_identity_id`` for an id no identity could have now, else
    ``identity_not_found``."""
    if NEVER_STORED.search(identity_id):  # nothing to find; PostgreSQL cannot even be asked (NUL in text)
        raise ServiceError(ErrorCode.invalid_identity_id, problem(identity_id) or "not an identity id",
                           identity_id=identity_id)
    forms = (identity_id, normalise(identity_id), unicodedata.normalize("NFD", identity_id))
    for form in dict.fromkeys(forms):
        found = fetch(form)
        if found is not None:
            return form, found
    why = problem(normalise(identity_id))
    if why is not None:
        raise ServiceError(ErrorCode.invalid_identity_id, why, identity_id=identity_id)
    raise ServiceError(ErrorCode.identity_not_found, f"identity {identity_id!r} is not enrolled",
                       identity_id=identity_id)
