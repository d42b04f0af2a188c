"""Placeholder until the train workload lands."""

import typer

app = typer.Typer(help="Not built yet.")


@app.command("validate")
def validate() -> None:
    raise typer.Exit(1)
