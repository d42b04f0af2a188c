"""Benchmark: `llmops serve` (planned, with admission control) against plain `vllm serve` under uneven traffic.

    flock /tmp/llmops-heavy.lock python scripts/bench_serve_traffic.py            # ~20 min on 2 cores
    flock /tmp/llmops-heavy.lock python scripts/bench_serve_traffic.py --spike-only
    flock /tmp/llmops-heavy.lock python scripts/bench_serve_traffic.py --prompts 64 --rate 2 --no-spike  # light

The load is vLLM's own generator, `vllm bench serve` (through the project's version shim), with random
prompts and `--goodput ttft:SLO`: requests per second that met the TTFT SLO. Three loads per server:
- steady: Poisson arrivals at --rate;
- bursty: the same rate with `--burstiness 0.3` (gamma arrivals, clumped);
- ramp: `--ramp-up-strategy linear` from 1 request/s to --ramp-end, past capacity.
Servers: `llmops` (the plan, as `llmops serve` runs it) and `vllm-kv4` (vLLM's defaults plus a KV cache that
fits, VLLM_CPU_KVCACHE_SPACE=4). `--with-vllm-defaults` adds vLLM's bare defaults; on a 24 GiB machine its CPU
KV cache took 20.5 GiB and the machine thrashed (not one of 64 requests finished in 10 minutes), so it is off
unless asked for. A refused request (503) counts as not good, as a client that gave up would.

The default load is past this machine's capacity, which is what admission control is for: 2 cores serve the
default model at ~1.4 requests/s of 256 in / 128 out (vLLM's log: ~175 generated tok/s with 45-62 running),
and 200 requests arrive at 4/s (bursty) or ramp from 1 to 12/s. `--llmops-args "--ttft-target-ms 1000000"`
runs llmops without its prompt-token limit (the request limit alone), `--servers llmops` skips vLLM.

Then the spike: 10x the planned concurrency at once against `llmops serve`, with its planned queue limit and
without one (`--max-queue 0`), the figures issue 20 asks for.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llmops.serve.config import ServeConfig
from llmops.serve.server import ENTRY_MODULE, free_port, health_ok, plan_server

SLO_MS = 2000


def start(command: list[str], env: dict[str, str], url: str, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        proc = subprocess.Popen(command, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while not health_ok(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise SystemExit(f"server did not start; see {log}")
        time.sleep(0.5)
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # our own server's process group
        proc.wait()


def bench(url: str, model: str, tokenizer: str, load: str, args, out: Path) -> dict:
    """One `vllm bench serve` run; returns its saved result with the figures the table needs."""
    shape = {"steady": ["--request-rate", str(args.rate)],
             "bursty": ["--request-rate", str(args.rate), "--burstiness", "0.3"],
             "ramp": ["--ramp-up-strategy", "linear", "--ramp-up-start-rps", "1", "--ramp-up-end-rps",
                      str(args.ramp_end)]}[load]
    name = f"{load}.json"
    command = [sys.executable, "-m", ENTRY_MODULE, "bench", "serve", "--backend", "openai-chat",
               "--endpoint", "/v1/chat/completions", "--base-url", url, "--model", model, "--tokenizer", tokenizer,
               "--dataset-name", "random", "--random-input-len", str(args.input_len), "--random-output-len",
               str(args.output_len), "--num-prompts", str(args.prompts), "--ignore-eos", "--seed", "0",
               "--goodput", f"ttft:{SLO_MS}", "--save-result", "--save-detailed", "--result-dir", str(out),
               "--result-filename", name, "--disable-tqdm", *shape]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900)
    result = json.loads((out / name).read_text())
    ttfts = [t * 1000 for t, e in zip(result["ttfts"], result["errors"]) if not e]
    refused = sum(1 for e in result["errors"] if e and ("503" in e or "Service Unavailable" in e))
    return {"completed": result["completed"], "refused": refused, "failed": result["failed"],
            "goodput": result["request_goodput"], "ttft_p50": result["median_ttft_ms"],
            "ttft_p99": result["p99_ttft_ms"], "ttft_max": max(ttfts, default=math.nan),
            "tpot_p50": result.get("median_tpot_ms", math.nan), "duration": result["duration"]}


async def spike(url: str, model: str, n: int, max_tokens: int) -> dict:
    """`n` streamed requests at once: how many were refused and how fast, and the admitted ones' TTFT."""
    import httpx

    async def one(client) -> tuple[int, float, float | None]:
        sent = time.perf_counter()
        body = {"model": model, "messages": [{"role": "user", "content": "Tell me about the sea. " * 20}],
                "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            status, headers_s, ttft = response.status_code, time.perf_counter() - sent, None
            async for line in response.aiter_lines():
                if ttft is None and line.startswith("data: {") and '"content":' in line:
                    ttft = time.perf_counter() - sent
        return status, headers_s, ttft

    limits = httpx.Limits(max_connections=n + 10)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        rows = await asyncio.gather(*(one(client) for _ in range(n)))
    ttfts = sorted(t * 1000 for s, _, t in rows if s == 200 and t is not None)
    refused = [h * 1000 for s, h, _ in rows if s == 503]
    return {"admitted": len(ttfts), "refused": len(refused), "slowest_refusal_ms": max(refused, default=0),
            "ttft_p50": ttfts[len(ttfts) // 2] if ttfts else math.nan,
            "ttft_p99": ttfts[min(len(ttfts) - 1, math.ceil(0.99 * len(ttfts)) - 1)] if ttfts else math.nan}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="registry alias, folder or hub id [smollm2-135m]")
    parser.add_argument("--prompts", type=int, default=200, help="requests per load")
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rate", type=float, default=4.0, help="requests/s for the steady and bursty loads")
    parser.add_argument("--ramp-end", type=int, default=12, help="requests/s the ramp ends at (vLLM takes an int)")
    parser.add_argument("--loads", default="bursty,ramp")
    parser.add_argument("--with-vllm-defaults", action="store_true",
                        help="also run vLLM's bare defaults (its CPU KV cache may take most of the RAM)")
    parser.add_argument("--spike-only", action="store_true")
    parser.add_argument("--no-spike", action="store_true")
    parser.add_argument("--servers", default="llmops,vllm-kv4", help="which of llmops,vllm-kv4 to run")
    parser.add_argument("--llmops-args", default="", help="more `llmops serve` flags for the llmops server")
    parser.add_argument("--spike-seqs", type=int, default=4, help="engine.max_num_seqs for the spike's server")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-serve-traffic-"))
    figures: dict = {"loads": {}, "spike": {}}
    plan = plan_server(ServeConfig(model=args.model))
    servers = {"llmops": None, "vllm-kv4": {"VLLM_CPU_KVCACHE_SPACE": "4"}}
    if args.with_vllm_defaults:
        servers["vllm-defaults"] = {}
    servers = {k: v for k, v in servers.items() if k in args.servers.split(",") or k == "vllm-defaults"}
    for name, env in ({} if args.spike_only else servers).items():
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        if env is None:
            command = [sys.executable, "-m", "llmops", "serve", *([args.model] if args.model else []),
                       "--port", str(port), *args.llmops_args.split()]
        else:
            command = [sys.executable, "-m", ENTRY_MODULE, "serve", plan.model_path, "--served-model-name",
                       plan.served_model_name, "--port", str(port)]
        print(f"[{name}] {' '.join(command)}", file=sys.stderr)
        proc = start(command, env or {}, url, work / f"{name}.log")
        try:
            for load in args.loads.split(","):
                row = bench(url, plan.served_model_name, plan.model_path, load, args, work / name)
                figures["loads"].setdefault(load, {})[name] = row
                print(f"[{name}] {load}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()), file=sys.stderr)
        finally:
            stop(proc)

    for limited in () if args.no_spike else (True, False):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "llmops", "serve", *([args.model] if args.model else []), "--port",
                   str(port), "--set", f"engine.max_num_seqs={args.spike_seqs}",
                   *([] if limited else ["--max-queue", "0"])]
        proc = start(command, {}, url, work / f"spike-{limited}.log")
        try:
            asyncio.run(spike(url, plan.served_model_name, args.spike_seqs, 32))  # warm-up
            row = asyncio.run(spike(url, plan.served_model_name, 10 * args.spike_seqs, 32))
        finally:
            stop(proc)
        figures["spike"]["planned limit" if limited else "no limit"] = row
        print(f"[spike {'limit' if limited else 'no limit'}] {row}", file=sys.stderr)

    if figures["loads"]:
        names = list(servers)
        print(f"\n{args.prompts} requests per load, {args.input_len} in / {args.output_len} out; goodput: "
              f"requests/s with TTFT <= {SLO_MS} ms; TTFT in ms of the completed requests")
        print(f"{'load':<8}{'server':<15}{'done':>5}{'503':>5}{'goodput':>9}{'TTFT p50':>10}{'p99':>9}{'max':>9}"
              f"{'TPOT p50':>10}{'wall s':>8}")
        for load, by_server in figures["loads"].items():
            for name in names:
                r = by_server.get(name)
                if r:
                    print(f"{load:<8}{name:<15}{r['completed']:>5}{r['refused']:>5}{r['goodput']:>9.2f}"
                          f"{r['ttft_p50']:>10.0f}{r['ttft_p99']:>9.0f}{r['ttft_max']:>9.0f}"
                          f"{r['tpot_p50']:>10.0f}{r['duration']:>8.0f}")
            if "llmops" in by_server and "vllm-kv4" in by_server and by_server["vllm-kv4"]["goodput"]:
                print(f"{'':<8}goodput llmops / vllm-kv4: "
                      f"{by_server['llmops']['goodput'] / by_server['vllm-kv4']['goodput']:.2f}x")
    if figures["spike"]:
        print(f"\nspike: {10 * args.spike_seqs} streams at once, server planned for {args.spike_seqs} at a time")
    for name, r in figures["spike"].items():
        print(f"  {name:<14} admitted {r['admitted']:>3}, refused {r['refused']:>3} (slowest "
              f"{r['slowest_refusal_ms']:.0f} ms); TTFT p50 {r['ttft_p50']:.0f} ms, p99 {r['ttft_p99']:.0f} ms")
    if args.json_out:
        args.json_out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
