"""A real headless Chromium for the console's tests and screenshots: Debian's `chromium` and
`chromium-driver` packages driven by Selenium (browser downloads are not possible here, so Selenium
Manager is never asked for one: the binaries are given explicitly)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

CHROMIUM = os.environ.get("TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = os.environ.get("TEST_CHROMEDRIVER") or shutil.which("chromedriver") or "/usr/bin/chromedriver"
DESKTOP = (1280, 900)
PHONE = (390, 844)  # CSS pixels of a common phone


def unavailable() -> str | None:
    """Why no browser test can run here, or None when they can."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).is_file()]
    if missing:
        return (f"{' and '.join(missing)} not found: install Debian's chromium and chromium-driver "
                "(scripts/test does as root: apt-get install -y chromium chromium-driver)")
    return None


def start_browser(size: tuple[int, int] = DESKTOP, offline: bool = False):
    """``offline``: every address but loopback unreachable (a proxy nobody listens on), as on an
    air-gapped host."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--disable-extensions", "--hide-scrollbars", "--force-device-scale-factor=1",
                f"--window-size={size[0]},{size[1]}"):
        options.add_argument(arg)
    if offline:  # Chromium never sends loopback requests through a proxy
        options.add_argument("--proxy-server=http://127.0.0.1:9")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # to catch CSP violations and JS errors
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    return driver


class Console:
    """The console in a browser tab, with the few moves the tests and the screenshots make."""

    def __init__(self, driver, base_url: str, timeout: float = 30) -> None:
        self.driver = driver
        self.url = base_url.rstrip("/") + "/console"
        self.timeout = timeout

    def wait(self, condition, message: str = ""):
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, self.timeout, poll_frequency=0.1).until(
            lambda d: condition(), message)

    def find(self, element_id: str):
        return self.driver.find_element("id", element_id)

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def open(self, page: str = "try") -> None:
        """Load the console fresh on a page (keeps the tab's sessionStorage)."""
        self.driver.get(f"{self.url}#{page}")
        self.wait(lambda: self.js("return document.body.dataset.ready") == "true", "the console did not start")

    def go(self, page: str) -> None:
        self.js("window.location.hash = arguments[0]", page)
        self.wait(lambda: self.find(f"page-{page}").is_displayed(), f"page {page} not shown")

    def use_key(self, key: str) -> None:
        """Type the key into the prompt the console shows and wait until it is accepted."""
        self.wait(lambda: self.find("key-dialog").get_attribute("open") is not None, "no key prompt")
        field = self.find("key-input")
        field.clear()
        field.send_keys(key)
        self.find("key-submit").click()

    def pick(self, input_id: str, *paths: Path) -> None:
        self.find(input_id).send_keys("\n".join(str(Path(p).resolve()) for p in paths))

    def text(self, element_id: str) -> str:
        return self.find(element_id).text

    def wait_text(self, element_id: str, needle: str) -> str:
        self.wait(lambda: needle in self.text(element_id), f"{needle!r} never appeared in #{element_id}: "
                  f"{self.text(element_id)!r}")
        return self.text(element_id)
