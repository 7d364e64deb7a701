"""Errors of photo decoding and face detection, each with a stable machine-readable ``code``.

The codes are the same strings as the API's ``service.errors.ErrorCode`` values, so the HTTP layer can
map an exception with ``ErrorCode(exc.code)`` and pass ``exc.details`` through unchanged.
"""

from __future__ import annotations

from typing import Any


class PhotoError(Exception):
    """Something about an uploaded photo that the client must fix; never a server fault."""

    code = "invalid_image"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class EmptyImage(PhotoError):
    code = "empty_image"


class ImageTooLarge(PhotoError):
    """Too many bytes, or a header declaring more pixels than allowed (decompression bomb)."""

    code = "image_too_large"


class NotAnImage(PhotoError):
    code = "not_an_image"


class CorruptImage(PhotoError):
    """A recognised format whose data is cut off or damaged."""

    code = "truncated_image"


class AlphaChannel(PhotoError):
    """Transparent pixels: what is behind them is unknown, so we do not guess a background."""

    code = "alpha_channel"


class UnsupportedColorMode(PhotoError):
    code = "unsupported_color_mode"


class NoFaceDetected(PhotoError):
    code = "no_face"
