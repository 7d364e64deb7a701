"""A damaged collection in the console, in a real headless Chromium against the real service: a
collection whose store the server cannot read (503 collection_damaged) is marked in the collection
picker, and choosing it says what is wrong over every page; the other collections are as usual."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import ENROLLED, b64, face_files
from tests.console.browser import Console
from tests.console.conftest import KEY
from tests.server import ServerProcess

HEADERS = {"X-API-Key": KEY}


@pytest.fixture(scope="module")
def damaged_server(tmp_path_factory, default_model):
    data = tmp_path_factory.mktemp("console-damaged") / "data"
    proc = ServerProcess(data, model=default_model, env={"FACE_API_KEY": KEY})
    proc.wait_ready()
    with httpx.Client(base_url=proc.url, headers=HEADERS, timeout=60) as c:
        assert c.post("/collections", json={"name": "site-b"}).status_code == 201
        r = c.post("/collections/site-b/enroll", json={"identity_id": "b", "images": [b64(face_files(ENROLLED[1])[0])]})
        assert r.status_code == 200, r.text
    proc.stop()
    store = data / "collections" / "site-b" / "gallery.sqlite3"
    for leftover in (store.with_name(store.name + "-wal"), store.with_name(store.name + "-shm")):
        leftover.unlink(missing_ok=True)
    store.write_bytes(b"not a database " * 1000)
    proc = ServerProcess(data, model=default_model, env={"FACE_API_KEY": KEY})
    proc.wait_ready()
    yield proc
    proc.stop()


def test_a_damaged_collection_is_marked_in_the_picker_and_said_when_chosen(driver, damaged_server):
    from selenium.webdriver.support.ui import Select

    page = Console(driver, damaged_server.url)
    page.open("try")
    page.js("sessionStorage.setItem('face-console.api-key', arguments[0])", KEY)
    page.open("gallery")
    options = lambda: page.js(  # noqa: E731 - read in one go
        "return [...document.getElementById('collection-select').options].map(o => [o.value, o.text])")
    page.wait(lambda: len(options()) == 2, "the collections were never listed")
    assert options() == [["default", "default"], ["site-b", "site-b (damaged)"]]
    assert page.text("collection-status") == ""

    Select(page.find("collection-select")).select_by_value("site-b")
    said = page.wait_text("collection-status", "damaged")
    assert "restore it from a backup" in said and "the other collections work" in said
    assert "error" in page.find("collection-status").get_attribute("class")
    page.open("gallery")  # chosen already when the page loads: said again
    page.wait_text("collection-status", "damaged")

    Select(page.find("collection-select")).select_by_value("default")
    page.wait(lambda: page.text("collection-status") == "", "the message stayed for a healthy collection")
