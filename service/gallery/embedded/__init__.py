"""The embedded backend: SQLite store + hnswlib index in the data dir (no server to run)."""
