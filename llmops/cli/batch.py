"""Placeholder until the batch workload lands."""

import typer


def batch_command() -> None:
    """Not built yet."""
    raise typer.Exit(1)
