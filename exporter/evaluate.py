"""Verification on pairs.txt protocols (LFW View 2): 10-fold accuracy, TAR@FAR, ROC, threshold.

Protocol (as in the LFW benchmark and insightface's verification code): for each fold k, the
threshold that maximises accuracy on the other nine folds is applied to fold k; the figure is the
mean and std of the ten fold accuracies. The calibrated threshold (what ``export`` writes into the
contract) is the mean of the ten fold thresholds, measured WITHOUT flip-averaging because that is
how the service embeds. TAR@FAR uses all pairs; with 3,000 negative pairs FAR 1e-4 means "no false
accept at all" (resolution 1/3000), which the JSON states.

ONNX models are run with onnxruntime and preprocessed purely from their ``face.*`` contract (the
service's own ``preprocess``), so TensorFlow is only needed for TF sources.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from service.model.calibration import ImpostorTail
from service.model.preprocess import l2_normalise

from .images import face_files, load_faces

if TYPE_CHECKING:
    import keras

    from .config import TrainConfig

log = logging.getLogger(__name__)

FAR_TARGETS = (1e-3, 1e-4)


# --- pairs ------------------------------------------------------------------------------------------

@dataclass
class Pairs:
    """A pairs.txt: image paths of both sides, same-identity labels and the fold of each pair."""

    left: list[Path]
    right: list[Path]
    same: np.ndarray  # bool
    fold: np.ndarray  # int
    n_folds: int


def lfw_image_path(images: Path, name: str, index: int | str) -> Path:
    return images / name / f"{name}_{int(index):04d}.jpg"


def read_pairs(pairs_path: str | Path, images: str | Path | None = None) -> Pairs:
    """Parse the LFW View 2 format: header ``folds<TAB>n``, then per fold n same and n different pairs."""
    pairs_path = Path(pairs_path)
    images = Path(images) if images else pairs_path.parent / "images"
    lines = [line.split() for line in pairs_path.read_text().splitlines() if line.strip()]
    n_folds, per_fold = int(lines[0][0]), int(lines[0][1])
    left, right, same = [], [], []
    for parts in lines[1:]:
        if len(parts) == 3:
            name, a, b = parts
            left.append(lfw_image_path(images, name, a))
            right.append(lfw_image_path(images, name, b))
            same.append(True)
        elif len(parts) == 4:
            left.append(lfw_image_path(images, parts[0], parts[1]))
            right.append(lfw_image_path(images, parts[2], parts[3]))
            same.append(False)
        else:
            raise ValueError(f"{pairs_path}: malformed line {' '.join(parts)!r}")
    expected = n_folds * 2 * per_fold
    if len(same) != expected:
        raise ValueError(f"{pairs_path}: {len(same)} pairs, header promises {expected}")
    fold = np.arange(len(same)) // (2 * per_fold)
    return Pairs(left, right, np.asarray(same), fold, n_folds)


# --- metrics ----------------------------------------------------------------------------------------

def best_threshold(scores: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """(threshold, accuracy) maximising accuracy of ``score > threshold`` <=> same.

    Every split between consecutive distinct sorted scores is tried at once with cumulative counts;
    the threshold is the midpoint of the split (ties among equally good splits: the middle one).
    """
    order = np.argsort(scores, kind="stable")
    s, y = scores[order], same[order].astype(bool)
    n = len(s)
    # split i: indices < i predicted different, >= i predicted same
    neg_below = np.concatenate([[0], np.cumsum(~y)])
    pos_from = np.concatenate([np.cumsum(y[::-1])[::-1], [0]])
    correct = neg_below + pos_from
    valid = np.ones(n + 1, bool)
    valid[1:n] = s[1:] > s[:-1]  # cannot split between equal scores
    correct = np.where(valid, correct, -1)
    best = np.flatnonzero(correct == correct.max())
    i = int(best[len(best) // 2])
    if i == 0:
        threshold = s[0] - 1e-6
    elif i == n:
        threshold = s[-1] + 1e-6
    else:
        threshold = (s[i - 1] + s[i]) / 2
    return float(threshold), float(correct[i] / n)


def kfold_accuracy(scores: np.ndarray, same: np.ndarray, fold: np.ndarray) -> dict:
    """The 10-fold protocol: threshold from the other folds, accuracy on the held-out fold."""
    accuracies, thresholds = [], []
    folds = np.unique(fold)
    for k in folds:
        # a single fold has nothing to hold out: its threshold is then fitted on itself (optimistic)
        train, test = (fold != k) if len(folds) > 1 else np.ones_like(fold, bool), fold == k
        threshold, _ = best_threshold(scores[train], same[train])
        accuracies.append(float(np.mean((scores[test] > threshold) == same[test])))
        thresholds.append(threshold)
    return {
        "accuracy_mean": float(np.mean(accuracies)),
        "accuracy_std": float(np.std(accuracies)),
        "fold_accuracies": [round(a, 5) for a in accuracies],
        "fold_thresholds": [round(t, 5) for t in thresholds],
        "threshold": float(np.mean(thresholds)),
    }


def tar_at_far(scores: np.ndarray, same: np.ndarray, far: float) -> dict:
    """True-accept rate at the strictest threshold that keeps false accepts <= far * negatives."""
    negatives = np.sort(scores[~same])[::-1]
    positives = scores[same]
    allowed = int(np.floor(far * len(negatives)))
    threshold = float(negatives[min(allowed, len(negatives) - 1)])
    return {
        "far_target": far,
        "tar": float(np.mean(positives > threshold)),
        "far_actual": float(np.mean(negatives > threshold)),
        "threshold": threshold,
        # below 1/negatives the target cannot be resolved: the figure is then TAR at zero false accepts
        "resolved": far * len(negatives) >= 1,
    }


def roc_curve(scores: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FAR, TAR) at every distinct threshold, descending."""
    order = np.argsort(-scores, kind="stable")
    y = same[order].astype(bool)
    tar = np.cumsum(y) / max(y.sum(), 1)
    far = np.cumsum(~y) / max((~y).sum(), 1)
    return far, tar


def roc_summary(far: np.ndarray, tar: np.ndarray, points: int = 41) -> dict:
    """TAR at log-spaced FARs (1e-4..1), small enough for the JSON and for --compare plots."""
    grid = np.logspace(-4, 0, points)
    # best TAR reachable with FAR <= each grid point (0 where no threshold gets that low)
    best = [float(tar[far <= g].max()) if np.any(far <= g) else 0.0 for g in grid]
    return {"far": [float(f"{g:.3g}") for g in grid], "tar": [round(t, 5) for t in best]}


def verification_report(scores: np.ndarray, same: np.ndarray, fold: np.ndarray) -> dict:
    report = kfold_accuracy(scores, same, fold)
    report["roc"] = roc_summary(*roc_curve(scores, same))
    report["tar_at_far"] = {f"{far:g}": tar_at_far(scores, same, far) for far in FAR_TARGETS}
    report["positive_mean"] = float(scores[same].mean())
    report["negative_mean"] = float(scores[~same].mean())
    return report


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=90)
    for label, (far, tar) in curves.items():
        keep = far > 0
        ax.plot(far[keep], tar[keep], label=label, linewidth=1.2)
    ax.set_xscale("log")
    ax.set_xlim(1e-4, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# --- embedders --------------------------------------------------------------------------------------

class Embedder(Protocol):
    """What evaluation runs: N x size x size x 3 uint8 RGB faces -> N x D raw embeddings."""

    input_size: int
    label: str

    def __call__(self, faces: np.ndarray) -> np.ndarray: ...


class OnnxEmbedder:
    """An ONNX model run by the service's FaceSession (preprocessed by its face.* contract); raw outputs."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        from service.model.session import FaceSession, SessionOptions

        self.path = Path(path)
        self.session = FaceSession(self.path, options=SessionOptions(intra_op_threads=threads or 0))
        self.contract = self.session.contract
        self.input_name = self.contract.input_name
        self.input_size = self.contract.input_size[0]
        self.label = f"{self.contract.model_id} (onnx)"

    def __call__(self, faces: np.ndarray) -> np.ndarray:
        return self.session.raw(faces)


class TFEmbedder:
    """A Keras embedding model with the config's (x - mean) / std normalisation."""

    def __init__(self, cfg: TrainConfig, model: keras.Model) -> None:
        self.cfg, self.model = cfg, model
        self.input_size = cfg.input_size
        self.label = f"{cfg.export_model_name()} (tf)"

    @classmethod
    def load(cls, source: str | Path, config: str | Path | None = None,
             overrides: list[str] | None = None) -> TFEmbedder:
        """From our run directory or an arcface-tf2 checkpoint."""
        from .checkpoints import load_embedding_model

        return cls(*load_embedding_model(source, config, overrides))

    def __call__(self, faces: np.ndarray) -> np.ndarray:
        x = (faces.astype(np.float32) - self.cfg.mean) / self.cfg.std
        return np.asarray(self.model(x, training=False))


def make_embedder(model: str | Path, config: str | Path | None = None,
                  overrides: list[str] | None = None) -> OnnxEmbedder | TFEmbedder:
    if str(model).endswith(".onnx"):
        return OnnxEmbedder(model)
    return TFEmbedder.load(model, config, overrides)


# How flip-averaging combines an image's embedding with its mirror's (both then L2-normalised):
#   normalised: unit(e) + unit(e_mirror), each view weighs the same (this exporter's default);
#   raw:        e + e_mirror, as arcface-tf2's evaluation (and insightface's) does: the view with the
#               larger raw norm weighs more. The two differ only where the two raw norms differ.
FLIP_MODES = ("normalised", "raw")


def embed_paths(embedder: Embedder, paths: list[Path], batch_size: int = 64, flip: bool = True,
                flip_mode: str = "normalised", quality_parts: list[dict] | None = None,
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """L2-normalised embeddings of the files, and flip-averaged ones (see FLIP_MODES) when ``flip``.
    ``quality_parts``: appended with each face's crop-based quality parts and its raw output's norm."""
    if flip_mode not in FLIP_MODES:
        raise ValueError(f"flip_mode must be one of {', '.join(FLIP_MODES)}, got {flip_mode!r}")
    plain, flipped = [], []
    for i in range(0, len(paths), batch_size):
        faces = load_faces(paths[i:i + batch_size], embedder.input_size)
        emb = np.asarray(embedder(faces), dtype=np.float32)
        plain.append(l2_normalise(emb))
        if quality_parts is not None:
            from service.faces.quality import crop_parts, raw_norms

            quality_parts.extend({**crop_parts(face), "norm": float(norm)} for face, norm in zip(faces, raw_norms(emb)))
        if flip:
            mirrored = np.asarray(embedder(np.ascontiguousarray(faces[:, :, ::-1])), dtype=np.float32)
            if flip_mode == "raw":
                flipped.append(l2_normalise(emb + mirrored))
            else:
                flipped.append(l2_normalise(l2_normalise(emb) + l2_normalise(mirrored)))
        if (i // batch_size) % 20 == 0:
            log.info("embedded %d / %d", min(i + batch_size, len(paths)), len(paths))
    return np.concatenate(plain), (np.concatenate(flipped) if flip else None)


def pair_scores(pairs: Pairs, embeddings: np.ndarray, index: dict[Path, int]) -> np.ndarray:
    a = embeddings[[index[p] for p in pairs.left]]
    b = embeddings[[index[p] for p in pairs.right]]
    return np.sum(a * b, axis=1)


def pairs_impostor_tail(paths: list[Path], embeddings: np.ndarray, source: str) -> dict | None:
    """The impostor tail (FAR -> cosine) over every cross-person pair of the protocol's images (the
    person is the image's folder), as the contract stores it (``face.impostor_tail``); None when the
    protocol has too few people for one."""
    tail = _pairs_tail(paths, embeddings, source)
    return tail.to_dict() if tail is not None else None


def _pairs_tail(paths: list[Path], embeddings: np.ndarray, source: str) -> ImpostorTail | None:
    from service.model.calibration import CalibrationError, impostor_tail

    people = {name: i for i, name in enumerate(sorted({p.parent.name for p in paths}))}
    labels = np.asarray([people[p.parent.name] for p in paths])
    try:
        return impostor_tail(embeddings, labels, source=source)
    except CalibrationError as exc:
        log.warning("no impostor tail: %s", exc)
        return None


def protocol_quality(paths: list[Path], parts: list[dict], embeddings: np.ndarray, images: Path) -> dict | None:
    """The face quality fitted on the protocol's images (``service.faces.quality.fit_on_labelled``), as the
    contract stores it (``face.quality``): crop parts and norms from ``embed_paths``, size, pose and
    detector score from the landmarks file next to the images (``yunet_landmarks_250px.csv``: YuNet on
    the original photos, as ../shared/data/lfw-112 ships it) where there is one. None when the
    protocol has too few pairs to fit on."""
    import csv

    from service.faces.detection import DetectedFace
    from service.faces.quality import fit_on_labelled, photo_parts

    marks_file = Path(images).parent / "yunet_landmarks_250px.csv"
    photo: dict[str, dict] = {}
    if marks_file.exists():
        with open(marks_file) as handle:
            for row in csv.DictReader(handle):
                if row.get("status", "detected") == "detected":
                    points = tuple((float(row[f"x{i}"]), float(row[f"y{i}"])) for i in range(5))
                    photo[row["path"]] = photo_parts(DetectedFace((0.0, 0.0, 0.0, 0.0), points, float(row["score"])))
    rows = [{**photo.get(f"{p.parent.name}/{p.name}", {}), **part} for p, part in zip(paths, parts)]
    if any(set(r) != set(rows[0]) for r in rows):  # landmarks for some images only: crop parts for all
        rows = parts
    people = {name: i for i, name in enumerate(sorted({p.parent.name for p in paths}))}
    labels = np.asarray([people[p.parent.name] for p in paths])
    try:
        model = fit_on_labelled(rows, embeddings, labels, f"{Path(images).parent.name}: the {len(paths)} pair images")
    except ValueError as exc:
        log.warning("no quality fitted: %s", exc)
        return None
    return json.loads(model.to_json())


def write_threshold_into(onnx_path: str | Path, threshold: float, source: str,
                         tail: ImpostorTail | dict | None = None, quality: dict | None = None) -> None:
    """Replace face.threshold (and face.impostor_tail and face.quality, when given) in an ONNX file's
    contract (atomically)."""
    import onnx

    from service.model.contract import FaceContract, write_contract

    onnx_path = Path(onnx_path)
    proto = onnx.load(str(onnx_path))
    meta = {p.key: p.value for p in proto.metadata_props}
    contract = FaceContract.from_metadata(meta)
    extra = {**contract.extra, "face.threshold_source": source}
    changes: dict[str, Any] = {"threshold": round(float(threshold), 4), "extra": extra}
    if tail is not None:
        changes["impostor_tail"] = tail if isinstance(tail, ImpostorTail) else ImpostorTail.from_dict(tail)
    if quality is not None:
        from service.faces.quality import QualityModel

        changes["quality"] = QualityModel.from_json(json.dumps(quality))
    write_contract(proto, dataclasses.replace(contract, **changes))
    tmp = onnx_path.with_name(onnx_path.name + ".tmp")
    onnx.save(proto, str(tmp))
    tmp.replace(onnx_path)


@dataclass(frozen=True)
class EvaluateOptions:
    """How to run a protocol; ``python -m exporter evaluate`` builds it from its flags of the same names."""

    images: str | Path | None = None  # image root; default <pairs.txt's folder>/images
    batch_size: int = 64
    label: str | None = None  # the model's name in the report and plot; default the embedder's label
    limit_folds: int | None = None  # only the first N folds (quick checks)
    flip: bool = True  # also the flip-averaged figures
    flip_mode: str = "normalised"  # see FLIP_MODES


@dataclass(frozen=True)
class TarAtFar:
    """True-accept rate at a false-accept target (see tar_at_far)."""

    far_target: float
    tar: float
    far_actual: float
    threshold: float
    resolved: bool  # False: the target is below 1/negatives, so this is TAR at zero false accepts


@dataclass
class EvaluationReport:
    """An evaluation's figures; ``to_dict()`` is its JSON. Figures without "flip" are measured without
    flip-averaging, as the service embeds; the threshold is calibrated on those."""

    model: str  # label
    source: str  # what was evaluated (path), "<in memory>" for a model passed in
    pairs: str
    n_pairs: int
    n_images: int
    n_folds: int
    embed_seconds: float
    ms_per_image: float  # per forward pass
    accuracy_mean: float
    accuracy_std: float
    accuracy_flip_mean: float | None
    accuracy_flip_std: float | None
    flip_mode: str | None
    best_threshold: float  # the mean of the 10 fold thresholds, rounded to 4 decimals
    tar_at_far: dict[str, TarAtFar]  # keyed by FAR as "0.001"
    # 1:N: the service derives its gallery-size-aware identify threshold from this table
    impostor_tail: ImpostorTail | None
    results: dict[str, dict]  # "plain" (and "flip"): verification_report() of that variant
    # (FAR, TAR) at every threshold per variant, for ROC plots (not in the JSON, which has roc summaries)
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)
    quality: dict | None = None  # the fitted face quality (face.quality), see protocol_quality
    roc_png: str | None = None  # set by whoever plots it
    threshold_written: str | None = None  # set by whoever writes the threshold into the model

    @property
    def threshold_source(self) -> str:
        """face.threshold_source of a threshold calibrated by this evaluation."""
        return f"10-fold:{Path(self.pairs).parent.name}"

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "curves"}
        data["tar_at_far"] = {k: dataclasses.asdict(v) for k, v in self.tar_at_far.items()}
        data["impostor_tail"] = self.impostor_tail.to_dict() if self.impostor_tail is not None else None
        for optional in ("roc_png", "threshold_written"):
            if data[optional] is None:
                del data[optional]
        return data


def restricted(protocol: Pairs, folds: int) -> Pairs:
    """The protocol's first ``folds`` folds."""
    keep = protocol.fold < folds
    return Pairs([p for p, k in zip(protocol.left, keep) if k], [p for p, k in zip(protocol.right, keep) if k],
                 protocol.same[keep], protocol.fold[keep], folds)


def evaluate_model(embedder: Embedder, pairs: str | Path, options: EvaluateOptions | None = None,
                   source: str | Path = "<in memory>") -> EvaluationReport:
    """Evaluate an embedder (OnnxEmbedder, TFEmbedder: see make_embedder) on a pairs protocol; see the
    module docstring. Writes nothing: plot_report, write_report and write_threshold_into do that."""
    options = options or EvaluateOptions()
    protocol = read_pairs(pairs, options.images)
    if options.limit_folds:
        protocol = restricted(protocol, options.limit_folds)
    unique = sorted(set(protocol.left) | set(protocol.right))
    index = {p: i for i, p in enumerate(unique)}
    log.info("%s: %d pairs, %d images", pairs, len(protocol.same), len(unique))
    start = time.monotonic()
    parts: list[dict] = []
    plain, flipped = embed_paths(embedder, unique, options.batch_size, flip=options.flip, flip_mode=options.flip_mode,
                                 quality_parts=parts)
    seconds = time.monotonic() - start

    results, curves = {}, {}
    variants = (("plain", plain), ("flip", flipped)) if flipped is not None else (("plain", plain),)
    for variant, embeddings in variants:
        scores = pair_scores(protocol, embeddings, index)
        results[variant] = verification_report(scores, protocol.same, protocol.fold)
        curves[variant] = roc_curve(scores, protocol.same)
    flip = results.get("flip")
    report = EvaluationReport(
        model=options.label or embedder.label,
        source=str(source),
        pairs=str(pairs),
        n_pairs=int(len(protocol.same)),
        n_images=len(unique),
        n_folds=protocol.n_folds,
        embed_seconds=round(seconds, 1),
        ms_per_image=round(1000 * seconds / len(unique) / (2 if options.flip else 1), 2),
        accuracy_mean=results["plain"]["accuracy_mean"],
        accuracy_std=results["plain"]["accuracy_std"],
        accuracy_flip_mean=flip["accuracy_mean"] if flip else None,
        accuracy_flip_std=flip["accuracy_std"] if flip else None,
        flip_mode=options.flip_mode if options.flip else None,
        # the service embeds without flip-averaging, so the threshold it uses is calibrated without it
        best_threshold=round(results["plain"]["threshold"], 4),
        tar_at_far={k: TarAtFar(**v) for k, v in results["plain"]["tar_at_far"].items()},
        impostor_tail=_pairs_tail(unique, plain, f"{Path(pairs).parent.name}: cross-person pairs "
                                  f"of its {len(unique)} pair images"),
        results=results,
        curves=curves,
        quality=protocol_quality(unique, parts, plain, Path(options.images or Path(pairs).parent / "images")),
    )
    log.info("%s: %.2f%% +- %.2f (flip-averaged: %s), threshold %.4f", report.model, 100 * report.accuracy_mean,
             100 * report.accuracy_std,
             f"{100 * report.accuracy_flip_mean:.2f}%" if report.accuracy_flip_mean is not None else "not measured",
             report.best_threshold)
    return report


def plot_report(report: EvaluationReport, path: str | Path, compare: list[str] | None = None) -> Path:
    """The report's ROC curves as a PNG, with earlier evaluations (their JSON files) on the same axes."""
    curves = {}
    for variant, curve in report.curves.items():
        prefix = f"{report.model}, " if compare else ""
        curves[f"{prefix}{variant}: {report.results[variant]['accuracy_mean'] * 100:.2f}%"] = curve
    for other in compare or []:
        # earlier evaluations (their JSON) drawn on the same axes, e.g. the default model
        theirs = json.loads(Path(other).read_text())
        curve = theirs["results"]["plain"].get("roc")
        if curve is None:
            log.warning("%s has no ROC summary (older evaluation): not drawn", other)
            continue
        curves[f"{theirs['model']}: {theirs['accuracy_mean'] * 100:.2f}%"] = (np.asarray(curve["far"]), np.asarray(curve["tar"]))
    return plot_roc(curves, path, f"{report.model} on {Path(report.pairs).parent.name}")


def write_report(report: EvaluationReport, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    return path


def embed_files(model: str | Path, inputs: list[str], output: str | Path, config: str | Path | None = None,
                overrides: list[str] | None = None, flip: bool = False, batch_size: int = 64,
                flip_mode: str = "normalised") -> dict:
    """Embed image files/folders to ``output`` (.npy) plus a list of the files (.txt)."""
    embedder = make_embedder(model, config, overrides)
    paths: list[Path] = []
    for item in inputs:
        paths += face_files(item) if Path(item).is_dir() else [Path(item)]
    if not paths:
        raise ValueError("no images found")
    plain, flipped = embed_paths(embedder, paths, batch_size, flip=flip, flip_mode=flip_mode)
    embeddings = flipped if flipped is not None else plain  # flipped: exactly when flip
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    np.save(output, embeddings.astype(np.float32))
    output.with_suffix(".txt").write_text("\n".join(str(p) for p in paths) + "\n")
    return {"output": str(output), "files": str(output.with_suffix(".txt")), "count": len(paths),
            "embedding_size": int(embeddings.shape[1]), "model": embedder.label}
