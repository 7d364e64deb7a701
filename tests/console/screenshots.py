"""Screenshots of every console page, the admin's Keys and Audit too (desktop, and the Try page
phone-sized) for the README.

    python -m tests.console.screenshots [--out docs/screenshots]

Starts the real service (API key on) on a temporary gallery, enrolls a few fixture people through
the API, drives the console in headless Chromium and saves small palette PNGs.
"""

from __future__ import annotations

import argparse
import base64
import io
import tempfile
from pathlib import Path

import httpx
from PIL import Image

from tests.console.browser import DESKTOP, PHONE, Console, start_browser, unavailable
from tests.server import REPO, ServerProcess

PHOTOS = REPO / "tests" / "fixtures" / "photos"
KEY = "screenshot-key"
ENROLL = {"Amelie_Mauresmo": "Amelie_Mauresmo_0001.jpg", "Bill_Frist": "Bill_Frist_0001.jpg",
          "Keanu_Reeves": "Keanu_Reeves_0001.jpg", "Helen_Clark": "Helen_Clark_0001.jpg"}


def save(driver, path: Path, height: int | None = None) -> None:
    """The page as tall as its content (up to 1600 px), reduced to a 128-colour palette."""
    width, outer = driver.get_window_size()["width"], driver.get_window_size()["height"]
    chrome = outer - driver.execute_script("return window.innerHeight")  # the window is more than the page
    content = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, min(1600, (height or content + 20) + chrome))
    driver.execute_script("window.scrollTo(0, 0); document.activeElement && document.activeElement.blur()")
    png = driver.get_screenshot_as_png()
    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, optimize=True)


def seed(url: str) -> None:
    with httpx.Client(base_url=url, headers={"X-API-Key": KEY}, timeout=60) as client:
        for name, file in ENROLL.items():
            image = base64.b64encode((PHOTOS / file).read_bytes()).decode()
            r = client.post("/enroll", json={"identity_id": name, "images": [image], "image_type": "photo",
                                             "metadata": {"source": "LFW"}})
            r.raise_for_status()


def take(out: Path) -> list[Path]:
    reason = unavailable()
    if reason:
        raise SystemExit(f"no browser: {reason}")
    shots = []
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(Path(tmp) / "data", env={"FACE_API_KEY": KEY})
        try:
            server.wait_ready()
            seed(server.url)
            driver = start_browser(DESKTOP)
            try:
                console = Console(driver, server.url)
                console.open("try")
                console.use_key(KEY)
                console.wait(lambda: console.find("key-dialog").get_attribute("open") is None)
                console.pick("try-file", PHOTOS / "Amelie_Mauresmo_0002.jpg")
                console.wait(lambda: console.find("try-canvas").get_attribute("data-state") == "done")
                console.pick("compare-a", PHOTOS / "Bill_Frist_0001.jpg")
                console.pick("compare-b", PHOTOS / "Bill_Frist_0002.jpg")
                console.find("compare-submit").click()
                console.wait_text("compare-result", "threshold")
                shots.append(out / "try.png")
                save(driver, shots[-1])

                driver.set_window_size(*DESKTOP)
                console.go("enroll")
                console.find("enroll-id").send_keys("Bill_Frist")
                console.pick("enroll-files", PHOTOS / "Bill_Frist_0001.jpg", PHOTOS / "Bill_Frist_0002.jpg")
                console.wait_text("enroll-status", "ready to store")
                shots.append(out / "enroll.png")
                save(driver, shots[-1])

                driver.set_window_size(*DESKTOP)
                console.go("gallery")
                console.wait_text("gallery-status", "shown")
                shots.append(out / "gallery.png")
                save(driver, shots[-1])

                driver.set_window_size(*DESKTOP)
                console.go("group")
                console.pick("group-files", *sorted(PHOTOS.glob("*.jpg")))
                console.find("group-submit").click()
                console.wait_text("group-status", "group(s) of the same person")
                shots.append(out / "group.png")
                save(driver, shots[-1])

                console.go("status")
                console.wait_text("status-metrics", "Requests served")
                shots.append(out / "status.png")
                save(driver, shots[-1])

                driver.set_window_size(*DESKTOP)
                console.go("keys")
                console.find("keys-note").send_keys("front desk tablet")
                console.find("keys-expires").send_keys("90")
                console.find("keys-create").click()  # a throwaway server: its secret may be seen
                console.wait(lambda: console.find("keys-secret").is_displayed())
                console.wait_text("keys-status", "created")
                shots.append(out / "keys.png")
                save(driver, shots[-1])

                driver.set_window_size(*DESKTOP)
                console.go("audit")
                console.wait_text("audit-status", "shown")
                shots.append(out / "audit.png")
                save(driver, shots[-1])

                driver.set_window_size(*PHONE)
                console.go("try")
                console.pick("try-file", PHOTOS / "Alvaro_Silva_Calderon_0002.jpg")
                console.wait(lambda: console.find("try-canvas").get_attribute("data-state") == "done")
                driver.execute_script("window.scrollTo(0, 0)")
                shots.append(out / "try-phone.png")
                save(driver, shots[-1])
            finally:
                driver.quit()
        finally:
            server.stop()
    return shots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots")
    args = parser.parse_args()
    for path in take(args.out):
        print(f"{path} {path.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
