"""What the tests and the benchmarks both need, importable from the project root with no sys.path
edits (``python -m bench.X``, pytest): the real server in a subprocess (``server``), a throwaway
PostgreSQL (``pg``), the committed face fixtures (``fixtures``). Not part of the wheel."""
