"""Benchmark: what prefix caching buys a conversation at turn 10, against `llmops serve` (issue 24).

    flock /tmp/llmops-heavy.lock .venv/bin/python scripts/bench_conversations.py      # ~5 min on 2 cores
    flock /tmp/llmops-heavy.lock .venv/bin/python scripts/bench_conversations.py --conversations 8 --turns 6
    flock /tmp/llmops-heavy.lock .venv/bin/python scripts/bench_conversations.py --by-id   # + Responses API by id
    flock /tmp/llmops-heavy.lock .venv/bin/python scripts/bench_conversations.py --replicas 2  # session affinity

vLLM's `bench serve` sends only a conversation's first two turns, so this is a small client of its own:
`--conversations` conversations at once, each `--turns` turns; every turn adds a user message of about
`--turn-tokens` tokens (distinct words per conversation, so conversations share no prefix) and sends the whole
history, as a chat client does, streaming; the answer (`--answer-tokens`, greedy, EOS ignored so every
answer has the same length) joins the history. TTFT is the time to the first streamed token.

It runs twice against `llmops serve` on the default model, as a user starts it: with the plan's prefix caching
and with `--set engine.enable_prefix_caching=false`, both with `--max-queue 0` (admission control counts whole
prompts, and a turn-10 prompt is larger than the backlog planned for 2 cores). The server's prefix-cache hit
rate comes from its `/metrics` (`vllm:prefix_cache_hits` over `vllm:prefix_cache_queries`, in tokens), and the
last status line `llmops serve` printed is shown too. A table goes to stdout; `--json-out FILE` keeps the data.
The goal in issue 24: turn-10 TTFT with prefix caching at most 0.5x without.

`--replicas N` (issue 23) runs one `llmops serve --replicas N` instead, and compares conversations that send
their session header (`x-session-id`: each sticks to one replica, `llmops.serve.routing`) with as many new ones
that do not (each turn to the less busy of two replicas, wherever its prefix is cached).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from llmops.serve.server import free_port
from llmops.serve.status import read_metrics

MODEL = "smollm2-135m"


def user_messages(tokenizer, conversation: int, turns: int, tokens: int) -> list[str]:
    """`turns` messages of about `tokens` tokens each, from words of the tokenizer's own vocabulary, seeded by
    the conversation so no two conversations share a prefix."""
    rng = random.Random(conversation)
    vocab = tokenizer.get_vocab()
    tokens_by_id = sorted(vocab, key=vocab.get)[:20000]  # by id: the same words every run
    words = [w for w in (tokenizer.convert_tokens_to_string([t]).strip() for t in tokens_by_id)
             if w.isalpha() and 3 <= len(w) <= 9]
    messages = []
    for turn in range(turns):
        text = f"Conversation {conversation}, message {turn + 1}. Notes:"
        while len(tokenizer(text)["input_ids"]) < tokens:
            text += " " + " ".join(rng.choice(words) for _ in range(20))
        messages.append(text + "\nSummarize these notes in one sentence.")
    return messages


def start_server(folder: Path, port: int, extra: list[str]) -> subprocess.Popen:
    """`llmops serve` as a user runs it, once it prints that it is ready (`--json` on stdout)."""
    cmd = [sys.executable, "-m", "llmops", "serve", "--port", str(port), "--max-queue", "0", "--status-every", "5",
           "--json", *extra]
    print("$ " + " ".join(cmd[1:]), file=sys.stderr)
    env = {k: v for k, v in os.environ.items() if k != "LLMOPS_API_KEY"}  # a loopback server without a key
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(folder / "serve.stderr", "w"),
                            stdin=subprocess.DEVNULL, text=True, env=env)
    line = proc.stdout.readline()  # the ready line; empty if it exited
    if not line:
        raise SystemExit(f"llmops serve exited {proc.wait()}: {(folder / 'serve.stderr').read_text()[-3000:]}")
    return proc


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)  # llmops serve drains and stops vLLM's process group itself
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def converse(client, messages: list[str], answer_tokens: int, ttfts: list[float | None],
             prompt_tokens: list[int | None], errors: list[str], headers: dict[str, str] | None = None) -> None:
    history: list[dict] = []
    for turn, message in enumerate(messages):
        history.append({"role": "user", "content": message})
        sent = time.perf_counter()
        first, text = None, []
        try:
            stream = client.chat.completions.create(
                model=MODEL, messages=history, max_tokens=answer_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_headers=headers,
                extra_body={"ignore_eos": True, "min_tokens": answer_tokens})
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.perf_counter()
                    text.append(chunk.choices[0].delta.content)
                if chunk.usage:
                    prompt_tokens[turn] = chunk.usage.prompt_tokens
        except Exception as e:  # a failed turn ends the conversation; it is reported, not hidden
            errors.append(f"turn {turn + 1}: {type(e).__name__}: {e}")
            return
        ttfts[turn] = (first - sent) if first else None
        history.append({"role": "assistant", "content": "".join(text)})


def converse_by_id(client, messages: list[str], answer_tokens: int, ttfts: list[float | None],
                   prompt_tokens: list[int | None], errors: list[str], headers: dict[str, str] | None = None) -> None:
    """The same conversation through the Responses API: each turn sends only its new message and the previous
    answer's id; the server (its conversation store) supplies the history."""
    previous = None
    for turn, message in enumerate(messages):
        sent = time.perf_counter()
        first = None
        try:
            stream = client.responses.create(model=MODEL, input=message, previous_response_id=previous,
                                             max_output_tokens=answer_tokens, temperature=0, stream=True,
                                             extra_headers=headers, extra_body={"ignore_eos": True})
            for event in stream:
                if event.type == "response.output_text.delta" and event.delta:
                    first = first or time.perf_counter()
                elif event.type == "response.completed":
                    previous = event.response.id
                    prompt_tokens[turn] = event.response.usage.input_tokens if event.response.usage else None
        except Exception as e:
            errors.append(f"turn {turn + 1}: {type(e).__name__}: {e}")
            return
        if previous is None:
            errors.append(f"turn {turn + 1}: the stream ended without a completed response")
            return
        ttfts[turn] = (first - sent) if first else None


def run(label: str, extra: list[str], args, tokenizer, talk=converse) -> dict:
    folder = Path(tempfile.mkdtemp(prefix=f"bench-conv-{label}-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(folder, port, extra)
    try:
        result = converse_all(url, label, args, tokenizer, talk)
        time.sleep(6)  # one more status line (every 5 s) covers the end of the run
    finally:
        stop_server(proc)
    status = [line for line in (folder / "serve.stderr").read_text().splitlines() if "prefix cache" in line]
    return {**result, "status_lines": status[-3:], "log": str(folder / "serve.stderr")}


def converse_all(url: str, label: str, args, tokenizer, talk=converse, first_conversation: int = 0,
                 sessions: bool = False) -> dict:
    """`args.conversations` conversations at once against the server at `url`; `sessions`: each sends its
    own session header (`x-session-id`), so that replicas behind Ray Serve keep its turns on one engine."""
    import openai

    from llmops.serve.replicas import SESSION_HEADER

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    before = read_metrics(url, timeout=30)
    n, turns = args.conversations, args.turns
    ttfts = [[None] * turns for _ in range(n)]
    prompts = [[None] * turns for _ in range(n)]
    errors: list[str] = []
    conversations = range(first_conversation, first_conversation + n)
    threads = [threading.Thread(target=talk, args=(client, user_messages(tokenizer, c, turns, args.turn_tokens),
                                                   args.answer_tokens, ttfts[i], prompts[i], errors),
                                kwargs={"headers": {SESSION_HEADER: f"conversation-{c}"} if sessions else None})
               for i, c in enumerate(conversations)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    after = read_metrics(url, timeout=30)  # behind replicas: one replica's counters
    queries = after.prefix_queries - before.prefix_queries
    hits = after.prefix_hits - before.prefix_hits
    return {"label": label, "ttft_s": ttfts, "prompt_tokens": prompts, "errors": errors, "wall_s": wall,
            "prefix_queries": queries, "prefix_hits": hits, "hit_rate": hits / queries if queries else None,
            "status_lines": []}


def run_replicas(args, tokenizer) -> list[dict]:
    """One `llmops serve --replicas N`: the conversations with their session header (each sticks to one
    replica), then as many new ones without it (each turn to the less busy of two replicas at random)."""
    folder = Path(tempfile.mkdtemp(prefix="bench-conv-replicas-"))
    port = free_port()
    proc = start_server(folder, port, ["--replicas", str(args.replicas)])
    try:
        url = f"http://127.0.0.1:{port}"
        # New conversations for the second run: none of its prefixes is in a cache from the first.
        return [converse_all(url, "session affinity", args, tokenizer, sessions=True),
                converse_all(url, "no affinity", args, tokenizer, first_conversation=1000)]
    finally:
        stop_server(proc)


def turn_stats(result: dict, turn: int) -> tuple[float | None, float | None, float | None]:
    values = [c[turn] for c in result["ttft_s"] if c[turn] is not None]
    tokens = [c[turn] for c in result["prompt_tokens"] if c[turn] is not None]
    if not values:
        return None, None, None
    return statistics.median(values), max(values), statistics.mean(tokens) if tokens else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=4, help="conversations at once")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--turn-tokens", type=int, default=400, help="tokens of each user message")
    parser.add_argument("--answer-tokens", type=int, default=32, help="tokens of each answer")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--replicas", type=int, default=0,
                        help="instead: `llmops serve --replicas N`, turn TTFT with the conversations' session "
                             "header (each sticks to one replica) against without it")
    parser.add_argument("--by-id", action="store_true",
                        help="a third run, caching on: each turn through the Responses API with only its new "
                             "message and previous_response_id, against the whole history sent each turn")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from llmops.registry import ensure_local, resolve

    tokenizer = AutoTokenizer.from_pretrained(ensure_local(resolve(MODEL)))
    if args.replicas:
        results = run_replicas(args, tokenizer)
        if args.json_out:
            args.json_out.write_text(json.dumps(results, indent=1))
        print(f"`llmops serve {MODEL} --replicas {args.replicas}`, --max-queue 0: {args.conversations} conversations "
              f"at once x {args.turns} turns, ~{args.turn_tokens} tokens per user message, {args.answer_tokens}-token "
              "answers\n\n| turn | prompt tokens | TTFT median, session affinity | TTFT median, no affinity | ratio "
              "| max, affinity | max, no affinity |\n|---|---|---|---|---|---|---|")
        for turn in sorted({0, args.turns // 2 - 1, args.turns - 1}):
            (am, ax, tok), (nm, nx, _) = turn_stats(results[0], turn), turn_stats(results[1], turn)
            fmt = lambda v: f"{v * 1000:.0f} ms" if v is not None else "-"  # noqa: E731
            print(f"| {turn + 1} | {tok or 0:.0f} | {fmt(am)} | {fmt(nm)} | "
                  f"{f'{am / nm:.2f}x' if am and nm else '-'} | {fmt(ax)} | {fmt(nx)} |")
        for r in results:
            every = sorted(t for c in r["ttft_s"] for t in c if t is not None)
            print(f"{r['label']}: all turns in {r['wall_s']:.0f} s; TTFT over every turn: mean "
                  f"{statistics.mean(every) * 1000:.0f} ms, p90 {every[int(0.9 * len(every))] * 1000:.0f} ms; "
                  f"errors: {len(r['errors'])}")
            for e in r["errors"]:
                print(f"  {e}", file=sys.stderr)
        return
    results = [run("caching", [], args, tokenizer),
               run("no caching", ["--set", "engine.enable_prefix_caching=false"], args, tokenizer)]
    if args.by_id:
        results.append(run("by id", [], args, tokenizer, talk=converse_by_id))
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=1))

    for r in results:
        for e in r["errors"]:
            print(f"{r['label']}: {e}", file=sys.stderr)
    print(f"{args.conversations} conversations at once x {args.turns} turns, ~{args.turn_tokens} tokens per user "
          f"message, {args.answer_tokens}-token answers; `llmops serve {MODEL}` (its plan), --max-queue 0\n")
    print("| turn | prompt tokens | TTFT median, caching | TTFT median, no caching | ratio | max, caching | "
          "max, no caching |")
    print("|---|---|---|---|---|---|---|")
    shown = sorted({0, args.turns // 2 - 1, args.turns - 1})
    for turn in shown:
        (cm, cx, tok), (nm, nx, _) = turn_stats(results[0], turn), turn_stats(results[1], turn)
        ratio = f"{cm / nm:.2f}x" if cm and nm else "-"
        fmt = lambda v: f"{v * 1000:.0f} ms" if v is not None else "-"  # noqa: E731
        print(f"| {turn + 1} | {tok or 0:.0f} | {fmt(cm)} | {fmt(nm)} | {ratio} | {fmt(cx)} | {fmt(nx)} |")
    print()
    for r in results:
        rate = f"{r['hit_rate']:.0%}" if r["hit_rate"] is not None else "-"
        print(f"{r['label']}: prefix-cache hit rate {rate} ({r['prefix_hits']:,} of {r['prefix_queries']:,} prompt "
              f"tokens), all turns in {r['wall_s']:.0f} s; last status line: "
              f"{r['status_lines'][-1] if r['status_lines'] else '(none)'}")
    if args.by_id:
        print("\n| turn | TTFT median, whole history | TTFT median, previous_response_id | ratio |\n|---|---|---|---|")
        for turn in shown:
            (wm, _, _), (im, _, _) = turn_stats(results[0], turn), turn_stats(results[2], turn)
            print(f"| {turn + 1} | {wm * 1000:.0f} ms | {im * 1000:.0f} ms | {im / wm:.2f}x |" if wm and im else
                  f"| {turn + 1} | - | - | - |")
    (cm, _, _), (nm, _, _) = turn_stats(results[0], args.turns - 1), turn_stats(results[1], args.turns - 1)
    if cm and nm:
        print(f"\nturn-{args.turns} TTFT with caching / without: {cm / nm:.2f}x (goal: at most 0.5x): "
              f"{'met' if cm / nm <= 0.5 else 'NOT met'}")


if __name__ == "__main__":
    main()
