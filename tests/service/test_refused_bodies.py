"""A body over FACE_MAX_REQUEST_BYTES, over real sockets to the real server: its client reads the 413
``payload_too_large``, not a connection reset, however it sends (Content-Length or chunked, the body
written whole before the answer is read, as http.client and many SDKs do). The server answered and
closed the connection with the rest of the body unread; closing a socket with unread data makes the
kernel answer with a reset (RST), so the client's next write failed (EPIPE / ECONNRESET) and a client
that reads only once it has sent everything never saw the answer (on a real network the reset may even
drop the answer itself). Now the connection, once answered, reads and drops what still comes for a
while, bounded in bytes and in time: a client sending without end, or trickling, is still cut off."""

from __future__ import annotations

import http.client
import json
import socket
import time

import httpx
import pytest

from service.http.connections import DRAIN_MAX_BYTES
from tests.conftest import metric
from tests.server import ServerProcess

LIMIT = 2 * 1024 * 1024
HEADER_S, BODY_S = 3.0, 1.5  # FACE_HTTP_HEADER_TIMEOUT_S, FACE_HTTP_BODY_TIMEOUT_S of this module's server
BODY = b"x" * (64 * 1024 * 1024)
PIECE = 1024 * 1024
ROUNDS = 3  # a reset is a matter of timing: each way of sending is tried a few times


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_model):
    proc = ServerProcess(tmp_path_factory.mktemp("refused-bodies") / "data", model=default_model,
                         env={"FACE_MAX_REQUEST_BYTES": str(LIMIT), "FACE_HTTP_HEADER_TIMEOUT_S": str(HEADER_S),
                              "FACE_HTTP_BODY_TIMEOUT_S": str(BODY_S)})
    proc.wait_ready()
    yield proc
    proc.stop()


def head(chunked: bool, length: int = len(BODY)) -> bytes:
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % length
    return b"POST /embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" + framing + b"\r\n\r\n"


def pieces(chunked: bool):
    for start in range(0, len(BODY), PIECE):
        piece = BODY[start:start + PIECE]
        yield b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece
    if chunked:
        yield b"0\r\n\r\n"


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], dict]:
    """The response, read to the end of the connection (the server closes it after a 413)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head_part, _, body = data.partition(b"\r\n\r\n")
    lines = head_part.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_client_that_sends_its_whole_body_first_reads_the_413(server, chunked):
    for _ in range(ROUNDS):
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(head(chunked))
            for piece in pieces(chunked):
                sock.sendall(piece)  # never reset: the server drops what it does not read
            status, headers, answer = read_answer(sock)
        assert (status, answer["error"]["code"]) == (413, "payload_too_large"), answer
        assert headers["connection"] == "close"


def test_a_client_that_sends_too_many_header_bytes_reads_the_431(server):
    """The same for headers over FACE_HTTP_MAX_HEADER_BYTES (64 KiB), answered 431 as soon as they pass it."""
    big = head(False).replace(b"\r\n\r\n", b"\r\nX-Big: " + b"a" * (4 * PIECE) + b"\r\n\r\n")
    for _ in range(ROUNDS):
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(big)
            for piece in pieces(False):
                sock.sendall(piece)
            status, headers, answer = read_answer(sock)
        assert (status, answer["error"]["code"]) == (431, "headers_too_large"), answer
        assert headers["connection"] == "close"


def test_http_client_and_httpx_read_the_413(server):
    for _ in range(ROUNDS):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        try:
            conn.request("POST", "/embed", body=BODY, headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            assert (r.status, json.loads(r.read())["error"]["code"]) == (413, "payload_too_large")
        finally:
            conn.close()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        before = metric(client, 'face_errors_total{code="payload_too_large"}')
        for content in (BODY, pieces(False)):  # with its length, then streamed (chunked)
            r = client.post("/embed", content=content, headers={"content-type": "application/json"})
            assert (r.status_code, r.json()["error"]["code"]) == (413, "payload_too_large")
            assert r.headers["connection"] == "close"
        assert metric(client, 'face_errors_total{code="payload_too_large"}') - before == 2
        assert client.get("/readyz").status_code == 200


def test_the_rest_of_a_refused_body_is_read_only_so_far(server):
    """A client that keeps sending after its 413 is cut off once the server has dropped DRAIN_MAX_BYTES
    (a reset, as before), and can still read its answer, sent before."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(head(False, 1 << 40))  # a terabyte announced
    sent, cut = 0, False
    while sent < 4 * DRAIN_MAX_BYTES:
        try:
            sock.sendall(BODY[:4 * PIECE])
        except OSError:
            cut = True
            break
        sent += 4 * PIECE
    assert cut and sent <= DRAIN_MAX_BYTES + 64 * PIECE, sent  # (what the sockets' buffers hold aside)
    status, _, answer = read_answer(sock)
    assert (status, answer["error"]["code"]) == (413, "payload_too_large")
    sock.close()


@pytest.mark.parametrize("how", ["trickling", "stalled"])
def test_a_slow_or_stalled_sender_after_its_413_is_cut_off(server, how):
    """After its 413 a connection is read for at most the headers' deadline, and given up on once
    nothing came for the body's (or sooner): a client trickling the rest of a huge body, or sending no
    more of it, does not hold its connection. (The answer ends with the server's FIN: the connection is
    closed when a write gets a reset.)"""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(head(False) + BODY[:1000])
    status, _, answer = read_answer(sock)  # to the FIN that follows the answer
    assert (status, answer["error"]["code"]) == (413, "payload_too_large")
    started = time.monotonic()
    if how == "stalled":
        time.sleep(BODY_S + 0.5)  # sends nothing for longer than the drain waits for more
    ended = None
    while time.monotonic() - started < 3 * HEADER_S:
        time.sleep(0.1 if how == "trickling" else 0.02)
        try:
            sock.sendall(b"x" * 100)
        except OSError:
            ended = time.monotonic() - started
            break
    if how == "trickling":  # read while it kept coming, until the drain's time (the headers' deadline) was up
        assert ended is not None and HEADER_S * 0.8 < ended < HEADER_S + 1, ended
    else:  # given up on once it paused for the body's deadline, before the drain's time was up
        assert ended is not None and ended < BODY_S + 1, ended
    sock.close()
    assert httpx.get(server.url + "/readyz", timeout=5).status_code == 200


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("path", ["/no-such-route", "/healthz"], ids=["404", "405"])
def test_a_request_answered_before_its_body_keeps_its_connection_for_the_next(server, path, chunked):
    """A request answered before its body was read, without Connection: close (a 404 for an unknown
    route, a 405), keeps its connection: the rest of its body is read as its body and dropped, and the
    next request on the connection gets its own answer. The rest of the body was counted as the next
    request's header bytes: past 64 KiB a stray 431 headers_too_large followed the 404, and a keep-alive
    client read it as the answer to its next request."""
    body = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" + b"y" * PIECE  # (framed as a body, never a request)
    for _ in range(ROUNDS):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        try:
            conn.request("POST", path, body=iter([body[:1000], body[1000:]]) if chunked else body,
                         headers={"Content-Type": "application/octet-stream"}, encode_chunked=chunked)
            r = conn.getresponse()
            assert (r.status, r.getheader("connection")) == ((404 if path != "/healthz" else 405), None)
            r.read()
            conn.request("GET", "/readyz")
            r = conn.getresponse()
            assert (r.status, json.loads(r.read())["status"]) == (200, "ready")
        finally:
            conn.close()
