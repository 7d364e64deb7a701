"""The ``python -m service`` subcommands that are not the server: gallery tools, calibration."""
