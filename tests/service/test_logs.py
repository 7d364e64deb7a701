"""Structured logs: every line the service writes is one JSON object, at every level, and no call site
names an ``extra=`` field the way the logging module names its own (``thread``, ``message``, ...): such a
call raises ``KeyError`` where the line is made, at that level only. YuNet's ``extra={"thread": ...}``
made FACE_LOG_LEVEL=debug fail start-up (exit 3)."""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

import httpx

from tests.conftest import b64, face_files, metric
from tests.server import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def extra_keys(path: Path) -> list[tuple[int, str]]:
    """(line, key) of every literal key of an ``extra={...}`` argument in a Python file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            for keyword in node.keywords:
                if keyword.arg == "extra" and isinstance(keyword.value, ast.Dict):
                    found += [(key.lineno, key.value) for key in keyword.value.keys
                              if isinstance(key, ast.Constant) and isinstance(key.value, str)]
    return found


def test_no_log_call_names_a_field_the_log_record_has():
    files = [p for folder in ("service", "exporter", "harness", "bench", "clients") for p in (ROOT / folder).rglob("*.py")]
    keys = [(path.relative_to(ROOT), line, key) for path in files for line, key in extra_keys(path)]
    assert len(keys) > 50  # (the scan finds the service's structured fields)
    clashes = [k for k in keys if k[2] in RESERVED]
    assert not clashes, clashes


def test_the_scan_finds_a_clash(tmp_path):
    code = tmp_path / "code.py"
    code.write_text('log.info("a", extra={"route": 1})\nlog.debug("b", extra={"thread": 2, "n": 3})\n')
    assert [k for k in extra_keys(code) if k[1] in RESERVED] == [(2, "thread")]


def test_at_debug_level_the_service_starts_serves_and_writes_only_json_lines(tmp_path, default_model):
    proc = ServerProcess(tmp_path / "data", model=default_model, env={"FACE_LOG_LEVEL": "debug"})
    try:
        proc.wait_ready()
        with httpx.Client(base_url=proc.url, timeout=60) as client:
            face = b64(face_files("Colin_Powell")[0])
            assert client.post("/enroll", json={"identity_id": "logged", "images": [face]}).status_code == 200
            assert client.post("/identify", json={"images": [face]}).status_code == 200
            assert client.post("/embed", content=b"{").status_code == 400
    finally:
        proc.stop()
    lines = proc.log_path.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line: one JSON object
    assert {"debug", "info"} <= {r["level"] for r in records}
    assert not [r for r in records if r["level"] == "error"], [r for r in records if r["level"] == "error"]
    assert any(r["event"] == "service ready" for r in records)


def jpeg_with_broken_exif() -> bytes:
    """A face whose EXIF says its Make tag holds 2^31 bytes: Pillow warns (UserWarning "Tag data larger
    than file"), skips the tag and decodes the pixels."""
    import io
    import struct

    from PIL import Image

    exif = Image.Exif()
    exif[0x010F] = "camera-make"
    raw = exif.tobytes()  # b"Exif\0\0" + a big-endian TIFF block: header, then one IFD of one entry
    assert raw[6:8] == b"MM" and struct.unpack(">HH", raw[14:18]) == (1, 0x010F)
    broken = raw[:20] + struct.pack(">I", 0x7FFFFFFF) + raw[24:]  # the entry's count
    buf = io.BytesIO()
    Image.open(face_files("Colin_Powell")[0]).save(buf, format="JPEG", exif=broken)
    return buf.getvalue()


def test_a_library_s_warnings_about_an_upload_are_json_lines_too(tmp_path, default_model):
    """Pillow's warnings about a damaged upload (here its EXIF) went to stderr as Python prints them,
    two plain-text lines per warning that a client could cause at will; they are log records now."""
    proc = ServerProcess(tmp_path / "data", model=default_model)
    try:
        proc.wait_ready()
        with httpx.Client(base_url=proc.url, timeout=60) as client:
            for image_type in ("aligned", "photo"):
                r = client.post("/embed", json={"images": [b64(jpeg_with_broken_exif())], "image_type": image_type})
                assert r.status_code in (200, 422), r.text  # the pixels are fine (a photo this small: maybe no face)
    finally:
        proc.stop()
    records = [json.loads(line) for line in proc.log_path.read_text().splitlines()]  # every line: one JSON object
    warned = [r for r in records if r.get("logger") == "py.warnings"]
    assert warned and all(r["level"] == "warning" for r in warned), warned
    assert any("Tag data larger than file" in r["event"] for r in warned), warned


def test_plain_text_logs_keep_the_structured_fields(tmp_path, default_model):
    """FACE_LOG_JSON=false: one line a record, its fields as key=value (the access log's were dropped:
    every request logged as a bare ``request``)."""
    proc = ServerProcess(tmp_path / "data", model=default_model, env={"FACE_LOG_JSON": "false"})
    try:
        proc.wait_ready()
        with httpx.Client(base_url=proc.url, timeout=60) as client:
            assert client.post("/embed", content=b"{", headers={"x-request-id": "req-text-1"}).status_code == 400
    finally:
        proc.stop()
    lines = [line for line in proc.log_path.read_text().splitlines() if "req-text-1" in line]
    assert len(lines) == 1, lines
    assert " INFO service.access request " in lines[0]
    for field in ("route=/embed", "method=POST", "status=400", "request_id=req-text-1", "ms=", "error=malformed_json"):
        assert f" {field}" in lines[0], lines[0]


def test_every_error_answer_is_counted_and_logged_with_its_code(tmp_path, default_model):
    """face_errors_total counted only the errors the app's handlers answered: a refused Host, a body over
    the limit by its Content-Length, a bad consistency token, answered by the middleware, were not; and the
    access log line of a refused request did not say why. Both now carry the code, whoever answered."""
    proc = ServerProcess(tmp_path / "data", model=default_model, env={"FACE_MAX_REQUEST_BYTES": "1024"})
    try:
        proc.wait_ready()
        with httpx.Client(base_url=proc.url, timeout=60) as client:
            refused = {"host_not_allowed": client.get("/healthz", headers={"host": "elsewhere.example"}),
                       "payload_too_large": client.post("/embed", content=b"x" * 2048),
                       "malformed_json": client.post("/embed", content=b"{"),
                       "not_found": client.get("/nowhere")}
            assert {code: r.json()["error"]["code"] for code, r in refused.items()} == {c: c for c in refused}
            counted = {code: metric(client, f'face_errors_total{{code="{code}"}}') for code in refused}
            ids = {code: r.headers["x-request-id"] for code, r in refused.items()}
    finally:
        proc.stop()
    assert counted == dict.fromkeys(refused, 1.0), counted
    records = {r.get("request_id"): r for r in map(json.loads, proc.log_path.read_text().splitlines())
               if r["event"] == "request"}
    assert {code: records[ids[code]].get("error") for code in refused} == {c: c for c in refused}


def test_a_bug_is_answered_500_internal_error_counted_and_logged_once(caplog, tmp_path):
    """An exception no handler expects is answered by Starlette outside the access middleware: it is
    still counted (face_errors_total{code="internal_error"}) and its access line says so, once."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.config import Settings

    app = create_app(Settings(providers="cpu", data_dir=tmp_path / "data"))

    async def broken() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/broken", broken)  # (no lifespan: the route needs neither model nor gallery)
    with caplog.at_level("INFO"):
        r = TestClient(app, base_url="http://localhost", raise_server_exceptions=False).get("/broken")
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    samples = {s.labels.get("code"): s.value for m in app.state.metrics.registry.collect()
               if m.name == "face_errors" for s in m.samples if s.name == "face_errors_total"}
    assert samples == {"internal_error": 1.0}, samples
    lines = [r for r in caplog.records if r.getMessage() == "request" and getattr(r, "route", "") == "/broken"]
    assert len(lines) == 1 and lines[0].error == "internal_error" and lines[0].status == 500
    assert any(r.getMessage() == "unhandled error" for r in caplog.records)
