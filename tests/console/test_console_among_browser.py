"""The Try page's "Only among" field, in a real headless Chromium against the real service: the identity
ids typed (comma-separated) are sent as /identify's `among` (in the multipart form, as JSON text), the
answer says it was limited to them, a photo of someone not among them is unknown and one of someone among
them is matched; ids not enrolled are named after identity_not_found's sentence; Enter in the field asks
again about the photo shown; empty, the whole collection is searched."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import FIXTURES, b64
from tests.console.browser import Console
from tests.console.conftest import KEY

PHOTOS = FIXTURES / "photos"
PEOPLE = ("Amelie_Mauresmo", "Bill_Frist", "Keanu_Reeves")
PROBE = PHOTOS / "Amelie_Mauresmo_0002.jpg"

# the `among` field of every /identify form the page sends (null where it sends none)
RECORD_AMONG = """
window.__among = [];
if (!window.__fetch) {
  window.__fetch = window.fetch;
  window.fetch = (url, init = {}) => {
    if (new URL(url).pathname.endsWith("/identify") && init.body instanceof FormData) {
      window.__among.push(init.body.get("among"));
    }
    return window.__fetch(url, init);
  };
}
"""


@pytest.fixture(scope="module")
def api(console_server):
    with httpx.Client(base_url=console_server.url, headers={"X-API-Key": KEY}, timeout=60) as client:
        for person in PEOPLE:
            r = client.post("/enroll", json={"identity_id": person, "image_type": "photo",
                                             "images": [b64(PHOTOS / f"{person}_0001.jpg")]})
            assert r.status_code == 200, r.text
        yield client


def ask_among(console: Console, ids: str, needle: str) -> str:
    """Type ``ids`` in "Only among", press Enter (the photo shown is asked about again), wait for ``needle``."""
    field = console.find("try-among")
    field.clear()
    field.send_keys(ids + "\n")
    return console.wait_text("try-status", needle)


def sent(console: Console) -> list:
    return console.js("return window.__among")


def test_only_among_limits_the_search_to_the_ids_typed(console, api):
    console.js(RECORD_AMONG)
    label = console.js("return document.getElementById('try-among').labels[0].textContent")
    assert label == "Only among (identity ids, comma-separated)"

    # the probe's own person is not among those named: unknown, at the threshold of a gallery of one
    console.find("try-among").send_keys("Bill_Frist")
    console.pick("try-file", PROBE)
    status = console.wait_text("try-status", "identified.")
    assert status == "1 face(s) found, 0 identified. Limited to 1 identity (Bill_Frist), at the threshold of " \
                     "a gallery of just it.", status
    results = console.text("try-results")
    assert results.startswith("Face 1 unknown (closest Bill_Frist, score"), results
    assert "Amelie_Mauresmo" not in results and console.find("try-results").get_attribute("data-among") == "1"
    assert sent(console) == ['["Bill_Frist"]']
    direct = api.post("/identify", json={"images": [b64(PROBE)], "image_type": "photo", "among": ["Bill_Frist"]}).json()
    assert direct["gallery_identities"] == 1 and not direct["results"][0]["known"], direct
    assert f"threshold {direct['threshold']:.3f}" in results

    # among a list that holds them (an id named twice counts once): matched
    status = ask_among(console, " Bill_Frist, Amelie_Mauresmo,Bill_Frist, ", "Limited to 2 identities")
    assert status == "1 face(s) found, 1 identified. Limited to 2 identities (Bill_Frist, Amelie_Mauresmo), " \
                     "at the threshold of a gallery of just them.", status
    results = console.text("try-results")
    assert results.startswith("Face 1 Amelie_Mauresmo: score") and "match" in results, results
    assert "Keanu_Reeves" not in results and console.find("try-results").get_attribute("data-among") == "2"
    assert sent(console)[1:] == ['["Bill_Frist","Amelie_Mauresmo"]']
    assert "known" in console.find("try-results").find_element("css selector", "li").get_attribute("class")

    # ids not enrolled: identity_not_found's sentence, then each id it names
    status = ask_among(console, "Keanu_Reeves, ghost, no one", "[identity_not_found]")
    assert status == 'Faces found, but identification failed: No identity with this id is enrolled. ' \
                     'Not enrolled: "ghost", "no one". [identity_not_found]', status
    assert "error" in console.find("try-status").get_attribute("class")
    assert console.find("try-results").get_attribute("data-among") is None
    assert sent(console)[2:] == ['["Keanu_Reeves","ghost","no one"]']

    # an id no identity can have is refused here, before any request
    status = ask_among(console, "Bill_Frist, a/b", "not allowed")
    assert status.startswith('Only among: "a/b": This identity id is not allowed'), status
    assert len(sent(console)) == 3

    # emptied: the whole collection, and no among sent
    status = ask_among(console, "", "identified.")
    assert status == "1 face(s) found, 1 identified.", status
    assert console.text("try-results").startswith("Face 1 Amelie_Mauresmo: score")
    assert sent(console)[3:] == [None]
    assert console.find("try-results").get_attribute("data-among") is None

    # all of it without a script error or a blocked request (the 404 asked for above is logged, and allowed)
    problems = [entry["message"] for entry in console.driver.get_log("browser")
                if entry["level"] == "SEVERE" and "Failed to load resource" not in entry["message"]]
    assert problems == []
