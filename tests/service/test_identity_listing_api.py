"""GET /identities?prefix= over HTTP on both backends: pages of exactly the ids that start with the
prefix (NFC, as ids are stored), through next_cursor, in a named collection as in the default one."""

from __future__ import annotations

from tests.service.test_identity_update_api import enroll, error_code, served, vectors  # noqa: F401 - the fixture


def listed(client, prefix_path: str, params: dict) -> list[str]:
    ids, cursor = [], None
    while True:
        r = client.get(f"{prefix_path}/identities", params=params | ({"cursor": cursor} if cursor else {}))
        assert r.status_code == 200, r.text
        ids += [i["identity_id"] for i in r.json()["items"]]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            return ids


def test_identities_listed_by_prefix(served):  # noqa: F811 - the fixture
    assert served.post("/collections", json={"name": "listing"}).status_code == 201
    names = ["emp-001", "emp-002", "emp-010", "emp", "empire", "ops-1", "José", "Josefa", "Jos"]
    for n, name in enumerate(names):
        enroll(served, "/collections/listing", name, vectors(1, 200 + n))
    enroll(served, "", "emp-999", vectors(1, 300))  # another collection: never listed here
    at = "/collections/listing"
    assert listed(served, at, {"prefix": "emp-", "limit": 2}) == ["emp-001", "emp-002", "emp-010"]
    assert listed(served, at, {"prefix": "emp", "limit": 1}) == ["emp", "emp-001", "emp-002", "emp-010", "empire"]
    assert listed(served, at, {"prefix": "Jos\u0065\u0301", "limit": 5}) == ["José"]  # NFD typed, NFC stored
    assert listed(served, at, {"prefix": "nobody", "limit": 5}) == []
    assert listed(served, "", {"prefix": "emp-"}) == ["emp-999"]
    for bad in ({"prefix": ""}, {"prefix": "x" * 129}, {"prefix": "a\x00b"}):
        r = served.get(f"{at}/identities", params=bad)
        assert r.status_code == 422 and error_code(r) == "invalid_request", (bad, r.status_code, r.text[:300])
