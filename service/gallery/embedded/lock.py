"""One process per data dir: an exclusive ``flock`` on ``<data_dir>/lock``, held while the gallery is open.

Two servers on one data dir would each keep their own index and stamp their own snapshot as current
(the other's enrollments could then never be identified). ``flock`` locks die with the process, so a
``kill -9`` never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


class DataDirLocked(RuntimeError):
    """Another process holds the data dir."""


class DataDirUnusable(RuntimeError):
    """The data dir is not a directory this process can make or write (a file, a read-only mount, a
    volume of another owner)."""


def usable_data_dir(data_dir: Path) -> Path:
    """``data_dir``, made if missing (0700: faces' embeddings, kept crops, key hashes and the audit trail
    are its owner's alone, whatever the umask; the folders above it get the umask's mode), once it is a
    directory this process may write: else ``DataDirUnusable`` naming it and why (not the traceback of
    the first file that could not be made)."""
    try:
        if not data_dir.is_dir():
            data_dir.parent.mkdir(parents=True, exist_ok=True)
            try:
                data_dir.mkdir(mode=0o700)
                os.chmod(data_dir, 0o700)  # the umask may have taken bits of the owner's too
            except FileExistsError:  # made by another process meanwhile (or a file: said below)
                pass
        if not os.access(data_dir, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as exc:
        why = "it is a file" if data_dir.exists() and not data_dir.is_dir() else exc.strerror or str(exc)
        raise DataDirUnusable(
            f"the data dir {data_dir} cannot be used ({why}): it must be a directory this process (uid "
            f"{os.getuid()}) can write (FACE_DATA_DIR, --data-dir; in a container, check the volume's owner)"
        ) from None
    return data_dir


class DataDirLock:
    """Held from the first ``acquire`` to the last ``release`` of this object: who shares it (the
    collections' owner and its default collection's gallery) counts its holds; another process, or
    another DataDirLock of the same dir, is refused (DataDirLocked)."""

    FILE = "lock"

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / self.FILE
        self._fd: int | None = None
        self._holds = 0

    def acquire(self) -> None:
        if self._fd is not None:
            self._holds += 1
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            log.error("data dir in use by another process", extra={"data_dir": str(self.path.parent), "pid": holder})
            raise DataDirLocked(
                f"the data dir {self.path.parent} is in use by another process (pid {holder}); "
                "one server per data dir: stop the other one or use another --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd, self._holds = fd, 1

    def release(self) -> None:
        if self._fd is not None:
            self._holds -= 1
            if self._holds <= 0:
                os.close(self._fd)  # closing the descriptor drops the flock
                self._fd = None
