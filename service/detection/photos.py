"""Photo bytes -> upright RGB uint8 array, for detection. Called by the image module for inputs
declared as photos (aligned crops keep their own stricter path in ``service/images.py``).

Two things matter for photos that do not for aligned crops:

* size: the pixel count a header declares is checked before any pixel is decoded, so a
  decompression bomb (a few kB declaring 30000x30000) costs microseconds and no memory;
* orientation: phones store pixels sideways plus an EXIF Orientation tag; it is applied, so the
  detector sees the face upright and returned coordinates refer to the image as people view it.
"""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import AlphaChannel, CorruptImage, EmptyImage, ImageTooLarge, NotAnImage, UnsupportedColorMode

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 40_000_000  # a 48 MP phone photo is 8000x6000 = 48 M; 40 M keeps RGB under 120 MB
GRAYSCALE_MODES = ("L", "1")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def open_photo(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int | None = None) -> Image.Image:
    """Decode ``data`` into a loaded, upright Pillow image, refusing oversized images before decoding.

    Raises ``EmptyImage``, ``ImageTooLarge`` (bytes, or declared width x height > ``max_pixels``),
    ``NotAnImage`` or ``CorruptImage``.
    """
    if not data:
        raise EmptyImage("the image is empty (0 bytes)")
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageTooLarge(f"the image is {len(data)} bytes; the limit is {max_bytes}", limit=max_bytes)
    try:
        with warnings.catch_warnings():
            # our own limit below is what applies; Pillow's warning threshold (89 M pixels) is not
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only; no pixel memory yet
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLarge(
                    f"the image declares {width}x{height} pixels; the limit is {max_pixels}",
                    width=width, height=height, limit=max_pixels,
                )
            image.load()
    except Image.DecompressionBombError as exc:  # Pillow's own hard limit, raised inside open()
        raise ImageTooLarge(f"the image declares too many pixels: {exc}", limit=max_pixels) from exc
    except UnidentifiedImageError as exc:
        raise NotAnImage("the data is not a decodable image") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow reports a cut-off file as OSError("image file is truncated ...")
        raise CorruptImage(f"the image is truncated or corrupt: {exc}") from exc
    return apply_exif_orientation(image)


def apply_exif_orientation(image: Image.Image) -> Image.Image:
    """The image as it is meant to be viewed. A damaged EXIF block is ignored (logged), not fatal:
    the pixels are fine and the photo is most likely upright anyway."""
    try:
        upright = ImageOps.exif_transpose(image)
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types on malformed EXIF
        log.warning("ignoring unreadable EXIF orientation", extra={"error": repr(exc)})
        return image
    return upright if upright is not None else image


def photo_to_rgb(image: Image.Image, allow_grayscale: bool = True) -> np.ndarray:
    """HxWx3 uint8 RGB of a decoded photo.

    Black-and-white photos are legitimate photos: with ``allow_grayscale`` they are replicated to
    three channels (the detector and the model then see a gray face; nothing is invented). Alpha is
    dropped only when every pixel is opaque (screenshots and PNG exports often carry a useless
    alpha channel); real transparency is refused, since the background behind it is unknown.
    """
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ALPHA_MODES:
        alpha_low, _ = image.getchannel("A").getextrema()
        if alpha_low < 255:
            raise AlphaChannel("the photo has transparent pixels; send an opaque image", mode=mode)
        image = image.convert("RGB" if mode in ("RGBA", "RGBa", "PA") else "L")
        mode = image.mode
    if mode in GRAYSCALE_MODES:
        if not allow_grayscale:
            raise UnsupportedColorMode("the photo is grayscale; send an RGB image", mode=mode)
        image = image.convert("L").convert("RGB")
    elif mode not in ("RGB", "CMYK", "YCbCr"):
        # 16-bit and float modes: converting them to 8 bits clips or rescales arbitrarily
        raise UnsupportedColorMode(f"unsupported colour mode {mode}", mode=mode)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def decode_photo(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int | None = None, allow_grayscale: bool = True
) -> np.ndarray:
    """Photo bytes -> upright HxWx3 uint8 RGB array (``open_photo`` then ``photo_to_rgb``)."""
    return photo_to_rgb(open_photo(data, max_pixels=max_pixels, max_bytes=max_bytes), allow_grayscale)
