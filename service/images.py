"""Image bytes -> validated RGB uint8 arrays. The first step of the data path.

Everything that can be wrong with an upload is caught here and turned into a ``ServiceError`` with
its own code, before any model or gallery work: empty, not an image, truncated, decompression bomb,
grayscale, alpha, wrong size.
"""

from __future__ import annotations

import base64
import binascii

import numpy as np
from PIL import Image

from .detection.errors import PhotoError
from .detection.photos import GRAYSCALE_MODES, check_sample_depth, load_upright, open_header
from .errors import ErrorCode, ServiceError


def decode_base64(text: str, index: int) -> bytes:
    if "," in text[:100] and text.startswith("data:"):
        text = text.split(",", 1)[1]  # tolerate data URLs from browsers
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ServiceError(ErrorCode.invalid_base64, f"image {index} is not valid base64", index=index) from exc


def open_image(data: bytes, index: int, max_bytes: int, max_pixels: int,
               size: tuple[int, int] | None = None) -> Image.Image:
    """Decode and validate the container, EXIF-upright; oversized images are refused before their
    pixels are allocated, and so is an image whose header is not ``size`` (height, width) either way
    round (an aligned crop must be exactly the model's input: a 6000x6000 one is never decoded).
    The same decoder as for photos (``detection.photos``), errors numbered."""
    try:
        image = open_header(data, max_pixels=max_pixels, max_bytes=max_bytes)
        if size is not None and tuple(image.size) not in ((size[1], size[0]), (size[0], size[1])):
            raise _wrong_size(index, size, image.size)
        return load_upright(image)
    except PhotoError as exc:
        raise exc.for_image(index) from exc


def _wrong_size(index: int, size: tuple[int, int], got: tuple[int, int]) -> ServiceError:
    return ServiceError(
        ErrorCode.wrong_image_size,
        f"image {index} is {got[0]}x{got[1]}; aligned faces must be {size[1]}x{size[0]}",
        index=index, expected=[size[1], size[0]], got=[got[0], got[1]],
    )


def to_rgb_array(img: Image.Image, index: int) -> np.ndarray:
    """HxWx3 uint8 RGB. Grayscale and alpha are refused: guessing would silently change embeddings.
    16-bit and float samples are refused as for photos (``check_sample_depth``: one colour policy)."""
    mode = img.mode
    try:
        check_sample_depth(mode)
    except PhotoError as exc:
        raise exc.for_image(index) from exc
    if mode in (*GRAYSCALE_MODES, "LA"):
        code = ErrorCode.alpha_channel if mode == "LA" else ErrorCode.grayscale_image
        raise ServiceError(code, f"image {index} has colour mode {mode}; send 3-channel RGB", index=index, mode=mode)
    if mode in ("RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in img.info):
        raise ServiceError(
            ErrorCode.alpha_channel, f"image {index} has an alpha channel; send 3-channel RGB", index=index, mode=mode
        )
    if mode not in ("RGB", "P", "YCbCr"):  # CMYK: 4 channels, and no colour profile conversion here
        raise ServiceError(
            ErrorCode.unsupported_color_mode, f"image {index} has unsupported colour mode {mode}", index=index, mode=mode
        )
    if mode == "P":
        palette_mode = img.palette.mode if img.palette else "RGB"
        if palette_mode != "RGB":
            raise ServiceError(ErrorCode.unsupported_color_mode, f"image {index} has a {palette_mode} palette", index=index)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def decode_aligned_face(
    data: bytes, index: int, size: tuple[int, int], max_bytes: int, max_pixels: int
) -> np.ndarray:
    """An aligned face crop, exactly ``size`` (height, width), as HxWx3 RGB uint8."""
    img = open_image(data, index, max_bytes, max_pixels, size)
    array = to_rgb_array(img, index)
    if array.shape[:2] != tuple(size):
        raise _wrong_size(index, size, (array.shape[1], array.shape[0]))
    return array
