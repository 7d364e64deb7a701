"""Background jobs over collections: the migration to another model (migrate.py, its rows store.py, the
runner.py thread), its comparison report (compare.py), shadow traffic (shadow.py)."""
