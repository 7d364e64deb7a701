"""The decode step of the data path (``pipeline.decode_faces``) with the real model contract, the
real YuNet detector and the real decode budget: the parts that are not HTTP (HTTP: test_photos.py,
test_colour_policy.py)."""

from __future__ import annotations

import pytest
from PIL import Image

from service.config import Settings
from service.faces.detection import ARCFACE_112, YuNetDetector
from service.faces.pipeline import decode_faces
from service.model.runtime import EmbeddingModel
from service.ops.metrics import Metrics
from service.state import ServiceState
from tests.conftest import FIXTURES, face_files

CROP = face_files("Tony_Blair")[0]
PHOTO = FIXTURES / "photos" / "Keanu_Reeves_0001.jpg"


@pytest.fixture(scope="module")
def state(default_model, tmp_path_factory) -> ServiceState:
    settings = Settings(data_dir=tmp_path_factory.mktemp("data"))
    # decode_faces needs the contract, detector, template, budget and metrics; no session, batcher or gallery
    return ServiceState(settings=settings, model=EmbeddingModel(default_model, settings), batcher=None,  # type: ignore[arg-type]
                        galleries=None, metrics=Metrics(), detector=YuNetDetector(), template=ARCFACE_112)  # type: ignore[arg-type]


def test_auto_parses_each_header_once(state, monkeypatch):
    """``image_type=auto`` decides crop or photo from the header the decode then uses (it used to
    open every image twice: once to look at its size, once to decode it)."""
    opened = []
    real_open = Image.open

    def counting_open(*args, **kwargs):
        opened.append(1)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    batch = decode_faces(state, [CROP.read_bytes(), PHOTO.read_bytes()], "auto")
    assert len(opened) == 2
    assert batch.image_index == [0, 1] and batch.located[0] is None and batch.located[1] is not None
    assert all(crop.shape == (112, 112, 3) for crop in batch.crops)


def test_the_photo_reservation_is_released(state):
    """A photo's decode memory is reserved while it is decoded, detected and aligned, and given back."""
    decode_faces(state, [PHOTO.read_bytes(), PHOTO.read_bytes()], "photo")
    assert state.decode_budget is not None and state.decode_budget.in_use == 0
