"""Every route of the served OpenAPI document, fed hostile input derived from the document itself, on
both backends: each path and query parameter given values of the wrong kind, size and encoding, each
JSON body field given every wrong type (lone surrogates and integers past 64 bits included), broken and
mislabelled bodies, broken forms and keys that are not text. The server must answer every request
with a 4xx of the error vocabulary, never a 5xx or a dropped connection, log no unhandled error, and
keep what it stored: an identity and a collection that no request names are unchanged at the end.

The sweep is derived from the document, so a route added later is swept without a change here (the
test checks that every operation was reached); what it leaves out (the console's files, the docs, paths
of no route) gets every method on hostile and traversing paths. About 6,000 requests a backend, ~10 s. Its first runs
found 500s: an audit cursor no backend made; a face id past 2^63-1 (SQLite); a lone surrogate echoed
in an error message, or sent to PostgreSQL; a NUL in a job or key id, an audit or job filter, a key's
note (PostgreSQL's text); "NaN" as a key's expiry (PostgreSQL's JSON). And the routes whose bodies
FastAPI parsed took NaN and answered bad JSON with other codes than the image routes."""

from __future__ import annotations

import base64
import itertools
import json
import re
from collections import Counter
from typing import Any

import httpx
import pytest

from harness.fixtures import face_files
from service.errors import ErrorCode
from tests.conftest import backend_env
from tests.server import ServerProcess

KEY = "sweep-admin-key-" + "k" * 24
HEADERS = {"X-API-Key": KEY}
FACE_BYTES = face_files("Colin_Powell")[0].read_bytes()
FACE = base64.b64encode(FACE_BYTES).decode()
VOCABULARY = {code.value for code in ErrorCode}

# what fills a path parameter that is not the one being swept (named, so that nothing else is touched;
# face_id: a face of sweep-person, set once it is enrolled)
PATH_DEFAULTS = {"collection": "sweep", "identity_id": "sweep-person", "face_id": "0", "job_id": "1",
                 "key_id": "1", "name": "sweep-alias"}
# (not a bare "..": a client resolves it before sending, so /collections/c/identities/.. is a DELETE of
# /collections/c, which is why ids "." and ".." are refused at enrollment; "%2e%2e" reaches the server)
PATH_VALUES = ["x", "%00", "%ff", "a" * 3000, "%2e%2e", "-1", "0", "9" * 40, "1e999", "nan", "%C3%A9",
               "%20", "a%2Fb", "null", "%ED%A0%80"]
QUERY_VALUES = ["", "-1", "0", "9" * 40, "nan", "inf", "-inf", "1e999", "abc", "\x00", "a" * 5000, "true",
                "2026-13-45", "1.5", "é", "1:x:1", "1e308:default:9999999999999999999999"]
FIELD_VALUES: list[Any] = [
    None, True, 0, -1, 1e308, 10**30, -(10**30), 1.5, "", "x", "\x00", "\ud800", "é" * 100, "a" * 20000,
    [], [None], [[[]]], {}, {"a": {"b": {"c": []}}}, "NaN", "1e999", " ", "../../etc/passwd",
    ["\ud800"], {"k": "\ud800"}, {"\ud800": 1}, ["\x00"], {"k": "a\x00"}, [10**30], [-1], [0], [1.5], ["x"] * 100,
]
RAW_BODIES = [b"{", b"null", b"[]", b'"x"', b"1", b"\xff\xfe", b"{}", b'{"a":' * 5000, b"[" * 100_000,
              b'{"x": NaN}', b'{"x": -Infinity}', b'{"a": 1, "a": 2}']
FORM_VALUES = ["", "x", "\x00", "a" * 20000, "NaN", "1e999", "-1", "{}", "[]", "null", "é", str(10**30)]


def resolve(schema: dict, components: dict) -> dict:
    while "$ref" in schema:
        schema = components[schema["$ref"].split("/")[-1]]
    return schema


def example(schema: dict, components: dict, depth: int = 0) -> Any:
    """A value that fits ``schema`` (the base that the field mutations start from)."""
    schema = resolve(schema, components)
    if depth > 6:
        return None
    for key in ("anyOf", "oneOf"):
        if key in schema:
            options = [o for o in schema[key] if resolve(o, components).get("type") != "null"]
            return example(options[0], components, depth + 1) if options else None
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "object":
        return {k: example(v, components, depth + 1) for k, v in schema.get("properties", {}).items()
                if k in schema.get("required", [])}
    if kind == "array":
        return [example(schema.get("items", {}), components, depth + 1)] * max(1, schema.get("minItems", 1))
    if kind == "string":
        return FACE if schema.get("format") in ("binary", "byte") else "a" * max(1, schema.get("minLength", 1))
    if kind == "integer":
        return max(1, schema.get("minimum", 1))
    if kind == "number":
        return 0.5
    if kind == "boolean":
        return True
    return None


def fill(path: str, swept: str | None = None, value: str | None = None) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: value if m.group(1) == swept else PATH_DEFAULTS.get(m.group(1), "x"), path)


def requests_for(document: dict, key: str = KEY) -> list[tuple[str, str, dict]]:
    """(operation id, method, httpx request arguments) for every hostile request of the sweep, sent
    with ``key`` (but for those whose hostility is the key)."""
    auth = {"X-API-Key": key}
    components = document["components"]["schemas"]
    out: list[tuple[str, str, dict]] = []
    for path, operations in document["paths"].items():
        for method, op in operations.items():
            op_id, method = op["operationId"], method.upper()

            def add(url: str, **kwargs: Any) -> None:
                out.append((op_id, method, {"url": url, **kwargs}))  # noqa: B023 - called at once

            for param in op.get("parameters", []):
                if param["in"] == "path":
                    for value in PATH_VALUES:
                        add(fill(path, param["name"], value))
                elif param["in"] == "query":
                    for value in QUERY_VALUES:
                        add(fill(path), params={param["name"]: value})
                    for raw in ("1&{0}=2", "%ED%A0%80", "%ff", "%00"):  # repeated; a lone surrogate, bytes not UTF-8
                        add(fill(path) + f"?{param['name']}=" + raw.format(param["name"]))
            content = op.get("requestBody", {}).get("content", {})
            if "application/json" in content:
                schema = resolve(content["application/json"]["schema"], components)
                base = example(schema, components)
                json_headers = {**auth, "content-type": "application/json"}
                for raw in RAW_BODIES:
                    add(fill(path), content=raw, headers=json_headers)
                add(fill(path), content=json.dumps(base), headers={**auth, "content-type": "text/plain"})
                for field in schema.get("properties", {}):
                    for value in FIELD_VALUES:
                        body = {**(base if isinstance(base, dict) else {}), field: value}
                        add(fill(path), content=json.dumps(body).encode(), headers=json_headers)
            if "multipart/form-data" in content:
                schema = resolve(content["multipart/form-data"]["schema"], components)
                for field in schema.get("properties", {}):
                    image = [] if field == "images" else [("images", ("a.jpg", FACE_BYTES, "image/jpeg"))]
                    for value in FORM_VALUES:
                        add(fill(path), files=[(field, (None, value)), *image])
                add(fill(path), files=[("images", ("a.jpg", b"", "image/jpeg"))])
                add(fill(path), files=[("images", ("a.jpg", b"\xff" * 64, "image/jpeg"))] * 40)
                add(fill(path), content=b"--xx\r\nbroken", headers={**auth, "content-type": "multipart/form-data; boundary=xx"})
                add(fill(path), content=b"junk", headers={**auth, "content-type": "multipart/form-data"})
            for key in ("é".encode() * 10, b"\xff\xfe" * 10, b"a" * 10000, b"fk_x_y"):
                add(fill(path), headers={"X-API-Key": key})
    return out


@pytest.fixture(scope="module", params=["embedded", "postgres"])
def swept(request, tmp_path_factory, default_model):
    env = backend_env(request, {"FACE_API_KEY": KEY, "FACE_MAX_FACES_PER_REQUEST": "16"})
    proc = ServerProcess(tmp_path_factory.mktemp(f"sweep-{request.param}") / "data", model=default_model, env=env)
    proc.wait_ready()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def planted(swept) -> dict[str, Any]:
    """What no request of the sweep names (the identity "victim" in the default collection and in
    "kept"), as it reads before: it must read the same after. Also the collection and the identity the
    sweep's paths name ("sweep", "sweep-person" and its face)."""
    with httpx.Client(base_url=swept.url, headers=HEADERS, timeout=60) as client:
        assert client.post("/collections", json={"name": "kept"}).status_code == 201
        assert client.post("/collections", json={"name": "sweep"}).status_code == 201
        for url in ("/enroll", "/collections/kept/enroll"):
            assert client.post(url, json={"identity_id": "victim", "images": [FACE]}).status_code == 200
        r = client.post("/enroll", json={"identity_id": "sweep-person", "images": [FACE]})
        PATH_DEFAULTS["face_id"] = str(r.json()["face_ids"][0])
        return {url: client.get(url).json() for url in ("/identities/victim", "/collections/kept/identities/victim",
                                                         "/collections/kept")}


def sweep(client: httpx.Client, requests: list[tuple[str, str, dict]]) -> tuple[list, Counter, list[str]]:
    """Sends every request: (the bad answers, requests per operation id, the text of every answer)."""
    problems: list = []
    reached: Counter = Counter()
    answers: list[str] = []
    for op_id, method, kwargs in requests:
        reached[op_id] += 1
        try:
            r = client.request(method, **kwargs)
        except httpx.HTTPError as exc:  # a dropped connection is a failure too
            problems.append((op_id, method, repr(kwargs)[:200], repr(exc)))
            continue
        answers.append(r.text)
        if r.status_code < 400:
            continue
        try:
            code = r.json()["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = None
        if r.status_code >= 500 or code not in VOCABULARY:
            problems.append((op_id, method, repr(kwargs)[:200], r.status_code, r.text[:200]))
    return problems, reached, answers


def test_every_route_answers_hostile_input_with_a_coded_4xx_and_keeps_what_it_stored(swept, planted):
    with httpx.Client(base_url=swept.url, headers=HEADERS, timeout=60) as client:
        document = client.get("/openapi.json").json()
        problems, reached, answers = sweep(client, requests_for(document))
        assert not problems, f"{len(problems)} bad answers, e.g. {problems[:5]}"
        assert any("victim" in text for text in answers)  # (the admin key may list it: what the scoped sweep must not)
        assert set(reached) == {op["operationId"] for ops in document["paths"].values() for op in ops.values()}
        assert sum(reached.values()) > 4000
        assert {url: client.get(url).json() for url in planted} == planted
        assert client.get("/readyz").status_code == 200
        assert client.post("/embed", json={"images": [FACE]}).status_code == 200
    log = swept.log_path.read_text(errors="replace")
    assert "unhandled error" not in log and "Traceback" not in log


def test_a_key_of_one_collection_learns_and_changes_nothing_of_another_under_hostile_input(swept, planted):
    """The same sweep with a write key scoped to "sweep": no answer names what the other collections
    hold, and nothing of theirs changes."""
    with httpx.Client(base_url=swept.url, headers=HEADERS, timeout=60) as admin:
        document = admin.get("/openapi.json").json()
        r = admin.post("/keys", json={"role": "write", "collections": ["sweep"]})
        assert r.status_code == 201, r.text
        scoped = r.json()["secret"]
        with httpx.Client(base_url=swept.url, headers={"X-API-Key": scoped}, timeout=60) as client:
            assert client.get("/identities/victim").status_code == 403  # (the default collection: not its own)
            problems, _, answers = sweep(client, requests_for(document, key=scoped))
        assert not problems, f"{len(problems)} bad answers, e.g. {problems[:5]}"
        leaks = [text[:200] for text in answers if "victim" in text]
        assert not leaks, leaks[:5]
        assert {url: admin.get(url).json() for url in planted} == planted
    log = swept.log_path.read_text(errors="replace")
    assert "unhandled error" not in log and "Traceback" not in log


def test_what_the_document_leaves_out_answers_hostile_paths_and_methods_with_a_coded_4xx(swept, planted):
    """The console's files, the docs, their assets and paths of no route, which the document does not
    describe: every method on hostile and traversing paths gets a coded 4xx (or the file it names), never a
    5xx, and no path reaches a file outside the directories served."""
    bases = ["/", "/console/", "/console", "/docs/assets/", "/docs", "/redoc", "/openapi.json", "/healthz"]
    suffixes = ["", "x", "app.js", "index.html", "config.json", "%00", "%ff", "a" * 3000, "%2e%2e/%2e%2e/service/app.py",
                "..%2f..%2fservice%2fapp.py", "%2e%2e%2f%2e%2e%2fpyproject.toml", "a%5c..%5c..%5cpyproject.toml",
                "%252e%252e/%252e%252e/pyproject.toml", "/etc/passwd", "%ED%A0%80", "app.js%00.png", "./app.js"]
    methods = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"]
    problems = []
    with httpx.Client(base_url=swept.url, headers=HEADERS, timeout=60) as client:
        for base, suffix, method in itertools.product(bases, suffixes, methods):
            url = base + suffix
            r = client.request(method, url)
            if r.status_code >= 500 or (r.status_code >= 400 and method != "HEAD"
                                        and r.headers.get("content-type") == "application/json"
                                        and r.json().get("error", {}).get("code") not in VOCABULARY):
                problems.append((method, url[:80], r.status_code, r.text[:120]))
            elif r.status_code >= 400 and method != "HEAD" and r.headers.get("content-type") != "application/json":
                problems.append((method, url[:80], r.status_code, "not a JSON error", r.text[:120]))
            traversing = ".." in suffix or "%2e" in suffix.lower() or "passwd" in suffix or "%5c" in suffix
            if traversing and (r.status_code < 400 or "[project]" in r.text or "root:" in r.text or "import " in r.text):
                problems.append((method, url[:80], r.status_code, "reached", r.text[:120]))
        assert not problems, f"{len(problems)} bad answers, e.g. {problems[:5]}"
        assert client.get("/console/app.js").status_code == 200  # (the files are there to be reached)
        assert {url: client.get(url).json() for url in planted} == planted
    log = swept.log_path.read_text(errors="replace")
    assert "unhandled error" not in log and "Traceback" not in log


def test_every_json_body_route_reads_its_body_one_way(swept, planted):
    """The routes whose bodies FastAPI parses (keys, collections, aliases, merges, jobs) answer a broken
    body as the image routes do: bad JSON, NaN and too deep a body a 400 ``malformed_json``, another
    content type a 415 ``unsupported_media_type``."""
    with httpx.Client(base_url=swept.url, headers=HEADERS, timeout=60) as client:
        document = client.get("/openapi.json").json()
        routes = [(method.upper(), fill(path)) for path, ops in document["paths"].items()
                  for method, op in ops.items() if "application/json" in op.get("requestBody", {}).get("content", {})]
        assert ("POST", "/keys") in routes and ("PUT", "/aliases/sweep-alias") in routes
        for method, url in routes:
            for raw in (b"{", b'{"x": NaN}', b'{"x": [Infinity]}', b"[" * 100_000 + b"]" * 100_000):
                r = client.request(method, url, content=raw, headers={"content-type": "application/json"})
                assert (r.status_code, r.json()["error"]["code"]) == (400, "malformed_json"), (method, url, raw[:20], r.text[:200])
            r = client.request(method, url, content=b"{}", headers={"content-type": "text/plain"})
            assert (r.status_code, r.json()["error"]["code"]) == (415, "unsupported_media_type"), (method, url, r.text[:200])
        # nested as deep as the parser reads (the parser refuses deeper: malformed_json above): its text is
        # checked without recursion, and the model refuses it (a recursive check overflowed the stack: 500)
        for depth in (700, 950):
            deep = '{"role": "read", "note": ' + "[" * depth + '"a\\u0000"' + "]" * depth + "}"
            r = client.post("/keys", content=deep, headers={"content-type": "application/json"})
            assert r.status_code in (400, 422), (depth, r.status_code, r.text[:200])
            assert r.json()["error"]["code"] == ("invalid_request" if r.status_code == 422 else "malformed_json")
        # a body of 1 MiB or more is read in a worker thread, and checked the same
        big = json.dumps({"role": "read", "note": "a" * (2 << 20) + "\x00"})
        r = client.post("/keys", content=big, headers={"content-type": "application/json"})
        assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_request"), r.text[:200]
        r = client.post("/keys", content=big.replace("\\u0000", "\\ud800"), headers={"content-type": "application/json"})
        assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_request"), r.text[:200]
        # no content type: read as JSON, as everywhere
        r = client.post("/collections", content=json.dumps({"name": "untyped"}), headers={"content-type": ""})
        assert r.status_code == 201, r.text[:200]


def kinds(schema: dict, components: dict) -> set[str]:
    """The JSON types a field's schema allows (anyOf/oneOf joined; "null" left out)."""
    schema = resolve(schema, components)
    if "anyOf" in schema or "oneOf" in schema:
        return set().union(*(kinds(s, components) for s in schema.get("anyOf", schema.get("oneOf", []))))
    return {schema["type"]} - {"null"} if isinstance(schema.get("type"), str) else set()


# values a lax reading turns into the field's type: false is 0.0, "1" is 1, 1 is true
COERCIBLE: dict[str, list[Any]] = {"number": [False, True, "1", "0.5"], "integer": [True, "1", 1.5],
                                   "boolean": [1, 0, "true", "yes"]}


def test_a_json_body_field_is_read_as_its_documented_type_only(swept, planted):
    """Every number, integer and boolean field of every JSON body the document declares, given a value
    of another JSON type that Python would convert (false for a number: 0.0; "1" for an integer; 1 for a
    boolean): 422 ``invalid_request``, never taken as the number. A key's ``expires_at: false`` was the
    epoch (a key expired when made), a scan's ``min_score: false`` a threshold of 0. And an integer
    field takes a whole float (``2.0``: an integer to JSON Schema, as a client's arithmetic makes it)."""
    with httpx.Client(base_url=swept.url, headers=HEADERS, timeout=60) as client:
        document = client.get("/openapi.json").json()
        components = document["components"]["schemas"]
        accepted, refused_whole, tried = [], [], Counter()
        for path, operations in document["paths"].items():
            for method, op in operations.items():
                content = op.get("requestBody", {}).get("content", {})
                if "application/json" not in content:
                    continue
                schema = resolve(content["application/json"]["schema"], components)
                base = example(schema, components)
                for field, field_schema in schema.get("properties", {}).items():
                    allowed = kinds(field_schema, components)
                    if "integer" in allowed:
                        whole = float(example(field_schema, components))
                        r = client.request(method.upper(), fill(path), json={**base, field: whole})
                        if r.status_code == 422 and field in r.text:
                            refused_whole.append((method.upper(), path, field, whole, r.text[:120]))
                    for kind in allowed & COERCIBLE.keys():
                        for value in COERCIBLE[kind]:
                            tried[kind] += 1
                            r = client.request(method.upper(), fill(path), json={**base, field: value})
                            code = r.json().get("error", {}).get("code") if r.status_code >= 400 else None
                            if (r.status_code, code) != (422, "invalid_request"):
                                accepted.append((method.upper(), path, field, value, r.status_code, r.text[:120]))
        assert not accepted, f"{len(accepted)} taken, e.g. {accepted[:8]}"
        assert not refused_whole, refused_whole
        assert tried["number"] > 20 and tried["integer"] > 10 and tried["boolean"] > 5, tried
        assert {url: client.get(url).json() for url in planted} == planted
