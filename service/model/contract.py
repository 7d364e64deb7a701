"""The one contract between the exporter and the service: the ``face.*`` metadata of an ONNX model.

The exporter writes these keys into the ONNX ``metadata_props``; for a third-party model our own
preparation step (``service.model.prepare``) writes them into the prepared copy and into a JSON
sidecar next to it (``<model>.onnx.face.json``). This module is the only place that reads or writes
the table, and it imports nothing heavier than ``onnx`` so the exporter can use it too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .calibration import CalibrationError, ImpostorTail
from .files import replace_atomically

if TYPE_CHECKING:  # for the annotations only; the functions import onnx (and cv2, with quality) where they use it
    import onnx

    from ..faces.quality import QualityModel

CONTRACT_VERSION = "1"
SIDECAR_SUFFIX = ".face.json"


class ContractError(ValueError):
    """The model's metadata is missing, malformed or inconsistent with the graph."""


def _floats(text: str, n: int, key: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise ContractError(f"{key}: expected {n} comma-separated numbers, got {text!r}") from exc
    if len(values) == 1 and n > 1:
        values = values * n
    if len(values) != n:
        raise ContractError(f"{key}: expected {n} values, got {text!r}")
    return values


@dataclass(frozen=True)
class FaceContract:
    """How to feed a model and what comes out of it."""

    input_name: str
    embedding_size: int
    model_name: str
    model_version: str
    threshold: float  # calibrated 1:1 verify cosine threshold
    layout: str = "NCHW"  # or NHWC
    color: str = "RGB"  # or BGR
    input_size: tuple[int, int] = (112, 112)  # height, width
    mean: tuple[float, float, float] = (127.5, 127.5, 127.5)  # applied to 0..255 pixels
    std: tuple[float, float, float] = (127.5, 127.5, 127.5)
    alignment: str = "arcface-5pt-112"
    # 1:N open-set threshold; optional because few models ship one (it depends on gallery size)
    identify_threshold: float | None = None
    # 1:1 impostor score tail (FAR -> cosine), from which the 1:N threshold follows for any gallery size
    impostor_tail: ImpostorTail | None = field(default=None, compare=False)
    # fitted face quality (service.faces.quality.QualityModel): the parts' combination and default limits
    quality: QualityModel | None = field(default=None, compare=False)
    contract: str = CONTRACT_VERSION
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.layout not in ("NCHW", "NHWC"):
            raise ContractError(f"face.layout must be NCHW or NHWC, got {self.layout!r}")
        if self.color not in ("RGB", "BGR"):
            raise ContractError(f"face.color must be RGB or BGR, got {self.color!r}")
        if self.embedding_size <= 0:
            raise ContractError("face.embedding_size must be positive")
        if any(s == 0 for s in self.std):
            raise ContractError("face.std must not contain zeros")
        if not -1.0 <= self.threshold <= 1.0:
            raise ContractError("face.threshold is a cosine and must lie in [-1, 1]")

    @property
    def model_id(self) -> str:
        """What the gallery stores to refuse embeddings of another model."""
        return f"{self.model_name}@{self.model_version}"

    # --- the metadata table ------------------------------------------------------------------
    def to_metadata(self) -> dict[str, str]:
        fmt = lambda xs: ",".join(f"{x:g}" for x in xs)  # noqa: E731
        meta = {
            "face.contract": self.contract,
            "face.input_name": self.input_name,
            "face.layout": self.layout,
            "face.color": self.color,
            "face.input_size": f"{self.input_size[0]},{self.input_size[1]}",
            "face.mean": fmt(self.mean),
            "face.std": fmt(self.std),
            "face.embedding_size": str(self.embedding_size),
            "face.alignment": self.alignment,
            "face.model_name": self.model_name,
            "face.model_version": self.model_version,
            "face.threshold": f"{self.threshold:.4f}",
        }
        if self.identify_threshold is not None:
            meta["face.identify_threshold"] = f"{self.identify_threshold:.4f}"
        if self.impostor_tail is not None:
            meta["face.impostor_tail"] = self.impostor_tail.to_json()
        if self.quality is not None:
            meta["face.quality"] = self.quality.to_json()
        meta.update(self.extra)
        return meta

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> FaceContract:
        required = [
            "face.contract", "face.input_name", "face.embedding_size",
            "face.model_name", "face.model_version", "face.threshold",
        ]
        missing = [k for k in required if k not in meta]
        if missing:
            raise ContractError(f"model metadata lacks {', '.join(missing)}")
        if meta["face.contract"] != CONTRACT_VERSION:
            raise ContractError(
                f"face.contract {meta['face.contract']!r} is not supported (this service reads {CONTRACT_VERSION})"
            )
        try:
            size = _floats(meta.get("face.input_size", "112,112"), 2, "face.input_size")
            ident = meta.get("face.identify_threshold")
            tail = meta.get("face.impostor_tail")
            quality = meta.get("face.quality")
            return cls(
                contract=meta["face.contract"],
                input_name=meta["face.input_name"],
                embedding_size=int(meta["face.embedding_size"]),
                model_name=meta["face.model_name"],
                model_version=meta["face.model_version"],
                threshold=float(meta["face.threshold"]),
                identify_threshold=float(ident) if ident not in (None, "") else None,
                impostor_tail=ImpostorTail.from_json(tail) if tail else None,
                quality=_quality_model(quality) if quality else None,
                layout=meta.get("face.layout", "NCHW"),
                color=meta.get("face.color", "RGB"),
                input_size=(int(size[0]), int(size[1])),
                mean=_floats(meta.get("face.mean", "127.5"), 3, "face.mean"),  # type: ignore[arg-type]  # n=3 checked
                std=_floats(meta.get("face.std", "127.5"), 3, "face.std"),  # type: ignore[arg-type]  # n=3 checked
                alignment=meta.get("face.alignment", "arcface-5pt-112"),
                extra={k: v for k, v in meta.items() if k.startswith("face.") and k not in _KNOWN},
            )
        except CalibrationError as exc:
            raise ContractError(f"face.impostor_tail: {exc}") from exc
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ContractError):
                raise
            raise ContractError(f"malformed face.* metadata: {exc}") from exc

    def as_dict(self) -> dict:
        return asdict(self)


def _quality_model(text: str) -> QualityModel:
    from ..faces.quality import QualityModel

    try:
        return QualityModel.from_json(text)
    except ValueError as exc:
        raise ContractError(f"face.quality: {exc}") from exc


_KNOWN = {
    "face.contract", "face.input_name", "face.layout", "face.color", "face.input_size", "face.mean",
    "face.std", "face.embedding_size", "face.alignment", "face.model_name", "face.model_version",
    "face.threshold", "face.identify_threshold", "face.impostor_tail", "face.quality",
}


# --- precision: the keys of an fp16 variant ----------------------------------------------------
# An fp16 variant (made by ``service.model.fp16`` or by the exporter's ``--fp16``) is the source's
# contract with ``-fp16`` appended to the version (the gallery stores the model id, so fp16 and fp32
# embeddings are never mixed silently) and these keys: its precision, the parity gate's figure, the
# number of faces it was measured on and the digest of the fp32 file it was made from (a cached
# variant of an unchanged source is reused).
PRECISION_KEY = "face.precision"
FP16_MIN_COSINE_KEY = "face.fp16_min_cosine"
FP16_PARITY_FACES_KEY = "face.fp16_parity_faces"
FP16_SOURCE_KEY = "face.fp16_source_sha256"
FP16_KEYS = (PRECISION_KEY, FP16_MIN_COSINE_KEY, FP16_PARITY_FACES_KEY, FP16_SOURCE_KEY)
FP16_SUFFIX = "-fp16"


def file_digest(path: Path) -> str:
    """What ``face.fp16_source_sha256`` holds: the first 16 hex digits of the file's SHA-256."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def is_fp16_variant(contract: FaceContract) -> bool:
    return contract.extra.get(PRECISION_KEY) == "fp16"


def fp16_variant_contract(source: FaceContract, min_cosine: float, parity_faces: int,
                          source_digest: str) -> FaceContract:
    """The contract of an fp16 variant of a model with contract ``source``: every key of the source, the
    version suffixed ``-fp16``, and the fp16 keys (what the variant's parity check measured)."""
    if source.model_version.endswith(FP16_SUFFIX) or is_fp16_variant(source):
        raise ContractError(f"{source.model_id} already is an fp16 variant")
    extra = {
        **source.extra,
        PRECISION_KEY: "fp16",
        FP16_MIN_COSINE_KEY: f"{min_cosine:.6f}",
        FP16_PARITY_FACES_KEY: str(parity_faces),
        FP16_SOURCE_KEY: source_digest,
    }
    return dataclasses.replace(source, model_version=source.model_version + FP16_SUFFIX, extra=extra)


def is_variant_of(contract: FaceContract, source_digest: str) -> bool:
    """Whether ``contract`` is an fp16 variant made from the file whose ``file_digest`` is ``source_digest``."""
    return is_fp16_variant(contract) and contract.extra.get(FP16_SOURCE_KEY) == source_digest


def sidecar_path(model_path: Path) -> Path:
    return model_path.with_name(model_path.name + SIDECAR_SUFFIX)


def read_contract(model_path: Path) -> FaceContract:
    """The contract of an ONNX file: its metadata_props, or else its sidecar."""
    import onnx

    model_path = Path(model_path)
    try:  # load_external_data=False: only the header is needed, not gigabytes of weights
        proto = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError, OSError, onnx's own: not a model file
        raise ContractError(f"{model_path} is not an ONNX model that can be read ({type(exc).__name__}: "
                            f"{str(exc)[:200]})") from exc
    meta = {p.key: p.value for p in proto.metadata_props}
    if "face.contract" not in meta:
        side = sidecar_path(model_path)
        if not side.exists():
            raise ContractError(
                f"{model_path} has no face.* metadata and no sidecar {side.name}; export it with "
                "`python -m exporter export` or prepare it with `python -m service.model.prepare`"
            )
        meta = json.loads(side.read_text())
    return FaceContract.from_metadata(meta)


def write_contract(proto: onnx.ModelProto, contract: FaceContract) -> None:
    """Write the contract into an in-memory ``onnx.ModelProto`` (replacing older face.* keys)."""
    kept = [(p.key, p.value) for p in proto.metadata_props if not p.key.startswith("face.")]
    del proto.metadata_props[:]
    for key, value in kept + sorted(contract.to_metadata().items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def write_sidecar(model_path: Path, contract: FaceContract) -> Path:
    side = sidecar_path(Path(model_path))
    replace_atomically(side, lambda tmp: tmp.write_text(json.dumps(contract.to_metadata(), indent=2,
                                                                  sort_keys=True) + "\n"))
    return side


def save_model(proto: onnx.ModelProto, dst: Path) -> None:
    """Write an ONNX model to ``dst`` so that no reader ever sees half of it (replace_atomically)."""
    import onnx

    replace_atomically(Path(dst), lambda tmp: onnx.save(proto, str(tmp)))


def cached_variant(dst: Path, source_digest: str) -> FaceContract | None:
    """The contract of ``dst`` if it is an fp16 variant made from the file with ``source_digest``."""
    if not Path(dst).exists():
        return None
    try:
        contract = read_contract(dst)
    except Exception:  # noqa: BLE001 - a broken leftover is simply made again
        return None
    return contract if is_variant_of(contract, source_digest) else None
