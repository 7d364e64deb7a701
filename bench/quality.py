"""Face quality (issue 21): fit the default model's quality, and prove that it predicts errors.

1. Collect (cached under $TMPDIR/face-bench/quality-*.npz): every part of each face
   (``service.faces.quality``) and the model's raw output for the face and its mirror image, for
   * the 1,000 LFW originals of ../shared/data/lfw-250-subset through the service's own photo path
     (``detection.PhotoAligner``: decode, YuNet, ``center`` face, alignment);
   * the 6,289 CelebA crops of ../shared/data/celeba-299-112 (aligned 112x112 JPEGs; size, pose and
     detector score from its landmarks.csv, i.e. the same YuNet on the original CelebA photo);
     its mirror embeddings are collected too, but only LFW's are compared (mirror agreement vs norm);
   * graded degradations of 40 LFW originals (Gaussian blur, downscaling, JPEG quality, darkening,
     5 strengths each, level 0 = untouched) through the same photo path.
2. Fit (``service.faces.quality.fit_quality``): each face's label is how much its genuine comparisons fail
   at its population's FMR 1e-3 threshold (``service.faces.quality.soft_fail_labels``); LFW and CelebA are
   fitted together; the curves score each face by the model fitted on the other half of the
   identities (2 folds, cross-fitted); parts whose removal improves the cross-fitted curves are
   dropped from the score (their limits stay); the shipped model is fitted on all faces.
3. Error-versus-reject curves (ISO/IEC 29794-1): threshold at FMR 1e-3 on all impostor pairs, then
   drop the genuine comparisons whose lower-quality face scores lowest, FNMR against the fraction
   dropped; for the combined score, each single part, the mirror agreement, and random dropping.
4. Degradations: Spearman's rho of score vs strength per kind, refusal at the default limits.

    python -m bench.quality [--data ../shared/data] [--write-model]   # ~10 min on 2 cores (first run)

Writes bench/results/quality.json and quality_erc.png; ``--write-model`` also writes the default
model's ``service/model/sface_quality.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import logging
import os
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from bench.common import machine, save
from harness.server import MODEL_CACHE, REPO
from service.errors import ErrorCode, ServiceError
from service.faces.detection import ARCFACE_112, PhotoAligner, YuNetDetector
from service.faces.images import blockiness, read_header
from service.faces.quality import (
    CROP_PARTS,
    FIT_FMR,
    LIMIT_ONLY,
    PARTS,
    SOFT_WIDTH,
    QualityModel,
    assess,
    crop_parts,
    fit_part_limit,
    fit_quality,
    genuine_and_threshold,
    photo_parts,
    raw_norms,
    soft_fail_labels,
)
from service.model.prepare import SFACE_QUALITY_FILE, default_model
from service.model.session import FaceSession

log = logging.getLogger("bench.quality")
CACHE = Path(os.environ.get("TMPDIR", "/tmp")) / "face-bench"
FMR = FIT_FMR
DEGRADATIONS = {
    "blur": [0, 1.5, 3, 5, 8],  # Gaussian sigma in photo pixels
    "downscale": [1, 0.5, 0.3, 0.2, 0.12],  # photo scale factor (LFW eyes ~45 px apart at 1)
    "jpeg": [100, 30, 15, 8, 3],  # JPEG quality
    "darken": [1, 0.5, 0.3, 0.15, 0.07],  # pixel values x factor
}
JPEG_FIT = [100, 50, 30, 20, 15, 10, 8, 6, 5, 4, 3, 2]  # JPEG qualities the blockiness limit is fitted on
# blockiness is refused where a genuine comparison is more likely to fail than not (its fitted failure
# chance on the compressed faces); the score limit's own failure chance (1 - min_score, ~0.67) left 5 of
# 34 quality-3 faces passing, 4 of which fail at FMR 1e-3 (the JSON records both limits)
BLOCKINESS_MAX_FAIL = 0.5


def degrade(rgb: np.ndarray, kind: str, level: float) -> bytes:
    """A degraded copy of a photo, encoded (PNG, or JPEG at the given quality)."""
    out = rgb
    if kind == "blur" and level > 0:
        out = cv2.GaussianBlur(rgb, (0, 0), level)
    elif kind == "downscale" and level < 1:
        h, w = rgb.shape[:2]
        out = cv2.resize(rgb, (max(1, round(w * level)), max(1, round(h * level))), interpolation=cv2.INTER_AREA)
    elif kind == "darken" and level < 1:
        out = np.clip(rgb.astype(np.float32) * level, 0, 255).round().astype(np.uint8)
    buf = io.BytesIO()
    if kind == "jpeg":
        Image.fromarray(out).save(buf, format="JPEG", quality=int(level))
    else:
        Image.fromarray(out).save(buf, format="PNG")
    return buf.getvalue()


class Collector:
    def __init__(self) -> None:
        self.session = FaceSession(default_model(MODEL_CACHE))
        self.aligner = PhotoAligner(YuNetDetector(), ARCFACE_112)

    def photo(self, data: bytes) -> tuple[dict, np.ndarray] | None:
        try:
            aligned = self.aligner.aligned(read_header(data), 0, "center")[0]
        except ServiceError as exc:
            if exc.code != ErrorCode.no_face:
                raise
            return None
        return {**photo_parts(aligned.face), **crop_parts(aligned.crop, aligned.blockiness)}, aligned.crop

    def embed(self, crops: list[np.ndarray], mirror: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Raw outputs of the crops and (``mirror``) of their mirror images, else zeros."""
        raw, mirrored = [], []
        for start in range(0, len(crops), 64):
            chunk = np.stack(crops[start:start + 64])
            raw.append(self.session.raw(chunk))
            mirrored.append(self.session.raw(chunk[:, :, ::-1].copy()) if mirror else np.zeros_like(raw[-1]))
        return np.concatenate(raw), np.concatenate(mirrored)


def parts_matrix(rows: list[dict | None]) -> np.ndarray:
    return np.array([[np.nan if r is None else r.get(p, np.nan) for p in PARTS] for r in rows], dtype=np.float64)


def collect_lfw(col: Collector, root: Path) -> dict:
    cache = CACHE / "quality-lfw-v2.npz"
    if cache.exists():
        return dict(np.load(cache))
    files = sorted((root / "images").glob("*/*.jpg"))
    rows, crops, found = [], [], []
    for i, f in enumerate(files):
        got = col.photo(f.read_bytes())
        rows.append(None if got is None else got[0])
        found.append(got is not None)
        crops.append(got[1] if got else np.zeros((112, 112, 3), np.uint8))
        if i % 200 == 0:
            log.info("lfw %d/%d", i, len(files))
    raw, mirror = col.embed(crops)
    out = {"parts": parts_matrix(rows), "raw": raw, "mirror": mirror, "found": np.array(found),
           "identity": np.array([f.parent.name for f in files])}
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    return out


def collect_celeba(col: Collector, root: Path) -> dict:
    cache = CACHE / "quality-celeba-v2.npz"
    if cache.exists():
        return dict(np.load(cache))
    import csv

    marks = {r["file"]: r for r in csv.DictReader(open(root / "landmarks.csv"))}
    files = sorted((root / "images").glob("*/*.jpg"))
    rows, crops = [], []
    for f in files:
        crop = np.asarray(Image.open(f).convert("RGB"))
        r = marks.get(f"{f.parent.name}/{f.name}")
        parts = crop_parts(crop)
        if r is not None:
            from service.faces.detection import DetectedFace

            pts = tuple((float(r[f"x{i}"]), float(r[f"y{i}"])) for i in range(5))
            box = (float(r["bbox_x"]), float(r["bbox_y"]), float(r["bbox_w"]), float(r["bbox_h"]))
            parts.update(photo_parts(DetectedFace(box=box, landmarks=pts, score=float(r["score"]))))
        rows.append(parts)
        crops.append(crop)
    raw, mirror = col.embed(crops)
    out = {"parts": parts_matrix(rows), "raw": raw, "mirror": mirror, "found": np.ones(len(files), bool),
           "identity": np.array([f.parent.name for f in files])}
    np.savez(cache, **out)
    return out


def collect_jpeg_fit(col: Collector, root: Path, n: int) -> dict:
    """JPEG-compressed copies (``JPEG_FIT`` qualities) of ``n`` LFW originals other than the degraded
    ones (offset by half the stride: other photos, other people), for fitting the blockiness limit."""
    cache = CACHE / f"quality-jpeg-fit-{n}.npz"
    if cache.exists():
        return dict(np.load(cache))
    stride = max(1, 1000 // n)
    all_files = sorted((root / "images").glob("*/*.jpg"))
    picked = list(range(stride // 2, len(all_files), stride))[:n]
    rows, crops, source = [], [], []
    for j in picked:
        rgb = np.asarray(Image.open(all_files[j]).convert("RGB"))
        for quality in JPEG_FIT:
            got = col.photo(degrade(rgb, "jpeg", quality))
            rows.append(None if got is None else got[0])
            crops.append(got[1] if got else np.zeros((112, 112, 3), np.uint8))
            source.append(j)
    raw, _ = col.embed(crops, mirror=False)
    out = {"parts": parts_matrix(rows), "raw": raw, "source": np.array(source)}
    np.savez(cache, **out)
    return out


def blockiness_limit(fit: dict, lfw: dict, min_score: float) -> dict:
    """The blockiness limit (``service.faces.quality.fit_part_limit``): each compressed face's soft failure
    label against its person's other LFW originals at LFW's FMR 1e-3 threshold, a logistic regression of
    it on blockiness alone, and the value where a genuine comparison becomes more likely to fail than not
    (``BLOCKINESS_MAX_FAIL``); the value where the fitted failure chance reaches the score limit's
    (1 - ``min_score``) is recorded too."""
    genuine, sims, threshold = comparisons(lfw)
    del genuine, sims
    emb = unit(lfw["raw"].astype(np.float64))
    col = PARTS.index("blockiness")
    values, labels = [], []
    for i in range(len(fit["raw"])):
        if np.isnan(fit["parts"][i, col]):
            continue  # no face found in the compressed photo
        src = int(fit["source"][i])
        mates = [k for k in np.flatnonzero(lfw["identity"] == lfw["identity"][src]) if k != src and lfw["found"][k]]
        if not mates:
            continue
        s = emb[mates] @ unit(fit["raw"][i:i + 1].astype(np.float64))[0]
        labels.append(float(np.mean(1.0 / (1.0 + np.exp(-(threshold - s) / SOFT_WIDTH)))))
        values.append(float(fit["parts"][i, col]))
    limit, logistic = fit_part_limit(np.array(values), np.array(labels), "blockiness", BLOCKINESS_MAX_FAIL)
    at_score_limit, _ = fit_part_limit(np.array(values), np.array(labels), "blockiness", 1.0 - min_score)
    return {"limit": limit, "max_fail": BLOCKINESS_MAX_FAIL, "limit_at_score_limit_fail_chance": at_score_limit,
            "faces": len(values), "photos": int(len(np.unique(fit["source"]))),
            "jpeg_qualities": JPEG_FIT, "logistic": logistic.as_dict(),
            "mean_fail_label": round(float(np.mean(labels)), 4)}


def collect_degraded(col: Collector, root: Path, n: int) -> dict:
    cache = CACHE / f"quality-degraded-{n}-v2.npz"
    if cache.exists():
        return dict(np.load(cache))
    files = sorted((root / "images").glob("*/*.jpg"))[::max(1, 1000 // n)][:n]
    rows, crops, kinds, levels, photos = [], [], [], [], []
    for j, f in enumerate(files):
        rgb = np.asarray(Image.open(f).convert("RGB"))
        for kind, strengths in DEGRADATIONS.items():
            for level_i, level in enumerate(strengths):
                got = col.photo(degrade(rgb, kind, level))
                rows.append(None if got is None else got[0])
                crops.append(got[1] if got else np.zeros((112, 112, 3), np.uint8))
                kinds.append(kind)
                levels.append(level_i)
                photos.append(j)
    raw, mirror = col.embed(crops, mirror=False)  # the mirror agreement is compared on LFW only
    out = {"parts": parts_matrix(rows), "raw": raw, "mirror": mirror, "kind": np.array(kinds),
           "level": np.array(levels), "photo": np.array(photos)}
    np.savez(cache, **out)
    return out


# each part oriented so that higher is better, for the single-part curves
SINGLE = {
    "size": lambda p: p["size"], "yaw": lambda p: -abs(p["yaw"]), "pitch": lambda p: -abs(p["pitch"]),
    "roll": lambda p: -abs(p["roll"]), "sharpness": lambda p: p["sharpness"],
    "exposure": lambda p: -abs(p["exposure"] - 127.5), "clipping": lambda p: -p["clipping"],
    "blockiness": lambda p: -p["blockiness"], "detector": lambda p: p["detector"], "norm": lambda p: p["norm"],
}
SCORED = tuple(p for p in PARTS if p not in LIMIT_ONLY)


def rows_of(data: dict) -> list[dict[str, float]]:
    """Each face's parts as a dict (with the model part, the raw output's norm)."""
    norms = raw_norms(data["raw"])
    return [{**{p: float(v) for p, v in zip(PARTS, row) if not np.isnan(v)}, "norm": float(n)}
            for row, n in zip(data["parts"], norms)]


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def comparisons(data: dict) -> tuple[np.ndarray, np.ndarray, float]:
    """Genuine pairs (i, j) among the faces found, their cosine, and the FMR 1e-3 threshold over every
    impostor pair (``service.faces.quality.genuine_and_threshold``), in the data set's face indices."""
    found = np.flatnonzero(data["found"])
    genuine, sims, threshold = genuine_and_threshold(unit(data["raw"][found].astype(np.float64)),
                                                     data["identity"][found])
    return found[genuine], sims, threshold


def erc(quality: np.ndarray, genuine: np.ndarray, sims: np.ndarray, threshold: float,
        fractions: np.ndarray) -> list[float]:
    """FNMR at the fixed threshold after dropping the ``fractions`` of genuine comparisons whose
    lower-quality face scores lowest (ties broken by pair order)."""
    pair_q = np.minimum(quality[genuine[:, 0]], quality[genuine[:, 1]])
    order = np.argsort(pair_q, kind="stable")
    out = []
    for f in fractions:
        kept = order[int(round(f * len(order))):]
        out.append(float(np.mean(sims[kept] < threshold)) if len(kept) else 0.0)
    return out


def ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), as Spearman's rho needs."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x), dtype=float)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.zeros(len(counts))
    np.add.at(sums, inverse, r)
    return (sums / counts)[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def crossfit_scores(rows: list[dict], labels: np.ndarray, folds: np.ndarray, drop: tuple[str, ...] = ()) -> np.ndarray:
    """Each face scored by the model fitted on the other fold (identities never straddle folds)."""
    out = np.zeros(len(rows))
    for k in np.unique(folds):
        train = [i for i in range(len(rows)) if folds[i] != k]
        model = fit_quality([rows[i] for i in train], labels[train], drop=drop)
        for i in np.flatnonzero(folds == k):
            out[i] = model.photo.score(rows[i])
    return out


def plot(path: Path, curves: dict[str, list[float]], fractions: np.ndarray, title: str) -> None:
    """A line plot with Pillow (matplotlib is not a dependency): FNMR against the fraction rejected."""
    from PIL import ImageDraw

    w, h, left, bottom, top, right = 900, 560, 70, 50, 40, 220
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    ymax = max(max(c) for c in curves.values()) * 1.1 or 1.0
    fx = lambda f: left + (w - left - right) * f / fractions[-1]  # noqa: E731
    fy = lambda v: h - bottom - (h - top - bottom) * v / ymax  # noqa: E731
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for t in np.linspace(0, fractions[-1], 7):
        d.text((fx(t) - 10, h - bottom + 6), f"{t:.2f}", fill="black")
    for t in np.linspace(0, ymax, 6):
        d.text((8, fy(t) - 6), f"{t:.4f}", fill="black")
    d.text((left, 10), title, fill="black")
    d.text((w // 2 - 120, h - 20), "fraction of genuine comparisons rejected", fill="black")
    colours = ["red", "black", "blue", "green", "orange", "purple", "brown", "gray", "teal", "olive", "navy", "pink",
               "magenta", "cyan"]
    for n, (name, ys) in enumerate(curves.items()):
        colour = colours[n % len(colours)]
        pts = [(fx(f), fy(y)) for f, y in zip(fractions, ys)]
        d.line(pts, fill=colour, width=3 if n < 2 else 1)
        d.text((w - right + 10, top + 16 * n), name, fill=colour)
    img.save(path)


def degradation_report(data: dict, model: QualityModel) -> dict:
    rows = rows_of(data)
    found = ~np.isnan(data["parts"][:, 0])
    out = {}
    for kind, strengths in DEGRADATIONS.items():
        sel = data["kind"] == kind
        scores, refused, no_face = [], [], []
        for i in np.flatnonzero(sel):
            if not found[i]:
                scores.append(0.0)  # no face found: refused at enrollment (no_face) before any quality
                refused.append(True)
                no_face.append(True)
                continue
            q = assess(rows[i], model)
            scores.append(float(q.score))  # type: ignore[arg-type]
            refused.append(bool(q.failures(q.default_min)))
            no_face.append(False)
        levels = data["level"][sel]
        s, r, nf = np.array(scores), np.array(refused), np.array(no_face)
        out[kind] = {
            "strengths": strengths,
            "spearman_rho_score_vs_strength": round(spearman(levels.astype(float), s), 4),
            # blockiness (held to its own limit, not in the score), over the faces found
            "spearman_rho_blockiness_vs_strength": round(spearman(
                levels[~nf].astype(float), np.array([rows[i]["blockiness"] for i in np.flatnonzero(sel & found)])), 4),
            "median_score_by_level": [round(float(np.median(s[levels == k])), 4) for k in range(len(strengths))],
            "refused_share_by_level": [round(float(r[levels == k].mean()), 4) for k in range(len(strengths))],
            "no_face_share_by_level": [round(float(nf[levels == k].mean()), 4) for k in range(len(strengths))],
        }
    return out


def cost(col: Collector, root: Path, n: int, model: QualityModel) -> dict:
    """The photo path of a one-face /embed (decode, detect, align, embed one crop) with and without the
    quality steps, interleaved in one run; the model's share is measured, not assumed."""
    files = sorted((root / "images").glob("*/*.jpg"))[:n]
    blobs = [f.read_bytes() for f in files]
    rgbs = {data: read_header(data).to_rgb() for data in blobs}
    without, with_q, step, blocky = [], [], [], []
    for rnd in range(3):
        for data in blobs:
            for quality in ((False, True) if rnd % 2 == 0 else (True, False)):
                t0 = time.perf_counter()
                aligned = col.aligner.aligned(read_header(data), 0, "largest")[0]
                raw = col.session.raw(aligned.crop[None])
                vec = unit(raw)
                if quality:
                    t1 = time.perf_counter()
                    parts = {**photo_parts(aligned.face), **crop_parts(aligned.crop, aligned.blockiness)}
                    assess({**parts, "norm": float(raw_norms(raw)[0])}, model)
                    step.append(time.perf_counter() - t1)
                    t2 = time.perf_counter()  # blockiness is measured in the alignment (before the warp): time it
                    blockiness(rgbs[data], aligned.face.box)
                    blocky.append(time.perf_counter() - t2)
                (with_q if quality else without).append(time.perf_counter() - t0)
                del vec
    a, b = float(np.median(without)) * 1000, float(np.median(with_q)) * 1000
    return {"photos": n, "rounds": 3, "median_ms_without_quality": round(a, 3), "median_ms_with_quality": round(b, 3),
            "added_share": round((b - a) / a, 4),
            # the quality step alone (parts + score), timed inside the runs above: steadier on a busy machine
            # (parts + score, plus the blockiness measure, which runs in the alignment: in both timings)
            "quality_step_median_ms": round(float(np.median(step) + np.median(blocky)) * 1000, 3),
            "blockiness_median_ms": round(float(np.median(blocky)) * 1000, 3),
            "quality_step_share_of_without": round(float(np.median(step) + np.median(blocky)) * 1000 / a, 4)}


def analyse(col: Collector, args: argparse.Namespace, lfw: dict, celeba: dict, degraded: dict,
            jpeg_fit: dict) -> dict:
    """Fit on both populations together (each face labelled against its own population's FMR 1e-3
    threshold), cross-fitted by identity for the curves; ship the fit on all faces."""
    fractions = np.round(np.arange(0, 0.301, 0.01), 2)
    auc = lambda ys: round(float(np.mean(ys[:21])), 5)  # noqa: E731  mean FNMR over 0..20% rejected
    at10 = lambda ys: round(ys[10], 5)  # noqa: E731
    rng = np.random.default_rng(0)
    pops: dict[str, dict] = {}
    for name, data in (("lfw", lfw), ("celeba", celeba)):
        rows = rows_of(data)
        genuine, sims, threshold = comparisons(data)
        pops[name] = {"rows": rows, "genuine": genuine, "sims": sims, "threshold": threshold,
                      "labels": soft_fail_labels(len(rows), genuine, sims, threshold),
                      "folds": np.unique(data["identity"], return_inverse=True)[1] % 2, "data": data}
    rows = pops["lfw"]["rows"] + pops["celeba"]["rows"]
    labels = np.concatenate([pops["lfw"]["labels"], pops["celeba"]["labels"]])
    folds = np.concatenate([pops["lfw"]["folds"], pops["celeba"]["folds"]])  # identities never straddle folds
    split = len(pops["lfw"]["rows"])

    def curve(pop: str, quality: np.ndarray) -> list[float]:
        p = pops[pop]
        return erc(quality, p["genuine"], p["sims"], p["threshold"], fractions)

    def crossfit(drop: tuple[str, ...] = ()) -> dict[str, list[float]]:
        scores = crossfit_scores(rows, labels, folds, drop)
        return {"lfw": curve("lfw", scores[:split]), "celeba": curve("celeba", scores[split:])}

    def merit(c: dict[str, list[float]]) -> float:  # mean FNMR 0-20% rejected, relative to none, both sets
        return float(sum(np.mean(ys[:21]) / ys[0] for ys in c.values()))

    every = crossfit()
    ablation = {part: crossfit((part,)) for part in SCORED}
    drop = tuple(p for p in SCORED if p != "norm" and merit(ablation[p]) < merit(every))
    chosen = crossfit(drop) if drop else every
    if merit(chosen) >= merit(every):  # parts that help a little alone may still help together
        drop, chosen = (), every
    curves: dict[str, dict[str, list[float]]] = {}
    for pop, p in pops.items():
        c = {"combined (cross-fitted)": chosen[pop]}
        if drop:
            c["combined, every part (cross-fitted)"] = every[pop]
        c["random (mean of 100)"] = list(np.mean([curve(pop, rng.random(len(p["rows"]))) for _ in range(100)], axis=0))
        for name, f in SINGLE.items():
            c[name] = curve(pop, np.array([f(r) for r in p["rows"]]))
        c["mirror agreement"] = curve(pop, np.sum(unit(p["data"]["raw"]) * unit(p["data"]["mirror"]), axis=1))
        curves[pop] = c
    method = (f"logistic regression (ridge 1.0, standardised transformed parts) of each face's genuine comparison "
              f"failing at FMR {FMR:g} of its population (soft label, width {SOFT_WIDTH}), fitted on the 1,000 LFW "
              f"originals of lfw-250-subset through the service's photo path and the 6,289 CelebA-299 crops (photo "
              f"parts from their landmarks.csv) together (bench/quality.py); parts whose removal helped the "
              f"cross-fitted error-versus-reject curves dropped from the score: {', '.join(drop) or 'none'}; crop "
              f"model: the crop and model parts only; default limits: the score refusing 1% of those faces, and "
              f"each part's value that alone takes a median face below it (never looser than the generic limits)")
    model = fit_quality(rows, labels, method=method, drop=drop)
    blocky = blockiness_limit(jpeg_fit, lfw, model.min_score)
    model = dataclasses.replace(model, limits={**model.limits, "blockiness": (None, blocky["limit"])},
                                method=model.method + f"; blockiness (not scored): limit {blocky['limit']:g} where a "
                                "logistic regression of genuine failure on blockiness alone, fitted on JPEG-compressed "
                                f"copies of {blocky['photos']} other LFW originals (qualities {JPEG_FIT[0]}..{JPEG_FIT[-1]}), "
                                f"reaches a {BLOCKINESS_MAX_FAIL:.0%} chance of failing")
    # the default enrollment decision on LFW's originals (a photo without a face would be no_face)
    lfw_rows = pops["lfw"]["rows"]
    refused = [q.failures(q.default_min) for q in (assess(r, model) for r in lfw_rows)]
    as_crops = [assess({k: v for k, v in r.items() if k in CROP_PARTS}, model) for r in lfw_rows]
    c_rows = pops["celeba"]["rows"]
    c_crop = np.array([assess({k: v for k, v in r.items() if k in CROP_PARTS}, model).score for r in c_rows], float)
    curves["celeba"]["shipped model, crop parts only (in-sample)"] = curve("celeba", c_crop)
    for pop, title in (("lfw", "LFW originals"), ("celeba", "CelebA-299 crops")):
        suffix = "" if pop == "lfw" else "_celeba"
        plot(REPO / "bench" / "results" / f"quality_erc{suffix}.png", curves[pop], fractions,
             f"{title}: FNMR at FMR {FMR:g} (thr {pops[pop]['threshold']:.3f}) vs share rejected")

    def summary(pop: str) -> dict:
        p, c = pops[pop], curves[pop]
        return {"faces": len(p["rows"]), "genuine_pairs": len(p["genuine"]),
                "threshold_fmr_1e-3": round(p["threshold"], 5), "fnmr_no_rejection": round(c["random (mean of 100)"][0], 5),
                "fnmr_at_10pct_rejected": {k: at10(v) for k, v in c.items()},
                "mean_fnmr_0_to_20pct": {k: auc(v) for k, v in c.items()},
                "ablation_fnmr_at_10pct_without": {part: at10(ablation[part][pop]) for part in SCORED},
                "fractions": fractions.tolist(), "curves": c}

    lfw_summary = {
        **summary("lfw"), "dropped_parts": list(drop),
        "default_limits_refuse_share": round(float(np.mean([bool(r) for r in refused])), 4),
        "default_limits_refuse_share_as_aligned_crops": round(float(np.mean(
            [bool(q.failures(q.default_min)) for q in as_crops])), 4),
        "refused_by": {p: int(sum(any(x["part"] == p for x in r) for r in refused)) for p in ("score", *PARTS)},
    }
    model = dataclasses.replace(model, evidence={
        "lfw_fnmr": lfw_summary["fnmr_no_rejection"],
        "lfw_fnmr_10pct_rejected": lfw_summary["fnmr_at_10pct_rejected"]["combined (cross-fitted)"],
        "celeba_fnmr": summary("celeba")["fnmr_no_rejection"],
        "celeba_fnmr_10pct_rejected": summary("celeba")["fnmr_at_10pct_rejected"]["combined (cross-fitted)"],
        "lfw_refused_share": lfw_summary["default_limits_refuse_share"], "results": "bench/results/quality.json"})
    return {
        "model": model,
        "lfw": lfw_summary,
        "celeba": {**summary("celeba"),
                   "note": "aligned crops; size, pose and detector score from its landmarks.csv (YuNet on the "
                           "original CelebA photo), so the photo score is measured; the crop-only score too"},
        "blockiness_limit_fit": {**blocky, "jpeg_refused_share_by_level_at_score_limit_fail_chance": degradation_report(
            degraded, dataclasses.replace(model, limits={**model.limits, "blockiness": (
                None, blocky["limit_at_score_limit_fail_chance"])}))["jpeg"]["refused_share_by_level"]},
        "degradations": degradation_report(degraded, model),
        "cost": cost(col, args.data / "lfw-250-subset", args.cost_photos, model),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--degraded", type=int, default=40, help="LFW photos degraded")
    parser.add_argument("--cost-photos", type=int, default=40, help="photos timed for the cost figure")
    parser.add_argument("--collect-only", action="store_true")
    parser.add_argument("--write-model", action="store_true",
                        help="write the fitted model to service/model/" + SFACE_QUALITY_FILE)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    col = Collector()
    t0 = time.time()
    lfw = collect_lfw(col, args.data / "lfw-250-subset")
    celeba = collect_celeba(col, args.data / "celeba-299-112")
    degraded = collect_degraded(col, args.data / "lfw-250-subset", args.degraded)
    jpeg_fit = collect_jpeg_fit(col, args.data / "lfw-250-subset", args.degraded)
    log.info("collected in %.0f s", time.time() - t0)
    if args.collect_only:
        return
    result = analyse(col, args, lfw, celeba, degraded, jpeg_fit)
    model: QualityModel = result.pop("model")
    if args.write_model:
        (REPO / "service" / "model" / SFACE_QUALITY_FILE).write_text(
            json_pretty(model.to_json()))
    load = os.getloadavg()
    path = save("quality", {"machine": {**machine(), "load_average": [round(x, 2) for x in load]},
                            "config": {"fmr": FMR, "soft_width": SOFT_WIDTH, "degraded_photos": args.degraded,
                                       "degradations": DEGRADATIONS, "model_id": col.session.contract.model_id},
                            "quality_model": model.to_json(), **result})
    log.info("saved %s", path)


def json_pretty(text: str) -> str:
    import json

    return json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    main()
