"""The OpenAPI document is valid (as generators read it), declares every error code, and says which
permission each route needs."""

from __future__ import annotations

from openapi_spec_validator import validate

from service.app import create_app
from service.config import Settings
from service.errors import ErrorCode


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
    ids = [op["operationId"] for _, _, op in operations]
    assert len(ids) == len(set(ids)), "operation ids must be unique (generated clients name methods by them)"
    prefixed = {p for p, _, _ in operations if p.startswith("/collections/{collection}/")}
    assert {"/collections/{collection}/enroll", "/collections/{collection}/identify",
            "/collections/{collection}/verify", "/collections/{collection}/identities",
            "/collections/{collection}/identities/{identity_id}"} <= prefixed


def test_every_error_code_is_in_the_readme():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [code.value for code in ErrorCode if f"`{code.value}`" not in readme]
    assert not missing, missing
