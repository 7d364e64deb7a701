"""faceclient against a real server: sync and async, every gallery feature, errors, retries, version check."""

from __future__ import annotations

import asyncio
import io
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import faceclient
import httpx
import numpy as np
import pytest
from faceclient import (
    ERROR_CLASSES,
    AsyncFaceClient,
    AuthError,
    BadRequestError,
    ConflictError,
    FaceClient,
    FaceConnectionError,
    IncompatibleServerError,
    NotFoundError,
    RateLimitedError,
    UnavailableError,
)

from harness.server import REPO, ServerProcess
from service.errors import STATUS, ErrorCode
from service.http import schemas
from tests.clients.conftest import ADMIN, ENV
from tests.conftest import ENROLLED, face_files, unknown_files
from tests.damage import damage_pages

FAMILY_STATUSES = {AuthError: {401, 403}, NotFoundError: {404}, ConflictError: {409}, RateLimitedError: {429},
                   UnavailableError: {503, 504, 507}, faceclient.ServerError: {500}}


def test_every_error_code_of_the_service_has_its_family():
    assert set(ERROR_CLASSES) == {code.value for code in ErrorCode}
    for code in ErrorCode:
        cls, status = ERROR_CLASSES[code.value], STATUS[code]
        expected = FAMILY_STATUSES.get(cls, set(range(400, 500)) - {401, 404, 409, 429})
        assert status in expected, (code, cls, status)


@pytest.mark.parametrize(("client_model", "server_model"), [
    (faceclient.EmbedResult, schemas.EmbedResponse), (faceclient.EnrollResult, schemas.EnrollResponse),
    (faceclient.VerifyResult, schemas.VerifyResponse), (faceclient.IdentifyResult, schemas.IdentifyResponse),
    (faceclient.ProbeResult, schemas.ProbeResult), (faceclient.Candidate, schemas.Candidate),
    (faceclient.FaceLocation, schemas.FaceLocation), (faceclient.FaceQuality, schemas.FaceQuality),
    (faceclient.DetectResult, schemas.DetectResponse), (faceclient.DetectedFace, schemas.DetectedFaceOut),
    (faceclient.Identity, schemas.IdentityDetail), (faceclient.IdentityPage, schemas.IdentityPage),
    (faceclient.IdentityDeleted, schemas.DeleteResponse), (faceclient.Collection, schemas.CollectionOut),
    (faceclient.CollectionDeleted, schemas.CollectionDeleted), (faceclient.Key, schemas.KeyOut),
    (faceclient.KeyCreated, schemas.KeyCreated), (faceclient.KeyRevoked, schemas.KeyRevoked),
    (faceclient.AuditEntry, schemas.AuditOut), (faceclient.Ready, schemas.ReadyResponse),
    (faceclient.Alias, schemas.AliasOut), (faceclient.AliasList, schemas.AliasList),
    (faceclient.DuplicatesResult, schemas.DuplicatesResponse), (faceclient.DuplicatePair, schemas.DuplicatePairOut),
    (faceclient.OutliersResult, schemas.OutliersResponse), (faceclient.Outlier, schemas.OutlierOut),
    (faceclient.MergeResult, schemas.MergeResponse), (faceclient.MoveResult, schemas.MoveFaceResponse),
    (faceclient.FaceDeleted, schemas.FaceDeleteResponse), (faceclient.FacesDeleted, schemas.FacesDeleteResponse),
    (faceclient.ClusterResult, schemas.ClusterResponse),
    (faceclient.ClusterFace, schemas.ClusterFace), (faceclient.ModelStatus, schemas.ModelStatus),
    (faceclient.PossibleDuplicate, schemas.PossibleDuplicate),
])
def test_client_models_have_every_field_of_the_server_answers(client_model, server_model):
    assert set(server_model.model_fields) <= set(client_model.model_fields)


def test_round_trip_sync(any_backend, collection_name):
    """Enroll from a path, bytes, a file object and a numpy array; identify, verify, page, delete."""
    with FaceClient(any_backend.url, ADMIN, collection=collection_name) as face:
        assert face.create_collection(collection_name).identities == 0
        bush, powell = face_files(ENROLLED[0]), face_files(ENROLLED[1])
        created = face.enroll(ENROLLED[0], [bush[0], bush[1].read_bytes()], metadata={"team": "a"})
        assert created.created and created.face_count == 2
        with open(powell[0], "rb") as f:
            assert face.enroll(ENROLLED[1], f).face_count == 1
        pixels = decode_rgb(powell[1])
        assert face.enroll(ENROLLED[1], pixels[:, :, ::-1], color="bgr").face_count == 2

        result = face.identify([bush[2], powell[2], unknown_files()[0]])
        assert [r.identity_id for r in result.results] == [ENROLLED[0], ENROLLED[1], None]
        assert result.results[0].candidates[0].identity_id == ENROLLED[0] and result.gallery_identities == 2
        # among: photos sent as files (multipart), the list as a form field; only those are candidates
        listed = face.identify([bush[2], powell[2]], among=[ENROLLED[1]])
        assert [r.identity_id for r in listed.results] == [None, ENROLLED[1]] and listed.gallery_identities == 1
        with pytest.raises(NotFoundError) as absent:
            face.identify(bush[2], among=["nobody-here"])
        assert absent.value.details.get("identity_ids") == ["nobody-here"]

        same = face.verify(bush[0], identity_id=ENROLLED[0])
        assert same.match and same.identity_id == ENROLLED[0]
        assert not face.verify(bush[0], powell[0]).match

        assert [i.identity_id for i in face.iter_identities(page_size=1)] == sorted(ENROLLED[:2])
        assert face.get_identity(ENROLLED[0]).metadata == {"team": "a"}
        assert face.delete_identity(ENROLLED[0]).deleted_faces == 2
        with pytest.raises(NotFoundError) as e:
            face.get_identity(ENROLLED[0])
        assert e.value.code == "identity_not_found" and e.value.status == 404 and e.value.request_id
        assert face.delete_collection(collection_name).deleted_identities == 1


def decode_rgb(path) -> np.ndarray:
    image = pytest.importorskip("PIL.Image")
    return np.asarray(image.open(path).convert("RGB"))


def test_numpy_images_need_their_color_order_said(embedded):
    with FaceClient(embedded.url, ADMIN) as face:
        rgb = decode_rgb(face_files(ENROLLED[0])[0])
        as_rgb = face.embed(rgb, color="rgb").embeddings
        assert isinstance(as_rgb, np.ndarray) and as_rgb.dtype == np.float32 and as_rgb.shape == (1, 128)
        np.testing.assert_array_equal(face.embed(np.ascontiguousarray(rgb[:, :, ::-1]), color="bgr").embeddings,
                                      as_rgb)
        assert float(face.embed(rgb[:, :, ::-1], color="rgb").embeddings[0] @ as_rgb[0]) < 0.99  # swapped: not it
        jpeg = face.embed(face_files(ENROLLED[0])[0]).embeddings  # the same pixels, decoded by the server
        assert float(jpeg[0] @ as_rgb[0]) > 0.99
        with pytest.raises(ValueError, match="color"):
            face.embed(rgb)


def test_pil_images_and_embeddings_in(embedded, collection_name):
    image = pytest.importorskip("PIL.Image")
    with FaceClient(embedded.url, ADMIN, collection=collection_name) as face:
        face.create_collection(collection_name)
        vectors = face.embed([image.open(p) for p in face_files(ENROLLED[2])]).embeddings
        face.enroll(ENROLLED[2], embeddings=vectors[:2], model_id=face.ready().model_id)
        found = face.identify(embeddings=vectors[2:], model_id=face.ready().model_id).results[0]
        assert found.identity_id == ENROLLED[2]
        detected = face.detect(io.BytesIO(face_files(ENROLLED[2])[0].read_bytes()))
        assert len(detected.images) == 1
        face.delete_collection(collection_name)


def test_errors_carry_code_message_and_the_request_id(embedded):
    with FaceClient(embedded.url, ADMIN) as face:
        with pytest.raises(BadRequestError) as e:
            face.embed(b"not an image at all")
        assert e.value.code == "not_an_image" and e.value.status == 422 and e.value.message
        assert len(e.value.request_id or "") == 32  # the client's X-Request-ID, echoed by the server
        with pytest.raises(ConflictError) as conflict:
            face.create_collection("default")
        assert conflict.value.code in ("collection_exists", "collection_protected")
    with FaceClient(embedded.url, "wrong-key") as stranger, pytest.raises(AuthError) as auth:
        stranger.list_collections()
    assert auth.value.code == "unauthorized" and auth.value.status == 401
    with FaceClient(f"http://127.0.0.1:{free_port()}", ADMIN, timeout=2) as nobody:
        with pytest.raises(FaceConnectionError):
            nobody.health()


def free_port() -> int:
    from harness.server import free_port as port

    return port()


def test_the_first_call_checks_the_server_major_version(embedded, monkeypatch):
    with FaceClient(embedded.url, ADMIN) as face:
        assert face.health().version == faceclient.__version__ and face.server_version == faceclient.__version__
    monkeypatch.setattr("faceclient.client.__version__", "99.0.0")  # a client of another major
    with FaceClient(embedded.url, ADMIN) as face, pytest.raises(IncompatibleServerError) as e:
        face.list_collections()
    assert e.value.server_version == faceclient.__version__
    with FaceClient(embedded.url, ADMIN, check_version=False) as face:
        assert face.list_collections()


def test_429_is_retried_after_retry_after(embedded):
    with FaceClient(embedded.url, ADMIN) as admin:
        slow = admin.create_key("read", rate_limit_rps=1, note="one a second")
    started = time.monotonic()
    with FaceClient(embedded.url, slow.secret) as face:
        for _ in range(3):
            assert face.list_collections()
    assert time.monotonic() - started >= 1.5  # two of the three waited for Retry-After (1 s)
    time.sleep(1.5)  # the bucket refills
    with FaceClient(embedded.url, slow.secret, max_retries=0) as impatient:
        impatient.list_collections()
        with pytest.raises(RateLimitedError) as e:
            impatient.list_collections()
    assert e.value.code == "rate_limited" and e.value.retry_after is not None


def test_503_overloaded_is_retried_then_raised(tmp_path, default_model):
    """A request of more faces than FACE_BATCH_MAX_QUEUED_FACES is refused 503 `overloaded` (Retry-After 1)
    every time: deterministic. (A 503 that clears while retrying needs racing load: not tested.)"""
    proc = ServerProcess(tmp_path / "data", model=default_model, env={**ENV, "FACE_BATCH_MAX_QUEUED_FACES": "1"})
    try:
        proc.wait_ready()
        with FaceClient(proc.url, ADMIN, max_retries=2) as face:
            started = time.monotonic()
            with pytest.raises(UnavailableError) as e:
                face.embed(face_files(ENROLLED[0])[:2])
            assert time.monotonic() - started >= 2.0  # two waits of Retry-After
            assert e.value.code == "overloaded" and e.value.status == 503
            assert face.embed(face_files(ENROLLED[0])[0]).dimension == 128  # one face fits
    finally:
        proc.stop()


def test_503_collection_damaged_and_catalog_damaged_are_not_retried(tmp_path, default_model):
    """A collection whose store is damaged is 503 `collection_damaged`, and a key whose catalog record
    is damaged 503 `catalog_damaged`, until an operator restores them: waiting does not mend either, so
    the client raises at once instead of spending its retries (it sent the request max_retries + 1
    times); the listing says which collection is damaged."""
    data = tmp_path / "data"
    proc = ServerProcess(data, model=default_model, env=ENV)
    try:
        proc.wait_ready()
        with FaceClient(proc.url, ADMIN) as face:
            face.create_collection("site-b")
            face.enroll("alice", face_files(ENROLLED[0])[0], collection="site-b")
            readers = [face.create_key("read", note="n" * 500).secret for _ in range(12)]  # pages of keys
    finally:
        proc.stop()
    store = data / "collections" / "site-b" / "gallery.sqlite3"
    for leftover in (store.with_name(store.name + "-wal"), store.with_name(store.name + "-shm")):
        leftover.unlink(missing_ok=True)
    store.write_bytes(b"\x00not a database" * 1000)
    damage_pages(data / "catalog.sqlite3", 5, table="keys")
    proc = ServerProcess(data, model=default_model, env=ENV)
    try:
        proc.wait_ready()
        with FaceClient(proc.url, ADMIN, max_retries=3) as face:
            assert {c.name: c.damaged for c in face.list_collections()} == {"default": False, "site-b": True}
            with pytest.raises(UnavailableError) as e:
                face.get_identity("alice", collection="site-b")
            assert e.value.code == "collection_damaged" and e.value.status == 503
        with FaceClient(proc.url, readers[-1], max_retries=3) as reader:
            with pytest.raises(UnavailableError) as e:
                list(reader.iter_identities())
            assert e.value.code == "catalog_damaged" and e.value.status == 503
        with FaceClient(proc.url, ADMIN) as face:
            face.list_collections()  # logged after the refusals and any retry of them: the log is read up to it

        def requests(route: str) -> list[str]:
            return [line for line in proc.log_path.read_text().splitlines()
                    if '"event": "request"' in line and f'"route": "{route}"' in line]

        deadline = time.monotonic() + 10
        while len(requests("/collections")) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # the access line is written once the answer is sent
        asked = requests("/identities/{identity_id}")
        assert len(asked) == 1 and '"error": "collection_damaged"' in asked[0], asked
        asked = requests("/identities")
        assert len(asked) == 1 and '"error": "catalog_damaged"' in asked[0], asked
    finally:
        proc.stop()


def test_async_client_same_features(any_backend, collection_name, people_dir):
    async def main() -> None:
        async with AsyncFaceClient(any_backend.url, ADMIN, collection=collection_name) as face:
            await face.create_collection(collection_name)
            assert collection_name in [c.name for c in await face.list_collections()]
            seen: list[tuple[int, int]] = []
            summary = await face.enroll_folder(people_dir, progress=lambda d, t: seen.append((d, t)))
            assert (summary.people, summary.enrolled, summary.faces, summary.failed) == (3, 3, 6, {})
            assert seen[-1] == (3, 3)
            assert (await face.enroll_folder(people_dir)).already == 3  # resumable
            probes = [face_files(p)[2] for p in ENROLLED[:3]] + [b"junk"]
            results = await face.identify_many(probes, batch_size=2, concurrency=2)
            assert [r.identity_id for r in results[:3]] == ENROLLED[:3] and [r.image_index for r in results] == [
                0, 1, 2, 3]
            assert results[3].error is not None and results[3].error.code == "not_an_image"
            assert (await face.verify(probes[0], probes[0])).match
            listed = [i.identity_id async for i in face.iter_identities(page_size=2)]
            assert listed == sorted(ENROLLED[:3])
            key = await face.create_key("read", collections=[collection_name], note="async")
            assert key.key_id in [k.key_id for k in await face.list_keys()]
            assert (await face.revoke_key(key.key_id)).key_id == key.key_id
            actions = [e.action async for e in face.iter_audit(collection=collection_name, page_size=2)]
            assert actions.count("identity.created") == 3 and "collection.created" in actions
            many = await asyncio.gather(*(face.get_identity(p) for p in ENROLLED[:3]))  # tasks share the pool
            assert [i.face_count for i in many] == [2, 2, 2]
            await face.delete_collection(collection_name)

    asyncio.run(main())


def test_sync_bulk_helpers_and_audit(embedded, collection_name, people_dir):
    with FaceClient(embedded.url, ADMIN, collection=collection_name) as face:
        face.create_collection(collection_name)
        summary = face.enroll_folder(people_dir, concurrency=3)
        assert (summary.enrolled, summary.faces) == (3, 6)
        done: list[int] = []
        probes = [face_files(p)[2] for p in ENROLLED[:3]] * 5
        results = face.identify_many(probes, batch_size=4, concurrency=3, progress=lambda d, t: done.append(d))
        assert [r.identity_id for r in results] == ENROLLED[:3] * 5 and max(done) == 15
        entries = list(face.iter_audit(collection=collection_name, identity_id=ENROLLED[0]))
        assert [e.action for e in entries] == ["identity.created"] and entries[0].request_id
        face.delete_collection(collection_name)


def test_audit_request_id_is_the_clients(embedded, collection_name):
    """The request id the client sends is the one the server records: errors and audit entries line up."""
    with FaceClient(embedded.url, ADMIN) as face:
        face.create_collection(collection_name)
        entry = next(face.iter_audit(collection=collection_name))
        assert entry.action == "collection.created" and entry.request_id and len(entry.request_id) == 32
        face.delete_collection(collection_name)
    assert httpx.get(embedded.url + "/healthz").json()["version"] == faceclient.__version__


def test_retention_sync_and_async(any_backend, collection_name):
    with FaceClient(any_backend.url, ADMIN) as face:
        assert face.create_collection(collection_name, retention_days=7).retention_days == 7
        assert face.get_collection(collection_name).retention_days == 7
        assert face.update_collection(collection_name, retention_days=None).retention_days is None
        with pytest.raises(NotFoundError):
            face.update_collection(f"{collection_name}-missing", retention_days=1)
        # the settings left out are kept; None puts one back to the default
        limited = face.update_collection(collection_name, max_faces=3, identify_fpir=0.001)
        assert (limited.max_faces, limited.identify_fpir, limited.retention_days) == (3, 0.001, None)
        assert face.update_collection(collection_name, retention_days=1).max_faces == 3
        ready = face.ready()
        rows = np.eye(4, ready.embedding_size or 0).tolist()
        face.enroll("p", embeddings=rows[:3], collection=collection_name, model_id=ready.model_id)
        with pytest.raises(BadRequestError) as full:
            face.enroll("q", embeddings=rows[3:], collection=collection_name, model_id=ready.model_id)
        assert full.value.code == "too_many_faces_for_collection" and full.value.status == 413
        assert face.update_collection(collection_name, identify_fpir=None).identify_fpir is None
        with pytest.raises(ValueError):
            face.update_collection(collection_name)

    async def run() -> None:
        async with AsyncFaceClient(any_backend.url, ADMIN) as face:
            assert (await face.update_collection(collection_name, retention_days=0.25)).retention_days == 0.25
            listed = {c.name: c.retention_days for c in await face.list_collections()}
            assert listed[collection_name] == 0.25
            await face.delete_collection(collection_name)

    asyncio.run(run())


def test_update_identity_sync_and_async(any_backend, collection_name):
    """PATCH /identities/{id}: rename (faces and created_at kept), metadata replaced, merge-patched (null
    removes a key, objects merge); a taken new id is ConflictError identity_exists, an unknown id
    NotFoundError identity_not_found."""
    bush, powell, blair = (face_files(p) for p in ENROLLED[:3])
    with FaceClient(any_backend.url, ADMIN, collection=collection_name) as face:
        face.create_collection(collection_name)
        enrolled = face.enroll("before", bush[:2], metadata={"team": "a", "desk": {"floor": 2, "seat": 7}})
        face.enroll(ENROLLED[1], powell[0])
        old = face.get_identity("before")
        renamed = face.update_identity("before", rename_to=ENROLLED[0])
        assert isinstance(renamed, faceclient.Identity) and renamed.identity_id == ENROLLED[0]
        assert renamed.face_ids == enrolled.face_ids == old.face_ids and renamed.faces == old.faces
        assert (renamed.metadata, renamed.created_at, renamed.face_count) == (old.metadata, old.created_at, 2)
        assert face.get_identity(ENROLLED[0]) == renamed
        with pytest.raises(NotFoundError) as gone:
            face.get_identity("before")
        assert gone.value.code == "identity_not_found"
        assert face.identify(bush[2]).results[0].identity_id == ENROLLED[0]  # its faces answer to the new id

        patched = face.update_identity(ENROLLED[0], metadata_patch={"team": None, "desk": {"seat": 9, "row": "b"},
                                                                    "badge": [1, 2]})
        assert patched.metadata == {"desk": {"floor": 2, "seat": 9, "row": "b"}, "badge": [1, 2]}
        replaced = face.update_identity(ENROLLED[0], metadata={"team": "c"})
        assert replaced.metadata == {"team": "c"} and replaced.face_ids == old.face_ids
        both = face.update_identity(ENROLLED[0], rename_to="after", metadata_patch={"desk": 4})
        assert (both.identity_id, both.metadata) == ("after", {"team": "c", "desk": 4})
        assert face.update_identity("after", metadata={"team": "c", "desk": 4}) == both  # nothing changed
        assert face.update_identity("after", metadata={}).metadata == {}

        with pytest.raises(ConflictError) as taken:
            face.update_identity("after", rename_to=ENROLLED[1])
        assert taken.value.code == "identity_exists" and taken.value.status == 409
        assert taken.value.details.get("identity_id") == ENROLLED[1] and taken.value.request_id
        assert face.get_identity(ENROLLED[1]).face_count == 1 and face.get_identity("after").face_count == 2
        with pytest.raises(NotFoundError) as unknown:
            face.update_identity("nobody-here", metadata={"x": 1})
        assert unknown.value.code == "identity_not_found" and unknown.value.status == 404
        updates = [e for e in face.iter_audit(collection=collection_name) if e.action == "identity.updated"]
        assert len(updates) == 5 and {e.identity_id for e in updates} == {ENROLLED[0], "after"}
        assert [i.identity_id for i in face.iter_identities(prefix="aft", page_size=1)] == ["after"]
        # an edit of what was read: made while nothing else wrote, refused (ConflictError) once something did
        read = face.get_identity("after")
        edited = face.update_identity("after", metadata={"v": 1}, expected_updated_at=read.updated_at)
        assert edited.metadata == {"v": 1}
        with pytest.raises(ConflictError) as stale:
            face.update_identity("after", metadata={"v": 2}, expected_updated_at=read.updated_at)
        assert stale.value.code == "identity_changed" and stale.value.details.get("updated_at") == edited.updated_at
        assert face.get_identity("after").metadata == {"v": 1}

    async def run() -> None:
        async with AsyncFaceClient(any_backend.url, ADMIN, collection=collection_name) as aface:
            await aface.enroll(ENROLLED[2], blair[0], metadata={"a": {"b": 1, "c": 2}})
            moved = await aface.update_identity(ENROLLED[2], rename_to="blair-2", metadata_patch={"a": {"c": None}})
            assert (moved.identity_id, moved.metadata, moved.face_count) == ("blair-2", {"a": {"b": 1}}, 1)
            assert (await aface.update_identity("blair-2", metadata={"k": "v"})).metadata == {"k": "v"}
            with pytest.raises(ConflictError) as stale:
                await aface.update_identity("blair-2", metadata={"k": "w"}, expected_updated_at=moved.updated_at)
            assert stale.value.code == "identity_changed"
            with pytest.raises(ConflictError) as taken:
                await aface.update_identity("blair-2", rename_to="after")
            assert taken.value.code == "identity_exists"
            with pytest.raises(NotFoundError) as unknown:
                await aface.update_identity(ENROLLED[2], rename_to="x")
            assert unknown.value.code == "identity_not_found"
            await aface.delete_collection(collection_name)

    asyncio.run(run())


def test_update_identity_refuses_an_invalid_new_id(embedded, collection_name):
    """The new id keeps /enroll's rules and codes: an invisible character is invalid_identity_id, a '/' (not one
    path segment: a schema violation) invalid_request; the identity is left as it was."""
    with FaceClient(embedded.url, ADMIN, collection=collection_name) as face:
        face.create_collection(collection_name)
        face.enroll("kept", face_files(ENROLLED[0])[0])
        for bad, code in (("a/b", "invalid_request"), ("a\u200bb", "invalid_identity_id")):
            with pytest.raises(BadRequestError) as refused:
                face.update_identity("kept", rename_to=bad)
            assert (refused.value.code, refused.value.status) == (code, 422), bad
        assert face.get_identity("kept").face_count == 1
        face.delete_collection(collection_name)


def test_update_identity_refuses_nothing_or_both_before_sending():
    """None of rename_to/metadata/metadata_patch, or metadata and metadata_patch both: ValueError, and no
    request (the client points at a port nothing listens on)."""
    nowhere = f"http://127.0.0.1:{free_port()}"
    with FaceClient(nowhere, ADMIN, timeout=2) as face:
        with pytest.raises(ValueError, match="rename_to, metadata or metadata_patch"):
            face.update_identity("alice")
        with pytest.raises(ValueError, match="not both"):
            face.update_identity("alice", metadata={}, metadata_patch={"a": 1})
        with pytest.raises(FaceConnectionError):  # an empty dict is a value: sent
            face.update_identity("alice", metadata={})

    async def run() -> None:
        async with AsyncFaceClient(nowhere, ADMIN, timeout=2) as aface:
            with pytest.raises(ValueError, match="not both"):
                await aface.update_identity("alice", rename_to="bob", metadata={"a": 1}, metadata_patch={})

    asyncio.run(run())


def test_aliases_sync_and_async(any_backend, collection_name):
    """set/get/list/delete, a gallery call through the alias, and the alias errors as their classes."""
    old, new, alias = f"{collection_name}-old", f"{collection_name}-new", f"{collection_name}-live"
    bush = face_files(ENROLLED[0])
    with FaceClient(any_backend.url, ADMIN) as face:
        face.create_collection(old)
        face.create_collection(new)
        made = face.set_alias(alias, old)
        assert (made.alias, made.collection) == (alias, old) and made.updated_at > 0
        face.enroll(ENROLLED[0], bush[0], collection=alias)
        assert face.get_identity(ENROLLED[0], collection=old).face_count == 1
        assert face.get_collection(alias).name == old
        assert face.identify(bush[1], collection=alias).results[0].identity_id == ENROLLED[0]
        assert face.set_alias(alias, new).collection == new
        assert face.identify(bush[1], collection=alias).results[0].identity_id is None
        assert face.get_alias(alias).collection == new
        assert (alias, new) in [(a.alias, a.collection) for a in face.list_aliases()]
        with pytest.raises(ConflictError) as e:
            face.delete_collection(new)
        assert e.value.code == "collection_in_use" and e.value.details["aliases"] == [alias]
        with pytest.raises(NotFoundError) as e:
            face.set_alias(f"{alias}-x", "no-such-collection")
        assert e.value.code == "collection_not_found"

    async def run() -> None:
        async with AsyncFaceClient(any_backend.url, ADMIN) as aface:
            assert (await aface.set_alias(alias, old)).collection == old
            assert (await aface.get_alias(alias)).collection == old
            assert alias in [a.alias for a in await aface.list_aliases()]
            assert (await aface.delete_alias(alias)).collection == old
            with pytest.raises(NotFoundError) as e:
                await aface.get_alias(alias)
            assert e.value.code == "alias_not_found"
            await aface.delete_collection(new)

    asyncio.run(run())
def no_face_png(path) -> None:
    """A real image with no face in it: a grey 300x300 photo (PNG, written with the client's own encoder)."""
    from faceclient.images import encode

    path.write_bytes(encode(np.full((300, 300, 3), 128, np.uint8), color="rgb"))


def test_enroll_folder_skips_bad_files_and_reports_people_without_any(any_backend, collection_name, people_dir):
    """A file that is not an image, a photo without a face: skipped and reported with their codes; the
    person's good files are enrolled. A person with only bad files is reported, not raised (issue 24)."""
    first, second = ENROLLED[:2]
    (people_dir / first / "notes.jpg").write_bytes(b"this is not a jpeg")
    no_face_png(people_dir / second / "wall.png")
    (people_dir / "Nobody_Here").mkdir()
    no_face_png(people_dir / "Nobody_Here" / "empty.png")
    (people_dir / "Nobody_Here" / "broken.jpg").write_bytes(face_files(first)[0].read_bytes()[:300])
    with FaceClient(any_backend.url, ADMIN, collection=collection_name) as face:
        face.create_collection(collection_name)
        summary = face.enroll_folder(people_dir, max_images_per_request=2)
        assert (summary.people, summary.enrolled, summary.faces, summary.skipped_files) == (4, 3, 6, 4)
        assert {(s.file, s.code) for s in summary.persons[first].skipped} == {("notes.jpg", "not_an_image")}
        assert [(s.file, s.code) for s in summary.persons[second].skipped] == [("wall.png", "no_face")]
        assert summary.persons[first].faces == summary.persons[second].faces == 2
        assert list(summary.failed) == ["Nobody_Here"] and summary.failed["Nobody_Here"].code in (
            "no_face", "truncated_image", "not_an_image")
        nobody = summary.persons["Nobody_Here"]
        assert nobody.faces == 0 and len(nobody.skipped) == 2 and nobody.error is not None
        assert {i.identity_id: i.face_count for i in face.iter_identities()} == {p: 2 for p in ENROLLED[:3]}
        again = face.enroll_folder(people_dir, replace=True)  # replace: the good files again, the bad skipped
        assert (again.enrolled, again.faces, again.skipped_files, list(again.failed)) == (3, 6, 4, ["Nobody_Here"])
        assert face.get_identity(first).face_count == 2
        face.delete_collection(collection_name)


def test_async_enroll_folder_skips_bad_files(embedded, collection_name, people_dir):
    (people_dir / ENROLLED[2] / "zero.jpg").write_bytes(b"")

    async def main() -> None:
        async with AsyncFaceClient(embedded.url, ADMIN, collection=collection_name) as face:
            await face.create_collection(collection_name)
            summary = await face.enroll_folder(people_dir)
            assert (summary.enrolled, summary.faces, summary.failed) == (3, 6, {})
            assert [(s.file, s.code) for s in summary.persons[ENROLLED[2]].skipped] == [("zero.jpg", "empty_image")]
            await face.delete_collection(collection_name)

    asyncio.run(main())


def test_images_travel_as_multipart_bytes_by_default(embedded):
    """Images go as the files of a multipart form (no base64); transport="json" sends base64: same answers."""
    sent: list[str] = []
    image = face_files(ENROLLED[0])[0]
    with FaceClient(embedded.url, ADMIN) as face, FaceClient(embedded.url, ADMIN, transport="json") as as_json:
        for client in (face, as_json):  # what goes on the wire: the bodies' content types
            client._http.event_hooks["request"].append(
                lambda r: sent.append(r.headers["content-type"].split(";")[0]) if r.method == "POST" else None)
        by_form, by_json = face.embed([image, image]).embeddings, as_json.embed([image, image]).embeddings
        np.testing.assert_array_equal(by_form, by_json)
        assert face.verify(image, image, threshold=0.5).match and face.identify(image, top_k=1).results
        assert as_json.verify(image, image, threshold=0.5).match
    assert sent == ["multipart/form-data", "application/json", "multipart/form-data", "multipart/form-data",
                    "application/json"]


def test_progress_is_a_callable_a_tqdm_bar_or_nothing(embedded, people_dir, capsys, monkeypatch):
    probes = [face_files(p)[2] for p in ENROLLED[:3]]
    with FaceClient(embedded.url, ADMIN) as face:
        face.identify_many(probes, progress=None)  # stderr is not a terminal here: no bar by default
        face.identify_many(probes, progress=False)
        assert capsys.readouterr().err == ""
        monkeypatch.setitem(sys.modules, "tqdm", None)  # tqdm not installed: True says what to install
        with pytest.raises(ImportError, match=r"faceclient\[progress\]"):
            face.identify_many(probes, progress=True)
        monkeypatch.undo()
        pytest.importorskip("tqdm")
        assert len(face.identify_many(probes, batch_size=1, progress=True)) == 3
        bar = capsys.readouterr().err
        assert "identify photos" in bar and "3/3" in bar, bar


# --- gallery hygiene, enrolled probes, clustering, served models (the embedded backend; the server's own tests
# run every route on both) -------------------------------------------------------------------------------------
LFW = (REPO / ".." / "shared" / "data" / "lfw-112" / "images").resolve()
needs_lfw = pytest.mark.skipif(not LFW.is_dir(), reason="needs ../shared/data/lfw-112")


def lfw(person: str) -> list[Path]:
    return sorted((LFW / person).glob("*.jpg"))


PLANTED = {  # Andre Agassi enrolled twice (a duplicate person); a photo of Bill Gates filed under Al Gore
    "agassi-a": lfw("Andre_Agassi")[:2], "agassi-b": lfw("Andre_Agassi")[2:4],
    "al-gore": lfw("Al_Gore")[:3] + lfw("Bill_Gates")[4:5], "bill-gates": lfw("Bill_Gates")[:4],
    "adrien-brody": lfw("Adrien_Brody")[:3], "ana-palacio": lfw("Ana_Palacio")[:3],
} if LFW.is_dir() else {}


@needs_lfw
def test_hygiene_probes_and_clustering_through_the_client(embedded, collection_name):
    with FaceClient(embedded.url, ADMIN) as face:
        made = face.create_collection(collection_name)
        ready = face.ready()
        assert ready.default_model in ready.models and ready.models[ready.default_model].default
        assert made.model == ready.default_model and made.dim == ready.models[made.model].dim > 0
        c = {"collection": collection_name}
        faces = {i: face.enroll(i, files, image_type="aligned", **c).face_ids for i, files in PLANTED.items()}
        mislabelled = faces["al-gore"][-1]

        found = face.duplicates(**c)
        assert isinstance(found, faceclient.DuplicatesResult) and found.model_id == made.model_id
        pair = next(p for p in found.pairs if (p.identity_a, p.identity_b) == ("agassi-a", "agassi-b"))
        assert pair.score >= found.min_score and 1 <= len(pair.evidence) <= 3
        assert {e.face_a for e in pair.evidence} <= set(faces["agassi-a"])
        assert found.faces_scanned == sum(map(len, faces.values()))
        low = face.duplicates(min_score=0.2, evidence=1, limit=2, **c)
        assert low.min_score == 0.2 and low.max_false_alarm is None and len(low.pairs) <= 2
        assert all(len(p.evidence) == 1 for p in low.pairs)
        assert face.duplicates().faces_scanned == 0  # no collection=: the client's default collection
        # the same scan as a job on the server (for a collection whose scan outlasts a request)
        scanned = face.scan_duplicates(poll_s=0.1, timeout_s=120, **c)
        assert scanned.pairs == found.pairs and scanned.min_score == found.min_score
        job = face.list_jobs(collection=collection_name)[0]
        assert (job.kind, job.state, job.duplicates) == ("duplicates", "done", scanned)
        assert face.get_duplicates_job(job.id, **c) == job and job.report is None
        with pytest.raises(NotFoundError) as foreign:
            face.get_duplicates_job(job.id)  # through another collection (the client's default one)
        assert foreign.value.code == "job_not_found"
        with pytest.raises(NotFoundError) as nowhere:
            face.scan_duplicates(collection="no-such-collection")
        assert nowhere.value.code == "collection_not_found"

        odd = face.outliers(**c)
        listed = {o.face_id: o for o in odd.faces}
        assert mislabelled in listed, odd
        assert listed[mislabelled].identity_id == "al-gore" and listed[mislabelled].own_score < odd.threshold
        assert listed[mislabelled].best_other is not None
        assert listed[mislabelled].best_other.identity_id == "bill-gates"
        assert face.outliers(min_score=0.99, limit=1, **c).faces[0].face_id == mislabelled
        assert face.scan_outliers(poll_s=0.1, timeout_s=120, **c) == odd  # the same scan as a job
        job = face.list_jobs(collection=collection_name)[0]
        assert (job.kind, job.state, job.outliers, job.duplicates) == ("outliers", "done", odd, None)
        assert face.get_outliers_job(job.id, **c) == job
        with pytest.raises(NotFoundError) as other_kind:
            face.get_duplicates_job(job.id, **c)
        assert other_kind.value.code == "job_not_found"

        by_face = face.identify(face_ids=[mislabelled, faces["agassi-a"][0]], top_k=2, **c).results
        assert [r.probe_face_id for r in by_face] == [mislabelled, faces["agassi-a"][0]]
        assert by_face[0].candidates[0].identity_id == "bill-gates"
        assert all(cand.identity_id != "agassi-a" for cand in by_face[1].candidates)
        by_identity = face.identify(identity_id="agassi-a", **c).results
        assert len(by_identity) == 1 and by_identity[0].identity_id == "agassi-b"

        moved = face.move_face(mislabelled, "bill-gates", **c)
        assert (moved.face_id, moved.from_identity, moved.to_identity) == (mislabelled, "al-gore", "bill-gates")
        assert not moved.target_created and not moved.source_deleted
        assert mislabelled in face.get_identity("bill-gates", **c).face_ids
        merged = face.merge_identities("agassi-b", "agassi-a", **c)
        assert (merged.identity_id, merged.merged_from, merged.faces_moved, merged.face_count) == (
            "agassi-a", "agassi-b", 2, 4)
        with pytest.raises(NotFoundError) as gone:
            face.get_identity("agassi-b", **c)
        assert gone.value.code == "identity_not_found"
        with pytest.raises(BadRequestError) as itself:
            face.merge_identities("agassi-a", "agassi-a", **c)
        assert itself.value.code == "same_identity"
        deleted = face.delete_face(faces["adrien-brody"][0], **c)
        assert (deleted.identity_id, deleted.identity_deleted) == ("adrien-brody", False)
        assert face.get_identity("adrien-brody", **c).face_count == 2
        with pytest.raises(NotFoundError) as missing:
            face.delete_face(faces["adrien-brody"][0], **c)
        assert missing.value.code == "face_not_found"
        assert not [p for p in face.duplicates(**c).pairs if "agassi-b" in (p.identity_a, p.identity_b)]

        photos = lfw("Adrien_Brody")[:3] + lfw("Ana_Palacio")[:3]
        grouped = face.cluster(photos, image_type="aligned")
        assert grouped.faces == 6 and [cl.size for cl in grouped.clusters] == [3, 3]
        assert sorted(sorted(f.image_index for f in cl.faces) for cl in grouped.clusters) == [[0, 1, 2], [3, 4, 5]]
        vectors = face.embed(photos, image_type="aligned", model=made.model)
        assert vectors.model == made.model and vectors.model_id == made.model_id
        again = face.cluster(embeddings=vectors.embeddings, model_id=vectors.model_id, threshold=-1.0)
        assert [cl.size for cl in again.clusters] == [6] and again.threshold == -1.0
        assert face.detect(face_files(ENROLLED[0])[0], model=made.model).model == made.model
        with pytest.raises(NotFoundError) as unknown:
            face.embed(photos[0], model="no-such-model")
        assert unknown.value.code == "model_not_found"
        face.delete_collection(collection_name)


@needs_lfw
def test_async_hygiene_probes_and_clustering(embedded, collection_name):
    async def main() -> None:
        async with AsyncFaceClient(embedded.url, ADMIN, collection=collection_name) as face:
            made = await face.create_collection(collection_name, model=(await face.ready()).default_model)
            assert made.dim > 0 and made.keep_crops is False
            faces = {i: (await face.enroll(i, files, image_type="aligned")).face_ids for i, files in PLANTED.items()}
            mislabelled = faces["al-gore"][-1]
            found = await face.duplicates()  # the client's collection
            assert ("agassi-a", "agassi-b") in {(p.identity_a, p.identity_b) for p in found.pairs}
            scanned = await face.scan_duplicates(poll_s=0.1, timeout_s=120)
            assert scanned.pairs == found.pairs
            odd = await face.outliers()
            assert await face.scan_outliers(poll_s=0.1, timeout_s=120) == odd  # the same scan as a job
            running = await face.start_outliers_job(min_score=0.99, limit=1)
            assert running.kind == "outliers" and (await face.get_outliers_job(running.id)).id == running.id
            while not (await face.get_outliers_job(running.id)).finished:  # one job of a collection at a time
                await asyncio.sleep(0.1)
            started = await face.start_duplicates_job(min_score=0.2, evidence=1, limit=2)
            assert started.kind == "duplicates" and started.collection == collection_name
            odd = await face.outliers()
            assert mislabelled in {o.face_id for o in odd.faces}
            probe = (await face.identify(face_ids=[mislabelled], top_k=1)).results[0]
            assert probe.probe_face_id == mislabelled and probe.candidates[0].identity_id == "bill-gates"
            assert (await face.identify(identity_id="agassi-b")).results[0].identity_id == "agassi-a"
            moved = await face.move_face(mislabelled, "gates-new")
            assert moved.target_created and moved.to_identity == "gates-new"
            gone = await face.delete_face(mislabelled)
            assert gone.identity_id == "gates-new" and gone.identity_deleted
            merged = await face.merge_identities("agassi-a", "agassi-b")
            assert (merged.identity_id, merged.faces_moved, merged.face_count) == ("agassi-b", 2, 4)
            grouped = await face.cluster(lfw("Adrien_Brody")[:3] + lfw("Ana_Palacio")[:3], image_type="aligned")
            assert [cl.size for cl in grouped.clusters] == [3, 3]
            assert (await face.detect(face_files(ENROLLED[0])[0], model=made.model)).model == made.model
            await face.delete_collection(collection_name)

    asyncio.run(main())


@needs_lfw
def test_cluster_takes_a_served_model(embedded):
    """``cluster(model=...)``: the served model that embeds (its name comes back); an unknown name is the
    service's 404 ``model_not_found`` as NotFoundError. Two models at once: tests/service/test_model_calibration.py."""
    photos = lfw("Adrien_Brody")[:2] + lfw("Ana_Palacio")[:2]
    with FaceClient(embedded.url, ADMIN) as face:
        default = face.ready().default_model
        grouped = face.cluster(photos, image_type="aligned", model=default)
        assert grouped.model == default and [cl.size for cl in grouped.clusters] == [2, 2]
        with pytest.raises(NotFoundError) as e:
            face.cluster(photos, image_type="aligned", model="nope")
        assert e.value.code == "model_not_found" and e.value.details["served"] == [default]

    async def run() -> None:
        async with AsyncFaceClient(embedded.url, ADMIN) as client:
            found = await client.cluster(photos, image_type="aligned", model=default)
            assert found.model == default and found.faces == 4

    asyncio.run(run())


def test_whole_collection_scans_wait_longer_than_other_requests(embedded):
    """/duplicates and /outliers scan the whole collection: minutes at a million faces (156 s measured),
    past the 60 s any other request waits. Before, the client gave up on them after its timeout while
    the server went on scanning; now they wait at least SCAN_TIMEOUT_S for the answer (``timeout=``
    to choose), and every other request keeps the client's timeout."""
    sent: list[tuple[str, dict]] = []

    def record(request: httpx.Request) -> None:
        sent.append((request.url.path, request.extensions["timeout"]))

    async def arecord(request: httpx.Request) -> None:
        record(request)

    with FaceClient(embedded.url, ADMIN, timeout=5) as face:
        face._http.event_hooks["request"].append(record)
        face.ready()
        face.duplicates()
        face.outliers()
        face.duplicates(timeout=7)
        face.outliers(timeout=8)
    with FaceClient(embedded.url, ADMIN, timeout=3600) as patient:
        patient._http.event_hooks["request"].append(record)
        patient.duplicates()

    async def main() -> None:
        async with AsyncFaceClient(embedded.url, ADMIN, timeout=5) as face:
            face._http.event_hooks["request"].append(arecord)
            await face.duplicates()
            await face.outliers(timeout=9)

    asyncio.run(main())
    reads = [(path.rsplit("/", 1)[-1], timeout["read"]) for path, timeout in sent if path != "/healthz"]
    assert reads == [("readyz", 5), ("duplicates", faceclient.SCAN_TIMEOUT_S),
                     ("outliers", faceclient.SCAN_TIMEOUT_S), ("duplicates", 7), ("outliers", 8),
                     ("duplicates", 3600), ("duplicates", faceclient.SCAN_TIMEOUT_S), ("outliers", 9)]
    assert all(timeout["connect"] in (5, 3600) for _, timeout in sent)


# --- delete_faces: many faces in one request (POST /faces/delete), more than 1,000 in requests of 1,000 ----------
UNKNOWN_FACE = 10**12  # no test enrolls this many faces: ids from here are not found


def enroll_rows(face: FaceClient, people: dict[str, int], collection: str) -> dict[str, list[int]]:
    """Each person enrolled with that many faces, from embeddings (no photo to embed): their face ids."""
    ready = face.ready()
    rows, start, faces = np.eye(sum(people.values()), ready.embedding_size or 0), 0, {}
    for person, n in people.items():
        faces[person] = face.enroll(person, embeddings=rows[start:start + n], model_id=ready.model_id,
                                    collection=collection).face_ids
        start += n
    return faces


def test_delete_faces_of_two_identities(embedded, collection_name):
    with FaceClient(embedded.url, ADMIN) as face:
        face.create_collection(collection_name)
        c = {"collection": collection_name}
        faces = enroll_rows(face, {"del-all": 2, "del-some": 3}, collection_name)
        unknown = UNKNOWN_FACE + 1
        asked = [unknown, *faces["del-some"][:2], *faces["del-all"], faces["del-all"][0]]  # one id twice
        erased = face.delete_faces(iter(asked), **c)  # any iterable, read once
        assert isinstance(erased, faceclient.FacesDeleted) and erased.not_found == [unknown]
        assert [(d.face_id, d.identity_id, d.identity_deleted) for d in erased.deleted] == sorted(
            [(f, "del-all", True) for f in faces["del-all"]] + [(f, "del-some", False) for f in faces["del-some"][:2]])
        with pytest.raises(NotFoundError) as gone:
            face.get_identity("del-all", **c)
        assert gone.value.code == "identity_not_found"
        assert face.get_identity("del-some", **c).face_ids == faces["del-some"][2:]
        actions = [e.action for e in face.iter_audit(collection=collection_name)]
        assert actions.count("face.deleted") == 4  # one record a face
        again = face.delete_faces(asked, **c)  # a retry: nothing left to erase, not an error
        assert again.deleted == [] and again.not_found == sorted(set(asked))
        with pytest.raises(ValueError, match="at least one"):
            face.delete_faces([], **c)
        with pytest.raises(BadRequestError) as bad:
            face.delete_faces([0], **c)  # an id below 1: the server's 422
        assert bad.value.code == "invalid_request" and bad.value.status == 422
        # the default collection: the route without /collections/{name}
        assert face.delete_faces([unknown]) == faceclient.FacesDeleted(deleted=[], not_found=[unknown])
        face.delete_collection(collection_name)
    with FaceClient(f"http://127.0.0.1:{free_port()}", ADMIN, timeout=2) as nobody, pytest.raises(ValueError):
        nobody.delete_faces(iter(()))  # refused before anything is sent (else: FaceConnectionError)


def test_delete_faces_sends_more_than_1000_ids_in_requests_of_1000(embedded, collection_name):
    sent: list[tuple[str, int]] = []

    def record(request: httpx.Request) -> None:
        if request.method == "POST":
            sent.append((request.url.path, len(json.loads(request.content)["face_ids"])))

    with FaceClient(embedded.url, ADMIN, collection=collection_name) as face:
        face.create_collection(collection_name)
        faces = enroll_rows(face, {"split": 2, "second": 1, "kept": 1}, collection_name)
        face._http.event_hooks["request"].append(record)
        unknown = [UNKNOWN_FACE + i for i in range(999)]
        # split's faces land in both requests; an id given twice (across the boundary) is sent once
        asked = [faces["split"][0], *unknown, faces["split"][1], *faces["second"], faces["split"][0]]
        erased = face.delete_faces(asked)
        assert sent == [(f"/collections/{collection_name}/faces/delete", 1000),
                        (f"/collections/{collection_name}/faces/delete", 2)]
        assert erased.not_found == unknown
        # one answer, as one request would give: by face id, and split deleted by the second request shows on both
        assert [(d.face_id, d.identity_id, d.identity_deleted) for d in erased.deleted] == sorted(
            [(f, "split", True) for f in faces["split"]] + [(faces["second"][0], "second", True)])
        assert [i.identity_id for i in face.iter_identities()] == ["kept"]
        face.delete_collection(collection_name)


def test_async_delete_faces(embedded, collection_name):
    with FaceClient(embedded.url, ADMIN) as sync:
        sync.create_collection(collection_name)
        faces = enroll_rows(sync, {"a-gone": 1, "a-left": 2}, collection_name)

    async def main() -> None:
        async with AsyncFaceClient(embedded.url, ADMIN, collection=collection_name) as face:
            unknown = [UNKNOWN_FACE + i for i in range(1000)]
            erased = await face.delete_faces([*faces["a-gone"], *unknown, faces["a-left"][1]])  # 2 requests
            assert [(d.face_id, d.identity_id, d.identity_deleted) for d in erased.deleted] == [
                (faces["a-gone"][0], "a-gone", True), (faces["a-left"][1], "a-left", False)]
            assert erased.not_found == unknown
            assert (await face.get_identity("a-left")).face_ids == faces["a-left"][:1]
            with pytest.raises(NotFoundError):
                await face.get_identity("a-gone")
            with pytest.raises(ValueError):
                await face.delete_faces([])
            await face.delete_collection(collection_name)

    asyncio.run(main())


# --- face_crop: the crop a keep_crops collection kept of a face (GET /faces/{face_id}/crop), as PNG bytes ----------
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_pixels(data: bytes) -> np.ndarray:
    """The PNG's pixels, after checking it is a 112x112 RGB PNG (the aligned crop the model saw)."""
    image = pytest.importorskip("PIL.Image")
    assert data.startswith(PNG_SIGNATURE)
    with image.open(io.BytesIO(data)) as crop:
        assert (crop.format, crop.size, crop.mode) == ("PNG", (112, 112), "RGB")
        return np.asarray(crop)


def kept_faces(face: FaceClient, collection: str) -> dict[str, list[int]]:
    """Two people enrolled from aligned crops into the keep_crops collection ``collection``: their face ids."""
    assert face.create_collection(collection, keep_crops=True).keep_crops is True
    return {person: face.enroll(person, face_files(person)[:2], image_type="aligned", collection=collection).face_ids
            for person in ENROLLED[:2]}


def test_face_crop_returns_the_kept_crop_as_png(embedded, collection_name):
    plain = f"{collection_name}-plain"
    with FaceClient(embedded.url, ADMIN) as face:
        faces = kept_faces(face, collection_name)
        bush = faces[ENROLLED[0]][0]
        crop = face.face_crop(bush, collection=collection_name)
        pixels = png_pixels(crop)
        # the crop the model saw: the aligned photo enrolled (decoded once more here: JPEG decoders may differ by 1)
        assert np.abs(pixels.astype(int) - decode_rgb(face_files(ENROLLED[0])[0]).astype(int)).mean() < 2
        others = [png_pixels(face.face_crop(f, collection=collection_name)) for f in faces[ENROLLED[1]]]
        assert all(np.abs(pixels.astype(int) - other.astype(int)).mean() > 10 for other in others)
        with FaceClient(embedded.url, ADMIN, collection=collection_name) as in_it:  # the client's collection
            assert in_it.face_crop(bush) == crop

        # a plain collection keeps no crop: crop_not_kept, a NotFoundError (its face exists)
        face.create_collection(plain)
        unkept = face.enroll("plain", face_files(ENROLLED[2])[0], collection=plain).face_ids[0]
        with pytest.raises(NotFoundError) as no_crop:
            face.face_crop(unkept, collection=plain)
        assert (no_crop.value.code, no_crop.value.status) == ("crop_not_kept", 404) and no_crop.value.request_id
        # no such face in the collection: face_not_found, whether it keeps crops or not (face ids are the
        # collection's own: another collection's face may have the same id)
        for collection in (collection_name, plain, None):
            with pytest.raises(NotFoundError) as missing:
                face.face_crop(UNKNOWN_FACE, collection=collection)
            assert (missing.value.code, missing.value.status) == ("face_not_found", 404), collection
        with pytest.raises(BadRequestError) as bad:
            face.face_crop(0, collection=collection_name)
        assert (bad.value.code, bad.value.status) == ("invalid_request", 422)

        # a read key may not see enrolled faces (write may)
        scoped = [face.create_key("read", collections=[collection_name], note="face_crop"),
                  face.create_key("write", collections=[collection_name], note="face_crop", rate_limit_rps=1)]
        reader, writer = (key.secret for key in scoped)
    with FaceClient(embedded.url, reader) as read_only, pytest.raises(AuthError) as refused:
        read_only.face_crop(bush, collection=collection_name)
    assert (refused.value.code, refused.value.status) == ("forbidden", 403)
    # a 429 is retried after Retry-After as for any other call, and the bytes come back whole
    started = time.monotonic()
    with FaceClient(embedded.url, writer) as slow:
        assert [slow.face_crop(bush, collection=collection_name) for _ in range(3)] == [crop] * 3
    assert time.monotonic() - started >= 1.5  # two of the three waited for Retry-After (1 s)
    with FaceClient(embedded.url, ADMIN) as face:
        for key in scoped:  # a collection a live key is scoped to is not deleted (collection_in_use)
            face.revoke_key(key.key_id)
        face.delete_collection(collection_name)
        face.delete_collection(plain)


def test_async_face_crop(embedded, collection_name):
    with FaceClient(embedded.url, ADMIN) as sync:
        faces = kept_faces(sync, collection_name)
        ids = faces[ENROLLED[0]] + faces[ENROLLED[1]]
        expected = [sync.face_crop(f, collection=collection_name) for f in ids]

    async def main() -> None:
        async with AsyncFaceClient(embedded.url, ADMIN, collection=collection_name) as face:
            crops = await asyncio.gather(*(face.face_crop(f) for f in ids))  # tasks share the pool
            assert list(crops) == expected and all(png_pixels(c).shape == (112, 112, 3) for c in crops)
            assert await face.face_crop(ids[0], collection=collection_name) == expected[0]
            for collection in (None, "default"):
                with pytest.raises(NotFoundError) as missing:
                    await face.face_crop(UNKNOWN_FACE, collection=collection)
                assert missing.value.code == "face_not_found"
            await face.delete_collection(collection_name)
            await face.create_collection(collection_name)  # again, plain: its faces have no crop
            unkept = (await face.enroll("plain", face_files(ENROLLED[2])[0])).face_ids[0]
            with pytest.raises(NotFoundError) as plain:
                await face.face_crop(unkept)
            assert (plain.value.code, plain.value.status) == ("crop_not_kept", 404)
            reader = await face.create_key("read", collections=[collection_name], note="async face_crop")
            async with AsyncFaceClient(embedded.url, reader.secret, collection=collection_name) as read_only:
                with pytest.raises(AuthError) as refused:
                    await read_only.face_crop(unkept)
            assert refused.value.status == 403
            await face.revoke_key(reader.key_id)
            await face.delete_collection(collection_name)

    asyncio.run(main())


# --- ids as path segments ------------------------------------------------------------------------------------
DOT_IDS = (".", "..")


def test_dot_ids_stay_in_their_path_segment(embedded, collection_name):
    """An id of "." or ".." was sent as a dot segment that httpx resolves away: delete_identity("..",
    collection=C) was DELETE /collections/C and erased the whole collection. Each is percent-encoded now:
    the server refuses it (422 invalid_identity_id, or 404) and nothing is touched, on every route that takes
    an id in its path, sync and async; an empty id is refused before anything is sent."""
    with FaceClient(embedded.url, ADMIN, collection=collection_name) as face:
        face.create_collection(collection_name)
        face.enroll(ENROLLED[0], face_files(ENROLLED[0])[0])
        face.enroll(ENROLLED[0], face_files(ENROLLED[0])[1], collection="default", replace=True)
        for dots in DOT_IDS:
            for call in (lambda: face.delete_identity(dots), lambda: face.get_identity(dots),
                         lambda: face.update_identity(dots, metadata={"x": 1}),
                         lambda: face.merge_identities(dots, ENROLLED[0]),
                         lambda: face.delete_identity(ENROLLED[0], collection=dots),
                         lambda: face.get_collection(dots), lambda: face.delete_collection(dots),
                         lambda: face.revoke_key(dots), lambda: face.get_alias(dots), lambda: face.delete_alias(dots),
                         lambda: face.get_job(dots), lambda: face.cancel_job(dots), lambda: face.resume_job(dots),
                         lambda: face.get_duplicates_job(dots)):
                with pytest.raises((BadRequestError, NotFoundError)) as e:
                    call()
                assert e.value.code in ("invalid_identity_id", "invalid_collection_name", "identity_not_found",
                                        "collection_not_found", "key_not_found", "alias_not_found", "job_not_found",
                                        "invalid_request"), e.value
        with pytest.raises(BadRequestError) as refused:
            face.delete_identity("..")
        assert refused.value.code == "invalid_identity_id"
        with pytest.raises(ValueError, match="empty"):
            face.delete_identity("")
        assert face.get_identity(ENROLLED[0]).face_count == 1  # the collection and its identity are still there
        assert face.get_identity(ENROLLED[0], collection="default").face_count == 1

    async def main() -> None:
        async with AsyncFaceClient(embedded.url, ADMIN, collection=collection_name) as aface:
            for dots in DOT_IDS:
                with pytest.raises(BadRequestError):
                    await aface.delete_identity(dots)
                with pytest.raises((BadRequestError, NotFoundError)):
                    await aface.get_identity(dots)
                with pytest.raises((BadRequestError, NotFoundError)):
                    await aface.delete_identity(ENROLLED[0], collection=dots)
                with pytest.raises((BadRequestError, NotFoundError)):
                    await aface.delete_collection(dots)
            assert (await aface.get_identity(ENROLLED[0])).face_count == 1

    asyncio.run(main())
    with FaceClient(embedded.url, ADMIN) as face:
        assert face.get_identity(ENROLLED[0], collection="default").face_count == 1
        face.delete_identity(ENROLLED[0], collection="default")
        assert face.delete_collection(collection_name).deleted_identities == 1


# --- enroll_folder: a person's refusal is that person's ------------------------------------------------------
def test_enroll_folder_reports_a_folder_name_that_is_no_identity_id_and_an_empty_folder(embedded, collection_name,
                                                                                       people_dir):
    """A folder whose name the service refuses as an identity id (U+200B, U+202E) aborted the whole run
    (BadRequestError invalid_identity_id from the "already enrolled?" read); an empty person folder counted
    as enrolled with 0 faces. Both are the person's failure now, the others enrolled, sync and async."""
    for odd in ("zero\u200bwidth", "bad\u202ename"):
        (people_dir / odd).mkdir()
        shutil.copy(face_files(ENROLLED[3])[0], people_dir / odd)
    (people_dir / "Empty_Person").mkdir()
    (people_dir / "Empty_Person" / "notes.txt").write_text("no photo here")

    def check(summary) -> None:
        assert (summary.people, summary.enrolled, summary.faces) == (6, 3, 6)
        assert {k: v.code for k, v in summary.failed.items()} == {
            "zero\u200bwidth": "invalid_identity_id", "bad\u202ename": "invalid_identity_id", "Empty_Person": "no_images"}
        assert summary.persons["Empty_Person"].faces == 0

    with FaceClient(embedded.url, ADMIN, collection=collection_name) as face:
        face.create_collection(collection_name)
        check(face.enroll_folder(people_dir, concurrency=1, progress=False))
        assert sorted(i.identity_id for i in face.iter_identities()) == sorted(ENROLLED[:3])
        face.delete_collection(collection_name)

    async def main() -> None:
        async with AsyncFaceClient(embedded.url, ADMIN, collection=collection_name) as aface:
            await aface.create_collection(collection_name)
            check(await aface.enroll_folder(people_dir, concurrency=1, progress=False))
            await aface.delete_collection(collection_name)

    asyncio.run(main())


def png_copy(source: Path, target: Path) -> int:
    """The photo re-encoded as PNG (some five times the JPEG's bytes): its size."""
    image = pytest.importorskip("PIL.Image")
    image.open(source).convert("RGB").save(target, format="PNG")
    return target.stat().st_size


def test_enroll_folder_splits_what_the_server_refuses_as_too_big_and_reports_refused_people(tmp_path, default_model):
    """A server that takes 2 images a request (FACE_MAX_FACES_PER_REQUEST) and a small body
    (FACE_MAX_REQUEST_BYTES), refusing likely duplicates (FACE_ENROLL_DUPLICATE_POLICY=refuse): a person of
    3 files (too_many_faces, details.limit 2) and one whose 2 files together are over the body limit
    (payload_too_large) failed as a whole; a possible_duplicate (409) aborted the whole run. Now the requests
    are split (by details.limit, else in halves) and sent again, every face enrolled; the duplicate is in
    ``failed``; max_bytes_per_request keeps requests under a body limit before the server has to refuse one."""
    people = tmp_path / "people"
    for person in (ENROLLED[1], "Colin_again"):
        (people / person).mkdir(parents=True)
    for path in face_files(ENROLLED[1]):
        shutil.copy(path, people / ENROLLED[1])
    shutil.copy(face_files(ENROLLED[1])[0], people / "Colin_again")  # 'P' < 'a': enrolled after Colin_Powell
    (people / ENROLLED[2]).mkdir()
    big = [png_copy(path, people / ENROLLED[2] / f"{path.stem}.png") for path in face_files(ENROLLED[2])[:2]]
    limit = max(big) + 3000  # one PNG (with the form's other fields) fits, two do not; three JPEGs do
    assert sum(big) > limit > sum(p.stat().st_size for p in face_files(ENROLLED[1])) + 3000
    proc = ServerProcess(tmp_path / "data", model=default_model, env={
        **ENV, "FACE_MAX_FACES_PER_REQUEST": "2", "FACE_MAX_REQUEST_BYTES": str(limit),
        "FACE_ENROLL_DUPLICATE_POLICY": "refuse"})

    def check(summary) -> None:
        assert (summary.people, summary.enrolled, summary.faces, summary.skipped_files) == (3, 2, 5, 0), summary
        assert {k: v.code for k, v in summary.failed.items()} == {"Colin_again": "possible_duplicate"}
        assert summary.persons[ENROLLED[1]].faces == 3 and summary.persons[ENROLLED[2]].faces == 2

    try:
        proc.wait_ready()
        with FaceClient(proc.url, ADMIN) as face:
            face.create_collection("sync-run")
            check(face.enroll_folder(people, collection="sync-run", concurrency=1, progress=False))
            assert {i.identity_id: i.face_count for i in face.iter_identities(collection="sync-run")} == {
                ENROLLED[1]: 3, ENROLLED[2]: 2}
            statuses: list[int] = []
            face._http.event_hooks["response"].append(
                lambda r: statuses.append(r.status_code) if r.request.url.path.endswith("/enroll") else None)
            capped = face.enroll_folder(people, collection="sync-run", replace=True,
                                        concurrency=1, progress=False, max_bytes_per_request=max(big) + 100)
            assert (capped.enrolled, capped.faces) == (2, 5) and list(capped.failed) == ["Colin_again"]
            assert statuses.count(413) == 1 and len(statuses) == 6  # Colin_Powell's 3 (too_many_faces) only

        async def main() -> None:
            async with AsyncFaceClient(proc.url, ADMIN) as aface:
                await aface.create_collection("async-run")
                check(await aface.enroll_folder(people, collection="async-run", concurrency=1, progress=False))

        asyncio.run(main())
    finally:
        proc.stop()


def test_enroll_folder_completes_a_person_left_partly_enrolled_and_reports_it_partial(embedded, collection_name,
                                                                                    tmp_path):
    """A person whose later request was refused (too_many_faces_for_collection) had a face stored yet was in
    ``failed`` ("not enrolled"); a rerun, taking any existing identity as done, reported it ``already``, one
    face of its files for good (as after a run interrupted mid-person: a 429, a lost connection). Now such a
    person is ``partial``; a rerun finds fewer faces than files and enrolls the person again from its folder
    (replace: a file added since counts, the faces are the folder's, not added to the old ones); a person with
    at least as many faces as files (one removed since) is left alone. Sync and async."""
    person = ENROLLED[1]

    def folder(name: str) -> Path:
        (tmp_path / name / person).mkdir(parents=True)
        for path in face_files(person)[:2]:
            shutil.copy(path, tmp_path / name / person)
        return tmp_path / name

    def partly(summary) -> None:  # one face stored, the person's second request refused by the collection's limit
        assert (summary.enrolled, summary.already, summary.faces, summary.failed) == (0, 0, 1, {}), summary
        assert {k: v.code for k, v in summary.partial.items()} == {person: "too_many_faces_for_collection"}
        assert summary.persons[person].partial and summary.persons[person].faces == 1

    def resumed(summary) -> None:
        assert (summary.enrolled, summary.already, summary.resumed, summary.faces) == (1, 0, 1, 3), summary
        assert summary.partial == summary.failed == {} and summary.persons[person].resumed

    def left_alone(summary) -> None:
        assert (summary.already, summary.enrolled, summary.resumed, summary.faces) == (1, 0, 0, 0), summary

    options = {"max_images_per_request": 1, "concurrency": 1, "progress": False}
    with FaceClient(embedded.url, ADMIN, collection=collection_name) as face:
        face.create_collection(collection_name, max_faces=1)
        root = folder("sync")
        partly(face.enroll_folder(root, **options))
        assert face.get_identity(person).face_count == 1
        face.update_collection(collection_name, max_faces=None)
        shutil.copy(face_files(person)[2], root / person)  # a file added since
        resumed(face.enroll_folder(root, **options))
        assert face.get_identity(person).face_count == 3
        (root / person / face_files(person)[0].name).unlink()
        left_alone(face.enroll_folder(root, **options))
        assert face.get_identity(person).face_count == 3
        face.delete_collection(collection_name)

    async def main() -> None:
        async with AsyncFaceClient(embedded.url, ADMIN, collection=collection_name) as aface:
            await aface.create_collection(collection_name, max_faces=1)
            root = folder("async")
            partly(await aface.enroll_folder(root, **options))
            await aface.update_collection(collection_name, max_faces=None)
            shutil.copy(face_files(person)[2], root / person)
            resumed(await aface.enroll_folder(root, **options))
            assert (await aface.get_identity(person)).face_count == 3
            (root / person / face_files(person)[0].name).unlink()
            left_alone(await aface.enroll_folder(root, **options))
            await aface.delete_collection(collection_name)

    asyncio.run(main())


def test_async_bulk_helpers_leave_nothing_running_when_they_raise(embedded, collection_name, people_dir):
    """AsyncFaceClient.identify_many and enroll_folder ran their batches (people) with asyncio.gather, which
    does not cancel the others when one raises: the caller had the exception while they went on sending
    requests (writes landed after it; once the client closed, 'Task exception was never retrieved'). Now the
    others are cancelled and waited for before the exception is raised: no task of theirs is left to send."""
    photos = [face_files(p)[0] for p in ENROLLED[:8]]

    async def main() -> None:
        async with AsyncFaceClient(embedded.url, ADMIN, collection=collection_name) as face:
            await face.create_collection(collection_name)
            await face.enroll(ENROLLED[0], face_files(ENROLLED[0])[0])
            with pytest.raises(NotFoundError) as e:  # among an id not enrolled: each batch refused
                await face.identify_many(photos, among=["nobody"], batch_size=1, concurrency=2, progress=False)
            assert e.value.code == "identity_not_found"
            assert asyncio.all_tasks() == {asyncio.current_task()}
            reader = await face.create_key("read", collections=[collection_name])
        async with AsyncFaceClient(embedded.url, reader.secret, collection=collection_name) as read_only:
            with pytest.raises(AuthError):  # a read key may not enroll: the run's error, raised
                await read_only.enroll_folder(people_dir, concurrency=2, progress=False)
            assert asyncio.all_tasks() == {asyncio.current_task()}
        async with AsyncFaceClient(embedded.url, ADMIN, collection=collection_name) as face:
            assert [i.identity_id async for i in face.iter_identities()] == [ENROLLED[0]]
            await face.revoke_key(reader.key_id)
            await face.delete_collection(collection_name)

    asyncio.run(main())


def test_pil_images_in_modes_png_cannot_hold_are_sent_as_the_server_reads_them(embedded):
    """A PIL image in a mode PNG cannot hold (CMYK, as Image.open gives for a CMYK JPEG; YCbCr, LAB, HSV,
    RGBX, premultiplied alpha) raised OSError "cannot write mode CMYK as PNG" in the client, though the server
    takes the CMYK JPEG's bytes. Now it is converted first (to RGB by Pillow, as the server converts CMYK:
    the same embedding; alpha kept, for the server's transparency rule); 16-bit and float images (I;16, I,
    F) are a ValueError before anything is sent: the service refuses them rather than guess a scale."""
    image = pytest.importorskip("PIL.Image")
    photo = image.open(face_files(ENROLLED[0])[0]).convert("RGB")
    cmyk_jpeg = io.BytesIO()
    photo.convert("CMYK").save(cmyk_jpeg, format="JPEG")
    with FaceClient(embedded.url, ADMIN) as face:
        as_bytes = face.embed(cmyk_jpeg.getvalue()).embeddings
        cmyk = image.open(io.BytesIO(cmyk_jpeg.getvalue()))
        assert cmyk.mode == "CMYK"
        np.testing.assert_allclose(face.embed(cmyk).embeddings, as_bytes, atol=1e-5)
        rgb = face.embed(photo).embeddings
        for mode in ("YCbCr", "LAB", "HSV", "RGBX", "RGBa"):
            assert float(face.embed(photo.convert(mode)).embeddings[0] @ rgb[0]) > 0.95, mode
        for mode, plain in (("La", "L"), ("PA", "P")):  # alpha (opaque): as the image without it
            without = face.embed(photo.convert(plain)).embeddings
            assert float(face.embed(photo.convert(mode)).embeddings[0] @ without[0]) > 0.99, mode
        for wide in (photo.convert("F"), photo.convert("I"), photo.convert("I").convert("I;16")):
            with pytest.raises(ValueError, match=re.escape(f"mode {wide.mode} ")):
                face.embed(wide)


def test_a_url_the_client_cannot_use_is_a_value_error_that_shows_no_password():
    """FaceClient("http://127.0.0.1:abc") raised httpx.InvalidURL; now a ValueError that says what is wrong
    with the URL, without its user info."""
    for url in ("http://127.0.0.1:abc", "http://user:s3cret-password@127.0.0.1:abc", "http://127.0.0.1:99999"):
        for client in (FaceClient, AsyncFaceClient):
            with pytest.raises(ValueError, match="port") as e:
                client(url, ADMIN)
            assert "s3cret" not in str(e.value) and "127.0.0.1" in str(e.value)


# --- the first call's version check -------------------------------------------------------------------------
Answer = tuple[int, dict[str, str], bytes]


@contextmanager
def web_server(answer: Callable[[str, int], Answer]) -> Iterator[tuple[str, list[str]]]:
    """Another HTTP server at the client's URL (a load balancer, another web app): ``answer(path, n)`` (n: the
    requests so far) gives each GET's status, headers and body. Yields its URL and the paths it was asked."""
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            asked.append(self.path)
            status, headers, body = answer(self.path, len(asked))
            self.send_response(status)
            for name, value in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", asked
    finally:
        server.shutdown()
        server.server_close()


def as_json(status: int, body: object, **headers: str) -> Answer:
    return status, {"Content-Type": "application/json", **headers}, json.dumps(body).encode()


def busy_once(path: str, n: int) -> Answer:
    """A replica still starting behind a load balancer: its first answer is 503 overloaded, Retry-After 1."""
    if n == 1:
        return as_json(503, {"error": {"code": "overloaded", "message": "busy"}}, **{"Retry-After": "1"})
    return as_json(200, {"status": "ok", "version": faceclient.__version__} if path == "/healthz" else {"items": []})


def test_the_version_check_retries_a_503_as_any_call(monkeypatch):
    """The first call's GET /healthz was sent once, outside the retry loop: a 503 with Retry-After became
    IncompatibleServerError ("install the client of the server's major version"). It is retried now."""
    with web_server(busy_once) as (url, asked):
        with FaceClient(url, "k" * 32) as face:
            assert face.list_collections() == []
        assert asked == ["/healthz", "/healthz", "/collections"]
        asked.clear()

        async def main() -> None:
            async with AsyncFaceClient(url, "k" * 32) as aface:
                assert await aface.list_collections() == []

        asyncio.run(main())
        assert asked == ["/healthz", "/healthz", "/collections"]


def test_the_version_check_raises_the_servers_own_error(tmp_path, default_model):
    """A server that answers /healthz with an error (421 host_not_allowed: a Host not in FACE_ALLOWED_HOSTS)
    gave IncompatibleServerError, hiding the error; now it is the error's own class and code."""
    proc = ServerProcess(tmp_path / "data", model=default_model, env={**ENV, "FACE_ALLOWED_HOSTS": "127.0.0.1"})
    try:
        proc.wait_ready()
        url = proc.url.replace("127.0.0.1", "localhost")
        with FaceClient(url, ADMIN) as face, pytest.raises(BadRequestError) as e:
            face.list_collections()
        assert (e.value.code, e.value.status) == ("host_not_allowed", 421)

        async def main() -> None:
            async with AsyncFaceClient(url, ADMIN) as aface:
                with pytest.raises(BadRequestError) as e:
                    await aface.list_collections()
                assert e.value.code == "host_not_allowed"

        asyncio.run(main())
        cli = subprocess.run([sys.executable, "-m", "faceclient.cli", "--url", url, "--key", ADMIN, "collections",
                              "list"], capture_output=True, text=True, timeout=60)
        assert cli.returncode == 1 and cli.stderr.startswith("error: host_not_allowed: "), cli.stderr
    finally:
        proc.stop()


NOT_THE_SERVICE: list[Answer] = [
    (200, {"Content-Type": "text/html"}, b"<!doctype html><title>an app</title>"),  # an SPA's index.html
    as_json(200, {"status": "ok"}),  # a health check of something else: no version
    as_json(200, ["ok"]),
]


@pytest.mark.parametrize("answer", NOT_THE_SERVICE)
def test_a_healthz_that_is_not_the_service_s_is_an_incompatible_server(answer):
    """A 200 /healthz that is not JSON, or JSON without the service's version, raised JSONDecodeError or
    pydantic's ValidationError (the CLI: a traceback, exit 1); now IncompatibleServerError (CLI: exit 3)."""
    with web_server(lambda path, n: answer) as (url, _):
        with FaceClient(url) as face, pytest.raises(IncompatibleServerError, match="not a face service"):
            face.list_collections()

        async def main() -> None:
            async with AsyncFaceClient(url) as aface:
                with pytest.raises(IncompatibleServerError, match="not a face service"):
                    await aface.list_collections()

        asyncio.run(main())
        cli = subprocess.run([sys.executable, "-m", "faceclient.cli", "--url", url, "collections", "list"],
                             capture_output=True, text=True, timeout=60)
        assert cli.returncode == 3 and cli.stderr.startswith("error: ") and cli.stderr.count("\n") == 1, cli.stderr


# --- secrets stay out of messages ---------------------------------------------------------------------------
SECRET = "secret-key-0123456789abcdef0123456789"
BAD_KEYS = [SECRET + "\n", "secret-clé-0123456789abcdef0123456789", "secret key 0123456789", "\tsecret-key"]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_a_key_that_cannot_be_a_header_is_refused_without_showing_it(key):
    """A key with a newline (read from a file) made httpx raise LocalProtocolError, whose text (the
    header's value) the client put in FaceConnectionError and the CLI printed; a non-ASCII key gave a
    UnicodeEncodeError traceback. The constructor refuses it now, naming no part of it."""
    for client in (FaceClient, AsyncFaceClient):
        with pytest.raises(ValueError, match="api_key") as e:
            client("http://127.0.0.1:1", key)
        assert "secret" not in str(e.value)


def test_url_user_info_is_not_in_messages(monkeypatch):
    """http://user:pass@host: the password was printed in FaceConnectionError (and so by the CLI), and in
    IncompatibleServerError."""
    nobody = f"http://user:s3cret-password@127.0.0.1:{free_port()}"
    with FaceClient(nobody, timeout=2) as face, pytest.raises(FaceConnectionError) as refused:
        face.health()
    assert "s3cret" not in str(refused.value) and "127.0.0.1" in str(refused.value)

    async def main(url: str) -> None:
        async with AsyncFaceClient(url, timeout=2) as aface:
            with pytest.raises(FaceConnectionError) as e:
                await aface.health()
            assert "s3cret" not in str(e.value)

    asyncio.run(main(nobody))
    monkeypatch.setattr("faceclient.client.__version__", "99.0.0")  # a client of another major
    with web_server(lambda path, n: as_json(200, {"status": "ok", "version": "0.1.0"})) as (url, _):
        with FaceClient(url.replace("//", "//user:s3cret-password@"), SECRET) as face:
            with pytest.raises(IncompatibleServerError) as other:
                face.list_collections()
        assert "s3cret" not in str(other.value) and "99.0.0" in str(other.value)


# --- identify_many: a refusal of the request is raised ------------------------------------------------------
def test_identify_many_raises_an_error_of_the_request_and_keeps_one_of_an_image(embedded, tmp_path):
    """identify_many caught every BadRequestError of a batch and sent each image alone: a refusal of the
    request itself (top_k=0: invalid_request) came back as every image's error, after N+1 requests. Now only
    an image's own refusal (IMAGE_CODES) or the request's size sends the images one by one; any other
    error is raised after the one request, sync and async."""
    photos = [*face_files(ENROLLED[1]), tmp_path / "notes.jpg"]
    photos[-1].write_bytes(b"not a photo")
    sent: list[str] = []
    with FaceClient(embedded.url, ADMIN) as face:
        face.enroll(ENROLLED[1], face_files(ENROLLED[1])[0], replace=True)
        face._http.event_hooks["request"].append(lambda r: sent.append(r.url.path))
        results = face.identify_many(photos, progress=False)  # the bad file: its own error, the rest answered
        assert [r.error.code if r.error else r.identity_id for r in results] == [ENROLLED[1]] * 3 + ["not_an_image"]
        sent.clear()
        with pytest.raises(BadRequestError) as e:
            face.identify_many(photos, top_k=0, progress=False)
        assert e.value.code == "invalid_request" and sent == ["/identify"]

        async def main() -> None:
            async with AsyncFaceClient(embedded.url, ADMIN) as aface:
                results = await aface.identify_many(photos, progress=False)
                assert [r.error.code for r in results if r.error] == ["not_an_image"]
                with pytest.raises(BadRequestError) as e:
                    await aface.identify_many(photos, top_k=0, progress=False)
                assert e.value.code == "invalid_request"

        asyncio.run(main())
        face.delete_identity(ENROLLED[1])
