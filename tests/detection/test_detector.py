"""YuNet through the FaceDetector interface, on real LFW photos."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest

from service.faces.detection import (
    DetectedFace,
    FaceDetector,
    NoFaceDetected,
    YuNetConfig,
    YuNetDetector,
    face_size,
    largest_face,
    select_faces,
)
from tests.detection.helpers import MULTI_FACE_PHOTOS, PHOTOS, fixture_landmarks, load_rgb, photo_files


def centre_face(faces: list[DetectedFace], width: int, height: int) -> DetectedFace:
    """LFW's convention (and the reference set's): the labelled person is the face nearest the centre."""
    def distance(f: DetectedFace) -> float:
        x, y, w, h = f.box
        return (x + w / 2 - width / 2) ** 2 + (y + h / 2 - height / 2) ** 2

    return min(faces, key=distance)


def test_yunet_is_a_face_detector(detector):
    assert isinstance(detector, FaceDetector)
    assert detector.name == "yunet-2023mar"


@pytest.mark.parametrize("path", photo_files(), ids=lambda p: p.stem)
def test_finds_the_labelled_face_with_the_reference_landmarks(detector, path):
    image = load_rgb(path)
    faces = detector.detect(image)
    assert faces, "no face found"
    if path.name not in MULTI_FACE_PHOTOS:
        assert len(faces) == 1
    face = centre_face(faces, image.shape[1], image.shape[0])
    assert face.score >= 0.6
    # the same detector at the same size as the reference set: identical up to the CSV's 2 decimals
    np.testing.assert_allclose(face.landmarks_array, fixture_landmarks()[path.name], atol=0.006)
    x, y, w, h = face.box
    assert all(x - 1 <= px <= x + w + 1 and y - 1 <= py <= y + h + 1 for px, py in face.landmarks)
    assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)


def test_real_crowd_photo_has_several_faces_and_largest_is_the_labelled_one(detector):
    image = load_rgb(PHOTOS / "Alvaro_Silva_Calderon_0002.jpg")
    faces = detector.detect(image)
    assert len(faces) >= 2
    assert largest_face(faces) == centre_face(faces, 250, 250)


def two_people_side_by_side() -> np.ndarray:
    """Keanu_Reeves at full size on the left, Catherine_Deneuve shrunk to 150 px on the right."""
    big = load_rgb(PHOTOS / "Keanu_Reeves_0001.jpg")
    small = cv2.resize(load_rgb(PHOTOS / "Catherine_Deneuve_0001.jpg"), (150, 150), interpolation=cv2.INTER_AREA)
    canvas = np.full((250, 400, 3), 128, dtype=np.uint8)
    canvas[:, :250] = big
    canvas[50:200, 250:] = small
    return canvas


def test_two_pasted_photos_give_two_faces_and_largest_picks_the_bigger(detector):
    faces = detector.detect(two_people_side_by_side())
    assert len(faces) == 2
    biggest = largest_face(faces)
    assert biggest.box[0] < 250, "the full-size face is on the left"
    assert select_faces(faces, "largest") == [biggest]
    everyone = select_faces(faces, "all")
    assert [f.box[0] < 250 for f in everyone] == [True, False]  # largest first
    assert face_size(everyone[0]) > 1.4 * face_size(everyone[1])  # 250 px vs 150 px photos
    # the small face is where it was pasted, in canvas coordinates
    deneuve_eyes = fixture_landmarks()["Catherine_Deneuve_0001.jpg"][:2] * 150 / 250 + [250, 50]
    np.testing.assert_allclose(everyone[1].landmarks_array[:2], deneuve_eyes, atol=3.0)
    # "center" picks by distance to the image centre, not by size: the big face in this canvas, the
    # small one if the canvas were wide enough to centre it (x = 324.5 of 650)
    assert select_faces(faces, "center", (250, 400, 3)) == [biggest]
    assert select_faces(faces, "center", (250, 650, 3)) == [everyone[1]]


def gradient() -> np.ndarray:
    ramp = np.linspace(0, 255, 320, dtype=np.float32)
    return np.stack([np.tile(ramp, (240, 1)), np.tile(ramp[:240, None], (1, 320)), np.full((240, 320), 90.0)],
                    axis=-1).astype(np.uint8)


def background_crop() -> np.ndarray:
    """The top of the Bill_Frist_0001 photo: flag and wall, no face."""
    return np.ascontiguousarray(load_rgb(PHOTOS / "Bill_Frist_0001.jpg")[:70, :])


@pytest.mark.parametrize("make_image", [gradient, background_crop, lambda: np.zeros((300, 300, 3), np.uint8)],
                         ids=["gradient", "background", "black"])
def test_no_face_gives_an_empty_list_and_the_policy_a_coded_error(detector, make_image):
    faces = detector.detect(make_image())
    assert faces == []
    for policy in ("largest", "center", "all"):
        with pytest.raises(NoFaceDetected) as info:
            select_faces(faces, policy, (300, 300, 3))
        assert info.value.code == "no_face"


def test_big_photo_is_detected_downscaled_and_mapped_back_exactly():
    # 8x nearest-neighbour upscaling that the detector's 8x area downscaling undoes exactly: YuNet sees
    # the original 250x250 pixels, so the mapped-back landmarks must be the reference ones, scaled.
    factor = 8
    big = np.repeat(np.repeat(load_rgb(PHOTOS / "Keanu_Reeves_0001.jpg"), factor, axis=0), factor, axis=1)
    (face,) = YuNetDetector(YuNetConfig(max_side=250)).detect(big)
    expected = (fixture_landmarks()["Keanu_Reeves_0001.jpg"] + 0.5) * factor - 0.5  # pixel centres
    np.testing.assert_allclose(face.landmarks_array, expected, atol=0.006 * factor)


def test_big_photo_with_default_config_finds_the_face_where_it_is(detector):
    factor = 8  # 2000x2000, detected at 640x640: a different scale for YuNet, so only roughly equal
    big = cv2.resize(load_rgb(PHOTOS / "Keanu_Reeves_0001.jpg"), None, fx=factor, fy=factor,
                     interpolation=cv2.INTER_CUBIC)
    (face,) = detector.detect(big)
    expected = (fixture_landmarks()["Keanu_Reeves_0001.jpg"] + 0.5) * factor - 0.5
    eye_distance = np.linalg.norm(expected[1] - expected[0])
    assert np.abs(face.landmarks_array - expected).max() < 0.2 * eye_distance


@pytest.mark.parametrize("shape", [(1, 1, 3), (8, 8, 3), (3000, 4, 3), (4, 3000, 3)])
def test_tiny_and_sliver_images_give_no_face(detector, shape):
    assert detector.detect(np.zeros(shape, np.uint8)) == []


@pytest.mark.parametrize("bad", [np.zeros((50, 50), np.uint8), np.zeros((50, 50, 4), np.uint8),
                                 np.zeros((50, 50, 3), np.float32)], ids=["gray", "rgba", "float"])
def test_only_rgb_uint8_arrays_are_accepted(detector, bad):
    with pytest.raises(ValueError):
        detector.detect(bad)


def test_concurrent_calls_from_a_thread_pool_agree_with_sequential_ones(detector):
    images = [load_rgb(p) for p in photo_files()] + [two_people_side_by_side()]
    sequential = [detector.detect(img) for img in images]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(detector.detect, images * 4))
    assert concurrent == sequential * 4


def test_score_threshold_and_top_k_are_applied():
    image = load_rgb(PHOTOS / "Alvaro_Silva_Calderon_0002.jpg")
    loose = YuNetDetector(YuNetConfig(score_threshold=0.3)).detect(image)
    strict = YuNetDetector(YuNetConfig(score_threshold=0.92)).detect(image)
    assert len(loose) > len(strict) >= 1
    assert all(f.score >= 0.92 for f in strict)


@pytest.mark.parametrize("kwargs", [{"score_threshold": 0}, {"nms_threshold": 1.5}, {"top_k": 0},
                                    {"max_side": 8, "min_side": 16}])
def test_invalid_config_is_refused(kwargs):
    with pytest.raises(ValueError):
        YuNetConfig(**kwargs)


def test_as_dict_is_json_ready(detector):
    (face,) = detector.detect(load_rgb(PHOTOS / "Keanu_Reeves_0001.jpg"))
    d = face.as_dict()
    assert set(d) == {"box", "landmarks", "score"}
    assert len(d["box"]) == 4 and len(d["landmarks"]) == 5 and all(len(p) == 2 for p in d["landmarks"])
    assert all(isinstance(v, float) for v in d["box"] + [d["score"]])
