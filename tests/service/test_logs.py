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

from tests.conftest import b64, face_files
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
    for field in ("route=/embed", "method=POST", "status=400", "request_id=req-text-1", "ms="):
        assert f" {field}" in lines[0], lines[0]
