"""Issue 23 in the console, in a real headless Chromium against the real service, on both gallery
backends: the Gallery page merges two identities, moves a face and deletes a face (each after a
confirmation) from an identity's faces, and from the Duplicates and Outliers views; the Outliers view
deletes the faces ticked at once (POST faces/delete); a read key sees the lists without the buttons or
checkboxes; phone width without sideways scrolling."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from tests.conftest import backend_env
from tests.console.browser import DESKTOP, PHONE, Console
from tests.console.conftest import KEY
from tests.console.test_console_access_browser import pick_collection
from tests.server import ServerProcess

DIM = 128


@pytest.fixture(scope="module", params=["embedded", "postgres"])
def console_server(request, tmp_path_factory, default_model):
    env = backend_env(request, {"FACE_API_KEY": KEY, "FACE_ENROLL_HUB_ALPHA": "0"})
    proc = ServerProcess(tmp_path_factory.mktemp(f"console-hygiene-{request.param}") / "data", model=default_model,
                         env=env)
    proc.wait_ready()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def api(console_server):
    with httpx.Client(base_url=console_server.url, headers={"X-API-Key": KEY}, timeout=60) as client:
        client.model_id = client.get("/readyz").json()["model_id"]  # type: ignore[attr-defined]
        yield client


def unit(rng, n: int) -> np.ndarray:
    v = rng.normal(size=(n, DIM))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def enroll(api, identity: str, rows: np.ndarray, prefix: str = "") -> list[int]:
    r = api.post(f"{prefix}/enroll", json={"identity_id": identity, "embeddings": rows.tolist(), "model_id": api.model_id})
    assert r.status_code == 200, r.text
    return r.json()["face_ids"]


def button(console: Console, label: str):
    return console.driver.find_element("css selector", f"button[aria-label='{label}']")


def dialog_open(console: Console) -> bool:
    return console.find("hygiene-dialog").get_attribute("open") is not None


def confirm(console: Console, target: str | None = None) -> None:
    console.wait(lambda: dialog_open(console), "no confirmation asked")
    if target is not None:
        console.find("hygiene-target").send_keys(target)
    console.find("hygiene-confirm").click()
    console.wait(lambda: not dialog_open(console), "the confirmation did not close")


def click(console: Console, label: str) -> None:
    """Click a button by its name once it is there (a list being redrawn replaces its buttons)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    def attempt() -> bool:
        try:
            button(console, label).click()
        except (NoSuchElementException, StaleElementReferenceException):
            return False
        return True

    console.wait(attempt, f"no button {label!r}")


def open_faces(console: Console, identity: str) -> None:
    console.find("gallery-query").clear()
    console.find("gallery-query").send_keys(identity)
    console.find("gallery-query").submit()
    console.wait_text("gallery-page", f'starting with "{identity}"')
    click(console, f"Faces of {identity}")
    console.wait_text("identity-title", f"Faces of {identity}")


def test_merge_move_and_delete_from_an_identity_s_faces(console, api):
    rng = np.random.default_rng(23)
    a_ids = enroll(api, "hy-a", unit(rng, 2))
    b_ids = enroll(api, "hy-b", unit(rng, 1))
    console.go("gallery")
    open_faces(console, "hy-a")
    assert console.js("return [...document.querySelectorAll('#identity-faces tbody tr')].map(r => Number(r.dataset.id))") == a_ids

    # merge: the target is asked for; confirming without one keeps the dialog open
    console.find("identity-merge").click()
    console.wait(lambda: dialog_open(console))
    console.find("hygiene-confirm").click()
    console.wait_text("hygiene-error", "Type the identity id first")
    assert dialog_open(console)
    console.find("hygiene-target").send_keys("hy-b")
    console.find("hygiene-confirm").click()
    console.wait_text("gallery-status", "Merged hy-a into hy-b: 2 face(s) moved, it now has 3.")
    assert api.get("/identities/hy-a").json()["error"]["code"] == "identity_not_found"
    assert api.get("/identities/hy-b").json()["face_ids"] == sorted(a_ids + b_ids)
    console.wait_text("identity-title", "Faces of hy-b")  # the panel follows the faces to the target

    # move: cancelled changes nothing; confirmed, the face goes to a new identity
    click(console, f"Move face {a_ids[0]}")
    console.wait(lambda: dialog_open(console))
    console.find("hygiene-cancel").click()
    assert a_ids[0] in api.get("/identities/hy-b").json()["face_ids"]
    click(console, f"Move face {a_ids[0]}")
    confirm(console, "hy-new")
    console.wait_text("gallery-status", f"Moved face {a_ids[0]} from hy-b to hy-new (a new identity).")
    assert api.get("/identities/hy-new").json()["face_ids"] == [a_ids[0]]

    # delete a face: asked first, then erased
    console.wait(lambda: not console.driver.find_elements("css selector", f"#identity-faces tr[data-id='{a_ids[0]}']"))
    click(console, f"Delete face {b_ids[0]}")
    console.wait(lambda: dialog_open(console))
    assert f"Delete face {b_ids[0]} of \"hy-b\"" in console.text("hygiene-text")
    console.find("hygiene-confirm").click()
    console.wait_text("gallery-status", f"Deleted face {b_ids[0]} of hy-b.")
    assert api.get("/identities/hy-b").json()["face_ids"] == [a_ids[1]]
    actions = {e["action"] for e in api.get("/audit", params={"collection": "default"}).json()["items"]}
    assert {"identity.merged", "face.moved", "face.deleted"} <= actions

    # the last face: the identity goes with it
    click(console, f"Delete face {a_ids[1]}")
    confirm(console)
    console.wait_text("gallery-status", "it was its last face, so the identity was deleted too")
    assert api.get("/identities/hy-b").status_code == 404
    assert console.find("gallery-identity").is_displayed() is False


def test_a_read_key_sees_faces_but_no_button_that_changes_them(console, api):
    enroll(api, "hy-read", unit(np.random.default_rng(5), 2))
    made = api.post("/keys", json={"role": "read", "note": "hygiene"}).json()
    console.js("sessionStorage.setItem('face-console.api-key', arguments[0])", made["secret"])
    try:
        console.open("gallery")
        open_faces(console, "hy-read")
        assert not console.find("identity-merge").is_displayed()
        assert console.js("return document.querySelectorAll('#identity-faces tbody button').length") == 0
    finally:
        console.js("sessionStorage.setItem('face-console.api-key', arguments[0])", KEY)
        console.open("try")


def test_gallery_views_fit_a_phone(console, api):
    enroll(api, "hy-phone", unit(np.random.default_rng(6), 2))
    console.driver.set_window_size(*PHONE)
    try:
        console.go("gallery")
        for view in ("duplicates", "outliers", "identities"):
            console.find(f"view-{view}").click()
            console.wait(lambda: console.find(f"gallery-{view}").is_displayed(), view)
            console.wait(lambda: console.text("gallery-status") not in ("", "Loading...")
                         and "Looking" not in console.text("gallery-status"), f"{view} never answered")
            overflow = console.js("return document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, (view, overflow)
        open_faces(console, "hy-phone")
        assert console.js("return document.documentElement.scrollWidth - window.innerWidth") <= 0
    finally:
        console.driver.set_window_size(*DESKTOP)


def test_duplicates_and_outliers_views_merge_and_move(console, api):
    """Against a duplicates and an outliers scan job (POST .../duplicates/jobs and .../outliers/jobs:
    GET /duplicates's and GET /outliers's answers; the probes helper's routes, issue 23). Where they are not
    in the service yet this test says so and is skipped: it runs once the branches are merged."""
    if api.get("/duplicates").status_code == 404 and api.get("/outliers").status_code == 404:
        pytest.skip("GET /duplicates and /outliers are not in this service yet (the probes helper's part of "
                    "issue 23): this test runs once they are merged")
    assert api.post("/collections", json={"name": "hygiene"}).status_code == 201
    rng = np.random.default_rng(7)
    prefix = "/collections/hygiene"

    def faces_of(person: np.ndarray, n: int) -> np.ndarray:  # photos of one person: near one point
        return person + 0.25 * unit(rng, n)

    x, w, z = unit(rng, 3)
    enroll(api, "dup-x", faces_of(x, 2), prefix)
    enroll(api, "dup-y", faces_of(x, 2), prefix)  # the same person under two ids
    enroll(api, "out-w", faces_of(w, 2), prefix)
    misfiled = enroll(api, "out-z", np.vstack([faces_of(z, 2), faces_of(w, 1)]), prefix)[2]  # w's face filed as z
    for i, person in enumerate(unit(rng, 6)):
        enroll(api, f"other-{i}", faces_of(person, 2), prefix)
    console.open("gallery")  # the collection picker lists the new collection
    pick_collection(console, "hygiene")
    console.go("gallery")

    console.find("view-duplicates").click()
    console.wait(lambda: console.driver.find_elements("css selector", "li[data-id='dup-x|dup-y']"), "pair not listed")
    card = console.driver.find_element("css selector", "li[data-id='dup-x|dup-y']")
    assert "dup-x" in card.text and "dup-y" in card.text and "score" in card.text
    # the view scanned through a job (POST .../duplicates/jobs): no request waits for a whole-collection scan
    scans = [j for j in api.get("/jobs", params={"collection": "hygiene"}).json()["items"] if j["kind"] == "duplicates"]
    assert scans and scans[0]["state"] == "done" and scans[0]["duplicates"]["pairs"], scans
    click(console, "Merge dup-x into dup-y")
    console.wait(lambda: dialog_open(console))
    assert 'Merge "dup-x" into "dup-y"?' in console.text("hygiene-text")
    console.find("hygiene-confirm").click()
    console.wait_text("gallery-status", "Merged dup-x into dup-y: 2 face(s) moved, it now has 4.")
    assert api.get(f"{prefix}/identities/dup-x").status_code == 404
    console.wait(lambda: not console.driver.find_elements("css selector", "li[data-id='dup-x|dup-y']"))
    console.find("duplicates-min-score").send_keys("0.999")  # a typed score goes as a JSON number, not text
    console.find("duplicates-show").click()
    console.wait_text("gallery-status", "No pair of identities scores >= 0.999")
    console.find("duplicates-min-score").clear()

    console.find("view-outliers").click()
    console.wait(lambda: console.driver.find_elements("css selector", f"li[data-id='{misfiled}']"), "outlier not listed")
    assert "out-w" in console.driver.find_element("css selector", f"li[data-id='{misfiled}']").text
    scans = [j for j in api.get("/jobs", params={"collection": "hygiene"}).json()["items"] if j["kind"] == "outliers"]
    assert scans and scans[0]["state"] == "done" and misfiled in [f["face_id"] for f in scans[0]["outliers"]["faces"]]
    click(console, f"Move face {misfiled} to out-w")
    confirm(console)
    console.wait_text("gallery-status", f"Moved face {misfiled} from out-z to out-w.")
    assert misfiled in api.get(f"{prefix}/identities/out-w").json()["face_ids"]
    pick_collection(console, "default")


def outlier_ids(console: Console) -> set[int]:
    """The face ids the Outliers view lists, read in one go (the list is redrawn as it loads)."""
    return set(console.js("return [...document.querySelectorAll('#outliers-list > li')].map(li => Number(li.dataset.id))"))


def tick_box(console: Console, face_id: int):
    return console.driver.find_element("css selector", f"#outliers-list input[type=checkbox][data-face-id='{face_id}']")


def test_outliers_view_deletes_the_ticked_faces_at_once(console, api):
    """Several outliers at once: a write key ticks them (mouse or keyboard, or Select all), and Delete
    selected (N) sends one POST faces/delete to the collection in use after a confirmation; the status
    says what was deleted, which identities went with their last face and which faces were already gone.
    A read key sees the outliers without a checkbox."""
    from selenium.webdriver.common.keys import Keys

    assert api.post("/collections", json={"name": "bulk"}).status_code == 201
    rng = np.random.default_rng(29)
    prefix = "/collections/bulk"

    def faces_of(person: np.ndarray, n: int) -> np.ndarray:  # photos of one person: near one point
        return person + 0.25 * unit(rng, n)

    w, z, p, q, t = unit(rng, 5)
    enroll(api, "bulk-w", faces_of(w, 2), prefix)
    z_faces = enroll(api, "bulk-z", np.vstack([faces_of(z, 2), faces_of(w, 1)]), prefix)
    misfiled = z_faces[2]  # w's face filed as z
    mixed = enroll(api, "bulk-mix", np.vstack([faces_of(p, 1), faces_of(q, 1), faces_of(t, 1)]), prefix)  # 3 people
    for i, person in enumerate(unit(rng, 4)):
        enroll(api, f"bulk-other-{i}", faces_of(person, 2), prefix)
    expected = {misfiled, *mixed}

    def show_outliers() -> None:
        console.open("gallery")
        pick_collection(console, "bulk")
        console.go("gallery")
        console.find("view-outliers").click()
        console.wait(lambda: outlier_ids(console) == expected, f"outliers {outlier_ids(console)} != {expected}")

    made = api.post("/keys", json={"role": "read", "note": "bulk delete"}).json()
    try:
        # a read key: the outliers, but no checkbox, no Select all, no Delete selected
        console.js("sessionStorage.setItem('face-console.api-key', arguments[0])", made["secret"])
        show_outliers()
        assert console.js("return document.querySelectorAll('#outliers-list input, #outliers-list button').length") == 0
        assert not console.find("outliers-bulk").is_displayed()

        console.js("sessionStorage.setItem('face-console.api-key', arguments[0])", KEY)
        show_outliers()
        delete = console.find("outliers-delete-selected")
        assert console.find("outliers-bulk").is_displayed()
        assert delete.text == "Delete selected (0)" and not delete.is_enabled()
        labels = console.js("return [...document.querySelectorAll('#outliers-list input[type=checkbox]')]"
                            ".map(box => [Number(box.dataset.faceId), box.labels[0].textContent])")
        assert sorted(labels) == sorted([f, f"Select face {f} of {'bulk-z' if f == misfiled else 'bulk-mix'}"]
                                        for f in expected)

        # one ticked with the mouse, one from the keyboard
        tick_box(console, misfiled).click()
        tick_box(console, mixed[0]).send_keys(Keys.SPACE)
        console.wait(lambda: delete.text == "Delete selected (2)" and delete.is_enabled(), delete.text)
        assert console.js("return document.getElementById('outliers-select-all').indeterminate") is True
        delete.click()
        console.wait(lambda: dialog_open(console), "no confirmation asked")
        assert console.text("hygiene-title") == "Delete 2 faces?"
        text = console.text("hygiene-text")
        assert "2 selected faces" in text and "an identity left with no face is deleted too" in text, text
        console.find("hygiene-confirm").click()
        console.wait_text("gallery-status", "Deleted 2 faces.")
        assert console.text("gallery-status") == "Deleted 2 faces."
        console.wait(lambda: outlier_ids(console) == set(mixed[1:]), "the deleted rows are still listed")
        assert delete.text == "Delete selected (0)" and not delete.is_enabled()

        # over HTTP: the faces are gone from their identities, each with its own face.deleted record
        assert api.get(f"{prefix}/identities/bulk-z").json()["face_ids"] == z_faces[:2]
        assert api.get(f"{prefix}/identities/bulk-mix").json()["face_ids"] == mixed[1:]
        audit = api.get("/audit", params={"collection": "bulk", "limit": 1000}).json()["items"]
        deleted = [e for e in audit if e["action"] == "face.deleted"]
        assert sorted(e["details"]["face_id"] for e in deleted) == sorted([misfiled, mixed[0]]), deleted
        assert {e["identity_id"] for e in deleted} == {"bulk-z", "bulk-mix"}

        # Select all (from the keyboard) with one face deleted meanwhile: the identity goes with its last face
        console.find("outliers-select-all").send_keys(Keys.SPACE)
        console.wait(lambda: delete.text == "Delete selected (2)", delete.text)
        assert all(tick_box(console, f).is_selected() for f in mixed[1:])
        assert api.delete(f"{prefix}/faces/{mixed[2]}").status_code == 200
        delete.click()
        confirm(console)
        console.wait_text("gallery-status", "Deleted 1 face")
        assert console.text("gallery-status") == "Deleted 1 face (1 identity deleted with its last face); 1 was already gone."
        assert api.get(f"{prefix}/identities/bulk-mix").json()["error"]["code"] == "identity_not_found"
        console.wait(lambda: not outlier_ids(console), "rows left")
        assert not console.find("outliers-bulk").is_displayed()
        assert console.js("return document.activeElement.id") == "outliers-show"  # focus is not lost
    finally:
        console.js("sessionStorage.setItem('face-console.api-key', arguments[0])", KEY)
        pick_collection(console, "default")
