"""The harness shared by tests and benchmarks (harness/): what the tests rely on it for."""

from __future__ import annotations

from harness.server import free_port


def test_free_port_gives_each_test_process_ports_of_its_own(monkeypatch):
    """Servers bind their port seconds after it is chosen (the model loads first): two pytest-xdist
    workers given the same port meanwhile had one test's client served by the other test's server. Each
    worker takes only the ports that are its own, and a process never takes one twice."""
    for worker, count in (("gw0", 2), ("gw1", 2), ("gw2", 3)):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", str(count))
        ports = [free_port() for _ in range(20)]
        assert all(p % count == int(worker[2:]) for p in ports), (worker, ports)
        assert len(set(ports)) == len(ports)
