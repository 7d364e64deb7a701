"""The data path from image bytes to embeddings, in one direction:

bytes -> decode + validate (``images``) -> batcher -> session (``model``) -> normalised embeddings.
"""

from __future__ import annotations

import numpy as np
from starlette.concurrency import run_in_threadpool

from .images import decode_aligned_face
from .state import ServiceState


def decode_faces(state: ServiceState, blobs: list[bytes], first_index: int = 0) -> np.ndarray:
    settings = state.settings
    faces = [
        decode_aligned_face(blob, first_index + i, state.contract.input_size, settings.max_image_bytes,
                            settings.max_image_pixels)
        for i, blob in enumerate(blobs)
    ]
    return np.stack(faces)


async def embed_images(state: ServiceState, blobs: list[bytes], first_index: int = 0) -> np.ndarray:
    """Every image is validated before any is embedded: a bad one fails its request, nothing else."""
    faces = await run_in_threadpool(decode_faces, state, blobs, first_index)
    return await state.batcher.embed(faces)
