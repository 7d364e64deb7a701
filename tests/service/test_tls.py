"""HTTPS served by the service itself (FACE_TLS_CERT_FILE, FACE_TLS_KEY_FILE), over real sockets to the
real server: the API, the client and its CLI, the container's probe and the connection deadlines over
TLS; plain HTTP gets nothing; a renewed certificate is served without a restart (a broken one is not);
files the service cannot use stop it in one line."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from harness.tls import write_ca, write_client, write_pair
from tests.conftest import face_files, metric
from tests.server import REPO, ServerProcess

DEADLINE_S = 1.0


def served_serial(port: int) -> int:
    """The serial number of the certificate a new TLS connection to ``port`` is handed."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, context.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def tls_env(tmp_path: Path, **more: str) -> dict[str, str]:
    return {"FACE_TLS_CERT_FILE": str(tmp_path / "tls.crt"), "FACE_TLS_KEY_FILE": str(tmp_path / "tls.key"), **more}


@pytest.fixture(scope="module")
def https(tmp_path_factory, default_model):
    tmp_path = tmp_path_factory.mktemp("tls")
    not_after = write_pair(tmp_path / "tls.crt", tmp_path / "tls.key", serial=1)
    proc = ServerProcess(tmp_path / "data", model=default_model,
                         env=tls_env(tmp_path, FACE_HTTP_HEADER_TIMEOUT_S=str(DEADLINE_S)))
    proc.wait_ready()
    yield proc, tmp_path / "tls.crt", not_after
    proc.stop()


def test_https_serves_the_api_and_checks_are_kept(https):
    from faceclient import FaceClient
    from faceclient.cli import main as face

    server, cert, not_after = https
    assert server.url.startswith("https://")
    with FaceClient(server.url, ca_file=cert) as client:  # the client checks the certificate against the CA given
        client.enroll("alice", face_files("George_W_Bush")[:2])
        assert client.identify(face_files("George_W_Bush")[2]).results[0].candidates[0].identity_id == "alice"
    with httpx.Client(base_url=server.url, verify=server.verify, timeout=10) as c:
        assert c.get("/healthz").status_code == 200
        for answer in (c.get("/identities"), c.get("/no-such-route"), c.get("/console/")):  # this host, a year
            assert answer.headers.get_list("strict-transport-security") == ["max-age=31536000"], answer.headers
        assert metric(c, "face_tls_certificate_expiry_timestamp_seconds") == not_after.timestamp()
    # the usual trust store does not know a self-signed certificate: refused, not talked to
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(server.url + "/healthz", timeout=10)
    assert face(["--url", server.url, "--ca-file", str(cert), "collections", "list"]) == 0
    assert face(["--url", server.url, "collections", "list"]) == 3  # no connection: the certificate is unknown
    # the container's health check asks over HTTPS when FACE_TLS_CERT_FILE is set
    probe_env = {**os.environ, "FACE_PORT": str(server.port), "FACE_TLS_CERT_FILE": str(cert)}
    assert subprocess.run([sys.executable, "-m", "service.ops.probe"], cwd=REPO, env=probe_env,
                          capture_output=True, timeout=30).returncode == 0
    probe_env.pop("FACE_TLS_CERT_FILE")
    assert subprocess.run([sys.executable, "-m", "service.ops.probe"], cwd=REPO, env=probe_env,
                          capture_output=True, timeout=30).returncode == 1
    log = server.log_path.read_text()  # the whole log (log(): its last 5,000 characters)
    assert "tls certificate loaded" in log and "FACE_TLS_KEY_FILE may be read" not in log  # the key is 0600
    assert "BEGIN PRIVATE KEY" not in log


def test_plain_http_to_the_https_port_gets_nothing_and_hurts_no_one(https):
    server, _, _ = https
    with pytest.raises(httpx.HTTPError):  # the server answers no plain HTTP on its TLS port
        httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=5)
    assert httpx.get(server.url + "/healthz", verify=server.verify, timeout=10).status_code == 200


def test_the_header_deadline_holds_over_tls(https):
    """A TLS connection that sends part of its headers and stops is closed at FACE_HTTP_HEADER_TIMEOUT_S
    (the deadlines run on the decrypted bytes: the protocol under uvicorn is the same)."""
    server, _, _ = https
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw, \
            server.verify.wrap_socket(raw, server_hostname="127.0.0.1") as tls:  # type: ignore[union-attr]
        tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        started = time.monotonic()
        tls.settimeout(10)
        try:
            assert tls.recv(4096) == b""
        except (ConnectionResetError, ssl.SSLError):
            pass  # closed either way
        assert time.monotonic() - started < 8  # the deadline (1 s) plus the timer's step, not the 10 s wait


def test_a_body_over_the_limit_gets_its_413_over_tls(https):
    """A client that sends its whole body before reading reads its 413 over TLS too: the rest of the body is
    read and dropped before the close (test_refused_bodies.py), here without the half-close (FIN) after the
    answer, which TLS cannot do. (The TLS layer's own shutdown reads what comes while it waits for the
    client's close_notify: this passed before the drain too.)"""
    server, _, _ = https
    piece, pieces = b"x" * (1 << 20), 40  # over the default FACE_MAX_REQUEST_BYTES (32 MiB)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as raw, \
            server.verify.wrap_socket(raw, server_hostname="127.0.0.1") as tls:  # type: ignore[union-attr]
        tls.sendall(b"POST /embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n" % (len(piece) * pieces))
        for _ in range(pieces):
            tls.sendall(piece)
        answer = b""
        try:
            while chunk := tls.recv(65536):
                answer += chunk
        except ssl.SSLEOFError:  # (the server's close may come without a close_notify)
            pass
    assert answer.startswith(b"HTTP/1.1 413 ") and b'"payload_too_large"' in answer, answer[:300]


@pytest.mark.parametrize("hello", [b"", b"\x16\x03\x01\x02\x00\x01"], ids=["silent", "half-a-hello"])
def test_a_tls_handshake_gets_the_header_deadline(https, hello):
    """A connection that never finishes its TLS handshake (nothing said, or a ClientHello cut short) is
    closed at FACE_HTTP_HEADER_TIMEOUT_S, as one that never finishes its headers (asyncio's own default
    was 60 s), while others are served."""
    server, _, _ = https
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        raw.sendall(hello)
        started = time.monotonic()
        assert httpx.get(server.url + "/healthz", verify=server.verify, timeout=10).status_code == 200
        try:
            assert raw.recv(4096) == b""
        except ConnectionResetError:
            pass
        assert time.monotonic() - started < 8  # the deadline (1 s) and some slack, not 60 s


def test_a_renewed_certificate_is_served_without_a_restart(tmp_path, default_model):
    not_after = write_pair(tmp_path / "tls.crt", tmp_path / "tls.key", serial=1)
    (tmp_path / "tls.key").chmod(0o644)
    server = ServerProcess(tmp_path / "data", model=default_model, env=tls_env(tmp_path, FACE_TLS_RELOAD_S="0.2"))
    try:
        server.wait_ready()
        assert "FACE_TLS_KEY_FILE may be read by other users" in server.log()
        assert served_serial(server.port) == 1
        kept = httpx.Client(base_url=server.url, verify=False, timeout=10)  # a connection open across the renewal
        assert kept.get("/healthz").status_code == 200

        renewed = write_pair(tmp_path / "tls.crt", tmp_path / "tls.key", serial=2, days=90)
        deadline = time.monotonic() + 20
        while served_serial(server.port) != 2:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.1)
        assert kept.get("/healthz").status_code == 200  # the open connection keeps its session
        assert metric(kept, "face_tls_certificate_expiry_timestamp_seconds") == renewed.timestamp() != not_after.timestamp()

        # a certificate whose key is not there (yet): the renewed pair stays served, the service up
        # (a pair written in place may also be caught between its key and its certificate: counted)
        refused_before = server.log_path.read_text().count("tls certificate not reloaded")
        write_pair(tmp_path / "tls.crt", None, serial=3)
        deadline = time.monotonic() + 20
        while server.log_path.read_text().count("tls certificate not reloaded") == refused_before:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.1)
        assert "does not belong to the certificate" in server.log()
        assert served_serial(server.port) == 2
        assert httpx.get(server.url + "/healthz", verify=False, timeout=10).status_code == 200
        # a whole pair again: served
        write_pair(tmp_path / "tls.crt", tmp_path / "tls.key", serial=4)
        deadline = time.monotonic() + 20
        while served_serial(server.port) != 4:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.1)
        kept.close()
    finally:
        server.stop()


def test_mutual_tls_serves_only_clients_its_authorities_issued_a_certificate(tmp_path, default_model):
    """FACE_TLS_CLIENT_CA_FILE: a client without a certificate, or with one no listed authority issued,
    fails the TLS handshake (nothing of HTTP reaches the service: no request is logged); one a listed
    authority issued is served, through httpx, FaceClient, the face CLI and the container's health
    check (FACE_TLS_PROBE_CERT_FILE); API keys are asked for as before. The authorities' file is
    watched with the pair: an authority replaced takes effect for new connections without a restart."""
    from faceclient import FaceClient
    from faceclient.cli import main as face

    write_pair(tmp_path / "tls.crt", tmp_path / "tls.key", serial=1)
    authority = write_ca(tmp_path / "clients.crt")
    write_client(tmp_path / "alice.crt", tmp_path / "alice.key", authority)
    write_client(tmp_path / "mallory.crt", tmp_path / "mallory.key", None)  # self-signed: no listed authority
    admin = "an-admin-key-0123456789abcdef"
    server = ServerProcess(tmp_path / "data", model=default_model, env=tls_env(
        tmp_path, FACE_TLS_CLIENT_CA_FILE=str(tmp_path / "clients.crt"), FACE_TLS_RELOAD_S="0.2", FACE_API_KEY=admin))
    assert isinstance(server.verify, ssl.SSLContext)
    server.verify.load_cert_chain(tmp_path / "alice.crt", tmp_path / "alice.key")  # the harness's own polls

    def context(client: str | None) -> ssl.SSLContext:
        made = ssl.create_default_context(cafile=tmp_path / "tls.crt")
        if client is not None:
            made.load_cert_chain(tmp_path / f"{client}.crt", tmp_path / f"{client}.key")
        return made

    def requests_logged() -> int:
        return server.log_path.read_text().count('"event": "request"')

    def requests_logged_once_settled() -> int:  # a request's line is written after its answer is sent
        last, now = -1, requests_logged()
        while now != last:
            time.sleep(0.3)
            last, now = now, requests_logged()
        return now

    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, verify=context("alice"), timeout=10) as c:
            assert c.get("/healthz").status_code == 200
            assert c.get("/identities").status_code == 401  # the key is still asked for
            assert c.get("/identities", headers={"X-API-Key": admin}).status_code == 200
        before = requests_logged_once_settled()
        for client in (None, "mallory"):
            with pytest.raises(httpx.HTTPError):
                httpx.get(server.url + "/healthz", verify=context(client), timeout=10)
        time.sleep(0.5)
        assert requests_logged() == before  # refused in the handshake, before any request

        with FaceClient(server.url, admin, ca_file=tmp_path / "tls.crt",
                        client_cert=(tmp_path / "alice.crt", tmp_path / "alice.key")) as client:
            assert [c.name for c in client.list_collections()] == ["default"]
        common = ["--url", server.url, "--key", admin, "--ca-file", str(tmp_path / "tls.crt")]
        assert face([*common, "--client-cert", str(tmp_path / "alice.crt"), "--client-key", str(tmp_path / "alice.key"),
                     "collections", "list"]) == 0
        assert face([*common, "collections", "list"]) == 3  # no certificate: no connection
        assert face([*common, "--client-key", str(tmp_path / "alice.key"), "collections", "list"]) == 2  # usage
        probe_env = {**os.environ, "FACE_PORT": str(server.port), "FACE_TLS_CERT_FILE": str(tmp_path / "tls.crt")}
        probe = [sys.executable, "-m", "service.ops.probe"]
        assert subprocess.run(probe, cwd=REPO, env=probe_env, capture_output=True, timeout=30).returncode == 1
        probe_env |= {"FACE_TLS_PROBE_CERT_FILE": str(tmp_path / "alice.crt"),
                      "FACE_TLS_PROBE_KEY_FILE": str(tmp_path / "alice.key")}
        assert subprocess.run(probe, cwd=REPO, env=probe_env, capture_output=True, timeout=30).returncode == 0

        # another authority in its place (a rotation): its clients are served, the old one's refused
        write_client(tmp_path / "bob.crt", tmp_path / "bob.key", write_ca(tmp_path / "clients.crt", name="next-ca"))
        deadline = time.monotonic() + 20
        while True:
            try:
                assert httpx.get(server.url + "/healthz", verify=context("bob"), timeout=10).status_code == 200
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, server.log()
                time.sleep(0.1)
        with pytest.raises(httpx.HTTPError):
            httpx.get(server.url + "/healthz", verify=context("alice"), timeout=10)
        log = server.log_path.read_text()
        loaded = [line for line in log.splitlines() if "tls certificate" in line and '"client_cas": 1' in line]
        assert len(loaded) >= 2 and str(tmp_path / "clients.crt") in loaded[0], log[-3000:]
        assert "Traceback" not in log and "BEGIN" not in log
    finally:
        server.stop()

def _broken_cert(tmp_path: Path) -> dict[str, str]:
    write_pair(tmp_path / "tls.crt", tmp_path / "tls.key", serial=1)
    (tmp_path / "tls.crt").write_text("not a certificate\n")
    return tls_env(tmp_path)


def _other_key(tmp_path: Path) -> dict[str, str]:
    write_pair(tmp_path / "tls.crt", tmp_path / "other.key", serial=1)
    write_pair(tmp_path / "unused.crt", tmp_path / "tls.key", serial=2)
    return tls_env(tmp_path)


def _missing_key(tmp_path: Path) -> dict[str, str]:
    write_pair(tmp_path / "tls.crt", None, serial=1)
    return tls_env(tmp_path)


def _cert_alone(tmp_path: Path) -> dict[str, str]:
    write_pair(tmp_path / "tls.crt", tmp_path / "tls.key", serial=1)
    return {"FACE_TLS_CERT_FILE": str(tmp_path / "tls.crt")}


def _client_ca_not_pem(tmp_path: Path) -> dict[str, str]:
    write_pair(tmp_path / "tls.crt", tmp_path / "tls.key", serial=1)
    (tmp_path / "clients.crt").write_text("not a certificate\n")
    return tls_env(tmp_path, FACE_TLS_CLIENT_CA_FILE=str(tmp_path / "clients.crt"))


def _client_ca_no_authority(tmp_path: Path) -> dict[str, str]:  # a client's own certificate, not an authority
    write_pair(tmp_path / "tls.crt", tmp_path / "tls.key", serial=1)
    write_client(tmp_path / "clients.crt", tmp_path / "client.key", None)
    return tls_env(tmp_path, FACE_TLS_CLIENT_CA_FILE=str(tmp_path / "clients.crt"))


def _client_ca_without_https(tmp_path: Path) -> dict[str, str]:
    write_ca(tmp_path / "clients.crt")
    return {"FACE_TLS_CLIENT_CA_FILE": str(tmp_path / "clients.crt")}


@pytest.mark.parametrize(("make", "code", "says"), [
    (_broken_cert, 3, "not a PEM certificate chain"),
    (_other_key, 3, "the key does not belong to the certificate"),
    (_missing_key, 3, "does not exist"),
    (_cert_alone, 1, "needs both FACE_TLS_CERT_FILE and FACE_TLS_KEY_FILE"),
    (_client_ca_not_pem, 3, "FACE_TLS_CLIENT_CA_FILE"),
    (_client_ca_no_authority, 3, "no certificate authority in it"),
    (_client_ca_without_https, 1, "FACE_TLS_CLIENT_CA_FILE (client certificates) needs HTTPS"),
], ids=["not-pem", "other-key", "missing-key", "cert-alone", "client-ca-not-pem", "client-ca-no-authority",
        "client-ca-without-https"])
def test_tls_files_the_service_cannot_use_stop_it_in_one_line(tmp_path, default_model, make, code, says):
    env = {**os.environ, **make(tmp_path)}
    data_dir = tmp_path / "data"
    proc = subprocess.run([sys.executable, "-m", "service", "--port", "0", "--data-dir", str(data_dir),
                           "--model", str(default_model)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    if code == 3:
        refusal = [line for line in proc.stderr.splitlines() if "could not start" in line]
        assert len(refusal) == 1 and "FACE_TLS" in refusal[0], proc.stderr[-2000:]
    assert "BEGIN" not in proc.stderr  # no PEM is ever printed
    assert not data_dir.exists()  # refused before anything was opened or made


@pytest.mark.parametrize("scheme", ["https", "http"])
def test_the_consistency_cookie_is_secure_over_https(scheme):
    """The read-your-writes cookie (with standbys) carries ``Secure`` when the request came over HTTPS,
    so a browser never sends it over plain HTTP; over HTTP it cannot (the browser would drop it)."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from service.http.middleware import ConsistencyMiddleware

    app = ConsistencyMiddleware(Starlette(routes=[Route("/", lambda request: PlainTextResponse("ok"))]))
    answer = TestClient(app, base_url=f"{scheme}://testserver").get("/", headers={"Face-Consistency-Token": "0/16B3748"})
    cookie = answer.headers["set-cookie"]
    assert "face_consistency_token=" in cookie and "HttpOnly" in cookie
    assert ("Secure" in cookie) == (scheme == "https")
