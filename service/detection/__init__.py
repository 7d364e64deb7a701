"""Photos in: decode (EXIF-upright, bomb-safe), detect faces (YuNet), align to the model's template.

    rgb = decode_photo(data, max_pixels=...)                  # photos.py
    faces = detector.detect(rgb)                              # detector.py: list[DetectedFace]
    aligned = detect_and_align(rgb, detector, "largest")      # align.py: list[AlignedFace]
"""

from .align import (
    ARCFACE_112,
    MULTI_FACE_POLICIES,
    TEMPLATES,
    AlignedFace,
    AlignmentTemplate,
    MultiFacePolicy,
    align_face,
    center_face,
    detect_and_align,
    face_size,
    largest_face,
    select_faces,
    similarity_transform,
    template_for,
)
from .detector import LANDMARK_NAMES, DetectedFace, FaceDetector, YuNetConfig, YuNetDetector
from .errors import (
    AlphaChannel,
    CorruptImage,
    EmptyImage,
    ImageTooLarge,
    NoFaceDetected,
    NotAnImage,
    PhotoError,
    UnsupportedColorMode,
)
from .photos import DEFAULT_MAX_PIXELS, apply_exif_orientation, decode_photo, open_photo, photo_to_rgb

__all__ = [
    "ARCFACE_112", "DEFAULT_MAX_PIXELS", "LANDMARK_NAMES", "MULTI_FACE_POLICIES", "TEMPLATES",
    "AlignedFace", "AlignmentTemplate", "AlphaChannel", "CorruptImage", "DetectedFace", "EmptyImage",
    "FaceDetector", "ImageTooLarge", "MultiFacePolicy", "NoFaceDetected", "NotAnImage", "PhotoError",
    "UnsupportedColorMode", "YuNetConfig", "YuNetDetector", "align_face", "apply_exif_orientation", "center_face",
    "decode_photo", "detect_and_align", "face_size", "largest_face", "open_photo", "photo_to_rgb",
    "select_faces", "similarity_transform", "template_for",
]
