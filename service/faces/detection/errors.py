"""Errors of photo decoding and face detection, each carrying its API ``ErrorCode``.

One vocabulary: decoding errors are the decode module's (``service.faces.images``), re-exported here;
detection adds ``NoFaceDetected``. ``for_image`` is the one place such an error becomes the API's
``ServiceError`` (details passed through unchanged).
"""

from __future__ import annotations

from ...errors import ErrorCode
from ..images import (
    AlphaChannel,
    CorruptImage,
    EmptyImage,
    ImageError,
    ImageTooLarge,
    NotAnImage,
    UnsupportedColorMode,
    WrongImageSize,
)

PhotoError = ImageError  # the name detection has always used for "the client must fix the image"


class NoFaceDetected(ImageError):
    code = ErrorCode.no_face


__all__ = ["AlphaChannel", "CorruptImage", "EmptyImage", "ImageError", "ImageTooLarge", "NoFaceDetected",
           "NotAnImage", "PhotoError", "UnsupportedColorMode", "WrongImageSize"]
