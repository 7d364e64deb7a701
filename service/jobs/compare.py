"""How a collection's recognition changes with its model: the comparison report of a migration.

``compare_collections(A, B)`` compares two collections that hold the same people, typically A on the
old model and B the migration's copy on the new one (service/jobs/migrate.py):

* per collection (:class:`ModelReport`): **leave-one-face-out rank-1** over the identities with two or
  more faces. Each probe face is searched against every OTHER face of the collection (single-face
  identities included, as distractors), exactly: a blocked numpy matmul over ``iter_faces``, no ANN
  index, so the figure is the model's and not the index's. The probe counts when the best other face
  belongs to the probe's own identity.
* across the two (:class:`ComparisonReport`): the k-th face (face-id order) of identity X in A is the
  k-th face of X in B (the migration keeps that order). Identities whose face counts differ (or that
  only one side holds) cannot be paired: they are left out of the agreement and counted
  (``unpaired_identities``). ``top1_agreement`` is the share of paired probes whose top-1 identity is
  the same in A and B; ``changed`` lists up to ``changed_limit`` probes where it differs.

Probes: every eligible face, or when there are more than ``max_probes``, a seeded sample. The sample
is chosen per (identity, k) by a seeded hash, the same way on both sides, so paired identities get
the same probes in A and B and the same seed always gives the same report for the same collections.

Memory and time: the collection is streamed twice (``iter_faces`` pages: face ids and identities
first, then the vectors, block by block), so what is held is the ids of every face (about 100 bytes
per face with its identity), the probes' vectors (``max_probes`` x dim float32: 5 MB for 10,000 x
128) and one block of scores (1,024 probes x 4,096 faces float32, 16 MB). Holding a whole collection
instead would cost 512 MB per collection at 1M faces x 128 float32; it is never done here. The work
is probes x faces x dim multiply-adds per collection: 10,000 probes against 1M faces of 128 values
is 1.3 TFLOP, tens of seconds to minutes on a few CPU cores.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np

from ..gallery.api import GalleryBackend

__all__ = ["ChangedProbe", "ComparisonReport", "ModelReport", "compare_collections", "leave_one_out"]

PROBE_BLOCK = 1024  # probes scored at once against one page of faces
FACE_PAGE = 4096  # faces per iter_faces page
EMBEDDINGS_CHUNK = 1000  # face ids per face_embeddings call (SQLite's bound-parameter limit is far above)


@dataclass(frozen=True)
class ModelReport:
    """Leave-one-face-out rank-1 of one collection (its own model)."""

    collection: str
    model_id: str
    identities: int  # identities seen by the scan
    faces: int  # faces seen by the scan
    probes: int  # probe faces searched (identities with two or more faces; all of them, or the sample)
    rank1: float | None  # share of probes whose best other face is their own identity's; None: no probe


@dataclass(frozen=True)
class ChangedProbe:
    """A paired probe whose top-1 identity differs between the two collections."""

    identity_id: str  # the probe's identity (the same on both sides)
    source_top1: str | None  # the identity of the best other face in the source (None: no other face)
    target_top1: str | None
    source_score: float | None
    target_score: float | None
    source_face_id: int  # the probe face in each collection (the k-th face of the identity on both sides)
    target_face_id: int


@dataclass(frozen=True)
class ComparisonReport:
    """What a migration changed: each side's rank-1 and how often they agree (module docstring)."""

    source: ModelReport
    target: ModelReport
    paired_probes: int  # probes searched on both sides (identities with the same face count on both)
    unpaired_identities: int  # identities left out: face counts differ, or only one side holds them
    top1_agreement: float | None  # share of paired probes with the same top-1 identity; None: no paired probe
    changed_count: int  # paired probes whose top-1 differs
    identities_changed: int  # distinct identities among them
    changed: tuple[ChangedProbe, ...]  # the first changed_limit of them, by identity then face order
    sampled: bool  # probes were a seeded sample of max_probes, not every eligible face
    max_probes: int
    seed: int
    seconds: float

    def as_dict(self) -> dict:
        """JSON-ready (the job's ``report``, the CLI's output)."""
        out = asdict(self)
        out["changed"] = [asdict(c) for c in self.changed]
        return out


@dataclass
class _Scan:
    """One collection as the comparison needs it: its faces per identity, in face-id order."""

    gallery: GalleryBackend
    faces_of: dict[str, list[int]]  # identity id -> its face ids, ascending

    @property
    def faces(self) -> int:
        return sum(len(f) for f in self.faces_of.values())


@dataclass(frozen=True)
class _Top1:
    identity_id: str | None
    score: float | None


def _scan_ids(gallery: GalleryBackend) -> _Scan:
    faces_of: dict[str, list[int]] = {}
    for face_ids, identity_ids, _ in gallery.iter_faces(FACE_PAGE):
        for face_id, identity_id in zip(face_ids, identity_ids):
            faces_of.setdefault(identity_id, []).append(int(face_id))
    for ids in faces_of.values():
        ids.sort()
    return _Scan(gallery, faces_of)


def _priority(seed: int, identity_id: str, k: int) -> int:
    digest = hashlib.blake2b(f"{seed}\x00{identity_id}\x00{k}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _choose_probes(scan: _Scan, max_probes: int, seed: int) -> tuple[dict[tuple[str, int], int], bool]:
    """(identity, k) -> face id of the probes: every face of the identities with two or more faces, or
    the ``max_probes`` of them with the smallest seeded hash of (identity, k)."""
    eligible = {(identity_id, k): face_id for identity_id, ids in scan.faces_of.items() if len(ids) >= 2
                for k, face_id in enumerate(ids)}
    if len(eligible) <= max_probes:
        return eligible, False
    keys = sorted(eligible, key=lambda key: (_priority(seed, *key), key))[:max_probes]
    return {key: eligible[key] for key in sorted(keys)}, True


def leave_one_out(gallery: GalleryBackend, probe_face_ids: Iterable[int]) -> dict[int, tuple[str, str | None, float | None]]:
    """Exact leave-one-face-out search: probe face id -> (its identity, the identity of the best OTHER
    face of the collection, that face's score). A probe deleted meanwhile is absent from the answer."""
    wanted = sorted(set(int(f) for f in probe_face_ids))
    stored: dict[int, tuple[str, np.ndarray]] = {}
    for start in range(0, len(wanted), EMBEDDINGS_CHUNK):
        stored.update(gallery.face_embeddings(wanted[start:start + EMBEDDINGS_CHUNK]))
    order = [f for f in wanted if f in stored]
    if not order:
        return {}
    probes = np.stack([stored[f][1] for f in order]).astype(np.float32, copy=False)
    probe_ids = np.asarray(order, dtype=np.int64)
    best = np.full(len(order), -np.inf, dtype=np.float32)
    best_identity = np.full(len(order), -1, dtype=np.int64)
    names: list[str] = []  # identity index -> identity id
    index_of: dict[str, int] = {}
    for face_ids, identity_ids, vectors in gallery.iter_faces(FACE_PAGE):
        page_ids = np.asarray(face_ids, dtype=np.int64)
        page_identities = np.empty(len(identity_ids), dtype=np.int64)
        for col, identity_id in enumerate(identity_ids):
            if identity_id not in index_of:
                index_of[identity_id] = len(names)
                names.append(identity_id)
            page_identities[col] = index_of[identity_id]
        page = np.asarray(vectors, dtype=np.float32)
        # the probes among this page's faces (probe_ids is sorted): their own column must not count
        at = np.minimum(np.searchsorted(probe_ids, page_ids), len(probe_ids) - 1)
        self_cols = np.nonzero(probe_ids[at] == page_ids)[0]
        self_rows = at[self_cols]
        for start in range(0, len(order), PROBE_BLOCK):
            block = slice(start, start + PROBE_BLOCK)
            scores = probes[block] @ page.T  # [probes, page]
            inside = (self_rows >= start) & (self_rows < start + PROBE_BLOCK)
            scores[self_rows[inside] - start, self_cols[inside]] = -np.inf
            top = np.argmax(scores, axis=1)
            top_score = scores[np.arange(len(top)), top]
            better = top_score > best[block]
            best[block] = np.where(better, top_score, best[block])
            best_identity[block] = np.where(better, page_identities[top], best_identity[block])
    out: dict[int, tuple[str, str | None, float | None]] = {}
    for row, face_id in enumerate(order):
        found = best_identity[row] >= 0
        out[face_id] = (stored[face_id][0], names[best_identity[row]] if found else None,
                        float(best[row]) if found else None)
    return out


def _rank1(scan: _Scan, probes: dict[tuple[str, int], int]) -> tuple[ModelReport, dict[tuple[str, int], _Top1]]:
    found = leave_one_out(scan.gallery, probes.values())
    top1: dict[tuple[str, int], _Top1] = {}
    hits = 0
    for key, face_id in probes.items():
        if face_id not in found:  # deleted since the scan
            continue
        identity_id, best, score = found[face_id]
        top1[key] = _Top1(best, score)
        hits += best == identity_id
    report = ModelReport(collection=scan.gallery.name, model_id=scan.gallery.model_id,
                         identities=len(scan.faces_of), faces=scan.faces, probes=len(top1),
                         rank1=hits / len(top1) if top1 else None)
    return report, top1


def compare_collections(source: GalleryBackend, target: GalleryBackend, max_probes: int = 10_000, seed: int = 0,
                        changed_limit: int = 100) -> ComparisonReport:
    """Rank-1 of each collection and the agreement of their top-1 answers (module docstring). The two
    may be on different models and dimensions; neither is written. ``max_probes`` >= 1."""
    if max_probes < 1:
        raise ValueError("max_probes must be at least 1")
    started = time.perf_counter()
    a, b = _scan_ids(source), _scan_ids(target)
    probes_a, sampled_a = _choose_probes(a, max_probes, seed)
    probes_b, sampled_b = _choose_probes(b, max_probes, seed)
    report_a, top1_a = _rank1(a, probes_a)
    report_b, top1_b = _rank1(b, probes_b)
    paired = {i for i, ids in a.faces_of.items() if len(b.faces_of.get(i, ())) == len(ids)}
    unpaired = len((a.faces_of.keys() | b.faces_of.keys()) - paired)
    keys = sorted(k for k in top1_a.keys() & top1_b.keys() if k[0] in paired)
    changed = [k for k in keys if top1_a[k].identity_id != top1_b[k].identity_id]
    listed = tuple(ChangedProbe(identity_id=k[0], source_top1=top1_a[k].identity_id,
                                target_top1=top1_b[k].identity_id, source_score=top1_a[k].score,
                                target_score=top1_b[k].score, source_face_id=probes_a[k],
                                target_face_id=probes_b[k]) for k in changed[:changed_limit])
    return ComparisonReport(
        source=report_a, target=report_b, paired_probes=len(keys), unpaired_identities=unpaired,
        top1_agreement=(len(keys) - len(changed)) / len(keys) if keys else None, changed_count=len(changed),
        identities_changed=len({k[0] for k in changed}), changed=listed, sampled=sampled_a or sampled_b,
        max_probes=max_probes, seed=seed, seconds=round(time.perf_counter() - started, 3))
