"""Which model file the service serves: the configured model, or its cached fp16 variant.

Making an fp16 variant (graph rewrite, parity check on real faces) is build tooling and lives in
``service.model.fp16``; the image makes the default model's variant at build time. This module only
finds the variant in the model cache (``<cache>/<name>-fp16/model.onnx``) and checks that it was made
from the model file being served (``face.fp16_source_sha256``); only when it is missing or stale is the
tool imported (onnxconverter-common with it) to make it. ``served_model_path(settings)`` is what the
service, ``python -m service calibrate`` and ``python -m service gallery`` all load.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from .contract import (
    FP16_MIN_COSINE_KEY,
    FP16_SUFFIX,
    cached_variant,
    file_digest,
    is_fp16_variant,
    read_contract,
)
from .prepare import resolve_model_path

if TYPE_CHECKING:
    from ..config import Settings

log = logging.getLogger(__name__)


def served_model_path(settings: Settings, configured: Path | None = None) -> Path:
    """The ONNX file the service loads with these settings (FACE_MODEL, FACE_PRECISION, the model cache):
    the default model is prepared and an fp16 variant made if they are missing. ``configured``: one
    model's configured path (FACE_MODELS); None: the default model's (the first of FACE_MODELS, else
    FACE_MODEL)."""
    if configured is None:
        configured = settings.served_models()[0][1]
    path = resolve_model_path(configured, settings.model_cache_dir)
    if settings.precision == "fp16":
        path = serving_variant(path, settings.model_cache_dir, settings.fp16_parity_faces)
    return path


def check_model_files(settings: Settings, names: list[str] | None = None) -> None:
    """Every configured model file (``names``: those served models only) is there, checked before anything
    is loaded or opened: ``ModelConfigError`` naming the model, the file and the setting (a model not yet
    copied, a typo in FACE_MODELS). The default SFace (no path) is prepared into the cache, not checked."""
    from ..config import ModelConfigError

    setting = "FACE_MODELS" if settings.models else "FACE_MODEL"
    for name, configured in settings.served_models():
        if configured is None or (names is not None and name not in names):
            continue
        try:
            resolve_model_path(configured, settings.model_cache_dir)
        except FileNotFoundError as exc:
            raise ModelConfigError(f"model {name!r}: {exc} ({setting})") from None


def serving_variant_path(src: Path, cache_dir: Path) -> Path:
    """Where the service keeps the fp16 variant of ``src``: ``<cache>/<name>-fp16/model.onnx``, so the
    default model's variant is ``<cache>/sface-2021dec-fp16/model.onnx`` (made at image build time)."""
    src = Path(src)
    name = src.parent.name if src.name == "model.onnx" else src.stem
    return Path(cache_dir) / f"{name}{FP16_SUFFIX}" / "model.onnx"


def serving_variant(src: Path, cache_dir: Path, faces_dir: Path | None = None) -> Path:
    """The fp16 model to serve for ``src`` (``FACE_PRECISION=fp16``): ``src`` itself if it already is
    fp16, else an up-to-date variant in ``cache_dir``, made (parity-checked) when missing or stale."""
    src = Path(src)
    if is_fp16_variant(read_contract(src)):
        return src
    dst = serving_variant_path(src, cache_dir)
    contract = cached_variant(dst, file_digest(src))
    reused = contract is not None
    if contract is None:
        from .fp16 import make_fp16_variant  # the conversion tool, only when there is something to convert

        contract = make_fp16_variant(src, dst, faces_dir).contract
    log.info("serving the fp16 variant", extra={"path": str(dst), "model_id": contract.model_id,
                                                "min_cosine": float(contract.extra[FP16_MIN_COSINE_KEY]),
                                                "reused": reused})
    return dst
