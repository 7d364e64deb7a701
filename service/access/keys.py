"""API keys: the secret's format, its hash, and making a new key.

A secret is ``fk_<key_id>_<random>``: the key id (public: it names the key in ``GET /keys``, the audit
trail and the logs) travels inside the secret, so a lookup is one read by id; the random part is
32 bytes from ``secrets`` (256 bits). Only ``SHA-256(pepper || secret)`` is stored: the secret has
far more entropy than a password, so a slow hash (bcrypt) would cost every request milliseconds
and buy nothing; the optional pepper (``FACE_KEY_PEPPER_FILE``) keeps a stolen database from being
checked against candidate secrets offline. Hashes are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..gallery.api import StoredKey

if TYPE_CHECKING:
    from ..config import Settings

PREFIX = "fk_"
_SECRET = re.compile(r"^fk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
# 5000-01-01T00:00:00Z in Unix seconds: an expiry from then on is refused (POST /keys, keys create): it was
# written in milliseconds, or it is a mistake (and it leaves the dates one can print)
LATEST_EXPIRY = 95_617_584_000.0
ENV_KEY_ID = "env"  # FACE_API_KEY: one admin key from the environment, never stored


class PepperFileError(RuntimeError):
    """FACE_KEY_PEPPER_FILE names a file that cannot serve as the pepper (missing, unreadable, empty)."""


def load_pepper(settings: Settings) -> bytes:
    """The pepper of the stored key hashes: the bytes of ``key_pepper_file``, or b"" when none is set.

    A file that is set but missing, unreadable or empty is refused (PepperFileError) rather than read as
    "no pepper": every hash would silently change, so every stored key would stop working, or keys
    made now would stop working once the file is back.
    """
    path = settings.key_pepper_file
    if path is None:
        return b""
    try:
        pepper = path.read_bytes()
    except OSError as exc:
        raise PepperFileError(f"FACE_KEY_PEPPER_FILE={path} cannot be read ({exc.strerror or exc}); fix the "
                              "file or its permissions, or unset FACE_KEY_PEPPER_FILE") from exc
    if not pepper.strip():
        raise PepperFileError(f"FACE_KEY_PEPPER_FILE={path} is empty: give it random bytes (e.g. "
                              "`head -c 32 /dev/urandom > FILE`), or unset FACE_KEY_PEPPER_FILE")
    return pepper


def hash_secret(secret: str, pepper: bytes = b"") -> str:
    return hashlib.sha256(pepper + secret.encode()).hexdigest()


def key_id_of(secret: str) -> str | None:
    """The key id inside a well-formed secret, else None (then no lookup is made)."""
    match = _SECRET.fullmatch(secret)
    return match.group(1) if match else None


def matches(secret: str, stored_hash: str, pepper: bytes = b"") -> bool:
    return hmac.compare_digest(hash_secret(secret, pepper).encode(), stored_hash.encode())


@dataclass(frozen=True)
class NewKey:
    """A key just made: the secret is in here once, to be shown once; ``stored`` is what is kept."""

    secret: str
    stored: StoredKey


def new_key(role: str, collections: tuple[str, ...] | None = None, note: str | None = None,
            expires_at: float | None = None, pepper: bytes = b"", rate_limit_rps: float | None = None,
            rate_limit_faces_per_s: float | None = None, now: float | None = None) -> NewKey:
    key_id = secrets.token_hex(6)
    secret = f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    assert _SECRET.fullmatch(secret), secret
    stored = StoredKey(key_id=key_id, secret_hash=hash_secret(secret, pepper), role=role,
                       collections=tuple(collections) if collections is not None else None, note=note,
                       created_at=time.time() if now is None else now, expires_at=expires_at,
                       rate_limit_rps=rate_limit_rps, rate_limit_faces_per_s=rate_limit_faces_per_s)
    return NewKey(secret, stored)


def key_view(key: StoredKey) -> dict[str, Any]:
    """A key as GET /keys and ``python -m service keys list`` show it: never the secret, never its hash."""
    return {"key_id": key.key_id, "role": key.role,
            "collections": list(key.collections) if key.collections is not None else None,
            "note": key.note, "created_at": key.created_at, "expires_at": key.expires_at,
            "revoked_at": key.revoked_at, "last_used_at": key.last_used_at,
            "rate_limit_rps": key.rate_limit_rps, "rate_limit_faces_per_s": key.rate_limit_faces_per_s}
