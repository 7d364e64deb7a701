"""Five landmarks -> similarity transform -> the crop a face model was trained on.

Reproduces ../shared/data/lfw-112 exactly: least-squares similarity transform (Umeyama) from the
detector's 5 points to the ArcFace template, ``cv2.warpAffine`` with bilinear sampling and a black
border. With the landmarks that set records, re-aligning its 250x250 originals gives the same crops
up to JPEG noise (tests/detection/test_align.py).

Also here: how a photo's faces are chosen (``MultiFacePolicy``) and the detected faces -> aligned
crops step (``align_faces``) that the service runs (through ``aligner.PhotoAligner``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import cv2
import numpy as np

from ..images import blockiness
from .detector import DetectedFace, FaceDetector, gray_plane
from .errors import NoFaceDetected

MultiFacePolicy = Literal["largest", "center", "all"]
MULTI_FACE_POLICIES: tuple[str, ...] = get_args(MultiFacePolicy)


@dataclass(frozen=True)
class AlignmentTemplate:
    name: str  # the value of the model contract's ``face.alignment``
    points: np.ndarray  # 5 x 2, in output pixels, LANDMARK_NAMES order
    size: tuple[int, int]  # height, width of the crop


# insightface's arcface_dst: the template the ArcFace family and SFace were trained on.
ARCFACE_112 = AlignmentTemplate(
    name="arcface-5pt-112",
    points=np.array(
        [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
        dtype=np.float64,
    ),
    size=(112, 112),
)

TEMPLATES: dict[str, AlignmentTemplate] = {ARCFACE_112.name: ARCFACE_112}

# A face shrunk by more than 2x in one bilinear warp aliases (bilinear reads 4 source pixels per
# output pixel). For such faces the region is first shrunk with area averaging, then warped at
# ~1:1. LFW faces need ~0.8x, so the reference path above is untouched by this.
ANTIALIAS_BELOW_SCALE = 0.5


def template_for(alignment: str) -> AlignmentTemplate:
    """The template named by a model contract's ``face.alignment``."""
    try:
        return TEMPLATES[alignment]
    except KeyError:
        raise ValueError(f"unknown alignment {alignment!r}; known: {sorted(TEMPLATES)}") from None


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 matrix of the rotation + uniform scale + translation that maps ``src`` points onto ``dst``
    with the least squared error (Umeyama 1991, no reflection). Same result as skimage's
    ``SimilarityTransform.estimate``, which is what insightface's ``norm_crop`` uses."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"need matching N x 2 point sets (N >= 2), got {src.shape} and {dst.shape}")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    covariance = dst_c.T @ src_c / len(src)
    u, singular, vt = np.linalg.svd(covariance)
    reflect = np.ones(2)
    if np.linalg.det(covariance) < 0:
        reflect[-1] = -1.0  # a mirrored landmark set is fitted by a rotation, never a reflection
    rotation = u @ np.diag(reflect) @ vt
    src_var = (src_c**2).sum() / len(src)
    if src_var <= 1e-12:
        raise ValueError("landmarks are degenerate (all at one point)")
    scale = float((singular * reflect).sum() / src_var)
    matrix = np.empty((2, 3), dtype=np.float64)
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def _as_3x3(matrix: np.ndarray) -> np.ndarray:
    return np.vstack([matrix, [0.0, 0.0, 1.0]])


def _shrink_then_matrix(image: np.ndarray, matrix: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Area-shrink the part of ``image`` the crop will sample, and the matrix for the shrunk part."""
    out_h, out_w = size
    inverse = cv2.invertAffineTransform(matrix)
    corners = np.array([[0, 0, 1], [out_w - 1, 0, 1], [0, out_h - 1, 1], [out_w - 1, out_h - 1, 1]], dtype=np.float64)
    src_corners = corners @ inverse.T
    height, width = image.shape[:2]
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
    # two output pixels of margin: bilinear sampling at the crop's edge reads one pixel further out,
    # which must still be image, not the black border of the shrunk region
    margin = int(np.ceil(2.0 / scale)) + 2
    x0 = max(0, int(np.floor(src_corners[:, 0].min())) - margin)
    y0 = max(0, int(np.floor(src_corners[:, 1].min())) - margin)
    x1 = min(width, int(np.ceil(src_corners[:, 0].max())) + margin + 1)
    y1 = min(height, int(np.ceil(src_corners[:, 1].max())) + margin + 1)
    if x1 - x0 < 2 or y1 - y0 < 2:  # the crop lies outside the image: nothing to shrink
        return image, matrix
    region = image[y0:y1, x0:x1]
    new_w, new_h = max(1, round(region.shape[1] * scale)), max(1, round(region.shape[0] * scale))
    shrunk = cv2.resize(region, (new_w, new_h), interpolation=cv2.INTER_AREA)
    fx, fy = new_w / region.shape[1], new_h / region.shape[0]
    # original pixel p -> shrunk pixel q: q = (p - offset + 0.5) * f - 0.5 (cv2.resize pixel centres)
    to_shrunk = np.array([[fx, 0.0, (0.5 - x0) * fx - 0.5], [0.0, fy, (0.5 - y0) * fy - 0.5], [0.0, 0.0, 1.0]])
    return shrunk, (_as_3x3(matrix) @ np.linalg.inv(to_shrunk))[:2]


def align_face(
    image: np.ndarray, landmarks: np.ndarray | DetectedFace, template: AlignmentTemplate = ARCFACE_112
) -> np.ndarray:
    """The aligned crop (template.size, same channels and dtype as ``image``) for 5 landmarks in
    ``image`` pixel coordinates (or a ``DetectedFace``). Parts of the crop outside the image are black."""
    plane = gray_plane(image)
    if plane is not None:  # a gray photo: align its one plane, then give the small crop 3 channels
        return np.repeat(align_face(plane, landmarks, template)[..., None], 3, axis=2)
    points = landmarks.landmarks_array if isinstance(landmarks, DetectedFace) else np.asarray(landmarks, np.float64)
    if points.shape != (5, 2) or not np.isfinite(points).all():
        raise ValueError(f"need 5 finite (x, y) landmarks, got shape {points.shape}")
    matrix = similarity_transform(points, template.points)
    source = image
    if np.sqrt(abs(np.linalg.det(matrix[:, :2]))) < ANTIALIAS_BELOW_SCALE:
        source, matrix = _shrink_then_matrix(image, matrix, template.size)
    out_h, out_w = template.size
    return cv2.warpAffine(
        source, matrix, (out_w, out_h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )


def face_size(face: DetectedFace) -> float:
    """Side of the square with the box's area, in pixels: one number to compare or threshold faces by."""
    _, _, w, h = face.box
    return float(np.sqrt(max(w, 0.0) * max(h, 0.0)))


def largest_face(faces: list[DetectedFace]) -> DetectedFace:
    """The face with the largest box (ties: the higher score). Raises ``NoFaceDetected`` on an empty list."""
    if not faces:
        raise NoFaceDetected("no face was found in the photo")
    return max(faces, key=lambda f: (face_size(f), f.score))


def center_face(faces: list[DetectedFace], image_shape: tuple[int, ...]) -> DetectedFace:
    """The face whose box centre is nearest the image centre: the subject of a portrait or a
    cropped news photo, even when a bystander's face is larger (how ../shared/data/lfw-112 chose)."""
    if not faces:
        raise NoFaceDetected("no face was found in the photo")
    cy, cx = (image_shape[0] - 1) / 2.0, (image_shape[1] - 1) / 2.0

    def distance(face: DetectedFace) -> tuple[float, float]:
        x, y, w, h = face.box
        return ((x + w / 2.0 - cx) ** 2 + (y + h / 2.0 - cy) ** 2, -face.score)

    return min(faces, key=distance)


def select_faces(
    faces: list[DetectedFace], policy: MultiFacePolicy, image_shape: tuple[int, ...] | None = None
) -> list[DetectedFace]:
    """Apply a multi-face policy: ``largest`` -> [the largest face]; ``center`` -> [the face nearest
    the centre of an image of ``image_shape``]; ``all`` -> every face, largest first. Raises
    ``NoFaceDetected`` (code ``no_face``) when there is none, whatever the policy."""
    if policy not in MULTI_FACE_POLICIES:
        raise ValueError(f"unknown multi-face policy {policy!r}; known: {MULTI_FACE_POLICIES}")
    if not faces:
        raise NoFaceDetected("no face was found in the photo")
    if policy == "largest":
        return [largest_face(faces)]
    if policy == "center":
        if image_shape is None:
            raise ValueError("the center policy needs the image shape")
        return [center_face(faces, image_shape)]
    return sorted(faces, key=lambda f: (face_size(f), f.score), reverse=True)


@dataclass(frozen=True)
class AlignedFace:
    face: DetectedFace  # where it was found, in the photo's (upright) pixel coordinates
    crop: np.ndarray  # template.size x 3 uint8 RGB, ready for the model's preprocessing
    blockiness: float = 1.0  # JPEG block grid in the photo around the face, before the warp (``images.blockiness``)


def align_faces(
    image: np.ndarray, faces: list[DetectedFace], policy: MultiFacePolicy, template: AlignmentTemplate = ARCFACE_112
) -> list[AlignedFace]:
    """The faces the policy selects among those detected in ``image``, aligned, largest first (the one
    select + align step: the service's ``PhotoAligner`` and ``detect_and_align`` both run it).
    Raises ``NoFaceDetected`` when there is none."""
    chosen = select_faces(faces, policy, image.shape)
    return [AlignedFace(face=face, crop=align_face(image, face, template), blockiness=blockiness(image, face.box))
            for face in chosen]


def detect_and_align(
    image: np.ndarray,
    detector: FaceDetector,
    policy: MultiFacePolicy = "largest",
    template: AlignmentTemplate = ARCFACE_112,
) -> list[AlignedFace]:
    """Photo (HxWx3 uint8 RGB, upright) -> the aligned faces the policy selects, largest first.
    Raises ``NoFaceDetected`` when the detector finds none. (From bytes, with the decode budget and
    metrics, the service runs the same steps through ``aligner.PhotoAligner``.)"""
    return align_faces(image, detector.detect(image), policy, template)
