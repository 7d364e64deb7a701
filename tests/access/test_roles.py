"""Every route against every role, over HTTP, on both backends: allowed, or 403 ``forbidden``.

The table below is the policy as users read it in the README; the test also checks that it names
every route the app serves (the OpenAPI document's, and those it leaves out: the docs pages, the
console, the static mounts), so a route added without a decision fails here.
"""

from __future__ import annotations

import base64
import itertools

import fastapi.routing
import pytest
from starlette.routing import Mount

from harness.fixtures import face_files
from service.app import create_app
from service.config import Settings
from tests.access.conftest import ADMIN_SECRET, KeyedServer, unit_vectors

# (method, path) -> the permission it needs; "scoped": the collection must be in the key's scope
POLICY: dict[tuple[str, str], tuple[str, bool]] = {
    ("POST", "/embed"): ("embed", False),
    ("POST", "/detect"): ("embed", False),
    ("POST", "/cluster"): ("embed", False),
    ("GET", "/whoami"): ("embed", False),
    ("POST", "/verify"): ("read", True),
    ("POST", "/identify"): ("read", True),
    ("GET", "/identities"): ("read", True),
    ("GET", "/identities/{identity_id}"): ("read", True),
    ("POST", "/enroll"): ("write", True),
    ("DELETE", "/identities/{identity_id}"): ("write", True),
    ("PATCH", "/identities/{identity_id}"): ("write", True),
    ("POST", "/identities/{identity_id}/merge"): ("write", True),
    ("POST", "/faces/{face_id}/move"): ("write", True),
    ("DELETE", "/faces/{face_id}"): ("write", True),
    ("POST", "/faces/delete"): ("write", True),
    ("GET", "/faces/{face_id}/crop"): ("write", True),
    ("POST", "/collections/{collection}/verify"): ("read", True),
    ("POST", "/collections/{collection}/identify"): ("read", True),
    ("GET", "/collections/{collection}/identities"): ("read", True),
    ("GET", "/collections/{collection}/identities/{identity_id}"): ("read", True),
    ("POST", "/collections/{collection}/enroll"): ("write", True),
    ("DELETE", "/collections/{collection}/identities/{identity_id}"): ("write", True),
    ("PATCH", "/collections/{collection}/identities/{identity_id}"): ("write", True),
    ("POST", "/collections/{collection}/identities/{identity_id}/merge"): ("write", True),
    ("POST", "/collections/{collection}/faces/{face_id}/move"): ("write", True),
    ("DELETE", "/collections/{collection}/faces/{face_id}"): ("write", True),
    ("POST", "/collections/{collection}/faces/delete"): ("write", True),
    ("GET", "/collections/{collection}/faces/{face_id}/crop"): ("write", True),
    ("GET", "/duplicates"): ("read", True),
    ("GET", "/outliers"): ("read", True),
    ("GET", "/collections/{collection}/duplicates"): ("read", True),
    ("GET", "/collections/{collection}/outliers"): ("read", True),
    ("POST", "/duplicates/jobs"): ("read", True),
    ("GET", "/duplicates/jobs/{job_id}"): ("read", True),
    ("POST", "/collections/{collection}/duplicates/jobs"): ("read", True),
    ("GET", "/collections/{collection}/duplicates/jobs/{job_id}"): ("read", True),
    ("POST", "/outliers/jobs"): ("read", True),
    ("GET", "/outliers/jobs/{job_id}"): ("read", True),
    ("POST", "/collections/{collection}/outliers/jobs"): ("read", True),
    ("GET", "/collections/{collection}/outliers/jobs/{job_id}"): ("read", True),
    ("GET", "/collections"): ("read", False),
    ("GET", "/collections/{collection}"): ("read", True),
    ("POST", "/collections"): ("admin", False),
    ("PATCH", "/collections/{collection}"): ("admin", False),
    ("DELETE", "/collections/{collection}"): ("admin", False),
    ("POST", "/keys"): ("admin", False),
    ("GET", "/keys"): ("admin", False),
    ("DELETE", "/keys/{key_id}"): ("admin", False),
    ("GET", "/audit"): ("admin", False),
    ("PUT", "/aliases/{name}"): ("admin", False),
    ("GET", "/aliases"): ("admin", False),
    ("GET", "/aliases/{name}"): ("admin", False),
    ("DELETE", "/aliases/{name}"): ("admin", False),
    ("GET", "/metrics"): ("admin", False),
    ("POST", "/collections/{collection}/migrate"): ("admin", True),
    ("GET", "/jobs"): ("admin", False),
    ("GET", "/jobs/{job_id}"): ("admin", False),
    ("POST", "/jobs/{job_id}/cancel"): ("admin", False),
    ("POST", "/jobs/{job_id}/resume"): ("admin", False),
    ("GET", "/healthz"): ("public", False),
    ("GET", "/readyz"): ("public", False),
}
# served but not in the OpenAPI document (include_in_schema=False, and mounts: "{path}", any file under them)
HIDDEN: dict[tuple[str, str], tuple[str, bool]] = {
    ("GET", "/openapi.json"): ("embed", False),  # any key, with FACE_API_KEY set (public with FACE_PUBLIC_DOCS)
    ("GET", "/docs"): ("embed", False),
    ("GET", "/redoc"): ("embed", False),
    ("GET", "/docs/assets/{path}"): ("public", False),  # Swagger UI's and ReDoc's scripts: no data
    ("GET", "/console"): ("public", False),  # a redirect to /console/
    ("GET", "/console/config.json"): ("public", False),  # the key header's name, whether a key is needed
    ("GET", "/console/{path}"): ("public", False),  # the console's static files: its API calls carry the key
}
POLICY |= HIDDEN
GRANTS = {"admin": {"embed", "read", "write", "admin"}, "write": {"embed", "read", "write"},
          "read": {"embed", "read"}, "embed": {"embed"}}
ROLES = ["admin", "write", "read", "embed"]
COUNTER = itertools.count()  # names made by the calls, unique across tests (they share a server)


def served_routes(app) -> set[tuple[str, str]]:
    """(method, path) of every route the app serves, HEAD aside (a mount: GET of "{path}" under it)."""
    included = getattr(fastapi.routing, "_IncludedRouter", ())  # FastAPI 0.165 keeps included routers wrapped
    served: set[tuple[str, str]] = set()

    def walk(routes) -> None:
        for route in routes:
            if included and isinstance(route, included):
                walk(route.effective_candidates())
                continue
            path = getattr(route, "path", None) or route.original_route.path
            route = getattr(route, "original_route", route)
            if isinstance(route, Mount):
                served.add(("GET", f"{route.path}/{{path}}"))
                continue
            served.update((method, path) for method in (getattr(route, "methods", None) or ()) if method != "HEAD")

    walk(app.routes)
    return served


def test_the_policy_names_every_route_the_app_serves(tmp_path):
    """Routes left out of the OpenAPI document (the docs pages, the console, mounts) are in the table too."""
    served = served_routes(create_app(Settings(data_dir=tmp_path, api_key=ADMIN_SECRET)))
    assert len(served) > 60
    assert served == set(POLICY), served ^ set(POLICY)


def test_the_policy_names_every_route_of_the_openapi_document(keyed: KeyedServer):
    with keyed.client("admin") as admin:
        spec = admin.get("/openapi.json").json()
    declared = {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}
    assert declared == set(POLICY) - set(HIDDEN), (declared ^ (set(POLICY) - set(HIDDEN)))
    for (method, path), (permission, scoped) in POLICY.items():
        if (method, path) in HIDDEN:
            continue
        operation = spec["paths"][path][method.lower()]
        if permission == "public":
            assert "x-required-permission" not in operation
            continue
        assert operation["x-required-permission"] == permission, (method, path)
        assert operation["x-collection-scoped"] == scoped, (method, path)
        assert set(operation["x-roles"]) == {r for r in ROLES if permission in GRANTS[r]}


class Calls:
    """A request for each route, with a body good enough to pass validation (the route's own answer
    may be 404 or 422: only 401/403 say what access decided)."""

    def __init__(self, server: KeyedServer) -> None:
        self.server = server
        self.face = base64.b64encode(face_files("Colin_Powell")[0].read_bytes()).decode()
        self.vectors = unit_vectors(3, seed=5)
        self.counter = COUNTER

    def url(self, path: str, collection: str = "alpha") -> str:
        """The path with its parameters filled in: names no call has used, ids of nothing."""
        n = next(self.counter)
        path = {"/console/{path}": "/console/", "/docs/assets/{path}": "/docs/assets/swagger-ui.css"}.get(path, path)
        url = path.replace("{collection}", collection).replace("{identity_id}", f"someone-{n}")
        url = url.replace("{face_id}", str(10**12 + n))  # no such face: 404 once access allowed it
        url = url.replace("{name}", f"matrix-alias-{n}")
        url = url.replace("{job_id}", "job_000000000000")  # no such job: 404 once access allowed it
        if "{key_id}" in url:
            url = url.replace("{key_id}", self.server.key_ids.get("throwaway", "000000000000"))
        return url

    def request(self, client, method: str, path: str, collection: str = "alpha"):
        model = self.server.model_id
        n = next(self.counter)
        url = self.url(path, collection)
        body = None
        if path.endswith("/embed") or path.endswith("/detect") or path == "/cluster":
            body = {"images": [self.face]}
        elif path.endswith("/enroll"):
            body = {"identity_id": f"matrix-{n}", "embeddings": [self.vectors[0]], "model_id": model}
        elif path.endswith("/identify"):
            body = {"embeddings": [self.vectors[1]], "model_id": model}
        elif path.endswith("/verify"):
            body = {"embedding_a": self.vectors[1], "embedding_b": self.vectors[2], "model_id": model}
        elif path.endswith("/merge"):
            body = {"into": f"someone-else-{n}"}
        elif path.endswith("/move"):
            body = {"identity_id": f"someone-else-{n}"}
        elif path.endswith("/faces/delete"):
            body = {"face_ids": [10**12 + n]}  # no such face: 200 with it not_found once access allowed it
        elif path == "/collections" and method == "POST":
            body = {"name": f"made-{n}"}
        elif path.endswith("/identities/{identity_id}") and method == "PATCH":
            body = {"metadata_patch": {"matrix": n}}
        elif path == "/collections/{collection}" and method == "PATCH":
            body = {"retention_days": None}  # as it is: nothing changes
        elif path == "/keys" and method == "POST":
            body = {"role": "read", "note": "matrix"}
        elif path == "/aliases/{name}" and method == "PUT":
            body = {"collection": collection}
        if method == "DELETE" and path == "/collections/{collection}":
            url = f"/collections/doomed-{n}"
            with self.server.client("admin") as admin:
                assert admin.post("/collections", json={"name": f"doomed-{n}"}).status_code == 201
        if method == "DELETE" and path == "/aliases/{name}":
            with self.server.client("admin") as admin:
                assert admin.put(url, json={"collection": collection}).status_code == 200
        if method == "DELETE" and path == "/keys/{key_id}":
            self.server.make_key("throwaway", "read")
            url = f"/keys/{self.server.key_ids['throwaway']}"
        return client.request(method, url, json=body)


@pytest.mark.parametrize("role", ROLES)
def test_every_role_against_every_route(keyed: KeyedServer, role: str):
    calls = Calls(keyed)
    with keyed.client("admin" if role == "admin" else f"key-{role}") as client:
        for (method, path), (permission, _) in POLICY.items():
            r = calls.request(client, method, path)
            if permission == "public" or permission in GRANTS[role]:
                assert r.status_code not in (401, 403), (role, method, path, r.status_code, r.text)
                assert r.status_code < 500, (role, method, path, r.text)
            else:
                assert r.status_code == 403, (role, method, path, r.status_code, r.text)
                assert r.json()["error"]["code"] == "forbidden"


def test_without_a_key_every_route_but_the_probes_is_401(keyed: KeyedServer):
    calls = Calls(keyed)
    for secret in (None, "fk_000000000000_" + "A" * 43, "not-even-the-format"):
        with keyed.client(secret) as client:
            for (method, path), (permission, _) in POLICY.items():
                r = calls.request(client, method, path)
                if permission == "public":
                    assert r.status_code in (200, 307), (method, path, r.text)  # 307: /console to /console/
                else:
                    assert r.status_code == 401, (secret, method, path, r.status_code)
                    assert r.json()["error"]["code"] == "unauthorized"


@pytest.mark.parametrize("role", ["write", "read"])
def test_a_scoped_key_is_refused_outside_its_collections(keyed: KeyedServer, role: str):
    """A key for `alpha` may use alpha's routes, and gets 403 in `beta`, in `default` (the unprefixed
    routes) and in a collection that does not exist (no probing for names)."""
    calls = Calls(keyed)
    scoped = {(m, p): v for (m, p), v in POLICY.items() if v[1] and p.startswith("/collections/{collection}")}
    with keyed.client(f"{role}-alpha") as client:
        for (method, path), (permission, _) in scoped.items():
            inside = calls.request(client, method, path, "alpha")
            if permission in GRANTS[role]:
                assert inside.status_code not in (401, 403), (role, method, path, inside.text)
            else:
                assert inside.status_code == 403
            for elsewhere in ("beta", "default", "no-such-collection"):
                r = calls.request(client, method, path, elsewhere)
                assert r.status_code == 403, (role, method, path, elsewhere, r.status_code)
                assert r.json()["error"]["code"] == "forbidden"
        for (method, path), (_, scoped_) in POLICY.items():
            if scoped_ and not path.startswith("/collections"):  # the default collection's routes
                assert calls.request(client, method, path).status_code == 403, (method, path)
        for (method, path), (permission, _) in POLICY.items():  # a scope never opens an admin route
            if permission == "admin":
                r = calls.request(client, method, path)
                assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", (method, path, r.text)
        listed = client.get("/collections").json()["items"]
        assert [c["name"] for c in listed] == ["alpha"]
        me = client.get("/whoami").json()
        assert me["role"] == role and me["collections"] == ["alpha"] and me["open_mode"] is False


def test_force_quality_needs_an_admin_key(keyed: KeyedServer):
    face = base64.b64encode(face_files("Tony_Blair")[0].read_bytes()).decode()
    body = {"identity_id": "forced", "images": [face], "force_quality": True}
    with keyed.client("key-write") as writer:
        r = writer.post("/enroll", json=body)
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    with keyed.client("admin") as admin:
        assert admin.post("/enroll", json=body).status_code == 200


def test_access_is_decided_before_the_body_is_read(keyed: KeyedServer):
    """A request the key may not make gets its 401 or 403 whatever its body holds, on every route with a
    body: an unauthenticated client cannot make the service parse (up to FACE_MAX_BODY_BYTES of) JSON,
    nor learn from a 400 or 415 how a route reads its body."""
    calls = Calls(keyed)
    broken = [(b"{", "application/json"), (b'{"note": NaN}', "application/json"), (b"[" * 5000, None),
              (b"role=read", "text/plain"), (b"\xff\xfe", "application/json")]
    with_body = [(m, p) for (m, p), (permission, _) in POLICY.items() if m in ("POST", "PUT") and permission != "public"]
    assert len(with_body) > 20
    denied = {None: 401, "fk_000000000000_" + "A" * 43: 401, "key-embed": 403}
    for secret, status in denied.items():
        with keyed.client(secret) as client:
            for method, path in with_body:
                if POLICY[(method, path)][0] == "embed" and status == 403:
                    continue  # an embed key may make these
                url = calls.url(path)
                for content, media in broken:
                    headers = {"content-type": media} if media else {}
                    r = client.request(method, url, content=content, headers=headers)
                    assert r.status_code == status, (secret, method, path, content[:20], r.status_code, r.text)
    with keyed.client("read-alpha") as scoped:  # a key scoped to alpha, in beta
        for method, path in with_body:
            if POLICY[(method, path)][1] and path.startswith("/collections/{collection}"):
                for content, media in broken:
                    headers = {"content-type": media} if media else {}
                    r = scoped.request(method, calls.url(path, "beta"), content=content, headers=headers)
                    assert r.status_code == 403, (method, path, content[:20], r.status_code, r.text)
