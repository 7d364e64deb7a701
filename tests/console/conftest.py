"""The console's server (API key on) and browser. Without Chromium the browser tests are skipped
loudly: each skip says so, and the session ends with a banner. TEST_REQUIRE_BROWSER=1 (CI) turns the
skip into a failure."""

from __future__ import annotations

import os

import pytest

from tests.conftest import skipped_because
from tests.console.browser import Console, start_browser, unavailable
from tests.server import ServerProcess

KEY = "console-test-key"
NOT_RUN: list[str] = []


@pytest.fixture(scope="module")
def console_server(tmp_path_factory, default_model):
    proc = ServerProcess(tmp_path_factory.mktemp("console") / "data", model=default_model,
                         env={"FACE_API_KEY": KEY})
    proc.wait_ready()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def driver():
    reason = unavailable()
    if reason:
        if os.environ.get("TEST_REQUIRE_BROWSER") == "1":
            pytest.fail(f"TEST_REQUIRE_BROWSER=1 but the browser is missing: {reason}")
        NOT_RUN.append(reason)
        pytest.skip(f"BROWSER TESTS DID NOT RUN: {reason}")
    browser = start_browser()
    yield browser
    browser.quit()


@pytest.fixture
def console(driver, console_server) -> Console:
    """The console with the API key already accepted (set as the prompt would: sessionStorage)."""
    page = Console(driver, console_server.url)
    page.open("try")
    page.js("sessionStorage.setItem('face-console.api-key', arguments[0])", KEY)
    page.open("try")
    return page


def pytest_terminal_summary(terminalreporter):
    reasons = NOT_RUN or skipped_because(terminalreporter, "BROWSER TESTS DID NOT RUN")
    if reasons:
        terminalreporter.write_sep("!", "THE CONSOLE'S BROWSER TESTS DID NOT RUN", red=True, bold=True)
        terminalreporter.write_line(f"reason: {reasons[0]}", red=True, bold=True)
