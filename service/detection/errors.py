"""Errors of photo decoding and face detection, each carrying its API ``ErrorCode``.

One vocabulary: the code is the ``service.errors.ErrorCode`` the client sees, and ``for_image`` is the
one place a photo error becomes the API's ``ServiceError`` (details passed through unchanged).
"""

from __future__ import annotations

from typing import Any, ClassVar

from ..errors import ErrorCode, ServiceError


class PhotoError(Exception):
    """Something about an uploaded photo that the client must fix; never a server fault. The
    subclasses say what; the base's code is still a 4xx should it be raised as it is."""

    code: ClassVar[ErrorCode] = ErrorCode.invalid_request

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def for_image(self, index: int) -> ServiceError:
        """This error as the API reports it for the request's image ``index``."""
        return ServiceError(self.code, f"image {index}: {self.message}", index=index, **self.details)


class EmptyImage(PhotoError):
    code = ErrorCode.empty_image


class ImageTooLarge(PhotoError):
    """Too many bytes, or a header declaring more pixels than allowed (decompression bomb)."""

    code = ErrorCode.image_too_large


class NotAnImage(PhotoError):
    code = ErrorCode.not_an_image


class CorruptImage(PhotoError):
    """A recognised format whose data is cut off or damaged."""

    code = ErrorCode.truncated_image


class AlphaChannel(PhotoError):
    """Transparent pixels: what is behind them is unknown, so we do not guess a background."""

    code = ErrorCode.alpha_channel


class UnsupportedColorMode(PhotoError):
    code = ErrorCode.unsupported_color_mode


class NoFaceDetected(PhotoError):
    code = ErrorCode.no_face
