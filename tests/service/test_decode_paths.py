"""Aligned crops are decoded on the event loop when small (``pipeline.INLINE_DECODE_BYTES``) and in
the thread pool otherwise: both paths must give the same embeddings and the same error codes."""

from __future__ import annotations

import io

import httpx
import numpy as np
from PIL import Image, PngImagePlugin

from service.faces.pipeline import INLINE_DECODE_BYTES
from tests.conftest import b64, face_files


def png(pixels: np.ndarray, padding: int = 0) -> bytes:
    """Lossless PNG of ``pixels``; ``padding`` bytes of text chunk make the file larger, not the image."""
    info = PngImagePlugin.PngInfo()
    if padding:
        info.add_text("padding", "x" * padding)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def embed(client: httpx.Client, blobs: list[bytes]) -> httpx.Response:
    return client.post("/embed", json={"images": [b64(b) for b in blobs]})


def test_inline_and_thread_pool_decodes_give_the_same_embeddings_and_errors(client):
    pixels = np.asarray(Image.open(face_files("Tony_Blair")[0]).convert("RGB"))
    small, large = png(pixels), png(pixels, padding=INLINE_DECODE_BYTES + 1024)
    assert len(small) <= INLINE_DECODE_BYTES < len(large)  # one of each path
    inline, pooled = embed(client, [small]), embed(client, [large])
    assert inline.status_code == pooled.status_code == 200, (inline.text, pooled.text)
    assert inline.json()["embeddings"] == pooled.json()["embeddings"]
    # two small crops together go inline too, and each keeps its own row
    both = embed(client, [small, small])
    assert both.json()["embeddings"] == inline.json()["embeddings"] * 2

    wrong = pixels[:, :100]  # 100 wide: not the model's input size
    for blobs in ([png(wrong)], [png(wrong, padding=INLINE_DECODE_BYTES + 1024)]):
        r = embed(client, [small, *blobs])
        assert r.status_code == 422 and r.json()["error"]["code"] == "wrong_image_size", r.text
        assert r.json()["error"]["details"]["index"] == 1
    # cut off inside the pixel data: the same code from either path
    cut = len(small) // 2
    codes = [embed(client, [blob[: len(blob) - cut]]).json()["error"]["code"] for blob in (small, large)]
    assert codes == ["truncated_image", "truncated_image"], codes
