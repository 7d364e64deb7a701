"""faceclient kept true to the server: the OpenAPI document a real server serves is read, and every route,
answer field, request field and error code it declares must be known to the client. A field or code added on
the server and not in the client fails here (issue 24)."""

from __future__ import annotations

import inspect
from typing import Any

import httpx
import pytest
from faceclient import ERROR_CLASSES, FaceClient
from faceclient.models import SERVER_MODELS

from tests.clients.conftest import ADMIN
from tests.clients.test_client import FAMILY_STATUSES

# each operation of the document -> the FaceClient method that calls it (collection_* take collection=...)
METHODS = {
    "healthz": "health", "readyz": "ready", "embed": "embed", "detect": "detect", "list_keys": "list_keys",
    "create_key": "create_key", "revoke_key": "revoke_key", "whoami": "whoami", "audit": "iter_audit",
    "list_collections": "list_collections", "create_collection": "create_collection",
    "get_collection": "get_collection", "update_collection": "update_collection",
    "delete_collection": "delete_collection", "verify": "verify",
    "identify": "identify", "enroll": "enroll", "list_identities": "iter_identities", "get_identity": "get_identity",
    "update_identity": "update_identity", "delete_identity": "delete_identity", "duplicates": "duplicates", "outliers": "outliers",
    "merge_identity": "merge_identities", "move_face": "move_face", "delete_face": "delete_face",
    "delete_faces": "delete_faces", "face_crop": "face_crop", "cluster": "cluster",
    "set_alias": "set_alias", "get_alias": "get_alias", "list_aliases": "list_aliases", "delete_alias": "delete_alias",
    "migrate_collection": "migrate_collection", "list_jobs": "list_jobs", "get_job": "get_job",
    "cancel_job": "cancel_job", "resume_job": "resume_job", "start_duplicates_job": "start_duplicates_job",
    "get_duplicates_job": "get_duplicates_job", "start_outliers_job": "start_outliers_job",
    "get_outliers_job": "get_outliers_job",
}
NOT_IN_THE_CLIENT = {"metrics": "Prometheus text for a scraper, not a program's API"}
# a request field -> the client's parameter for it, where the names differ; `cursor`: the iterators page themselves
PARAMETERS = {"image_a": ("a",), "image_b": ("b",), "limit": ("page_size", "limit"), "collection": ("collection", "name")}
PAGED_BY_THE_CLIENT = {"cursor"}


@pytest.fixture(scope="module")
def served_document(embedded) -> dict[str, Any]:
    return httpx.get(embedded.url + "/openapi.json", headers={"X-API-Key": ADMIN}, timeout=30).json()


def operations(document: dict[str, Any]) -> list[dict[str, Any]]:
    return [op for ops in document["paths"].values() for op in ops.values()]


def refs(schema: Any) -> set[str]:
    """The components a schema refers to, directly or inside its properties, items, unions."""
    if isinstance(schema, dict):
        found = {schema["$ref"].rsplit("/", 1)[-1]} if "$ref" in schema else set()
        return found.union(*(refs(v) for v in schema.values()))
    if isinstance(schema, list):
        return set().union(*(refs(v) for v in schema))
    return set()


def reachable(document: dict[str, Any], names: set[str]) -> set[str]:
    components, seen, todo = document["components"]["schemas"], set(), list(names)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(refs(components[name]))
    return seen


def method_of(operation_id: str) -> str:
    return METHODS[operation_id.removeprefix("collection_")] if operation_id.startswith("collection_") and \
        operation_id not in METHODS else METHODS[operation_id]


def test_every_route_of_the_served_document_has_its_client_method(served_document):
    for op in operations(served_document):
        if op["operationId"] in NOT_IN_THE_CLIENT:
            continue
        assert hasattr(FaceClient, method_of(op["operationId"])), op["operationId"]


def test_every_answer_field_of_the_served_document_is_in_the_client_models(served_document):
    answers = set().union(*(refs(response) for op in operations(served_document)
                            for response in op["responses"].values()))
    components = served_document["components"]["schemas"]
    for name in sorted(reachable(served_document, answers)):
        if name == "ErrorResponse":  # {"error": ErrorBody}: read by the client's error handling
            assert set(components[name]["properties"]) == {"error"}
            continue
        assert name in SERVER_MODELS, f"the server answers {name}; faceclient.models.SERVER_MODELS has no model"
        missing = set(components[name].get("properties", {})) - set(SERVER_MODELS[name].model_fields)
        assert not missing, f"{name}: fields {sorted(missing)} are not in {SERVER_MODELS[name].__name__}"


def test_every_request_field_of_the_served_document_is_a_client_parameter(served_document):
    components = served_document["components"]["schemas"]
    for op in operations(served_document):
        if op["operationId"] in NOT_IN_THE_CLIENT:
            continue
        fields = {p["name"] for p in op.get("parameters", [])}
        for content in op.get("requestBody", {}).get("content", {}).values():
            schema = content["schema"]
            schema = components[schema["$ref"].rsplit("/", 1)[-1]] if "$ref" in schema else schema
            fields |= set(schema["properties"])
        method = method_of(op["operationId"])
        parameters = set(inspect.signature(getattr(FaceClient, method)).parameters)
        missing = {f for f in fields - PAGED_BY_THE_CLIENT if not parameters & set(PARAMETERS.get(f, (f,)))}
        assert not missing, f"{op['operationId']}: FaceClient.{method} takes no {sorted(missing)}"


def test_every_error_code_of_the_served_document_has_its_client_class(served_document):
    declared = served_document["components"]["schemas"]["ErrorBody"]["properties"]["code"]["x-error-codes"]
    assert len(declared) > 40
    missing = set(declared) - set(ERROR_CLASSES)
    assert not missing, f"error codes the client does not know: {sorted(missing)}"
    for code, status in declared.items():
        expected = FAMILY_STATUSES.get(ERROR_CLASSES[code], set(range(400, 500)) - {401, 404, 409, 429})
        assert status in expected, (code, ERROR_CLASSES[code], status)
