"""The gallery's typed results, the same on every backend. A leaf module, like search.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from .search import Match


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
class Among:
    """What ``search_among`` found: per probe its candidates among the identities asked, best first,
    and how many faces each of those that exist has (the ids not enrolled are absent)."""

    matches: list[list[Match]]
    faces: dict[str, int]


class TooManyFacesForCollection(ValueError):
    """A write would leave a collection with more faces than its ``max_faces`` (nothing was written)."""

    def __init__(self, collection: str, existing: int, adding: int, limit: int) -> None:
        super().__init__(f"collection {collection!r} would hold {existing + adding} faces; its max_faces is {limit}")
        self.collection, self.existing, self.adding, self.limit = collection, existing, adding, limit


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


@dataclass(frozen=True)
class FaceDeletion:
    """One face ``delete_faces`` erased: its identity, and whether that identity was deleted with it
    (it had no face left after the whole call)."""

    face_id: int
    identity_id: str
    identity_deleted: bool


@dataclass(frozen=True)
class FacesDeleted:
    """What ``delete_faces`` committed, in one transaction: the faces erased (ascending face id) and the
    ids asked for that are not faces of the collection (ascending; nothing to erase, not an error)."""

    deleted: list[FaceDeletion]
    not_found: list[int]

    def raise_if_missing(self) -> FacesDeleted:
        """FaceNotFound for the first id not found (``delete_face``'s answer for a single id)."""
        if self.not_found:
            raise FaceNotFound(self.not_found[0])
        return self


def deletions(faces: list[tuple[int, str, int]]) -> list[FaceDeletion]:
    """``delete_faces``'s answer from (face id, identity id, that identity's faces just before this face
    was erased), in the order erased (both backends): an identity is deleted when its last erased face
    was its only one."""
    emptied = {identity for _, identity, before in faces if before == 1}
    return sorted((FaceDeletion(face_id, identity, identity in emptied) for face_id, identity, _ in faces),
                  key=lambda d: d.face_id)


def count_changes(faces: list[tuple[int, str, int]]) -> dict[str, tuple[int, int]]:
    """identity id -> (its faces before the call, after it), from the same tuples as ``deletions``."""
    out: dict[str, tuple[int, int]] = {}
    for _, identity, before in faces:
        out[identity] = (out[identity][0] if identity in out else before, before - 1)
    return out


@dataclass(frozen=True)
class IdentityUpdate:
    """What ``update_identity`` changes: a new id for the identity, and/or its metadata as ``metadata``
    makes it from the stored one (inside the write's transaction, so a merge patch never loses a
    concurrent change; it raises to refuse the result, and nothing is written)."""

    new_id: str | None = None
    metadata: Callable[[dict], dict] | None = None
    # optimistic concurrency: only if the identity's updated_at is still this (else IdentityChanged)
    expected_updated_at: float | None = None


@dataclass(frozen=True)
class UpdateResult:
    """What ``update_identity`` committed (``changed`` False: nothing differed, nothing was written)."""

    details: IdentityDetails  # the identity after the write, read inside its transaction
    renamed_from: str | None  # the old id when the identity was renamed
    metadata_keys: list[str]  # top-level metadata keys added, removed or changed, sorted
    changed: bool

    def audit_details(self) -> dict:
        """identity.updated's details (both backends): the old id when renamed, the keys changed (names,
        never values) and the identity's faces."""
        return {**({"renamed_from": self.renamed_from} if self.renamed_from is not None else {}),
                "metadata_keys": self.metadata_keys, "face_count": self.details.record.face_count}


@dataclass(frozen=True)
class UpdatePlan:
    """What an ``update_identity`` writes, decided from the stored row inside its transaction (both
    backends): the identity's id after it, its metadata after it, the keys that change."""

    identity_id: str
    target: str
    metadata: dict
    keys: list[str]

    @property
    def renamed_from(self) -> str | None:
        return self.identity_id if self.target != self.identity_id else None

    def result(self, details: IdentityDetails) -> UpdateResult:
        return UpdateResult(details, self.renamed_from, self.keys, True)


def plan_update(identity_id: str, update: IdentityUpdate, stored_metadata: str, updated_at: float) -> UpdatePlan | None:
    """The write ``update`` makes of the identity as stored (its metadata as JSON text, its updated_at);
    None: nothing would change. IdentityChanged: it is not the version the caller read."""
    if update.expected_updated_at is not None and updated_at != update.expected_updated_at:
        raise IdentityChanged(identity_id, updated_at)
    before = json.loads(stored_metadata)
    after = before if update.metadata is None else update.metadata(before)
    keys = changed_keys(before, after)
    target = identity_id if update.new_id is None else update.new_id
    return None if target == identity_id and not keys else UpdatePlan(identity_id, target, after, keys)


def changed_keys(before: dict, after: dict) -> list[str]:
    """The top-level keys that ``after`` adds, removes or changes against ``before``, sorted (the audit
    record names them, never their values)."""
    return sorted(k for k in before.keys() | after.keys()
                  if k not in before or k not in after or _json_differs(before[k], after[k]))


def _json_differs(a: object, b: object) -> bool:
    """JSON values compared as JSON: ``1`` and ``true`` differ (Python's ``==`` says they are equal)."""
    if type(a) is not type(b) and not (isinstance(a, (int, float)) and isinstance(b, (int, float))
                                       and not isinstance(a, bool) and not isinstance(b, bool)):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() != b.keys() or any(_json_differs(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) != len(b) or any(_json_differs(x, y) for x, y in zip(a, b))
    return a != b


class IdentityNotFound(LookupError):
    """A merge named a source or target identity that is not enrolled (nothing was written)."""

    def __init__(self, identity_id: str) -> None:
        super().__init__(f"identity {identity_id!r} is not enrolled")
        self.identity_id = identity_id


class IdentityChanged(ValueError):
    """An update expected the identity as of another ``updated_at``: another write changed it since the
    caller read it (nothing was written)."""

    def __init__(self, identity_id: str, updated_at: float) -> None:
        super().__init__(f"identity {identity_id!r} was changed since it was read (updated_at is now {updated_at!r})")
        self.identity_id, self.updated_at = identity_id, updated_at


class FaceNotFound(LookupError):
    """No face with that id in this collection (nothing was written)."""

    def __init__(self, face_id: int) -> None:
        super().__init__(f"no face {face_id} in this collection")
        self.face_id = face_id
