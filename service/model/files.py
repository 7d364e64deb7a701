"""Files a process replaces whole: a reader sees the old file or the new one, never half of either.

A leaf module (it imports nothing of the service), so model files (contract.py, prepare.py), the data
dir's calibration files (calibration.py), the embedded gallery's snapshots (gallery/embedded/snapshot.py,
its fsyncs) and the operator commands' output files (cli/gallery.py, cli/audit.py, cli/cluster.py) are
written one way.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path


def others_may_read(path: Path) -> str | None:
    """``path``'s mode ("0644") when users other than its owner may read (or enter) it; else None."""
    mode = stat.S_IMODE(Path(path).stat().st_mode)
    return f"{mode:04o}" if mode & 0o077 else None


def replace_atomically(dst: Path, write: Callable[[Path], object], durable: bool = False,
                       private: bool = False) -> None:
    """``write`` a temporary file of this process's own beside ``dst``, then rename it over ``dst``: a
    reader sees the old file or the new one, whole, and processes (or threads) writing one file at once
    (replicas preparing a shared model cache together, two calibrate runs) each rename a whole file of
    their own; the last rename wins. ``durable``: the file's data is fsynced before the rename and the
    directory after it, so a power loss leaves the old file or the new one too. ``private``: the file is
    made 0600 before ``write`` opens it (faces' embeddings, who did what), whatever the umask or the
    mode of the file it replaces."""
    tmp = dst.with_name(f"{dst.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        if private:  # made empty with its mode: what write() puts in it is never readable by others
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            os.chmod(tmp, 0o600)  # whatever the umask
        write(tmp)
        if durable:
            fsync_file(tmp)
        tmp.replace(dst)
        if durable:
            fsync_dir(dst.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """A directory's entries (a rename, a new file) to disk."""
    _fsync(path, os.O_RDONLY)  # a directory can only be opened read-only


def fsync_file(path: Path) -> None:
    _fsync(path, os.O_RDWR)
