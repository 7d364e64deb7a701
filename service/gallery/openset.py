"""The open-set (1:N) decision threshold: which one applies now, and what it means.

In order of precedence: a request's ``threshold``; the ``FACE_IDENTIFY_THRESHOLD`` setting; the
threshold that holds ``FACE_IDENTIFY_FPIR`` for the gallery's current size, from an impostor tail
(the gallery's own calibration, ``python -m service calibrate``, else the model contract's
``face.impostor_tail``); the contract's fixed ``face.identify_threshold``; the verify threshold.
The model behind the FPIR threshold is in ``service.model.calibration``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..model.calibration import (
    COPY_SCORE,
    HUB_RANKS,
    CalibrationError,
    ImpostorTail,
    calibration_files,
    effective_comparisons,
    fpir_for_far,
    hub_probability,
    stranger_probability,
    threshold_for_gallery,
    write_calibration_file,
)
from .search import Match

log = logging.getLogger(__name__)

CALIBRATION_FILE = "impostor_tail.json"  # in the data dir: calibration/<model id>/impostor_tail.json
ThresholdSource = Literal["request", "setting", "fpir", "model", "verify"]
TailSource = Literal["gallery", "model"]


@dataclass(frozen=True)
class GalleryCounts:
    identities: int
    faces: int
    counted_faces: int  # sum over identities of min(faces, FACES_COUNTED_PER_IDENTITY): sizes n_eff


@dataclass(frozen=True)
class IdentifyThreshold:
    """The threshold one /identify call uses, where it came from, and the FPIR model behind it."""

    threshold: float
    source: ThresholdSource
    fpir_target: float | None  # set when the threshold was derived from the target FPIR
    counts: GalleryCounts
    tail: ImpostorTail | None = None
    tail_source: TailSource | None = None
    extrapolated: bool = False  # the per-comparison FAR lies below what the tail measured

    @property
    def n_eff(self) -> float:
        return effective_comparisons(self.counts.identities, self.counts.counted_faces)

    @property
    def fpir_estimated(self) -> float | None:
        """The FPIR this threshold gives in this gallery, by the tail (whatever set the threshold)."""
        if self.tail is None:
            return None
        return fpir_for_far(self.tail.far_at(self.threshold), self.n_eff)

    def stranger_probability(self, score: float) -> float | None:
        """Chance that a never-enrolled face's best score in this gallery reaches ``score``."""
        if self.tail is None:
            return None
        return stranger_probability(self.tail, score, self.n_eff)


def save_gallery_tail(data_dir: Path, model_id: str, tail: ImpostorTail, details: dict | None = None) -> Path:
    """Store a calibration of model ``model_id`` for the galleries in ``data_dir`` (atomically; the
    service picks it up): ``DATA/calibration/<model id>/impostor_tail.json``, read by that model's
    collections only (``service.model.calibration.calibration_file``)."""
    payload = {"model_id": model_id, "created_at": time.time(), "tail": tail.to_dict(), **(details or {})}
    return write_calibration_file(data_dir, model_id, CALIBRATION_FILE, payload)


class GalleryTail:
    """One model's own impostor tail in the data dir, re-read when its file changes (a calibration run
    while the service is up takes effect on the next request). Its file is the model's own
    (``calibration/<model id>/impostor_tail.json``), else the data dir's ``impostor_tail.json`` of a
    calibration made before several models were served; one of another model is ignored, loudly."""

    def __init__(self, data_dir: Path, model_id: str) -> None:
        self.path, self.legacy_path = calibration_files(data_dir, model_id, CALIBRATION_FILE)
        self.model_id = model_id
        self._lock = threading.Lock()
        self._stamp: tuple[Path, int, int] | None = None
        self._tail: ImpostorTail | None = None

    def current(self) -> ImpostorTail | None:
        for path in (self.path, self.legacy_path):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            stamp = (path, st.st_mtime_ns, st.st_size)
            with self._lock:
                if stamp != self._stamp:
                    self._stamp, self._tail = stamp, self._read(path)
                return self._tail
        return None

    def _read(self, path: Path) -> ImpostorTail | None:
        try:
            payload = json.loads(path.read_text())
            if payload.get("model_id") != self.model_id:
                log.warning("gallery calibration is for another model; ignored",
                            extra={"path": str(path), "calibrated_model": payload.get("model_id"),
                                   "model_id": self.model_id})
                return None
            tail = ImpostorTail.from_dict(payload["tail"])
            log.info("gallery calibration loaded", extra={"path": str(path), "model_id": self.model_id,
                                                          "pairs": tail.pairs, "measured_on": tail.source})
            return tail
        except (OSError, ValueError, KeyError, CalibrationError):
            log.warning("gallery calibration unreadable; ignored", extra={"path": str(path)}, exc_info=True)
            return None


def choose_tail(gallery_tail: ImpostorTail | None, model_tail: ImpostorTail | None
                ) -> tuple[ImpostorTail | None, TailSource | None]:
    if gallery_tail is not None:
        return gallery_tail, "gallery"
    if model_tail is not None:
        return model_tail, "model"
    return None, None


@dataclass(frozen=True)
class ThresholdInputs:
    """What decides the threshold, apart from a request's own."""

    fixed: float | None  # FACE_IDENTIFY_THRESHOLD
    fpir: float  # FACE_IDENTIFY_FPIR
    model_identify: float | None  # the contract's fixed face.identify_threshold
    verify: float  # the 1:1 threshold in force: the FPIR threshold is never looser than it


def identify_threshold(inputs: ThresholdInputs, counts: GalleryCounts, tail: ImpostorTail | None,
                       tail_source: TailSource | None, requested: float | None = None) -> IdentifyThreshold:
    common: dict[str, Any] = {"counts": counts, "tail": tail, "tail_source": tail_source}
    if requested is not None:
        return IdentifyThreshold(requested, "request", None, **common)
    if inputs.fixed is not None:
        return IdentifyThreshold(inputs.fixed, "setting", None, **common)
    if tail is not None:
        found = threshold_for_gallery(tail, inputs.fpir, counts.identities, counts.counted_faces)
        # a tiny gallery would allow a looser threshold than 1:1 verification: never go below that
        return IdentifyThreshold(max(found.threshold, inputs.verify), "fpir", inputs.fpir,
                                 extrapolated=found.extrapolated, **common)
    if inputs.model_identify is not None:
        return IdentifyThreshold(inputs.model_identify, "model", None, **common)
    return IdentifyThreshold(inputs.verify, "verify", None, **common)


# --- hub faces: refused at enrollment ------------------------------------------------------------
# identities asked of the gallery per new face: the enrolling one may be among them, and a few copies
HUB_SEARCH_K = HUB_RANKS + 4


@dataclass(frozen=True)
class HubFace:
    """A face about to be enrolled whose scores against many other identities are improbable."""

    face_index: int  # in the request
    probability: float  # hub_probability of its scores (Bonferroni-corrected)
    identities: list[str]  # the other identities it scores highest against, best first (the m judged)
    scores: list[float]


def find_hub(decision: IdentifyThreshold, matches: list[list[Match]], enrolling: str, alpha: float) -> HubFace | None:
    """The most improbable of the new faces (``matches``: each face's gallery search, ``HUB_SEARCH_K``
    identities) if its scores against identities other than ``enrolling`` are less probable than
    ``alpha`` under the impostor tail for this gallery's n_eff; None when every face is plausible, or
    when no tail is known (then nothing says what is improbable)."""
    if decision.tail is None or alpha <= 0:
        return None
    worst: HubFace | None = None
    for index, candidates in enumerate(matches):
        others = [m for m in candidates if m.identity_id != enrolling and m.score < COPY_SCORE][:HUB_RANKS]
        probability, rank = hub_probability(decision.tail, [m.score for m in others], decision.n_eff)
        if probability < alpha and (worst is None or probability < worst.probability):
            worst = HubFace(index, probability, [m.identity_id for m in others[:rank]],
                            [round(m.score, 4) for m in others[:rank]])
    return worst
