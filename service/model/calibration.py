"""A model's impostor tail, and the open-set threshold it gives for a gallery of a given size.

The impostor tail is the 1:1 false-accept rate (FAR) of a model as a function of the cosine: the
share of pairs of faces of *different* people that score at least that high. It is measured once on
a labelled calibration set (every cross-identity pair: for the 5,749 people of LFW, 87 million
pairs, so FAR is known down to about 1e-7) and kept as a small log-spaced table FAR -> cosine.

Open-set identification answers "unknown" unless the best gallery score reaches a threshold. A
stranger's probe is compared with every enrolled face; if the n comparisons behaved like independent
draws from the impostor distribution, the chance that at least one reaches the threshold t (the
false-positive identification rate, FPIR) would be ``1 - (1 - FAR(t))**n``. Inverting it gives the
per-comparison FAR for a target FPIR, and the table gives the threshold. The comparisons are not
independent (one probe against many faces; several faces of one enrolled person resemble each other)
so ``n`` is an *effective* count: ``n_eff = N * (F/N)**alpha`` for N identities holding F faces, with
``alpha`` (the weight of an identity's extra faces) chosen on LFW (1.0: every enrolled face counts);
bench/open_set.py measures how well the result holds. F counts each identity's faces only up to
``FACES_COUNTED_PER_IDENTITY`` (F = sum of min(f_i, cap)): an identity's extra faces resemble its
others, so they add ever fewer chances, and one identity stuffed with thousands of near-duplicates
must not raise the threshold for everyone (bench/poisoning.py).

A face that scores high against many *different* identities at once is improbable for a real face
(``hub_probability``): a crafted "hub" (the mean of many faces) would capture strangers, so the
service refuses it at enrollment.

numpy only (no onnx, no TensorFlow): the exporter and the service both call it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from .files import replace_atomically

# log-spaced FAR grid of the stored table: 4 points per decade from 0.56 to 1e-8. Points the
# calibration set cannot resolve, fewer than MIN_TAIL_PAIRS pairs above them, are left out (a
# quantile of 200 pairs is good to ~7%); below the table the last decade's slope is extended.
FAR_GRID = tuple(10.0 ** (-k / 4) for k in range(1, 33))
MIN_TAIL_PAIRS = 200
BINS_PER_UNIT = 10_000  # histogram resolution: 1e-4 in cosine
MAX_PER_PERSON = 5  # faces of one person that take part in a calibration (see impostor_histogram)
# weight of extra faces per identity in n_eff (1.0 = every face a full chance, 0 = only identities
# count). bench/open_set.py sweeps it on LFW galleries with 2-5 faces per person: 1.0 held FPIR 1%
# best (0.93-1.07%; 0.75: 1.2-1.3%; 0: 1.4-2.8%), so faces are simply counted
FACES_ALPHA = 1.0
# faces of one identity that count toward F (and n_eff): sum_i min(f_i, cap). bench/poisoning.py
# measured on the 19 LFW people with over 40 photos how many independent chances f of an identity's
# faces give a stranger (at FAR 1e-3): 1.95 for 2, 3.8 for 5, 6.9 for 10, 11.2 for 20, 16.6 for 40
# (sublinear: they resemble each other). min(f, 20) is at least that for every f measured, leaves the
# open-set protocol (2-5 faces) unchanged, and bounds what one stuffed identity adds to n_eff to 19.
# Stored in the postgres counters: changing it recounts them at the next start.
FACES_COUNTED_PER_IDENTITY = 20
# hub check: the K best other identities a new face is compared with; ranks m = HUB_MIN_RANK..K are
# judged (min over them of the chance that m impostor comparisons score that high, times the ranks
# judged). Starting at 8 lets one person be enrolled under up to 7 other ids (a likeness, not a hub);
# a crafted hub is most improbable at the 16th rank anyway (bench/poisoning.py: starting at 2, 4 or 8
# changed no figure). Scores of COPY_SCORE and above are the same picture enrolled again: not judged.
HUB_RANKS = 16
HUB_MIN_RANK = 8
COPY_SCORE = 0.95


class CalibrationError(ValueError):
    """A calibration set or a stored table that cannot give an impostor tail."""


@dataclass(frozen=True)
class ImpostorTail:
    """FAR -> cosine, FAR decreasing and cosine increasing; ``pairs`` impostor pairs measured."""

    far: tuple[float, ...]
    cosine: tuple[float, ...]
    pairs: int
    source: str = ""  # what it was measured on, for people reading /readyz
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if len(self.far) != len(self.cosine) or len(self.far) < 2:
            raise CalibrationError("an impostor tail needs at least two (far, cosine) points of equal count")
        if any(b >= a for a, b in zip(self.far, self.far[1:])) or any(not 0 < f < 1 for f in self.far):
            raise CalibrationError("impostor tail FARs must lie in (0, 1) and decrease")
        if any(b < a for a, b in zip(self.cosine, self.cosine[1:])):
            raise CalibrationError("impostor tail cosines must not decrease as FAR decreases")

    # --- lookups (interpolated linearly in log10 FAR) -----------------------------------------
    # The table as arrays, made once per tail (not per lookup: /identify looks up every candidate).
    # cached_property writes the instance __dict__ directly, which a frozen dataclass allows.
    @cached_property
    def _log_far(self) -> np.ndarray:
        return _frozen(np.log10(np.asarray(self.far)))

    @cached_property
    def _cosines(self) -> np.ndarray:
        return _frozen(np.asarray(self.cosine))

    def threshold_at(self, far: float) -> float:
        """The cosine an impostor pair reaches with probability ``far``.

        Below the smallest FAR measured the last decade's slope is extended (capped at 1): the
        figure is then an extrapolation, which ``extrapolated(far)`` says."""
        x = self._log_far[::-1]
        y = self._cosines[::-1]
        lf = math.log10(min(max(far, 1e-300), 0.999999))
        if lf < x[0]:
            k = min(len(x) - 1, 4)  # last decade: 4 grid points
            slope = (y[k] - y[0]) / (x[k] - x[0])
            return float(min(1.0, y[0] + slope * (lf - x[0])))
        return float(np.interp(lf, x, y))

    def far_at(self, cosine: float) -> float:
        """The share of impostor pairs scoring at least ``cosine`` (clamped to the table's ends)."""
        y = self._cosines
        lx = self._log_far
        if cosine <= y[0]:  # the bulk of the distribution: not what this table is for
            return float(self.far[0])
        if cosine >= y[-1]:
            k = max(0, len(y) - 5)
            slope = (lx[-1] - lx[k]) / max(y[-1] - y[k], 1e-6)
            return float(10 ** (lx[-1] + slope * (cosine - y[-1])))
        return float(10 ** np.interp(cosine, y, lx))

    def extrapolated(self, far: float) -> bool:
        return far < self.far[-1]

    # --- storage ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The JSON-ready form (what ``to_json`` writes): FARs to 4 significant digits, cosines to 4 decimals."""
        return {"far": [float(f"{f:.4g}") for f in self.far], "cosine": [round(c, 4) for c in self.cosine],
                "pairs": int(self.pairs), "source": self.source, **self.extra}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict) -> ImpostorTail:
        try:
            known = {"far", "cosine", "pairs", "source"}
            return cls(far=tuple(float(f) for f in data["far"]), cosine=tuple(float(c) for c in data["cosine"]),
                       pairs=int(data["pairs"]), source=str(data.get("source", "")),
                       extra={k: v for k, v in data.items() if k not in known})
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, CalibrationError):
                raise
            raise CalibrationError(f"malformed impostor tail: {exc}") from exc

    @classmethod
    def from_json(cls, text: str) -> ImpostorTail:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise CalibrationError(f"malformed impostor tail: {exc}") from exc
        return cls.from_dict(data)


def _frozen(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False  # shared by every lookup of the tail: nobody may change it
    return array


def cap_per_person(labels: np.ndarray, cap: int) -> np.ndarray:
    """Indices keeping each person's first ``cap`` faces (in the given order)."""
    labels = np.asarray(labels)
    rank = np.zeros(len(labels), dtype=np.int64)
    seen: dict = {}
    for i, label in enumerate(labels.tolist()):
        rank[i] = seen.get(label, 0)
        seen[label] = rank[i] + 1
    return np.flatnonzero(rank < cap)


def impostor_histogram(embeddings: np.ndarray, labels: np.ndarray, block: int = 1024,
                       max_per_person: int | None = MAX_PER_PERSON) -> np.ndarray:
    """Counts of cross-identity pair cosines in bins of 1/BINS_PER_UNIT over [-1, 1].

    Every unordered pair of different labels once, by blocked matrix products (a 13k x 13k score
    matrix never exists at once). At most ``max_per_person`` faces of each person take part: pairs
    grow with the product of two people's face counts, and a gallery compares people, so a few
    people with hundreds of photos (LFW has one with 530) must not make the tail theirs."""
    keep = cap_per_person(labels, max_per_person) if max_per_person else np.arange(len(labels))
    x = np.ascontiguousarray(np.asarray(embeddings)[keep], dtype=np.float32)
    labels = np.asarray(labels)[keep]
    n = len(x)
    nbins = 2 * BINS_PER_UNIT + 1
    counts = np.zeros(nbins, dtype=np.int64)
    for start in range(0, n, block):
        stop = min(n, start + block)
        sims = x[start:stop] @ x[start:].T  # rows start..stop against columns start..n
        rows = np.arange(start, stop)[:, None]
        cols = np.arange(start, n)[None, :]
        keep = (cols > rows) & (labels[start:stop, None] != labels[None, start:])
        scores = sims[keep]
        bins = np.clip(np.rint((scores + 1.0) * BINS_PER_UNIT), 0, nbins - 1).astype(np.int64)
        counts += np.bincount(bins, minlength=nbins)
    return counts


def tail_from_histogram(counts: np.ndarray, source: str = "", far_grid: tuple[float, ...] = FAR_GRID,
                        min_pairs: int = 1000, min_tail_pairs: int = MIN_TAIL_PAIRS) -> ImpostorTail:
    """The log-spaced FAR -> cosine table of a histogram from ``impostor_histogram``."""
    total = int(counts.sum())
    if total < min_pairs:
        raise CalibrationError(f"only {total} impostor pairs (at least {min_pairs} needed); add people")
    at_or_above = np.cumsum(counts[::-1])[::-1]  # pairs scoring >= each bin
    centres = np.arange(len(counts)) / BINS_PER_UNIT - 1.0
    far, cosine = [], []
    for target in far_grid:
        if target * total < min_tail_pairs:
            break
        # highest bin whose at-or-above count still reaches the target share
        idx = int(np.nonzero(at_or_above >= target * total)[0][-1])
        far.append(target)
        cosine.append(float(centres[idx]))
    if len(far) < 2:
        raise CalibrationError("too few impostor pairs for a tail table")
    return ImpostorTail(far=tuple(far), cosine=tuple(cosine), pairs=total, source=source)


def impostor_tail(embeddings: np.ndarray, labels: np.ndarray, source: str = "",
                  min_pairs: int = 1000) -> ImpostorTail:
    """The impostor tail of L2-normalised ``embeddings`` of faces labelled by person; refused
    (``CalibrationError``) with fewer than two people or ``min_pairs`` impostor pairs."""
    if len(set(np.asarray(labels).tolist())) < 2:
        raise CalibrationError("calibration needs faces of at least two people")
    return tail_from_histogram(impostor_histogram(embeddings, labels), source=source, min_pairs=min_pairs)


# --- gallery size -> threshold ----------------------------------------------------------------
def effective_comparisons(identities: int, faces: int, alpha: float = FACES_ALPHA) -> float:
    """How many independent chances a stranger gets against N identities holding F faces."""
    if identities <= 0:
        return 0.0
    faces = max(faces, identities)
    return identities * (faces / identities) ** alpha


def counted_faces(faces: int) -> int:
    """How many of one identity's faces count toward F in ``effective_comparisons``."""
    return min(max(faces, 0), FACES_COUNTED_PER_IDENTITY)


def far_for_fpir(fpir: float, n_eff: float) -> float:
    """Per-comparison FAR such that n_eff independent comparisons give FPIR ``fpir``."""
    if n_eff <= 1:
        return fpir
    return -math.expm1(math.log1p(-fpir) / n_eff)


def fpir_for_far(far: float, n_eff: float) -> float:
    """The chance that at least one of n_eff independent comparisons passes, each with ``far``."""
    if n_eff <= 0:
        return 0.0
    return -math.expm1(max(n_eff, 1.0) * math.log1p(-min(far, 1 - 1e-15)))


@dataclass(frozen=True)
class OpenSetThreshold:
    """The identify threshold for one gallery size, and how it was reached."""

    threshold: float
    fpir: float  # the target
    far: float  # per comparison
    n_eff: float
    extrapolated: bool  # the FAR lies below what the calibration set measured


def threshold_for_gallery(tail: ImpostorTail, fpir: float, identities: int, faces: int,
                          alpha: float = FACES_ALPHA) -> OpenSetThreshold:
    n_eff = effective_comparisons(identities, faces, alpha)
    far = far_for_fpir(fpir, max(n_eff, 1.0))
    return OpenSetThreshold(threshold=tail.threshold_at(far), fpir=fpir, far=far, n_eff=n_eff,
                            extrapolated=tail.extrapolated(far))


def stranger_probability(tail: ImpostorTail, score: float, n_eff: float) -> float:
    """Estimated chance that a never-enrolled face's best score in this gallery reaches ``score``."""
    return fpir_for_far(tail.far_at(score), n_eff)


def poisson_tail(lam: float, m: int) -> float:
    """P(X >= m) for X ~ Poisson(lam): the chance that at least m of many comparisons, each passing
    with a small probability, pass (lam = comparisons x probability); exact in log space, so tiny
    values (1e-300) stay meaningful."""
    if m <= 0:
        return 1.0
    if lam <= 0:
        return 0.0
    if lam >= m:  # the mean reaches m: not small, and not what the hub check is about
        return 1.0
    log_lam = math.log(lam)
    terms = []
    k = m
    while True:
        terms.append(-lam + k * log_lam - math.lgamma(k + 1))
        if terms[-1] < terms[0] - 40 or k > m + 10_000:  # later terms are < e-40 of the first
            break
        k += 1
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def hub_probability(tail: ImpostorTail, scores: list[float], n_eff: float) -> tuple[float, int]:
    """How probable a face's scores against *different* identities (best first, copies, scores of
    ``COPY_SCORE`` and above, left out) are under the impostor tail: min over m = HUB_MIN_RANK..HUB_RANKS
    of P(at least m of n_eff impostor comparisons reach the m-th best score), times the ranks judged
    (Bonferroni). A few high scores are a likeness (the same person under a few ids) and are not
    judged; a face near many identities at once is what a crafted hub (a mean of faces) looks like.
    Returns (probability, the m that gave it; 0 when nothing was judged)."""
    judged = [s for s in scores if s < COPY_SCORE][:HUB_RANKS]
    if len(judged) < HUB_MIN_RANK or n_eff <= 0:
        return 1.0, 0
    best, at = 1.0, 0
    for m in range(HUB_MIN_RANK, len(judged) + 1):
        p = poisson_tail(n_eff * tail.far_at(judged[m - 1]), m)
        if p < best:
            best, at = p, m
    return min(1.0, best * (HUB_RANKS - HUB_MIN_RANK + 1)), at


# --- a data dir's own calibration of each served model (``python -m service calibrate --model NAME``) ---
CALIBRATION_DIR = "calibration"  # in the data dir: calibration/<model id>/impostor_tail.json, quality.json
_UNSAFE = re.compile(r"[^A-Za-z0-9@.+_-]")


def calibration_file(data_dir: Path, model_id: str, name: str) -> Path:
    """Where a data dir keeps one model's calibration file ``name``: ``DATA/calibration/<model id>/name``,
    one folder per model id, so that calibrating one served model never replaces another's. A model id
    that is not a plain file name (a ``/``, a leading dot, other characters) is made one, with a short
    hash of the id so that two ids never share a folder."""
    slug = _UNSAFE.sub("_", model_id)
    if slug != model_id or not slug or slug.startswith("."):
        slug = f"{slug.lstrip('.') or 'model'}-{hashlib.sha256(model_id.encode()).hexdigest()[:8]}"
    return Path(data_dir) / CALIBRATION_DIR / slug / name


def write_calibration_file(data_dir: Path, model_id: str, name: str, payload: dict) -> Path:
    """Store one model's calibration file ``name`` (``calibration_file``) as JSON, whole and durably: a
    temporary file of the writer's own, fsynced and renamed (files.replace_atomically), so two calibrate
    runs at once each land a whole file and a service reading it never finds half of one."""
    path = calibration_file(data_dir, model_id, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, indent=1) + "\n"
    replace_atomically(path, lambda tmp: tmp.write_text(text), durable=True)
    return path


def calibration_files(data_dir: Path, model_id: str, name: str) -> tuple[Path, Path]:
    """The files a model's calibration ``name`` is read from, in order: its own
    (``calibration_file``), then ``DATA/name``, where a data dir calibrated before several models were
    served keeps it (used only when it names this model id)."""
    return calibration_file(data_dir, model_id, name), Path(data_dir) / name
