"""A TCP proxy in front of a test PostgreSQL (harness.pg, Unix socket) that loses one write on purpose.

The service connects to ``url`` (127.0.0.1, a port of its own) and each of its connections is relayed to
the server's socket. Armed with :meth:`PgFaultProxy.arm`, the proxy watches for the next transaction that
sends ``marker`` (a statement's text, e.g. ``b"INSERT INTO identities"``), then either

* ``"before_commit"``: cuts that connection instead of relaying the marked statement, so PostgreSQL rolls
  the transaction back (nothing stored, as when the database goes away mid-write); or
* ``"lost_commit_reply"``: relays the transaction's COMMIT, reads PostgreSQL's whole answer to it (the commit
  is done) without passing it on, then cuts the connection: a commit whose acknowledgement was lost.

One fault per :meth:`arm`; ``fired`` is set when it happened. Deterministic: the fault is decided by the
messages themselves, never by timing: the proxy reads the protocol's framing of what the service sends (a
statement psycopg has prepared is marked by its Parse, and each Bind of it), psycopg sends COMMIT as one
simple Query message and waits for each answer before it sends more.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from urllib.parse import parse_qs, urlparse

COMMIT = b"Q" + struct.pack("!i", 4 + len(b"COMMIT\0")) + b"COMMIT\0"  # the simple Query message "COMMIT"
MODES = ("before_commit", "lost_commit_reply")


def socket_path(url: str) -> str:
    """The Unix socket of a harness.pg server URL (``...?host=DIR``, port 5432 unless given)."""
    parsed = urlparse(url)
    return os.path.join(parse_qs(parsed.query)["host"][0], f".s.PGSQL.{parsed.port or 5432}")


class PgFaultProxy:
    def __init__(self, target_url: str) -> None:
        self.target = socket_path(target_url)
        parsed = urlparse(target_url)
        self._user, self._dbname = parsed.username or "postgres", parsed.path.lstrip("/") or "postgres"
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._armed: tuple[str, bytes] | None = None
        self.fired = threading.Event()
        self._closed = False
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True, name="pg-fault-proxy").start()

    @property
    def url(self) -> str:
        """What the service connects to (no TLS, no GSS: the proxy reads the messages it relays)."""
        return f"postgresql://{self._user}@127.0.0.1:{self.port}/{self._dbname}?sslmode=disable&gssencmode=disable"

    def arm(self, mode: str, marker: bytes) -> None:
        if mode not in MODES:
            raise ValueError(f"mode is one of {MODES}")
        with self._lock:
            self._armed = (mode, marker)
            self.fired.clear()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        for conn in list(self._conns):
            _close(conn)

    def _take(self, mode: str) -> bool:
        """Whether this connection's marked transaction gets the armed fault (once in all)."""
        with self._lock:
            if self._armed is None or self._armed[0] != mode:
                return False
            self._armed = None
            return True

    def _marker(self) -> bytes | None:
        with self._lock:
            return None if self._armed is None else self._armed[1]

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.socket(socket.AF_UNIX)
            server.connect(self.target)
            self._conns += [client, server]
            _Relay(self, client, server).start()


class _Relay:
    """One service connection: client -> server in one thread, server -> client in another."""

    def __init__(self, proxy: PgFaultProxy, client: socket.socket, server: socket.socket) -> None:
        self.proxy, self.client, self.server = proxy, client, server
        self.marked = False  # this transaction sent the marker (until its COMMIT)
        self.swallow = threading.Event()  # the answer to the COMMIT sent is read and dropped
        self._sent = b""  # what the service sent, not yet a whole message
        self._started = False  # the startup message (the one without a type byte) has passed
        self._statements: dict[bytes, bytes] = {}  # the statements psycopg prepared on it: name -> query

    def _messages(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """The whole messages (type, body) the service's bytes complete."""
        self._sent += data
        done: list[tuple[bytes, bytes]] = []
        while True:
            if not self._started:
                if len(self._sent) < 4 or len(self._sent) < (length := struct.unpack("!i", self._sent[:4])[0]):
                    return done
                self._sent, self._started = self._sent[length:], True
                continue
            if len(self._sent) < 5 or len(self._sent) < 1 + (length := struct.unpack("!i", self._sent[1:5])[0]):
                return done
            done.append((self._sent[:1], self._sent[5:1 + length]))
            self._sent = self._sent[1 + length:]

    def _query(self, kind: bytes, body: bytes) -> bytes:
        """The text of the statement a message runs or prepares (b"": none)."""
        if kind == b"Q":
            return body
        if kind == b"P":  # Parse: statement name, query
            name, query = body.split(b"\0", 2)[:2]
            self._statements[name] = query
            return query
        if kind == b"B":  # Bind: portal, statement name
            return self._statements.get(body.split(b"\0", 2)[1], b"")
        return b""

    def start(self) -> None:
        threading.Thread(target=self._up, daemon=True).start()
        threading.Thread(target=self._down, daemon=True).start()

    def _cut(self) -> None:
        _close(self.client)
        _close(self.server)

    def _up(self) -> None:
        try:
            while data := self.client.recv(65536):
                messages = self._messages(data)
                queries = [self._query(kind, body) for kind, body in messages]
                marker = self.proxy._marker()
                if marker is not None and any(marker in query for query in queries):
                    if self.proxy._take("before_commit"):
                        self.proxy.fired.set()
                        self._cut()
                        return
                    self.marked = True
                if self.marked and (b"Q", COMMIT[5:]) in messages:
                    self.marked = False
                    if self.proxy._take("lost_commit_reply"):
                        self.swallow.set()
                self.server.sendall(data)
        except OSError:
            pass
        self._cut()

    def _down(self) -> None:
        pending = b""
        try:
            while data := self.server.recv(65536):
                if not self.swallow.is_set():
                    self.client.sendall(data)
                    continue
                pending += data  # the COMMIT's answer: messages (type, length) up to ReadyForQuery ("Z")
                while len(pending) >= 5:
                    kind, length = pending[:1], struct.unpack("!i", pending[1:5])[0]
                    if len(pending) < 1 + length:
                        break
                    pending = pending[1 + length:]
                    if kind == b"Z":  # committed, and the service never hears of it
                        self.proxy.fired.set()
                        self._cut()
                        return
        except OSError:
            pass
        self._cut()


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


