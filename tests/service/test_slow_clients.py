"""Clients that never finish asking, over real sockets to the real server: connections that send no
request, or trickle their headers (slowloris), are closed at FACE_HTTP_HEADER_TIMEOUT_S while everyone
else is served; a body that stalls for FACE_HTTP_BODY_TIMEOUT_S has its connection closed; each is
counted on /metrics; a slow but steady body, and a kept-alive connection used within the deadline, are
not cut."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from tests.conftest import b64, face_files, metric
from tests.server import ServerProcess

DEADLINE_S = 1.0
MAX_HEADER_BYTES = 8192


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_model):
    proc = ServerProcess(tmp_path_factory.mktemp("slow-clients") / "data", model=default_model,
                         env={"FACE_HTTP_HEADER_TIMEOUT_S": str(DEADLINE_S), "FACE_HTTP_BODY_TIMEOUT_S": str(DEADLINE_S),
                              "FACE_HTTP_MAX_HEADER_BYTES": str(MAX_HEADER_BYTES)})
    proc.wait_ready()
    yield proc
    proc.stop()


def connect(server: ServerProcess, first: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    if first:
        sock.sendall(first)
    return sock


def closed_by_server(sock: socket.socket, within_s: float) -> bool:
    """Whether the server closes ``sock`` within ``within_s`` (reading and dropping what it sends)."""
    sock.settimeout(within_s)
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"closed before a response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(4096)
        assert chunk
        body += chunk
    return int(lines[0].split()[1]), headers, body


def closed(server: ServerProcess, reason: str) -> float:
    with httpx.Client(base_url=server.url, timeout=5) as client:
        return metric(client, f'face_http_connections_closed_total{{reason="{reason}"}}')


def test_connections_that_never_finish_their_headers_are_closed_while_others_are_served(server):
    before = closed(server, "headers"), closed(server, "idle")
    partial = [connect(server, b"POST /embed HTTP/1.1\r\nHost: 127.0.0.1\r\n") for _ in range(50)]
    silent = connect(server)
    trickler = connect(server)
    opened = time.monotonic()
    assert not closed_by_server(silent, DEADLINE_S / 3)  # open before the deadline
    # a byte every 0.1 s never lets the connection go idle: it is the headers' deadline that closes it
    closed_after = None
    for byte in b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100:
        try:
            trickler.sendall(bytes([byte]))
        except OSError:
            closed_after = time.monotonic() - opened
            break
        if closed_by_server(trickler, 0.1):
            closed_after = time.monotonic() - opened
            break
        assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200  # everyone else is served
    assert closed_after is not None and DEADLINE_S * 0.9 <= closed_after < DEADLINE_S + 2, closed_after
    assert all(closed_by_server(sock, 3) for sock in [*partial, silent])
    for sock in [*partial, silent, trickler]:
        sock.close()
    assert httpx.get(server.url + "/readyz", timeout=5).status_code == 200
    # counted on /metrics, what an operator alerts on: 51 with part of their headers, one that sent nothing
    assert (closed(server, "headers") - before[0], closed(server, "idle") - before[1]) == (51, 1)


def test_a_stalled_body_has_its_connection_closed(server):
    before = closed(server, "body")
    sock = connect(server, b"POST /embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 1000\r\n\r\n{\"images\": [")
    started = time.monotonic()
    sock.settimeout(DEADLINE_S + 2)
    try:
        answer = sock.recv(4096)
    except ConnectionResetError:
        answer = b""
    waited = time.monotonic() - started
    assert answer == b"" and DEADLINE_S * 0.9 <= waited < DEADLINE_S + 2, (answer[:200], waited)
    sock.close()
    assert httpx.get(server.url + "/readyz", timeout=5).status_code == 200
    assert closed(server, "body") - before == 1


def test_a_slow_steady_body_and_a_kept_alive_connection_are_served(server):
    # the body in four parts, each within the body's deadline, the whole past both deadlines: the
    # request is read and answered (the headers' deadline does not cut a request whose headers are in)
    body = json.dumps({"images": [b64(face_files("Colin_Powell")[0])]}).encode()
    head = (f"POST /embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    headers = closed(server, "headers")
    sock = connect(server, head)
    quarter = len(body) // 4 + 1
    for i in range(4):
        time.sleep(DEADLINE_S * 0.5)
        sock.sendall(body[i * quarter:(i + 1) * quarter])
    status, _, answer = read_response(sock)
    assert status == 200 and len(json.loads(answer)["embeddings"]) == 1
    # the same connection, a request every half deadline for three deadlines: never closed
    for _ in range(6):
        time.sleep(DEADLINE_S * 0.5)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert read_response(sock)[0] == 200
    # and once idle past the deadline it is closed (uvicorn's keep-alive timeout, 5 s, comes later)
    idle = closed(server, "idle")
    assert closed_by_server(sock, DEADLINE_S + 2)
    sock.close()
    assert closed(server, "idle") - idle == 1 and closed(server, "headers") == headers


def test_headers_over_the_limit_get_431_and_the_connection_closed(server):
    """uvicorn's httptools parser takes headers of any size (a 1 MB header value, 10,000 headers were
    read and kept): a client could hold megabytes a connection for the headers' whole deadline. Past
    FACE_HTTP_MAX_HEADER_BYTES the request is answered 431 ``headers_too_large`` and its connection closed,
    however the bytes arrive; headers under the limit, followed by a body of any size, are served."""
    big_value = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES + 1) + b"\r\n\r\n"
    many = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(2000)) + b"\r\n"
    endless = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Endless: "  # never ends: refused at the limit
    before = closed(server, "headers_too_large")
    for request in (big_value, many, endless + b"a" * (4 * MAX_HEADER_BYTES)):
        sock = connect(server)
        for start in range(0, len(request), 1000):  # in pieces, as a slow client sends them
            try:
                sock.sendall(request[start:start + 1000])
            except OSError:
                break
        status, headers, body = read_response(sock)
        assert status == 431 and json.loads(body)["error"]["code"] == "headers_too_large", (status, body[:200])
        assert headers.get("connection") == "close"
        assert closed_by_server(sock, 2)
        sock.close()
    # just under the limit, then a body of 40 times the limit in the same packets: served
    pad = MAX_HEADER_BYTES - 400
    body = json.dumps({"images": [b64(face_files("Colin_Powell")[0])], "pad": "x" * (40 * MAX_HEADER_BYTES)}).encode()
    head = (f"POST /embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nX-Pad: {'p' * pad}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    sock = connect(server, head + body)
    status, _, answer = read_response(sock)
    assert status == 422 and json.loads(answer)["error"]["code"] == "invalid_request", answer[:200]  # (pad: no such field)
    sock.close()
    assert httpx.get(server.url + "/readyz", timeout=5).status_code == 200
    # in parts that arrive apart: over the limit across parts is refused; under it, with the blank line
    # that ends the headers split across two parts and a body after it, served
    sock = connect(server)
    refused = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Part: " + b"b" * (MAX_HEADER_BYTES // 2) + b"\r\n"
    for part in (refused, b"X-More: " + b"c" * (MAX_HEADER_BYTES // 2) + b"\r\n", b"\r\n"):
        try:
            sock.sendall(part)
        except OSError:
            break
        time.sleep(0.05)
    assert read_response(sock)[0] == 431
    sock.close()
    body = json.dumps({"images": [b64(face_files("Colin_Powell")[0])]}).encode()
    head = (f"POST /embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nX-Pad: {'q' * pad}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    sock = connect(server)
    for part in (head[:-3], head[-3:-1], head[-1:] + body[:10], body[10:]):
        sock.sendall(part)
        time.sleep(0.05)
    status, _, answer = read_response(sock)
    assert status == 200 and len(json.loads(answer)["embeddings"]) == 1, answer[:200]
    sock.close()
    assert closed(server, "headers_too_large") - before == 4
