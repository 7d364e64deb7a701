"""Alignment reproduces the reference crops of ../shared/data/lfw-112, and the model agrees."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from service.faces.detection import (
    ARCFACE_112,
    NoFaceDetected,
    align_face,
    detect_and_align,
    similarity_transform,
    template_for,
)
from tests.detection.helpers import (
    LFW_112,
    LFW_250,
    PHOTOS,
    fixture_landmarks,
    load_rgb,
    photo_files,
    read_landmarks,
    reference_crop_path,
    service_aligned,
)

THRESHOLD = 0.314  # the default model's verify threshold (its contract)
needs_shared = pytest.mark.skipif(not (LFW_112 / "images").is_dir() or not (LFW_250 / "images").is_dir(),
                                  reason="../shared/data/lfw-112 and lfw-250-subset are not available")


def rotation_scale(angle_deg: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    c, s = scale * np.cos(a), scale * np.sin(a)
    return np.array([[c, -s, shift[0]], [s, c, shift[1]]])


def test_similarity_transform_recovers_a_known_transform():
    truth = rotation_scale(17.0, 0.62, (-40.0, 12.5))
    src = np.array([[100.0, 110.0], [150.0, 108.0], [127.0, 135.0], [105.0, 155.0], [146.0, 153.0]])
    dst = src @ truth[:, :2].T + truth[:, 2]
    np.testing.assert_allclose(similarity_transform(src, dst), truth, atol=1e-9)


def test_similarity_transform_is_the_least_squares_fit_and_never_mirrors():
    rng = np.random.default_rng(0)
    src = ARCFACE_112.points * 2 + 30
    noisy = ARCFACE_112.points + rng.normal(0, 1.5, size=(5, 2))
    m = similarity_transform(src, noisy)
    best = np.sum((src @ m[:, :2].T + m[:, 2] - noisy) ** 2)
    for _ in range(200):  # no nearby similarity fits better
        a, s = rng.normal(0, 0.01), 1 + rng.normal(0, 0.01)
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) * s
        other = rot @ m[:, :2]
        t = noisy.mean(0) - src.mean(0) @ other.T
        assert np.sum((src @ other.T + t - noisy) ** 2) >= best - 1e-9
    mirrored = src * [-1, 1]
    assert np.linalg.det(similarity_transform(mirrored, ARCFACE_112.points)[:, :2]) > 0


@pytest.mark.parametrize("bad", [np.zeros((5, 2)), np.zeros((4, 2)), np.full((5, 2), np.nan)])
def test_degenerate_landmarks_are_refused(bad):
    with pytest.raises(ValueError):
        align_face(np.zeros((100, 100, 3), np.uint8), bad)


def test_unknown_alignment_name_is_refused():
    assert template_for("arcface-5pt-112") is ARCFACE_112
    with pytest.raises(ValueError):
        template_for("mtcnn-96x112")


def test_landmarks_land_on_the_template():
    image = load_rgb(PHOTOS / "Keanu_Reeves_0001.jpg")
    landmarks = fixture_landmarks()["Keanu_Reeves_0001.jpg"]
    m = similarity_transform(landmarks, ARCFACE_112.points)
    mapped = landmarks @ m[:, :2].T + m[:, 2]
    assert np.abs(mapped - ARCFACE_112.points).max() < 4.0  # 5 real points never fit a template exactly
    crop = align_face(image, landmarks)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8


def test_crop_reaching_past_the_image_edge_is_black_there():
    image = load_rgb(PHOTOS / "Keanu_Reeves_0001.jpg")[90:, 80:]  # cut through the eyebrows
    landmarks = fixture_landmarks()["Keanu_Reeves_0001.jpg"] - [80, 90]
    crop = align_face(image, landmarks)
    assert (crop[:10] == 0).all() and crop[60:].mean() > 20


def test_fixture_photos_same_person_and_different_people(detector, embedder):
    """End to end on the committed photos alone: detect, align (largest face), embed, compare."""
    crops = {p.stem: service_aligned(detector, p)[0].crop for p in photo_files()}
    names = sorted(crops)
    emb = dict(zip(names, embedder([crops[n] for n in names])))
    for person in ("Amelie_Mauresmo", "Bill_Frist"):
        assert emb[f"{person}_0001"] @ emb[f"{person}_0002"] > THRESHOLD + 0.1
    for a in names:
        for b in names:
            if a.rsplit("_", 1)[0] != b.rsplit("_", 1)[0]:
                assert emb[a] @ emb[b] < THRESHOLD, (a, b)


def test_detect_and_align_all_policy_returns_every_face_with_its_box(detector):
    aligned = detect_and_align(load_rgb(PHOTOS / "Alvaro_Silva_Calderon_0002.jpg"), detector, "all")
    assert len(aligned) >= 2
    # the service's path from the file's bytes finds and aligns the same faces
    served = service_aligned(detector, PHOTOS / "Alvaro_Silva_Calderon_0002.jpg", "all")
    assert [a.face for a in served] == [a.face for a in aligned]
    assert all(np.array_equal(a.crop, b.crop) for a, b in zip(served, aligned))
    assert all(a.crop.shape == (112, 112, 3) for a in aligned)
    with pytest.raises(NoFaceDetected):
        detect_and_align(np.zeros((200, 200, 3), np.uint8), detector, "all")


def test_big_photo_aligns_like_the_original(detector, embedder):
    """A 2000 px photo (face ~1000 px, warp scale ~0.1): area-shrunk, then warped."""
    original = load_rgb(PHOTOS / "Keanu_Reeves_0001.jpg")
    landmarks = fixture_landmarks()["Keanu_Reeves_0001.jpg"]
    big = cv2.resize(original, None, fx=8, fy=8, interpolation=cv2.INTER_CUBIC)
    # same landmarks, mapped to the big image: the crops must agree up to resampling noise
    same_points = align_face(big, (landmarks + 0.5) * 8 - 0.5)
    assert np.abs(same_points.astype(int) - align_face(original, landmarks).astype(int)).mean() < 1.5
    # the whole path (YuNet at 640 px sees a different scale, so landmarks move a little)
    (from_big,) = detect_and_align(big, detector, "largest")
    (from_original,) = detect_and_align(original, detector, "largest")
    a, b = embedder([from_big.crop, from_original.crop])
    assert a @ b >= 0.95


def test_strong_shrink_does_not_alias():
    """1-pixel stripes seen at 1/10 scale must average to gray, not turn into coarse false stripes."""
    stripes = np.zeros((1400, 1400, 3), np.uint8)
    stripes[:, ::2] = 255
    landmarks = ARCFACE_112.points * 10 + 100  # scale 0.1
    crop = align_face(stripes, landmarks).astype(float)
    assert abs(crop.mean() - 127.5) < 3 and crop.std() < 3
    m = similarity_transform(landmarks, ARCFACE_112.points)
    plain = cv2.warpAffine(stripes, m, (112, 112), flags=cv2.INTER_LINEAR).astype(float)
    # what a single bilinear warp gives: every 10th pixel, so all white here (or moire when rotated)
    assert abs(plain.mean() - 127.5) > 30 or plain.std() > 30


@needs_shared
def test_fixture_crops_match_the_reference_crops_pixel_for_pixel():
    for path in photo_files():
        crop = align_face(load_rgb(path), fixture_landmarks()[path.name])
        reference = load_rgb(reference_crop_path(path.name))
        assert np.abs(crop.astype(int) - reference.astype(int)).mean() < 2.0, path.name


def sample_of_originals(n: int = 40) -> list:
    files = sorted((LFW_250 / "images").glob("*/*.jpg"))
    return files[:: max(1, len(files) // n)][:n]  # every 25th of the 1,000: fixed, spread over A-Z


@needs_shared
def test_service_crops_match_reference_crops_on_40_originals(detector, embedder):
    """Our detector + alignment on the 250x250 originals vs the published reference crops."""
    reference_landmarks = read_landmarks(LFW_112 / "yunet_landmarks_250px.csv")
    files = sample_of_originals()
    ours, references, pixel_diffs = [], [], []
    for path in files:
        image = load_rgb(path)
        # pixel test: the reference's own landmarks, so only alignment is compared
        reference = load_rgb(reference_crop_path(path.name))
        exact = align_face(image, reference_landmarks[path.name])
        pixel_diffs.append(np.abs(exact.astype(int) - reference.astype(int)).mean())
        # embedding test: the whole service path, detector and "largest" policy included
        ours.append(service_aligned(detector, path)[0].crop)
        references.append(reference)
    assert np.mean(pixel_diffs) < 2.0 and max(pixel_diffs) < 3.0, pixel_diffs
    cosines = np.sum(embedder(ours) * embedder(references), axis=1)
    assert np.mean(cosines >= 0.95) >= 0.95, sorted(cosines)[:5]  # nearly all: at most 2 of 40 below
