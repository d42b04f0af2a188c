"""Options shared by several commands, defined once so the same flag means the same thing everywhere."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Optional

import typer

ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="Registry alias, local model folder or Hugging Face id "
                                       "(default: smollm2-135m, the offline default model)."),
]
OutputOpt = Annotated[Optional[Path], typer.Option("--output", "-o", help="Where results are written.")]
ConfigOpt = Annotated[
    Optional[Path], typer.Option("--config", "-c", help="YAML file with config values (flags override it).")
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override one config value, dotted path into the config: --set key.sub=value. "
                               "Repeatable."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout, for scripts.")]
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", help="Print the resolved plan and the exact engine call, run nothing.")
]


StateDirOpt = Annotated[Optional[str], typer.Option(
    "--state-dir", metavar="DIR",
    help="Folder of the conversations `llmops serve` keeps; default `$LLMOPS_HOME/conversations`.")]

StateUrlOpt = Annotated[Optional[str], typer.Option(
    "--state-url", metavar="URL",
    help="A PostgreSQL database of conversations (postgresql://USER@HOST:PORT/DB) instead of the SQLite file "
         "under --state-dir, shared by servers on several machines; the password in PGPASSWORD or ~/.pgpass.")]

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """`90`, `90s`, `30m`, `12h`, `7d` in seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if match is None or float(match[1]) <= 0:
        raise typer.BadParameter(f"{text!r} is not a duration: use seconds or a number with s, m, h or d (7d)")
    return float(match[1]) * _DURATION_UNITS[match[2] or "s"]


def _set_verbose(value: bool) -> None:
    from llmops.quiet import set_verbose

    set_verbose(value)


VerboseOpt = Annotated[bool, typer.Option(
    "--verbose", "-v", expose_value=False, callback=_set_verbose,
    help="Show the engines' own logs (vLLM, torch, datasets...) on the terminal; without it they go to the "
         "run's log file, and its end is shown if something fails.")]


def verbose_option():
    """VerboseOpt as a click option; `llmops.cli.app` adds it to every command, so -v means the same everywhere."""

    def holder(verbose: VerboseOpt = False) -> None: ...

    single = typer.Typer(add_completion=False)
    single.command()(holder)
    return typer.main.get_command(single).params[0]
