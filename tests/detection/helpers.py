"""Shared by the detection tests: fixture photos, reference data, and the real default model."""

from __future__ import annotations

import csv
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from service.model.session import FaceSession, SessionOptions
from tests.conftest import FIXTURES

PHOTOS = FIXTURES / "photos"
# ../shared/data next to the checkout; FACE_SHARED_DATA points elsewhere. Tests that need the full
# sets skip without them; everything else runs on tests/fixtures/photos alone.
SHARED = Path(os.environ.get("FACE_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
LFW_112 = SHARED / "lfw-112"
LFW_250 = SHARED / "lfw-250-subset"
# the two fixture photos with other people in them; the rest show one face each
MULTI_FACE_PHOTOS = ("Alvaro_Silva_Calderon_0002.jpg", "Ben_Affleck_0001.jpg", "Chris_Byrd_0002.jpg")


def photo_files() -> list[Path]:
    return sorted(PHOTOS.glob("*.jpg"))


def service_aligned(detector, path: Path, policy: str = "largest") -> list:
    """A photo file's aligned faces by the path the service runs (``PhotoAligner``: header, decode
    with the colour policy, detect, select, align), without the service around it."""
    from service.faces.detection import PhotoAligner
    from service.faces.images import read_header

    return PhotoAligner(detector).aligned(read_header(path.read_bytes()), 0, policy)  # type: ignore[arg-type]


def load_rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8)


def read_landmarks(csv_path: Path) -> dict[str, np.ndarray]:
    """file name -> 5x2 landmarks from a yunet_landmarks_250px.csv-shaped file."""
    with open(csv_path, newline="") as handle:
        return {
            Path(row["path"]).name: np.array([[float(row[f"x{i}"]), float(row[f"y{i}"])] for i in range(5)])
            for row in csv.DictReader(handle)
        }


@lru_cache(maxsize=1)
def fixture_landmarks() -> dict[str, np.ndarray]:
    return read_landmarks(PHOTOS / "reference_landmarks.csv")


def reference_crop_path(name: str) -> Path:
    return LFW_112 / "images" / name.rsplit("_", 1)[0] / name


class Embedder:
    """The real default model on the service's FaceSession (CPU): preprocessed as the service does."""

    def __init__(self, model_path: Path) -> None:
        self.session = FaceSession(model_path, options=SessionOptions(log_severity_level=3))
        self.contract = self.session.contract

    def __call__(self, crops: list[np.ndarray] | np.ndarray) -> np.ndarray:
        return self.session.embed(np.stack(list(crops)))


