"""Placeholder until the chat workload lands."""

import typer


def chat_command() -> None:
    """Not built yet."""
    raise typer.Exit(1)
