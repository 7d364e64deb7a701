"""The gallery's typed results, the same on every backend. A leaf module, like search.py."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class IdentityRecord:
    identity_id: str
    metadata: dict
    face_count: int
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class FaceRecord:
    face_id: int
    created_at: float


@dataclass(frozen=True)
class IdentityDetails:
    record: IdentityRecord
    faces: list[FaceRecord]


@dataclass(frozen=True)
class EnrollResult:
    face_ids: list[int]
    created: bool  # the identity did not exist before this enrollment
    faces_removed: int  # faces dropped by replace=True
    face_count: int  # the identity's faces right after this write, read inside it (not racing later writes)


class TooManyFacesForIdentity(ValueError):
    """An enrollment would leave an identity with more faces than allowed (nothing was written)."""

    def __init__(self, identity_id: str, existing: int, adding: int, limit: int) -> None:
        super().__init__(f"identity {identity_id!r} would hold {existing + adding} faces; at most {limit} are allowed")
        self.identity_id, self.existing, self.adding, self.limit = identity_id, existing, adding, limit
