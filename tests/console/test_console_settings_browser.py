"""A collection's settings in the console (PATCH /collections/{name}), in a real headless Chromium against the
real service: the Status page's "Collection settings" dialog (admins only) shows the chosen collection's
retention, face limit and identify FPIR, and Save sends only the settings changed (an emptied field: null);
the service's refusal is shown in the dialog, on the field it names, and changes nothing; the New collection
dialog takes a face limit and an FPIR, and asks for keep_crops with a box (refused by a service without a crop
key: crop_key_missing, in the dialog, nothing created); the dialog fits a phone."""

from __future__ import annotations

import httpx
import pytest

from tests.console.browser import DESKTOP, PHONE, Console
from tests.console.conftest import KEY

# every PATCH or POST the page sends with a JSON body, as [method, path, body]: api() calls the global fetch
RECORD_WRITES = """
window.__writes = [];
if (!window.__fetch) {
  window.__fetch = window.fetch;
  window.fetch = (url, init = {}) => {
    if (["PATCH", "POST"].includes(init.method) && typeof init.body === "string") {
      window.__writes.push([init.method, new URL(url).pathname, JSON.parse(init.body)]);
    }
    return window.__fetch(url, init);
  };
}
"""


@pytest.fixture(scope="module")
def api(console_server):
    with httpx.Client(base_url=console_server.url, headers={"X-API-Key": KEY}, timeout=60) as client:
        yield client


def writes(console: Console) -> list:
    return console.js("return window.__writes")


def pick_collection(console: Console, name: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(console.find("collection-select")).select_by_value(name)
    console.wait(lambda: console.js("return document.body.dataset.collection") == name, f"{name} not chosen")


def status_rows(console: Console) -> dict[str, str]:
    """The Status page's "This collection" card, row name -> value, read in one go (it is redrawn every 5 s)."""
    return console.js("const out = {}; for (const dt of document.querySelectorAll('#status-collection dt'))"
                      " out[dt.textContent] = dt.nextElementSibling.textContent; return out")


def wait_rows(console: Console, name: str, **expected: str) -> dict[str, str]:
    def shown() -> bool:
        rows = status_rows(console)
        return rows.get("Collection") == name and all(rows.get(k.replace("_", " ")) == v for k, v in expected.items())

    console.wait(shown, f"the Status rows never showed {expected}: {status_rows(console)}")
    return status_rows(console)


def dialog_open(console: Console, dialog: str = "settings-dialog") -> bool:
    return console.find(dialog).get_attribute("open") is not None


def open_settings(console: Console) -> None:
    console.find("collection-settings").click()
    console.wait(lambda: dialog_open(console), "the settings dialog did not open")


def fill(console: Console, element_id: str, text: str) -> None:
    field = console.find(element_id)
    console.js("arguments[0].value = ''", field)
    if text:
        field.send_keys(text)


def value(console: Console, element_id: str) -> str:
    return console.find(element_id).get_attribute("value")


def focused(console: Console) -> str:
    return console.js("return document.activeElement.id")


def show_status_of(console: Console, api, name: str, **settings) -> None:
    r = api.post("/collections", json={"name": name, **settings})
    assert r.status_code == 201, r.text
    console.open("status")
    pick_collection(console, name)
    console.go("status")
    wait_rows(console, name)
    console.js(RECORD_WRITES)


def test_an_admin_changes_settings_sending_only_those_changed(console, api):
    show_status_of(console, api, "st-desk", retention_days=30)
    wait_rows(console, "st-desk", Faces_kept="30 day(s) after enrollment, then erased", Face_limit="none",
              Identify_FPIR="the service's")

    # the dialog opens on what is stored, focus in its first field, each field labelled and explained
    open_settings(console)
    assert console.text("settings-title") == 'Settings of collection "st-desk"'
    assert [value(console, f) for f in ("settings-retention", "settings-max-faces", "settings-fpir")] == ["30", "", ""]
    assert focused(console) == "settings-retention"
    for field, label, help_text in (("settings-retention", "Erase each face after (days)", "kept until deleted"),
                                    ("settings-max-faces", "Face limit", "no limit"),
                                    ("settings-fpir", "Identify FPIR", "FACE_IDENTIFY_FPIR")):
        assert console.js("return arguments[0].labels[0].textContent", console.find(field)) == label
        help_id = console.find(field).get_attribute("aria-describedby")
        assert help_text in console.text(help_id), (field, console.text(help_id))

    # a face limit and an FPIR: the PATCH names those two only; Enter in a field saves
    fill(console, "settings-max-faces", "500")
    fill(console, "settings-fpir", "0.0001")
    console.find("settings-fpir").send_keys("\n")
    console.wait(lambda: not dialog_open(console), "the dialog did not close after saving")
    assert writes(console) == [["PATCH", "/collections/st-desk", {"max_faces": 500, "identify_fpir": 0.0001}]]
    stored = api.get("/collections/st-desk").json()
    assert (stored["retention_days"], stored["max_faces"], stored["identify_fpir"]) == (30, 500, 0.0001), stored
    console.wait_text("settings-status", 'Saved collection "st-desk".')
    assert "Face limit: 500 faces" in console.text("settings-status")
    wait_rows(console, "st-desk", Faces_kept="30 day(s) after enrollment, then erased", Face_limit="500 faces",
              Identify_FPIR="0.0001")
    console.wait(lambda: status_rows(console)["Identify threshold (1:N)"] == f"{stored['identify_threshold']:.3f}",
                 "the identify threshold shown is not the service's")
    assert focused(console) == "collection-settings"  # back to the opener

    # opened again: it shows the new values; saved unchanged, nothing is sent
    open_settings(console)
    assert [value(console, f) for f in ("settings-retention", "settings-max-faces", "settings-fpir")] == ["30", "500", "0.0001"]
    console.find("settings-save").click()
    console.wait(lambda: not dialog_open(console), "the dialog did not close")
    console.wait_text("settings-status", 'Nothing changed in collection "st-desk".')
    assert len(writes(console)) == 1

    # an emptied field sends null (no limit), beside a changed retention; the FPIR, untouched, is not sent
    open_settings(console)
    fill(console, "settings-max-faces", "")
    fill(console, "settings-retention", "7")
    console.find("settings-save").click()
    console.wait(lambda: not dialog_open(console), "the dialog did not close after saving")
    assert writes(console)[1:] == [["PATCH", "/collections/st-desk", {"retention_days": 7, "max_faces": None}]]
    stored = api.get("/collections/st-desk").json()
    assert (stored["retention_days"], stored["max_faces"], stored["identify_fpir"]) == (7, None, 0.0001), stored
    wait_rows(console, "st-desk", Faces_kept="7 day(s) after enrollment, then erased", Face_limit="none",
              Identify_FPIR="0.0001")
    audit = [e for e in api.get("/audit", params={"collection": "st-desk"}).json()["items"]
             if e["action"] == "collection.updated"]
    assert len(audit) == 2, audit  # one entry per save that changed something


def test_a_bad_value_is_refused_in_the_dialog_and_changes_nothing(console, api):
    show_status_of(console, api, "st-bad", max_faces=10)
    open_settings(console)
    fill(console, "settings-fpir", "2")
    console.find("settings-save").click()
    message = console.wait_text("settings-error", "[invalid_request]")
    assert "Identify FPIR" in message and "less than 1" in message, message
    assert dialog_open(console) and focused(console) == "settings-fpir"
    assert console.find("settings-save").is_enabled()
    assert writes(console) == [["PATCH", "/collections/st-bad", {"identify_fpir": 2}]]

    # the field named by the service gets the focus: a face limit that is not a whole number
    fill(console, "settings-fpir", "")
    fill(console, "settings-max-faces", "2.5")
    console.find("settings-save").click()
    console.wait(lambda: "Face limit" in console.text("settings-error"), "the refusal does not name the face limit")
    assert dialog_open(console) and focused(console) == "settings-max-faces"
    assert writes(console)[1:] == [["PATCH", "/collections/st-bad", {"max_faces": 2.5}]]

    # text that is no number is refused before any request (sent as null, it would remove the limit)
    fill(console, "settings-max-faces", "1e")
    console.find("settings-save").click()
    console.wait_text("settings-error", "Face limit: type a number")
    assert dialog_open(console) and focused(console) == "settings-max-faces" and len(writes(console)) == 2

    # each refusal names the field by its label
    fill(console, "settings-max-faces", "10")
    fill(console, "settings-retention", "-1")
    console.find("settings-save").click()
    message = console.wait_text("settings-error", "Erase each face after (days): Input should be greater than 0")
    assert message.endswith("[invalid_request]"), message
    assert dialog_open(console) and focused(console) == "settings-retention"
    assert writes(console)[2:] == [["PATCH", "/collections/st-bad", {"retention_days": -1}]]

    # nothing changed, on the server and on the page; Escape closes and the focus is back on the button
    stored = api.get("/collections/st-bad").json()
    assert (stored["retention_days"], stored["max_faces"], stored["identify_fpir"]) == (None, 10, None), stored
    from selenium.webdriver.common.keys import Keys

    console.find("settings-max-faces").send_keys(Keys.ESCAPE)
    console.wait(lambda: not dialog_open(console), "Escape did not close the dialog")
    assert focused(console) == "collection-settings" and len(writes(console)) == 3
    wait_rows(console, "st-bad", Face_limit="10 faces", Identify_FPIR="the service's")

    # a refusal that names no setting (the collection is gone meanwhile) stays in the dialog too
    open_settings(console)
    assert api.delete("/collections/st-bad").status_code == 200
    fill(console, "settings-retention", "5")
    console.find("settings-save").click()
    console.wait_text("settings-error", "[collection_not_found]")
    assert dialog_open(console) and focused(console) == "settings-retention"
    console.find("settings-cancel").click()
    console.wait(lambda: not dialog_open(console), "Cancel did not close the dialog")


def test_a_read_key_sees_no_settings_button(console, api):
    made = api.post("/keys", json={"role": "read", "note": "settings test"}).json()
    console.js("sessionStorage.setItem('face-console.api-key', arguments[0])", made["secret"])
    try:
        console.open("status")
        console.wait(lambda: console.js("return document.body.dataset.role") == "read", "the read key is not in use")
        console.wait(lambda: "Face limit" in status_rows(console), "the read key sees no collection rows")
        assert not console.find("collection-settings").is_displayed()
        assert not console.find("collection-new").is_displayed()
    finally:
        console.js("sessionStorage.setItem('face-console.api-key', arguments[0])", KEY)
        console.open("try")
    console.open("status")  # the admin key again: the button is back
    console.wait(lambda: console.find("collection-settings").is_displayed(), "the admin sees no settings button")


def test_a_new_collection_with_a_face_limit(console, api):
    console.open("status")
    console.js(RECORD_WRITES)
    console.find("collection-new").click()
    console.wait(lambda: dialog_open(console, "collection-dialog"), "the New collection dialog did not open")
    assert console.js("return arguments[0].labels[0].textContent", console.find("collection-max-faces")) == "Face limit"
    console.find("collection-name").send_keys("st-capped")
    console.find("collection-max-faces").send_keys("0")  # refused by the service, on its field
    console.find("collection-create").click()
    message = console.wait_text("collection-error", "[invalid_request]")
    assert "Face limit" in message, message
    assert focused(console) == "collection-max-faces"
    fill(console, "collection-max-faces", "2")
    console.find("collection-create").click()
    console.wait_text("collection-status", 'Collection "st-capped" created')
    assert writes(console) == [["POST", "/collections", {"name": "st-capped", "max_faces": 0}],
                               ["POST", "/collections", {"name": "st-capped", "max_faces": 2}]]  # FPIR empty: not sent
    stored = api.get("/collections/st-capped").json()
    assert (stored["retention_days"], stored["max_faces"], stored["identify_fpir"]) == (None, 2, None), stored
    wait_rows(console, "st-capped", Face_limit="2 faces", Identify_FPIR="the service's", Faces_kept="until deleted")

    # opened again, the dialog starts empty: the last collection's values are not carried over
    console.find("collection-new").click()
    console.wait(lambda: dialog_open(console, "collection-dialog"), "the New collection dialog did not open")
    assert [value(console, f) for f in ("collection-name", "collection-max-faces", "collection-fpir")] == ["", "", ""]
    console.find("collection-cancel").click()


def test_keep_crops_without_a_crop_key_is_refused_in_the_dialog_and_creates_nothing(console, api):
    """This server has no FACE_CROP_KEY_FILE: a collection that keeps crops cannot be made (409
    crop_key_missing), and the dialog says so and what to do; unticked, the same name is created without."""
    console.open("status")
    console.js(RECORD_WRITES)
    console.find("collection-new").click()
    console.wait(lambda: dialog_open(console, "collection-dialog"), "the New collection dialog did not open")
    box = console.find("collection-keep-crops")
    label = console.js("return arguments[0].labels[0].textContent", box).strip()
    assert label == ("Keep each face's crop (encrypted; lets the collection be re-embedded with another model, "
                     "and shows faces as thumbnails)"), label
    assert "FACE_CROP_KEY_FILE" in console.text(box.get_attribute("aria-describedby"))
    assert not box.is_selected()
    console.find("collection-name").send_keys("st-crops")
    box.click()
    assert box.is_selected()
    console.find("collection-create").click()
    message = console.wait_text("collection-error", "[crop_key_missing]")
    assert message.startswith("Keeping face crops needs the service to be started with a crop key "
                              "(FACE_CROP_KEY_FILE).") and "Nothing was created" in message, message
    assert "error" in console.find("collection-error").get_attribute("class")
    assert dialog_open(console, "collection-dialog") and focused(console) == "collection-keep-crops"
    assert writes(console) == [["POST", "/collections", {"name": "st-crops", "keep_crops": True}]]
    assert api.get("/collections/st-crops").json()["error"]["code"] == "collection_not_found"
    assert "st-crops" not in [c["name"] for c in api.get("/collections").json()["items"]]
    assert "st-crops" not in console.js("return [...document.querySelectorAll('#collection-select option')].map(o => o.value)")

    # unticked, the same name is made, without keep_crops (not sent at all), and Status says it keeps none
    box.click()
    console.find("collection-create").click()
    console.wait_text("collection-status", 'Collection "st-crops" created;')
    assert writes(console)[1:] == [["POST", "/collections", {"name": "st-crops"}]]
    assert api.get("/collections/st-crops").json()["keep_crops"] is False
    wait_rows(console, "st-crops", Face_crops="not kept: embeddings only")

    # opened again, the box starts unticked
    console.find("collection-new").click()
    console.wait(lambda: dialog_open(console, "collection-dialog"), "the New collection dialog did not open")
    assert not console.find("collection-keep-crops").is_selected() and console.text("collection-error") == ""
    console.find("collection-cancel").click()


def test_the_settings_dialog_fits_a_phone(console, api):
    show_status_of(console, api, "st-phone", retention_days=3, max_faces=100, identify_fpir=0.001)
    console.driver.set_window_size(*PHONE)
    try:
        console.js("arguments[0].scrollIntoView({block: 'center'})", console.find("collection-settings"))
        open_settings(console)
        box = console.js("const r = document.getElementById('settings-dialog').getBoundingClientRect();"
                         "return [r.left, r.right, window.innerWidth]")
        assert box[0] >= 0 and box[1] <= box[2], box
        for field in ("settings-retention", "settings-max-faces", "settings-fpir", "settings-save", "settings-cancel"):
            console.js("arguments[0].scrollIntoView({block: 'nearest'})", console.find(field))
            assert console.find(field).is_displayed(), field
        assert console.js("return document.documentElement.scrollWidth - window.innerWidth") <= 0
        console.find("settings-cancel").click()
        console.wait(lambda: not dialog_open(console), "Cancel did not close the dialog")
        assert writes(console) == []
    finally:
        console.driver.set_window_size(*DESKTOP)
