"""The committed test faces (tests/fixtures): 112x112 aligned LFW crops, named ``<identity>_<n>.jpg``."""

from __future__ import annotations

import base64
from pathlib import Path

from harness.server import REPO

FIXTURES = REPO / "tests" / "fixtures"
FACES = FIXTURES / "faces"
ENROLLED = ["George_W_Bush", "Colin_Powell", "Tony_Blair", "Donald_Rumsfeld", "Gerhard_Schroeder",
            "Ariel_Sharon", "Hugo_Chavez", "Jean_Chretien"]


def face_files(identity: str) -> list[Path]:
    return sorted(FACES.glob(f"{identity}_*.jpg"))


def unknown_files() -> list[Path]:
    return sorted(p for p in FACES.glob("*.jpg") if p.name.rsplit("_", 1)[0] not in ENROLLED)


def b64(path: Path | bytes) -> str:
    data = path if isinstance(path, bytes) else Path(path).read_bytes()
    return base64.b64encode(data).decode()
