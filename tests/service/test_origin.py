"""Issue 19 item 6, over real HTTP: without an API key a page on another origin must not write to the
gallery (Origin / Sec-Fetch-Site), a DNS-rebinding page must not be answered at all (Host checked
against FACE_ALLOWED_HOSTS), CORS is answered only for FACE_CORS_ORIGINS, and serving without a key
on a non-loopback address is warned about at start-up."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from tests.conftest import face_files
from tests.server import ServerProcess

FACE = face_files("Tony_Blair")[0]
EVIL = "http://evil.example"
APP = "http://app.example"


def enroll(client: httpx.Client, identity: str, headers: dict | None = None, replace: bool = False) -> httpx.Response:
    """A multipart /enroll, the body an auto-submitted HTML form sends."""
    with open(FACE, "rb") as f:
        return client.post("/enroll", data={"identity_id": identity, "replace": str(replace).lower()},
                           files={"images": (FACE.name, f.read(), "image/jpeg")}, headers=headers or {})


def code(r: httpx.Response) -> tuple[int, str]:
    return r.status_code, r.json()["error"]["code"]


def _netloc(server: ServerProcess) -> str:
    return server.url.removeprefix("http://")


CROSS_SITE = [
    {"Origin": EVIL},
    {"Origin": EVIL, "Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site"},  # another port of the same host is another origin
    {"Origin": "null"},  # sandboxed frames, file: pages, forms sent with Referrer-Policy: no-referrer
]


@pytest.mark.parametrize("headers", CROSS_SITE, ids=lambda h: ",".join(f"{k}={v}" for k, v in h.items()))
def test_a_cross_origin_write_in_open_mode_is_refused_and_changes_nothing(server, client, headers):
    kept = f"kept-{uuid.uuid4().hex[:8]}"
    assert enroll(client, kept).status_code == 200
    faces = client.get(f"/identities/{kept}").json()["face_count"]
    new = f"cross-{uuid.uuid4().hex[:8]}"
    assert code(enroll(client, new, headers)) == (403, "cross_origin_refused")
    assert code(enroll(client, kept, headers, replace=True)) == (403, "cross_origin_refused")
    assert code(client.delete(f"/identities/{kept}", headers=headers)) == (403, "cross_origin_refused")
    assert code(client.post("/embed", json={"images": []}, headers=headers)) == (403, "cross_origin_refused")
    assert code(client.get(f"/identities/{new}")) == (404, "identity_not_found")
    assert client.get(f"/identities/{kept}").json()["face_count"] == faces
    assert client.delete(f"/identities/{kept}").status_code == 200


def test_a_port_of_the_same_host_is_another_origin(server, client):
    port = int(server.url.rsplit(":", 1)[1])
    other = f"http://127.0.0.1:{port + 1 if port < 65535 else port - 1}"
    assert code(enroll(client, "other-port", {"Origin": other, "Sec-Fetch-Site": "same-site"})) == \
        (403, "cross_origin_refused")


def test_same_origin_and_origin_less_writes_still_work(server, client):
    # the console (fetch from its own origin), then curl and SDKs (no Origin, no Sec-Fetch-*)
    for identity, headers in [(f"same-{uuid.uuid4().hex[:8]}", {"Origin": server.url, "Sec-Fetch-Site": "same-origin"}),
                              (f"curl-{uuid.uuid4().hex[:8]}", {}),
                              (f"typed-{uuid.uuid4().hex[:8]}", {"Sec-Fetch-Site": "none"})]:
        r = enroll(client, identity, headers)
        assert r.status_code == 200, r.text
        assert client.delete(f"/identities/{identity}", headers=headers).status_code == 200


def test_reads_from_another_origin_get_no_cors_grant(client):
    r = client.get("/identities", headers={"Origin": EVIL})
    assert r.status_code == 200  # the browser answers the page, not the service; without a grant it cannot read it
    assert "access-control-allow-origin" not in r.headers
    preflight = client.options("/enroll", headers={"Origin": EVIL, "Access-Control-Request-Method": "POST",
                                                   "Access-Control-Request-Headers": "content-type"})
    assert code(preflight) == (403, "cross_origin_refused")
    assert "access-control-allow-origin" not in preflight.headers


ROUTES = [("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/identities"), ("GET", "/identities/someone"),
          ("GET", "/metrics"), ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/console/"),
          ("POST", "/embed"), ("POST", "/enroll"), ("DELETE", "/identities/someone"), ("GET", "/nowhere")]


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:8000", "127.0.0.1.nip.io",
                                  "localhost.attacker.example", "[::2]:8000", ""])
def test_a_foreign_host_header_gets_no_answer_on_any_route(client, host):
    # a DNS-rebinding page reaches 127.0.0.1 under its own name: the Host header says so
    for method, path in ROUTES:
        r = client.request(method, path, headers={"Host": host})
        assert code(r) == (421, "host_not_allowed"), (method, path, r.text)
        assert "access-control-allow-origin" not in r.headers


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "LocalHost", "localhost."])
def test_loopback_names_and_addresses_pass_with_and_without_a_port(server, client, host):
    port = _netloc(server).rsplit(":", 1)[1]
    for value in (host, f"{host}:{port}"):
        r = client.get("/identities", headers={"Host": value})
        assert r.status_code == 200, (value, r.text)


@pytest.fixture(scope="module")
def exposed(tmp_path_factory, default_model):
    """Bound to every interface without a key (warned), answering two names and two CORS origins."""
    proc = ServerProcess(tmp_path_factory.mktemp("exposed") / "data", model=default_model, host="0.0.0.0",
                         env={"FACE_ALLOWED_HOSTS": "face.internal,*.example.org,127.0.0.1",
                              "FACE_CORS_ORIGINS": f"{APP},https://other.example:8443"})
    proc.wait_ready()
    yield proc
    proc.stop()


def _log_records(proc: ServerProcess) -> list[dict]:
    records = []
    for line in proc.log_path.read_text(errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def test_serving_without_a_key_on_every_interface_is_warned_about(exposed, server):
    warned = [r for r in _log_records(exposed) if r.get("event", "").startswith("serving without an API key")]
    assert len(warned) == 1 and warned[0]["level"] == "warning" and warned[0]["host"] == "0.0.0.0", warned
    assert not [r for r in _log_records(server) if r.get("event", "").startswith("serving without an API key")]


def test_allowed_hosts_setting_names_the_hosts_answered(exposed):
    port = exposed.url.rsplit(":", 1)[1]
    with httpx.Client(base_url=exposed.url, timeout=60) as c:
        for host in ("face.internal", f"face.internal:{port}", "api.example.org", f"a.b.example.org:{port}"):
            assert c.get("/identities", headers={"Host": host}).status_code == 200, host
        for host in ("localhost", "example.org", "evil-example.org", "face.internal.evil"):
            assert code(c.get("/identities", headers={"Host": host})) == (421, "host_not_allowed"), host


def test_cors_origins_get_exactly_their_grant(exposed):
    with httpx.Client(base_url=exposed.url, timeout=60) as c:
        preflight = c.options("/enroll", headers={"Origin": APP, "Access-Control-Request-Method": "POST",
                                                  "Access-Control-Request-Headers": "content-type, x-api-key"})
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == APP
        assert "POST" in preflight.headers["access-control-allow-methods"]
        assert {"content-type", "x-api-key"} <= {h.strip().lower() for h in
                                                 preflight.headers["access-control-allow-headers"].split(",")}
        assert "origin" in preflight.headers["vary"].lower()
        r = c.get("/identities", headers={"Origin": APP})
        assert r.headers["access-control-allow-origin"] == APP and "origin" in r.headers["vary"].lower()
        r = c.get("/identities", headers={"Origin": "https://other.example:8443"})
        assert r.headers["access-control-allow-origin"] == "https://other.example:8443"
        # a listed origin may write (open mode: it is trusted like the service's own pages)
        r = enroll(c, "from-app", {"Origin": APP, "Sec-Fetch-Site": "cross-site"})
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == APP
        # anyone else: no grant, no write
        for origin in (EVIL, "http://app.example:8080", "https://app.example"):
            r = c.get("/identities", headers={"Origin": origin})
            assert "access-control-allow-origin" not in r.headers, origin
            assert code(enroll(c, "from-evil", {"Origin": origin})) == (403, "cross_origin_refused"), origin
        assert code(c.get("/identities/from-evil")) == (404, "identity_not_found")
