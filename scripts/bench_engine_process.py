"""`llmops batch` on the CPU with vLLM's engine in the command's own process against vLLM's default of two more
processes (engine core + worker), end to end, as a user runs it.

    flock /tmp/llmops-heavy.lock .venv/bin/python scripts/bench_engine_process.py [--prompts 200] [--rounds 2]

vLLM's CPU platform spawns its engine core and worker processes (VLLM_WORKER_MULTIPROC_METHOD=spawn), and each
imports vLLM and torch again. With VLLM_ENABLE_V1_MULTIPROCESSING=0 the CPU platform keeps vLLM's
single-process executor, and the engine runs in the calling process. The two modes alternate, each round on
the same prompts (the bench_batch.py mix) and the same plan; the script prints the process wall time, the
engine start-up and the output tokens/s of each run (the `--json` summary), and the peak memory of the whole
process tree. Not a test: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_batch import make_prompts  # noqa: E402

MODES = {"in-process": "0", "three processes": "1"}


def tree_rss_mb(pid: int) -> float:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def run(prompts_file: Path, out: Path, multiprocessing: str, max_tokens: int) -> dict:
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": multiprocessing}
    cmd = [sys.executable, "-m", "llmops", "batch", str(prompts_file), "-o", str(out), "--json", "--overwrite",
           "--max-tokens", str(max_tokens), "--temperature", "0"]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = [0.0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss_mb(proc.pid))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.monotonic() - t0
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"llmops batch failed ({proc.returncode}):\n{stderr[-3000:]}")
    summary = json.loads(stdout)
    return {"wall_s": round(wall, 1), "engine_start_s": summary["engine_start_s"],
            "tok_s": summary["output_tokens_per_s"], "tokens": summary["completion_tokens"],
            "peak_rss_mb": round(peak[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from llmops.registry import ensure_local, resolve

    model_path = ensure_local(resolve("smollm2-135m"))
    with tempfile.TemporaryDirectory() as tmp:
        prompts_file = Path(tmp) / "prompts.jsonl"
        prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n"
                                        for p in make_prompts(args.prompts, model_path)))
        results: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for round_ in range(args.rounds):
            for mode, value in (MODES.items() if round_ % 2 == 0 else reversed(MODES.items())):
                result = run(prompts_file, Path(tmp) / "out", value, args.max_tokens)
                results[mode].append(result)
                print(f"round {round_} {mode:>15}: {json.dumps(result)}", file=sys.stderr)
    best = {mode: {key: (min if key in ("wall_s", "engine_start_s", "peak_rss_mb") else max)(r[key] for r in rs)
                   for key in rs[0]} for mode, rs in results.items()}
    print(json.dumps({"prompts": args.prompts, "max_tokens": args.max_tokens, "rounds": args.rounds,
                      "best": best, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
