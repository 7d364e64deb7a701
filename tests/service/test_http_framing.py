"""How the server frames a connection's requests, over raw sockets to the real server: what a request
declares is what it is (a body is never run as a request), every request's headers are held to the
header limit and deadline wherever they fall (after an early answer, pipelined behind a request in
flight, as a chunked body's trailer), answers go out in order and whole (a refusal waits for the
answers before it; the body deadline never blames a client for the server's own pause), and a request
names one host."""

from __future__ import annotations

import json
import re
import socket
import time

import httpx
import pytest

from tests.conftest import b64, face_files, metric
from tests.server import ServerProcess

HEADER_S, BODY_S = 3.0, 1.0  # FACE_HTTP_HEADER_TIMEOUT_S, FACE_HTTP_BODY_TIMEOUT_S of this module's server
MAX_HEADER_BYTES = 8192
HOST = b"Host: 127.0.0.1\r\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_model):
    proc = ServerProcess(tmp_path_factory.mktemp("http-framing") / "data", model=default_model,
                         env={"FACE_HTTP_HEADER_TIMEOUT_S": str(HEADER_S), "FACE_HTTP_BODY_TIMEOUT_S": str(BODY_S),
                              "FACE_HTTP_MAX_HEADER_BYTES": str(MAX_HEADER_BYTES)})
    proc.wait_ready()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def slow(server) -> bytes:
    """A whole request that takes the server a while to answer (an /embed of 48 photos: about a second
    here), for what a client sends behind it."""
    files = face_files("George_W_Bush") + face_files("Colin_Powell")
    body = json.dumps({"images": [b64(files[i % len(files)]) for i in range(48)]}).encode()
    return (b"POST /embed HTTP/1.1\r\n" + HOST + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % len(body) + body)


def connect(server: ServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=30)


def read_to_close(sock: socket.socket, within_s: float = 30) -> bytes:
    """What the server sends until it closes the connection (a reset ends it too)."""
    sock.settimeout(within_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def answers(data: bytes) -> list[tuple[int, dict, bytes]]:
    """The responses in ``data``, in order: status, headers, body (framed by their Content-Length)."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, data[:300]
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        length = int(headers.get("content-length", 0))
        out.append((int(lines[0].split()[1]), headers, rest[:length]))
        data = rest[length:]
    return out


def code(body: bytes) -> str:
    return json.loads(body)["error"]["code"]


def closed_metric(server: ServerProcess, reason: str) -> float:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        return metric(client, f'face_http_connections_closed_total{{reason="{reason}"}}')


def test_an_upgrade_request_with_a_body_is_refused_and_its_body_never_runs_as_a_request(server):
    """A request asking to switch protocols (Connection: Upgrade) was taken by the parser to have no body,
    whatever its Content-Length, and the body was parsed as the next request: a proxy in front that
    forwards Upgrade (as websocket set-ups do) frames it as the POST's body, the server ran it as a
    request of its own (request smuggling). Refused now; one without a body is answered as a plain
    request, and nothing after it is parsed."""
    inner = b"GET /healthz HTTP/1.1\r\n" + HOST + b"X-Request-ID: smuggled\r\n\r\n"
    head = (b"POST /embed HTTP/1.1\r\n" + HOST + b"Connection: Upgrade\r\nUpgrade: h2c\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(inner))
    for together in (False, True):
        with connect(server) as sock:
            sock.sendall(head + inner if together else head)
            if not together:
                time.sleep(0.3)
                sock.sendall(inner)
            got = answers(read_to_close(sock))
        assert [(status, code(body)) for status, _, body in got] == [(422, "invalid_request")], got
        assert got[0][1]["connection"] == "close"
    with connect(server) as sock:  # curl --http2 over http:// asks so: a plain answer, then the connection closes
        sock.sendall(b"GET /healthz HTTP/1.1\r\n" + HOST + b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                     b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n" + inner)
        got = answers(read_to_close(sock))
    assert [(status, headers.get("x-request-id")) for status, headers, _ in got] == [(200, got[0][1]["x-request-id"])]
    assert got[0][1]["x-request-id"] != "smuggled" and got[0][1]["connection"] == "close"


def test_after_an_early_answer_the_next_requests_headers_have_their_limit_and_deadline(server):
    """A request answered before its body came (a 404) left the parser's end of it unseen by the header
    limit and deadline: the next request's headers were then read without either (a 5 MB header was
    kept and served; headers trickled for ever kept the connection)."""
    early = b"POST /no-such-route HTTP/1.1\r\n" + HOST + b"Content-Length: 10\r\n\r\n"
    big = b"GET /healthz HTTP/1.1\r\n" + HOST + b"X-Big: " + b"a" * (4 * MAX_HEADER_BYTES) + b"\r\n\r\n"
    with connect(server) as sock:
        sock.sendall(early)
        time.sleep(0.3)  # (answered before the body comes)
        sock.sendall(b"0123456789")
        time.sleep(0.3)  # (the header bytes in the read that ends a body are not counted: at most one read)
        sock.sendall(big)
        got = answers(read_to_close(sock))
    assert [(status, code(body)) for status, _, body in got] == [(404, "not_found"), (431, "headers_too_large")]
    before = closed_metric(server, "headers")
    with connect(server) as sock:
        sock.sendall(early)
        time.sleep(0.3)
        sock.sendall(b"0123456789GET /healthz HTTP/1.1\r\n")
        started, cut = time.monotonic(), False
        while time.monotonic() - started < 4 * HEADER_S:  # a header byte every 100 ms: never a whole request
            time.sleep(0.1)
            try:
                sock.sendall(b"X")
            except OSError:
                cut = True
                break
        assert cut, "headers trickled after an early answer kept the connection past the header deadline"
    assert closed_metric(server, "headers") - before == 1


def test_headers_over_the_limit_behind_a_request_in_flight_get_431_after_its_answer(server, slow):
    """Headers that arrived while a request was being answered (pipelined behind it) were not counted:
    any size was read and kept. They get their 431 after the answer before them, in order."""
    with connect(server) as sock:
        sock.sendall(slow + b"GET /healthz HTTP/1.1\r\n" + HOST)
        sock.setblocking(False)
        sent, started = 0, time.monotonic()
        while sent < 64 * MAX_HEADER_BYTES and time.monotonic() - started < 20:  # until the server stops reading
            try:
                sent += sock.send(b"X-Big: " + b"a" * 4096 + b"\r\n")
            except BlockingIOError:
                time.sleep(0.01)
        sock.setblocking(True)
        try:
            sock.sendall(b"\r\n")
        except OSError:
            pass
        got = answers(read_to_close(sock))
    assert [status for status, _, _ in got] == [200, 431], got
    assert len(json.loads(got[0][2])["embeddings"]) == 48 and code(got[1][2]) == "headers_too_large"


def test_a_trailer_over_the_header_limit_ends_the_connection(server):
    """A chunked body's trailer fields were read and kept at any size, and joined byte by byte (a 20 MB
    one held the event loop: every other client waited seconds). The framing of a body after its last
    body byte is held to the header limit: past it the connection is closed."""
    before = closed_metric(server, "headers_too_large")
    with connect(server) as sock:
        sock.sendall(b"POST /embed HTTP/1.1\r\n" + HOST + b"Content-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nX-Trailer: ")
        cut = False
        for _ in range(64):
            try:
                sock.sendall(b"a" * 65536)
            except OSError:
                cut = True
                break
        assert cut or read_to_close(sock, 10) == b""
    assert closed_metric(server, "headers_too_large") - before == 1
    assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200


def test_a_pipelined_body_behind_a_request_in_flight_is_not_cut_for_the_servers_pause(server, slow):
    """The server stops reading a connection while it answers the request before (pipelining): the body
    deadline ran on, closed the connection, and lost the answer to the first request, which had arrived
    whole (counted as a client's stalled body)."""
    rest = b"x" * 2_000_000
    before = closed_metric(server, "body")
    with connect(server) as sock:
        sock.sendall(slow + b"POST /no-such-route HTTP/1.1\r\n" + HOST + b"Content-Length: %d\r\n\r\n" % len(rest)
                     + rest + b"GET /healthz HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n")
        got = answers(read_to_close(sock))
    assert [status for status, _, _ in got] == [200, 404, 200], got
    assert closed_metric(server, "body") == before


def test_a_request_names_one_host_and_an_absolute_target_names_it(server):
    """Two Host headers were read as the last one by the host check (FACE_ALLOWED_HOSTS) and as the first
    by the rest; a target in absolute form (``http://host/path``) names the request's host, whatever
    Host says (RFC 9112), and was not checked."""
    for hosts in ((b"evil.example", b"127.0.0.1"), (b"127.0.0.1", b"evil.example")):
        with connect(server) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: %s\r\nHost: %s\r\n\r\n" % hosts)
            got = answers(read_to_close(sock))
        assert [(status, code(body)) for status, _, body in got] == [(422, "invalid_request")], got
    with connect(server) as sock:
        sock.sendall(b"GET http://evil.example/healthz HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n")
        got = answers(read_to_close(sock))
    assert [(status, code(body)) for status, _, body in got] == [(421, "host_not_allowed")], got
    with connect(server) as sock:
        sock.sendall(b"GET http://127.0.0.1/healthz HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n")
        assert [status for status, _, _ in answers(read_to_close(sock))] == [200]


def test_a_malformed_request_behind_one_in_flight_is_refused_after_its_answer(server, slow):
    """The parser's refusal of a malformed request (here a Content-Length given twice, a smuggling
    attempt) was written at once, into the answer in progress, and the connection closed: the request
    before it lost its answer. It is answered in order, coded, then the connection closes."""
    with connect(server) as sock:
        sock.sendall(slow + b"POST /embed HTTP/1.1\r\n" + HOST + b"Content-Length: 2\r\nContent-Length: 40\r\n\r\n{}")
        got = answers(read_to_close(sock))
    assert [status for status, _, _ in got] == [200, 422], got
    assert code(got[1][2]) == "invalid_request" and re.search("malformed HTTP request", got[1][2].decode())


def test_a_malformed_chunk_in_the_body_being_read_is_answered_at_once(server):
    """A chunked body the parser refuses while its request is being handled (a chunk size that is no
    number) was held for an answer of its own that never came (its handler waited for the rest of the
    body): no answer until the body deadline cut the connection, counted as a stalled body."""
    with connect(server) as sock:
        sock.sendall(b"POST /embed HTTP/1.1\r\n" + HOST + b"Content-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"ima\r\n")
        time.sleep(0.3)  # (its handler is reading the body)
        sock.sendall(b"ZZ\r\n")
        started = time.monotonic()
        got = answers(read_to_close(sock))
        waited = time.monotonic() - started
    assert [(status, code(body)) for status, _, body in got] == [(422, "invalid_request")], got
    assert waited < BODY_S + HEADER_S, waited  # (not at the end of a drain: the answer ends the connection)


def test_a_trailer_adds_no_header_to_its_request(server):
    """A chunked body's trailer fields were appended to the request's headers after the host check had
    run: a trailer `Host: 127.0.0.1` behind `Host: evil.example` got past FACE_ALLOWED_HOSTS (the check read
    the last Host, the app the first), and any header (Origin, an API key) could be added so. Trailer
    fields are read and dropped."""
    with connect(server) as sock:
        sock.sendall(b"POST /embed HTTP/1.1\r\nHost: evil.example\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nHost: 127.0.0.1\r\n\r\n")
        got = answers(read_to_close(sock))
    assert [(status, code(body)) for status, _, body in got] == [(421, "host_not_allowed")], got


def test_a_body_sent_in_tiny_chunks_is_not_taken_for_an_endless_trailer(server):
    """A valid chunked upload in 1-byte chunks (framing five times its body) was cut as headers_too_large
    once a read held more framing than the header limit: every read's framing was counted, not only that
    of reads without a body byte."""
    body = json.dumps({"images": [b64(path) for path in face_files("Tony_Blair")[:2]]}).encode()
    chunked = b"".join(b"1\r\n%s\r\n" % body[i:i + 1] for i in range(len(body))) + b"0\r\n\r\n"
    with connect(server) as sock:
        sock.sendall(b"POST /embed HTTP/1.1\r\n" + HOST + b"Content-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        time.sleep(0.3)  # (its handler is reading the body)
        for start in range(0, len(chunked), 4 * MAX_HEADER_BYTES):  # (each part arrives as a read or more)
            sock.sendall(chunked[start:start + 4 * MAX_HEADER_BYTES])
            time.sleep(0.05)
        got = answers(read_to_close(sock))
    assert [status for status, _, _ in got] == [200], got
    assert len(json.loads(got[0][2])["embeddings"]) == 2


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_a_blank_line_split_across_reads_ends_its_headers(server, cut):
    """Headers whose blank line was split across two reads, the first of which also ended the request
    before, were taken to go on into the body: its bytes were counted as header bytes (a false 431)."""
    rest = b"x" * (4 * MAX_HEADER_BYTES)
    second = b"POST /no-such-route HTTP/1.1\r\n" + HOST + b"Content-Length: %d\r\n\r\n" % len(rest)
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n" + HOST + b"\r\n" + second[:-cut])
        time.sleep(0.3)
        sock.sendall(second[-cut:] + rest + b"GET /healthz HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n")
        got = answers(read_to_close(sock))
    assert [status for status, _, _ in got] == [200, 404, 200], got


def test_a_client_that_leaves_before_its_body_came_is_no_server_error(server):
    """A client that went away in the middle of its body (or was cut at the body deadline) was logged as
    the server's own failure: an ERROR "unhandled error" with a ClientDisconnect traceback, and a 500 in
    the access log and on /metrics, which error-rate alerts count. It is answered 499 (nobody reads it:
    "client closed request", as nginx logs it), logged at info."""
    def embed_answers(status: int) -> float:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            return metric(client, f'face_http_requests_total{{method="POST",route="/embed",status="{status}"}}')

    before = embed_answers(500), embed_answers(499), server.log_path.read_text(errors="replace").count("Traceback")
    for stall in (False, True):  # the client closes mid-body; the client stalls past the body deadline
        with connect(server) as sock:
            sock.sendall(b"POST /embed HTTP/1.1\r\n" + HOST + b"Content-Type: application/json\r\n"
                         b"Content-Length: 100000\r\n\r\n{\"images\": [")
            time.sleep(BODY_S + 1 if stall else 0.3)
    deadline = time.monotonic() + 10
    while embed_answers(499) - before[1] < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    after = embed_answers(500), embed_answers(499), server.log_path.read_text(errors="replace").count("Traceback")
    assert (after[0] - before[0], after[1] - before[1], after[2] - before[2]) == (0, 2, 0)


def refused_counts(server: ServerProcess) -> tuple[float, float]:
    """(invalid_request errors counted, /embed answers counted 499)."""
    with httpx.Client(base_url=server.url, timeout=10) as client:
        return (metric(client, 'face_errors_total{code="invalid_request"}'),
                metric(client, 'face_http_requests_total{method="POST",route="/embed",status="499"}'))


def test_a_refused_request_behind_one_being_handled_leaves_its_answer_alone(server, slow):
    """A request refused at its headers (two Hosts; an Upgrade with a body) behind one being handled took
    that one for the request whose body was malformed: its handler was cancelled (an enroll abandoned half
    way) and the refusal sent in place of its answer."""
    for refused in (b"GET /healthz HTTP/1.1\r\n" + HOST + HOST + b"\r\n",
                    b"POST /embed HTTP/1.1\r\n" + HOST + b"Connection: Upgrade\r\nUpgrade: h2c\r\n"
                    b"Content-Length: 2\r\n\r\n{}"):
        with connect(server) as sock:
            sock.sendall(slow)
            time.sleep(0.1)  # (its handler is running)
            sock.sendall(refused)
            got = answers(read_to_close(sock))
        assert [status for status, _, _ in got] == [200, 422], got
        assert len(json.loads(got[0][2])["embeddings"]) == 48


def test_a_malformed_chunk_of_a_queued_request_is_answered_in_its_turn(server, slow):
    """A malformed chunk in the body of a request pipelined behind another: its handler was started once
    the one before was answered, waited for a body that would never be parsed, and the client got no
    answer until the body deadline cut the connection. It is answered 422 in its turn, at once. Each is
    counted as the connection's refusal (reason invalid); the one whose handler ran (the body being read)
    as its invalid_request too, not as a 499 (the client did not go)."""
    before, closed = refused_counts(server), closed_metric(server, "invalid")
    with connect(server) as sock:
        sock.sendall(slow + b"POST /embed HTTP/1.1\r\n" + HOST + b"Content-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"ima\r\nZZ\r\n")
        got = answers(read_to_close(sock))  # (before: the 200, then cut at the body deadline)
    assert [(status, code(body) if status != 200 else "") for status, _, body in got] == \
        [(200, ""), (422, "invalid_request")], got
    with connect(server) as sock:  # the body being read: answered at once, counted as what it was
        sock.sendall(b"POST /embed HTTP/1.1\r\n" + HOST + b"Content-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"ima\r\n")
        time.sleep(0.3)
        sock.sendall(b"ZZ\r\n")
        assert [status for status, _, _ in answers(read_to_close(sock))] == [422]
    deadline = time.monotonic() + 10
    while refused_counts(server)[0] - before[0] < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    after = refused_counts(server)
    assert (after[0] - before[0], after[1] - before[1], closed_metric(server, "invalid") - closed) == (1, 0, 2)


def test_a_multipart_upload_cut_short_is_a_499_not_a_bad_request(server):
    """A multipart body whose client went away was answered 422 invalid_request ("the multipart form
    cannot be read: ClientDisconnect") and counted as a client error: it is a 499, as a JSON body's is."""
    before = refused_counts(server)
    with connect(server) as sock:
        sock.sendall(b"POST /embed HTTP/1.1\r\n" + HOST + b"Content-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"images\"; "
                     b"filename=\"a.jpg\"\r\nContent-Type: image/jpeg\r\n\r\nxxxx")
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while refused_counts(server)[1] - before[1] < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    after = refused_counts(server)
    assert (after[0] - before[0], after[1] - before[1]) == (0, 1)


def test_a_client_pipelining_without_reading_its_answers_holds_a_bounded_memory(server):
    """Requests pipelined by a client that reads no answer were read and queued without bound: uvicorn
    resumed reading at each answer, and one connection took a gigabyte of the server's memory. Reading
    stays paused while requests are queued: the client's sends block instead."""
    def rss_mb() -> float:
        for line in open(f"/proc/{server.proc.pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    before = rss_mb()
    request = b"GET /healthz HTTP/1.1\r\n" + HOST + b"\r\n"
    with connect(server) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(0.5)
        sent, started = 0, time.monotonic()
        while sent < 64 * 1024 * 1024 and time.monotonic() - started < 8:
            try:
                sent += sock.send(request * 2048)
            except TimeoutError:
                pass
            except OSError:  # (cut off: it read no answer for the body's deadline)
                break
        grown = rss_mb() - before
    assert grown < 256, f"{grown:.0f} MB more after {sent >> 20} MB of pipelined requests"
    assert sent < 32 * 1024 * 1024, sent  # (the server stopped reading them)


def test_a_client_that_reads_no_answer_is_cut_off(server):
    """A client that pipelines requests with large answers and never reads them held its connection, the
    handler waiting to write and the requests queued behind it, for ever (file descriptors, as a slowloris
    on the answers' side): cut once no byte of an answer could be written for the body's deadline."""
    before = closed_metric(server, "write")
    with connect(server) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall((b"GET /openapi.json HTTP/1.1\r\n" + HOST + b"\r\n") * 50)
        deadline = time.monotonic() + BODY_S + 3 * HEADER_S + 10
        while closed_metric(server, "write") == before and time.monotonic() < deadline:
            time.sleep(0.2)
    assert closed_metric(server, "write") - before == 1


@pytest.fixture(scope="module")
def patient(tmp_path_factory, default_model):
    """A server whose body deadline is longer than uvicorn's keep-alive timer (5 s)."""
    proc = ServerProcess(tmp_path_factory.mktemp("http-framing-patient") / "data", model=default_model,
                         env={"FACE_HTTP_HEADER_TIMEOUT_S": "20", "FACE_HTTP_BODY_TIMEOUT_S": "10"})
    proc.wait_ready()
    yield proc
    proc.stop()


def test_the_rest_of_an_answered_body_has_the_body_deadline_not_the_keep_alive_timer(patient):
    """After an early answer (a 404 before the body came), uvicorn's keep-alive timer (5 s) closed the
    connection while the rest of the body was still to come within the body's deadline (10 s here): the
    next request on the connection was lost."""
    with connect(patient) as sock:
        sock.sendall(b"POST /no-such-route HTTP/1.1\r\n" + HOST + b"Content-Length: 200\r\n\r\n" + b"x" * 100)
        time.sleep(6)
        sock.sendall(b"x" * 100 + b"GET /healthz HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n")
        got = answers(read_to_close(sock))
    assert [status for status, _, _ in got] == [404, 200], got
