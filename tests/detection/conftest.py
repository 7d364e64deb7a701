from __future__ import annotations

import pytest

from service.faces.detection import YuNetDetector
from tests.detection.helpers import Embedder


@pytest.fixture(scope="session")
def detector() -> YuNetDetector:
    return YuNetDetector()


@pytest.fixture(scope="session")
def embedder(default_model) -> Embedder:
    return Embedder(default_model)
