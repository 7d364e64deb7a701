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


@dataclass(frozen=True)
class MergeResult:
    """What ``merge_identities`` committed: every face of the source is now the target's."""

    target_id: str
    faces_moved: int
    face_count: int  # the target's faces right after the merge, read inside its transaction


@dataclass(frozen=True)
class MoveResult:
    """What ``move_face`` committed: the face (same id) now belongs to ``to_identity``."""

    face_id: int
    from_identity: str
    to_identity: str
    target_created: bool  # the target identity did not exist and was created (metadata {})
    source_deleted: bool  # this was the source identity's last face: the identity was deleted


class IdentityNotFound(LookupError):
    """A merge named a source or target identity that is not enrolled (nothing was written)."""

    def __init__(self, identity_id: str) -> None:
        super().__init__(f"identity {identity_id!r} is not enrolled")
        self.identity_id = identity_id


class FaceNotFound(LookupError):
    """No face with that id in this collection (nothing was written)."""

    def __init__(self, face_id: int) -> None:
        super().__init__(f"no face {face_id} in this collection")
        self.face_id = face_id
