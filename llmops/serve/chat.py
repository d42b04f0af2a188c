"""`llmops chat`: a terminal chat with an OpenAI-compatible server, in the spirit of `ollama run`.

It streams tokens as they arrive and keeps the conversation. It talks to a running server (`--url`), or
starts `llmops serve MODEL` in the background on a free port and stops it on exit. Piped, it reads one
message per stdin line and prints one answer per line, so scripts can use it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TextIO

from llmops.errors import RuntimeFailure, UsageError
from llmops.registry import DEFAULT_MODEL
from llmops.serve.server import LOG_TAIL_LINES, failure_hint, free_port, health_ok

HELP = "/history shows the conversation, /clear forgets it, /exit (or Ctrl+D) quits, /? shows this."
# A busy `llmops serve` refuses what it cannot answer in time with 503 and Retry-After (its TTFT target,
# rounded up); the `openai` client waits that long and tries again on its own, this many times.
BUSY_RETRIES = 5


@dataclass
class ChatSession:
    """One conversation: the client, the model, the history and the sampling settings."""

    client: object
    """An `openai.OpenAI` client."""
    model: str
    system: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        import uuid

        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.session_id = uuid.uuid4().hex
        """Sent as the session header with every turn: behind `--replicas`/`--ray`, Serve routes the turns of
        one conversation to one replica, whose KV cache holds the history so far."""
        self.response_id: str | None = None
        """Set when the server keeps the conversation (`resume`): each turn then goes through the Responses
        API with only the new message, and is stored there too."""

    def resume(self, response_id: str) -> None:
        """Continue the conversation `llmops serve` stored under `response_id` (its history is read back)."""
        import openai

        try:
            items = self.client.responses.input_items.list(response_id, order="asc", limit=100)  # type: ignore
            last = self.client.responses.retrieve(response_id)  # type: ignore[attr-defined]
        except openai.NotFoundError:
            raise UsageError(f"the server has no stored conversation {response_id} (unknown, expired or removed)",
                             "see `llmops conversations list` on the server's machine") from None
        self.messages = [{"role": item.role, "content": "".join(getattr(p, "text", "") for p in item.content)}
                         for item in items.data if getattr(item, "type", None) == "message"]
        self.messages.append({"role": "assistant", "content": last.output_text})
        self.response_id = self.session_id = response_id

    def history(self) -> str:
        return "\n".join(f"{m['role']}: {m['content']}" for m in self.messages)

    def ask(self, text: str) -> Iterator[str]:
        """Send `text`, yield the answer's pieces as they stream in; the whole answer joins the history."""
        if self.response_id is not None:
            yield from self._ask_stored(text)
            return
        self.messages.append({"role": "user", "content": text})
        extra = {k: v for k, v in (("temperature", self.temperature), ("max_tokens", self.max_tokens))
                 if v is not None}
        pieces: list[str] = []
        stream = None
        try:
            stream = self.client.chat.completions.create(  # type: ignore[attr-defined]
                model=self.model, messages=self.messages, stream=True, extra_headers=self._session(), **extra)
            for chunk in stream:
                delta = chunk.choices[0].delta.content if chunk.choices else None
                if delta:
                    pieces.append(delta)
                    yield delta
        finally:
            if stream is not None:
                stream.close()  # an interrupted answer: the server stops generating it
            if pieces:  # an interrupted answer still counts as said
                self.messages.append({"role": "assistant", "content": "".join(pieces)})
            else:
                self.messages.pop()

    def _session(self) -> dict[str, str]:
        from llmops.serve.replicas import SESSION_HEADER

        return {SESSION_HEADER: self.session_id}

    def _ask_stored(self, text: str) -> Iterator[str]:
        """A turn of a stored conversation: the new message and the previous response's id."""
        extra = {k: v for k, v in (("temperature", self.temperature), ("max_output_tokens", self.max_tokens))
                 if v is not None}
        pieces: list[str] = []
        stream = None
        try:
            stream = self.client.responses.create(  # type: ignore[attr-defined]
                model=self.model, input=text, previous_response_id=self.response_id, store=True, stream=True,
                extra_headers=self._session(), **extra)
            for event in stream:
                if event.type == "response.output_text.delta" and event.delta:
                    pieces.append(event.delta)
                    yield event.delta
                elif event.type in ("response.completed", "response.incomplete"):
                    self.response_id = event.response.id
        finally:
            if stream is not None:
                stream.close()
            if pieces:
                self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(pieces)}]


def connect(url: str, api_key: str | None, model: str | None) -> tuple[object, str]:
    """An `openai.OpenAI` client for `url` (with or without /v1) and the model to talk to."""
    import openai

    base = url.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    client = openai.OpenAI(base_url=base, api_key=api_key or "none", max_retries=BUSY_RETRIES)
    if model:
        return client, model
    try:  # no retries here: a server that is not there should say so at once
        models = [m.id for m in client.with_options(max_retries=0).models.list()]
    except openai.AuthenticationError:
        raise UsageError(f"{base} wants an API key", "pass --api-key or set LLMOPS_API_KEY") from None
    except openai.APIConnectionError:
        raise UsageError(f"no server answers at {base}", "start one with `llmops serve`, or check --url") from None
    if not models:
        raise RuntimeFailure(f"the server at {base} serves no model")
    return client, models[0]


def chat_loop(session: ChatSession, lines: Iterable[str], write: Callable[[str], None],
              *, interactive: bool) -> None:
    """Answer each line; slash commands control the session. Interactive mode survives Ctrl+C mid-answer."""
    import openai

    for line in lines:
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/bye", "/quit"):
            return
        if text == "/clear":
            session.clear()
            if interactive:
                write("(conversation cleared)\n")
            continue
        if text in ("/?", "/help"):
            write(HELP + "\n")
            continue
        if text == "/history":
            write(session.history() + "\n\n")
            continue
        answer = session.ask(text)
        try:
            for piece in answer:
                write(piece)
        except KeyboardInterrupt:
            if not interactive:
                raise
            write(" [interrupted]")
        except openai.AuthenticationError:
            raise UsageError("the server refused the API key", "pass the right --api-key") from None
        except openai.APIConnectionError:
            raise RuntimeFailure("lost the connection to the server") from None
        except openai.APIStatusError as e:
            busy = (f"the server is busy (asked {BUSY_RETRIES + 1} times, each after its Retry-After); try again "
                    "later, or serve with a longer --max-queue" if e.status_code == 503 else None)
            raise RuntimeFailure(f"the server answered {e.status_code}: {e.message}", busy) from None
        finally:
            answer.close()
        write("\n\n" if interactive else "\n")


def interactive_lines(prompt: str = ">>> ") -> Iterator[str]:
    """Lines typed at a prompt (with line editing); ends on Ctrl+D or Ctrl+C at the prompt."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (arrow keys and history in input())
    while True:
        try:
            yield input(prompt)
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return


@contextlib.contextmanager
def background_server(model: str | None, sets: list[str], *, waiting=None,
                      log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
                      timeout_s: float = 1800) -> Iterator[tuple[str, str]]:
    """Run `llmops serve MODEL` on a free loopback port; yields (url, api key) once it is ready.

    The server gets a random API key, so nobody else on the machine can use it. It is stopped (SIGTERM,
    which `llmops serve` turns into an orderly shutdown of vLLM) when the block ends.
    """
    port = free_port()
    key = secrets.token_urlsafe(16)
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "llmops", "serve", *([model] if model else []), "--host", "127.0.0.1",
               "--port", str(port), *(a for s in sets for a in ("--set", s))]
    def terminated(signum, frame):
        raise SystemExit(128 + signum)  # unwinds through `finally`, which stops the server

    previous = signal.signal(signal.SIGTERM, terminated)
    with tempfile.TemporaryFile("w+", prefix="llmops-chat-serve-") as output:
        # Its own session: Ctrl+C in the chat interrupts an answer, not the server.
        proc = subprocess.Popen(command, env={**os.environ, "LLMOPS_API_KEY": key}, stdin=subprocess.DEVNULL,
                                stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            with (waiting or contextlib.nullcontext)(f"starting llmops serve {model or DEFAULT_MODEL} on {url}"):
                deadline = time.monotonic() + timeout_s
                while proc.poll() is None and not health_ok(url) and time.monotonic() < deadline:
                    time.sleep(0.5)
            if proc.poll() is not None or not health_ok(url):
                output.seek(0)
                tail = output.read().splitlines()[-LOG_TAIL_LINES:]
                raise RuntimeFailure("llmops serve did not start; the end of its output:\n"
                                     + "\n".join("    " + line for line in tail), failure_hint(tail))
            log(f"llmops chat: started llmops serve on {url} (pid {proc.pid})")
            yield url, key
        finally:
            _stop(proc)
            signal.signal(signal.SIGTERM, previous)


def _stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_chat(*, url: str | None, model: str | None, api_key: str | None, system: str | None,
             temperature: float | None, max_tokens: int | None, sets: list[str], resume: str | None = None,
             stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout, waiting=None,
             log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)) -> None:
    """Chat with the server at `url`, or with MODEL served in the background for the length of the chat."""
    if url and sets:
        raise UsageError("--set configures the server llmops chat starts; it does nothing with --url",
                         "drop --set, or drop --url to let llmops chat start the server")
    interactive = stdin.isatty()

    def write(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    def talk(server_url: str, key: str | None, served: str | None) -> None:
        client, name = connect(server_url, key, served)
        session = ChatSession(client, name, system, temperature, max_tokens)
        if resume:
            session.resume(resume)
            log(f"resumed {resume}: {sum(m['role'] == 'user' for m in session.messages)} turns (/history shows "
                "them)")
        if interactive:
            log(f"Chatting with {name} at {server_url}. {HELP}")
        try:
            chat_loop(session, interactive_lines() if interactive else stdin, write, interactive=interactive)
        finally:
            if session.response_id is not None:
                log(f"this conversation is stored as {session.response_id}: continue it with "
                    f"`llmops chat --resume {session.response_id}`")

    if url:
        talk(url, api_key, model)
        return
    with background_server(model, sets, waiting=waiting, log=log) as (server_url, key):
        talk(server_url, key, None)
