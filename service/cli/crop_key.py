"""``python -m service crop-key new PATH``: write a new key for kept face crops (FACE_CROP_KEY_FILE).

The file holds 32 random bytes (AES-256) as base64 on one line, mode 0600. An existing file is never
overwritten: the crops sealed with a key cannot be opened with another, so replacing a key file by
mistake would lose them (exit 1, nothing written). Keep a copy of the key where the backups are not:
a backup of the gallery alone cannot reveal the crops, and without the key nobody can open them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..gallery.crops import write_key_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service crop-key",
                                     description="Keys for kept face crops (FACE_CROP_KEY_FILE).")
    sub = parser.add_subparsers(dest="command", required=True)
    new = sub.add_parser("new", help="write a new random key (mode 0600; refuses to overwrite a file)")
    new.add_argument("path", type=Path, help="the key file to write")
    args = parser.parse_args(argv)
    path: Path = args.path
    try:
        write_key_file(path)
    except FileExistsError:
        print(f"error: {path} exists; a crop key is never overwritten (the crops sealed with it could not be "
              "opened again): choose another path", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: cannot write {path}: {exc}", file=sys.stderr)
        return 1
    print(f"wrote a new crop key to {path} (mode 0600): set FACE_CROP_KEY_FILE={path} on every replica, and keep "
          "a copy apart from the gallery's backups", file=sys.stderr)
    return 0
