"""Image bytes -> upright RGB uint8 arrays: the one decoder, and the one colour policy, for aligned
crops and photos alike. The first step of the data path; a leaf module (Pillow, numpy and the
error vocabulary only): detection and the pipeline depend on it, never the reverse.

Everything that can be wrong with an upload is caught here, before any model or gallery work, as an
``ImageError`` carrying its API ``ErrorCode`` (``for_image`` makes it the request's ``ServiceError``):
empty, not an image, truncated, decompression bomb, transparency, a colour mode we do not convert.

* **Header first** (``read_header``): byte and pixel limits and an aligned crop's size are checked on
  the header, before any pixel memory exists (a few kB declaring 30000x30000 costs microseconds), and
  a photo's decode cost is estimated from it (``decode_cost``, for ``decode_budget``). One parse per
  image: ``image_type=auto`` decides crop or photo from the same header the decode then uses.
* **Orientation**: the EXIF Orientation tag is applied, so pixels, sizes and face coordinates are the
  image as people view it (a crop stored sideways plus a tag is as good as an upright one).
* **Colour policy** (``to_rgb``), the same for crops and photos: 8-bit RGB, YCbCr, RGB palettes and
  CMYK (Pillow's conversion, no ICC colour management) become RGB; 8-bit grayscale (L, 1) is
  replicated to three channels (a gray face is a gray face; nothing is invented); an alpha channel
  that is opaque everywhere is dropped (screenshots and PNG exports carry one for nothing), real
  transparency is refused (``alpha_channel``: the background behind it is unknown, and any guess
  changes the embedding); 16-bit and float samples and every other mode are refused
  (``unsupported_color_mode``: clipping or rescaling to 8 bits is a guess too).
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ErrorCode, ServiceError

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 40_000_000  # a 48 MP phone photo is 8000x6000 = 48 M; 40 M keeps RGB under 120 MB
GRAYSCALE_MODES = ("L", "1")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


# -- errors ------------------------------------------------------------------------------------------


class ImageError(Exception):
    """Something about an uploaded image that the client must fix; never a server fault. The
    subclasses say what; the base's code is still a 4xx should it be raised as it is."""

    code: ClassVar[ErrorCode] = ErrorCode.invalid_request

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def for_image(self, index: int) -> ServiceError:
        """This error as the API reports it for the request's image ``index``."""
        return ServiceError(self.code, f"image {index}: {self.message}", index=index, **self.details)


class EmptyImage(ImageError):
    code = ErrorCode.empty_image


class ImageTooLarge(ImageError):
    """Too many bytes, or a header declaring more pixels than allowed (decompression bomb)."""

    code = ErrorCode.image_too_large


class NotAnImage(ImageError):
    code = ErrorCode.not_an_image


class CorruptImage(ImageError):
    """A recognised format whose data is cut off or damaged."""

    code = ErrorCode.truncated_image


class AlphaChannel(ImageError):
    """Transparent pixels: what is behind them is unknown, so we do not guess a background."""

    code = ErrorCode.alpha_channel


class UnsupportedColorMode(ImageError):
    code = ErrorCode.unsupported_color_mode


class WrongImageSize(ImageError):
    """An aligned crop that is not exactly the model's input size."""

    code = ErrorCode.wrong_image_size


@contextmanager
def image_errors(index: int) -> Iterator[None]:
    """Inside: any ``ImageError`` leaves as the API's ``ServiceError`` for image ``index``."""
    try:
        yield
    except ImageError as exc:
        raise exc.for_image(index) from exc


def decode_base64(text: str, index: int) -> bytes:
    if "," in text[:100] and text.startswith("data:"):
        text = text.split(",", 1)[1]  # tolerate data URLs from browsers
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ServiceError(ErrorCode.invalid_base64, f"image {index} is not valid base64", index=index) from exc


# -- header and decode -------------------------------------------------------------------------------


# Our own limit (``max_pixels``, checked on the header) is what applies; Pillow's warning threshold
# (Image.MAX_IMAGE_PIXELS, 89 M pixels) is not, and its warning text carries the pixel count, so
# each bomb of a new size would print again. Ignored once, here, for the process: a
# ``warnings.catch_warnings()`` around each decode swaps the process-wide filter list and is not
# thread-safe (decodes run in the thread pool: overlapping ones that exit out of order leave
# filters installed or drop other threads' filters), and it cost two list copies per image.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


# The formats whose parsers may see an upload (FACE_IMAGE_FORMATS): Pillow reads some 40, and most of
# its published decoder flaws were in the rarer ones (EPS even runs Ghostscript where it is installed).
DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")


def image_suffixes(formats: tuple[str, ...] = DEFAULT_FORMATS) -> frozenset[str]:
    """The file name suffixes (lower case, with the dot) of ``formats``, as Pillow registers them: what
    the folder commands read from a folder (a ``.tif`` is an image to them only with TIFF taken)."""
    Image.init()
    return frozenset(suffix for suffix, name in Image.registered_extensions().items() if name in formats)


@contextmanager
def _decode_errors(max_pixels: int, formats: tuple[str, ...] = DEFAULT_FORMATS) -> Iterator[None]:
    try:
        yield
    except Image.DecompressionBombError as exc:  # Pillow's own hard limit, raised inside open()
        raise ImageTooLarge(f"the image declares too many pixels: {exc}", limit=max_pixels) from exc
    except UnidentifiedImageError as exc:
        raise NotAnImage(f"the data is not a decodable image in a format this service takes ({', '.join(formats)}: "
                         "FACE_IMAGE_FORMATS)") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow reports a cut-off file as OSError("image file is truncated ...")
        raise CorruptImage(f"the image is truncated or corrupt: {exc}") from exc


def open_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int | None = None,
                formats: tuple[str, ...] = DEFAULT_FORMATS) -> Image.Image:
    """The image with only its header read (size and mode known, no pixel memory yet), size-checked.
    Only the parsers of ``formats`` look at the data (another format: ``NotAnImage``)."""
    if not data:
        raise EmptyImage("the image is empty (0 bytes)")
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageTooLarge(f"the image is {len(data)} bytes; the limit is {max_bytes}", limit=max_bytes)
    with _decode_errors(max_pixels, formats):
        image = Image.open(io.BytesIO(data), formats=formats)  # reads the header only
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


def apply_exif_orientation(image: Image.Image) -> Image.Image:
    """The image as it is meant to be viewed. A damaged EXIF block is ignored (logged), not fatal:
    the pixels are fine and the image is most likely upright anyway."""
    try:
        # in place: no copy of an image that needs no turning (the default returns a copy either way)
        upright = ImageOps.exif_transpose(image, in_place=True)
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types on malformed EXIF
        log.warning("ignoring unreadable EXIF orientation", extra={"error": repr(exc)})
        return image
    return upright if upright is not None else image


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


# Bytes per pixel Pillow keeps for a decoded image (1-band 8-bit modes 1, 2-4 bands are padded to 4)
_STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
# The peak, per pixel, of decoding and converting to the array the detector gets (``to_rgb``):
# the decoded image and the numpy array (1 byte a pixel for gray photos, which stay one plane; 3 for
# colour), conversions being made strip by strip (``_to_array``); alpha: + the alpha plane checked.
_PEAK_BYTES = {"1": 2, "L": 2, "P": 4, "RGB": 7, "RGBA": 8, "LA": 6, "La": 6, "PA": 8, "RGBa": 8}
DETECTOR_OVERHEAD = 16 << 20  # conversion strips and the detector's downscaled copies, generously


_UNREAD = -1


def decode_cost(image: Image.Image, orientation: int | None = _UNREAD) -> int:
    """Estimated peak memory (bytes) of decoding an ``open_header`` image for detection, from its
    header alone: what a decode will cost is known before any pixel is allocated. (``orientation``:
    the header's EXIF orientation when already read.)"""
    pixels = image.width * image.height
    stored = _STORED_BYTES.get(image.mode, 4)
    peak = _PEAK_BYTES.get(image.mode, stored + 3)
    if image.mode == "P" and _palette_alpha(image):
        peak = 4 + 1 + 3 + 1  # converted to RGBA (with the palette image) for the alpha check
    if orientation == _UNREAD:
        orientation = _exif_orientation(image)
    if orientation not in (None, 1):
        peak += stored  # exif_transpose makes a rotated copy
    return pixels * peak + DETECTOR_OVERHEAD


def _palette_alpha(image: Image.Image) -> bool:
    """Whether a palette image may have transparent pixels (a tRNS entry, or an RGBA palette)."""
    palette_mode = image.palette.mode if image.palette else "RGB"
    return "transparency" in image.info or "A" in palette_mode


class ImageHeader:
    """One upload with only its header parsed: size, mode and EXIF orientation known, limits checked,
    no pixels yet. ``to_rgb`` decodes it once and forgets the image, so that only the conversion holds
    the decoded pixels (the decode budget's estimate counts on them being freed once converted)."""

    def __init__(self, image: Image.Image) -> None:
        self._image: Image.Image | None = image
        self.mode = image.mode
        self.width, self.height = image.size
        self.orientation = _exif_orientation(image)
        turned = self.orientation in (5, 6, 7, 8)  # these swap width and height
        # (height, width) as the image will be viewed, EXIF orientation applied
        self.upright_size = (self.width, self.height) if turned else (self.height, self.width)
        self._cost: int | None = None

    @property
    def cost(self) -> int:
        """Estimated peak decode memory (``decode_cost``) for the decode budget; photos only ask."""
        if self._cost is None:
            if self._image is None:
                raise RuntimeError("the cost of an ImageHeader is known before it is decoded")
            self._cost = decode_cost(self._image, self.orientation)
        return self._cost

    def to_rgb(self) -> np.ndarray:
        """Decode, turn upright and convert by the colour policy (``to_rgb``); once only."""
        image, self._image = self._image, None
        if image is None:
            raise RuntimeError("an ImageHeader is decoded once")
        return to_rgb(load_upright(image))


def read_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int | None = None,
                formats: tuple[str, ...] = DEFAULT_FORMATS) -> ImageHeader:
    return ImageHeader(open_header(data, max_pixels=max_pixels, max_bytes=max_bytes, formats=formats))


# -- the colour policy -------------------------------------------------------------------------------


def check_sample_depth(mode: str) -> None:
    """8-bit samples only. 16-bit (a 16-bit PNG is mode I;16) and float images would have to be
    clipped or rescaled to 8 bits, and any choice there changes the embedding."""
    if mode in ("I", "F") or mode.startswith("I;16"):
        raise UnsupportedColorMode(f"colour mode {mode} has 16-bit or float samples; send 8-bit RGB", mode=mode)


def to_rgb(image: Image.Image) -> np.ndarray:
    """HxWx3 uint8 RGB of a decoded image, by the one colour policy (module docstring).

    A grayscale image comes back as a read-only broadcast view of its one plane (a full-size RGB copy
    of a gray photo would cost 3-7 bytes per pixel for nothing; the detector and alignment use the
    plane, ``detection.detector.gray_plane``); ``np.stack`` or any arithmetic makes it a plain array.
    """
    mode = image.mode
    if mode == "P":
        if not _palette_alpha(image):
            return _to_array(image, "RGB")  # palette lookup strip by strip, not a whole RGB copy first
        image = image.convert("RGBA")
        mode = image.mode
    if mode in ALPHA_MODES:
        alpha_low, _ = image.getchannel("A").getextrema()
        if alpha_low < 255:  # type: ignore[operator]  # one band: getextrema gives numbers, not tuples
            raise AlphaChannel("the image has transparent pixels; send an opaque image", mode=mode)
        image = image.convert("RGB" if mode in ("RGBA", "RGBa", "PA") else "L")
        mode = image.mode
    check_sample_depth(mode)
    if mode in GRAYSCALE_MODES:
        gray = _to_array(image, "L")
        return np.broadcast_to(gray[..., None], (*gray.shape, 3))
    if mode not in ("RGB", "CMYK", "YCbCr"):
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
    if rows >= height:  # one strip (an aligned crop): no cropped copy of the whole image first
        out[:] = np.asarray(image if image.mode == mode else image.convert(mode))
        return out
    for top in range(0, height, rows):
        strip = image.crop((0, top, width, min(height, top + rows)))
        out[top : top + strip.height] = np.asarray(strip if strip.mode == mode else strip.convert(mode))
    return out


# -- crops and photos --------------------------------------------------------------------------------


def _check_crop_size(got: tuple[int, ...], size: tuple[int, int]) -> None:
    """``got`` (height, width) must be exactly the model's input ``size`` (height, width)."""
    if tuple(got) != tuple(size):
        height, width = got
        raise WrongImageSize(f"the image is {width}x{height}; aligned faces must be {size[1]}x{size[0]}",
                             expected=[size[1], size[0]], got=[width, height])


def check_aligned_size(header: ImageHeader, size: tuple[int, int]) -> None:
    """An aligned crop must be exactly the model's input ``size`` (height, width) as viewed (EXIF
    applied), checked on the header: a 6000x6000 "crop" is never decoded."""
    _check_crop_size(header.upright_size, size)


def aligned_crop(header: ImageHeader, size: tuple[int, int]) -> np.ndarray:
    """An aligned face crop, exactly ``size`` (height, width), as a plain HxWx3 RGB uint8 array."""
    check_aligned_size(header, size)
    array = np.ascontiguousarray(header.to_rgb())  # a gray crop's broadcast view made a real array (tiny)
    _check_crop_size(array.shape[:2], size)  # an orientation found only after decoding (a PNG's late eXIf)
    return array


def decode_aligned_face(
    data: bytes, index: int, size: tuple[int, int], max_bytes: int, max_pixels: int,
    formats: tuple[str, ...] = DEFAULT_FORMATS,
) -> np.ndarray:
    """An aligned face crop's bytes -> exactly ``size`` (height, width) HxWx3 RGB uint8; errors numbered."""
    with image_errors(index):
        return aligned_crop(read_header(data, max_pixels=max_pixels, max_bytes=max_bytes, formats=formats), size)


def open_photo(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int | None = None,
               formats: tuple[str, ...] = DEFAULT_FORMATS) -> Image.Image:
    """Decode ``data`` into a loaded, upright Pillow image, refusing oversized images before decoding."""
    return load_upright(open_header(data, max_pixels=max_pixels, max_bytes=max_bytes, formats=formats))


def decode_photo(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int | None = None,
                 formats: tuple[str, ...] = DEFAULT_FORMATS) -> np.ndarray:
    """Photo bytes -> upright HxWx3 uint8 RGB array (``read_header`` then ``to_rgb``), no budget: for
    tools and tests; the service decodes through ``detection.PhotoAligner``, which reserves memory."""
    return read_header(data, max_pixels=max_pixels, max_bytes=max_bytes, formats=formats).to_rgb()


BLOCK = 8  # the JPEG (DCT) block size
BLOCKINESS_MAX_SIDE = 256  # a larger face region is measured on its central window (the grid is the same)


def blockiness(rgb: np.ndarray, box: tuple[float, float, float, float] | None = None) -> float:
    """How strongly an 8x8 block grid shows in a region of an image (``box`` = x, y, w, h in its pixels;
    None: the whole image): the mean absolute step between neighbouring columns (rows) at the grid's
    phase, over the median step at the 8 phases, horizontal and vertical averaged. About 1 where no grid
    shows (an uncompressed or well-compressed photo), rising with JPEG compression; measured on the
    pixels as decoded, before any warp (alignment destroys the grid). The phase is the strongest of the
    8, so a crop or an EXIF rotation that shifted the grid does not matter."""
    h, w = rgb.shape[:2]
    if box is None:
        x0, y0, x1, y1 = 0, 0, w, h
    else:
        x, y, bw, bh = box
        cx, cy = x + bw / 2, y + bh / 2
        half_w, half_h = min(bw, BLOCKINESS_MAX_SIDE) / 2, min(bh, BLOCKINESS_MAX_SIDE) / 2
        x0, x1 = max(0, int(cx - half_w)), min(w, int(cx + half_w) + 1)
        y0, y1 = max(0, int(cy - half_h)), min(h, int(cy + half_h) + 1)
    region = np.asarray(rgb[y0:y1, x0:x1], dtype=np.float32)
    if region.ndim == 3:
        region = region @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if region.shape[0] < 2 * BLOCK or region.shape[1] < 2 * BLOCK:
        return 1.0  # too small to see a grid
    # (the same arithmetic as np.abs(np.diff(...)).mean(...) and np.median, without their Python-level
    # overhead: this runs on every face of every request, on the event loop for small crops)
    ratios = []
    for steps in (_mean_abs_step(region, axis=1), _mean_abs_step(region, axis=0)):
        usable = len(steps) // BLOCK * BLOCK
        phase_means = np.add.reduce(steps[:usable].reshape(-1, BLOCK), axis=0)
        np.true_divide(phase_means, usable // BLOCK, out=phase_means)
        ordered = np.sort(phase_means)  # the median of the 8 phases: the mean of the middle two
        median = (ordered[BLOCK // 2 - 1] + ordered[BLOCK // 2]) / 2
        ratios.append((float(ordered[-1]) + 0.5) / (float(median) + 0.5))
    return (ratios[0] + ratios[1]) / 2


def _mean_abs_step(region: np.ndarray, axis: int) -> np.ndarray:
    """``np.abs(np.diff(region, axis=axis)).mean(axis=1 - axis)``, computed the same way."""
    steps = region[:, 1:] - region[:, :-1] if axis == 1 else region[1:] - region[:-1]
    np.abs(steps, out=steps)
    total = np.add.reduce(steps, axis=1 - axis)
    return np.true_divide(total, steps.shape[1 - axis], out=total)
