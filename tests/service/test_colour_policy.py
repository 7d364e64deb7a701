"""One colour policy for aligned crops and photos (docs/design.md, "Decoding"): the same image in a
given colour mode is accepted and converted the same way, or refused with the same code, whichever
way it is sent. Unit level on the decode module, then over HTTP with the real server and models."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from service.errors import ErrorCode, ServiceError
from service.faces.images import DEFAULT_FORMATS, decode_aligned_face, decode_photo, image_errors
from tests.conftest import FIXTURES, b64, face_files

CROP = face_files("Gerhard_Schroeder")[0]  # 112x112, an aligned crop
FORMATS = (*DEFAULT_FORMATS, "TIFF")  # float samples come as TIFF: a service that takes TIFF (FACE_IMAGE_FORMATS)
PHOTO = FIXTURES / "photos" / "Helen_Clark_0001.jpg"  # 250x250, one face


def encode(img: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def transparent(img: Image.Image) -> Image.Image:
    img = img.copy()
    img.putpixel((0, 0), (0, 0, 0, 0) if img.mode == "RGBA" else (0, 0))
    return img


def rotated_with_exif(img: Image.Image) -> bytes:
    """Stored turned a quarter, with the EXIF tag (6) that says how to view it upright."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(img.transpose(Image.Transpose.ROTATE_90), exif=exif)


def palette_with_transparency(img: Image.Image) -> bytes:
    palette = img.convert("P")
    return encode(palette, transparency=int(np.asarray(palette)[0, 0]))


# mode -> (how the upload is made from an RGB image, the RGB image it must decode to, or the error code)
Case = tuple[Callable[[Image.Image], bytes], Callable[[Image.Image], Image.Image] | ErrorCode]
CASES: dict[str, Case] = {
    "rgb": (encode, lambda img: img),
    "gray_L": (lambda img: encode(img.convert("L")), lambda img: img.convert("L").convert("RGB")),
    "bilevel_1": (lambda img: encode(img.convert("1")), lambda img: img.convert("1").convert("RGB")),
    "gray_alpha_opaque": (lambda img: encode(img.convert("LA")), lambda img: img.convert("L").convert("RGB")),
    "rgba_opaque": (lambda img: encode(img.convert("RGBA")), lambda img: img),
    "palette": (lambda img: encode(img.convert("P")), lambda img: img.convert("P").convert("RGB")),
    "cmyk_jpeg": (lambda img: encode(img.convert("CMYK"), "JPEG", quality=95),
                  lambda img: Image.open(io.BytesIO(encode(img.convert("CMYK"), "JPEG", quality=95))).convert("RGB")),
    "exif_rotated": (rotated_with_exif, lambda img: img),
    "rgba_transparent": (lambda img: encode(transparent(img.convert("RGBA"))), ErrorCode.alpha_channel),
    "gray_alpha_transparent": (lambda img: encode(transparent(img.convert("LA"))), ErrorCode.alpha_channel),
    "palette_transparent": (palette_with_transparency, ErrorCode.alpha_channel),
    "16_bit": (lambda img: encode(Image.fromarray(np.asarray(img.convert("L")).astype(np.uint16) * 257)),
               ErrorCode.unsupported_color_mode),
    "float": (lambda img: encode(Image.fromarray(np.asarray(img.convert("L"), np.float32)), "TIFF"),
              ErrorCode.unsupported_color_mode),
}


def outcome(decode: Callable[[bytes], np.ndarray], data: bytes) -> np.ndarray | ErrorCode:
    try:
        return decode(data)
    except ServiceError as exc:
        return exc.code


def decode_crop(data: bytes) -> np.ndarray:
    return decode_aligned_face(data, 0, (112, 112), max_bytes=1 << 20, max_pixels=10_000_000, formats=FORMATS)


def decode_as_photo(data: bytes) -> np.ndarray:
    with image_errors(0):
        return decode_photo(data, formats=FORMATS)


@pytest.mark.parametrize("case", sorted(CASES))
def test_crops_and_photos_follow_one_colour_policy(case):
    """Each mode decodes to the same RGB pixels, or fails with the same code, as a crop and as a photo.
    (Before one decoder, crops refused gray, opaque alpha and CMYK that photos accepted.)"""
    make, expected = CASES[case]
    source = Image.open(CROP).convert("RGB")
    data = make(source)
    as_crop, as_photo = outcome(decode_crop, data), outcome(decode_as_photo, data)
    if isinstance(expected, ErrorCode):
        assert as_crop == expected and as_photo == expected
        return
    want = np.asarray(expected(source).convert("RGB"))
    assert isinstance(as_crop, np.ndarray) and isinstance(as_photo, np.ndarray), (as_crop, as_photo)
    assert as_crop.shape == (112, 112, 3) and as_crop.dtype == np.uint8
    np.testing.assert_array_equal(as_crop, want)
    np.testing.assert_array_equal(as_photo, want)


def test_a_crop_stored_sideways_is_checked_as_viewed():
    """The size rule of aligned crops applies to the image as viewed (EXIF applied): a 100x112 crop
    tagged to be turned is 112x100 upright and refused; its upright twin would be too."""
    narrow = Image.open(CROP).convert("RGB").resize((100, 112))
    with pytest.raises(ServiceError) as exc:
        decode_crop(rotated_with_exif(narrow))
    assert exc.value.code == ErrorCode.wrong_image_size and exc.value.details["got"] == [100, 112]


# -- over HTTP -------------------------------------------------------------------------------------


def embed(client, data: bytes, image_type: str) -> np.ndarray | str:
    r = client.post("/embed", json={"images": [b64(data)], "image_type": image_type})
    if r.status_code == 200:
        return np.array(r.json()["embeddings"][0], dtype=np.float32)
    assert 400 <= r.status_code < 500, r.text
    return r.json()["error"]["code"]


@pytest.mark.parametrize("image_type,source_file", [("aligned", CROP), ("photo", PHOTO), ("auto", CROP)],
                         ids=["aligned", "photo", "auto"])
def test_every_mode_embeds_as_its_rgb_conversion_over_http(client, image_type, source_file):
    """Sent over HTTP as an aligned crop or as a photo, an image in each colour mode embeds exactly
    as its RGB conversion sent as plain RGB, or gets the policy's error code."""
    source = Image.open(source_file).convert("RGB")
    for case, (make, expected) in sorted(CASES.items()):
        got = embed(client, make(source), image_type)
        if case == "float":  # float samples only come as TIFF, which the service does not read by default
            assert got == ErrorCode.not_an_image.value, (case, got)
            continue
        if isinstance(expected, ErrorCode):
            assert got == expected.value, (case, got)
            continue
        want = embed(client, encode(expected(source).convert("RGB")), image_type)
        if isinstance(want, str):  # e.g. no face left in a dithered bilevel photo: the same answer either way
            assert got == want, (case, got, want)
            continue
        assert isinstance(got, np.ndarray), (case, got)
        assert float(got @ want) > 0.9999, case
