"""Roles and what each may do: the one place that says who may call which route.

Four roles, each a set of permissions (CompreFace's Owner/Admin/User, Rekognition's IAM actions):

========  ===============================================================================
admin     everything: collections, keys, the audit trail, every gallery route in every collection
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
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


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


OPEN = Principal(key_id=None, role=Role.admin, collections=None, open_mode=True)
