"""Issue 19 items 6 and 7 in a real headless Chromium against a real service without an API key: a page
on another origin cannot write to the gallery, the console on the service's own origin still can, and
/docs and /redoc render with nothing fetched from anywhere else."""

from __future__ import annotations

import base64
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import FIXTURES, face_files
from tests.console.browser import Console, start_browser
from tests.server import ServerProcess

FACE = face_files("Tony_Blair")[0]
PHOTOS = FIXTURES / "photos"


@pytest.fixture(scope="module")
def open_server(tmp_path_factory, default_model):
    proc = ServerProcess(tmp_path_factory.mktemp("open") / "data", model=default_model)
    proc.wait_ready()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def api(open_server):
    with httpx.Client(base_url=open_server.url, timeout=60) as client:
        yield client


ATTACK = """<!doctype html><html><head><title>cute cats</title></head><body>
<form id="f" method="post" enctype="multipart/form-data" action="{target}/enroll">
  <input name="identity_id" value="{identity}"><input name="replace" value="true">
  <input id="images" type="file" name="images">
</form>
<script>
  const bytes = Uint8Array.from(atob("{jpeg}"), c => c.charCodeAt(0));
  const file = new File([bytes], "face.jpg", {{type: "image/jpeg"}});
  // a "simple" request: no preflight, so the browser sends it whatever the service says about CORS
  const form = new FormData();
  form.append("identity_id", "{identity}-fetch");
  form.append("images", file);
  fetch("{target}/enroll", {{method: "POST", mode: "no-cors", body: form}})
    .finally(() => {{
      const files = new DataTransfer();
      files.items.add(file);
      document.getElementById("images").files = files.files;
      document.getElementById("f").submit();
    }});
</script></body></html>"""


@pytest.fixture(scope="module")
def attacker(open_server):
    """Another origin (another port) serving a page that posts to the service on its own."""
    page = ATTACK.format(target=open_server.url, identity="planted",
                         jpeg=base64.b64encode(FACE.read_bytes()).decode())

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            body = page.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def test_a_page_on_another_origin_cannot_enroll(driver, open_server, api, attacker):
    page = Console(driver, open_server.url)
    driver.get(attacker)
    # the form's submission navigates the tab to the service's answer
    page.wait(lambda: driver.current_url.startswith(open_server.url + "/enroll"), "the form was not submitted")
    body = "return document.body.innerText"
    page.wait(lambda: "cross_origin_refused" in page.js(body), f"the service answered: {page.js(body)!r}")
    for identity in ("planted", "planted-fetch"):
        assert api.get(f"/identities/{identity}").json()["error"]["code"] == "identity_not_found"


def test_the_console_on_its_own_origin_still_enrolls_without_a_key(driver, open_server, api):
    console = Console(driver, open_server.url)
    driver.get(open_server.url + "/console/")
    console.js("sessionStorage.clear(); localStorage.clear()")
    console.open("enroll")
    console.find("enroll-id").send_keys("Bill_Frist")
    console.pick("enroll-files", PHOTOS / "Bill_Frist_0001.jpg")
    console.wait_text("enroll-status", "1 face(s) ready to store")
    console.find("enroll-save").click()
    assert "Saved Bill_Frist" in console.wait_text("enroll-status", "new identity")
    assert api.get("/identities/Bill_Frist").json()["face_count"] == 1


@pytest.fixture(scope="module")
def offline_driver():
    """Chromium with every address but loopback unreachable (an unusable proxy): an air-gapped host."""
    from tests.console.browser import unavailable

    if unavailable():
        pytest.skip(f"BROWSER TESTS DID NOT RUN: {unavailable()}")
    browser = start_browser(offline=True)
    yield browser
    browser.quit()


@pytest.mark.parametrize("path, rendered", [
    ("/docs", "document.querySelectorAll('.opblock').length"),
    ("/redoc", "document.querySelectorAll('[data-section-id^=\"operation/\"], [id^=\"operation/\"]').length"),
])
def test_docs_render_offline(offline_driver, open_server, path, rendered):
    page = Console(offline_driver, open_server.url, timeout=60)
    offline_driver.get(open_server.url + path)
    page.wait(lambda: "Face embedding service" in page.js("return document.body.innerText"), f"{path} did not render")
    page.wait(lambda: page.js(f"return {rendered}") >= 8, f"{path} shows no operations")
    loaded = page.js("return performance.getEntriesByType('resource').map(e => e.name)")
    assert any(url.startswith(open_server.url + "/docs/assets/") for url in loaded), loaded
    # anything else the page asks for is refused by its Content-Security-Policy before a request is made
    # (ReDoc's sidebar names a logo on a CDN: not shown)
    refusals = [m["message"] for m in offline_driver.get_log("browser") if "Content Security Policy" in m["message"]]
    for url in loaded:
        if not url.startswith(open_server.url):
            where = "{0.scheme}://{0.netloc}".format(urlsplit(url))  # Chromium shortens the URL in the message
            assert any(where in m and "has been blocked" in m for m in refusals), (url, refusals)
    assert path != "/docs" or not refusals, refusals
