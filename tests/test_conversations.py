"""The Responses API's conversation store (issue 24): `store` and `previous_response_id` through a SQLite file
that survives restarts, is bounded by age and count, and can be listed and pruned. The store alone in unit
tests; a real `llmops serve` (vLLM on the CPU, the offline default model) in the engine tests, one server for
the module plus one restart."""

from __future__ import annotations

import json
import sqlite3
import stat
import threading
from pathlib import Path
from typing import Callable

import pytest

from llmops.serve.conversations import FILE, ConversationStore, StoreColumn
from tests.conftest import run_cli


class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self):
        return self.now


def store_at(folder: Path, **kwargs) -> ConversationStore:
    return ConversationStore(folder / FILE, **kwargs)


@pytest.mark.unit
def test_the_store_is_owner_only_persistent_and_shared_between_connections(tmp_path):
    folder = tmp_path / "state"
    store = store_at(folder)
    messages = StoreColumn(store, "messages", json.dumps, json.loads)
    messages["resp_1"] = [{"role": "user", "content": "hi"}]
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and stat.S_IMODE((folder / FILE).stat().st_mode) == 0o600
    other = StoreColumn(store_at(folder), "messages", json.dumps, json.loads)  # another process, or a restart
    assert other["resp_1"] == [{"role": "user", "content": "hi"}] and other.get("resp_2") is None
    assert store.get("response", "resp_1") is None  # its response is not written yet: not served
    store.put("response", "resp_1", '{"id": "resp_1"}')
    assert other.store.get("response", "resp_1") == '{"id": "resp_1"}'
    assert [(s.id, s.turns) for s in other.store.list()] == [("resp_1", 1)]


@pytest.mark.unit
def test_past_the_ttl_a_response_is_gone_and_prune_removes_it(tmp_path):
    clock = Clock()
    store = store_at(tmp_path, ttl_s=60, clock=clock)
    store.put("response", "old", "{}")
    clock.now += 30
    store.put("response", "new", "{}")
    clock.now += 40  # old is 70 s old, new 40 s
    assert store.get("response", "old") is None and store.get("response", "new") == "{}"
    assert store.count() == 1
    assert store.prune() == 1 and [s.id for s in store.list()] == ["new"]
    assert sqlite3.connect(tmp_path / FILE).execute("SELECT COUNT(*) FROM responses").fetchone()[0] == 1
    assert store.evicted_total() == 0  # expiry is not eviction


@pytest.mark.unit
def test_past_the_cap_the_oldest_are_evicted_first_and_counted(tmp_path):
    clock = Clock()
    store = store_at(tmp_path, max_responses=3, clock=clock)
    for i in range(5):
        clock.now += 1
        store.put("messages", f"r{i}", "[]")
        store.put("response", f"r{i}", "{}")  # a second write to a row keeps its age
    assert [s.id for s in store.list()] == ["r4", "r3", "r2"]
    assert store.evicted_total() == 2
    assert store.remove("r3") and not store.remove("r3")
    assert [s.id for s in store.list()] == ["r4", "r2"]


def write_concurrently(open_store: Callable[[], ConversationStore], writers=4, each=50) -> None:
    """`writers` threads, each on a connection of its own (as another process or machine has), each writing
    `each` responses; then every one of them reads back as written."""

    def write(n):
        own = open_store()
        for i in range(each):
            own.put("messages", f"w{n}-{i}", json.dumps([n, i]))

    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store = open_store()
    assert store.count() >= writers * each
    assert all(json.loads(store.get("messages", f"w{n}-{i}")) == [n, i] for n in range(writers) for i in range(each))


@pytest.mark.unit
def test_concurrent_writers_lose_nothing(tmp_path):
    write_concurrently(lambda: store_at(tmp_path))
    assert store_at(tmp_path).count() == 200


@pytest.mark.unit
def test_stores_opened_at_once_on_a_new_file_all_open(tmp_path):
    # Servers started together (`--replicas`) open one new file at once; SQLite refused some of them at once
    # ("database is locked" from the switch to WAL): 12 of 300 rounds of 6.
    failed = []
    for round_ in range(300):
        folder, barrier = tmp_path / str(round_), threading.Barrier(6)

        def open_one(n, folder=folder, barrier=barrier):
            barrier.wait()
            try:
                store_at(folder).put("messages", f"k{n}", "[]")
            except Exception as e:  # noqa: BLE001 (collected: the assertion names them)
                failed.append(f"round {round_}: {e!r}")

        threads = [threading.Thread(target=open_one, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not failed, failed[:3]


@pytest.fixture(scope="module")
def postgres_url(tmp_path_factory):
    """A local PostgreSQL (pgserver: its own binaries, a unix socket in the folder), stopped after the module."""
    import pgserver

    server = pgserver.get_server(tmp_path_factory.mktemp("pg"), cleanup_mode="stop")
    yield server.get_uri()
    server.cleanup()


@pytest.mark.unit
def test_a_postgres_store_is_shared_by_two_servers_bounded_and_counts_each_eviction_once(postgres_url):
    import psycopg

    with psycopg.connect(postgres_url, autocommit=True) as db:  # a fresh database for this test
        db.execute("DROP DATABASE IF EXISTS shared_test")
        db.execute("CREATE DATABASE shared_test")
    url = postgres_url.replace("/postgres?", "/shared_test?")
    clock = Clock()
    a, b = (ConversationStore(url, ttl_s=60, max_responses=3, clock=clock) for _ in range(2))  # two servers
    StoreColumn(a, "messages", json.dumps, json.loads)["r0"] = [{"role": "user", "content": "hi"}]
    assert json.loads(b.get("messages", "r0")) == [{"role": "user", "content": "hi"}]
    assert b.get("response", "r0") is None
    for i in range(1, 5):
        clock.now += 1
        (a if i % 2 else b).put("response", f"r{i}", "{}")
    assert [s.id for s in b.list()] == ["r4", "r3", "r2"] and a.evicted_total() == b.evicted_total() == 2
    clock.now += 58.5  # r2 is 60.5 s old
    assert a.get("response", "r2") is None and a.count() == 2 and b.prune() == 1
    assert a.remove("r4") and not b.remove("r4")
    with psycopg.connect(url, autocommit=True) as admin:  # the server drops a's connection (a restart, a failover)
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'shared_test' "
                      "AND pid <> pg_backend_pid()")
    a.put("response", "r5", "{}")  # on a connection opened again
    assert b.get("response", "r5") == "{}" and a.get("response", "r3") == "{}"

    write_concurrently(lambda: ConversationStore(url), each=25)


@pytest.mark.unit
def test_a_state_url_is_a_postgres_url_without_a_password():
    from pydantic import ValidationError

    from llmops.serve.config import ServeConfig

    assert ServeConfig(state_url="postgresql://llmops@db.internal:5432/chat").state_url
    for url, said in [("redis://db:6379", "is not a PostgreSQL URL"),
                      ("postgresql://llmops:s3cret@db/chat", "PGPASSWORD")]:
        with pytest.raises(ValidationError, match=said):
            ServeConfig(state_url=url)
    proc = run_cli("serve", "--dry-run", "--json", "--state-url", "postgresql://llmops@db.internal/chat")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(json.loads(proc.stdout)["env"]["LLMOPS_CONVERSATIONS"])["url"] == \
        "postgresql://llmops@db.internal/chat"
    unreachable = run_cli("conversations", "list", "--state-url", "postgresql://nobody@127.0.0.1:1/none")
    assert unreachable.returncode == 2 and "cannot reach the conversation store" in unreachable.stderr


@pytest.mark.unit
def test_conversations_cli_lists_removes_and_prunes(tmp_path):
    store = store_at(tmp_path)
    store.put("messages", "resp_a", json.dumps([{"role": "user", "content": "x"}] * 3))
    store.put("response", "resp_a", "{}")
    listed = run_cli("conversations", "list", "--state-dir", str(tmp_path), "--json")
    assert listed.returncode == 0, listed.stderr
    [row] = json.loads(listed.stdout)
    assert row["id"] == "resp_a" and row["turns"] == 3
    gone = run_cli("conversations", "rm", "resp_a", "--state-dir", str(tmp_path))
    assert gone.returncode == 0 and store.get("messages", "resp_a") is None
    again = run_cli("conversations", "rm", "resp_a", "--state-dir", str(tmp_path))
    assert again.returncode == 2 and "no stored response resp_a" in again.stderr
    pruned = run_cli("conversations", "prune", "--state-dir", str(tmp_path), "--ttl", "1s", "--json")
    assert pruned.returncode == 0 and json.loads(pruned.stdout) == {"removed": 0}
    missing = run_cli("conversations", "list", "--state-dir", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no conversation store" in missing.stderr


@pytest.mark.unit
def test_serve_flags_set_the_store_the_server_is_given(tmp_path):
    def store_env(*flags):
        proc = run_cli("serve", "--dry-run", "--json", *flags)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)["env"]["LLMOPS_CONVERSATIONS"]

    assert store_env("--no-store") == "off"
    assert json.loads(store_env("--state-dir", str(tmp_path), "--conversation-ttl", "12h")) == {
        "path": str(tmp_path / FILE), "ttl_s": 12 * 3600, "max_responses": 100_000}
    bad = run_cli("serve", "--dry-run", "--conversation-ttl", "12x")
    assert bad.returncode == 2 and "is not a duration" in bad.stderr


# --- a real server ------------------------------------------------------------------------------------

# Above the 50 responses of the ten concurrent conversations: at 30, a conversation held back by 503s and
# retries while the others went on had its last turn evicted (oldest first) before the test read it.
CAP = 60
TURNS = ["Hello! My name is Ada and I like tea.", "What is two plus two?", "Name a colour.",
         "Say something about the sea.", "What is the capital of France?", "Count to three.",
         "Name an animal.", "What do bees make?", "Say goodbye politely.", "Thank you!"]


@pytest.fixture(scope="module")
def served(default_model_dir, tmp_path_factory):
    """One server for the module, its store in a folder of its own; a test that restarts it leaves the new
    one here."""
    from tests.test_serve import start_server, stop_server

    state = tmp_path_factory.mktemp("state")
    args = ("--set", f"state_dir={state}", "--set", f"max_stored_responses={CAP}", "--set", "engine.enforce_eager=true")
    servers = [start_server(tmp_path_factory.mktemp("serve"), *args)]
    holder = {"state": state, "servers": servers,
              "restart": lambda: (stop_server(servers[-1]),
                                  servers.append(start_server(tmp_path_factory.mktemp("serve"), *args)))}
    yield holder
    for server in servers:
        stop_server(server)


def client_of(server, retries=0):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.key, max_retries=retries, timeout=120)


def ask(client, text, previous=None, tokens=12, **kwargs):
    return client.responses.create(model="smollm2-135m", input=text, previous_response_id=previous,
                                   temperature=0, max_output_tokens=tokens, **kwargs)


def history(state: Path, response_id: str) -> list[dict]:
    row = sqlite3.connect(state / FILE).execute("SELECT messages FROM responses WHERE id = ?",
                                                (response_id,)).fetchone()
    return json.loads(row[0])


@pytest.mark.engine
def test_ten_turns_by_previous_response_id_answer_as_the_whole_history_does(served):
    client = client_of(served["servers"][-1])
    by_id, previous = [], None
    for turn in TURNS:
        response = ask(client, turn, previous)
        assert response.status in ("completed", "incomplete") and response.id.startswith("resp_")  # incomplete:
        # it reached max_output_tokens
        by_id.append(response.output_text)
        previous = response.id
    sent: list[dict] = []
    whole = []
    for turn, answer in zip(TURNS, by_id):
        sent.append({"role": "user", "content": turn})
        whole.append(ask(client, list(sent), store=False).output_text)
        sent.append({"role": "assistant", "content": answer})
    assert by_id == whole  # greedy: the stored history is the history
    assert [m["content"] for m in history(served["state"], previous) if m.get("role") == "user"] == TURNS


@pytest.mark.engine
def test_an_unknown_or_expired_previous_response_id_gets_404(served):
    import openai

    client = client_of(served["servers"][-1])
    first = ask(client, "Remember the word apple.")
    with sqlite3.connect(served["state"] / FILE) as db:  # a week and a second ago
        db.execute("UPDATE responses SET created = created - ? WHERE id = ?", (7 * 86400 + 1, first.id))
    for gone in (first.id, "resp_never_was"):
        with pytest.raises(openai.NotFoundError) as refused:
            ask(client, "Which word?", gone)
        assert refused.value.body["type"] == "invalid_request_error" and gone in refused.value.body["message"]


@pytest.mark.engine
def test_ten_concurrent_conversations_of_five_turns_lose_no_turn_and_mix_none(served):
    from concurrent.futures import ThreadPoolExecutor

    # Ten at once pass the server's prefill backlog limit: a refused turn gets 503 with Retry-After, and the
    # client retries it, as OpenAI's client does by default.
    client = client_of(served["servers"][-1], retries=10)

    def converse(n):
        previous, said = None, []
        for turn in range(5):
            said.append(f"Conversation {n}, turn {turn}: my code word is {n * 7 + turn}.")
            previous = ask(client, said[-1], previous, tokens=6).id
        return previous, said

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(converse, range(10)))
    for last, said in results:
        assert [m["content"] for m in history(served["state"], last) if m.get("role") == "user"] == said


@pytest.mark.engine
def test_past_the_cap_the_oldest_responses_are_evicted_and_metrics_count_them(served):
    import openai
    import urllib.request

    server = served["servers"][-1]
    client = client_of(server)
    oldest = ask(client, "The first of many.", tokens=1).id
    for i in range(CAP):
        ask(client, f"Number {i}.", tokens=1)
    with pytest.raises(openai.NotFoundError):
        ask(client, "And the first?", oldest, tokens=1)
    assert len(ConversationStore(served["state"] / FILE).list()) <= CAP
    text = urllib.request.urlopen(server.url + "/metrics", timeout=30).read().decode()
    evicted = [float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("llmops_conversations_evicted_total ")]
    assert evicted and evicted[0] >= 1, [line for line in text.splitlines() if "llmops_" in line]


@pytest.mark.engine
def test_llmops_chat_resumes_a_stored_conversation_and_stores_its_new_turns(served):
    server = served["servers"][-1]
    client = client_of(server)
    first = ask(client, "Hello, I am Ada.")
    second = ask(client, "I live in Lisbon.", first.id)
    items = client.responses.input_items.list(second.id, order="asc")
    assert [(i.role, i.content[0].text) for i in items.data if i.role == "user"] == \
        [("user", "Hello, I am Ada."), ("user", "I live in Lisbon.")]
    proc = run_cli("chat", "--url", server.url, "--api-key", server.key, "--resume", second.id, "--temperature", "0",
                   "--max-tokens", "8", input="/history\nWhere do I live?\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    shown = (f"user: Hello, I am Ada.\nassistant: {first.output_text}\nuser: I live in Lisbon.\n"
             f"assistant: {second.output_text}\n\n")
    assert proc.stdout.startswith(shown), proc.stdout
    assert proc.stdout[len(shown):].strip()  # the new turn's answer
    stored = proc.stderr.split("this conversation is stored as ", 1)[1].split(":", 1)[0]
    assert stored != second.id
    assert [m["content"] for m in history(served["state"], stored) if m.get("role") == "user"] == \
        ["Hello, I am Ada.", "I live in Lisbon.", "Where do I live?"]
    missing = run_cli("chat", "--url", server.url, "--api-key", server.key, "--resume", "resp_gone", input="hi\n")
    assert missing.returncode == 2 and "no stored conversation resp_gone" in missing.stderr


@pytest.mark.engine
def test_a_conversation_continues_after_the_server_restarts(served):
    client = client_of(served["servers"][-1])
    previous = None
    for turn in TURNS[:5]:
        previous = ask(client, turn, previous).id
    served["restart"]()  # SIGTERM, then a new server on the same store
    after = ask(client_of(served["servers"][-1]), TURNS[5], previous)
    assert after.status in ("completed", "incomplete") and after.output_text
    assert [m["content"] for m in history(served["state"], after.id) if m.get("role") == "user"] == TURNS[:6]


@pytest.mark.engine
def test_two_servers_sharing_a_postgres_store_continue_each_others_conversations(postgres_url, default_model_dir,
                                                                                 tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from tests.test_serve import start_server, stop_server

    args = ("--state-url", postgres_url, "--set", "engine.enforce_eager=true")
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    with ThreadPoolExecutor(2) as pool:  # two servers, as on two machines
        starting = [pool.submit(start_server, tmp_path / name, *args) for name in ("a", "b")]
        servers = [s.result() for s in starting]
    try:
        on_a, on_b = (client_of(server) for server in servers)
        first = ask(on_a, "Hello! My name is Ada and I live in Lisbon.")
        second = ask(on_b, "Where do I live?", first.id)  # the other server, the same conversation
        third = ask(on_a, "What is my name?", second.id)
        assert second.output_text and third.output_text
        store = ConversationStore(postgres_url)
        users = [m["content"] for m in json.loads(store.get("messages", third.id)) if m.get("role") == "user"]
        assert users == ["Hello! My name is Ada and I live in Lisbon.", "Where do I live?", "What is my name?"]
    finally:
        for server in servers:
            stop_server(server)


@pytest.mark.engine
def test_no_store_refuses_an_explicit_store_true_and_serves_store_false(tmp_path):
    import subprocess
    import sys

    # The check the server runs, on vLLM's own request type, in a process of its own (it patches vLLM's class).
    script = """
import types
from llmops.serve.conversations import install
from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
from vllm.entrypoints.openai.responses.serving import OpenAIServingResponses as S
install("off")
me = types.SimpleNamespace(use_harmony=False, enable_store=False, create_error_response=lambda **kw: kw)
print(S._validate_create_responses_input(me, ResponsesRequest(input="hi", store=True))["message"])
print(S._validate_create_responses_input(me, ResponsesRequest(input="hi", store=False)))
print(S._validate_create_responses_input(me, ResponsesRequest(input="hi")))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    refused, explicit_false, default = proc.stdout.splitlines()[-3:]
    assert "llmops serve --no-store" in refused and "store=false" in refused
    assert explicit_false == "None" and default == "None"  # the default `store` is not a request to store
