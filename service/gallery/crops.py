"""Kept face crops: the aligned crop the model saw, kept encrypted at rest for a later re-embedding.

A collection created with ``keep_crops: true`` keeps, for each face enrolled into it from an image,
that face's aligned crop (the model's input, HxWx3 RGB), so that the collection can be re-embedded
with another model later (issue 22's migration) without the operator's photos.

* Image format: PNG (lossless), chosen by ``bench/crop_format.py`` (bench/results/crop_format.json, 500
  LFW crops): the decoded crop IS what the model saw, bit for bit (~20.8 kB a crop, ~22 GB per million
  kept crops). JPEG q95 is ~4x smaller but changes every crop and moves its embedding (cosine down to
  0.9992 for the default model; q90: 0.988), an error a migration would carry into the new collection
  for good, of a size nobody has measured for the next model.
* Encryption: AES-256-GCM (the ``cryptography`` package) with the key in ``FACE_CROP_KEY_FILE`` (32
  random bytes, base64, one line: ``python -m service crop-key new PATH`` writes one). Each crop
  gets a random 12-byte nonce; the associated data binds the blob to its collection and face id, so
  a blob copied onto another face (or collection) fails authentication instead of decrypting.
* Stored blob: ``MAGIC (4 bytes: b"FCr" + format byte, b"P" = PNG) || nonce (12) || ciphertext+tag``;
  the magic is authenticated too (part of the associated data).
* Key check value: the first keep_crops collection stores an encrypted canary beside the
  collections (catalog / ``meta``). At start-up (:func:`check_crop_key`) the service opens it or
  refuses to start naming the key file; a keep_crops collection without a key configured refuses too.
  No path ever stores or returns a crop in clear.

Backends store opaque blobs: they call :meth:`CropCipher.seal` inside the enroll transaction (the face
ids exist only there) and return the sealed blobs from ``face_crop`` / ``iter_crops``; the caller opens
them with :meth:`CropCipher.open` and :func:`decode_crop`.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from ..config import Settings

KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12
FORMAT_PNG = b"P"
MAGIC = b"FCr" + FORMAT_PNG  # the store format: version 1, PNG crops
PNG_LEVEL = 1  # zlib level: ~6% larger than level 6 at a fifth of the encode time (bench/crop_format.py)
CHECK_PLAINTEXT = b"face-crop-key-check-v1"
CHECK_CONTEXT = b"key-check"

# seal(face_id, encoded crop) -> stored blob, bound to one collection (CropCipher.sealer)
Sealer = Callable[[int, bytes], bytes]


class CropKeyError(RuntimeError):
    """The crop key cannot be used: missing while crops are kept, unreadable, malformed, or not the key
    the stored crops were sealed with. The service refuses to start (the message names the key file)."""


class CropsUnavailable(RuntimeError):
    """Crops were given for a collection, but no crop key is configured (nothing was written)."""


class CropAuthenticationFailed(ValueError):
    """A blob did not authenticate: another key, another collection or face id, or altered bytes."""


def encode_crop(crop: np.ndarray) -> bytes:
    """An aligned crop (HxWx3 uint8 RGB) as PNG bytes (lossless: decode_crop gives the same array)."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(crop, dtype=np.uint8), "RGB").save(out, format="PNG", compress_level=PNG_LEVEL)
    return out.getvalue()


def decode_crop(data: bytes) -> np.ndarray:
    """Encoded crop bytes (as encode_crop wrote them) -> HxWx3 uint8 RGB."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _context(collection: str, face_id: int, magic: bytes) -> bytes:
    """The associated data of a crop: the store format, its collection and its face id."""
    return b"%s|%s|%d" % (magic, collection.encode("utf-8"), int(face_id))


class _Aead(Protocol):
    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes: ...

    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes: ...


class CropCipher:
    """AES-256-GCM over crops, bound to (collection, face id); see the module docstring."""

    def __init__(self, key: bytes, source: str = "the crop key") -> None:
        if len(key) != KEY_BYTES:
            raise CropKeyError(f"{source}: a crop key is {KEY_BYTES} bytes, this one is {len(key)}")
        try:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        except ImportError as exc:  # pragma: no cover - a dependency of the service (pyproject)
            raise CropKeyError("kept crops need the 'cryptography' package (pip install cryptography)") from exc
        self._aead: _Aead = AESGCM(key)
        self._invalid_tag: type[Exception] = _invalid_tag()
        self.source = source  # the key file, for messages

    @classmethod
    def from_file(cls, path: Path) -> CropCipher:
        """The key in ``path``: 32 bytes as base64 on one line (``python -m service crop-key new``)."""
        try:
            text = Path(path).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise CropKeyError(f"cannot read the crop key file {path} (FACE_CROP_KEY_FILE): {exc}") from exc
        try:
            key = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise CropKeyError(f"the crop key file {path} (FACE_CROP_KEY_FILE) is not base64: write one with "
                               "`python -m service crop-key new PATH`") from exc
        return cls(key, source=f"the crop key file {path} (FACE_CROP_KEY_FILE)")

    def seal(self, collection: str, face_id: int, crop: bytes) -> bytes:
        """Encrypt one encoded crop of face ``face_id`` of ``collection``: the blob to store."""
        nonce = os.urandom(NONCE_BYTES)
        return MAGIC + nonce + self._aead.encrypt(nonce, crop, _context(collection, face_id, MAGIC))

    def open(self, collection: str, face_id: int, blob: bytes) -> bytes:
        """The encoded crop of a stored blob; CropAuthenticationFailed unless it was sealed with this key
        for this collection and face id and is unaltered."""
        magic, nonce, sealed = blob[:4], blob[4:4 + NONCE_BYTES], blob[4 + NONCE_BYTES:]
        if magic != MAGIC:
            raise CropAuthenticationFailed(f"not a stored crop of this format (magic {magic!r})")
        try:
            return self._aead.decrypt(nonce, sealed, _context(collection, face_id, magic))
        except self._invalid_tag:
            raise CropAuthenticationFailed(f"the crop of face {face_id} in {collection!r} does not authenticate "
                                           "(another key, another face, or altered bytes)") from None

    def sealer(self, collection: str) -> Sealer:
        return lambda face_id, crop: self.seal(collection, face_id, crop)

    def check_value(self) -> bytes:
        """An encrypted canary: stored once, opened at every start (:func:`check_crop_key`)."""
        nonce = os.urandom(NONCE_BYTES)
        return MAGIC + nonce + self._aead.encrypt(nonce, CHECK_PLAINTEXT, CHECK_CONTEXT)

    def opens(self, check_value: bytes) -> bool:
        """Whether this is the key that made ``check_value``."""
        nonce, sealed = check_value[4:4 + NONCE_BYTES], check_value[4 + NONCE_BYTES:]
        try:
            return self._aead.decrypt(nonce, sealed, CHECK_CONTEXT) == CHECK_PLAINTEXT
        except self._invalid_tag:
            return False


def _invalid_tag() -> type[Exception]:
    from cryptography.exceptions import InvalidTag

    return InvalidTag


def load_crop_cipher(settings: Settings) -> CropCipher | None:
    """The cipher of FACE_CROP_KEY_FILE; None when it is not set. CropKeyError for an unusable file."""
    path = settings.crop_key_file
    return None if path is None else CropCipher.from_file(path)


class _KeyCheckSource(Protocol):
    def list_collections(self) -> list[Any]: ...

    def crop_key_check(self) -> bytes | None: ...


def check_crop_key(galleries: _KeyCheckSource, cipher: CropCipher | None) -> None:
    """At start-up: refuse (CropKeyError, naming the key file) a gallery whose kept crops this service
    could not open. Nothing to check while no collection keeps crops and no canary is stored."""
    keeping = [info.name for info in galleries.list_collections() if info.keep_crops]
    check = galleries.crop_key_check()
    if not keeping and check is None:
        return
    if cipher is None:
        raise CropKeyError(f"the collections {keeping} keep encrypted face crops but no crop key is configured: set "
                           "FACE_CROP_KEY_FILE to the key file they were sealed with")
    if check is not None and not cipher.opens(check):
        raise CropKeyError(f"{cipher.source} is not the key this gallery's face crops were sealed with "
                           f"(its key check value does not open); collections keeping crops: {keeping}")


def write_key_file(path: Path) -> None:
    """A new random crop key in ``path``, mode 0600; FileExistsError if the file exists (never overwritten)."""
    key = base64.b64encode(os.urandom(KEY_BYTES)) + b"\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
