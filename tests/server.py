"""The real server in a subprocess: moved to ``harness.server`` (shared with the benchmarks)."""

from harness.server import MODEL_CACHE, REPO, ServerProcess, free_port, listed_identities, running_server

__all__ = ["MODEL_CACHE", "REPO", "ServerProcess", "free_port", "listed_identities", "running_server"]
