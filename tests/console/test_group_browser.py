"""The console's Group page in a real headless Chromium against the real service: upload LFW photos of
three people, see one row per person of face thumbnails cut from the photos in the page."""

from __future__ import annotations

import pytest

from tests.console.browser import Console
from tests.server import REPO

PHOTOS = REPO.parent / "shared" / "data" / "lfw-250-subset" / "images"
PEOPLE = ["Aaron_Peirsol", "Dwayne_Johnson", "Vanessa_Redgrave"]


@pytest.mark.skipif(not PHOTOS.exists(), reason="needs ../shared/data/lfw-250-subset")
def test_group_page_shows_a_row_of_faces_per_person(console: Console, console_server, driver):
    files = [f for person in PEOPLE for f in sorted((PHOTOS / person).iterdir())[:2]]
    files = files[::2] + files[1::2]  # interleaved: rows are not the upload order
    console.go("group")
    console.pick("group-files", *files)
    console.find("group-submit").click()
    console.wait_text("group-status", "group(s) of the same person")
    rows = console.js("""
        return [...document.querySelectorAll('#group-clusters .cluster-row')].map((row) => ({
          id: row.dataset.clusterId,
          faces: [...row.querySelectorAll('.face-thumb')].map((t) => ({
            image: Number(t.dataset.imageIndex), canvas: t.tagName === 'CANVAS',
            // a thumbnail really drawn from the photo: its pixels vary (not one flat fill)
            spread: t.tagName === 'CANVAS' ? (() => {
              const d = t.getContext('2d').getImageData(0, 0, t.width, t.height).data;
              let lo = 255, hi = 0;
              for (let i = 0; i < d.length; i += 4) { lo = Math.min(lo, d[i + 1]); hi = Math.max(hi, d[i + 1]); }
              return hi - lo;
            })() : 0,
          })),
        }));""")
    people_rows = [row for row in rows if row["id"] != "alone"]
    # each person's two photos in one row, each row one person (bystanders, if any, are seen once)
    by_row = [{files[face["image"]].parent.name for face in row["faces"]} for row in people_rows]
    assert sorted(map(sorted, by_row)) == [[p] for p in sorted(PEOPLE)], by_row
    assert all(len(row["faces"]) == 2 for row in people_rows)
    faces = [face for row in rows for face in row["faces"]]
    assert all(face["canvas"] and face["spread"] > 30 for face in faces), faces
    assert "3 group(s)" in console.text("group-status")
    # nothing was fetched from another origin, and nothing broke the page's Content-Security-Policy
    loaded = console.js("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(url.startswith(console_server.url) or url.startswith("blob:") for url in loaded), loaded
    problems = [entry["message"] for entry in driver.get_log("browser")
                if entry["level"] == "SEVERE" and "Failed to load resource" not in entry["message"]]
    assert problems == []


def test_group_page_says_what_went_wrong(console: Console):
    console.go("group")
    console.pick("group-files", REPO / "tests" / "fixtures" / "photos" / "ATTRIBUTION.md")
    console.find("group-submit").click()
    console.wait_text("group-status", "[not_an_image]")
