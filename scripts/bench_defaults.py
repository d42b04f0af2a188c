"""Benchmark: what llmops's plan gains over vLLM's own defaults on this machine (issue 9).

    flock /tmp/llmops-heavy.lock .venv/bin/python scripts/bench_defaults.py batch --rows 300 --max-tokens 128
    flock /tmp/llmops-heavy.lock .venv/bin/python scripts/bench_defaults.py serve --starts 2

batch: `llmops batch` (a subprocess, as a user runs it; planned settings, plus eager and compiled forced) against
    `vllm.LLM(model=DIR)` with vLLM's defaults on the same prompts: wall time with start-up and output tok/s.
    A job of ~1 minute and one of ~10 minutes are `--rows 300` and `--rows 3000` here (2 cores, SmolLM2-135M).
serve: `llmops serve` against plain `vllm serve DIR` (vLLM's defaults, through the project's version shim),
    each started `--starts` times (first and later starts: compile caches), measured with vLLM's own load
    generator (`vllm bench serve`, random dataset, 256 tokens in, 128 out, 64 prompts, 16 at a time).
Not a test: timings depend on the machine and on what else runs. Goals (issue 9): serve starts >= 3x sooner with
>= 1.3x output tok/s and <= 0.9x TTFT p50; batch >= 1.3x vLLM's defaults' throughput and a wall time no worse
than the better of eager and compiled. Prints the CPU flags that decide dtype and kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_batch import make_prompts  # noqa: E402  (scripts are not a package)

from llmops.registry import ensure_local, resolve  # noqa: E402
from llmops.serve.server import free_port, health_ok  # noqa: E402

DEFAULTS_SCRIPT = """
import json, sys, time
if __name__ == "__main__":
    started = time.monotonic()
    from vllm import LLM, SamplingParams
    prompts = [json.loads(line)["prompt"] for line in open(sys.argv[2])]
    llm = LLM(model=sys.argv[1])  # vLLM's defaults: dtype, compilation, KV cache, cores
    ready = time.monotonic()
    outs = llm.generate(prompts, SamplingParams(max_tokens=int(sys.argv[3]), temperature=0), use_tqdm=False)
    done = time.monotonic()
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    print("RESULT " + json.dumps({"wall_s": done - started, "start_s": ready - started,
                                  "generation_s": done - ready, "tokens": tokens}))
"""


def cpu_flags() -> str:
    try:
        flags = set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).split())
    except (OSError, AttributeError):
        return "unknown"
    return ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)


def vllm_error(log: str) -> str | None:
    """The line that says why vLLM did not start: its memory refusal first, else its first `...Error: ` line."""
    found = re.search(r"Available memory on node[^\n]*", log) or re.search(r"\w+Error: (?!.*ulimit)[^\n]*", log)
    return found.group(0)[:300] if found else None


# --- batch --------------------------------------------------------------------------------------------


def batch_llmops(prompts_file: Path, out_dir: Path, max_tokens: int, sets: list[str]) -> dict:
    cmd = [sys.executable, "-m", "llmops", "batch", str(prompts_file), "-o", str(out_dir), "--json", "--overwrite",
           "--max-tokens", str(max_tokens), *(a for s in sets for a in ("--set", s))]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
    summary = json.loads(proc.stdout)
    return {"wall_s": wall, "start_s": summary["engine_start_s"], "generation_s": summary["generation_s"],
            "tokens": summary["completion_tokens"]}


def batch_vllm_defaults(model_dir: Path, prompts_file: Path, max_tokens: int, env: dict[str, str]) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as script:
        script.write(DEFAULTS_SCRIPT)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, script.name, str(model_dir), str(prompts_file), str(max_tokens)],
                          capture_output=True, text=True, env={**os.environ, **env})
    wall = time.monotonic() - started
    os.unlink(script.name)
    result = next((line for line in proc.stdout.splitlines() if line.startswith("RESULT ")), None)
    if result is None:
        return {"error": vllm_error(proc.stdout + proc.stderr) or f"exit {proc.returncode}"}  # vLLM logs to stdout
    return {**json.loads(result[7:]), "wall_s": wall}


def bench_batch(args, model_dir: Path, work: Path) -> dict:
    prompts_file = work / "prompts.jsonl"
    with open(prompts_file, "w") as f:
        for prompt in make_prompts(args.rows, model_dir):
            f.write(json.dumps({"prompt": prompt}) + "\n")
    runs: dict[str, dict] = {}
    # vLLM's defaults compile; empty caches make this its first start, as on a fresh machine.
    fresh = {"VLLM_CACHE_ROOT": str(work / "vllm-cache"), "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor")}
    contenders = {
        "llmops (planned)": lambda: batch_llmops(prompts_file, work / "planned", args.max_tokens, []),
        "llmops eager": lambda: batch_llmops(prompts_file, work / "eager", args.max_tokens,
                                             ["engine.enforce_eager=true"]),
        "llmops compiled": lambda: batch_llmops(prompts_file, work / "compiled", args.max_tokens,
                                                ["engine.enforce_eager=false"]),
        "vllm.LLM defaults": lambda: batch_vllm_defaults(model_dir, prompts_file, args.max_tokens, fresh),
    }
    for name in args.only or contenders:
        print(f"[batch] {name} ...", file=sys.stderr, flush=True)
        runs[name] = contenders[name]()
        if "error" in runs[name] and name == "vllm.LLM defaults":
            # vLLM's default CPU KV cache is 90% of the NUMA node; where other processes use memory it is
            # refused. Then measure its other defaults with a KV cache of the planned size.
            print(f"[batch] vLLM's defaults failed: {runs[name]['error']}", file=sys.stderr)
            runs[name + " (KV 4 GiB)"] = batch_vllm_defaults(model_dir, prompts_file, args.max_tokens,
                                                             {**fresh, "VLLM_CPU_KVCACHE_SPACE": "4"})
        print(f"[batch] {name}: {runs[name]}", file=sys.stderr, flush=True)
    for figures in runs.values():
        if "tokens" in figures:
            figures["output_tok_s"] = figures["tokens"] / figures["generation_s"]
    return runs


# --- serve --------------------------------------------------------------------------------------------


def serve_once(command: list[str], env: dict[str, str], port: int, model_dir: Path, name: str, log: Path) -> dict:
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        while not health_ok(url):
            if proc.poll() is not None:
                return {"error": f"exited {proc.returncode}; see {log}"}
            time.sleep(0.25)
        startup = time.monotonic() - started
        result_dir = Path(tempfile.mkdtemp())
        bench = [sys.executable, "-m", "llmops.serve.vllm_entry", "bench", "serve", "--backend", "openai-chat",
                 "--endpoint", "/v1/chat/completions", "--base-url", url, "--model", name,
                 "--tokenizer", str(model_dir), "--dataset-name", "random", "--random-input-len", "256",
                 "--random-output-len", "128", "--num-prompts", "64", "--max-concurrency", "16", "--ignore-eos",
                 "--save-result", "--result-dir", str(result_dir), "--result-filename", "result.json"]
        done = subprocess.run(bench, capture_output=True, text=True)
        if done.returncode != 0:
            return {"startup_s": startup, "error": done.stderr.strip().splitlines()[-1:]}
        result = json.loads((result_dir / "result.json").read_text())
        return {"startup_s": startup, "output_tok_s": result["output_throughput"],
                "ttft_p50_ms": result["median_ttft_ms"], "itl_p50_ms": result["median_itl_ms"]}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def bench_serve(args, model_dir: Path, work: Path) -> dict:
    runs: dict[str, list[dict]] = {}
    logs = Path(tempfile.gettempdir())
    plain = [sys.executable, "-m", "llmops.serve.vllm_entry", "serve", str(model_dir), "--served-model-name", "bench"]
    ours = [sys.executable, "-m", "llmops", "serve", args.model, "--set", "served_model_name=bench"]

    def run(name: str, command: list[str], env: dict[str, str], start: int) -> dict:
        port = free_port()
        log = logs / f"bench-defaults-{re.sub(r'[^a-z0-9]+', '-', name)}-{start}.log"
        print(f"[serve] {name}, start {start} ...", file=sys.stderr, flush=True)
        figures = serve_once([*command, "--port", str(port)], env, port, model_dir, "bench", log)
        if "error" in figures:
            figures["error"] = vllm_error(log.read_text()) or figures["error"]
        print(f"[serve] {name}, start {start}: {figures}", file=sys.stderr, flush=True)
        runs.setdefault(name, []).append(figures)
        return figures

    for start in range(1, args.starts + 1):
        run("llmops serve", ours, {}, start)
        if "error" in run("vllm serve defaults", plain, {}, start):
            # vLLM's default CPU KV cache is 90% of the NUMA node, refused where the node is busy: measure its
            # other defaults (compile, a reserved core) with a fixed cache instead.
            run("vllm serve defaults (KV 4 GiB)", plain, {"VLLM_CPU_KVCACHE_SPACE": "4"}, start)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=["batch", "serve"])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rows", type=int, default=300, help="batch: prompts in the job")
    parser.add_argument("--max-tokens", type=int, default=128, help="batch: tokens generated per prompt")
    parser.add_argument("--only", action="append", help="batch: run only this contender (repeatable)")
    parser.add_argument("--starts", type=int, default=2, help="serve: starts of each server")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    model_dir = ensure_local(resolve(args.model))
    with tempfile.TemporaryDirectory() as tmp:
        runs = (bench_batch if args.part == "batch" else bench_serve)(args, model_dir, Path(tmp))
    report = {"cpu_flags": cpu_flags(), "cores": os.cpu_count(), "part": args.part, "runs": runs}
    print(json.dumps(report, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
