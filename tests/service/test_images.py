"""Decoding and validation of uploaded images."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.errors import ErrorCode, ServiceError
from service.faces.images import decode_aligned_face, decode_base64
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
