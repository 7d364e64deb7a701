"""The OpenAPI document is valid (as generators read it), declares every error code, and says which
permission each route needs."""

from __future__ import annotations

import re

from openapi_spec_validator import validate

from service.app import create_app
from service.config import Settings
from service.errors import ErrorCode

ERROR = {"$ref": "#/components/schemas/ErrorResponse"}


def test_the_openapi_document_is_valid_and_names_the_roles(tmp_path):
    spec = create_app(Settings(data_dir=tmp_path)).openapi()
    validate(spec)
    assert "ApiKey" in spec["components"]["securitySchemes"]
    operations = [(path, method, op) for path, ops in spec["paths"].items() for method, op in ops.items()]
    for path, method, op in operations:
        if path in ("/healthz", "/readyz"):
            assert "security" not in op
            continue
        assert op["x-required-permission"] in {"embed", "read", "write", "admin"}, (method, path)
        assert "**Roles:**" in op["description"], (method, path)
        # what any keyed route may answer is declared (a generated client, a contract test reads them):
        # 401 without a key, 429 past a rate limit, 503 while starting, overloaded or its storage is away
        # or damaged, 403 where some role or scope is refused, 507 for a change, 504 for images
        errors = {code for code, answer in op["responses"].items()
                  if answer.get("content", {}).get("application/json", {}).get("schema") == ERROR}
        refusable = len(op["x-roles"]) < 4 or op["x-collection-scoped"]
        changes = method in ("post", "put", "patch", "delete") and op["x-required-permission"] in ("write", "admin")
        assert {"401", "429", "503"} | ({"403"} if refusable else set()) | ({"507"} if changes else set()) <= errors, \
            (method, path, sorted(op["responses"]))
    for path in ("/embed", "/enroll", "/identify", "/verify", "/detect", "/cluster", "/collections/{collection}/enroll"):
        assert "504" in spec["paths"][path]["post"]["responses"], path  # the model embeds its images
    # every status a route's description names ("409 `identity_exists`") is declared among its answers
    # (PATCH /identities/{id} named its 409s and declared none: schemathesis' status-code check found it)
    undeclared = [(method, path, status) for path, method, op in operations
                  for status in re.findall(r"\b([1-5]\d\d) `", op.get("description", "")) if status not in op["responses"]]
    assert not undeclared, undeclared
    ids = [op["operationId"] for _, _, op in operations]
    assert len(ids) == len(set(ids)), "operation ids must be unique (generated clients name methods by them)"
    assert {"enroll", "identify", "list_identities", "collection_enroll"} <= set(ids), "the routes' names"
    assert not [i for i in ids if i.endswith(("_get", "_post", "_delete"))], "no path and method in the names"
    prefixed = {p for p, _, _ in operations if p.startswith("/collections/{collection}/")}
    assert {"/collections/{collection}/enroll", "/collections/{collection}/identify",
            "/collections/{collection}/verify", "/collections/{collection}/identities",
            "/collections/{collection}/identities/{identity_id}"} <= prefixed


def test_the_links_lead_to_operations_and_fill_their_parameters_from_fields_that_exist(tmp_path):
    """Each OpenAPI link names an operation of the document, sets only parameters it has, every path
    parameter it needs, and reads them from a field of the response it is on (or the request's path)."""
    spec = create_app(Settings(data_dir=tmp_path)).openapi()
    schemas = spec["components"]["schemas"]
    operations = {op["operationId"]: (path, op) for path, ops in spec["paths"].items() for op in ops.values()}
    found = 0
    for source, (path, op) in operations.items():
        for status, response in op["responses"].items():
            body = response.get("content", {}).get("application/json", {}).get("schema", {})
            fields = schemas[body["$ref"].rsplit("/", 1)[-1]]["properties"] if "$ref" in body else {}
            for name, link in response.get("links", {}).items():
                found += 1
                target_path, target = operations[link["operationId"]]
                needed = set(re.findall(r"\{(\w+)\}", target_path))
                assert set(link["parameters"]) == needed, (source, name, sorted(link["parameters"]), sorted(needed))
                for value in link["parameters"].values():
                    if value.startswith("$request.path."):
                        assert value.rsplit(".", 1)[-1] in re.findall(r"\{(\w+)\}", path), (source, name, value)
                    else:
                        assert value.startswith("$response.body#/") and status.startswith("2"), (source, name, value)
                        assert value.split("/")[1] in fields, (source, name, value, sorted(fields))
    assert found >= 30  # enroll's seven on both collection routes, the jobs, collections, keys, aliases
    enrolled = spec["paths"]["/collections/{collection}/enroll"]["post"]["responses"]["200"]["links"]
    assert enrolled["GetIdentity"] == {"operationId": "collection_get_identity", "parameters": {
        "identity_id": "$response.body#/identity_id", "collection": "$request.path.collection"}}


def test_every_error_code_is_in_the_readme():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [code.value for code in ErrorCode if f"`{code.value}`" not in readme]
    assert not missing, missing


def test_every_field_of_the_routes_models_is_in_the_document(tmp_path):
    """What a generated client is made of: each request body (JSON and multipart alike) and each
    component has exactly the fields of the service's model of that name, and each route's response
    model is a component (a field added to a model but lost from the document fails here)."""
    from fastapi.routing import APIRoute
    from pydantic import BaseModel

    from service.http import schemas

    app = create_app(Settings(data_dir=tmp_path))
    spec = app.openapi()
    components = spec["components"]["schemas"]
    models = {name: cls for name, cls in vars(schemas).items()
              if isinstance(cls, type) and issubclass(cls, BaseModel) and cls.__module__ == schemas.__name__}

    def fields(cls: type[BaseModel]) -> set[str]:
        return {field.alias or name for name, field in cls.model_fields.items()}

    for name, component in components.items():
        assert name in models, f"component {name} is not a model of service/http/schemas.py"
        assert set(component.get("properties", {})) == fields(models[name]), name
    bodies = 0
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            for content_type, body in op.get("requestBody", {}).get("content", {}).items():
                schema = body["schema"]
                if "$ref" in schema:
                    schema = components[schema["$ref"].rsplit("/", 1)[1]]
                model = models[schema["title"]]
                assert set(schema["properties"]) == fields(model), (method, path, content_type)
                required = {f.alias or n for n, f in model.model_fields.items() if f.is_required()}
                assert set(schema.get("required", [])) == required, (method, path, content_type)
                if content_type == "multipart/form-data":  # a list in a form: image files, or one JSON text
                    for name, prop in schema["properties"].items():
                        assert prop.get("type") != "array" or prop["items"].get("format") == "binary", (path, name)
                        assert "anyOf" not in prop or all(o.get("type") != "array" for o in prop["anyOf"]), (path, name)
                bodies += 1
    assert bodies >= 16, "the face routes document both bodies, JSON and multipart"
    for route in app.routes:
        if isinstance(route, APIRoute) and route.include_in_schema and isinstance(route.response_model, type) \
                and issubclass(route.response_model, BaseModel):
            assert route.response_model.__name__ in components, route.path
