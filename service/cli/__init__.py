"""The ``python -m service`` subcommands that are not the server: gallery tools, calibration, API keys, the
audit trail (backend.py: what they share)."""
