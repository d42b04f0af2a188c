"""The `llmops` command: registers the command groups and maps exceptions to exit codes in one place.

Command modules import only typer/rich/pydantic at module level; torch, vllm and transformers are imported
inside the functions that need them, so `llmops --help` stays fast.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Annotated, Optional

import typer

from llmops import __version__
from llmops.cli import batch, chat, hw, models, serve, train
from llmops.errors import LlmopsError

app = typer.Typer(
    name="llmops",
    help="Serve, batch-generate and fine-tune LLMs from one CLI, planned from the hardware you have.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        print(f"llmops {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    pass


app.add_typer(models.app, name="models")
app.command("hw")(hw.hw_command)
app.command("serve", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(serve.serve_command)
app.command("chat")(chat.chat_command)
app.command("batch")(batch.batch_command)
app.add_typer(train.app, name="train")


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app and turn every failure into a message on stderr and an exit code.

    0 ok, 1 runtime failure, 2 usage or config error, 3 does not fit on this hardware, 130 interrupted.
    `LLMOPS_DEBUG=1` prints the traceback too.
    """
    debug = os.environ.get("LLMOPS_DEBUG", "") not in ("", "0")
    try:
        code = app(args=argv, prog_name="llmops", standalone_mode=False)
    except typer.Exit as e:  # a RuntimeError subclass: caught before the generic handler below
        code = e.exit_code
    except typer.Abort:
        print("llmops: interrupted", file=sys.stderr)
        code = 130
    except typer.TyperException as e:  # Typer's (vendored click) usage errors: bad flag, missing argument
        e.show()  # type: ignore[attr-defined]
        code = 2
    except LlmopsError as e:
        if debug:
            traceback.print_exc()
        print(f"llmops: error: {e}", file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        print("llmops: interrupted", file=sys.stderr)
        code = 130
    except Exception as e:
        if debug:
            traceback.print_exc()
        print(f"llmops: unexpected error: {type(e).__name__}: {e}\n"
              "  hint: rerun with LLMOPS_DEBUG=1 for the traceback, and report it if it looks like a bug",
              file=sys.stderr)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)
