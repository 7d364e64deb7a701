"""Background jobs: migrating a collection to another model (migrate.py), job rows (store.py), the runner (runner.py)."""
