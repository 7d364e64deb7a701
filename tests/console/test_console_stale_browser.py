"""Answers that arrive after the page moved on, in a real headless Chromium against the real service.
An answer for collection alpha that comes once the picker says beta (a slow network, a busy server) is
not drawn as beta's, and no button acts on one collection with another's data; a scan still running
in alpha neither polls beta with alpha's job id nor shows alpha's result. The late answer is made
deterministic by holding one collection's answers in the page (window.fetch wrapped, as the page's
api() calls it): the server and what it answers are real. Also: a new key's secret, shown only once,
is not there again when the admin leaves the console and comes back with Back (back/forward cache)."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest

from tests.conftest import FIXTURES
from tests.console.browser import Console
from tests.console.conftest import KEY
from tests.console.test_console_access_browser import pick_collection

DIM = 128
HOLD_MS = 2000

# the answers to requests whose URL contains `part` reach the page `ms` later; window.__held counts those
# still held, window.__released those let through
HOLD = """
const [part, ms] = arguments;
window.__held = 0;
window.__released = 0;
if (!window.__fetch) window.__fetch = window.fetch;
window.fetch = (url, init) => {
  const answer = window.__fetch(url, init);
  if (!String(url).includes(part)) return answer;
  window.__held += 1;
  const late = (settle) => setTimeout(() => { window.__held -= 1; window.__released += 1; settle(); }, ms);
  return answer.then((r) => new Promise((resolve) => late(() => resolve(r))),
    (err) => new Promise((_, reject) => late(() => reject(err))));
};
"""


@pytest.fixture(scope="module")
def api(console_server):
    with httpx.Client(base_url=console_server.url, headers={"X-API-Key": KEY}, timeout=60) as client:
        client.model_id = client.get("/readyz").json()["model_id"]  # type: ignore[attr-defined]
        yield client


def make(api, name: str, people: dict[str, list[int]]) -> None:
    """A collection with these identities, each with one face per seed (one seed: one person's face; the
    same seed in two identities: the same face twice)."""
    assert api.post("/collections", json={"name": name}).status_code == 201
    for identity, seeds in people.items():
        rows = np.array([np.random.default_rng(seed).normal(size=DIM) for seed in seeds])
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        r = api.post(f"/collections/{name}/enroll",
                     json={"identity_id": identity, "embeddings": rows.tolist(), "model_id": api.model_id})
        assert r.status_code == 200, r.text


def faces(api, collection: str, identity: str) -> list[int] | None:
    r = api.get(f"/collections/{collection}/identities/{identity}")
    return r.json()["face_ids"] if r.status_code == 200 else None


def hold(console: Console, part: str) -> None:
    console.js(HOLD, part, HOLD_MS)


def held(console: Console) -> int:
    return console.js("return window.__held")


def wait_released(console: Console) -> None:
    """Until every held answer reached the page, and a moment for the page to act on it."""
    console.wait(lambda: console.js("return window.__released > 0 && window.__held === 0"), "the held answers never came")
    time.sleep(0.7)


def gallery_rows(console: Console) -> list[str]:
    """Each row of the identities table as "id:faces", read in one go."""
    return console.js("return [...document.querySelectorAll('#gallery-table tbody tr')]"
                      ".map(r => r.dataset.id + ':' + r.cells[1].textContent)")


def open_gallery_in(console: Console, name: str, expected: list[str]) -> None:
    console.open("gallery")  # the picker lists the collections made since
    pick_collection(console, name)
    console.wait(lambda: gallery_rows(console) == expected, f"{name}'s rows: {gallery_rows(console)}")


def click(console: Console, label: str) -> None:
    console.driver.find_element("css selector", f"button[aria-label='{label}']").click()


def dialog_open(console: Console, dialog: str) -> bool:
    return console.find(dialog).get_attribute("open") is not None


def test_a_list_answered_after_the_collection_changed_is_not_drawn_nor_acted_on(console, api):
    make(api, "ga-alpha", {"alice": [1, 2, 3], "bob": [4]})
    make(api, "ga-beta", {"alice": [11], "carol": [12]})
    open_gallery_in(console, "ga-alpha", ["alice:3", "bob:1"])

    hold(console, "collections/ga-alpha/identities")
    console.find("gallery-all").click()  # alpha listed again: its answer comes late
    console.wait(lambda: held(console) == 1, "alpha's list was not asked for")
    pick_collection(console, "ga-beta")  # meanwhile the user moves on to beta
    console.wait(lambda: gallery_rows(console) == ["alice:1", "carol:1"], f"beta's rows: {gallery_rows(console)}")
    wait_released(console)
    assert gallery_rows(console) == ["alice:1", "carol:1"]  # alpha's late answer was not drawn over beta's
    assert console.text("gallery-title") == 'Gallery: collection "ga-beta"'
    assert "2 identities shown" in console.text("gallery-status")

    # the row's Delete is beta's alice's: one face, and erased in beta only
    click(console, "Delete alice")
    console.wait(lambda: dialog_open(console, "delete-dialog"), "no confirmation asked")
    assert "1 face(s)" in console.text("delete-text")
    console.find("delete-confirm").click()
    console.wait_text("gallery-status", "Deleted alice (1 face(s))")
    assert faces(api, "ga-beta", "alice") is None
    assert len(faces(api, "ga-alpha", "alice") or []) == 3


def test_an_identity_s_faces_answered_after_the_collection_changed_are_not_shown(console, api):
    make(api, "fa-alpha", {"alice": [21, 22, 23], "bob": [24]})
    make(api, "fa-beta", {"alice": [31], "carol": [32]})
    alpha_alice = faces(api, "fa-alpha", "alice")
    open_gallery_in(console, "fa-alpha", ["alice:3", "bob:1"])

    hold(console, "collections/fa-alpha/identities/")  # an identity's details, not the list
    click(console, "Faces of alice")
    console.wait(lambda: held(console) == 1, "alpha's alice was not asked for")
    pick_collection(console, "fa-beta")
    console.wait(lambda: gallery_rows(console) == ["alice:1", "carol:1"], f"beta's rows: {gallery_rows(console)}")
    wait_released(console)
    # alpha's alice is not shown under beta, with buttons that would act in beta
    assert not console.find("gallery-identity").is_displayed()
    assert console.js("return document.querySelectorAll('#identity-faces tbody tr').length") == 0

    # beta's own identity: its faces, and Delete face erases beta's face, nothing of alpha's
    carol = faces(api, "fa-beta", "carol")
    assert carol
    click(console, "Faces of carol")
    console.wait_text("identity-title", "Faces of carol")
    click(console, f"Delete face {carol[0]}")
    console.wait(lambda: dialog_open(console, "hygiene-dialog"), "no confirmation asked")
    assert f'Delete face {carol[0]} of "carol"' in console.text("hygiene-text")
    console.find("hygiene-confirm").click()
    console.wait_text("gallery-status", f"Deleted face {carol[0]} of carol")
    assert faces(api, "fa-beta", "carol") is None
    assert faces(api, "fa-alpha", "alice") == alpha_alice
    assert faces(api, "fa-alpha", "bob")


def test_a_scan_of_the_collection_left_is_not_polled_in_nor_shown_as_the_new_one(console, api):
    others = {f"other-{i}": [100 + i] for i in range(4)}
    make(api, "sc-alpha", {"dup-x": [41], "dup-y": [41], **others})  # the same face under two ids
    make(api, "sc-beta", others)  # no duplicates, no outliers (one face each)
    open_gallery_in(console, "sc-alpha", ["dup-x:1", "dup-y:1"] + [f"other-{i}:1" for i in range(4)])

    # duplicates: alpha's scan job answers "done" with its pair after the user switched to beta
    hold(console, "collections/sc-alpha/duplicates/jobs/")  # reading the job, not starting it
    console.find("view-duplicates").click()
    console.wait(lambda: held(console) == 1, "alpha's scan job was not read")
    pick_collection(console, "sc-beta")
    console.wait_text("gallery-status", "No pair of identities scores")
    wait_released(console)
    assert not console.driver.find_elements("css selector", "#duplicates-list > li"), "alpha's pair shown in beta"
    assert not console.driver.find_elements("css selector", "button[aria-label='Merge dup-x into dup-y']")
    assert "No pair of identities scores" in console.text("gallery-status")
    assert faces(api, "sc-alpha", "dup-x") and faces(api, "sc-alpha", "dup-y")

    # outliers: alpha's job is started late (its id comes after the switch): beta is not asked for it
    hold(console, "nothing is held")
    pick_collection(console, "sc-alpha")
    console.wait_text("gallery-status", "1 probable duplicate pair(s)")
    console.find("view-outliers").click()
    console.wait_text("gallery-status", "No face below")
    hold(console, "collections/sc-alpha/outliers/jobs")
    console.find("outliers-show").click()
    console.wait(lambda: held(console) == 1, "alpha's outliers scan was not started")
    pick_collection(console, "sc-beta")
    console.wait_text("gallery-status", "No face below")
    beta_status = console.text("gallery-status")
    wait_released(console)
    time.sleep(1)  # the time the scan would take to ask for its job again
    assert "job_not_found" not in console.text("gallery-status")
    assert console.text("gallery-status") == beta_status
    assert "error" not in (console.find("gallery-status").get_attribute("class") or "")


def test_a_comparison_answered_after_the_collection_changed_is_not_shown(console, api):
    """Try's Compare asks /verify in the chosen collection (whose model may differ from another's): its
    answer, come once the picker says another collection, is not shown as that collection's."""
    make(api, "cm-alpha", {})
    make(api, "cm-beta", {})
    console.open("try")
    pick_collection(console, "cm-alpha")
    console.pick("compare-a", FIXTURES / "photos" / "Amelie_Mauresmo_0001.jpg")
    console.pick("compare-b", FIXTURES / "photos" / "Amelie_Mauresmo_0002.jpg")
    hold(console, "collections/cm-alpha/verify")
    console.find("compare-submit").click()
    console.wait(lambda: held(console) == 1, "alpha was not asked")
    pick_collection(console, "cm-beta")
    wait_released(console)
    assert "threshold" not in console.text("compare-result")
    assert console.find("compare-result").get_attribute("data-similarity") is None

    console.find("compare-submit").click()  # asked again: in beta, and shown
    console.wait_text("compare-result", "threshold")


def test_a_new_key_s_secret_is_not_there_again_after_leaving_the_console_and_coming_back(console, api, console_server):
    console.open("keys")
    console.wait(lambda: console.find("page-keys").is_displayed(), "no Keys page for the admin")
    console.find("keys-create").click()
    console.wait(lambda: console.find("keys-secret-value").get_attribute("value"), "no secret shown")
    secret = console.find("keys-secret-value").get_attribute("value")
    key_id = console.text("keys-secret-id")
    try:
        console.driver.get(console_server.url + "/healthz")  # leave the console: any other page
        console.driver.back()
        console.wait(lambda: console.js("return document.body.dataset.ready") == "true"
                     and console.find("page-keys").is_displayed(), "the Keys page is not back")
        assert not console.find("keys-secret").is_displayed()
        assert console.find("keys-secret-value").get_attribute("value") == ""
        assert secret not in console.driver.page_source
    finally:
        api.delete(f"/keys/{key_id}")
