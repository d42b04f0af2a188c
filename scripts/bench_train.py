"""Benchmark `llmops train` against a minimal plain accelerate loop: same model, data, batch shape and precision.

    flock /tmp/llmops-heavy.lock env OMP_NUM_THREADS=2 .venv/bin/python scripts/bench_train.py [--steps 10]

1. Real-token fraction per batch of the shipped data (examples/train/glimmerfox.jsonl) with packing and with
   length-grouped batches (no training needed).
2. Plain loop: AdamW, one `accelerator.prepare`, forward/backward/step: the least a training loop can do, on
   a) the same packed batches llmops trains on (same shapes, padding and packed-sequence mask): the ratio to
      it is the loop's own overhead;
   b) the data's text concatenated and cut into blocks of `max_seq_len` (run_clm style: every token real, no
      mask, but examples attend to each other and the loss covers prompts): an upper bound.
3. `llmops train` in this process, full fine-tune, from the shipped `full-smollm2` recipe.
Tokens/s counts real (non-padding) tokens and leaves out the first `--warmup` steps of each. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def real_token_fractions(recipe) -> dict:
    from transformers import AutoTokenizer

    from llmops.train.data import build_dataloaders

    tokenizer = AutoTokenizer.from_pretrained(recipe.model)
    out = {}
    for packing in (True, False):
        r = recipe.model_copy(update={"data": recipe.data.model_copy(update={"packing": packing})})
        train_dl, _ = build_dataloaders(r, tokenizer)
        fractions = [int(b["num_tokens"]) / b["input_ids"].numel() for b in train_dl]
        out["packing" if packing else "length_grouped"] = {
            "mean": round(sum(fractions) / len(fractions), 4), "min": round(min(fractions), 4),
            "batches": len(fractions)}
    return out


def plain_loop(recipe, steps: int, warmup: int, same_batches: bool) -> float:
    """Tokens/s of a minimal accelerate loop (real tokens only)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmops.train.data import build_dataloaders
    from llmops.train.loop import MIXED_PRECISION

    accelerator = Accelerator(mixed_precision=MIXED_PRECISION[recipe.precision])
    set_seed(recipe.seed)
    tokenizer = AutoTokenizer.from_pretrained(recipe.model)
    if same_batches:
        loader, _ = build_dataloaders(recipe, tokenizer)
    else:
        rows = [json.loads(line) for line in Path(recipe.data.path).read_text().splitlines()]
        texts = [tokenizer.apply_chat_template(row["messages"], tokenize=False) for row in rows]
        ids = [t for text in texts for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
        seq = recipe.data.max_seq_len
        blocks = torch.tensor(ids[: len(ids) // seq * seq]).view(-1, seq)
        loader = torch.utils.data.DataLoader(
            [{"input_ids": b, "labels": b, "num_tokens": torch.tensor(seq)} for b in blocks],
            batch_size=recipe.train.micro_batch_size, shuffle=True, drop_last=True)
    model = AutoModelForCausalLM.from_pretrained(recipe.model, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.train.learning_rate)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    tokens, elapsed, done = 0, 0.0, 0
    while done < steps:
        start = time.perf_counter()
        for batch in loader:
            real = int(batch.pop("num_tokens").sum())
            loss = model(**batch, use_cache=False).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            done += 1
            if done > warmup:
                tokens += real
                elapsed += time.perf_counter() - start
            print(f"plain step {done}: loss {loss.item():.4f}", file=sys.stderr)
            start = time.perf_counter()
            if done >= steps:
                break
    return tokens / elapsed


def llmops_loop(recipe, steps: int, warmup: int, run_dir: Path) -> float:
    from llmops.train.launch import plan_recipe, run

    plan = plan_recipe(recipe.model_copy(update={"train": recipe.train.model_copy(update={"max_steps": steps})}),
                       output=run_dir)
    run(plan, resume="never")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "loss" in r and r["step"] > warmup]
    return sum(r["tokens"] for r in timed) / sum(r["tokens"] / r["tokens_per_s"] for r in timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--recipe", default="full-smollm2")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from llmops.registry import ensure_local, resolve
    from llmops.train.launch import plan_recipe
    from llmops.train.recipe import load_recipe

    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(args.recipe, ["logging.progress_bar=false", "checkpoint.every_n_steps=null",
                                           "eval.every_n_steps=null", "export.add_to_registry=false"])
        recipe = recipe.model_copy(update={"model": str(ensure_local(resolve(recipe.model)))})
        resolved = plan_recipe(recipe, output=Path(tmp) / "run").recipe  # precision and method as llmops picks
        fractions = real_token_fractions(resolved)
        blocks = plain_loop(resolved, args.steps, args.warmup, same_batches=False)
        plain = plain_loop(resolved, args.steps, args.warmup, same_batches=True)
        ours = llmops_loop(recipe, args.steps, args.warmup, Path(tmp) / "run")
    print(json.dumps({
        "model": resolved.model, "precision": resolved.precision, "method": resolved.method,
        "batch": f"{resolved.train.micro_batch_size} x {resolved.data.max_seq_len} tokens",
        "steps_timed": args.steps - args.warmup, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "llmops_train_tokens_per_s": round(ours, 1),
        "plain_loop_same_batches_tokens_per_s": round(plain, 1), "ratio_to_same_batches": round(ours / plain, 3),
        "plain_loop_concatenated_blocks_tokens_per_s": round(blocks, 1), "ratio_to_blocks": round(ours / blocks, 3),
        "real_token_fraction": fractions}, indent=2))


if __name__ == "__main__":
    main()
