"""Smaller API edges (issue 10, item 7), each against a real server: docs behind the key, the key's
security scheme, an empty key refused at start-up, 405 with Allow, a chunked oversized multipart,
CMYK crops, strict scalar types, /metrics as text, /readyz cached."""

from __future__ import annotations

import io
import re

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.config import Settings
from tests.conftest import b64, face_files, metric
from tests.server import ServerProcess

FACE = face_files("Tony_Blair")[0]
KEY = "test-key-123"


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory, default_model):
    proc = ServerProcess(tmp_path_factory.mktemp("keyed") / "data", model=default_model, env={"FACE_API_KEY": KEY})
    proc.wait_ready()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def keyed(keyed_server):
    with httpx.Client(base_url=keyed_server.url, timeout=60) as c:
        yield c


def code(r: httpx.Response) -> tuple[int, str]:
    return r.status_code, r.json()["error"]["code"]


def test_docs_and_openapi_need_the_key_when_one_is_set(keyed):
    for path in ("/openapi.json", "/docs", "/redoc"):
        assert code(keyed.get(path)) == (401, "unauthorized"), path
        r = keyed.get(path, headers={"X-API-Key": KEY})
        assert r.status_code == 200, path
    assert keyed.get("/healthz").status_code == 200 and keyed.get("/readyz").status_code == 200


def test_openapi_declares_the_key_as_a_security_scheme(keyed):
    spec = keyed.get("/openapi.json", headers={"X-API-Key": KEY}).json()
    scheme = spec["components"]["securitySchemes"]["ApiKey"]
    assert (scheme["type"], scheme["in"], scheme["name"]) == ("apiKey", "header", "X-API-Key")
    for path, method in [("/embed", "post"), ("/enroll", "post"), ("/identities", "get"), ("/metrics", "get"),
                         ("/identities/{identity_id}", "delete")]:
        assert spec["paths"][path][method]["security"] == [{"ApiKey": []}], path
    for path in ("/healthz", "/readyz"):
        assert "security" not in spec["paths"][path]["get"], path


def test_readyz_without_the_key_is_a_bare_status(keyed_server, keyed):
    """Probes need no key, but the model's path, the thresholds and the gallery's size are for key holders."""
    for headers in ({}, {"X-API-Key": "wrong"}):
        r = keyed.get("/readyz", headers=headers)
        assert (r.status_code, r.json()) == (200, {"status": "ready"})
    full = keyed.get("/readyz", headers={"X-API-Key": KEY}).json()
    assert full["status"] == "ready" and full["model_path"] and "gallery" in full and "verify_threshold" in full
    assert keyed_server.wait_ready()["model_id"] == full["model_id"]  # the harness's probe sends the key


def test_readyz_without_a_key_configured_shows_the_details(client):
    assert {"model_path", "gallery", "identify_threshold"} <= set(client.get("/readyz").json())


def test_docs_load_only_same_origin_assets_served_by_the_package(client):
    """No third-party script on the service's origin, and docs that render on an air-gapped host."""
    for page in ("/docs", "/redoc"):
        r = client.get(page)
        html, policy = r.text, r.headers["content-security-policy"]
        assert "script-src 'self' " in policy and "default-src 'none'" in policy and "http" not in policy, policy
        urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
        assert urls, html
        assert not re.search(r"https?://", html), html
        assert not re.search(r"""["']//""", html), html  # nor protocol-relative ones
        for url in urls:
            r = client.get(url)
            assert r.status_code == 200 and len(r.content) > 1000, (page, url, r.status_code)
    assert "javascript" in client.get("/docs/assets/swagger-ui-bundle.js").headers["content-type"]
    assert "css" in client.get("/docs/assets/swagger-ui.css").headers["content-type"]
    assert code(client.get("/docs/assets/missing.js")) == (404, "not_found")


def test_public_docs_setting_opens_them():
    app = create_app(Settings(api_key=KEY, public_docs=True, providers="cpu"))
    # no lifespan: the docs need neither the model nor the gallery; a loopback Host (FACE_ALLOWED_HOSTS)
    client = TestClient(app, base_url="http://localhost")
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/docs").status_code == 200


def test_an_empty_api_key_is_refused_at_start_up(tmp_path, default_model):
    server = ServerProcess(tmp_path / "data", model=default_model, env={"FACE_API_KEY": ""})
    with pytest.raises(RuntimeError, match="FACE_API_KEY is set but empty"):
        server.wait_ready(timeout=60)
    assert server.proc.returncode != 0
    server.stop()


def test_405_keeps_the_allow_header(client):
    r = client.get("/embed")
    assert code(r) == (405, "method_not_allowed")
    assert r.headers["allow"] == "POST"


def test_a_chunked_oversized_multipart_is_payload_too_large(client):
    boundary = "----facetestboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"big.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()

    def body():  # 50 MB, streamed: no Content-Length, Transfer-Encoding: chunked
        yield head
        chunk = b"\xff" * (1 << 20)
        for _ in range(50):
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    try:
        r = client.post("/embed", content=body(), headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    except httpx.TransportError:  # the server may close before the client has sent all 50 MB
        pytest.fail("the server hung up without an answer")
    assert code(r) == (413, "payload_too_large")
    # the rest of the body is never read: the connection is closed after the answer, not left to parse
    # the remaining bytes as the next request
    assert r.headers["connection"] == "close"
    r = client.post("/embed", content=b"x" * (3 << 20), headers={"content-type": "application/json"})
    assert code(r) == (413, "payload_too_large") and r.headers["connection"] == "close"  # refused by its length


def test_a_cmyk_jpeg_is_converted_as_an_aligned_crop(client):
    """One colour policy: CMYK is converted to RGB for crops as for photos (it used to be refused
    as a crop only; every mode is in test_colour_policy.py)."""
    buf = io.BytesIO()
    Image.open(FACE).convert("CMYK").save(buf, "JPEG")
    r = client.post("/embed", json={"images": [b64(buf.getvalue())]})
    assert r.status_code == 200, r.text


def sixteen_bit_png(size: tuple[int, int] | None = None) -> bytes:
    """A real face as a 16-bit grayscale PNG (Pillow mode I;16), optionally resized (width, height)."""
    import numpy as np

    gray = Image.open(FACE).convert("L")
    if size is not None:
        gray = gray.resize(size)
    buf = io.BytesIO()
    Image.fromarray(np.asarray(gray).astype(np.uint16) * 257).save(buf, "PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I;16")
    return buf.getvalue()


@pytest.mark.parametrize("image_type,size", [("aligned", None), ("photo", (250, 250)), ("auto", None),
                                             ("auto", (250, 250))])
def test_a_16_bit_png_gets_one_code_as_crop_and_as_photo(client, image_type, size):
    """One colour policy for both decoders: 16 bits per sample would have to be clipped or rescaled
    to 8, so the crop path and the photo path refuse it alike (they used to disagree)."""
    r = client.post("/embed", json={"images": [b64(sixteen_bit_png(size))], "image_type": image_type})
    assert code(r) == (422, "unsupported_color_mode"), r.text
    assert r.json()["error"]["details"]["mode"].startswith("I;16")


@pytest.mark.parametrize("route,extra", [
    ("/verify", {"threshold": "0.5"}),
    ("/verify", {"threshold": True}),
    ("/identify", {"top_k": True}),
    ("/identify", {"top_k": "3"}),
    ("/identify", {"top_k": 3.5}),
    ("/enroll", {"identity_id": "strict-types", "replace": "true"}),
    ("/enroll", {"identity_id": "strict-types", "replace": 1}),
    ("/detect", {"return_crops": "yes"}),
    ("/enroll", {"identity_id": 5}),
])
def test_scalar_fields_are_not_coerced(client, route, extra):
    images = {"/verify": {"image_a": b64(FACE), "image_b": b64(FACE)}}.get(route, {"images": [b64(FACE)]})
    r = client.post(route, json={**images, **extra})
    assert code(r) == (422, "invalid_request"), r.text[:300]


def test_a_whole_float_is_an_integer_as_json_schema_reads_it(client):
    """OpenAPI 3.1's JSON Schema counts 2.0 as an integer (a client's arithmetic makes such floats); 2.5
    stays refused (above)."""
    r = client.post("/identify", json={"images": [b64(FACE)], "top_k": 2.0})
    assert r.status_code == 200, r.text
    assert len(r.json()["results"][0]["candidates"]) <= 2


def test_multipart_text_fields_still_reach_their_types(client):
    files = [("images", ("face.jpg", FACE.read_bytes(), "image/jpeg"))]
    r = client.post("/identify", files=files, data={"top_k": "2", "threshold": "0.5"})
    assert r.status_code == 200, r.text
    assert r.json()["threshold"] == 0.5 and len(r.json()["results"][0]["candidates"]) <= 2
    r = client.post("/enroll", files=files, data={"identity_id": "12345", "replace": "true"})
    try:
        assert r.status_code == 200 and r.json()["identity_id"] == "12345", r.text
    finally:  # the session's server is shared: a stray Tony_Blair would answer other modules' identify tests
        client.delete("/identities/12345")
    r = client.post("/verify", files=[("image_a", ("a.jpg", FACE.read_bytes())), ("image_b", ("b.jpg", FACE.read_bytes()))],
                    data={"threshold": "0.9"})
    assert r.status_code == 200 and r.json()["threshold"] == 0.9, r.text
    assert code(client.post("/identify", files=files, data={"top_k": "many"})) == (422, "invalid_request")


@pytest.mark.parametrize("spelling,replace", [
    ("true", True), ("True", True), ("TRUE", True), ("1", True), ("on", True), ("yes", True), ("Yes", True),
    ("false", False), ("False", False), ("0", False), ("off", False), ("no", False), ("NO", False),
])
def test_multipart_booleans_take_form_spellings(client, spelling, replace):
    """Form clients send Python's True/False, 1/0, on/off (HTML checkboxes), yes/no: read as FastAPI's
    Form(bool) reads them (issue 24: a generated client's replace=False was refused)."""
    identity = f"form-bool-{spelling}"
    files = [("images", ("face.jpg", FACE.read_bytes(), "image/jpeg"))]
    try:
        assert client.post("/enroll", json={"identity_id": identity, "images": [b64(FACE)]}).status_code == 200
        r = client.post("/enroll", files=files, data={"identity_id": identity, "replace": spelling})
        assert r.status_code == 200, r.text
        assert (r.json()["faces_replaced"], r.json()["face_count"]) == ((1, 1) if replace else (0, 2))
    finally:  # the session's server is shared
        client.delete(f"/identities/{identity}")
    r = client.post("/detect", files=files, data={"return_crops": spelling})
    assert r.status_code == 200, r.text
    assert ("crop" in r.json()["images"][0]["faces"][0] and r.json()["images"][0]["faces"][0]["crop"] is not None) \
        == replace


@pytest.mark.parametrize("spelling", ["maybe", "", "2", "truee", "null", '"true"'])
def test_multipart_booleans_refuse_other_text(client, spelling):
    files = [("images", ("face.jpg", FACE.read_bytes(), "image/jpeg"))]
    r = client.post("/enroll", files=files, data={"identity_id": "form-bool-refused", "replace": spelling})
    assert code(r) == (422, "invalid_request"), r.text
    assert code(client.get("/identities/form-bool-refused")) == (404, "identity_not_found")


def test_metrics_are_text_in_the_answer_and_the_openapi(client):
    r = client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    content = client.get("/openapi.json").json()["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert "text/plain" in content and "application/json" not in content


def test_readyz_reuses_a_fresh_inference(client):
    before = metric(client, "face_inference_batch_size_count")
    answers = [client.get("/readyz").json() for _ in range(20)]
    runs = metric(client, "face_inference_batch_size_count") - before
    assert all(a["status"] == "ready" for a in answers)
    assert runs < 5, f"{runs} model runs for 20 polls"  # one per second at most (FACE_READYZ_CACHE_MS=1000)


def test_a_short_api_key_is_warned_of_without_being_logged(caplog):
    from service.app import warn_if_exposed

    with caplog.at_level("WARNING", logger="service.app"):
        warn_if_exposed(Settings(api_key="tiny-key-9"))
        warn_if_exposed(Settings(api_key="a-key-of-sixteen"))
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "FACE_API_KEY has 10 characters" in warnings[0], warnings
    assert "tiny-key-9" not in caplog.text


def test_a_blank_api_key_is_refused_by_the_settings(monkeypatch):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="FACE_API_KEY is set but empty"):
        Settings(api_key="   ", _env_file=None)
    monkeypatch.setenv("FACE_API_KEY", "")
    with pytest.raises(ValidationError, match="FACE_API_KEY is set but empty"):
        Settings(_env_file=None)
    monkeypatch.setenv("FACE_API_KEY", KEY)
    assert Settings(_env_file=None).api_key.get_secret_value() == KEY


def test_multipart_optional_fields_spelt_none_are_absent(client):
    """openapi-python-client sends an optional form field set to None as the text "None" (str(None)); in a
    form that means "not given" (issue 24), for numbers, objects and text fields alike."""
    identity = "form-none"
    files = [("images", ("face.jpg", FACE.read_bytes(), "image/jpeg"))]
    try:
        r = client.post("/enroll", files=files, data={"identity_id": identity, "metadata": "None", "model_id": "None",
                                                      "min_quality": "None"})
        assert r.status_code == 200, r.text
        assert client.get(f"/identities/{identity}").json()["metadata"] == {}
    finally:  # the session's server is shared
        client.delete(f"/identities/{identity}")
    r = client.post("/identify", files=files, data={"threshold": "None", "model_id": "None", "top_k": "2"})
    assert r.status_code == 200, r.text
    assert code(client.post("/identify", files=files, data={"top_k": "None"})) == (422, "invalid_request")


def test_head_answers_as_get_does_without_the_body(keyed):
    """HEAD is GET without the body (RFC 9110 9.3.2: what uptime monitors and caches send): the same
    status and headers on every GET route, the console's files and the docs, and access decided the
    same way. Without it HEAD /healthz was a 405 and HEAD /console/config.json a 404 (the console's
    file mount answered for the route that has no HEAD)."""
    auth = {"X-API-Key": KEY}
    fixed = [("/healthz", {}), ("/console/", {}), ("/console/config.json", {}), ("/console/app.js", {}),
             ("/openapi.json", auth), ("/docs", auth), ("/identities", auth), ("/whoami", auth)]
    refused = [("/identities", {}), ("/docs", {}), ("/nope", {}), ("/console/nope.js", {}), ("/faces/1", auth)]
    for url, headers in fixed + refused + [("/readyz", {}), ("/metrics", auth)]:
        got, head = keyed.get(url, headers=headers), keyed.head(url, headers=headers)
        assert head.status_code == got.status_code, (url, head.status_code, got.status_code)
        assert head.content == b"", url
        assert head.headers.get("content-type") == got.headers.get("content-type"), url
        if (url, headers) in fixed + refused:  # (the same bytes each time: the same length)
            assert head.headers.get("content-length") == got.headers.get("content-length"), url
    assert keyed.head("/identities").status_code == 401
    r = keyed.head("/embed", headers=auth)  # no GET: no HEAD either
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.content == b""
    assert keyed.get("/healthz").status_code == 200  # the connection and the server go on


def test_every_answer_says_nosniff_and_no_store_unless_the_route_chose(keyed_server, keyed):
    """Every answer, from a route, an error or a middleware's early refusal, carries one
    ``X-Content-Type-Options: nosniff`` and ``Cache-Control: no-store`` (identities, metadata and
    embeddings are biometric data: no shared cache keeps them; ``X-API-Key`` is not ``Authorization``,
    which caches already leave alone), unless the route set its own (the console's script and style:
    ``no-cache``; its page keeps ``no-store``: it shows a new key's secret once); no
    ``Strict-Transport-Security`` over plain HTTP (test_tls.py: over HTTPS)."""
    auth = {"X-API-Key": KEY}
    answers = {
        "identities": keyed.get("/identities", headers=auth),
        "identity": keyed.get("/identities/nobody", headers=auth),  # 404 identity_not_found
        "embed": keyed.post("/embed", json={"images": [b64(FACE)]}, headers=auth),
        "no key": keyed.get("/identities"),  # 401
        "no route": keyed.get("/no-such-route", headers=auth),
        "malformed": keyed.post("/identify", content=b"{", headers={**auth, "Content-Type": "application/json"}),
        "too large": keyed.post("/embed", content=b"x" * (65 << 20), headers=auth),  # refused before the route
        "head": keyed.head("/identities", headers=auth),
        "healthz": keyed.get("/healthz"),
        "metrics": keyed.get("/metrics", headers=auth),
        "docs": keyed.get("/docs", headers=auth),
        "console": keyed.get("/console/"),
        "console script": keyed.get("/console/app.js"),
    }
    assert answers["embed"].status_code == 200 and answers["too large"].status_code == 413
    for name, answer in answers.items():
        assert answer.headers.get_list("x-content-type-options") == ["nosniff"], (name, answer.headers)
        expected = ["no-cache"] if name == "console script" else ["no-store"]
        assert answer.headers.get_list("cache-control") == expected, (name, answer.headers)
        assert "strict-transport-security" not in answer.headers, name
