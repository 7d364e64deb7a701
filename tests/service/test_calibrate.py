"""``python -m service calibrate``'s refusals come from the calibration library (two people, --min-pairs),
with what the folder held added; nothing is stored when it refuses."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from service.calibrate import CalibrateOptions, calibrate
from service.config import Settings
from service.model.calibration import CalibrationError
from tests.conftest import FIXTURES
from tests.server import MODEL_CACHE


def _folder(root: Path, *people: str) -> Path:
    for person in people:
        shutil.copytree(FIXTURES / "train" / person, root / "people" / person)
    return root / "people"


@pytest.fixture()
def settings(tmp_path, default_model) -> Settings:
    return Settings(model=default_model, model_cache_dir=MODEL_CACHE, data_dir=tmp_path / "data", warmup=False)


def test_one_person_is_refused(tmp_path, settings):
    folder = _folder(tmp_path, "Meryl_Streep")
    with pytest.raises(CalibrationError, match=r"at least two people \(people: 4 faces of 1 people"):
        calibrate(settings, CalibrateOptions(folder, image_type="aligned", min_pairs=1))
    assert not (settings.data_dir / "impostor_tail.json").exists()


def test_too_few_pairs_are_refused_with_the_option_named(tmp_path, settings):
    folder = _folder(tmp_path, "Meryl_Streep", "Mahmoud_Abbas")
    with pytest.raises(CalibrationError, match=r"only 16 impostor pairs \(at least 17 needed\).*--min-pairs 17"):
        calibrate(settings, CalibrateOptions(folder, image_type="aligned", min_pairs=17))
    assert not (settings.data_dir / "impostor_tail.json").exists()
