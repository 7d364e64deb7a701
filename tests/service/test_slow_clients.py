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


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_model):
    proc = ServerProcess(tmp_path_factory.mktemp("slow-clients") / "data", model=default_model,
                         env={"FACE_HTTP_HEADER_TIMEOUT_S": str(DEADLINE_S), "FACE_HTTP_BODY_TIMEOUT_S": str(DEADLINE_S)})
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


def timed_out(server: ServerProcess, part: str) -> float:
    with httpx.Client(base_url=server.url, timeout=5) as client:
        return metric(client, f'face_http_connections_timed_out_total{{part="{part}"}}')


def test_connections_that_never_finish_their_headers_are_closed_while_others_are_served(server):
    before = timed_out(server, "headers"), timed_out(server, "idle")
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
    assert (timed_out(server, "headers") - before[0], timed_out(server, "idle") - before[1]) == (51, 1)


def test_a_stalled_body_has_its_connection_closed(server):
    before = timed_out(server, "body")
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
    assert timed_out(server, "body") - before == 1


def test_a_slow_steady_body_and_a_kept_alive_connection_are_served(server):
    # the body in four parts, each within the body's deadline, the whole past both deadlines: the
    # request is read and answered (the headers' deadline does not cut a request whose headers are in)
    body = json.dumps({"images": [b64(face_files("Colin_Powell")[0])]}).encode()
    head = (f"POST /embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    headers = timed_out(server, "headers")
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
    idle = timed_out(server, "idle")
    assert closed_by_server(sock, DEADLINE_S + 2)
    sock.close()
    assert timed_out(server, "idle") - idle == 1 and timed_out(server, "headers") == headers
