"""`llmops chat`: a terminal chat with a running server (`--url`) or with MODEL served for the chat."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from llmops.cli import _output as out
from llmops.cli._options import SetOpt


def chat_command(
    model: Annotated[Optional[str], typer.Argument(
        metavar="MODEL", show_default=False,
        help="Model to chat with: started with `llmops serve` in the background \\[default: smollm2-135m]; "
             "with --url, the served model name \\[default: the server's first model].")] = None,
    url: Annotated[Optional[str], typer.Option(
        help="A running OpenAI-compatible server, e.g. http://127.0.0.1:8000 (no server is started).")] = None,
    api_key: Annotated[Optional[str], typer.Option(
        envvar="LLMOPS_API_KEY", show_envvar=True, help="API key for --url.")] = None,
    system: Annotated[Optional[str], typer.Option("--system", "-s", help="System prompt.")] = None,
    temperature: Annotated[Optional[float], typer.Option(
        min=0, help="Sampling temperature; 0 is greedy \\[default: the model's own].")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(min=1, help="Longest answer, in tokens.")] = None,
    resume: Annotated[Optional[str], typer.Option(
        "--resume", metavar="ID", help="Continue a conversation the server stored (a Responses API response id, "
                                       "see `llmops conversations list`); its new turns are stored too.")] = None,
    set_: SetOpt = None,
) -> None:
    """Chat in the terminal: streams answers, keeps the conversation; /history, /clear, /exit.

    Piped, each stdin line is one message and each answer one line on stdout:
    `printf 'Hi, I am Ann.\\nWhat is my name?\\n' | llmops chat --url http://127.0.0.1:8000`.
    The --set values configure the server started for MODEL (e.g. --set engine.cpu_kv_cache_gib=1).
    """
    from llmops.serve.chat import run_chat

    run_chat(url=url, model=model, api_key=api_key, system=system, temperature=temperature,
             max_tokens=max_tokens, sets=set_ or [], resume=resume, waiting=out.stderr.status,
             log=out.log)
