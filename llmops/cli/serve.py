"""Placeholder until the serve workload lands."""

import typer


def serve_command() -> None:
    """Not built yet."""
    raise typer.Exit(1)
