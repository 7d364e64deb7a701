"""Photo decoding: EXIF orientation applied, bombs refused before decoding, bad data coded."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from service.faces.detection import (
    AlphaChannel,
    CorruptImage,
    EmptyImage,
    ImageTooLarge,
    NotAnImage,
    UnsupportedColorMode,
    align_face,
)
from service.faces.images import decode_photo, open_photo
from tests.detection.helpers import PHOTOS, load_rgb

UPRIGHT = PHOTOS / "Helen_Clark_0001.jpg"
# EXIF Orientation value -> the transpose that made the stored pixels from the upright ones
# (the tag says how to undo it; Pillow's exif_transpose applies the inverse of these)
STORED_AS = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270,
             2: Image.Transpose.FLIP_LEFT_RIGHT}


def with_orientation(upright: Image.Image, orientation: int, fmt: str) -> bytes:
    stored = upright.transpose(STORED_AS[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, format=fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.mark.parametrize("orientation", sorted(STORED_AS))
def test_exif_orientation_gives_back_the_upright_pixels(orientation):
    upright = Image.open(UPRIGHT).convert("RGB")
    data = with_orientation(upright, orientation, "PNG")  # lossless: the result must be exact
    assert not np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), np.asarray(upright))
    np.testing.assert_array_equal(decode_photo(data), np.asarray(upright))


def test_exif_rotated_jpeg_gives_the_same_face(detector, embedder):
    upright = Image.open(UPRIGHT).convert("RGB")
    rotated_jpeg = with_orientation(upright, 6, "JPEG")  # how a phone held sideways stores a photo
    (expected,) = detector.detect(np.asarray(upright))
    (found,) = detector.detect(decode_photo(rotated_jpeg))
    assert np.abs(found.landmarks_array - expected.landmarks_array).max() < 2.0
    a, b = embedder([align_face(decode_photo(rotated_jpeg), found), align_face(np.asarray(upright), expected)])
    assert a @ b > 0.95


@pytest.mark.parametrize("orientation", [0, 9, 65535])
def test_nonsense_orientation_value_leaves_the_photo_as_stored(orientation):
    upright = Image.open(UPRIGHT).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    upright.save(buf, format="PNG", exif=exif)
    np.testing.assert_array_equal(decode_photo(buf.getvalue()), np.asarray(upright))


def test_damaged_exif_block_does_not_fail_decoding():
    upright = Image.open(UPRIGHT).convert("RGB")
    data = bytearray(with_orientation(upright, 6, "JPEG"))
    marker = data.find(b"Exif\x00\x00")
    data[marker + 6: marker + 14] = b"\xff" * 8  # smash the TIFF header inside the APP1 segment
    assert decode_photo(bytes(data)).shape == (250, 250, 3)


def png_declaring(width: int, height: int) -> bytes:
    """A valid-looking PNG that declares width x height RGB pixels but holds a few bytes of data."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("width,height,max_pixels", [
    (30000, 30000, 40_000_000),  # 900 M pixels: beyond Pillow's own hard limit too
    (8000, 6000, 40_000_000),  # 48 M: under Pillow's limits, refused by ours
    (2001, 1000, 2_000_000),  # just over a configured limit
])
def test_decompression_bomb_is_refused_before_decoding(width, height, max_pixels):
    data = png_declaring(width, height)
    assert len(data) < 200
    tracemalloc.start()
    with pytest.raises(ImageTooLarge) as info:
        decode_photo(data, max_pixels=max_pixels)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert info.value.code == "image_too_large"
    assert peak < 1_000_000  # nothing decoded: 30000x30000 RGB would be 2.7 GB


def test_image_at_the_limit_is_decoded():
    image = Image.fromarray(np.full((100, 200, 3), 77, np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    assert decode_photo(buf.getvalue(), max_pixels=20_000).shape == (100, 200, 3)


def test_byte_limit():
    data = UPRIGHT.read_bytes()
    with pytest.raises(ImageTooLarge):
        open_photo(data, max_bytes=len(data) - 1)
    assert open_photo(data, max_bytes=len(data)).size == (250, 250)


@pytest.mark.parametrize("data,error,code", [
    (b"", EmptyImage, "empty_image"),
    (b"this is not an image at all" * 10, NotAnImage, "not_an_image"),
    (UPRIGHT.read_bytes()[:3000], CorruptImage, "truncated_image"),
], ids=["empty", "text", "truncated"])
def test_bad_data_has_a_code(data, error, code):
    with pytest.raises(error) as info:
        decode_photo(data)
    assert info.value.code == code and info.value.message


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def test_colour_modes():
    rgb = load_rgb(UPRIGHT)
    gray = Image.fromarray(rgb).convert("L")
    as_rgb = decode_photo(encoded(gray))
    assert as_rgb.shape == (250, 250, 3) and (as_rgb[..., 0] == as_rgb[..., 2]).all()
    opaque = Image.fromarray(rgb).convert("RGBA")
    np.testing.assert_array_equal(decode_photo(encoded(opaque)), rgb)
    transparent = opaque.copy()
    transparent.putpixel((0, 0), (0, 0, 0, 0))
    with pytest.raises(AlphaChannel):
        decode_photo(encoded(transparent))
    cmyk = Image.fromarray(rgb).convert("CMYK")
    assert decode_photo(encoded(cmyk, "JPEG")).shape == (250, 250, 3)
    sixteen_bit = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)  # mode I;16
    with pytest.raises(UnsupportedColorMode):
        decode_photo(encoded(sixteen_bit))
