"""faceclient's retries of writes: a write that may have been stored is never sent again.

Against a real server on a real PostgreSQL behind harness.pgproxy (which loses one commit's answer, or
cuts a connection before its COMMIT), and against a stand-in HTTP server for the answers a real one
gives only by chance (a proxy's bare 503).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from faceclient import AsyncFaceClient, FaceClient, UnavailableError

from harness.pgproxy import PgFaultProxy
from harness.server import ServerProcess
from tests.clients.conftest import ADMIN, ENV
from tests.conftest import ENROLLED, face_files


@pytest.fixture
def behind_proxy(tmp_path, default_model, postgres) -> Iterator[tuple[ServerProcess, PgFaultProxy]]:
    proxy = PgFaultProxy(postgres.url)
    proc = ServerProcess(tmp_path / "data", model=default_model,
                         env={**ENV, "FACE_DATABASE_URL": proxy.url, "FACE_DATABASE_SCHEMA": postgres.fresh_schema(),
                              "FACE_DATABASE_TIMEOUT_S": "2"})
    try:
        proc.wait_ready()
        yield proc, proxy
    finally:
        proc.stop()
        proxy.close()


def test_an_enroll_whose_commit_answer_was_lost_is_stored_once(behind_proxy):
    """The reviewer's repro: the enroll's COMMIT reached PostgreSQL, its answer was lost; the server said 503
    database_unavailable and FaceClient sent the enroll again: "after one enroll of one image: 3 faces
    (expected 2)". Now the server says write_outcome_unknown, which the client raises at once (sync and
    async); the face is stored once. A connection cut before the COMMIT (nothing stored) is still
    database_unavailable, retried: the enroll succeeds, its face stored once."""
    proc, proxy = behind_proxy
    faces = face_files(ENROLLED[0])
    with FaceClient(proc.url, ADMIN, backoff_s=0.05) as face:
        face.enroll("colin", faces[0])
        proxy.arm("lost_commit_reply", b"INSERT INTO faces")
        raised: UnavailableError | None = None
        try:
            face.enroll("colin", faces[1])
        except UnavailableError as exc:
            raised = exc
        assert proxy.fired.is_set()
        assert face.get_identity("colin").face_count == 2  # 3 before: the enroll was sent again
        assert raised is not None and (raised.code, raised.status, raised.retry_after) == (
            "write_outcome_unknown", 503, None)

        proxy.arm("before_commit", b"INSERT INTO faces")
        assert face.enroll("colin", faces[2]).face_count == 3  # its first try was rolled back
        assert proxy.fired.is_set()
        assert face.get_identity("colin").face_count == 3

    others = face_files(ENROLLED[1])

    async def main() -> None:
        async with AsyncFaceClient(proc.url, ADMIN, backoff_s=0.05) as aface:
            await aface.enroll("ana", others[0])
            proxy.arm("lost_commit_reply", b"INSERT INTO faces")
            with pytest.raises(UnavailableError) as e:
                await aface.enroll("ana", others[1])
            assert e.value.code == "write_outcome_unknown"
            assert (await aface.get_identity("ana")).face_count == 2

    asyncio.run(main())


def test_a_collection_whose_creation_answer_was_lost_is_not_created_again(behind_proxy):
    """create_collection sent again after a lost commit answer was 409 collection_exists, hiding that the
    first one had been made."""
    proc, proxy = behind_proxy
    with FaceClient(proc.url, ADMIN, backoff_s=0.05) as face:
        proxy.arm("lost_commit_reply", b"INSERT INTO collections")
        with pytest.raises(UnavailableError) as e:
            face.create_collection("made")
        assert e.value.code == "write_outcome_unknown"
        assert face.get_collection("made").name == "made"


# --- which answers are retried for which calls ------------------------------------------------------------
Answer = tuple[int, dict[str, str], bytes]


@contextmanager
def stand_in(answer: Callable[[str, str], Answer]) -> Iterator[tuple[str, list[str]]]:
    """An HTTP server that answers each request ``answer(method, path)``; yields its URL and the requests
    it was sent ("METHOD path")."""
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _answer(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            asked.append(f"{self.command} {self.path}")
            status, headers, body = answer(self.command, self.path)
            self.send_response(status)
            for name, value in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _answer  # noqa: N815 (http.server's names)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", asked
    finally:
        server.shutdown()
        server.server_close()


def error(code: str | None) -> Answer:
    if code is None:  # a proxy's own 503, which may have passed the request on before it failed
        return 503, {"Content-Type": "text/html"}, b"<html>503 Service Unavailable</html>"
    return 503, {"Content-Type": "application/json"}, json.dumps({"error": {"code": code, "message": "x"}}).encode()


WRITES: dict[str, Callable[[FaceClient], object]] = {  # calls that are not idempotent
    "enroll": lambda f: f.enroll("a", embeddings=[[0.1] * 4], model_id="m"),
    "merge": lambda f: f.merge_identities("a", "b"),
    "move": lambda f: f.move_face(1, "b"),
    "rename": lambda f: f.update_identity("a", rename_to="b"),
    "create_collection": lambda f: f.create_collection("c"),
    "create_key": lambda f: f.create_key("read"),
    "migrate": lambda f: f.migrate_collection("c", "m", "d"),
    "start_job": lambda f: f.start_duplicates_job(),
}
READS_AND_IDEMPOTENT: dict[str, Callable[[FaceClient], object]] = {
    "get": lambda f: f.get_identity("a"),
    "identify": lambda f: f.identify(embeddings=[[0.1] * 4]),
    "replace": lambda f: f.enroll("a", embeddings=[[0.1] * 4], model_id="m", replace=True),
    "metadata": lambda f: f.update_identity("a", metadata_patch={"k": 1}),
    "delete": lambda f: f.delete_identity("a"),
    "delete_faces": lambda f: f.delete_faces([1, 2]),
    "alias": lambda f: f.set_alias("x", "c"),
}


@pytest.mark.parametrize("code", ["write_outcome_unknown", None, "collection_damaged"])
@pytest.mark.parametrize("call", sorted(WRITES))
def test_a_write_is_sent_once_after_an_answer_that_does_not_say_nothing_ran(call, code):
    with stand_in(lambda method, path: error(code)) as (url, asked):
        with FaceClient(url, ADMIN, check_version=False, backoff_s=0.01, max_retries=3) as face:
            with pytest.raises(UnavailableError):
                WRITES[call](face)
    assert len(asked) == 1, asked


@pytest.mark.parametrize("code", ["database_unavailable", "overloaded", "model_not_ready", "gallery_loading",
                                  "gallery_unavailable"])
@pytest.mark.parametrize("call", sorted(WRITES))
def test_a_write_is_retried_after_an_answer_that_says_nothing_ran(call, code):
    with stand_in(lambda method, path: error(code)) as (url, asked):
        with FaceClient(url, ADMIN, check_version=False, backoff_s=0.01, max_retries=2) as face:
            with pytest.raises(UnavailableError):
                WRITES[call](face)
    assert len(asked) == 3, asked


@pytest.mark.parametrize("call", sorted(READS_AND_IDEMPOTENT))
def test_reads_and_idempotent_writes_retry_every_503_but_write_outcome_unknown(call):
    for code, sent in ((None, 3), ("database_unavailable", 3), ("write_outcome_unknown", 1)):
        with stand_in(lambda method, path: error(code)) as (url, asked):
            with FaceClient(url, ADMIN, check_version=False, backoff_s=0.01, max_retries=2) as face:
                with pytest.raises(UnavailableError):
                    READS_AND_IDEMPOTENT[call](face)
        assert len(asked) == sent, (code, asked)
