"""Decoding and validation of uploaded images."""

from __future__ import annotations

import io
import warnings

import cv2
import numpy as np
import pytest
from PIL import Image

from service.errors import ErrorCode, ServiceError
from service.faces.images import (
    BLOCK,
    BLOCKINESS_MAX_SIDE,
    DEFAULT_FORMATS,
    blockiness,
    decode_aligned_face,
    decode_base64,
    decode_photo,
    image_errors,
)
from service.faces.quality import crop_parts
from tests.conftest import FACES

FACE = sorted(FACES.glob("*.jpg"))[0]


def decode(data: bytes):
    return decode_aligned_face(data, 0, (112, 112), max_bytes=1 << 20, max_pixels=10_000_000)


def png(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_valid_jpeg_png_and_palette():
    face = decode(FACE.read_bytes())
    assert face.shape == (112, 112, 3) and face.dtype == np.uint8
    as_png = decode(png(Image.open(FACE)))
    np.testing.assert_array_equal(face, as_png)
    palette = decode(png(Image.open(FACE).convert("P")))
    assert palette.shape == (112, 112, 3)


def test_exif_orientation_is_applied():
    img = Image.open(FACE).convert("RGB")
    rotated = img.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view": undoes the counter-clockwise ROTATE_90
    buf = io.BytesIO()
    rotated.save(buf, format="JPEG", exif=exif, quality=100)
    upright = decode(buf.getvalue())
    assert np.abs(upright.astype(int) - np.asarray(img).astype(int)).mean() < 3


@pytest.mark.parametrize(
    "data,code",
    [
        (b"", ErrorCode.empty_image),
        (b"GIF89a not really", ErrorCode.not_an_image),
        (FACE.read_bytes()[:500], ErrorCode.truncated_image),
        (b"x" * (2 << 20), ErrorCode.image_too_large),
    ],
)
def test_broken_bytes(data, code):
    with pytest.raises(ServiceError) as exc:
        decode(data)
    assert exc.value.code == code and 400 <= exc.value.status < 500


def test_modes_and_size():
    """(Every colour mode, crops and photos alike: test_colour_policy.py.)"""
    img = Image.open(FACE).convert("RGB")
    see_through = img.convert("RGBA")
    see_through.putpixel((5, 5), (0, 0, 0, 0))
    for converted, code in [(see_through, ErrorCode.alpha_channel), (img.resize((100, 112)), ErrorCode.wrong_image_size)]:
        with pytest.raises(ServiceError) as exc:
            decode(png(converted))
        assert exc.value.code == code


def test_pixel_bomb_refused_before_decoding():
    big = Image.new("RGB", (4000, 3000))
    buf = io.BytesIO()
    big.save(buf, format="PNG")  # compresses to a few KB
    with pytest.raises(ServiceError) as exc:
        decode_aligned_face(buf.getvalue(), 0, (112, 112), max_bytes=1 << 20, max_pixels=1_000_000)
    assert exc.value.code == ErrorCode.image_too_large


def test_base64_errors():
    assert decode_base64("aGk=", 0) == b"hi"
    assert decode_base64("data:image/png;base64,aGk=", 0) == b"hi"
    with pytest.raises(ServiceError) as exc:
        decode_base64("not base64!", 3)
    assert exc.value.code == ErrorCode.invalid_base64 and exc.value.details == {"index": 3}


def test_every_photo_error_is_a_client_error_of_the_api_vocabulary():
    """Photo errors carry ErrorCode values (no string to look up later) and each maps to a 4xx, the
    base class included: raising it must never turn into a 500."""
    from service.errors import STATUS
    from service.faces.detection import errors as photo_errors

    classes = [c for c in vars(photo_errors).values()
               if isinstance(c, type) and issubclass(c, photo_errors.PhotoError)]
    assert len(classes) >= 8
    for cls in classes:
        assert isinstance(cls.code, ErrorCode) and 400 <= STATUS[cls.code] < 500, cls
        error = cls("what is wrong", mode="X").for_image(3)
        assert isinstance(error, ServiceError) and error.code == cls.code and 400 <= error.status < 500
        assert error.details == {"index": 3, "mode": "X"} and error.message == "image 3: what is wrong"


def test_concurrent_decodes_leave_the_warning_filters_alone():
    """Decodes run in the thread pool. ``warnings.catch_warnings`` swaps the process-wide filter list
    on entry and puts back the list it saw on exit, so two overlapping decodes that exit in the
    wrong order leave one's "ignore" filter installed for good (and a decode can drop a filter that
    another thread installed meanwhile). The decode path must not touch the filters at all."""
    import sys
    import threading
    import warnings

    data = FACE.read_bytes()
    before = list(warnings.filters)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(300):
                decode(data)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, as a loaded server does
    try:
        threads = [threading.Thread(target=work) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors
    assert warnings.filters == before


def _plain_blockiness(rgb: np.ndarray, box=None) -> float:
    """``images.blockiness`` as first written, with numpy's median/diff/mean: the reference its faster
    arithmetic must equal exactly (the quality limits were fitted on these values)."""
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
        return 1.0
    ratios = []
    for steps in (np.abs(np.diff(region, axis=1)).mean(axis=0), np.abs(np.diff(region, axis=0)).mean(axis=1)):
        usable = len(steps) // BLOCK * BLOCK
        phase_means = steps[:usable].reshape(-1, BLOCK).mean(axis=0)
        ratios.append((float(phase_means.max()) + 0.5) / (float(np.median(phase_means)) + 0.5))
    return float(np.mean(ratios))


def test_blockiness_and_crop_parts_equal_numpys_plain_arithmetic():
    """The quality parts measured on every face (on the event loop for small crops) are computed
    without numpy's Python-level helpers, and must give exactly what those give: real crops, photos
    with face boxes, gray images and heavily compressed JPEGs of every size."""
    rng = np.random.default_rng(0)
    images = [decode(path.read_bytes()) for path in sorted(FACES.glob("*.jpg"))[:8]]
    for quality in (5, 30, 90):
        noise = Image.fromarray(rng.integers(0, 256, (int(rng.integers(20, 300)), int(rng.integers(20, 300)), 3),
                                             dtype=np.uint8))
        buf = io.BytesIO()
        noise.save(buf, format="JPEG", quality=quality)
        images.append(decode_photo(buf.getvalue()))
    images += [images[0][..., 0], images[0][:15, :40]]  # gray; too small to see a grid
    for rgb in images:
        h, w = rgb.shape[:2]
        for box in (None, (w * 0.2, h * 0.1, w * 0.5, h * 0.7), (-10.0, -5.0, 3.0 * w, 2.0 * h)):
            assert blockiness(rgb, box) == _plain_blockiness(rgb, box)
        if rgb.ndim == 3:
            parts = crop_parts(rgb)
            top, bottom, left, right = (int(round(f * n)) for f, n in zip((0.25, 0.92, 0.18, 0.82), (h, h, w, w)))
            gray = cv2.cvtColor(np.ascontiguousarray(rgb[top:bottom, left:right]), cv2.COLOR_RGB2GRAY)
            assert parts["exposure"] == float(gray.mean())
            assert parts["clipping"] == float(np.mean((gray <= 5) | (gray >= 250)))
            assert parts["blockiness"] == _plain_blockiness(rgb)


def saved_as(img: Image.Image, fmt: str) -> bytes | None:
    """``img`` written in format ``fmt`` by Pillow (in a mode the format takes), or None if it cannot."""
    for mode in ("RGB", "L", "1", "F"):
        buf = io.BytesIO()
        try:
            with warnings.catch_warnings():  # (formats Pillow will drop say so when written)
                warnings.simplefilter("ignore", DeprecationWarning)
                img.convert(mode).save(buf, format=fmt)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        return buf.getvalue()
    return None


def test_only_the_accepted_formats_are_parsed():
    """Pillow reads some 40 formats (EPS through Ghostscript, PSD, FITS, SPIDER, DDS, BLP, TGA, PCX, SGI,
    ...; most of its published decoder flaws were in such formats). The service takes the documented
    JPEG, PNG, WebP and BMP (FACE_IMAGE_FORMATS); anything else is ``not_an_image`` without its
    parser ever seeing it, and the message says what is taken."""
    from PIL import features

    img = Image.open(FACE).convert("RGB")
    Image.init()
    accepted = ["JPEG", "PNG", "BMP"] + (["WEBP"] if features.check("webp") else [])
    for fmt in accepted:
        assert decode(saved_as(img, fmt)).shape == (112, 112, 3), fmt
    refused = {fmt: data for fmt in sorted(Image.SAVE) if fmt not in accepted and fmt in Image.OPEN
               and (data := saved_as(img, fmt)) is not None}
    assert {"TIFF", "GIF", "PCX", "TGA", "SGI", "PPM", "ICO"} <= set(refused), sorted(refused)
    for fmt, data in refused.items():
        with pytest.raises(ServiceError) as exc:
            decode(data)
        assert exc.value.code == ErrorCode.not_an_image, (fmt, exc.value.code)
        assert "(JPEG, PNG, WEBP, BMP:" in exc.value.message, (fmt, exc.value.message)
    # widened: TIFF read when it is named; narrowed: what is left out is refused like the rest
    tiff = decode_aligned_face(refused["TIFF"], 0, (112, 112), max_bytes=1 << 20, max_pixels=10_000_000,
                               formats=("JPEG", "TIFF"))
    assert tiff.shape == (112, 112, 3)
    with pytest.raises(ServiceError) as exc:
        decode_aligned_face(saved_as(img, "PNG"), 0, (112, 112), max_bytes=1 << 20, max_pixels=10_000_000,
                            formats=("JPEG",))
    assert exc.value.code == ErrorCode.not_an_image and "(JPEG:" in exc.value.message


def test_the_image_formats_setting_names_formats_pillow_reads():
    from pydantic import ValidationError

    from service.config import Settings

    assert Settings(image_formats="jpeg, png").image_formats == ("JPEG", "PNG")
    assert Settings(image_formats="jpg,tif,JPEG").image_formats == ("JPEG", "TIFF")  # the suffixes' names too
    assert Settings().image_formats == ("JPEG", "PNG", "WEBP", "BMP") == DEFAULT_FORMATS  # the decoder's default too
    for bad in ("", ",", "JPEG,HEIC", "GIF87"):
        with pytest.raises(ValidationError):
            Settings(image_formats=bad)


def test_mutated_images_of_every_accepted_format_get_a_coded_4xx_or_decode():
    """Bytes flipped, cut, inserted and overwritten with extreme values in a JPEG (baseline and
    progressive), PNG (RGB and palette), WebP and BMP, decoded as a crop and as a photo: each decodes
    or is refused with a 4xx of the vocabulary; nothing else escapes the decoder (it would be a 500).
    (180,000 such decodes found nothing when this was written; the suite runs a fixed 2,400.)"""
    from PIL import features

    img = Image.open(FACE).convert("RGB")
    seeds = [saved_as(img, "JPEG"), png(img), png(img.convert("P")), saved_as(img, "BMP")]
    buf = io.BytesIO()
    img.save(buf, format="JPEG", progressive=True)
    seeds.append(buf.getvalue())
    if features.check("webp"):
        seeds.append(saved_as(img, "WEBP"))
    rng = np.random.default_rng(16)
    escaped = []
    for seed in seeds:
        for _ in range(200):
            data = bytearray(seed)
            how = rng.integers(4)
            if how == 0:
                for at in rng.integers(0, len(data), rng.integers(1, 9)):
                    data[at] = int(rng.integers(256))
            elif how == 1:
                del data[int(rng.integers(1, len(data))):]
            elif how == 2:
                at = int(rng.integers(len(data)))
                data[at:at] = rng.integers(0, 256, int(rng.integers(1, 65)), dtype=np.uint8).tobytes()
            else:
                at = int(rng.integers(min(len(data), 200)))
                data[at:at + 4] = [b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff"][int(rng.integers(3))]
            for decode_it in (decode, lambda d: decode_photo(d, max_pixels=10_000_000)):
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # (Pillow warns of damaged EXIF: test_logs.py)
                        with image_errors(0):
                            decode_it(bytes(data))
                except ServiceError as exc:
                    if not 400 <= exc.status < 500:
                        escaped.append((exc.code, exc.status))
                except Exception as exc:  # noqa: BLE001 - what the test looks for
                    escaped.append((type(exc).__name__, str(exc)[:80], bytes(data[:16])))
    assert not escaped, escaped[:5]
