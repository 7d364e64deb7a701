"""Structured logging: one JSON object per line, with any ``extra=`` fields merged in (or, for people, a
line of text with them as ``key=value``)."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time


class Throttle:
    """One log line per ``seconds`` for a condition that repeats on every request (a full disk refusing
    each write): ``due()`` is None while a line was written less than ``seconds`` ago, else how many
    occurrences were left out since the last line (0 the first time)."""

    def __init__(self, seconds: float = 60.0) -> None:
        self.seconds = seconds
        self._last = -math.inf
        self._left_out = 0
        self._lock = threading.Lock()

    def due(self) -> int | None:
        with self._lock:
            now = time.monotonic()
            if now - self._last < self.seconds:
                self._left_out += 1
                return None
            left_out, self._left_out, self._last = self._left_out, 0, now
            return left_out


_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    _second: tuple[int, str] = (-1, "")  # the last whole second formatted, and its text

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second[0]:  # strftime once a second, not once a line
            self._second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        payload = {
            "ts": self._second[1] + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                payload[key] = value
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


class TextFormatter(logging.Formatter):
    """``FACE_LOG_JSON=false``: one line for people, ``time level logger event``, then the ``extra=``
    fields as ``key=value`` (the access log's route, status and latency are all in those)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = [f"{key}={_text(value)}" for key, value in record.__dict__.items()
                  if key not in _RESERVED and not key.startswith("_")]
        if not fields:
            return line
        head, newline, rest = line.partition("\n")  # after the event, before a traceback
        return f"{head} {' '.join(fields)}{newline}{rest}"


def _text(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return json.dumps(text) if not text or any(c.isspace() or c in '"=' for c in text) else text


def configure_logging(level: str = "info", json_lines: bool = True) -> None:
    # OpenCV writes its warnings to stderr itself, not as JSON (YuNet's "Targets are not supported by the
    # new graph engine" at every start): errors only, unless OPENCV_LOG_LEVEL says otherwise. Read when
    # OpenCV is first imported, which the server does after this.
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if json_lines else TextFormatter()
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Python warnings (Pillow's about a damaged upload's EXIF, for one) as records of the logger
    # "py.warnings", not as two plain-text lines on stderr that any client could cause
    logging.captureWarnings(True)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    # per-request lines come from our own middleware, with route and latency
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
