"""Photos in: detect faces (YuNet), align them to the model's template. Decoding (EXIF-upright,
bomb-safe, one colour policy) is the decode module's, ``service.faces.images``; detection depends on it.

The service runs these steps through ``PhotoAligner`` (``aligner.py``; ``service.faces.pipeline`` builds
one per request from the service state)::

    header = read_header(data, max_pixels=..., max_bytes=...)  # images.py: size known, nothing decoded
    rgb = header.to_rgb()                                      # images.py: upright HxWx3 uint8 RGB
    faces = detector.detect(rgb)                               # detector.py: list[DetectedFace]
    aligned = align_faces(rgb, faces, "largest", template)     # align.py: multi-face policy + crops

``PhotoAligner.aligned(header, index, policy)`` does it all (with the decode budget);
``detect_and_align(rgb, detector, policy)`` does the last two steps on an array (tools and tests).
"""

from .align import (
    ARCFACE_112,
    MULTI_FACE_POLICIES,
    TEMPLATES,
    AlignedFace,
    AlignmentTemplate,
    MultiFacePolicy,
    align_face,
    align_faces,
    center_face,
    detect_and_align,
    face_size,
    largest_face,
    select_faces,
    similarity_transform,
    template_for,
)
from .aligner import PhotoAligner
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

__all__ = [
    "ARCFACE_112", "LANDMARK_NAMES", "MULTI_FACE_POLICIES", "TEMPLATES",
    "AlignedFace", "AlignmentTemplate", "AlphaChannel", "CorruptImage", "DetectedFace", "EmptyImage",
    "FaceDetector", "ImageTooLarge", "MultiFacePolicy", "NoFaceDetected", "NotAnImage", "PhotoAligner",
    "PhotoError", "UnsupportedColorMode", "YuNetConfig", "YuNetDetector", "align_face", "align_faces", "center_face",
    "detect_and_align", "face_size", "largest_face", "select_faces", "similarity_transform", "template_for",
]
