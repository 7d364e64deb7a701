"""``python -m service calibrate``'s refusals come from the calibration library (two people, --min-pairs),
with what the folder held added; nothing is stored when it refuses."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from service.cli.calibrate import CalibrateOptions, _service_state, calibrate
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
    assert not (settings.data_dir / "calibration").exists()


def test_too_few_pairs_are_refused_with_the_option_named(tmp_path, settings):
    folder = _folder(tmp_path, "Meryl_Streep", "Mahmoud_Abbas")
    with pytest.raises(CalibrationError, match=r"only 16 impostor pairs \(at least 17 needed\).*--min-pairs 17"):
        calibrate(settings, CalibrateOptions(folder, image_type="aligned", min_pairs=17))
    assert not (settings.data_dir / "calibration").exists()


def test_quality_is_refitted_on_the_folder_and_preferred_to_the_models(tmp_path, settings):
    """``--quality``: the quality refitted on the user's faces is stored in the data dir and a service
    on that data dir uses it (``quality_source`` gallery), for the served model only."""
    from service.faces.quality import GALLERY_QUALITY_FILE, gallery_quality

    folder = _folder(tmp_path, *sorted(p.name for p in (FIXTURES / "train").iterdir() if p.is_dir()))
    for face in sorted((FIXTURES / "faces").glob("*.jpg")):
        person = folder / face.stem.rsplit("_", 1)[0]
        person.mkdir(exist_ok=True)
        shutil.copy(face, person / face.name)
    summary = calibrate(settings, CalibrateOptions(folder, image_type="aligned", min_pairs=1, quality=True))
    assert summary["quality"]["faces"] == summary["faces"] and summary["quality"]["genuine_pairs"] > 0
    model_id = summary["model_id"]
    refit = gallery_quality(settings.data_dir, model_id)
    assert refit is not None and 0 < refit.min_score_crop < 1
    # aligned crops: the crop-based and model parts only
    assert set(refit.photo.names) == set(refit.crop.names) == {"sharpness", "exposure", "clipping", "norm"}
    assert gallery_quality(settings.data_dir, "another@model") is None
    assert (settings.data_dir / "calibration" / model_id / GALLERY_QUALITY_FILE).exists()
    # a user's folder has no compressed faces to fit the blockiness limit on: the model's is kept
    state = _service_state(settings)
    assert state.contract.quality is not None and state.contract.quality.limits["blockiness"][1] is not None
    assert refit.limits["blockiness"] == state.contract.quality.limits["blockiness"]
    assert state.quality_source == "gallery" and state.quality_model == refit


@pytest.mark.parametrize("damage", ["{broken", "", '{"model_id": "sface@2021dec-int8bq"}'])
def test_a_damaged_quality_file_is_ignored_loudly_and_the_models_quality_applies(settings, damage, caplog):
    """A refitted quality.json cut short (a full disk, a hand edit) must not keep the service from
    starting: it is ignored with a warning naming the file, as a damaged gallery tail is, and the
    model's own quality applies (``quality_source`` model)."""
    from service.faces.quality import GALLERY_QUALITY_FILE, gallery_quality
    from service.model.calibration import calibration_file

    model_id = "sface@2021dec-int8bq"
    path = calibration_file(settings.data_dir, model_id, GALLERY_QUALITY_FILE)
    path.parent.mkdir(parents=True)
    path.write_text(damage)
    with caplog.at_level("WARNING"):
        assert gallery_quality(settings.data_dir, model_id) is None
        state = _service_state(settings)
    assert state.quality_source == "model" and state.quality_model == state.contract.quality
    warned = [r for r in caplog.records if "quality" in r.getMessage() and getattr(r, "path", None) == str(path)]
    assert warned and warned[0].levelname == "WARNING"
