"""A real PostgreSQL for the tests: moved to ``harness.pg`` (shared with the benchmarks)."""

from harness.pg import PgTestServer

__all__ = ["PgTestServer"]
