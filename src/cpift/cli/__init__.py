"""Command-line entry points: ``cpift-merge``."""
