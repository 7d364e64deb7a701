"""The fitted face quality in the model contract (``face.quality``), and the landmark geometry it uses."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from service.faces.detection import ARCFACE_112
from service.faces.detection.geometry import face_geometry
from service.faces.quality import PARTS, QualityModel, assess
from service.model.contract import ContractError, FaceContract, read_contract
from service.model.prepare import SFACE_CONTRACT


def test_the_default_model_ships_its_fitted_quality(default_model):
    quality = read_contract(default_model).quality
    assert quality is not None and quality == SFACE_CONTRACT.quality
    assert 0 < quality.min_score < 1 and 0 < quality.min_score_crop < 1
    assert set(quality.photo.names) <= set(PARTS) and "norm" in quality.photo.names
    assert "LFW" in quality.method
    for name in ("size", "yaw", "sharpness", "exposure"):
        assert name in quality.limits


def test_the_quality_survives_the_metadata_round_trip_and_a_broken_one_is_refused():
    meta = SFACE_CONTRACT.to_metadata()
    again = FaceContract.from_metadata(meta)
    assert again.quality == SFACE_CONTRACT.quality
    assert "face.quality" not in again.extra
    without = dataclasses.replace(SFACE_CONTRACT, quality=None).to_metadata()
    assert "face.quality" not in without and FaceContract.from_metadata(without).quality is None
    broken = json.loads(meta["face.quality"])
    broken["photo"]["weights"] = broken["photo"]["weights"][:-1]
    with pytest.raises(ContractError, match="face.quality"):
        FaceContract.from_metadata({**meta, "face.quality": json.dumps(broken)})
    with pytest.raises(ContractError, match="face.quality"):
        FaceContract.from_metadata({**meta, "face.quality": "{not json"})


def test_without_a_fitted_quality_there_is_no_score_only_limits():
    parts = {"size": 40.0, "yaw": 0.0, "pitch": 0.0, "roll": 0.0, "detector": 0.9, "sharpness": 3.0,
             "exposure": 120.0, "clipping": 0.0, "norm": 12.0}
    quality = assess(parts, None)
    assert quality.score is None and not quality.fitted
    assert [f["part"] for f in quality.failures(quality.limit(None))] == ["sharpness"]


def test_a_frontal_template_reads_as_frontal_and_a_turned_nose_as_yaw():
    frontal = ARCFACE_112.points.copy()
    frontal[2, 1] = frontal[0, 1] + 0.563 * (frontal[3, 1] - frontal[0, 1])  # YuNet's frontal nose height
    g = face_geometry(frontal)
    assert g.interocular_px == pytest.approx(35.2, abs=0.1)
    assert abs(g.yaw) < 2 and abs(g.pitch) < 2 and abs(g.roll) < 1
    turned = frontal.copy()
    turned[2, 0] += 12  # nose towards the image's right
    assert face_geometry(turned).yaw > 30
    theta = np.radians(30)
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    assert face_geometry(frontal @ rotation.T).roll == pytest.approx(30, abs=0.5)


def test_quality_model_json_refuses_unknown_parts_and_bad_limits():
    text = SFACE_CONTRACT.quality.to_json()  # type: ignore[union-attr]
    d = json.loads(text)
    assert QualityModel.from_json(text) == SFACE_CONTRACT.quality
    with pytest.raises(ValueError):
        QualityModel.from_json(json.dumps({**d, "limits": {"beauty": [0, 1]}}))
    with pytest.raises(ValueError):
        QualityModel.from_json(json.dumps({**d, "min_score": 1.5}))
