"""The `llmops` command: lists the command groups, loads the one that runs, and maps exceptions to exit codes
in one place.

Like vLLM's CLI, `llmops --help` imports no command module: each command's one-line help is written here,
and its module (with its config schemas and runners) is imported only when that command runs or shows its
own help. Command modules import only typer/rich/pydantic at module level; torch, vllm and transformers are
imported inside the functions that need them.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
import traceback
from dataclasses import dataclass, field
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperGroup

from llmops import __version__
from llmops.errors import LlmopsError


@dataclass(frozen=True)
class _Command:
    module: str
    attr: str
    """A command function, or a `typer.Typer` for a command group."""
    summary: str
    """The line `llmops --help` shows (the command's docstring says the same at more length)."""
    examples: tuple[str, ...]
    """Command lines, each optionally followed by an indented line saying what it does."""
    context_settings: dict[str, Any] = field(default_factory=dict)


HELP_OPTION_NAMES = ["-h", "--help"]

COMMANDS: dict[str, _Command] = {
    "hw": _Command(
        "llmops.cli.hw", "hw_command",
        "Show the GPUs, CPU, RAM and disk found here, and the serve, batch and train plans for --model.",
        ("llmops hw",
         "llmops hw -m llama-3.3-70b --json",
         "LLMOPS_HARDWARE=h100x8.json llmops hw -m llama-3.3-70b",
         "    plans for another machine: the `hardware` object of its `llmops hw --json`")),
    "serve": _Command(
        "llmops.cli.serve", "serve_command",
        "Serve MODEL with vLLM's OpenAI-compatible server until Ctrl+C or SIGTERM.",
        ("llmops serve",
         "    the offline default model on http://127.0.0.1:8000/v1",
         "llmops serve qwen2.5-7b --port 9000",
         "llmops serve smollm2-135m --dry-run",
         "    the plan and the exact vLLM command, without starting it",
         "llmops serve qwen2.5-7b -- --enable-prefix-caching --max-num-seqs 64",
         "    flags after -- go to vLLM unchanged"),
        {"allow_extra_args": True, "ignore_unknown_options": True}),
    "chat": _Command(
        "llmops.cli.chat", "chat_command",
        "Chat in the terminal: streams answers, keeps the conversation; /history, /clear, /exit.",
        ("llmops chat",
         "    starts a server for the default model, stops it on exit",
         "llmops chat --url http://127.0.0.1:8000",
         "    a server that is already running",
         "printf 'What is the capital of France?\\n' | llmops chat")),
    "batch": _Command(
        "llmops.cli.batch", "batch_command",
        "Generate completions for every row of INPUT with vLLM, as fast as the hardware allows.",
        ("llmops batch examples/prompts.jsonl -o out/demo --max-tokens 64 --show 5",
         "llmops batch 'data/*.parquet' -o out/run1 --prompt-column question --json",
         "llmops batch requests.jsonl -o out/oa --model qwen2.5-7b --dry-run",
         "    the plan and the exact engine call, without starting it")),
    "models": _Command(
        "llmops.cli.models", "app",
        "List, inspect, download and register models.",
        ("llmops models list",
         "llmops models pull smollm2-135m",
         "llmops models show llama-3.1-8b --json",
         "llmops models add mine ./path/to/hf-folder --chat",
         "llmops models rm mine")),
    "conversations": _Command(
        "llmops.cli.conversations", "app",
        "List, remove and prune the conversations `llmops serve` keeps for the Responses API.",
        ("llmops conversations list",
         "llmops conversations rm resp_0123abcd",
         "llmops conversations prune --ttl 1d")),
    "train": _Command(
        "llmops.cli.train", "app",
        "Fine-tune a model from a recipe: `llmops train RECIPE.yaml` (or a shipped recipe's name).",
        ("llmops train recipes",
         "    the shipped recipes, each with its command",
         "llmops train lora-smollm2 --dry-run",
         "    the plan and the exact launch command, without training",
         "llmops train lora-smollm2",
         "llmops train recipes/lora-smollm2.yaml --set train.max_steps=20 -o out/lora")),
}


class _LazyGroup(TyperGroup):
    """The root group: knows its commands by name and summary, imports a command's module only to run it or
    to show its own help."""

    _listing = False

    def list_commands(self, ctx: Any) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: Any, name: str) -> Any:
        spec = COMMANDS.get(name)
        if spec is None:
            return None
        if self._listing:  # the root's help needs the summary only
            return typer.core.TyperCommand(name=name, help=spec.summary)
        return load_command(name)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        _tidy_params(self.get_params(ctx))
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


def load_command(name: str) -> Any:
    """The click command (or group) for COMMANDS[name], with the shared --verbose and the help tidied."""
    from llmops.cli._options import verbose_option

    spec = COMMANDS[name]
    target = getattr(importlib.import_module(spec.module), spec.attr)
    if isinstance(target, typer.Typer):
        command = typer.main.get_group(target)
    else:
        single = typer.Typer(add_completion=False)
        # A command may name its own click class (`batch` dispatches `batch status`: cli/batch_status.py).
        single.command(name, context_settings=spec.context_settings, cls=getattr(target, "click_cls", None))(target)
        command = typer.main.get_command(single)
    command.name = name

    for cmd in _walk(command):
        if not isinstance(cmd, TyperGroup):
            cmd.params.append(verbose_option())
        _tidy_help(cmd)
    # typer dedents the epilog: the commands start at the margin, their notes stay indented under them.
    command.epilog = "Examples:\n" + "\n".join(_escape(e) for e in spec.examples)
    return command


def _walk(command: Any) -> list[Any]:
    subs = getattr(command, "commands", {})
    return [command, *(c for sub in subs.values() for c in _walk(sub))]


def _tidy_help(command: Any) -> None:
    """Help that reads like a well-kept CLI's: paragraphs reflowed to the terminal (typer's rich mode keeps the
    docstring's line breaks), no metavar on switches, arguments named in capitals as in the usage line."""
    if command.help:
        command.help = _escape_markup(reflow(command.help))
    # get_params adds (and caches) the --help option, which needs the tidying too.
    _tidy_params(command.get_params(typer.Context(command, help_option_names=HELP_OPTION_NAMES)))


def _tidy_params(params: list[Any]) -> None:
    for param in params:
        if getattr(param, "help", None):
            param.help = _escape_markup(param.help)
        if getattr(param, "is_flag", False):
            param.metavar = ""  # typer shows the metavar in place of the type: `--json` not `--json <bool>`
        elif param.param_type_name == "argument" and param.metavar is None:
            param.metavar = param.name.upper()


def reflow(text: str) -> str:
    """Join the lines of each paragraph, so the terminal wraps them; keep list items and indented lines (code)
    on their own lines, and paragraphs that start with click's \\b (no rewrap) as they are."""
    paragraphs = []
    for paragraph in inspect.cleandoc(text).split("\n\n"):
        if paragraph.startswith("\b"):
            paragraphs.append(paragraph)
            continue
        lines: list[str] = []
        for line in paragraph.splitlines():
            if lines and not line.startswith((" ", "- ", "* ", "$ ")):
                lines[-1] += " " + line.strip()
            else:
                lines.append(line)
        paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs)


def _escape(text: str) -> str:
    return text.replace("[", r"\[")  # typer renders help as rich markup


def _escape_markup(text: str) -> str:
    """Help text with every `[` that is not escaped yet escaped: typer renders help as rich markup, which took
    `'llmops[ray]'` for a style and printed `'llmops'`."""
    return re.sub(r"(?<!\\)\[", r"\\[", text)


app = typer.Typer(
    name="llmops",
    cls=_LazyGroup,
    help="Serve, batch-generate and fine-tune LLMs from one CLI, planned from the hardware you have.",
    epilog="Run `llmops COMMAND --help` for a command's options and examples; add -v to see the engines' logs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": HELP_OPTION_NAMES},
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


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app and turn every failure into a message on stderr and an exit code.

    0 ok, 1 runtime failure, 2 usage or config error, 3 does not fit on this hardware, 75 stopped early on
    SIGTERM (rerun to finish), 130 interrupted.
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
    except OSError as e:  # the file system refused (permission, full disk): not a bug, say what and where
        from llmops.errors import StorageError

        if debug:
            traceback.print_exc()
        print(f"llmops: error: {StorageError.from_os_error(e)}", file=sys.stderr)
        code = 1
    except Exception as e:
        if debug:
            traceback.print_exc()
        print(f"llmops: unexpected error: {type(e).__name__}: {e}\n"
              "  hint: rerun with LLMOPS_DEBUG=1 for the traceback, and report it if it looks like a bug",
              file=sys.stderr)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)
