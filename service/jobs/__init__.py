"""Background jobs over collections: the migration to another model, its comparison report, shadow traffic."""
