"""Throughput of `llmops batch` against raw vLLM and a plain transformers loop, on the same prompts.

    flock /tmp/llmops-heavy.lock .venv/bin/python scripts/bench_batch.py [--prompts 300] [--hf-prompts 12]

1. `llmops batch` end to end (a subprocess, as a user runs it): its `--json` summary gives output tokens/s
   over the generation phase (reading input, tokenizing, scheduling, committing shards included) and the
   wall time with engine start-up.
2. raw `vllm.LLM.generate` and `run_batch` (the library call behind the CLI) on the same prompts, on one
   engine started with the same arguments (`llmops.vllm_engine`), alternated, best round of each.
3. transformers `generate`, one prompt at a time (batch size 1, one thread), on the first few prompts.
Greedy decoding everywhere, so all three do about the same work. Not a test: timings depend on the machine
and its load. Goal: llmops >= 0.97x raw vLLM, and far above the transformers loop.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOPICS = ["the ocean", "volcanoes", "the history of printing", "honey bees", "black holes", "bread baking",
          "the Roman empire", "electric cars", "chess openings", "rain forests", "jazz music", "glaciers"]
FILLER = ("Scholars have written about this subject for a long time, and many of their accounts disagree on "
          "the details while agreeing on the broad outline. ")


def make_prompts(n: int, model_path: Path, seed: int = 0) -> list[str]:
    """Chat requests from a few words to a few hundred tokens, so the scheduler sees a realistic mix.

    They are rendered with the model's chat template into plain text prompts, so that all three contenders
    get exactly the same input (and the instruct model answers at length instead of stopping at once)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        context = FILLER * rng.choice([0, 0, 1, 2, 4, 8, 16])
        chat = [{"role": "user", "content": f"{context}Request {i}: write a short paragraph about {topic}."}]
        prompts.append(tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    return prompts


def bench_llmops(prompts_file: Path, out_dir: Path, sets: list[str], max_tokens: int) -> dict:
    cmd = [sys.executable, "-m", "llmops", "batch", str(prompts_file), "-o", str(out_dir), "--json",
           "--max-tokens", str(max_tokens), "--overwrite", *(a for s in sets for a in ("--set", s))]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        sys.exit(f"llmops batch failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout)
    return {"tokens": summary["completion_tokens"], "generation_s": summary["generation_s"],
            "tok_s": summary["output_tokens_per_s"], "process_wall_s": round(wall, 1)}


def bench_same_engine(prompts: list[str], prompts_file: Path, out_dir: Path, config, plan, model_path: Path,
                      rounds: int) -> tuple[list[dict], list[dict]]:
    """Raw `LLM.generate` and `run_batch` on one engine, alternated `rounds` times, raw first.

    The same engine and process for both isolates what llmops adds (reading, tokenizing, scheduling,
    committing) from start-up and from the load of other processes on the machine. The first run on a
    fresh engine is slower (measured ~15% on the CPU), so round 0 of raw vLLM is the fair baseline for the
    CLI run, which always runs on a fresh engine."""
    from vllm import SamplingParams

    from llmops.batch import run_batch
    from llmops.batch.engine import close_engine, load_engine
    from llmops.vllm_engine import resolve_engine

    llm = load_engine(resolve_engine(plan, model_path))
    params = SamplingParams(max_tokens=config.sampling.max_tokens, temperature=0.0)
    raw, ours = [], []
    for r in range(rounds):
        t0 = time.monotonic()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.monotonic() - t0
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        raw.append({"tokens": tokens, "generation_s": round(seconds, 2), "tok_s": round(tokens / seconds, 1)})
        summary = run_batch(config, str(prompts_file), out_dir / f"round-{r}", llm=llm)
        ours.append({"tokens": summary.completion_tokens, "generation_s": summary.generation_s,
                     "tok_s": summary.output_tokens_per_s})
        print(f"round {r}: raw {raw[-1]}, run_batch {ours[-1]}", file=sys.stderr)
    close_engine(llm)
    return raw, ours


def bench_transformers(prompts: list[str], model_path: Path, dtype: str, max_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)  # ENVIRONMENT.md: more threads collapse under any outside load on this machine
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).eval()
    tokens, t0 = 0, time.monotonic()
    with torch.inference_mode():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)
            tokens += out.shape[1] - ids["input_ids"].shape[1]
    seconds = time.monotonic() - t0
    return {"tokens": tokens, "generation_s": round(seconds, 2), "tok_s": round(tokens / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--hf-prompts", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--kv-cache-gib", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="alternated raw/run_batch rounds on one engine")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from llmops.batch import plan_batch
    from llmops.batch.config import BatchConfig
    from llmops.config import load_config
    from llmops.registry import ensure_local, resolve

    sets = [f"engine.cpu_kv_cache_gib={args.kv_cache_gib}"]
    config = load_config(BatchConfig, sets=sets)
    model_path = ensure_local(resolve(config.model))
    prompts = make_prompts(args.prompts, model_path)
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        prompts_file = Path(tmp) / "prompts.jsonl"
        prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        job = plan_batch(config, str(prompts_file), Path(tmp) / "plan-only")
        print(f"{len(prompts)} prompts, max_tokens {args.max_tokens}, greedy; engine: {job.plan.device}, "
              f"{job.plan.dtype}, eager={job.plan.enforce_eager}, KV cache {job.plan.cpu_kv_cache_gib} GiB",
              file=sys.stderr)
        results = {"llmops batch (CLI)": bench_llmops(prompts_file, Path(tmp) / "out", sets, args.max_tokens)}
        print("llmops batch:", results["llmops batch (CLI)"], file=sys.stderr)
        config = load_config(BatchConfig, sets=[*sets, f"sampling.max_tokens={args.max_tokens}"])
        raw, ours = bench_same_engine(prompts, prompts_file, Path(tmp), config, job.plan, model_path, args.rounds)
        best_raw, best_ours = (max(runs, key=lambda x: x["tok_s"]) for runs in (raw, ours))
        results["vllm.LLM.generate (fresh engine)"] = raw[0]
        results[f"run_batch (warm engine, best of {args.rounds})"] = best_ours
        results[f"vllm.LLM.generate (warm, best of {args.rounds})"] = best_raw
        hf_name = f"transformers bs=1 ({args.hf_prompts} prompts)"
        results[hf_name] = bench_transformers(prompts[:args.hf_prompts], model_path, job.plan.dtype, args.max_tokens)

    cli, base = results["llmops batch (CLI)"], best_raw["tok_s"]
    print(f"{'':40} {'output tok':>10} {'seconds':>8} {'tok/s':>8} {'vs warm vLLM':>13}")
    for name, r in results.items():
        print(f"{name:40} {r['tokens']:>10} {r['generation_s']:>8} {r['tok_s']:>8} {r['tok_s'] / base:>12.2f}x")
    print(f"llmops CLI / raw vLLM, both on a fresh engine: {cli['tok_s'] / raw[0]['tok_s']:.3f}x (goal >= 0.97)")
    print(f"run_batch / raw vLLM, same warm engine: {best_ours['tok_s'] / base:.3f}x (goal >= 0.97)")
    print(f"llmops CLI / transformers bs=1: {cli['tok_s'] / results[hf_name]['tok_s']:.1f}x; "
          f"CLI wall time with start-up: {cli['process_wall_s']} s")


if __name__ == "__main__":
    main()
