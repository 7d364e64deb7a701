"""Photos in: decode (EXIF-upright, bomb-safe), detect faces (YuNet), align to the model's template.

The service runs these steps in ``service.pipeline`` (``decoded_photo`` then ``align_photo``)::

    header = open_header(data, max_pixels=..., max_bytes=...)  # photos.py: size known, nothing decoded
    rgb = photo_to_rgb(load_upright(header))                   # photos.py: upright HxWx3 uint8 RGB
    faces = detector.detect(rgb)                               # detector.py: list[DetectedFace]
    chosen = select_faces(faces, "largest", rgb.shape)         # align.py: the multi-face policy
    crops = [align_face(rgb, face, template) for face in chosen]

``decode_photo`` and ``detect_and_align`` do the same in one call each (tools and tests).
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
