from __future__ import annotations

import httpx
import pytest


@pytest.fixture(scope="module")
def client(server):
    """An HTTP client of the session's server, one per test module (modules that need another define their own)."""
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c
