"""The console in a real headless Chromium against the real service (API key on, real model)."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from tests.conftest import FIXTURES, b64, face_files
from tests.console.browser import DESKTOP, PHONE, Console
from tests.console.conftest import KEY

PHOTOS = FIXTURES / "photos"
KNOWN_RGB = (0x00, 0xC8, 0x53)  # app.js COLORS.known
LANDMARK_RGB = (0x00, 0xB0, 0xFF)  # app.js COLORS.landmark


@pytest.fixture(scope="module")
def api(console_server):
    with httpx.Client(base_url=console_server.url, headers={"X-API-Key": KEY}, timeout=60) as client:
        yield client


def pixel(console: Console, x: float, y: float) -> tuple[int, int, int]:
    return tuple(console.js(
        "const c = document.getElementById('try-canvas').getContext('2d');"
        "return Array.from(c.getImageData(arguments[0], arguments[1], 1, 1).data.slice(0, 3));",
        int(x), int(y)))


def close(rgb, expected, tolerance=40) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(rgb, expected))


def test_key_prompt_refuses_a_wrong_key_and_keeps_the_right_one_for_the_session(driver, console_server):
    page = Console(driver, console_server.url)
    driver.get(console_server.url + "/console")  # redirected to /console/
    page.wait(lambda: driver.current_url.endswith("/console/"))
    page.js("sessionStorage.clear(); localStorage.clear()")
    page.open("try")
    page.use_key("not-the-key")
    message = page.wait_text("key-error", "[unauthorized]")
    assert "API key is missing or wrong" in message
    assert page.find("key-dialog").get_attribute("open") is not None
    page.use_key(KEY)
    page.wait(lambda: page.find("key-dialog").get_attribute("open") is None, "the right key was not accepted")
    assert page.js("return sessionStorage.getItem('face-console.api-key')") == KEY
    assert page.js("return localStorage.length") == 0  # never kept beyond the tab's session


def test_enroll_then_identify_through_the_page_with_the_box_where_detect_puts_it(console, api):
    console.go("enroll")
    console.find("enroll-id").send_keys("Bill_Frist")
    console.pick("enroll-files", PHOTOS / "Bill_Frist_0001.jpg")
    console.wait_text("enroll-status", "1 face(s) ready to store")
    crop = console.driver.find_element("css selector", "#enroll-crops img")
    assert crop.get_attribute("src").startswith("data:image/png;base64,")
    assert console.js("return arguments[0].naturalWidth", crop) == 112  # the aligned crop the model sees
    # each face's quality shows next to its crop, from /detect's quality object
    assert "good enough to enroll" in console.text("enroll-crops")
    console.find("enroll-save").click()
    assert "Saved Bill_Frist" in console.wait_text("enroll-status", "new identity")
    assert api.get("/identities/Bill_Frist").json()["face_count"] == 1

    console.go("try")
    probe = PHOTOS / "Bill_Frist_0002.jpg"
    console.pick("try-file", probe)
    console.wait(lambda: console.find("try-canvas").get_attribute("data-state") == "done")
    results = console.text("try-results")
    assert "Bill_Frist" in results and "match" in results, results
    assert "quality 0." in results and "good enough to enroll" in results, results

    detected = api.post("/detect", json={"images": [b64(probe)]}).json()["images"][0]
    canvas = console.find("try-canvas")
    scale = int(canvas.get_attribute("width")) / detected["width"]
    drawn = json.loads(canvas.get_attribute("data-faces"))
    assert len(drawn) == len(detected["faces"]) >= 1
    # identify's best face for this probe: the one with the known colour, where /detect says
    known = [d for d in drawn if d["known"]]
    assert len(known) == 1
    best = max(detected["faces"], key=lambda f: f["box"][2] * f["box"][3])
    x, y, w, h = (v * scale for v in best["box"])
    assert known[0]["box"] == pytest.approx([x, y, w, h], abs=0.5)
    # and the pixels really are drawn there: the middle of the left, right and bottom edges
    for px, py in ((x, y + h / 2), (x + w, y + h / 2), (x + w / 2, y + h)):
        assert close(pixel(console, px, py), KNOWN_RGB), (px, py, pixel(console, px, py))
    lx, ly = best["landmarks"][2]  # nose tip
    assert close(pixel(console, lx * scale, ly * scale), LANDMARK_RGB)

    # enrolling again with "replace" swaps the stored face instead of adding one
    console.go("enroll")
    console.find("enroll-id").send_keys("Bill_Frist")
    console.pick("enroll-files", probe)
    console.wait_text("enroll-status", "ready to store")
    console.driver.find_element("css selector", "input[name=mode][value=replace]").click()
    console.find("enroll-save").click()
    assert "replaced 1 face(s)" in console.wait_text("enroll-status", "Saved")
    assert api.get("/identities/Bill_Frist").json()["face_count"] == 1


def test_a_low_quality_face_shows_why_before_and_when_saving(console, api, tmp_path):
    from PIL import Image

    from tests.service.test_quality import blurred_array

    path = tmp_path / "blurred.png"
    Image.fromarray(blurred_array()).save(path)
    console.go("enroll")
    console.find("enroll-id").send_keys("Blurred_Face")
    console.pick("enroll-files", path)
    console.wait_text("enroll-status", "not good enough to store")
    assert "too low to enroll: sharpness" in console.text("enroll-crops")
    console.find("enroll-save").click()
    status = console.wait_text("enroll-status", "[low_quality]")
    assert "sharpness" in status and "(limit " in status, status
    assert api.get("/identities/Blurred_Face").status_code == 404


def test_compare_two_photos_shows_the_similarity_against_the_threshold(console, api):
    a, b = PHOTOS / "Amelie_Mauresmo_0001.jpg", PHOTOS / "Amelie_Mauresmo_0002.jpg"
    console.pick("compare-a", a)
    console.pick("compare-b", b)
    console.find("compare-submit").click()
    text = console.wait_text("compare-result", "threshold")
    expected = api.post("/verify", json={"image_a": b64(a), "image_b": b64(b), "image_type": "photo"}).json()
    assert f"Similarity {expected['similarity']:.3f}" in text and f"threshold {expected['threshold']:.3f}" in text
    assert ("Same person" in text) == expected["match"]


def test_a_non_image_gets_a_readable_message(console, tmp_path):
    fake = tmp_path / "holiday.jpg"
    fake.write_text("this is a text file with a .jpg name")
    console.pick("try-file", fake)
    message = console.wait_text("try-status", "[not_an_image]")
    assert "not an image the service can read" in message
    assert "error" in console.find("try-status").get_attribute("class")


def test_gallery_delete_asks_first_and_then_erases(console, api):
    r = api.post("/enroll", json={"identity_id": "Delete_Me", "images": [b64(p) for p in face_files("Tony_Blair")[:2]],
                                  "metadata": {"team": "tests"}})
    assert r.status_code == 200, r.text
    console.go("gallery")
    console.find("gallery-query").send_keys("Delete_")
    console.find("gallery-query").submit()
    console.wait_text("gallery-page", 'starting with "Delete_"')
    row = console.driver.find_element("css selector", "tr[data-id='Delete_Me']")
    assert "2" in row.text and '"team":"tests"' in row.text

    def delete_button():
        return console.driver.find_element("css selector", "tr[data-id='Delete_Me'] button")

    delete_button().click()
    console.wait(lambda: console.find("delete-dialog").get_attribute("open") is not None, "no confirmation")
    assert "Delete_Me" in console.text("delete-text") and "2 face(s)" in console.text("delete-text")
    console.find("delete-cancel").click()
    assert api.get("/identities/Delete_Me").status_code == 200  # cancelled: still there

    delete_button().click()
    console.wait(lambda: console.find("delete-dialog").get_attribute("open") is not None, "no confirmation")
    console.find("delete-confirm").click()
    console.wait_text("gallery-status", "Deleted Delete_Me (2 face(s))")
    assert api.get("/identities/Delete_Me").json()["error"]["code"] == "identity_not_found"
    assert not console.driver.find_elements("css selector", "tr[data-id='Delete_Me']")


def test_status_shows_model_thresholds_and_live_metrics(console, api):
    ready = api.get("/readyz").json()  # with the key: the details
    console.go("status")
    model = console.wait_text("status-model", ready["model_id"])
    assert f"{ready['identify_threshold']:.3f}" in model and "CPUExecutionProvider" in model
    assert f"score >= {ready['quality']['min_score']:.3f} (photos)" in model  # readyz's quality, in short
    metrics = console.wait_text("status-metrics", "Requests served")
    served = int(metrics.split("Requests served")[1].split()[0])
    assert served > 0


def test_keyboard_reaches_every_page_and_every_control_has_a_name(console):
    unnamed = console.js(
        "return [...document.querySelectorAll('input, textarea, select, button')]"
        ".filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())"
        ".map(e => e.id || e.outerHTML)")
    assert unnamed == []
    assert console.js("return document.querySelectorAll('[aria-live]').length") >= 5
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    console.open("try")  # focus at the top of a fresh page
    for _ in range(8):  # Tab to the Gallery link, Enter opens it
        ActionChains(console.driver).send_keys(Keys.TAB).perform()
        if console.js("return document.activeElement.dataset.page") == "gallery":
            break
    assert console.js("return document.activeElement.dataset.page") == "gallery"
    assert console.js("return getComputedStyle(document.activeElement).outlineStyle") != "none"  # focus visible
    ActionChains(console.driver).send_keys(Keys.ENTER).perform()
    console.wait(lambda: console.find("page-gallery").is_displayed(), "Enter on the link did not open the page")


def test_phone_sized_screen_has_no_sideways_scrolling(console):
    console.driver.set_window_size(*PHONE)
    try:
        for page in ("try", "enroll", "gallery", "status"):
            console.go(page)
            overflow = console.js("return document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, (page, overflow)
        console.go("try")
        console.pick("try-file", PHOTOS / "Alvaro_Silva_Calderon_0002.jpg")
        console.wait(lambda: console.find("try-canvas").get_attribute("data-state") == "done")
        width = console.js("return document.getElementById('try-canvas').getBoundingClientRect().width")
        assert width <= PHONE[0]
        assert len(json.loads(console.find("try-canvas").get_attribute("data-faces"))) == 4
    finally:
        console.driver.set_window_size(*DESKTOP)


def test_gallery_pages_forward_and_back(console, api):
    # 25 identities in a blink: enrolled by embeddings (random unit vectors) instead of photos
    model_id = api.get("/readyz").json()["model_id"]
    rng = np.random.default_rng(15)
    for i in range(25):
        r = api.post("/enroll", json={"identity_id": f"page-{i:02d}", "model_id": model_id,
                                      "embeddings": rng.normal(size=(1, 128)).tolist()})
        assert r.status_code == 200, r.text
    console.go("gallery")
    console.wait_text("gallery-page", "page 1")

    def ids():
        return [row.get_attribute("data-id") for row in console.driver.find_elements("css selector", "#gallery-table tbody tr")]

    console.wait(lambda: len(ids()) == 20)
    first = ids()
    assert first == sorted(first)
    console.find("gallery-next").click()
    console.wait_text("gallery-page", "page 2")
    console.wait(lambda: ids() and ids()[0] > first[-1], "page 2 does not continue page 1")
    second = ids()
    assert not set(first) & set(second)
    console.find("gallery-prev").click()
    console.wait_text("gallery-page", "page 1")
    console.wait(lambda: ids() == first)
    assert console.find("gallery-prev").get_attribute("disabled") is not None


def test_dropping_a_photo_on_the_zone_works_like_picking_it(console):
    # a real File from a file input, handed to the drop zone in a real DataTransfer
    console.pick("compare-a", PHOTOS / "Alvaro_Silva_Calderon_0002.jpg")
    console.js("""
        const dt = new DataTransfer();
        dt.items.add(document.getElementById('compare-a').files[0]);
        const zone = document.getElementById('try-drop');
        zone.dispatchEvent(new DragEvent('dragover', {dataTransfer: dt, bubbles: true, cancelable: true}));
        zone.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
    """)
    console.wait(lambda: console.find("try-canvas").get_attribute("data-state") == "done")
    assert "4 face(s) found" in console.text("try-status")
    assert len(json.loads(console.find("try-canvas").get_attribute("data-faces"))) == 4


def test_no_script_errors_or_blocked_content_in_the_whole_run(driver):
    """Every page above ran under the console's Content-Security-Policy without a violation or an
    uncaught exception (failed API calls, 4xx on purpose, are logged by Chromium and allowed)."""
    problems = [entry["message"] for entry in driver.get_log("browser")
                if entry["level"] == "SEVERE" and "Failed to load resource" not in entry["message"]]
    assert problems == []
