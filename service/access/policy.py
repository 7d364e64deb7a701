"""Roles and what each may do: the one place that says who may call which route.

Four roles, each a set of permissions (CompreFace's Owner/Admin/User, Rekognition's IAM actions):

========  ===============================================================================
admin     everything: collections, keys, the audit trail, every gallery route in every collection (never scoped)
write     enroll, delete identities, and all of ``read``, in its collections
read      identify, verify, list and read identities, duplicates and outliers (and embed/detect), in its collections
embed     /embed and /detect only: no gallery
========  ===============================================================================

A route declares the permission it needs (``http/deps.py``: ``Allow(Permission.read)``); a gallery
route also names its collection (``/collections/{collection}/...``, or ``default`` unprefixed), which
must be in the key's scope. A key outside its role or scope gets 403 ``forbidden``; a missing,
unknown, revoked or expired key 401 ``unauthorized``. With no key configured anywhere (no
FACE_API_KEY, no stored key) the service is open, as before keys existed: every caller is
``OPEN``, with every permission.

An admin key has no scope: the admin routes (keys, the audit trail, jobs, aliases, collections) are not
a collection's, so a scope could not hold it (it could make itself an unscoped admin key). POST /keys
and the CLI refuse one; a scoped admin key stored before they did is refused whenever it is used
(``Principal.unusable``) and named in a warning at start-up (``scoped_admin_keys``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from ..gallery.api import StoredKey


class Role(str, Enum):
    admin = "admin"
    write = "write"
    read = "read"
    embed = "embed"


class Permission(str, Enum):
    embed = "embed"  # /embed, /detect: faces in, vectors out, no gallery
    read = "read"  # identify, verify, list and read identities, duplicates/outliers, collection info
    write = "write"  # enroll, delete identities
    admin = "admin"  # collections, keys, audit, force_quality, /metrics


GRANTS: dict[Role, frozenset[Permission]] = {
    Role.admin: frozenset(Permission),
    Role.write: frozenset({Permission.embed, Permission.read, Permission.write}),
    Role.read: frozenset({Permission.embed, Permission.read}),
    Role.embed: frozenset({Permission.embed}),
}


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's id (None in open mode), its role and collection scope."""

    key_id: str | None
    role: Role
    collections: frozenset[str] | None  # None: every collection
    open_mode: bool = False
    rate_limit_rps: float | None = None  # the key's own limits (None: the service's settings)
    rate_limit_faces_per_s: float | None = None

    def may(self, permission: Permission) -> bool:
        return permission in GRANTS[self.role]

    def may_touch(self, collection: str) -> bool:
        return self.collections is None or collection in self.collections

    @property
    def unusable(self) -> str | None:
        """Why this key is refused whatever it asks (403), else None: a scoped admin key (module docstring)."""
        if self.role is Role.admin and self.collections is not None:
            return SCOPED_ADMIN_REFUSED.format(key_id=self.key_id)
        return None


SCOPED_ADMIN = ("an admin key cannot be scoped: the admin routes (keys, audit, jobs, aliases, collections) reach "
                "every collection; scope a write key to those collections, or make an unscoped admin key")
SCOPED_ADMIN_REFUSED = ("admin key {key_id} is scoped to collections, which cannot hold an admin key (the admin routes "
                        "reach every collection): it is refused; revoke it (DELETE /keys/{key_id}) and make a write "
                        "key scoped to those collections, or an unscoped admin key")


def scoped_admin_keys(keys: Iterable[StoredKey], now: float) -> list[str]:
    """The ids of the live (not revoked, not expired) scoped admin keys among ``keys``: made before
    POST /keys refused them, refused now whenever used; the start-up warning names them."""
    return [k.key_id for k in keys if k.role == Role.admin.value and k.collections is not None
            and k.revoked_at is None and (k.expires_at is None or k.expires_at > now)]


OPEN = Principal(key_id=None, role=Role.admin, collections=None, open_mode=True)
