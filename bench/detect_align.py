"""Photos in: detection + alignment cost per photo on CPU, and what it does to verification accuracy.

1. Timing: decode, YuNet detection and alignment ("largest" policy) of each of the 1,000 LFW
   originals in ../shared/data/lfw-250-subset (250x250), with OpenCV's default thread count and with
   one thread (what each worker of a busy thread pool gets); plus a fixed 50 of them upscaled to
   2000x2000 (detected at 640 px, aligned from the full image with area pre-shrink).
2. Accuracy of the default model (SFace) on 500 same-person pairs (each identity's two images) and
   500 different-person pairs (seeded), twice: embeddings of crops made by the service from the
   originals, and of the reference crops of the same images in ../shared/data/lfw-112.
   Reported: accuracy at the model's threshold (0.314), the best threshold chosen on the same 1,000
   pairs (in-sample, optimistic), and 10-fold cross-validated accuracy (threshold picked on 9 folds,
   measured on the 10th).
3. Agreement per image: cosine between the service's crop and the reference crop, and the pixel
   difference when the reference's own landmarks are used (alignment alone).

    python -m bench.detect_align [--data ../shared/data] [--seed 0]
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from bench.common import machine, percentiles, save
from harness.server import MODEL_CACHE, REPO
from service.config import Settings
from service.errors import ErrorCode, ServiceError
from service.faces.detection import ARCFACE_112, PhotoAligner, YuNetConfig, YuNetDetector, align_face
from service.faces.images import decode_photo, read_header
from service.model.prepare import default_model
from service.model.session import FaceSession
from service.ops.decode_budget import MB, DecodeBudget

log = logging.getLogger("bench.detect_align")


def stats(ms: list[float]) -> dict:
    return {"n": len(ms), **percentiles(ms, (50, 95))}


def service_aligner(detector: YuNetDetector) -> PhotoAligner:
    """The photo path the service runs (``pipeline.photo_aligner``), with the default settings'
    decode budget and no metrics."""
    defaults = {name: field.default for name, field in Settings.model_fields.items()}
    budget = DecodeBudget(defaults["decode_memory_mb"] * MB, defaults["max_decode_mb"] * MB,
                          defaults["decode_wait_ms"] / 1000)
    return PhotoAligner(detector, ARCFACE_112, budget)


def aligned_photo(aligner: PhotoAligner, data: bytes, policy: str = "largest") -> list:
    """The service's crops of one photo (``PhotoAligner.aligned``); none when no face was found."""
    try:
        return aligner.aligned(read_header(data), 0, policy)  # type: ignore[arg-type]
    except ServiceError as exc:
        if exc.code != ErrorCode.no_face:
            raise
        return []


def time_photos(aligner: PhotoAligner, encoded: list[bytes]) -> dict:
    """The steps of ``PhotoAligner.aligned`` timed apart: decode = header + budgeted decode + colour
    policy; detect_plus_align = detect + select + align."""
    decode_ms, detect_align_ms = [], []
    for data in encoded:
        t0 = time.perf_counter()
        with aligner.pixels(read_header(data), 0) as rgb:
            t1 = time.perf_counter()
            try:
                aligner.align(rgb, aligner.detect(rgb), "largest", 0)
            except ServiceError as exc:
                if exc.code != ErrorCode.no_face:
                    raise
            t2 = time.perf_counter()
        decode_ms.append((t1 - t0) * 1000)
        detect_align_ms.append((t2 - t1) * 1000)
    return {"decode": stats(decode_ms), "detect_plus_align": stats(detect_align_ms)}


class Embedder:
    """The model on the service's FaceSession (CPU), in chunks of ``batch`` crops."""

    def __init__(self, model_path: Path) -> None:
        self.session = FaceSession(model_path)
        self.contract = self.session.contract

    def __call__(self, crops: list[np.ndarray], batch: int = 32) -> np.ndarray:
        out = [self.session.embed(np.stack(crops[start:start + batch])) for start in range(0, len(crops), batch)]
        return np.concatenate(out)


def make_pairs(identities: list[str], seed: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Image indices (identity i's images are 2i and 2i+1): 500 same, 500 seeded different pairs."""
    same = [(2 * i, 2 * i + 1) for i in range(len(identities))]
    rng = np.random.default_rng(seed)
    different: set[tuple[int, int]] = set()
    while len(different) < len(identities):
        a, b = rng.choice(len(identities), size=2, replace=False)
        pair = (2 * int(a) + int(rng.integers(2)), 2 * int(b) + int(rng.integers(2)))
        different.add(tuple(sorted(pair)))
    return same, sorted(different)


def accuracy_at(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    return float(np.mean((scores >= threshold) == labels))


def best_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    candidates = np.unique(scores)
    # midpoints between neighbouring scores, so the threshold is not fitted onto one pair
    midpoints = (candidates[1:] + candidates[:-1]) / 2
    thresholds = np.concatenate([[candidates[0] - 1e-6], midpoints, [candidates[-1] + 1e-6]])
    accs = np.array([accuracy_at(scores, labels, t) for t in thresholds])
    i = int(np.argmax(accs))
    return float(thresholds[i]), float(accs[i])


def ten_fold(scores: np.ndarray, labels: np.ndarray, seed: int) -> dict:
    order = np.random.default_rng(seed).permutation(len(scores))
    folds = np.array_split(order, 10)
    accs, thresholds = [], []
    for k in range(10):
        test = folds[k]
        train = np.concatenate([folds[j] for j in range(10) if j != k])
        t, _ = best_threshold(scores[train], labels[train])
        thresholds.append(t)
        accs.append(accuracy_at(scores[test], labels[test], t))
    return {"mean": round(float(np.mean(accs)), 4), "std": round(float(np.std(accs)), 4),
            "thresholds_mean": round(float(np.mean(thresholds)), 4)}


def verification(emb: np.ndarray, same: list, different: list, threshold: float, seed: int) -> dict:
    pairs = same + different
    labels = np.array([True] * len(same) + [False] * len(different))
    scores = np.array([float(emb[a] @ emb[b]) for a, b in pairs])
    t_best, acc_best = best_threshold(scores, labels)
    return {
        "accuracy_at_model_threshold": round(accuracy_at(scores, labels, threshold), 4),
        "true_accept_rate_at_model_threshold": round(float(np.mean(scores[labels] >= threshold)), 4),
        "false_accept_rate_at_model_threshold": round(float(np.mean(scores[~labels] >= threshold)), 4),
        "best_threshold_in_sample": {"threshold": round(t_best, 4), "accuracy": round(acc_best, 4)},
        "ten_fold_cv": ten_fold(scores, labels, seed),
        "same_mean_cosine": round(float(scores[labels].mean()), 4),
        "different_mean_cosine": round(float(scores[~labels].mean()), 4),
    }


def read_reference_landmarks(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="") as handle:
        return {row["path"]: np.array([[float(row[f"x{i}"]), float(row[f"y{i}"])] for i in range(5)])
                for row in csv.DictReader(handle)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--model-cache", type=Path, default=MODEL_CACHE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--big-photos", type=int, default=50, help="how many originals to time at 2000x2000")
    parser.add_argument("--policy", choices=["largest", "center"], default="largest",
                        help="which face of a photo is aligned (the reference crops took the one nearest the centre)")
    parser.add_argument("--name", help="result file name (default: detect_align, or detect_align_<policy>)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    originals_dir = args.data / "lfw-250-subset" / "images"
    reference_dir = args.data / "lfw-112" / "images"
    identities = sorted(p.name for p in originals_dir.iterdir() if p.is_dir())
    files = [f for ident in identities for f in sorted((originals_dir / ident).glob("*.jpg"))[:2]]
    assert len(files) == 2 * len(identities), "every identity needs two images"
    relative = [f"{f.parent.name}/{f.name}" for f in files]
    encoded = [f.read_bytes() for f in files]

    load_before = os.getloadavg()  # the timings are only as clean as the machine was idle
    config = YuNetConfig()
    detector = YuNetDetector(config)
    aligner = service_aligner(detector)
    default_threads = cv2.getNumThreads()
    for data in encoded[:20]:  # warm-up: first-call allocations
        aligned_photo(aligner, data)

    log.info("timing %d photos", len(files))
    timing = {f"250px_cv2_threads_{default_threads}": time_photos(aligner, encoded)}
    cv2.setNumThreads(1)
    timing["250px_cv2_threads_1"] = time_photos(aligner, encoded)
    big = []
    for f in files[:: max(1, len(files) // args.big_photos)][: args.big_photos]:
        upscaled = cv2.resize(np.asarray(Image.open(f).convert("RGB")), (2000, 2000), interpolation=cv2.INTER_CUBIC)
        bgr = cv2.cvtColor(upscaled, cv2.COLOR_RGB2BGR)
        big.append(cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    timing["2000px_cv2_threads_1"] = time_photos(aligner, big)
    cv2.setNumThreads(default_threads)
    timing[f"2000px_cv2_threads_{default_threads}"] = time_photos(aligner, big)

    log.info("aligning and embedding")
    reference_landmarks = read_reference_landmarks(args.data / "lfw-112" / "yunet_landmarks_250px.csv")
    ours, references, no_face, other_face, pixel_diffs = [], [], [], [], []
    for rel, data in zip(relative, encoded):
        rgb = decode_photo(data)
        reference = np.asarray(Image.open(reference_dir / rel).convert("RGB"))
        references.append(reference)
        exact = align_face(rgb, reference_landmarks[rel])
        pixel_diffs.append(float(np.abs(exact.astype(int) - reference.astype(int)).mean()))
        found = aligned_photo(aligner, data, args.policy)
        if not found:
            no_face.append(rel)
            ours.append(np.zeros((112, 112, 3), np.uint8))  # counted as a failure: embeds as noise
            continue
        (aligned,) = found
        if np.abs(aligned.face.landmarks_array - reference_landmarks[rel]).max() > 10:
            other_face.append(rel)  # the policy chose another face than the reference's "nearest the centre"
        ours.append(aligned.crop)

    model_path = default_model(args.model_cache)
    embed = Embedder(model_path)
    t0 = time.perf_counter()
    emb_ours = embed(ours)
    emb_ref = embed(references)
    embed_seconds = time.perf_counter() - t0
    threshold = embed.contract.threshold
    same, different = make_pairs(identities, args.seed)
    agreement = np.sum(emb_ours * emb_ref, axis=1)

    payload = {
        "benchmark": "detect_align",
        "machine": machine() | {"opencv": cv2.__version__, "cv2_default_threads": default_threads,
                                "load_average_1_5_15_min": {"start": [round(v, 2) for v in load_before],
                                                            "end": [round(v, 2) for v in os.getloadavg()]}},
        "config": {
            "detector": detector.name, "detector_config": asdict(config), "policy": args.policy,
            "alignment": "arcface-5pt-112", "model": embed.contract.model_id, "model_threshold": threshold,
            "photos": len(files), "identities": len(identities), "same_pairs": len(same),
            "different_pairs": len(different), "seed": args.seed,
            "different_pairs_rule": "numpy default_rng(seed): two distinct identities, one of their two images "
                                    "each, no repeats",
            "timing": "sequential, one photo at a time, after 20 warm-up photos, through the service's photo path "
                      "(detection.PhotoAligner, default decode budget); decode = bytes -> header -> budgeted decode "
                      "-> upright RGB; detect_plus_align = YuNet + 'largest' + warpAffine; model not included",
            "big_photos": f"{len(big)} originals upscaled to 2000x2000 (cubic), JPEG q90",
        },
        "timing_cpu": timing,
        "verification": {
            "service_detect_align_on_originals": verification(emb_ours, same, different, threshold, args.seed),
            "reference_crops_lfw_112": verification(emb_ref, same, different, threshold, args.seed),
        },
        "agreement_with_reference_crops": {
            "no_face_detected": no_face,
            "chosen_face_is_not_reference_face": other_face,
            "embedding_cosine_service_vs_reference": {
                "mean": round(float(agreement.mean()), 4), "p1": round(float(np.percentile(agreement, 1)), 4),
                "p5": round(float(np.percentile(agreement, 5)), 4), "min": round(float(agreement.min()), 4),
                "fraction_ge_0_95": round(float(np.mean(agreement >= 0.95)), 4),
                "lowest": sorted((round(float(c), 4), rel) for c, rel in zip(agreement, relative))[:8],
            },
            "pixel_mean_abs_diff_reference_landmarks": {
                "mean": round(float(np.mean(pixel_diffs)), 3),
                "p95": round(float(np.percentile(pixel_diffs, 95)), 3),
                "max": round(float(np.max(pixel_diffs)), 3),
                "note": "our alignment with the reference's own landmarks vs the reference JPEG (q95) crop, "
                        "0..255 levels",
            },
        },
        "embedding_seconds_for_2000_crops": round(embed_seconds, 1),
        "gpu": "not measured: YuNet runs in OpenCV's DNN module, which in the opencv-python-headless wheel is CPU-only",
    }
    path = save(args.name or ("detect_align" if args.policy == "largest" else f"detect_align_{args.policy}"), payload)
    log.info("saved %s", path)


if __name__ == "__main__":
    main()
