"""What a face's 5 landmarks say about it before any pixel is looked at: its size in the photo and
its head pose. The quality parts that need the detector's output are measured here (``service.faces.quality``
combines them with the crop's and the model's parts).

Pose from 5 points is an estimate, not a 3-D fit: roll is the angle of the eye line; yaw is how far the
nose tip sits off the face's midline (the line through the eye and mouth midpoints), relative to half
the inter-ocular distance, read as ``atan`` of that ratio (the nose tip stands about half an
inter-ocular distance in front of the eyes, so the ratio is ~tan(yaw)); pitch is where the nose tip
sits between the eye line and the mouth line against where YuNet puts it on frontal faces (0.563 of
the way down: the median over the 1,000 LFW originals; the ArcFace template's 0.495 would read those
as 11 degrees up), scaled so that a shift of 0.2 reads as ~30 degrees. Frontal faces read
~0 on all three; the signs are the image's (yaw > 0: nose towards the image's right).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .detector import DetectedFace

# YuNet's nose-tip height between the eye line (0) and the mouth line (1) on frontal faces
FRONTAL_NOSE_HEIGHT = 0.563
PITCH_SCALE = 2.9  # tan(30 deg) / 0.2


@dataclass(frozen=True)
class FaceGeometry:
    interocular_px: float  # eye-centre distance in the photo's pixels
    yaw: float  # degrees
    pitch: float  # degrees
    roll: float  # degrees


def face_geometry(face: DetectedFace | np.ndarray) -> FaceGeometry:
    """Size and pose of a face from its 5 landmarks (``LANDMARK_NAMES`` order, photo pixels)."""
    points = face.landmarks_array if isinstance(face, DetectedFace) else np.asarray(face, dtype=np.float64)
    right_eye, left_eye, nose, mouth_r, mouth_l = points
    eye_vec = left_eye - right_eye
    iod = float(np.hypot(*eye_vec))
    roll = math.degrees(math.atan2(eye_vec[1], eye_vec[0]))
    if iod < 1e-6:
        return FaceGeometry(interocular_px=iod, yaw=90.0, pitch=0.0, roll=roll)
    # de-roll: express every point in the frame of the eye line
    c, s = eye_vec / iod
    rotate = np.array([[c, s], [-s, c]])
    eyes_mid = (right_eye + left_eye) / 2.0
    rel = (points - eyes_mid) @ rotate.T
    nose_r, mouth_mid = rel[2], (rel[3] + rel[4]) / 2.0
    mouth_drop = mouth_mid[1]
    if mouth_drop <= 1e-6:  # mouth above the eyes: an upside-down or broken detection
        return FaceGeometry(interocular_px=iod, yaw=90.0, pitch=90.0, roll=roll)
    along = nose_r[1] / mouth_drop
    midline_x = mouth_mid[0] * along  # the midline's x at the nose's height
    yaw = math.degrees(math.atan((nose_r[0] - midline_x) / (iod / 2.0)))
    pitch = math.degrees(math.atan((FRONTAL_NOSE_HEIGHT - along) * PITCH_SCALE))
    return FaceGeometry(interocular_px=iod, yaw=yaw, pitch=pitch, roll=roll)
