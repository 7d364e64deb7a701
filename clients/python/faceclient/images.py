"""Images in any form a program holds them, to the base64 the service reads."""

from __future__ import annotations

import base64
import io
import os
import struct
import zlib
from typing import Any, Literal

Color = Literal["rgb", "bgr"]
# a path (str or PathLike), encoded bytes, a binary file object, a numpy array (H, W[, 3]) or a PIL image
ImageInput = Any


def _png(pixels: Any) -> bytes:
    """A numpy uint8 array (H, W) or (H, W, 3) RGB as PNG (zlib only: no Pillow needed)."""
    height, width = pixels.shape[:2]
    color_type = 2 if pixels.ndim == 3 else 0
    rows = pixels.reshape(height, -1)
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 1)) + chunk(b"IEND", b"")


# the PIL modes a PNG holds as they are (1 and L: grayscale, as the server reads it); other 8-bit modes are
# converted to RGB (CMYK and YCbCr as the server converts them: Pillow's conversion), those with alpha to
# RGBA / LA (the server drops an opaque alpha and refuses real transparency: not decided here)
PNG_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA"})
ALPHA_MODES = {"PA": "RGBA", "RGBa": "RGBA", "La": "LA"}


def _png_mode(image: Any) -> Any:
    """A PIL image as one PNG can hold: CMYK (a CMYK JPEG opened), YCbCr, LAB, HSV, RGBX... in RGB.
    16-bit and float samples (I;16, I, F) are a ValueError, as a numpy array that is not uint8: the
    service refuses them (unsupported_color_mode) rather than clip or rescale them, a guess either way."""
    mode = image.mode
    if mode in ("I", "F") or mode.startswith("I;"):
        raise ValueError(f"a PIL image in mode {mode} (16-bit or float samples) cannot be sent: the service takes "
                         "8-bit images (it would not guess how to scale these); convert it to 'L' or 'RGB' yourself")
    return image if mode in PNG_MODES else image.convert(ALPHA_MODES.get(mode, "RGB"))


def encode(image: ImageInput, color: Color | None = None) -> bytes:
    """The encoded bytes of ``image``. A numpy array needs ``color`` ("rgb" or "bgr", as OpenCV reads)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            return f.read()
    if hasattr(image, "read"):
        data = image.read()
        if not isinstance(data, bytes):
            raise TypeError("a file object given as an image must be opened in binary mode ('rb')")
        return data
    module = type(image).__module__
    if module.startswith("PIL."):
        buffer = io.BytesIO()
        _png_mode(image).save(buffer, format="PNG")
        return buffer.getvalue()
    if module.startswith("numpy") and hasattr(image, "shape"):
        import numpy as np

        if color not in ("rgb", "bgr"):
            raise ValueError('a numpy image needs color="rgb" or color="bgr" (OpenCV arrays are BGR)')
        pixels = np.ascontiguousarray(image)
        if pixels.dtype != np.uint8:
            raise ValueError(f"a numpy image must be uint8, not {pixels.dtype}")
        if pixels.ndim == 3 and pixels.shape[2] == 1:
            pixels = pixels[:, :, 0]
        if not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] == 3)):
            raise ValueError(f"a numpy image must be (H, W) or (H, W, 3), not {pixels.shape}")
        if pixels.ndim == 3 and color == "bgr":
            pixels = np.ascontiguousarray(pixels[:, :, ::-1])
        return _png(pixels)
    raise TypeError(f"not an image: {type(image).__name__} (give a path, bytes, a binary file, "
                    "a numpy array or a PIL image)")


def to_base64(image: ImageInput, color: Color | None = None) -> str:
    return base64.b64encode(encode(image, color)).decode("ascii")


def as_list(vector: Any) -> list[float]:
    """An embedding (numpy array or sequence) as the JSON list the service reads."""
    return [float(x) for x in (vector.tolist() if hasattr(vector, "tolist") else vector)]
