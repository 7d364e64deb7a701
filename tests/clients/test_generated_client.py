"""A client generated from the service's OpenAPI document by a standard generator (openapi-python-client,
pinned in the dev extra) imports and works against the real server, as a new user would generate and use
it: the command and its workarounds are the README's ("Generating a client")."""

from __future__ import annotations

import importlib
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from harness.fixtures import ENROLLED, b64, face_files
from harness.server import ServerProcess
from service.app import create_app
from service.config import Settings
from tests.conftest import backend_env

KEY = "generated-client-test-key"
PACKAGE = "face_api_client"  # what --output-path names the generated package (--meta none: a plain package)
# the generator's bug 1451 (two content types on one request body): the body's type says `| Unset` but
# the module does not import it. The README's one-line fix adds the import to every endpoint module.
BROKEN_IMPORT = "from ...types import Response, UNSET\n"
FIXED_IMPORT = "from ...types import Response, UNSET, Unset\n"
GENERATOR_CONFIG = "post_hooks: []\ncontent_type_overrides:\n  image/png: application/octet-stream\n"


def generator() -> list[str]:
    script = Path(sys.executable).parent / "openapi-python-client"
    if not script.exists():
        pytest.fail("openapi-python-client is not installed (the dev extra pins it)")
    return [str(script)]


def generate(spec: dict[str, Any], where: Path) -> list[str]:
    """The package generated from ``spec`` into ``where/PACKAGE`` with the README's command, then the
    README's fix; returns the modules that lacked the import."""
    (where / "openapi.json").write_text(json.dumps(spec))
    # no post hooks: the generated code is used as written (the default hooks run ruff from PATH); the PNG of
    # GET .../faces/{face_id}/crop read as bytes (the generator knows no image/png: without the override it
    # warns, and --fail-on-warning fails, "Unsupported content_type image/png")
    (where / "generator.yaml").write_text(GENERATOR_CONFIG)
    done = subprocess.run(generator() + ["generate", "--path", "openapi.json", "--meta", "none", "--output-path",
                                         PACKAGE, "--config", "generator.yaml", "--fail-on-warning"],
                          cwd=where, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    broken = []
    for module in sorted((where / PACKAGE / "api").rglob("*.py")):
        text = module.read_text()
        if "Unset" in text and not re.search(r"^from \S+ import .*\bUnset\b", text, re.M):
            broken.append(module.stem)
        module.write_text(text.replace(BROKEN_IMPORT, FIXED_IMPORT))  # what the README's sed does
    return broken


@pytest.fixture(scope="module")
def client_package(tmp_path_factory) -> dict[str, ModuleType]:
    """The generated package, imported from a tmp dir: {dotted name under the package: module}."""
    where = tmp_path_factory.mktemp("generated")
    spec = create_app(Settings(data_dir=where / "data", api_key=KEY)).openapi()  # type: ignore[arg-type]
    broken = generate(spec, where)
    # the routes with a JSON-or-multipart body, and only they, lacked the import (bug 1451)
    two_kinds = {op["operationId"] for ops in spec["paths"].values() for op in ops.values()
                 if len(op.get("requestBody", {}).get("content", {})) > 1}
    assert len(broken) == len(two_kinds) > 0, (broken, two_kinds)
    sys.path.insert(0, str(where))
    try:
        modules = {}
        for module in sorted((where / PACKAGE).rglob("*.py")):
            parts = module.relative_to(where).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name.removeprefix(PACKAGE + ".")] = importlib.import_module(name)  # every module imports
        yield modules
    finally:
        sys.path.remove(str(where))
        for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
            del sys.modules[name]
        shutil.rmtree(where, ignore_errors=True)


@pytest.fixture(params=["embedded", "postgres"])
def served(request, tmp_path, default_model):
    proc = ServerProcess(tmp_path / "data", model=default_model, env=backend_env(request, {"FACE_API_KEY": KEY}))
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def files(paths: list[Path], types: ModuleType) -> list[Any]:
    return [types.File(payload=io.BytesIO(p.read_bytes()), file_name=p.name, mime_type="image/jpeg") for p in paths]


def test_a_generated_client_enrolls_and_identifies_against_the_real_server(client_package, served, tmp_path):
    m = client_package
    models, types = m["models"], m["types"]
    served_spec = httpx.get(served.url + "/openapi.json", headers=served.key_headers, timeout=30).json()
    generated_from = create_app(Settings(data_dir=tmp_path / "spec", api_key=KEY)).openapi()  # type: ignore[arg-type]
    assert served_spec == generated_from, "the client is generated from the document the server serves"
    client = m["client"].AuthenticatedClient(base_url=served.url, token=KEY, prefix="", auth_header_name="X-API-Key",
                                             timeout=httpx.Timeout(60), raise_on_unexpected_status=True)
    anna, bert, carl = ENROLLED[:3]

    # enroll (JSON, base64 images), identify (JSON) a held-out photo of the same person
    r = m["api.identities.enroll"].sync_detailed(client=client, body=models.EnrollJsonEnrollRequest(
        identity_id=anna, images=[b64(p) for p in face_files(anna)[:2]], metadata=None))
    assert r.status_code == 200, r.content
    enrolled = r.parsed
    assert isinstance(enrolled, models.EnrollResponse)
    assert enrolled.identity_id == anna and enrolled.created is True and enrolled.face_count == 2
    assert len(enrolled.face_ids) == 2 and enrolled.additional_properties == {}, "every field is in the document"
    identify = m["api.recognition.identify"]
    r = identify.sync_detailed(client=client, body=models.IdentifyJsonIdentifyRequest(
        images=[b64(face_files(anna)[2])]))
    assert r.status_code == 200, r.content
    found = r.parsed
    assert isinstance(found, models.IdentifyResponse) and found.additional_properties == {}
    assert [(p.identity_id, p.known) for p in found.results] == [(anna, True)]
    assert found.results[0].candidates[0].identity_id == anna and found.gallery_identities == 1

    # multipart, as the generated client sends it (booleans spelt `False`, Python's way)
    r = m["api.identities.enroll"].sync_detailed(client=client, body=models.EnrollFilesEnrollRequest(
        identity_id=bert, images=files(face_files(bert)[:2], types), replace=False))
    assert r.status_code == 200, r.content
    assert r.parsed.identity_id == bert and r.parsed.face_count == 2
    # a form cannot send null: the document declares optional form fields without it, so the generated types
    # offer no None; a None given anyway (to a number or text) is sent as the text "None": read as not given
    form = models.EnrollFilesEnrollRequest
    assert all("None" not in form.__annotations__[f] for f in ("model_id", "min_quality", "metadata")), \
        form.__annotations__
    r = m["api.identities.enroll"].sync_detailed(client=client, body=form(
        identity_id=bert, images=files(face_files(bert)[2:3], types), model_id=None, min_quality=None))
    assert r.status_code == 200, r.content
    assert r.parsed.face_count == 3
    r = identify.sync_detailed(client=client, body=models.IdentifyFilesIdentifyRequest(
        images=files([face_files(bert)[2]], types)))
    assert r.status_code == 200, r.content
    assert [p.identity_id for p in r.parsed.results] == [bert]

    # embeddings instead of images, in a form too: sent as the multipart model declares them
    r = m["api.faces.embed"].sync_detailed(client=client, body=models.EmbedJsonEmbedRequest(
        images=[b64(face_files(bert)[2])]))
    assert r.status_code == 200, r.content
    rows, model_id = r.parsed.embeddings, r.parsed.model_id
    form = models.IdentifyFilesIdentifyRequest
    assert form.__annotations__["embeddings"] == "str | Unset", "a list in a form is its JSON text"
    r = identify.sync_detailed(client=client, body=form(embeddings=json.dumps(rows), model_id=model_id))
    assert r.status_code == 200, r.content
    assert [p.identity_id for p in r.parsed.results] == [bert]

    # the same in a collection, which sees only its own identities
    r = m["api.collections.create_collection"].sync_detailed(
        client=client, body=models.CollectionCreate(name="site-a"))
    assert r.status_code == 201, r.content
    assert r.parsed.name == "site-a" and r.parsed.identities == 0
    r = m["api.identities.collection_enroll"].sync_detailed("site-a", client=client, body=models.CollectionEnrollJsonEnrollRequest(
        identity_id=carl, images=[b64(p) for p in face_files(carl)[:2]]))
    assert r.status_code == 200, r.content
    assert r.parsed.created is True
    collection_identify = m["api.recognition.collection_identify"]
    r = collection_identify.sync_detailed("site-a", client=client, body=models.CollectionIdentifyJsonIdentifyRequest(
        images=[b64(face_files(carl)[2]), b64(face_files(anna)[2])]))
    assert r.status_code == 200, r.content
    assert [p.identity_id for p in r.parsed.results] == [carl, None]
    assert r.parsed.gallery_identities == 1
    r = collection_identify.sync_detailed("site-a", client=client, body=models.CollectionIdentifyFilesIdentifyRequest(
        images=files([face_files(carl)[2]], types)))
    assert r.status_code == 200, r.content
    assert [p.identity_id for p in r.parsed.results] == [carl]

    # list identities: the default collection's, then the collection's
    r = m["api.identities.list_identities"].sync_detailed(client=client, limit=10)
    assert r.status_code == 200, r.content
    page = r.parsed
    assert isinstance(page, models.IdentityPage) and page.next_cursor is None
    assert sorted(item.identity_id for item in page.items) == sorted([anna, bert])
    r = m["api.identities.collection_list_identities"].sync_detailed("site-a", client=client)
    assert r.status_code == 200, r.content
    assert [item.identity_id for item in r.parsed.items] == [carl]

    # errors arrive as the document's ErrorResponse, with the code from the README's table
    stranger = m["client"].AuthenticatedClient(base_url=served.url, token="wrong", prefix="",
                                               auth_header_name="X-API-Key", timeout=httpx.Timeout(60))
    r = m["api.identities.list_identities"].sync_detailed(client=stranger)
    assert r.status_code == 401 and isinstance(r.parsed, models.ErrorResponse)
    assert r.parsed.error.code == "unauthorized"
    r = identify.sync_detailed(client=client, body=models.IdentifyJsonIdentifyRequest(images=["not base64!"]))
    assert r.status_code == 422 and r.parsed.error.code == "invalid_base64"
    # a face's kept crop (PNG): the default collection keeps none, so its 404 crop_not_kept
    r = m["api.identities.face_crop"].sync_detailed(enrolled.face_ids[0], client=client)
    assert r.status_code == 404 and isinstance(r.parsed, models.ErrorResponse), r.content
    assert r.parsed.error.code == "crop_not_kept"
