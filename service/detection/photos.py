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
from contextlib import contextmanager

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
    return load_upright(open_header(data, max_pixels=max_pixels, max_bytes=max_bytes))


@contextmanager
def _decode_errors(max_pixels: int):
    try:
        with warnings.catch_warnings():
            # our own limit is what applies; Pillow's warning threshold (89 M pixels) is not
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except Image.DecompressionBombError as exc:  # Pillow's own hard limit, raised inside open()
        raise ImageTooLarge(f"the image declares too many pixels: {exc}", limit=max_pixels) from exc
    except UnidentifiedImageError as exc:
        raise NotAnImage("the data is not a decodable image") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow reports a cut-off file as OSError("image file is truncated ...")
        raise CorruptImage(f"the image is truncated or corrupt: {exc}") from exc


def open_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int | None = None) -> Image.Image:
    """The image with only its header read (size and mode known, no pixel memory yet), size-checked."""
    if not data:
        raise EmptyImage("the image is empty (0 bytes)")
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageTooLarge(f"the image is {len(data)} bytes; the limit is {max_bytes}", limit=max_bytes)
    with _decode_errors(max_pixels):
        image = Image.open(io.BytesIO(data))  # reads the header only
        width, height = image.size
        if width * height > max_pixels:
            raise ImageTooLarge(
                f"the image declares {width}x{height} pixels; the limit is {max_pixels}",
                width=width, height=height, limit=max_pixels,
            )
    return image


def load_upright(image: Image.Image) -> Image.Image:
    """Decode the pixels of an image from ``open_header`` and apply its EXIF orientation."""
    with _decode_errors(image.width * image.height):
        image.load()
    return apply_exif_orientation(image)


# Bytes per pixel Pillow keeps for a decoded image (1-band 8-bit modes 1, 2-4 bands are padded to 4)
_STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
# The peak, per pixel, of decoding and converting to the array the detector gets (``photo_to_rgb``):
# the decoded image and the numpy array (1 byte a pixel for gray photos, which stay one plane; 3 for
# colour), conversions being made strip by strip (``_to_array``); alpha: + the alpha plane checked.
_PEAK_BYTES = {"1": 2, "L": 2, "P": 4, "RGB": 7, "RGBA": 8, "LA": 6, "La": 6, "PA": 8, "RGBa": 8}
DETECTOR_OVERHEAD = 16 << 20  # conversion strips and the detector's downscaled copies, generously


def decode_cost(image: Image.Image) -> int:
    """Estimated peak memory (bytes) of decoding an ``open_header`` image for detection, from its
    header alone: what a decode will cost is known before any pixel is allocated."""
    pixels = image.width * image.height
    stored = _STORED_BYTES.get(image.mode, 4)
    peak = _PEAK_BYTES.get(image.mode, stored + 3)
    if image.mode == "P" and "transparency" in image.info:
        peak = 4 + 1 + 3 + 1  # converted to RGBA (with the palette image) for the alpha check
    if _exif_orientation(image) not in (None, 1):
        peak += stored  # exif_transpose makes a rotated copy
    return pixels * peak + DETECTOR_OVERHEAD


def _exif_orientation(image: Image.Image) -> int | None:
    """From the header only. (``getexif()`` on a PNG decodes the whole image to look for an eXIf chunk
    after the pixels; that decode would happen outside the budget, so only the header's is read.)"""
    raw = image.info.get("exif")
    if not raw:
        return None
    try:
        exif = Image.Exif()
        exif.load(raw)
        return exif.get(0x0112)
    except Exception:  # noqa: BLE001 - a damaged EXIF block is ignored later too
        return 0  # unknown: count a rotated copy


def apply_exif_orientation(image: Image.Image) -> Image.Image:
    """The image as it is meant to be viewed. A damaged EXIF block is ignored (logged), not fatal:
    the pixels are fine and the photo is most likely upright anyway."""
    try:
        # in place: no copy of an image that needs no turning (the default returns a copy either way)
        upright = ImageOps.exif_transpose(image, in_place=True)
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types on malformed EXIF
        log.warning("ignoring unreadable EXIF orientation", extra={"error": repr(exc)})
        return image
    return upright if upright is not None else image


def check_sample_depth(mode: str) -> None:
    """The colour policy crops and photos share: 8-bit samples only. 16-bit (a 16-bit PNG is mode
    I;16) and float images would have to be clipped or rescaled to 8 bits, and any choice there
    changes the embedding, so both paths refuse them with ``unsupported_color_mode``."""
    if mode in ("I", "F") or mode.startswith("I;16"):
        raise UnsupportedColorMode(f"colour mode {mode} has 16-bit or float samples; send 8-bit RGB", mode=mode)


def photo_to_rgb(image: Image.Image, allow_grayscale: bool = True) -> np.ndarray:
    """HxWx3 uint8 RGB of a decoded photo.

    Black-and-white photos are legitimate photos: with ``allow_grayscale`` they are replicated to
    three channels (the detector and the model then see a gray face; nothing is invented). Alpha is
    dropped only when every pixel is opaque (screenshots and PNG exports often carry a useless
    alpha channel); real transparency is refused, since the background behind it is unknown.
    """
    mode = image.mode
    if mode == "P":
        if "transparency" not in image.info:
            return _to_array(image, "RGB")  # palette lookup strip by strip, not a whole RGB copy first
        image = image.convert("RGBA")
        mode = image.mode
    if mode in ALPHA_MODES:
        alpha_low, _ = image.getchannel("A").getextrema()
        if alpha_low < 255:  # type: ignore[operator]  # one band: getextrema gives numbers, not tuples
            raise AlphaChannel("the photo has transparent pixels; send an opaque image", mode=mode)
        image = image.convert("RGB" if mode in ("RGBA", "RGBa", "PA") else "L")
        mode = image.mode
    check_sample_depth(mode)
    if mode in GRAYSCALE_MODES:
        if not allow_grayscale:
            raise UnsupportedColorMode("the photo is grayscale; send an RGB image", mode=mode)
        # one plane seen as three (a read-only broadcast view): a full-size RGB copy of a gray photo
        # would cost 3-7 bytes per pixel for nothing (detector and alignment use the plane, gray_plane)
        gray = _to_array(image, "L")
        return np.broadcast_to(gray[..., None], (*gray.shape, 3))
    elif mode not in ("RGB", "CMYK", "YCbCr"):
        raise UnsupportedColorMode(f"unsupported colour mode {mode}", mode=mode)
    return _to_array(image, "RGB")


STRIP_BYTES = 4 << 20


def _to_array(image: Image.Image, mode: str) -> np.ndarray:
    """``image`` converted to ``mode`` (L or RGB) as a uint8 array, a strip of rows at a time: a whole
    image through ``np.asarray`` (Pillow's ``tobytes``) or ``convert`` holds the pixels two or three
    times over at once (a 40 Mpx RGB photo peaked at ~380 MB that way, ~280 MB this way)."""
    width, height = image.size
    out = np.empty((height, width) if mode == "L" else (height, width, 3), dtype=np.uint8)
    rows = max(1, STRIP_BYTES // max(1, width * 4))
    for top in range(0, height, rows):
        strip = image.crop((0, top, width, min(height, top + rows)))
        out[top : top + strip.height] = np.asarray(strip if strip.mode == mode else strip.convert(mode))
    return out


def decode_photo(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int | None = None, allow_grayscale: bool = True
) -> np.ndarray:
    """Photo bytes -> upright HxWx3 uint8 RGB array (``open_photo`` then ``photo_to_rgb``)."""
    return photo_to_rgb(open_photo(data, max_pixels=max_pixels, max_bytes=max_bytes), allow_grayscale)
