"""`llmops chat`: the conversation loop against a fake client (unit), and `llmops chat MODEL` starting and
stopping its own server (engine). Chat against a running server (`--url`) is tested in test_serve.py,
against the server started there."""

from __future__ import annotations

import io
import re
import time
from types import SimpleNamespace

import pytest

from llmops.errors import UsageError
from llmops.serve.chat import ChatSession, chat_loop, run_chat
from llmops.serve.server import check_port_free
from tests.conftest import run_cli


class FakeCompletions:
    """Streams back the last user message, upper-cased, two characters a chunk; records every request."""

    def __init__(self):
        self.requests: list[dict] = []

    def create(self, **kwargs):
        self.requests.append({**kwargs, "messages": list(kwargs["messages"])})
        text = kwargs["messages"][-1]["content"].upper()
        for i in range(0, len(text), 2):
            yield SimpleNamespace(choices=[SimpleNamespace(delta=SimpleNamespace(content=text[i:i + 2]))])
        yield SimpleNamespace(choices=[])  # the usage chunk at the end of a stream has no choices


def fake_session(**kwargs) -> tuple[ChatSession, FakeCompletions]:
    completions = FakeCompletions()
    client = SimpleNamespace(chat=SimpleNamespace(completions=completions))
    return ChatSession(client, "m", **kwargs), completions


@pytest.mark.unit
def test_loop_streams_keeps_history_clears_and_exits():
    session, completions = fake_session(system="Be brief.", temperature=0.0)
    written: list[str] = []
    chat_loop(session, ["hello", "", "again", "/clear", "third", "/exit", "never sent"], written.append,
              interactive=False)
    assert "".join(written) == "HELLO\nAGAIN\nTHIRD\n"
    assert written[:3] == ["HE", "LL", "O"]  # streamed piece by piece
    assert [len(r["messages"]) for r in completions.requests] == [2, 4, 2]
    assert completions.requests[1]["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "HELLO"}, {"role": "user", "content": "again"}]
    assert completions.requests[2]["messages"][0]["role"] == "system"  # /clear keeps the system prompt
    assert all(r["stream"] and r["temperature"] == 0.0 and "max_tokens" not in r for r in completions.requests)


@pytest.mark.unit
def test_interrupted_answer_is_kept_and_the_chat_goes_on():
    session, completions = fake_session()
    calls = []

    def write(text):
        calls.append(text)
        if text == "LO":
            raise KeyboardInterrupt  # Ctrl+C while the answer streams

    chat_loop(session, ["long", "next"], write, interactive=True)
    assert "".join(calls) == "LO [interrupted]\n\nNE" + "XT\n\n"
    assert session.messages[1] == {"role": "assistant", "content": "LO"}


@pytest.mark.unit
def test_url_with_set_is_a_usage_error():
    with pytest.raises(UsageError, match="--set configures the server"):
        run_chat(url="http://127.0.0.1:1", model=None, api_key=None, system=None, temperature=None,
                 max_tokens=None, sets=["engine.cpu_kv_cache_gib=1"], stdin=io.StringIO(""))


@pytest.mark.unit
def test_no_server_at_url_exits_2():
    proc = run_cli("chat", "--url", "http://127.0.0.1:9", input="hi\n", timeout=60)
    assert proc.returncode == 2 and "no server answers at http://127.0.0.1:9/v1" in proc.stderr


@pytest.mark.engine
def test_chat_model_starts_its_own_server_and_stops_it(default_model_dir):
    started = time.monotonic()
    proc = run_cli("chat", "smollm2-135m", "--set", "engine.cpu_kv_cache_gib=1", "--temperature", "0",
                   "--max-tokens", "32", input="What is the capital of France?\n", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Paris" in proc.stdout
    match = re.search(r"started llmops serve on http://127.0.0.1:(\d+) \(pid (\d+)\)", proc.stderr)
    assert match, proc.stderr[-2000:]
    check_port_free("127.0.0.1", int(match.group(1)))  # stopped on exit
    print(f"llmops chat MODEL: {time.monotonic() - started:.0f} s", flush=True)
