"""The console's files as the service serves them, and as the wheel ships them (no browser needed)."""

from __future__ import annotations

import re

import httpx
import pytest

from service.errors import ErrorCode
from tests.console.conftest import KEY
from tests.server import REPO

STATIC = REPO / "service" / "http" / "console" / "static"
FILES = ("index.html", "app.js", "app.css")


@pytest.fixture(scope="module")
def client(console_server):
    with httpx.Client(base_url=console_server.url, timeout=30) as c:
        yield c


def test_console_is_served_without_the_key_but_the_api_still_needs_it(client):
    r = client.get("/console")
    assert r.status_code == 307 and r.headers["location"] == "console/"
    page = client.get("/console/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="app.js"' in page.text
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "connect-src 'self'" in policy
    # the page (which shows a new key's secret once) is never kept by the browser, not even in its
    # back/forward cache; the script and style are revalidated each time (a new version is picked up)
    assert page.headers["cache-control"] == "no-store"
    for name in FILES[1:]:
        r = client.get(f"/console/{name}")
        assert r.status_code == 200 and r.content == (STATIC / name).read_bytes()
        assert r.headers["cache-control"] == "no-cache"
    assert client.get("/console/config.json").json() == {"api_key_header": "X-API-Key", "api_key_required": True}
    assert client.get("/identities").json()["error"]["code"] == "unauthorized"
    assert client.get("/identities", headers={"X-API-Key": KEY}).status_code == 200
    assert client.get("/console/nothing-here.js").json()["error"]["code"] == "not_found"
    # counted under their own route, not with requests for paths that do not exist
    metrics = client.get("/metrics", headers={"X-API-Key": KEY}).text
    served = re.search(r'face_http_requests_total\{method="GET",route="/console/\{file\}",status="200"\} (\S+)', metrics)
    assert served and float(served.group(1)) >= 3
    # the console is not part of the API reference
    assert not any(path.startswith("/console") for path in client.get("/openapi.json", headers={"X-API-Key": KEY}).json()["paths"])


def test_without_a_key_configured_the_console_asks_for_none(server):
    assert httpx.get(server.url + "/console/config.json").json() == {"api_key_header": "X-API-Key",
                                                                     "api_key_required": False}


def test_a_stored_key_without_face_api_key_makes_the_console_ask_for_one(tmp_path, default_model):
    """Keys made through the API or the CLI end open mode just as FACE_API_KEY does: the console must
    ask for a key at once instead of starting open and failing on every call."""
    from tests.server import ServerProcess

    proc = ServerProcess(tmp_path / "data", model=default_model)
    proc.wait_ready()
    try:
        config = httpx.get(proc.url + "/console/config.json").json()
        assert config["api_key_required"] is False  # open mode: no key anywhere
        made = httpx.post(proc.url + "/keys", json={"role": "admin"}, timeout=30)
        assert made.status_code == 201, made.text
        assert httpx.get(proc.url + "/whoami").json()["error"]["code"] == "unauthorized"  # open mode ended
        assert httpx.get(proc.url + "/console/config.json").json()["api_key_required"] is True
    finally:
        proc.stop()


def test_nothing_is_loaded_from_another_origin():
    for name in FILES:
        text = (STATIC / name).read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), name
        assert "@import" not in text and "<iframe" not in text


def test_every_error_code_has_a_readable_sentence():
    script = (STATIC / "app.js").read_text()
    table = script.split("const ERROR_MESSAGES = {", 1)[1].split("};", 1)[0]
    sentences = dict(re.findall(r'^\s*(\w+): "((?:[^"\\]|\\.)+)",?$', table, re.M))
    missing = [code.value for code in ErrorCode if code.value not in sentences]
    assert not missing, f"add a sentence to ERROR_MESSAGES in app.js for: {missing}"


def test_the_wheel_ships_the_console(wheel_names):
    """An installed wheel (the Docker image's way) has the pages, not only a source checkout."""
    for name in FILES:
        assert f"service/http/console/static/{name}" in wheel_names
