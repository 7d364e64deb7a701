"""Kept face crops in the console, in a real headless Chromium against the real service (started with a
crop key), on both gallery backends: in a collection made with keep_crops, a key that may change the
gallery sees each listed face's crop (GET faces/{id}/crop, fetched with the API key and shown from an
object URL) as a thumbnail named "face N of ID" in an identity's Faces list, the Outliers view (the face
and the best other identity's face) and the Duplicates view's evidence; the object URLs of a list that
is redrawn are revoked; the crops are asked for only as they come near the screen, at most 4 at once,
and one that cannot be shown is a placeholder, not an error. A read key, or a collection without
keep_crops, gets no thumbnail and sends no crop request. An admin makes a collection that keeps crops with
the New collection dialog's box, and the Status page says that it keeps them."""

from __future__ import annotations

import base64
import re
import subprocess
import sys

import httpx
import pytest

from harness.fixtures import face_files
from tests.conftest import backend_env
from tests.console.browser import DESKTOP, PHONE, Console
from tests.console.conftest import KEY
from tests.console.test_console_access_browser import pick_collection
from tests.console.test_console_hygiene_browser import click
from tests.console.test_console_settings_browser import RECORD_WRITES, dialog_open, wait_rows, writes
from tests.server import REPO, ServerProcess

KEPT, PLAIN, MANY = "kept", "plain", "kept-many"
OTHERS = ("Donald_Rumsfeld", "Gerhard_Schroeder", "Ariel_Sharon", "Hugo_Chavez", "Jean_Chretien")

# every crop request the page sends, and the most at once: api() calls the global fetch, so this sees them all
COUNT_CROP_FETCHES = """
window.__crops = { sent: [], running: 0, most: 0 };
if (!window.__fetch) {
  window.__fetch = window.fetch;
  window.fetch = (url, init = {}) => {
    const crop = new URL(url).pathname.endsWith("/crop");
    if (!crop) return window.__fetch(url, init);
    const c = window.__crops;
    c.sent.push([new URL(url).pathname, (init.headers || {})["X-API-Key"] || null]);
    c.running += 1;
    c.most = Math.max(c.most, c.running);
    return window.__fetch(url, init).finally(() => { c.running -= 1; });
  };
}
"""

# the thumbnails of a list as [alt, naturalWidth, naturalHeight, src], read in one go
THUMBS = """
return [...document.querySelectorAll(arguments[0] + ' .face-crop img')]
  .map(img => [img.alt, img.naturalWidth, img.naturalHeight, img.getAttribute('src')]);
"""

# the crop requests this page made (Resource Timing: every fetch, answered or not)
CROP_ENTRIES = """
return performance.getEntriesByType('resource').map(e => e.name).filter(n => new URL(n).pathname.endsWith('/crop'));
"""

# for each object URL, whether it is revoked: an image from it no longer loads (the page's CSP lets
# images, not fetch, read blob: URLs)
REVOKED = """
return Promise.all(arguments[0].map(url => new Promise(resolve => {
  const img = new Image();
  img.onload = () => resolve(false);
  img.onerror = () => resolve(true);
  img.src = url;
})));
"""


def b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module", params=["embedded", "postgres"])
def console_server(request, tmp_path_factory, default_model):
    base = tmp_path_factory.mktemp(f"console-crops-{request.param}")
    key = base / "crop.key"
    made = subprocess.run([sys.executable, "-m", "service", "crop-key", "new", str(key)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    env = backend_env(request, {"FACE_API_KEY": KEY, "FACE_ENROLL_HUB_ALPHA": "0", "FACE_CROP_KEY_FILE": str(key)})
    proc = ServerProcess(base / "data", model=default_model, env=env)
    proc.wait_ready()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def api(console_server):
    with httpx.Client(base_url=console_server.url, headers={"X-API-Key": KEY}, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def faces(api) -> dict[str, list[int]]:
    """Two keep_crops collections and a plain one, enrolled from aligned crops. In "kept": colin holds
    one of Bush's faces (an outlier whose best other identity is bush), blair is enrolled twice under
    two ids (a duplicate pair). In "kept-many": one identity of 16 faces. In "plain": colin again."""
    for name, keep in ((KEPT, True), (MANY, True), (PLAIN, False)):
        r = api.post("/collections", json={"name": name, "keep_crops": keep})
        assert r.status_code == 201 and r.json()["keep_crops"] is keep, r.text

    def enroll(collection: str, identity: str, files) -> list[int]:
        r = api.post(f"/collections/{collection}/enroll", json={"identity_id": identity, "images": [b64(f) for f in files]})
        assert r.status_code == 200, r.text
        return r.json()["face_ids"]

    colin, bush, blair = face_files("Colin_Powell"), face_files("George_W_Bush"), face_files("Tony_Blair")
    ids = {"colin": enroll(KEPT, "colin", colin[:2] + [bush[2]]), "bush": enroll(KEPT, "bush", bush[:2]),
           "blair": enroll(KEPT, "blair", blair[:2]), "blair-again": enroll(KEPT, "blair-again", blair[2:])}
    for person in OTHERS:
        enroll(KEPT, person.lower(), face_files(person))
    crowd = [f for person in ("Colin_Powell", "George_W_Bush", "Tony_Blair", *OTHERS) for f in face_files(person)][:16]
    ids["crowd"] = enroll(MANY, "crowd", crowd)
    ids["plain-colin"] = enroll(PLAIN, "colin", colin)
    return ids


def crop_requests_served(api) -> float:
    """The crop requests the server has answered, whatever the answer (its own request counter)."""
    text = api.get("/metrics").text
    return sum(float(m.group(1)) for m in
               re.finditer(r'^face_http_requests_total\{[^}]*route="[^"]*/crop"[^}]*\} (\S+)$', text, re.M))


def in_collection(console: Console, name: str) -> None:
    console.open("gallery")  # the picker lists the collections made since the page was opened
    pick_collection(console, name)
    console.go("gallery")


def listed_faces_counting_crops(console: Console, collection: str, identity: str) -> list[int]:
    """The face ids the identity's Faces list shows in ``collection``, with the page's crop fetches
    counted from before it opened (COUNT_CROP_FETCHES)."""
    in_collection(console, collection)
    console.js(COUNT_CROP_FETCHES)
    open_faces(console, identity)
    return console.js("return [...document.querySelectorAll('#identity-faces tbody tr')].map(r => Number(r.dataset.id))")


def open_faces(console: Console, identity: str) -> None:
    console.find("view-identities").click()
    console.find("gallery-query").clear()
    console.find("gallery-query").send_keys(identity)
    console.find("gallery-query").submit()
    console.wait_text("gallery-page", f'starting with "{identity}"')
    click(console, f"Faces of {identity}")
    console.wait_text("identity-title", f"Faces of {identity}")


def states(console: Console, where: str) -> list[str]:
    return console.js("return [...document.querySelectorAll(arguments[0] + ' .face-crop')].map(t => t.dataset.state)", where)


def all_shown(console: Console, where: str, n: int) -> list:
    console.wait(lambda: states(console, where) == ["shown"] * n, f"thumbnails of {where}: {states(console, where)}")
    console.wait(lambda: all(w for _, w, _, _ in console.js(THUMBS, where)), "an image not decoded")
    return console.js(THUMBS, where)


def no_error_shown(console: Console) -> None:
    status = console.find("gallery-status")
    assert "error" not in (status.get_attribute("class") or ""), status.text
    assert "crop" not in status.text and "face_not_found" not in status.text, status.text


def test_a_write_key_sees_each_face_s_crop_in_an_identity_s_faces(console, api, faces):
    try:
        in_collection(console, KEPT)
        open_faces(console, "colin")
        thumbs = all_shown(console, "#identity-faces", 3)
        assert [alt for alt, *_ in thumbs] == [f"face {f} of colin" for f in faces["colin"]]
        assert all((w, h) == (112, 112) for _, w, h, _ in thumbs), thumbs  # the crop the model saw
        assert all(src.startswith("blob:") for *_, src in thumbs), thumbs
        assert "crop the collection keeps" in console.text("identity-summary")
        requested = console.js(CROP_ENTRIES)
        assert sorted(requested) == sorted(f"{console.url.removesuffix('/console')}/collections/{KEPT}/faces/{f}/crop"
                                           for f in faces["colin"]), requested  # the same origin, the right route
        assert console.js("return crops.live.size") == 3

        # the list drawn again (Faces once more): the old object URLs are revoked, no more are kept than shown
        old = [src for *_, src in thumbs]
        click(console, "Faces of colin")
        console.wait(lambda: not set(old) & {src for *_, src in console.js(THUMBS, "#identity-faces")}, "not redrawn")
        all_shown(console, "#identity-faces", 3)
        assert console.js("return crops.live.size") == 3
        revoked = console.js(REVOKED, old)
        assert revoked == [True] * 3, revoked
        # closed, the list lets its crops go too
        shown = [src for *_, src in console.js(THUMBS, "#identity-faces")]
        console.find("identity-close").click()
        assert console.js("return crops.live.size") == 0 and console.js(REVOKED, shown) == [True] * 3
        no_error_shown(console)
    finally:
        pick_collection(console, "default")


def test_outliers_and_duplicates_show_the_crops_of_the_faces_they_name(console, api, faces):
    misfiled = faces["colin"][2]
    try:
        in_collection(console, KEPT)
        console.find("view-outliers").click()
        card = f"#outliers-list li[data-id='{misfiled}']"
        console.wait(lambda: console.driver.find_elements("css selector", card), "outlier not listed")
        found = [f for f in api.get(f"/collections/{KEPT}/outliers").json()["faces"] if f["face_id"] == misfiled][0]
        assert found["best_other"]["identity_id"] == "bush", found
        other = found["best_other"]["face_id"]
        thumbs = all_shown(console, card, 2)
        assert [alt for alt, *_ in thumbs] == [f"face {misfiled} of colin", f"face {other} of bush"], thumbs
        assert all((w, h) == (112, 112) for _, w, h, _ in thumbs), thumbs
        # the write key's buttons and checkbox are still there beside the crop
        assert console.driver.find_elements("css selector", f"{card} input[data-face-id='{misfiled}']")
        outlier_urls = [src for *_, src in thumbs]

        console.find("view-duplicates").click()
        card = "#duplicates-list li[data-id='blair|blair-again']"
        console.wait(lambda: console.driver.find_elements("css selector", card), "pair not listed")
        pair = [p for p in api.get(f"/collections/{KEPT}/duplicates").json()["pairs"]
                if (p["identity_a"], p["identity_b"]) == ("blair", "blair-again")][0]
        expected = [alt for e in pair["evidence"]
                    for alt in (f"face {e['face_a']} of blair", f"face {e['face_b']} of blair-again")]
        thumbs = all_shown(console, card, len(expected))
        assert [alt for alt, *_ in thumbs] == expected, thumbs
        assert all((w, h) == (112, 112) for _, w, h, _ in thumbs), thumbs
        assert console.js("return document.querySelector(arguments[0] + ' .evidence li').textContent", card).startswith(
            f"face {pair['evidence'][0]['face_a']} ~ face {pair['evidence'][0]['face_b']}")
        # the outliers scanned again: their list is redrawn, and the old thumbnails' object URLs revoked
        console.find("view-outliers").click()
        console.wait(lambda: not set(outlier_urls) & {src for *_, src in console.js(THUMBS, "#outliers-list")},
                     "outliers not drawn again")
        all_shown(console, f"#outliers-list li[data-id='{misfiled}']", 2)
        assert console.js("return crops.live.size") == console.js("return document.querySelectorAll('.face-crop img').length")
        assert console.js(REVOKED, outlier_urls) == [True, True]
        no_error_shown(console)
    finally:
        pick_collection(console, "default")


def test_crops_load_as_they_come_into_view_at_most_four_at_once(console, api, faces):
    crowd = faces["crowd"]
    console.driver.set_window_size(*PHONE)
    try:
        in_collection(console, MANY)
        console.js(COUNT_CROP_FETCHES)
        open_faces(console, "crowd")
        console.js("document.getElementById('gallery-identity').scrollIntoView()")
        console.wait(lambda: "shown" in states(console, "#identity-faces"), "no crop shown")
        console.wait(lambda: console.js("return crops.running === 0 && crops.waiting.length === 0"), "crops still loading")
        asked = console.js("return window.__crops.sent")
        assert 0 < len(asked) < len(crowd), f"{len(asked)} of {len(crowd)} crops asked for before scrolling"
        assert all(key == KEY for _, key in asked), asked  # the API key goes with each request

        # the last face is deleted meanwhile: scrolled to, it is a placeholder, with no error shown
        assert api.delete(f"/collections/{MANY}/faces/{crowd[-1]}").status_code == 200
        for face in crowd:  # scrolled down the list row by row
            row = f"#identity-faces tr[data-id='{face}']"
            console.js("document.querySelector(arguments[0]).scrollIntoView()", row)
            console.wait(lambda: console.js("return document.querySelector(arguments[0] + ' .face-crop').dataset.state",
                                            row) in ("shown", "missing"), f"face {face}'s crop never came")
        last = f"#identity-faces tr[data-id='{crowd[-1]}'] .face-crop"
        console.wait(lambda: console.js(f"return document.querySelector(\"{last}\").dataset.state") == "missing",
                     "no placeholder for a face without a crop")
        console.wait(lambda: states(console, "#identity-faces") == ["shown"] * (len(crowd) - 1) + ["missing"],
                     f"thumbnails: {states(console, '#identity-faces')}")
        placeholder = console.driver.find_element("css selector", last)
        assert placeholder.get_attribute("role") == "img"
        assert placeholder.get_attribute("aria-label") == f"face {crowd[-1]} of crowd (no crop to show)"
        assert not console.driver.find_elements("css selector", f"{last} img")
        thumbs = console.js(THUMBS, "#identity-faces")
        assert [alt for alt, *_ in thumbs] == [f"face {f} of crowd" for f in crowd[:-1]]
        assert all((w, h) == (112, 112) for _, w, h, _ in thumbs), thumbs
        counted = console.js("return window.__crops")
        assert len(counted["sent"]) == len(crowd) and 1 <= counted["most"] <= 4, counted
        no_error_shown(console)
        assert console.js("return document.documentElement.scrollWidth - window.innerWidth") <= 0  # no sideways scroll
    finally:
        console.driver.set_window_size(*DESKTOP)
        pick_collection(console, "default")


def test_a_read_key_sees_no_crop_and_asks_for_none(console, api, faces):
    made = api.post("/keys", json={"role": "read", "note": "crops"}).json()
    before = crop_requests_served(api)
    console.js("sessionStorage.setItem('face-console.api-key', arguments[0])", made["secret"])
    try:
        assert listed_faces_counting_crops(console, KEPT, "colin") == faces["colin"]
        assert "only keys that may change the gallery see them" in console.text("identity-summary")
        console.find("view-outliers").click()
        console.wait(lambda: console.driver.find_elements("css selector", f"#outliers-list li[data-id='{faces['colin'][2]}']"),
                     "outlier not listed")
        console.find("view-duplicates").click()
        console.wait(lambda: console.driver.find_elements("css selector", "#duplicates-list li[data-id='blair|blair-again']"),
                     "pair not listed")
        assert console.js("return document.querySelectorAll('.face-crop, #page-gallery img').length") == 0
        assert console.js("return window.__crops.sent") == [] and console.js(CROP_ENTRIES) == []
        assert crop_requests_served(api) == before  # none reached the server either
    finally:
        console.js("sessionStorage.setItem('face-console.api-key', arguments[0])", KEY)
        pick_collection(console, "default")


def test_a_collection_without_keep_crops_shows_no_crop_and_asks_for_none(console, api, faces):
    before = crop_requests_served(api)
    try:
        assert listed_faces_counting_crops(console, PLAIN, "colin") == faces["plain-colin"]
        assert console.driver.find_elements("css selector", f"button[aria-label='Delete face {faces['plain-colin'][0]}']")
        assert "keeps embeddings, not photos" in console.text("identity-summary")
        assert console.js("return document.querySelectorAll('.face-crop, #page-gallery img').length") == 0
        assert console.js("return window.__crops.sent") == [] and console.js(CROP_ENTRIES) == []
        assert crop_requests_served(api) == before
    finally:
        pick_collection(console, "default")


def test_an_admin_makes_a_collection_that_keeps_crops_with_the_new_collection_box(console, api):
    """With a crop key, the box's collection is made with keep_crops (GET /collections/{name} says so), the
    Status page says it keeps crops, and its faces show their crops at once (the picker knows it keeps them)."""
    try:
        console.open("status")
        console.js(RECORD_WRITES)
        console.find("collection-new").click()
        console.wait(lambda: dialog_open(console, "collection-dialog"), "the New collection dialog did not open")
        console.find("collection-name").send_keys("made-kept")
        console.find("collection-keep-crops").click()
        console.find("collection-create").click()
        console.wait_text("collection-status", 'Collection "made-kept" created (it keeps each face\'s crop)')
        assert not dialog_open(console, "collection-dialog")
        assert writes(console) == [["POST", "/collections", {"name": "made-kept", "keep_crops": True}]]
        stored = api.get("/collections/made-kept")
        assert stored.status_code == 200 and stored.json()["keep_crops"] is True, stored.text
        console.go("status")
        wait_rows(console, "made-kept", Face_crops="kept, encrypted (keep_crops)")

        r = api.post("/collections/made-kept/enroll", json={"identity_id": "colin",
                                                            "images": [b64(face_files("Colin_Powell")[0])]})
        assert r.status_code == 200, r.text
        console.go("gallery")
        open_faces(console, "colin")
        assert [alt for alt, *_ in all_shown(console, "#identity-faces", 1)] == [f"face {r.json()['face_ids'][0]} of colin"]
    finally:
        pick_collection(console, "default")
