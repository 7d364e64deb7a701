"""Whose address a request comes from (the audit trail's ``client``, open mode's rate limits), over real
HTTP. Found by a reviewer: uvicorn believed ``X-Forwarded-For`` from any sender on loopback (its defaults,
``proxy_headers`` on and ``FORWARDED_ALLOW_IPS`` 127.0.0.1), so any local process chose the client its
changes were audited under, text such as ``<img src=x onerror=...>`` included. Forwarding headers are now
believed only from the proxies of ``FACE_TRUSTED_PROXIES`` (default none), and then only an IP address."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.server import ServerProcess

FORGED = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def untrusting(tmp_path_factory, default_model):
    """No FACE_TRUSTED_PROXIES; uvicorn's own FORWARDED_ALLOW_IPS, set to trust anyone, is not read either."""
    proc = ServerProcess(tmp_path_factory.mktemp("untrusting") / "data", model=default_model,
                         env={"FORWARDED_ALLOW_IPS": "*"})
    proc.wait_ready()
    with httpx.Client(base_url=proc.url, timeout=60) as client:
        client.proc = proc  # type: ignore[attr-defined]
        yield client
    proc.stop()


@pytest.fixture(scope="module")
def behind_proxy(tmp_path_factory, default_model):
    """Loopback (where the test sends from) is a trusted proxy, and so is 10.1.0.0/16."""
    proc = ServerProcess(tmp_path_factory.mktemp("behind-proxy") / "data", model=default_model,
                         env={"FACE_TRUSTED_PROXIES": "127.0.0.1, 10.1.0.0/16"})
    proc.wait_ready()
    with httpx.Client(base_url=proc.url, timeout=60) as client:
        yield client
    proc.stop()


def audited_client(client: httpx.Client, headers: dict[str, str]) -> str | None:
    """The ``client`` of the audit record of a collection created with ``headers``."""
    name = f"c-{uuid.uuid4().hex[:12]}"
    assert client.post("/collections", json={"name": name}, headers=headers).status_code == 201
    items = client.get("/audit", params={"collection": name}).json()["items"]
    assert [e["action"] for e in items] == ["collection.created"]
    return items[0]["client"]


@pytest.mark.parametrize("forwarded", ["203.0.113.9", FORGED, "203.0.113.9, 10.1.2.3"])
def test_without_trusted_proxies_a_forwarded_address_changes_nothing(untrusting, forwarded):
    assert audited_client(untrusting, {"X-Forwarded-For": forwarded}) == "127.0.0.1"
    assert audited_client(untrusting, {}) == "127.0.0.1"


def test_uvicorns_own_setting_is_warned_of_as_not_read(untrusting):
    assert "FORWARDED_ALLOW_IPS is not read" in untrusting.proc.log_path.read_text()


@pytest.mark.parametrize(("forwarded", "client"), [
    ("203.0.113.9", "203.0.113.9"),
    ("[2001:DB8::7]:4711", "2001:db8::7"),  # a port dropped, IPv6 in its one spelling
    ("198.51.100.1, 203.0.113.9", "203.0.113.9"),  # the left one is the client's own claim
    ("198.51.100.1, 203.0.113.9, 10.1.2.3", "203.0.113.9"),  # the rightmost address no trusted proxy's
    ("10.1.9.9, 10.1.2.3", "10.1.9.9"),  # every hop a trusted proxy: the first
])
def test_a_trusted_proxy_names_the_client(behind_proxy, forwarded, client):
    assert audited_client(behind_proxy, {"X-Forwarded-For": forwarded}) == client
    assert audited_client(behind_proxy, {}) == "127.0.0.1"  # no header: the peer


@pytest.mark.parametrize("forwarded", [
    FORGED,
    f"203.0.113.9, {FORGED}",
    f"{FORGED}, 10.1.2.3",
    "fe80::1%<script>",  # an IPv6 zone is free text
    "unknown",  # nginx and RFC 7239 for a hidden client
    "203.0.113.9:http",
])
def test_what_is_no_address_is_never_recorded_as_the_client(behind_proxy, forwarded):
    """uvicorn takes the rightmost untrusted entry whatever it holds: one that is no IP address leaves the
    proxy (the connection's peer) as the client."""
    assert audited_client(behind_proxy, {"X-Forwarded-For": forwarded}) == "127.0.0.1"
