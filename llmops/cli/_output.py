"""The one place that prints. Results go to stdout (rich tables on a terminal, plain text or JSON
otherwise); logs, progress and errors go to stderr."""

from __future__ import annotations

import json
import sys
from typing import Any, Iterable, Sequence

from rich.console import Console
from rich.table import Table

from llmops import quiet


class _Terminal:
    """stderr, or the terminal's stderr while an engine's output goes to a log file (`llmops.quiet`)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(quiet.terminal(), name)


stdout = Console(soft_wrap=True, highlight=False)
stderr = Console(file=_Terminal(), stderr=True, highlight=False)  # type: ignore[arg-type]


def log(message: str) -> None:
    stderr.print(message, markup=False, soft_wrap=True)


def result(message: str) -> None:
    """One line of result text on stdout, printed as is."""
    stdout.print(message, markup=False, soft_wrap=True)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A table on stdout: boxed on a terminal, tab-separated when piped (so `cut` and `awk` work)."""
    rows = [["" if v is None else str(v) for v in row] for row in rows]
    if not stdout.is_terminal:
        sys.stdout.write("\t".join(columns) + "\n")
        for row in rows:
            sys.stdout.write("\t".join(row) + "\n")
        return
    t = Table(title=title, title_justify="left")
    for col in columns:
        t.add_column(col)
    for row in rows:
        t.add_row(*row)
    stdout.print(t)


def key_values(title: str, pairs: Iterable[tuple[str, Any]]) -> None:
    pairs = list(pairs)
    if not stdout.is_terminal:
        if title:
            sys.stdout.write(f"# {title}\n")
        for k, v in pairs:
            sys.stdout.write(f"{k}: {v}\n")
        return
    t = Table(title=title, title_justify="left", show_header=False, box=None, padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    for k, v in pairs:
        t.add_row(k, str(v))
    stdout.print(t)


def gib(n_bytes: int | float) -> str:
    return f"{n_bytes / 1024**3:.1f} GiB"
