"""Benchmark: the same concurrent streaming load against `llmops serve` and against plain vLLM.

    flock /tmp/llmops-heavy.lock python scripts/bench_serve.py   # 32 requests, 8 at a time, 2 rounds

Both servers run the same engine: "plain vLLM" is the exact command `llmops serve` plans (vLLM's own CLI
through the version shim, same flags and environment), started directly, without llmops around it. They run
one after the other, each warmed up first. Reported per server: start-up time to a healthy /health, TTFT and
inter-token latency (ITL) p50/p99, output tokens/s; then the ratios llmops / plain (goal: within 2%).
Every request generates exactly --max-tokens tokens (`ignore_eos`), so both servers do the same work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from llmops.serve.config import ServeConfig
from llmops.serve.server import free_port, health_ok, plan_server

PROMPTS = [
    "Explain how a bicycle works.", "Write a short poem about the sea.", "What is photosynthesis?",
    "Give me three tips for learning a language.", "Describe the city of Paris.", "How do vaccines work?",
    "Tell me a story about a brave cat.", "What are the planets of the solar system?",
]


def start(command: list[str], env: dict[str, str], url: str, log: Path) -> tuple[subprocess.Popen, float]:
    started = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    while not health_ok(url):
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}; see {log}")
        time.sleep(0.25)
    return proc, time.monotonic() - started


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)  # llmops serve stops vLLM; plain vLLM stops its engine itself
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


async def one_request(client, model: str, prompt: str, max_tokens: int) -> dict:
    sent = time.perf_counter()
    times: list[float] = []
    tokens = 0
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"ttft": times[0] - sent, "itl": [b - a for a, b in zip(times, times[1:])], "tokens": tokens}


async def load(url: str, model: str, requests: int, concurrency: int, max_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)

    async def gated(i: int) -> dict:
        async with gate:
            return await one_request(client, model, PROMPTS[i % len(PROMPTS)], max_tokens)

    await asyncio.gather(*(gated(i) for i in range(concurrency)))  # warm-up, not measured
    began = time.perf_counter()
    results = await asyncio.gather(*(gated(i) for i in range(requests)))
    wall = time.perf_counter() - began
    await client.close()
    ttft = [r["ttft"] for r in results]
    itl = [x for r in results for x in r["itl"]]
    tokens = sum(r["tokens"] for r in results)
    return {"ttft_p50_ms": 1000 * percentile(ttft, 50), "ttft_p99_ms": 1000 * percentile(ttft, 99),
            "itl_p50_ms": 1000 * percentile(itl, 50), "itl_p99_ms": 1000 * percentile(itl, 99),
            "output_tok_s": tokens / wall, "output_tokens": tokens, "wall_s": wall}


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="registry alias, folder or hub id [smollm2-135m]")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--kv-cache-gib", type=int, default=1, help="CPU KV cache (engine.cpu_kv_cache_gib)")
    parser.add_argument("--rounds", type=int, default=2, help="repeat, alternating which server goes first")
    parser.add_argument("--json-out", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args()

    sets = [f"engine.cpu_kv_cache_gib={args.kv_cache_gib}"]
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    runs: dict[str, list[dict]] = {"llmops": [], "plain": []}
    for round_ in range(args.rounds):
        # Alternate the order (llmops first, then plain first, ...) so drift in the machine's load evens out.
        for name in ("llmops", "plain") if round_ % 2 == 0 else ("plain", "llmops"):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            config = ServeConfig(model=args.model, port=port, engine={"cpu_kv_cache_gib": args.kv_cache_gib})
            plan = plan_server(config)
            if name == "llmops":
                command = [sys.executable, "-m", "llmops", "serve", *([args.model] if args.model else []),
                           "--port", str(port), *(a for s in sets for a in ("--set", s))]
                env: dict[str, str] = {}
            else:
                command, env = plan.command, plan.env
            print(f"[{name}] starting: {' '.join(command)}", file=sys.stderr)
            proc, startup = start(command, env, url, logs / f"bench-serve-{name}.log")
            try:
                figures = {"startup_s": startup, **asyncio.run(
                    load(url, plan.served_model_name, args.requests, args.concurrency, args.max_tokens))}
            finally:
                stop(proc)
            print(f"[{name}] " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()), file=sys.stderr)
            runs[name].append(figures)

    keys = ["startup_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "output_tok_s"]
    summary = {name: {k: statistics.median(r[k] for r in rs) for k in keys} for name, rs in runs.items()}
    summary["ratio"] = {k: summary["llmops"][k] / summary["plain"][k] for k in keys}
    print(f"{args.requests} streaming requests, {args.concurrency} at a time, {args.max_tokens} tokens each; "
          f"median of {args.rounds} round(s)")
    print(f"{'metric':<14}{'llmops':>10}{'plain':>10}{'ratio':>8}")
    for key in keys:
        print(f"{key:<14}{summary['llmops'][key]:>10.2f}{summary['plain'][key]:>10.2f}{summary['ratio'][key]:>8.3f}")
    if args.json_out:
        args.json_out.write_text(json.dumps({"runs": runs, "median": summary}, indent=2))


if __name__ == "__main__":
    main()
