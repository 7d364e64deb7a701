"""``python -m service calibrate DIR [--model NAME]``: measure the impostor tail on your own labelled faces.

DIR holds one sub-folder per person with aligned crops or photos of them (photos go through the
service's own decode -> detect -> align path, the largest face of each). Every pair of faces of
different people is scored with the served model named by ``--model`` (a name of FACE_MODELS; none:
the default model, the first), and the FAR -> cosine table is stored in the data dir for that model
id (``calibration/<model id>/impostor_tail.json``): the collections pinned to that model, and /cluster
with that model, then prefer it to the model's own table when they size a threshold (a running service
picks it up on its next request; /readyz says ``impostor_tail.source: gallery`` for the default model).
Each served model is calibrated on its own; calibrating one leaves the others' as they were. Use it
when your population or cameras differ from the data the model was calibrated on. More people make a
longer tail: N faces of P people give about N^2 (1 - 1/P) / 2 pairs, and the table reaches down to
FAR ~ 5 / pairs.

``--quality`` also refits the face quality (``service.faces.quality.fit_on_labelled``: which faces' genuine
comparisons fail at FMR 1e-3, from their parts) on the same faces and stores it in the data dir
(``calibration/<model id>/quality.json``); the service reads it at start-up in preference to that
model's ``face.quality`` (/readyz says ``quality.source: gallery``). It needs people with at least two
faces; photos give every part, aligned crops the crop-based ones only.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..config import ModelConfigError, Settings
from ..errors import ServiceError
from ..faces.images import DEFAULT_FORMATS, image_suffixes
from ..gallery.openset import save_gallery_tail
from ..model.calibration import CalibrationError, impostor_tail
from ..ops.metrics import Metrics

if TYPE_CHECKING:  # the pipeline is imported lazily, at run time
    from ..faces.pipeline import ImageType
    from ..faces.quality import QualityModel
    from ..state import ServiceState

log = logging.getLogger(__name__)

DEFAULT_MIN_PAIRS = 1000


@dataclass
class CalibrationSet:
    embeddings: np.ndarray
    labels: np.ndarray
    people: list[str]
    skipped: dict[str, str] = field(default_factory=dict)  # file -> error code
    parts: list[dict] = field(default_factory=list)  # each face's quality parts (with the model's norm)


@dataclass(frozen=True)
class CalibrateOptions:
    folder: Path
    image_type: ImageType = "auto"
    min_pairs: int = DEFAULT_MIN_PAIRS
    batch: int = 32
    quality: bool = False  # also refit the face quality
    model: str | None = None  # the served model's name (FACE_MODELS); None: the default model


def labelled_files(folder: Path, formats: tuple[str, ...] = DEFAULT_FORMATS) -> list[tuple[str, Path]]:
    """(person, image file) of each sub-folder's images of ``formats`` (FACE_IMAGE_FORMATS)."""
    suffixes = image_suffixes(formats)
    people = sorted(p for p in Path(folder).iterdir() if p.is_dir())
    return [(person.name, f) for person in people for f in sorted(person.iterdir())
            if f.is_file() and f.suffix.lower() in suffixes]


def served_model_spec(settings: Settings, name: str | None) -> tuple[str, Path | None]:
    """(served name, configured path) of the model to calibrate: the one served as ``name`` (FACE_MODELS,
    or ``default`` for FACE_MODEL); None: the default model (the first). An unknown name is a
    ``CalibrationError`` naming the served ones."""
    served = settings.served_models()
    if name is None:
        return served[0]
    for spec in served:
        if spec[0] == name:
            return spec
    raise CalibrationError(f"no model named {name!r} is served (served: {', '.join(n for n, _ in served)}); "
                           "give --model one of these names, or a model file")


def _service_state(settings: Settings, name: str | None = None) -> ServiceState:
    """The parts of the service a calibration needs: the session of the served model ``name`` (None: the
    default model) and the photo path."""
    from ..app import _photo_support
    from ..model.registry import ModelRegistry, ServedModel
    from ..model.runtime import EmbeddingModel
    from ..model.serving import check_model_files, served_model_path
    from ..state import ServiceState

    served_name, configured = served_model_spec(settings, name)
    try:
        check_model_files(settings, [served_name])
    except ModelConfigError as exc:
        raise CalibrationError(str(exc)) from None
    model = EmbeddingModel(served_model_path(settings, configured), settings)
    model.initialize()
    detector, template = _photo_support(settings, model.contract.alignment)
    # no batcher and no gallery: decode_faces only reads settings, contract, detector and metrics
    default = served_name == settings.served_models()[0][0]
    models = ModelRegistry([ServedModel(served_name, model, None, settings, template, default=default)])  # type: ignore[arg-type]
    return ServiceState(settings=settings, model=model, batcher=None, galleries=None, metrics=Metrics(),  # type: ignore[arg-type]
                        detector=detector, template=template, models=models)


def embed_folder(state: ServiceState, options: CalibrateOptions) -> CalibrationSet:
    from ..faces.pipeline import decode_faces
    from ..faces.quality import raw_norms
    from ..model.preprocess import l2_normalise

    files = labelled_files(options.folder, state.settings.image_formats)
    names = sorted({person for person, _ in files})
    index = {name: i for i, name in enumerate(names)}
    crops, labels, skipped, parts = [], [], {}, []
    for person, path in files:
        try:
            batch = decode_faces(state, [path.read_bytes()], options.image_type, "largest")
        except ServiceError as exc:  # no face, not an image...: leave it out, say which and why
            skipped[str(path)] = exc.code.value
            continue
        crops.extend(batch.crops)
        parts.extend(batch.measure())
        labels.extend([index[person]] * len(batch.crops))
    if not crops:
        raise CalibrationError(f"no usable faces under {options.folder}")
    raw = np.concatenate([state.model.execute_raw(np.stack(crops[i:i + options.batch]))
                          for i in range(0, len(crops), options.batch)])
    parts = [{**p, "norm": float(n)} for p, n in zip(parts, raw_norms(raw))]
    return CalibrationSet(l2_normalise(raw), np.asarray(labels), names, skipped, parts)


def calibrate(settings: Settings, options: CalibrateOptions) -> dict:
    """Embed the folder with the served model ``options.model``, measure its tail, store it for that
    model's collections; returns a summary."""
    state = _service_state(settings, options.model)
    found = embed_folder(state, options)
    people = len(set(found.labels.tolist()))
    source = f"{options.folder.name}: {len(found.labels)} faces of {people} people"
    try:  # the library refuses fewer than two people or --min-pairs pairs; say what the folder held
        tail = impostor_tail(found.embeddings, found.labels, source=source, min_pairs=options.min_pairs)
    except CalibrationError as exc:
        raise CalibrationError(f"{exc} ({source}; --min-pairs {options.min_pairs})") from exc
    model_id = state.contract.model_id
    path = save_gallery_tail(settings.data_dir, model_id, tail,
                             {"faces": len(found.labels), "people": people, "skipped": len(found.skipped)})
    summary = {"stored": str(path), "model": state.models.default.name, "model_id": model_id,
               "faces": len(found.labels), "people": people,
               "pairs": tail.pairs, "skipped": found.skipped, "far_min": tail.far[-1],
               "table": dict(zip([f"{f:.2g}" for f in tail.far], tail.cosine))}
    if options.quality:
        summary["quality"] = refit_quality(settings, model_id, found, source, state.contract.quality)
    log.info("calibration stored", extra={k: v for k, v in summary.items() if k not in ("table", "skipped")})
    return summary


def refit_quality(settings: Settings, model_id: str, found: CalibrationSet, source: str,
                  contract_quality: QualityModel | None = None) -> dict:
    """Fit the face quality on the calibration faces and store it in the data dir (keeping the contract's
    limits of the parts that a folder of ordinary photos cannot fit: ``quality.keep_limits_of``)."""
    from ..faces.quality import fit_on_labelled, keep_limits_of, save_gallery_quality

    measured = [{k: v for k, v in p.items() if v is not None} for p in found.parts]
    try:
        model = fit_on_labelled(measured, found.embeddings, found.labels, source)
    except ValueError as exc:
        raise CalibrationError(f"quality: {exc}") from exc
    model = keep_limits_of(model, contract_quality)  # blockiness: fitted on compressed faces, not here
    path = save_gallery_quality(settings.data_dir, model_id, model)
    return {"stored": str(path), "min_score": model.min_score, "min_score_crop": model.min_score_crop,
            **model.evidence}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m service calibrate", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="one sub-folder per person, aligned crops or photos in each")
    parser.add_argument("--data-dir", type=Path, help="gallery directory the calibration is for (FACE_DATA_DIR)")
    parser.add_argument("--model", metavar="NAME",
                        help="the served model to calibrate: a name of FACE_MODELS (default: the first, the default "
                        "model); also an ONNX file or directory, calibrated as the one model (FACE_MODEL)")
    parser.add_argument("--image-type", choices=["auto", "aligned", "photo"], default="auto",
                        help="auto: images of the model's input size are aligned crops, others photos")
    parser.add_argument("--min-pairs", type=int, default=DEFAULT_MIN_PAIRS,
                        help="refuse to store a tail measured on fewer impostor pairs")
    parser.add_argument("--quality", action="store_true",
                        help="also refit the face quality on these faces (stored next to the tail in the data dir)")
    args = parser.parse_args(argv)
    from ..ops.logging import configure_logging

    settings, name = _settings_for(args.data_dir, args.model)
    configure_logging(settings.log_level, settings.log_json)
    if not args.folder.is_dir():
        parser.error(f"{args.folder} is not a directory")
    try:
        summary = calibrate(settings, CalibrateOptions(args.folder, args.image_type, args.min_pairs,
                                                          quality=args.quality, model=name))
    except CalibrationError as exc:
        log.error("calibration failed: %s", exc)
        sys.exit(2)
    sys.stdout.write(json.dumps(summary, indent=1) + "\n")


def _settings_for(data_dir: Path | None, model: str | None) -> tuple[Settings, str | None]:
    """The settings and the served name to calibrate for ``--data-dir`` and ``--model``: a name of the
    configured models (FACE_MODELS / FACE_MODEL), else a model file, served alone as ``default`` (what
    ``--model PATH`` always meant)."""
    overrides: dict[str, object] = {"data_dir": data_dir} if data_dir is not None else {}
    settings = Settings(**overrides)  # type: ignore[arg-type]
    if model is None or model in {n for n, _ in settings.served_models()}:
        return settings, model
    if Path(model).exists() or "/" in model or model.endswith(".onnx"):
        return Settings(**overrides, model=Path(model), models=[]), None  # type: ignore[arg-type]
    return settings, model  # an unknown name: calibrate() refuses it, naming the served ones
