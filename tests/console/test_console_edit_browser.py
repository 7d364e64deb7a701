"""Editing an identity in the console (PATCH /identities/{id}), in a real headless Chromium against the
real service: the Gallery page's Edit dialog renames an identity and replaces its metadata, sending only
what changed; invalid JSON is refused in the dialog without a request; the service's refusal
(identity_exists) is shown in the dialog, which stays open, and nothing changes; a read key sees no Edit;
the dialog fits a phone."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from tests.console.browser import DESKTOP, PHONE, Console
from tests.console.conftest import KEY

DIM = 128

# every PATCH the page sends, as (path, body): api() calls the global fetch, so this sees them all
RECORD_PATCHES = """
window.__patches = [];
if (!window.__fetch) {
  window.__fetch = window.fetch;
  window.fetch = (url, init = {}) => {
    if (init.method === "PATCH") window.__patches.push([new URL(url).pathname, JSON.parse(init.body)]);
    return window.__fetch(url, init);
  };
}
"""


@pytest.fixture(scope="module")
def api(console_server):
    with httpx.Client(base_url=console_server.url, headers={"X-API-Key": KEY}, timeout=60) as client:
        client.model_id = client.get("/readyz").json()["model_id"]  # type: ignore[attr-defined]
        yield client


def enroll(api, identity: str, n: int, seed: int, metadata: dict | None = None) -> list[int]:
    rows = np.random.default_rng(seed).normal(size=(n, DIM))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    body = {"identity_id": identity, "embeddings": rows.tolist(), "model_id": api.model_id}
    if metadata is not None:
        body["metadata"] = metadata
    r = api.post("/enroll", json=body)
    assert r.status_code == 200, r.text
    return r.json()["face_ids"]


def dialog_open(console: Console) -> bool:
    return console.find("edit-dialog").get_attribute("open") is not None


def search(console: Console, prefix: str) -> None:
    console.find("gallery-query").clear()
    console.find("gallery-query").send_keys(prefix)
    console.find("gallery-query").submit()
    console.wait_text("gallery-page", f'starting with "{prefix}"')


def row_ids(console: Console) -> list[str]:
    return console.js("return [...document.querySelectorAll('#gallery-table tbody tr')].map(r => r.dataset.id)")


def row_metadata(console: Console, identity: str) -> dict:
    text = console.js("const r = [...document.querySelectorAll('#gallery-table tbody tr')]"
                      ".find(r => r.dataset.id === arguments[0]); return r ? r.querySelector('td.meta').textContent : null",
                      identity)
    return json.loads(text) if text else {}


def open_edit(console: Console, identity: str) -> None:
    """Click the row's Edit (by its accessible name) once the row is there, and wait for the dialog."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    def attempt() -> bool:
        try:
            console.driver.find_element("css selector", f"button[aria-label='Edit {identity}']").click()
        except (NoSuchElementException, StaleElementReferenceException):
            return False
        return True

    console.wait(attempt, f"no Edit button for {identity}")
    console.wait(lambda: dialog_open(console) and console.find("edit-id").get_attribute("value") == identity,
                 f"the edit dialog did not open on {identity}")


def fill(console: Console, element_id: str, text: str) -> None:
    field = console.find(element_id)
    console.js("arguments[0].value = ''", field)  # clear() on a textarea of several lines, reliably
    field.send_keys(text)


def patches(console: Console) -> list:
    """The PATCH requests sent, each body without its expected_updated_at, which every one carries: the
    updated_at of the identity as the dialog read it (an edit never overwrites a change it did not see)."""
    sent = console.js("return window.__patches")
    for _, body in sent:
        assert isinstance(body.pop("expected_updated_at", None), float), body
    return sent


def test_edit_replaces_metadata_and_renames_sending_only_what_changed(console, api):
    face_ids = enroll(api, "ed-ann", 2, 1, {"team": "desk", "badge": 7})
    enroll(api, "ed-bob", 1, 2)
    console.go("gallery")
    console.js(RECORD_PATCHES)
    search(console, "ed-")
    assert row_ids(console) == ["ed-ann", "ed-bob"]

    # the dialog opens on the stored id and metadata (pretty-printed), focus in the id field
    open_edit(console, "ed-ann")
    assert console.text("edit-title") == "Edit ed-ann"
    assert json.loads(console.find("edit-metadata").get_attribute("value")) == {"team": "desk", "badge": 7}
    assert "\n" in console.find("edit-metadata").get_attribute("value")
    assert console.js("return document.activeElement.id") == "edit-id"
    assert console.js("return document.getElementById('edit-id').labels[0].textContent") == "Identity id"
    assert console.js("return document.getElementById('edit-metadata').labels[0].textContent").startswith("Metadata")

    # invalid JSON, then JSON that is not an object: refused in the dialog, no request sent
    fill(console, "edit-metadata", '{"team": "lobby",')
    console.find("edit-save").click()
    console.wait_text("edit-error", "not valid JSON")
    assert dialog_open(console) and console.js("return document.activeElement.id") == "edit-metadata"
    fill(console, "edit-metadata", '["lobby"]')
    console.find("edit-save").click()
    console.wait_text("edit-error", "must be a JSON object")
    assert dialog_open(console) and patches(console) == []

    # the same object written otherwise (keys reordered): nothing to send, the dialog closes
    fill(console, "edit-metadata", '{"badge": 7, "team": "desk"}')
    console.find("edit-save").click()
    console.wait(lambda: not dialog_open(console), "the dialog stayed open")
    console.wait_text("gallery-status", "Nothing changed in ed-ann.")
    assert patches(console) == []

    # metadata only: the whole object, as `metadata` (replace), and no identity_id
    open_edit(console, "ed-ann")
    fill(console, "edit-metadata", '{"team": "lobby", "floor": 2}')
    console.find("edit-save").click()
    console.wait(lambda: not dialog_open(console), "the dialog did not close after saving")
    console.wait_text("gallery-status", "Saved ed-ann: metadata replaced.")
    assert patches(console) == [["/identities/ed-ann", {"metadata": {"team": "lobby", "floor": 2}}]]
    console.wait(lambda: row_metadata(console, "ed-ann") == {"team": "lobby", "floor": 2}, "the row shows old metadata")
    assert api.get("/identities/ed-ann").json()["metadata"] == {"team": "lobby", "floor": 2}

    # rename only, with the identity's faces open below the list: list and details follow the new id
    console.driver.find_element("css selector", "button[aria-label='Faces of ed-ann']").click()
    console.wait_text("identity-title", "Faces of ed-ann")
    console.wait_text("identity-metadata", '"team":"lobby"')
    open_edit(console, "ed-ann")
    fill(console, "edit-id", "ed-anna")
    console.find("edit-id").send_keys("\n")  # Enter in the id field saves
    console.wait(lambda: not dialog_open(console), "the dialog did not close after renaming")
    console.wait_text("gallery-status", "Saved ed-anna: renamed from ed-ann.")
    assert patches(console)[1:] == [["/identities/ed-ann", {"identity_id": "ed-anna"}]]
    console.wait(lambda: row_ids(console) == ["ed-anna", "ed-bob"], f"rows: {row_ids(console)}")
    assert row_metadata(console, "ed-anna") == {"team": "lobby", "floor": 2}
    console.wait_text("identity-title", "Faces of ed-anna")
    assert "floor" in console.text("identity-metadata")
    # keyboard users land on the redrawn row's Edit, not on the page's start
    console.wait(lambda: console.js("return document.activeElement.getAttribute('aria-label')") == "Edit ed-anna",
                 "focus did not come back to the row's Edit")

    # the server agrees: the new id with the faces and the metadata, the old one gone
    renamed = api.get("/identities/ed-anna").json()
    assert renamed["identity_id"] == "ed-anna" and renamed["face_ids"] == face_ids, renamed
    assert renamed["metadata"] == {"team": "lobby", "floor": 2}
    assert api.get("/identities/ed-ann").json()["error"]["code"] == "identity_not_found"
    updates = [e for e in api.get("/audit", params={"collection": "default"}).json()["items"]
               if e["action"] == "identity.updated"]
    assert [e["identity_id"] for e in updates] == ["ed-anna", "ed-ann"], updates  # newest first: one per save
    assert updates[0]["details"]["renamed_from"] == "ed-ann"


def test_renaming_onto_another_identity_is_refused_in_the_dialog_and_changes_nothing(console, api):
    enroll(api, "rf-carl", 1, 3, {"desk": 1})
    enroll(api, "rf-dora", 1, 4, {"desk": 2})
    console.go("gallery")
    console.js(RECORD_PATCHES)
    search(console, "rf-")
    open_edit(console, "rf-carl")
    fill(console, "edit-id", "rf-dora")
    fill(console, "edit-metadata", '{"desk": 3}')
    console.find("edit-save").click()
    message = console.wait_text("edit-error", "[identity_exists]")
    assert "already has this id" in message, message
    assert dialog_open(console) and console.js("return document.activeElement.id") == "edit-id"
    assert console.find("edit-save").is_enabled()
    assert patches(console) == [["/identities/rf-carl", {"identity_id": "rf-dora", "metadata": {"desk": 3}}]]
    # nothing changed, on the server and on the page
    assert api.get("/identities/rf-carl").json()["metadata"] == {"desk": 1}
    assert api.get("/identities/rf-dora").json()["metadata"] == {"desk": 2}
    assert row_ids(console) == ["rf-carl", "rf-dora"]
    assert row_metadata(console, "rf-carl") == {"desk": 1}

    # Cancel closes without a request and gives the focus back to the row's Edit
    console.find("edit-cancel").click()
    console.wait(lambda: not dialog_open(console), "Cancel did not close the dialog")
    assert console.js("return document.activeElement.getAttribute('aria-label')") == "Edit rf-carl"
    assert len(patches(console)) == 1


def test_an_edit_of_an_identity_changed_meanwhile_is_refused_and_undoes_nothing(console, api):
    """The dialog sends the whole metadata it showed; had someone changed the identity since it opened, that
    would undo their change: the service refuses (identity_changed) and the dialog says so."""
    enroll(api, "ch-fay", 1, 6, {"desk": 1})
    console.go("gallery")
    console.js(RECORD_PATCHES)
    search(console, "ch-")
    open_edit(console, "ch-fay")
    assert api.patch("/identities/ch-fay", json={"metadata_patch": {"badge": 9}}).status_code == 200  # meanwhile
    fill(console, "edit-metadata", '{"desk": 2}')
    console.find("edit-save").click()
    message = console.wait_text("edit-error", "[identity_changed]")
    assert "changed this identity since you opened it" in message, message
    assert dialog_open(console) and patches(console) == [["/identities/ch-fay", {"metadata": {"desk": 2}}]]
    assert api.get("/identities/ch-fay").json()["metadata"] == {"desk": 1, "badge": 9}
    console.find("edit-cancel").click()
    console.wait(lambda: not dialog_open(console), "Cancel did not close the dialog")
    open_edit(console, "ch-fay")  # opened again: it starts from what is stored now, and saves
    assert json.loads(console.find("edit-metadata").get_attribute("value")) == {"desk": 1, "badge": 9}
    fill(console, "edit-metadata", '{"desk": 2, "badge": 9}')
    console.find("edit-save").click()
    console.wait(lambda: not dialog_open(console), "the edit was not saved")
    assert api.get("/identities/ch-fay").json()["metadata"] == {"desk": 2, "badge": 9}


def test_a_search_pages_through_every_id_that_starts_with_it(console, api):
    """The Gallery's search lists the ids that start with the query (GET identities?prefix=), page by
    page: more of them than one page holds are all reachable, and none that does not start with it."""
    names = [f"pg-{n:02d}" for n in range(23)] + ["pgx", "ph-1"]
    for n, name in enumerate(names):
        enroll(api, name, 1, 100 + n, {})
    console.go("gallery")
    search(console, "pg-")
    seen = row_ids(console)
    assert len(seen) == 20 and console.find("gallery-next").is_enabled()
    console.find("gallery-next").click()
    console.wait(lambda: row_ids(console) and row_ids(console)[0] == "pg-20", "the next page of the search")
    assert row_ids(console) == ["pg-20", "pg-21", "pg-22"] and not console.find("gallery-next").is_enabled()
    console.find("gallery-prev").click()
    console.wait(lambda: row_ids(console) == seen, "back to the first page of the search")
    assert seen == [f"pg-{n:02d}" for n in range(20)]


def test_a_read_key_sees_no_edit(console, api):
    enroll(api, "rd-eve", 1, 5, {"k": 1})
    made = api.post("/keys", json={"role": "read", "note": "edit test"}).json()
    console.js("sessionStorage.setItem('face-console.api-key', arguments[0])", made["secret"])
    try:
        console.open("gallery")
        console.wait(lambda: console.js("return document.body.dataset.role") == "read", "the read key is not in use")
        search(console, "rd-")
        assert row_ids(console) == ["rd-eve"]
        assert console.js("return document.querySelectorAll('#gallery-table tbody button').length") == 1  # Faces only
        console.driver.find_element("css selector", "button[aria-label='Faces of rd-eve']").click()
        console.wait_text("identity-title", "Faces of rd-eve")
        assert not console.find("identity-edit").is_displayed()
    finally:
        console.js("sessionStorage.setItem('face-console.api-key', arguments[0])", KEY)
        console.open("try")


def test_the_edit_dialog_fits_a_phone(console, api):
    enroll(api, "ph-fay", 1, 6, {"note": "a rather long note " * 6, "nested": {"a": [1, 2, 3]}})
    console.driver.set_window_size(*PHONE)
    try:
        console.go("gallery")
        search(console, "ph-")
        open_edit(console, "ph-fay")
        box = console.js("const r = document.getElementById('edit-dialog').getBoundingClientRect();"
                         "return [r.left, r.right, window.innerWidth]")
        assert box[0] >= 0 and box[1] <= box[2], box
        for field in ("edit-id", "edit-metadata", "edit-save", "edit-cancel"):
            assert console.find(field).is_displayed(), field
        assert console.js("return document.documentElement.scrollWidth - window.innerWidth") <= 0
        console.find("edit-cancel").click()
        console.wait(lambda: not dialog_open(console), "Cancel did not close the dialog")
    finally:
        console.driver.set_window_size(*DESKTOP)
