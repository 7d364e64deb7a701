"""HTTPS served by the service itself: ``FACE_TLS_CERT_FILE`` + ``FACE_TLS_KEY_FILE``.

Faces are biometric data and API keys are secrets: on a network both should travel encrypted, through
a TLS proxy in front or through this. The server's context takes TLS 1.2 and 1.3 only, with Python's
default server ciphers. Certificates are renewed while the service runs (ACME, cert-manager, an
operator's copy): the files are checked every ``FACE_TLS_RELOAD_S`` and a changed pair is loaded into a
new context that every new connection is then handed, by the listening context's SNI callback (which
OpenSSL calls for every ClientHello, with a server name or without); connections already open keep
theirs. A pair that does not load (a key written a moment after its certificate, a mistake) is logged
and the previous pair served; it is tried again when the files change again.

A TLS handshake must be done within the header deadline (``FACE_HTTP_HEADER_TIMEOUT_S``): uvicorn sets no
handshake timeout, so asyncio's 60 s applied, and a connection that never said hello held its slot
three times as long as one that never sent its headers (``handshake_deadline_loop``).

The certificate's expiry is on /metrics (``face_tls_certificate_expiry_timestamp_seconds``) and logged
at start and at each reload, with a warning once fewer than ``EXPIRY_WARNING_DAYS`` are left.

Mutual TLS (``FACE_TLS_CLIENT_CA_FILE``): each context asks the client for a certificate and verifies
it against those authorities; a handshake without one that verifies fails, before any byte of HTTP.
The authorities' file is watched with the pair and loaded into the next context (an authority added or
removed takes effect for new connections, as a renewed certificate does).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..model.files import others_may_read

log = logging.getLogger("service.http")

EXPIRY_WARNING_DAYS = 14


class TlsFileError(Exception):
    """The certificate or key file cannot be served: missing, unreadable, not PEM, or not a pair."""


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _not_after(cert_file: Path) -> datetime.datetime:
    """When the served (first) certificate of the chain expires."""
    from cryptography import x509

    return x509.load_pem_x509_certificate(cert_file.read_bytes()).not_valid_after_utc


def server_context(cert_file: Path, key_file: Path,
                   client_ca_file: Path | None = None) -> tuple[ssl.SSLContext, datetime.datetime]:
    """A server context for the pair (asking for client certificates of ``client_ca_file``'s authorities),
    and its certificate's expiry. Raises ``TlsFileError`` in words that name the setting and the file
    (never the key's bytes)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
        not_after = _not_after(cert_file)
    except FileNotFoundError as exc:
        raise TlsFileError(f"FACE_TLS_CERT_FILE / FACE_TLS_KEY_FILE: {exc.filename} does not exist") from None
    except ssl.SSLError as exc:  # not PEM, not a pair, an encrypted key
        why = "the key does not belong to the certificate" if "KEY_VALUES_MISMATCH" in str(exc) else (
            f"not a PEM certificate chain and its unencrypted private key ({exc.reason or exc})")
        raise TlsFileError(f"FACE_TLS_CERT_FILE {cert_file}, FACE_TLS_KEY_FILE {key_file}: {why}") from None
    except (OSError, ValueError) as exc:  # unreadable, a directory; cryptography's parse of the chain
        raise TlsFileError(f"FACE_TLS_CERT_FILE {cert_file}, FACE_TLS_KEY_FILE {key_file}: {exc}") from None
    if client_ca_file is not None:
        ask_client_certificates(context, client_ca_file)
    return context, not_after


def ask_client_certificates(context: ssl.SSLContext, client_ca_file: Path) -> None:
    """``context`` refuses a handshake without a client certificate that ``client_ca_file``'s authorities
    issued (``TlsFileError`` for a file that holds none)."""
    try:
        context.load_verify_locations(cafile=client_ca_file)
    except FileNotFoundError:
        raise TlsFileError(f"FACE_TLS_CLIENT_CA_FILE: {client_ca_file} does not exist") from None
    except (ssl.SSLError, OSError) as exc:
        raise TlsFileError(f"FACE_TLS_CLIENT_CA_FILE {client_ca_file}: not a PEM file of certificate authorities "
                           f"({getattr(exc, 'reason', None) or exc})") from None
    if not context.cert_store_stats()["x509_ca"]:
        raise TlsFileError(f"FACE_TLS_CLIENT_CA_FILE {client_ca_file}: no certificate authority in it (a CA "
                           "certificate has basicConstraints CA:TRUE)")
    context.verify_mode = ssl.CERT_REQUIRED


class ServerCertificate:
    """The listening context (given to the server) and the pair it currently hands connections."""

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None = None) -> None:
        self.cert_file, self.key_file = Path(cert_file), Path(key_file)
        self.client_ca_file = Path(client_ca_file) if client_ca_file is not None else None
        self._on_expiry: Callable[[datetime.datetime], None] | None = None
        self._stamps = self._files()
        self.listening, self.not_after = server_context(self.cert_file, self.key_file, self.client_ca_file)
        self.current = self.listening
        self.listening.sni_callback = self._hand_current
        self._warn_if_readable_by_others()
        self._loaded("tls certificate loaded")

    def _files(self) -> tuple[tuple[int, int, int] | None, ...]:
        return (_stamp(self.cert_file), _stamp(self.key_file),
                _stamp(self.client_ca_file) if self.client_ca_file is not None else None)

    def _hand_current(self, connection: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        current = self.current  # one read: a reload may publish another meanwhile
        if current is not context:
            connection.context = current

    def reload_if_changed(self) -> bool:
        """Load the pair again if either file changed since it was last read; True when a new pair is
        served. A pair that does not load leaves the previous one served (logged once per change)."""
        stamps = self._files()
        if stamps == self._stamps:
            return False
        self._stamps = stamps
        try:
            context, not_after = server_context(self.cert_file, self.key_file, self.client_ca_file)
        except TlsFileError as exc:
            log.warning("tls certificate not reloaded, the previous one is served: %s", exc)
            return False
        self.current, self.not_after = context, not_after  # published whole: the callback reads it once
        self._loaded("tls certificate reloaded")
        return True

    def _loaded(self, message: str) -> None:
        days = (self.not_after - datetime.datetime.now(datetime.timezone.utc)).total_seconds() / 86400
        extra = {"cert_file": str(self.cert_file), "not_after": self.not_after.isoformat(), "days_left": round(days, 1)}
        if self.client_ca_file is not None:  # mutual TLS: the authorities whose client certificates are taken
            extra |= {"client_ca_file": str(self.client_ca_file),
                      "client_cas": self.current.cert_store_stats()["x509_ca"]}
        if days < EXPIRY_WARNING_DAYS:
            log.warning(message + ("; it has expired" if days < 0 else f"; it expires in {days:.1f} days"), extra=extra)
        else:
            log.info(message, extra=extra)
        if self._on_expiry is not None:
            self._on_expiry(self.not_after)

    def report_expiry(self, callback: Callable[[datetime.datetime], None]) -> None:
        """Tell ``callback`` (the metrics) the served certificate's expiry now and at each reload."""
        self._on_expiry = callback
        callback(self.not_after)

    def _warn_if_readable_by_others(self) -> None:
        if (mode := others_may_read(self.key_file)) is not None and os.name == "posix":
            log.warning("FACE_TLS_KEY_FILE may be read by other users of this host (mode %s): chmod 600 it",
                        mode, extra={"key_file": str(self.key_file)})

    def watch(self, interval_s: float) -> None:
        """Check the files every ``interval_s`` in a daemon thread (a stat of each; read on a change),
        for the life of the process."""
        def run() -> None:
            while True:
                time.sleep(interval_s)
                try:
                    self.reload_if_changed()
                except Exception:  # noqa: BLE001 - the watch outlives any one check
                    log.warning("tls certificate check failed", exc_info=True)

        threading.Thread(target=run, name="tls-reload", daemon=True).start()


def handshake_deadline_loop(timeout_s: float) -> Callable[[], asyncio.AbstractEventLoop]:
    """uvicorn's event loop (uvloop where installed, else asyncio's) whose TLS servers give a client
    ``timeout_s`` to finish its handshake: passed as uvicorn's ``loop`` factory."""
    base: type[asyncio.AbstractEventLoop]
    try:
        import uvloop

        base = uvloop.Loop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings uvloop on Linux
        base = asyncio.SelectorEventLoop

    class HandshakeDeadlineLoop(base):  # type: ignore[valid-type,misc]
        async def create_server(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            if kwargs.get("ssl") is not None:
                kwargs.setdefault("ssl_handshake_timeout", timeout_s)
            return await super().create_server(*args, **kwargs)

    return HandshakeDeadlineLoop
