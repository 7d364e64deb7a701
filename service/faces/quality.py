"""Face quality: the parts, the model's fitted combination of them, and the enrollment decision.

Every part is measured where its input is (docs: ../design.md section 4):

* ``size`` (inter-ocular distance in the photo's pixels) and ``yaw``/``pitch``/``roll`` (degrees) from
  the detector's landmarks (``detection.geometry``), ``detector`` (the detector's score);
* ``sharpness`` (variance of the Laplacian of the aligned crop's face region, 0..255 gray levels),
  ``exposure`` (mean gray level of the face region) and ``clipping`` (share of its pixels at <= 5 or
  >= 250) from the aligned crop (here);
* ``blockiness`` (``images.blockiness``: how strongly a JPEG 8x8 block grid shows, ~1 for none) on the
  photo around the face before the alignment warps it, or on an aligned crop itself; held to a limit
  of its own (fitted on JPEG-compressed photos by bench/quality.py), not part of the score: the
  photos the score is fitted on are all well compressed, so it carries nothing there;
* ``norm``, the model-based part: the L2 norm of the model's raw output before normalisation (for
  SFace it carries quality: bench/quality.py measures it against the mirror-agreement alternative).

``QualityModel`` (the model contract's ``face.quality``) holds the fitted combination: a logistic
regression of "this face's genuine comparison fails at FMR 1e-3" on transformed parts, one for photos
(all parts) and one for aligned crops (no size, pose or detector score: a crop has no photo), the
limit each part is held to and the default enrollment limit on the combined score. ``score`` is the
fitted chance that a genuine comparison of the face succeeds at that operating point, in [0, 1]. A
model without ``face.quality`` gets ``GENERIC_LIMITS`` on size, pose, sharpness and exposure only,
and no score.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..model.calibration import calibration_files, write_calibration_file
from ..model.preprocess import row_norms
from .detection.detector import DetectedFace
from .detection.geometry import face_geometry
from .images import blockiness

log = logging.getLogger(__name__)

PARTS = ("size", "yaw", "pitch", "roll", "sharpness", "exposure", "clipping", "blockiness", "detector", "norm")
LIMIT_ONLY = ("blockiness",)  # held to a limit, not part of the fitted score
PHOTO_ONLY = ("size", "yaw", "pitch", "roll", "detector")  # need the photo and the detector's landmarks
NOT_MEASURED = "aligned crop: no photo or landmarks to measure it on"

# Limits held without a fitted quality model: (min, max), None = unbounded. Chosen from what the
# default model measured (bench/quality.py on LFW originals), loose enough for any 112 px model.
GENERIC_LIMITS: dict[str, tuple[float | None, float | None]] = {
    "size": (16.0, None),
    "yaw": (-50.0, 50.0),
    "pitch": (-40.0, 40.0),
    "roll": (-45.0, 45.0),
    "sharpness": (15.0, None),
    "exposure": (35.0, 235.0),
    "clipping": (None, 0.5),
}

# face region of a 112x112 ArcFace crop (eyebrows to chin, cheek to cheek), scaled for other sizes
_REGION = (0.25, 0.92, 0.18, 0.82)  # top, bottom, left, right as fractions of the crop


def crop_parts(crop: np.ndarray, photo_blockiness: float | None = None) -> dict[str, float]:
    """Sharpness, exposure and clipping of an aligned HxWx3 uint8 RGB crop, and blockiness: the photo's
    around the face (``photo_blockiness``, measured before the warp) or, for an aligned crop, the crop's."""
    h, w = crop.shape[:2]
    top, bottom, left, right = (int(round(f * n)) for f, n in zip(_REGION, (h, h, w, w)))
    gray = cv2.cvtColor(np.ascontiguousarray(crop[top:bottom, left:right]), cv2.COLOR_RGB2GRAY)
    scale = 112.0 / h  # the Laplacian's variance per pixel of a 112-px crop
    sharpness = float(cv2.Laplacian(gray, cv2.CV_32F).var()) * scale**4
    # exact counts over the pixel count: the values np.mean gives, without its Python-level overhead
    pixels = gray.size
    clipped = (pixels - cv2.countNonZero(cv2.inRange(gray, 6, 249))) / pixels  # share at <= 5 or >= 250
    exposure = int(np.add.reduce(gray, axis=None, dtype=np.uint64)) / pixels
    return {"sharpness": sharpness, "exposure": exposure, "clipping": clipped,
            "blockiness": blockiness(crop) if photo_blockiness is None else float(photo_blockiness)}


def photo_parts(face: DetectedFace) -> dict[str, float]:
    """Size, pose and detector score of a detected face."""
    g = face_geometry(face)
    return {"size": g.interocular_px, "yaw": g.yaw, "pitch": g.pitch, "roll": g.roll, "detector": float(face.score)}


def features(parts: dict[str, float], names: tuple[str, ...]) -> np.ndarray:
    """The transformed parts the logistic model is fitted on, in ``names`` order."""
    out = []
    for name in names:
        if name == "size":
            out.append(math.log(max(parts["size"], 1.0)))
        elif name in ("yaw", "pitch", "roll"):
            out.append(abs(parts[name]))
        elif name in ("sharpness", "blockiness"):
            out.append(math.log1p(max(parts[name], 0.0)))
        elif name == "exposure":
            out.append(abs(parts["exposure"] - 127.5))
        else:
            out.append(float(parts[name]))
    return np.asarray(out, dtype=np.float64)


@dataclass(frozen=True)
class Logistic:
    """P(fail) = sigmoid(bias + weights . (features - mean) / scale)."""

    names: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float

    @cached_property
    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """mean, scale and weights as arrays, made once (``score`` runs for every face)."""
        return np.asarray(self.mean), np.asarray(self.scale), np.asarray(self.weights)

    def score(self, parts: dict[str, float]) -> float:
        mean, scale, weights = self._arrays
        z = (features(parts, self.names) - mean) / scale
        logit = self.bias + float(weights @ z)
        return 1.0 - 1.0 / (1.0 + math.exp(-max(min(logit, 50.0), -50.0)))

    def as_dict(self) -> dict:
        return {"names": list(self.names), "mean": list(self.mean), "scale": list(self.scale),
                "weights": list(self.weights), "bias": self.bias}

    @classmethod
    def from_dict(cls, d: dict) -> Logistic:
        n = len(d["names"])
        if not (len(d["mean"]) == len(d["scale"]) == len(d["weights"]) == n) or not set(d["names"]) <= set(PARTS):
            raise ValueError("quality logistic: names, mean, scale and weights must match and name known parts")
        return cls(tuple(d["names"]), tuple(map(float, d["mean"])), tuple(map(float, d["scale"])),
                   tuple(map(float, d["weights"])), float(d["bias"]))


def fit_logistic(x: np.ndarray, fails: np.ndarray, names: tuple[str, ...], l2: float = 1.0,
                 weights: np.ndarray | None = None) -> Logistic:
    """Ridge-penalised logistic regression (Newton's method) of ``fails`` (0/1 per row) on the
    feature rows ``x`` (``features`` of each face)."""
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale < 1e-9] = 1.0
    z = np.hstack([np.ones((len(x), 1)), (x - mean) / scale])
    w = np.zeros(z.shape[1])
    sample = np.ones(len(x)) if weights is None else weights
    penalty = np.full(z.shape[1], l2)
    penalty[0] = 0.0
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-np.clip(z @ w, -50, 50)))
        grad = z.T @ (sample * (p - fails)) + penalty * w
        hess = (z * (sample * p * (1 - p))[:, None]).T @ z + np.diag(penalty) + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return Logistic(names, tuple(mean.tolist()), tuple(scale.tolist()), tuple(w[1:].tolist()), float(w[0]))


@dataclass(frozen=True)
class QualityModel:
    """The fitted quality of one face model (its contract's ``face.quality``)."""

    photo: Logistic  # faces found in photos: every part
    crop: Logistic  # aligned crops: the crop-based and model-based parts only
    limits: dict[str, tuple[float | None, float | None]]  # part -> (min, max)
    min_score: float  # the default enrollment limit on the score of a face found in a photo
    min_score_crop: float  # ... of an aligned crop (its score comes from the crop-only regression)
    method: str = ""
    evidence: dict = field(default_factory=dict, compare=False)  # what the fit measured (figures)

    def to_json(self) -> str:
        return json.dumps({"photo": self.photo.as_dict(), "crop": self.crop.as_dict(),
                           "limits": {k: list(v) for k, v in self.limits.items()}, "min_score": self.min_score,
                           "min_score_crop": self.min_score_crop,
                           "method": self.method, "evidence": self.evidence}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> QualityModel:
        try:
            d = json.loads(text)
            limits = {str(k): (_opt(v[0]), _opt(v[1])) for k, v in d["limits"].items()}
            if not set(limits) <= set(PARTS):
                raise ValueError(f"limits name unknown parts: {sorted(set(limits) - set(PARTS))}")
            model = cls(Logistic.from_dict(d["photo"]), Logistic.from_dict(d["crop"]), limits,
                        float(d["min_score"]), float(d["min_score_crop"]), str(d.get("method", "")),
                        dict(d.get("evidence", {})))
        except (KeyError, TypeError, IndexError, json.JSONDecodeError) as exc:
            raise ValueError(f"malformed quality model: {exc}") from exc
        if not (0.0 <= model.min_score <= 1.0 and 0.0 <= model.min_score_crop <= 1.0):
            raise ValueError("quality min_score must lie in [0, 1]")
        return model


def _opt(v: Any) -> float | None:
    return None if v is None else float(v)


@dataclass(frozen=True)
class Quality:
    """One face's quality: its parts (value and limits), the score, and the parts that failed."""

    parts: dict[str, float | None]
    limits: dict[str, tuple[float | None, float | None]]
    score: float | None  # None: no fitted quality model
    fitted: bool
    default_min: float | None = None  # the model's default enrollment limit for a face of this kind

    def limit(self, setting: float | None, requested: float | None = None, force: bool = False) -> float | None:
        """The score limit this face is held to: the setting (FACE_ENROLL_MIN_QUALITY), else the model's
        default; a request's ``requested`` may raise it, or with ``force`` replace it (lower too)."""
        if force:
            return requested
        base = setting if setting is not None else self.default_min
        if requested is None:
            return base
        return requested if base is None else max(base, requested)

    def failures(self, min_score: float | None) -> list[dict]:
        """Each limit this face misses: part, value, limit, and by how much."""
        out = []
        if min_score is not None and self.score is not None and self.score < min_score:
            out.append({"part": "score", "value": round(self.score, 4), "limit": round(min_score, 4),
                        "by": round(min_score - self.score, 4)})
        for name, (lo, hi) in self.limits.items():
            value = self.parts.get(name)
            if value is None:
                continue
            if lo is not None and value < lo:
                out.append({"part": name, "value": round(value, 4), "limit": lo, "by": round(lo - value, 4)})
            elif hi is not None and value > hi:
                out.append({"part": name, "value": round(value, 4), "limit": hi, "by": round(value - hi, 4)})
        return out

    def as_dict(self, min_score: float | None) -> dict:
        """The API's ``quality`` object."""
        parts: dict[str, dict] = {}
        for name in PARTS:
            value = self.parts.get(name)
            lo, hi = self.limits.get(name, (None, None))
            if value is None:
                parts[name] = {"value": None, "reason": NOT_MEASURED if name in PHOTO_ONLY else "not measured"}
                continue
            passed = (lo is None or value >= lo) and (hi is None or value <= hi)
            parts[name] = {"value": round(value, 4), "min": lo, "max": hi, "passed": passed}
        failed = self.failures(min_score)
        return {"score": None if self.score is None else round(self.score, 4),
                "min_score": None if min_score is None or self.score is None else round(min_score, 4),
                "passed": not failed, "failed": failed, "fitted": self.fitted, "parts": parts}


def assess(parts: dict[str, float | None], model: QualityModel | None) -> Quality:
    """Combine one face's measured parts (photo parts None for an aligned crop) with the fitted model."""
    if model is None:
        return Quality(parts, GENERIC_LIMITS, None, fitted=False)
    from_photo = all(parts.get(name) is not None for name in PHOTO_ONLY)
    logistic = model.photo if from_photo else model.crop
    measured = {k: v for k, v in parts.items() if v is not None}
    return Quality(parts, model.limits, logistic.score(measured), fitted=True,
                   default_min=model.min_score if from_photo else model.min_score_crop)


def quality_in_force(model: QualityModel | None, setting: float | None, source: str | None = "model") -> dict:
    """What /readyz says about quality: fitted or not (``source``: ``model``, the contract's, or
    ``gallery``, refitted by calibrate), the enrollment score limits, each part's limits."""
    limits = {name: {"min": lo, "max": hi} for name, (lo, hi) in (model.limits if model else GENERIC_LIMITS).items()}
    if model is None:
        return {"fitted": False, "min_score": None, "min_score_crop": None, "limits": limits,
                "note": "the model has no fitted quality (face.quality): faces get no score and are held to "
                        "the generic size, pose, sharpness and exposure limits only"}
    return {"fitted": True, "source": source, "min_score": setting if setting is not None else model.min_score,
            "min_score_crop": setting if setting is not None else model.min_score_crop,
            "limits": limits, "method": model.method}


def raw_norms(raw: np.ndarray) -> np.ndarray:
    """The model-based part of each row of the model's raw output."""
    return row_norms(np.asarray(raw, dtype=np.float64))


CROP_PARTS = tuple(p for p in PARTS if p not in PHOTO_ONLY)
REFUSE_SHARE = 0.01  # the default enrollment limit refuses this share of the fitting faces


def _part_limit(logistic: Logistic, name: str, typical: dict[str, float], min_score: float,
                span: tuple[float, float], upper: bool) -> float | None:
    """Where moving only ``name`` away from a typical face (the fitting faces' medians) takes the
    score below ``min_score``, searched over ``span``; None when it never does."""
    grid = np.linspace(span[0], span[1], 400)
    if not upper:
        grid = grid[::-1]
    passed = None
    for v in grid:
        if logistic.score({**typical, name: float(v)}) < min_score:
            return passed
        passed = float(v)
    return None


def fit_quality(parts: list[dict[str, float]], fails: np.ndarray, method: str = "", l2: float = 1.0,
                drop: tuple[str, ...] = (), evidence: dict | None = None) -> QualityModel:
    """Fit a model's quality on faces found in photos: ``parts`` of each face (every part of
    ``PARTS`` not in ``drop``), ``fails`` 1 where its genuine comparison failed at the operating point.

    The default enrollment limit refuses ``REFUSE_SHARE`` of these faces. Each part's limit is where that
    part alone (the others at their median) takes the score below that limit, but never looser than
    ``GENERIC_LIMITS`` (a part the fit barely weighs would otherwise allow a 2-pixel face); parts with
    no such point keep the generic limit. ``LIMIT_ONLY`` parts are not scored and get no limit here
    (``fit_part_limit`` fits theirs on faces where they vary: bench/quality.py for the default model)."""
    drop = (*drop, *LIMIT_ONLY, *(p for p in PARTS if any(p not in row for row in parts)))  # aligned crops: no photo parts
    photo_names = tuple(p for p in PARTS if p not in drop)
    crop_names = tuple(p for p in CROP_PARTS if p not in drop)
    x = np.array([features(p, photo_names) for p in parts])
    photo = fit_logistic(x, fails, photo_names, l2)
    crop = fit_logistic(np.array([features(p, crop_names) for p in parts]), fails, crop_names, l2)
    scores = np.array([photo.score(p) for p in parts])
    min_score = float(np.floor(np.quantile(scores, REFUSE_SHARE) * 1000) / 1000)
    crop_scores = np.array([crop.score(p) for p in parts])
    min_score_crop = float(np.floor(np.quantile(crop_scores, REFUSE_SHARE) * 1000) / 1000)
    typical = {name: float(np.median([p[name] for p in parts])) for name in PARTS if name in parts[0]}
    spans = {"size": (1.0, 400.0), "yaw": (0.0, 90.0), "pitch": (0.0, 90.0), "roll": (0.0, 90.0),
             "sharpness": (0.0, 5000.0), "exposure": (0.0, 127.5), "clipping": (0.0, 1.0),
             "detector": (0.0, 1.0), "norm": (0.0, 100.0)}
    limits: dict[str, tuple[float | None, float | None]] = dict(GENERIC_LIMITS)
    for name in photo_names:
        if name in ("yaw", "pitch", "roll"):
            at = _part_limit(photo, name, {**typical, name: 0.0}, min_score, spans[name], upper=True)
            if at is not None:
                limits[name] = (-round(at, 1), round(at, 1))
        elif name == "exposure":  # the feature is the distance from mid-gray, so the limits are symmetric
            hi = _part_limit(photo, name, {**typical, name: 127.5}, min_score, (127.5, 255.0), upper=True)
            if hi is not None:
                limits[name] = (round(255.0 - hi, 1), round(hi, 1))
        elif name in ("clipping",):
            at = _part_limit(photo, name, typical, min_score, spans[name], upper=True)
            if at is not None:
                limits[name] = (None, round(at, 3))
        else:
            at = _part_limit(photo, name, typical, min_score, spans[name], upper=False)
            if at is not None:
                limits[name] = (round(at, 3), None)
    for name, (lo, hi) in GENERIC_LIMITS.items():
        fit_lo, fit_hi = limits[name]
        limits[name] = (_stricter(fit_lo, lo, max), _stricter(fit_hi, hi, min))
    return QualityModel(photo, crop, limits, min_score, min_score_crop, method, evidence or {})


def fit_part_limit(values: np.ndarray, fails: np.ndarray, name: str, max_fail: float) -> tuple[float, Logistic]:
    """The upper limit of one part from faces where it varies (``values``; ``fails``: each face's soft
    genuine-failure label): a logistic regression of failure on the part alone, and the value where the
    fitted chance that a genuine comparison fails reaches ``max_fail``."""
    x = np.array([features({name: float(v)}, (name,)) for v in values])
    logistic = fit_logistic(x, fails, (name,), l2=0.0)
    grid = np.exp(np.linspace(0.0, math.log(max(float(np.max(values)), 1.0) * 2), 2000)) - 1.0
    failing = [v for v in grid if logistic.score({name: float(v)}) < 1.0 - max_fail]
    if not failing or logistic.weights[0] <= 0:
        raise ValueError(f"{name}: failure does not rise with it on these faces; no limit can be fitted")
    return round(float(failing[0]), 3), logistic


def keep_limits_of(model: QualityModel, fitted: QualityModel | None) -> QualityModel:
    """``model`` (a refit on faces where the ``LIMIT_ONLY`` parts do not vary) with those parts' limits
    from ``fitted`` (the model contract's), which was fitted where they vary."""
    if fitted is None:
        return model
    kept = {name: fitted.limits[name] for name in LIMIT_ONLY if name in fitted.limits and name not in model.limits}
    return replace(model, limits={**model.limits, **kept}) if kept else model


def _stricter(a: float | None, b: float | None, pick: Any) -> float | None:
    if a is None or b is None:
        return b if a is None else a
    return float(pick(a, b))


# --- fitting on labelled faces (bench/quality.py, ``python -m service calibrate --quality``, the exporter) ---
FIT_FMR = 1e-3  # the operating point whose genuine failures the score predicts
SOFT_WIDTH = 0.03  # cosine width of the soft failure label around the threshold


def genuine_and_threshold(embeddings: np.ndarray, labels: np.ndarray,
                          fmr: float = FIT_FMR) -> tuple[np.ndarray, np.ndarray, float]:
    """Genuine pairs (i, j) of L2-normalised ``embeddings``, their cosine, and the threshold at ``fmr``
    over every impostor pair."""
    emb = np.asarray(embeddings, dtype=np.float64)
    labels = np.asarray(labels)
    sims = emb @ emb.T
    iu = np.triu_indices(len(emb), 1)
    same = labels[iu[0]] == labels[iu[1]]
    impostor = sims[iu][~same]
    if len(impostor) < 1 / fmr or not same.any():
        raise ValueError(f"need genuine pairs and at least {1 / fmr:.0f} impostor pairs, got {int(same.sum())} "
                         f"and {len(impostor)}")
    threshold = float(np.quantile(impostor, 1 - fmr, method="higher"))
    genuine = np.stack([iu[0][same], iu[1][same]], axis=1)
    return genuine, sims[genuine[:, 0], genuine[:, 1]], threshold


def soft_fail_labels(n: int, genuine: np.ndarray, sims: np.ndarray, threshold: float) -> np.ndarray:
    """Per face: how much its genuine comparisons fail at the threshold, as a soft label in [0, 1] (a
    logistic of width SOFT_WIDTH around the threshold, averaged over the face's genuine pairs). A hard
    0/1 label leaves too few failures to fit on (~2% of LFW's genuine pairs fail at FMR 1e-3)."""
    soft = 1.0 / (1.0 + np.exp(-(threshold - sims) / SOFT_WIDTH))
    total, count = np.zeros(n), np.zeros(n)
    np.add.at(total, genuine[:, 0], soft)
    np.add.at(total, genuine[:, 1], soft)
    np.add.at(count, genuine[:, 0], 1)
    np.add.at(count, genuine[:, 1], 1)
    return np.where(count > 0, total / np.maximum(count, 1), 0.0)


def fit_on_labelled(parts: list[dict[str, float]], embeddings: np.ndarray, labels: np.ndarray, source: str,
                    drop: tuple[str, ...] = ()) -> QualityModel:
    """The quality model of faces of known people: ``parts`` of each face (with ``norm``), their
    L2-normalised ``embeddings`` and person ``labels``. Faces without a genuine pair still count
    (label 0: nothing failed)."""
    genuine, sims, threshold = genuine_and_threshold(embeddings, labels)
    fails = soft_fail_labels(len(parts), genuine, sims, threshold)
    method = (f"logistic regression (ridge 1.0, standardised transformed parts) of each face's genuine "
              f"comparison failing at FMR {FIT_FMR:g} (threshold {threshold:.4f}; soft label, width {SOFT_WIDTH}) "
              f"on {source}: {len(parts)} faces, {len(genuine)} genuine pairs; crop model: the crop and model "
              f"parts only; default limits: the score refusing {REFUSE_SHARE:.0%} of those faces, and each "
              f"part's value that alone takes a median face below it (never looser than the generic limits)")
    return fit_quality(parts, fails, method=method, drop=drop,
                       evidence={"faces": len(parts), "genuine_pairs": int(len(genuine)),
                                 "threshold": round(threshold, 5),
                                 "fnmr": round(float(np.mean(sims < threshold)), 5)})


# --- a gallery's own fit (``python -m service calibrate --quality``), preferred to the contract's ---
GALLERY_QUALITY_FILE = "quality.json"  # in the data dir: calibration/<model id>/quality.json


def save_gallery_quality(data_dir: Path, model_id: str, model: QualityModel) -> Path:
    """Store a refitted quality of model ``model_id`` for the service on ``data_dir`` (atomically; read at
    start-up): ``DATA/calibration/<model id>/quality.json`` (``service.model.calibration.calibration_file``)."""
    return write_calibration_file(data_dir, model_id, GALLERY_QUALITY_FILE,
                                  {"model_id": model_id, "quality": json.loads(model.to_json())})


def gallery_quality(data_dir: Path, model_id: str) -> QualityModel | None:
    """The data dir's refitted quality for ``model_id`` (its own file, else a ``DATA/quality.json`` fitted
    before several models were served); None when there is none (or it is another model's, which is
    logged), or when its file cannot be read (logged: the model's own quality applies, as a damaged
    gallery tail leaves the model's tail)."""
    path = next((p for p in calibration_files(data_dir, model_id, GALLERY_QUALITY_FILE) if p.exists()), None)
    if path is None:
        return None
    try:
        stored = json.loads(path.read_text())
        if stored.get("model_id") != model_id:
            log.warning("ignoring a quality fitted for another model", extra={"path": str(path),
                                                                              "fitted_for": stored.get("model_id"),
                                                                              "served": model_id})
            return None
        return QualityModel.from_json(json.dumps(stored["quality"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        log.warning("refitted quality unreadable; ignored, the model's quality applies",
                    extra={"path": str(path), "model_id": model_id}, exc_info=True)
        return None
