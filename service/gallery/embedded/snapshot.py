"""Index snapshots on disk: written durably, checksummed, verified before hnswlib reads them, and
patched in place when a face is erased.

hnswlib trusts its input: a damaged ``index.hnsw`` makes ``load_index`` crash the process (SIGSEGV),
so a snapshot is only handed to it after its size and the sha256 of every 4 MiB chunk match the meta
written with it. The meta (``index.json``) is removed before loading (a snapshot that crashes the
loader is never tried twice) and written back once the load succeeded.

Layout knowledge (hnswlib 0.8 ``saveIndex``): a 96-byte header, then ``count`` elements of
``size_per_element`` bytes (links, vector at ``offset_data``, int64 label at ``label_offset``), then
the upper-level link lists. The gallery uses it to list the snapshot's live labels (for replay) and
to zero the stored vectors of deleted faces: of every deleted element when a snapshot is written,
and in place in the snapshot already on disk when a face is erased, so no file keeps a deleted vector.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...model.files import fsync_dir, fsync_file

FORMAT = 2
CHUNK = 4 << 20
_HEADER = struct.Struct("<QQQQQQiIQQQdQ")  # offsetLevel0 .. ef_construction, as hnswlib writes them


class SnapshotInvalid(ValueError):
    """The snapshot on disk cannot be trusted; the caller rebuilds from the store."""


def chunk_hashes(path: Path, first: int = 0, last: int | None = None) -> list[str]:
    """sha256 of each CHUNK-sized piece of the file, chunks first..last inclusive."""
    out = []
    with open(path, "rb") as f:
        f.seek(first * CHUNK)
        i = first
        while last is None or i <= last:
            block = f.read(CHUNK)
            if not block:
                break
            out.append(hashlib.sha256(block).hexdigest())
            i += 1
    return out


@dataclass
class Layout:
    """Where each element lives in a snapshot file."""

    header: int
    count: int
    size_per_element: int
    label_offset: int
    offset_data: int
    labels: np.ndarray   # int64 per element, in file order
    deleted: np.ndarray  # bool per element

    _order: np.ndarray | None = None

    def elements_of(self, labels: list[int]) -> np.ndarray:
        """File positions of those labels that are in the file."""
        if self._order is None:
            self._order = np.argsort(self.labels, kind="stable")
        if len(self.labels) == 0:
            return np.zeros(0, np.int64)
        sorted_labels = self.labels[self._order]
        wanted = np.asarray(labels, dtype=np.int64)
        pos = np.minimum(np.searchsorted(sorted_labels, wanted), len(sorted_labels) - 1)
        return self._order[pos[sorted_labels[pos] == wanted]]

    def live_labels(self) -> np.ndarray:
        return self.labels[~self.deleted]

    def vector_offset(self, element: int) -> int:
        return self.header + element * self.size_per_element + self.offset_data


def read_layout(path: Path, dim: int) -> Layout:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(_HEADER.size)
    if len(raw) < _HEADER.size:
        raise SnapshotInvalid("snapshot shorter than its header")
    (offset_level0, _max, count, per_element, label_offset, offset_data, *_rest) = _HEADER.unpack(raw)
    if (offset_level0 != 0 or per_element <= label_offset + 7 or offset_data + 4 * dim > label_offset
            or _HEADER.size + count * per_element > size):
        raise SnapshotInvalid("snapshot header does not describe this file")
    rows = np.memmap(path, dtype=np.uint8, mode="r", offset=_HEADER.size, shape=(count, per_element))
    labels = np.ascontiguousarray(rows[:, label_offset:label_offset + 8]).view(np.int64).ravel()
    deleted = (rows[:, 2] & 1).astype(bool)  # hnswlib's delete mark: third byte of the level-0 link header
    del rows
    return Layout(_HEADER.size, count, per_element, label_offset, offset_data, labels, deleted)


class SnapshotFiles:
    """The pair index.hnsw + index.json in a data dir."""

    def __init__(self, data_dir: Path, index_file: str, meta_file: str) -> None:
        self.dir = Path(data_dir)
        self.index = self.dir / index_file
        self.meta = self.dir / meta_file

    # --- meta --------------------------------------------------------------------------------
    def read_meta(self) -> dict | None:
        try:
            meta = json.loads(self.meta.read_text())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None

    def write_meta(self, meta: dict) -> None:
        tmp = self.meta_temp
        with open(tmp, "w") as f:
            f.write(json.dumps(meta))
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.meta)
        fsync_dir(self.dir)

    def invalidate(self) -> None:
        """Drop the meta: until it is written again the snapshot file counts as absent."""
        if self.meta.exists():
            self.meta.unlink()
            fsync_dir(self.dir)

    # --- file --------------------------------------------------------------------------------
    def verify(self, meta: dict) -> None:
        if not self.index.exists():
            raise SnapshotInvalid("snapshot file missing")
        if self.index.stat().st_size != meta.get("size"):
            raise SnapshotInvalid("snapshot size differs from its meta")
        if chunk_hashes(self.index) != meta.get("chunks"):
            raise SnapshotInvalid("snapshot checksum mismatch")

    def remove_temporaries(self) -> None:
        """Drop what a crash mid-snapshot left (it may hold faces erased since it was saved)."""
        for path in (self.temp, self.meta_temp):
            path.unlink(missing_ok=True)

    def unnamed(self) -> int | None:
        """A new file in the data dir with no name (``O_TMPFILE``) for a snapshot being written, its
        descriptor: a crash (``kill -9``) while it is written leaves nothing of it, though it may hold
        faces erased since its save; it gets its name at ``install``, once they are zeroed. None where
        the file system has no such files: the named ``temp`` then (removed at the next open)."""
        try:
            return os.open(self.dir, os.O_TMPFILE | os.O_RDWR, 0o600)
        except (OSError, AttributeError):
            return None

    @staticmethod
    def path_of(fd: int) -> Path:
        """A path that opens the file of descriptor ``fd`` in the process that opens it (this one, or the
        forked writer, which keeps that descriptor): hnswlib's save takes a path."""
        return Path(f"/proc/self/fd/{fd}")

    def writing_path(self, fd: int | None) -> Path:
        """Where a snapshot being written goes: its unnamed file (``fd``, through path_of), else the
        named ``temp``."""
        return self.temp if fd is None else self.path_of(fd)

    def _name(self, fd: int) -> Path:
        """Give the unnamed file of ``fd`` the name ``temp`` (linkat through /proc: os.link of the
        /proc path alone would link the magic link, not follow it)."""
        self.temp.unlink(missing_ok=True)
        fds = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.link(str(fd), self.temp, src_dir_fd=fds, follow_symlinks=True)
        finally:
            os.close(fds)
        return self.temp

    @property
    def temp(self) -> Path:
        return self.index.with_name(self.index.name + ".tmp")

    @property
    def meta_temp(self) -> Path:
        return self.meta.with_name(self.meta.name + ".tmp")

    def prepare(self, tmp: Path, meta: dict, dim: int, size: int | None = None) -> tuple[dict, Layout]:
        """A freshly saved index file: zero the vectors of its deleted elements (hnswlib saves them),
        fsync it, checksum it; returns the meta and the layout (no lock needed). ``size``: the bytes
        the save had to write; a shorter file (hnswlib reports no write error: a full disk) is refused."""
        if size is not None and tmp.stat().st_size != size:
            raise SnapshotInvalid(f"snapshot written short: {tmp.stat().st_size} of {size} bytes (a full disk?)")
        layout = read_layout(tmp, dim)
        tombstones = np.flatnonzero(layout.deleted)
        if len(tombstones):
            rows = np.memmap(tmp, dtype=np.uint8, mode="r+", offset=layout.header,
                             shape=(layout.count, layout.size_per_element))
            rows[tombstones, layout.offset_data:layout.offset_data + 4 * dim] = 0
            rows.flush()
            del rows
        fsync_file(tmp)
        meta = {**meta, "format": FORMAT, "size": tmp.stat().st_size, "chunks": chunk_hashes(tmp)}
        return meta, layout

    def install(self, tmp: Path, meta: dict, layout: Layout, erased: list[int], dim: int,
                fd: int | None = None) -> dict:
        """Zero the vectors of faces erased since ``tmp`` was saved, then put it in place: old meta
        removed, file renamed, dir fsynced, new meta written. A crash at any point leaves either no
        meta or a meta matching its file. ``fd``: ``tmp`` is the unnamed file of that descriptor
        (``unnamed``), named only now, zeroed of every erase."""
        meta = self._zero(tmp, layout, meta, erased, dim)
        self.invalidate()
        if fd is not None:
            tmp = self._name(fd)
        tmp.replace(self.index)
        fsync_dir(self.dir)
        self.write_meta(meta)
        return meta

    def scrub(self, layout: Layout, meta: dict, labels: list[int], dim: int) -> dict:
        """Zero the stored vectors of ``labels`` in the snapshot in place (durably); returns and
        writes the meta with the affected chunk hashes updated. Labels not in the file are skipped."""
        new_meta = self._zero(self.index, layout, meta, labels, dim)
        if new_meta is not meta:
            self.write_meta(new_meta)
        return new_meta

    @staticmethod
    def _zero(path: Path, layout: Layout, meta: dict, labels: list[int], dim: int) -> dict:
        elements = layout.elements_of(labels) if len(labels) else np.empty(0, np.int64)
        if len(elements) == 0:
            return meta
        zeros = bytes(4 * dim)
        touched: set[int] = set()
        fd = os.open(path, os.O_RDWR)
        try:
            for element in elements.tolist():
                offset = layout.vector_offset(element)
                os.pwrite(fd, zeros, offset)
                touched.update(range(offset // CHUNK, (offset + len(zeros) - 1) // CHUNK + 1))
            os.fsync(fd)
        finally:
            os.close(fd)
        chunks = list(meta["chunks"])
        for c in sorted(touched):
            chunks[c] = chunk_hashes(path, c, c)[0]
        return {**meta, "chunks": chunks}
