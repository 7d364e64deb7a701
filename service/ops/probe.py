"""``python -m service.ops.probe``: the container's health check. Exit 0 when the service on this host
answers ``/readyz`` with 200, else 1.

It reads ``FACE_PORT`` (8000) and asks over HTTPS when ``FACE_TLS_CERT_FILE`` is set, without checking
the certificate (it is this host's own, and may name only the public host name). A service that asks
for client certificates (``FACE_TLS_CLIENT_CA_FILE``) is shown ``FACE_TLS_PROBE_CERT_FILE`` and
``FACE_TLS_PROBE_KEY_FILE``, a certificate one of those authorities issued for the check. Standard
library only: it runs every 30 s, so it imports nothing of the service.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.request

HOST = "127.0.0.1"  # the Host header it sends: FACE_ALLOWED_HOSTS must name it (loopback is the default)
ROUTE = "/readyz"
TIMEOUT_S = 8


def url() -> str:
    scheme = "https" if os.environ.get("FACE_TLS_CERT_FILE") else "http"
    return f"{scheme}://{HOST}:{os.environ.get('FACE_PORT', '8000')}{ROUTE}"


def main() -> int:
    address = url()
    context = None
    if address.startswith("https:"):
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        if os.environ.get("FACE_TLS_PROBE_CERT_FILE"):
            try:
                context.load_cert_chain(os.environ["FACE_TLS_PROBE_CERT_FILE"],
                                        os.environ.get("FACE_TLS_PROBE_KEY_FILE") or None)
            except (OSError, ssl.SSLError) as exc:
                print(f"FACE_TLS_PROBE_CERT_FILE / FACE_TLS_PROBE_KEY_FILE: {exc}", file=sys.stderr)
                return 1
    try:
        with urllib.request.urlopen(address, timeout=TIMEOUT_S, context=context) as answer:
            return 0 if answer.status == 200 else 1
    except OSError as exc:  # refused, timed out, an HTTP error status (HTTPError is an OSError)
        print(f"{address}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
