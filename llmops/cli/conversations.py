"""`llmops conversations`: the Responses API conversations `llmops serve` keeps (list, remove, prune)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Optional

import typer

from llmops.cli import _output as out
from llmops.cli._options import JsonOpt, StateDirOpt, StateUrlOpt, parse_duration

app = typer.Typer(help="List, remove and prune the conversations `llmops serve` keeps.", no_args_is_help=True)


def _open(state_dir: Optional[str], state_url: Optional[str] = None, **bounds):
    from pathlib import Path

    from llmops.errors import UsageError
    from llmops.serve.conversations import FILE, ConversationStore, default_state_dir

    if state_url:
        return ConversationStore(state_url, **bounds)
    folder = Path(state_dir) if state_dir else default_state_dir()
    if not (folder / FILE).is_file():
        raise UsageError(f"no conversation store in {folder}",
                         "give the folder `llmops serve --state-dir` used (--state-dir DIR)")
    return ConversationStore(folder / FILE, **bounds)


@app.command("list")
def list_command(state_dir: StateDirOpt = None, state_url: StateUrlOpt = None, json: JsonOpt = False) -> None:
    """The stored responses, newest first: id (a `previous_response_id`), when, turns of history, size."""
    rows = [{"id": s.id, "created": datetime.fromtimestamp(s.created, timezone.utc).isoformat(timespec="seconds"),
             "turns": s.turns, "bytes": s.bytes} for s in _open(state_dir, state_url).list()]
    if json:
        out.print_json(rows)
        return
    out.table("Conversations", ["id", "created", "turns", "bytes"],
              [(r["id"], r["created"], r["turns"], r["bytes"]) for r in rows])


@app.command("rm")
def rm_command(response_id: Annotated[str, typer.Argument(metavar="ID", help="A stored response's id.")],
               state_dir: StateDirOpt = None, state_url: StateUrlOpt = None) -> None:
    """Remove one stored response and its history (a later turn of the conversation keeps its own copy)."""
    from llmops.errors import UsageError

    if not _open(state_dir, state_url).remove(response_id):
        raise UsageError(f"no stored response {response_id}", "see `llmops conversations list`")
    out.log(f"removed {response_id}")


@app.command("prune")
def prune_command(
    state_dir: StateDirOpt = None,
    state_url: StateUrlOpt = None,
    ttl: Annotated[str, typer.Option("--ttl", help="Remove responses older than this (7d, 12h, 30m, 90s).")] = "7d",
    max_responses: Annotated[int, typer.Option("--max", min=1, help="Keep at most this many, the newest.")] = 100_000,
    json: JsonOpt = False,
) -> None:
    """Remove what is past the bounds now (a running server also does on every write)."""
    removed = _open(state_dir, state_url, ttl_s=parse_duration(ttl), max_responses=max_responses).prune()
    if json:
        out.print_json({"removed": removed})
    else:
        out.result(f"removed {removed} stored responses")
