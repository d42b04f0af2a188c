"""Embedding throughput on the CPU: `llmops batch --task embed` against raw vLLM (`LLM.embed`, with the
engine llmops plans), sentence-transformers `encode` and a plain transformers mean-pool, on the same texts.

    flock /tmp/llmops-heavy.lock .venv/bin/python scripts/bench_embed.py [--rows 5000] [--model all-minilm-l6-v2]

Each contender runs in its own process (engine start excluded from rows/s, reported beside it), on the same
cores: vLLM with llmops's plan (`plan_engine(..., task="embed")`: dtype, reserved cores, KV cache, tokens per
step), sentence-transformers and transformers with `torch.set_num_threads(cores)` and the same dtype. Every
vector is compared with the transformers mean-pool in float32 (min cosine). Not a test: timings depend on
the machine and its load. `llmops batch` runs as a user runs it (the CLI on a Parquet file); its rows/s
excludes engine start as the others' do, and its wall time includes everything.
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

WORDS = ("the quick brown fox jumps over a lazy dog while engineers measure throughput of embedding models on "
         "small machines with two cores and plenty of memory; databases store vectors for semantic search and "
         "retrieval augmented generation pipelines that answer questions about documents, invoices, recipes, "
         "weather reports, football results, stock prices, poems and code reviews").split()


def make_texts(n: int, seed: int = 0) -> list[str]:
    """Short-to-mixed texts: four in five of 5-40 words, one in five of 60-180 (~55 word pieces on average for
    MiniLM, all within its 256)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 180) if i % 5 == 0 else rng.randint(5, 40)))
            .capitalize() + "." for i in range(n)]


def run_vllm(model: str, path: Path, texts: list[str], sets: dict) -> tuple[dict, list]:
    from llmops.config import validate
    from llmops.hardware import detect
    from llmops.plan import EngineConfig, model_facts, plan_engine
    from llmops.registry import resolve
    from llmops.vllm_engine import engine_args, engine_env

    config = validate(EngineConfig, sets, "engine")
    plan = plan_engine(config, model_facts(resolve(model)), detect(), workload="batch", rows=len(texts),
                       task="embed")
    os.environ.update(engine_env(plan))  # before vLLM is imported: it reads them at import
    t0 = time.perf_counter()
    from vllm import LLM

    llm = LLM(**engine_args(plan, path))
    start = time.perf_counter() - t0
    llm.embed(texts[:64], use_tqdm=False)  # the first batch is slower on a fresh engine
    t1 = time.perf_counter()
    # Truncation to the model's window (as llmops does); without it one long text fails the whole call.
    outs = llm.embed(texts, use_tqdm=False, tokenization_kwargs={"truncate_prompt_tokens": -1})
    took = time.perf_counter() - t1
    info = {"dtype": plan.dtype, "max_num_batched_tokens": plan.max_num_batched_tokens,
            "kv_gib": plan.cpu_kv_cache_gib, "reserved_cores": plan.cpu_reserved_cores,
            "tokens": sum(len(o.prompt_token_ids) for o in outs), "start_s": round(start, 1)}
    return {**info, "embed_s": took}, [o.outputs.embedding for o in outs]


def run_llmops(model: str, texts: list[str], out: Path) -> tuple[dict, list]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": texts}), out / "texts.parquet")
    cmd = [sys.executable, "-m", "llmops", "batch", str(out / "texts.parquet"), "-o", str(out / "llmops-out"),
           "--model", model, "--task", "embed", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    summary = json.loads(proc.stdout)
    table = pq.read_table(out / "llmops-out" / "results").sort_by("row")
    return {"dtype": "planned", "start_s": summary["engine_start_s"], "wall_s": summary["wall_s"],
            "embed_s": summary["generation_s"]}, table.column("embedding").to_pylist()


def run_torch(engine: str, path: Path, texts: list[str], dtype: str, batch_size: int) -> tuple[dict, list]:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    if engine == "st":
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(path), device="cpu").to(getattr(torch, dtype))
        start = time.perf_counter() - t0
        model.encode(texts[:64], batch_size=batch_size)
        t1 = time.perf_counter()
        vectors = model.encode(texts, batch_size=batch_size, convert_to_numpy=True).astype("float32").tolist()
        return {"dtype": dtype, "batch_size": batch_size, "start_s": round(start, 1),
                "embed_s": time.perf_counter() - t1}, vectors
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    start = time.perf_counter() - t0
    t1 = time.perf_counter()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # like rows together: less padding
    vectors: list = [None] * len(texts)
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            idx = order[i:i + batch_size]
            enc = tokenizer([texts[j] for j in idx], padding=True, truncation=True,
                            max_length=model.config.max_position_embeddings, return_tensors="pt")
            hidden = model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
            for j, v in zip(idx, pooled.tolist()):
                vectors[j] = v
    return {"dtype": dtype, "batch_size": batch_size, "start_s": round(start, 1),
            "embed_s": time.perf_counter() - t1}, vectors


def one(args) -> None:
    """One contender, in this process: writes its result and vectors to `args.out`."""
    import numpy as np

    texts = make_texts(args.rows)
    if args.one == "vllm":
        result, vectors = run_vllm(args.model, Path(args.path), texts, json.loads(args.sets))
    elif args.one == "llmops":
        result, vectors = run_llmops(args.model, texts, Path(args.out))
    else:
        result, vectors = run_torch(args.one, Path(args.path), texts, args.dtype, args.batch_size)
    result["rows_s"] = round(args.rows / result.pop("embed_s"), 1)
    np.save(Path(args.out) / f"{args.label}.npy", np.asarray(vectors, dtype=np.float32))
    (Path(args.out) / f"{args.label}.json").write_text(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--model", default="all-minilm-l6-v2")
    ap.add_argument("--st-batch-sizes", default="32,64", help="sentence-transformers batch sizes to try")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="an engine setting for vLLM, e.g. max_num_batched_tokens=2048 (repeatable)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--label", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    ap.add_argument("--batch-size", type=int, default=64, help=argparse.SUPPRESS)
    ap.add_argument("--sets", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return one(args)

    import numpy as np

    from llmops.hardware import detect
    from llmops.plan import choose_dtype
    from llmops.registry import ensure_local, resolve

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    path = ensure_local(resolve(args.model))
    hw = detect()
    dtype, _ = choose_dtype(hw, "cpu")
    sets = dict(s.split("=", 1) for s in args.set)
    runs = [("reference", "hf", "float32", 64, {}), ("llmops", "llmops", dtype, 0, {}), ("vllm", "vllm", dtype, 0, sets),
            *((f"st-bs{bs}", "st", dtype, int(bs), {}) for bs in args.st_batch_sizes.split(",")),
            ("transformers", "hf", dtype, 64, {})]
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as out:
        rows = []
        for label, engine, run_dtype, bs, run_sets in runs:
            cmd = [sys.executable, __file__, "--one", engine, "--path", str(path), "--out", out, "--label", label,
                   "--rows", str(args.rows), "--model", args.model, "--dtype", run_dtype, "--batch-size", str(bs),
                   "--sets", json.dumps(run_sets)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{label} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            result = json.loads((Path(out) / f"{label}.json").read_text())
            vectors = np.load(Path(out) / f"{label}.npy")
            reference = np.load(Path(out) / "reference.npy")
            cos = (vectors * reference).sum(1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(reference, axis=1)
            rows.append({"run": label, **result, "min_cos": round(float(cos.min()), 6)})
            print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"{args.rows} rows, {args.model}, {hw.cpu.model}, {hw.cpu.usable_cores} cores, "
          f"native bf16: {hw.cpu.has_native_bf16}, load {os.getloadavg()[0]:.1f}")
    for row in rows:
        print(f"{row['run']:>14}: {row['rows_s']:8.1f} rows/s  start {row['start_s']:5.1f} s  "
              f"{row['dtype']:<9} min cos {row['min_cos']:.6f}"
              + (f"  wall {row['wall_s']:.1f} s" if "wall_s" in row else ""))
    by_run = {row["run"]: row["rows_s"] for row in rows}
    best_st = max(v for k, v in by_run.items() if k.startswith("st-"))
    print(f"llmops / sentence-transformers (best batch size): {by_run['llmops'] / best_st:.2f}x; "
          f"llmops / raw vLLM: {by_run['llmops'] / by_run['vllm']:.2f}x")


if __name__ == "__main__":
    main()
