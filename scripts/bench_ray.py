"""The same `llmops batch` job on a local Ray cluster (`--ray`) and on this machine without Ray.

    flock /tmp/llmops-heavy.lock .venv/bin/python scripts/bench_ray.py --rows 128 --max-tokens 64

Modes:
- `ray`: N Ray nodes on this host (--cpus-per-node each), one engine per node, each bound to its own cores.
- `local`: one engine on this machine, as `llmops batch` runs without --ray (vLLM binds it to the cores).
- `local-dp`: N local worker processes (`data_parallel_size` forced to N on the CPU), each with vLLM's
  automatic core binding, as the data-parallel path runs them today.

Each mode is a fresh output folder and a fresh engine start; the figures are the runs' own --json summaries
(generation excludes engine start). Goal from issue 10: ray >= 0.9x the throughput of the local path with
the same engines (local-dp: as many engines, each on its own cores).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Forces N data-parallel engines on a CPU plan, the way tests/test_batch_engine.py runs the worker path.
_LOCAL_DP = """
import dataclasses, sys
import llmops.vllm_engine as v
plan_for = v.plan_for
v.plan_for = lambda *a, **k: dataclasses.replace(plan_for(*a, **k), data_parallel_size={n})
from llmops.cli.app import main
sys.argv = ["llmops", *sys.argv[1:]]
main()
"""


def write_input(path: Path, rows: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    topics = ("a lighthouse", "a river", "the number seven", "a market", "winter", "a violin", "bridges", "bees")
    pq.write_table(pa.table({"id": [f"q{i}" for i in range(rows)],
                             # Text to continue (a bare instruction often ends at once without a chat template).
                             "prompt": [f"Chapter {i + 1}. The story of {topics[i % len(topics)]} began on a cold "
                                        "morning, when" for i in range(rows)]}), path)
    return path


def run(mode: str, args: list[str], env: dict[str, str], nodes: int) -> dict:
    if mode == "local-dp":
        cmd = [sys.executable, "-c", _LOCAL_DP.format(n=nodes), *args]
    else:
        cmd = [sys.executable, "-m", "llmops", *args]
    t0 = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout)
    summary["process_s"] = round(time.monotonic() - t0, 1)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--chunk-rows", type=int, default=16)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--cpus-per-node", type=int, default=1)
    parser.add_argument("--kv-cache-gib", type=int, default=1)
    parser.add_argument("--modes", default="ray,local,local-dp")
    parser.add_argument("--json-out", type=Path)
    opts = parser.parse_args()

    from tests.ray_cluster import LocalRayCluster

    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    path = write_input(work / "in.parquet", opts.rows)
    common = ["--max-tokens", str(opts.max_tokens), "--set", f"chunk_rows={opts.chunk_rows}",
              "--set", f"engine.cpu_kv_cache_gib={opts.kv_cache_gib}", "--json"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    runs: dict[str, list[dict]] = {}
    cluster = None
    try:
        for i, mode in enumerate(opts.modes.split(",")):  # a mode named twice runs twice (interleaved)
            out = work / f"out-{i}-{mode}"
            args = ["batch", str(path), "-o", str(out), *common]
            if mode == "ray":
                cluster = LocalRayCluster(cpus_per_node=opts.cpus_per_node, nodes=opts.nodes).start()
                args += ["--ray", cluster.address]
                r = run(mode, args, {**env, **cluster.env}, opts.nodes)
                cluster.stop()
                cluster = None
            else:
                r = run(mode, args, env, opts.nodes)
            runs.setdefault(mode, []).append(r)
            print(f"{mode:9s} engines {r['engines']}  rows {r['rows_ok']}/{r['rows_total']}  "
                  f"output tokens {r['completion_tokens']}  generation {r['generation_s']:.1f} s  "
                  f"-> {r['output_tokens_per_s']:.1f} tok/s  (engine start {r['engine_start_s']:.1f} s, "
                  f"wall {r['wall_s']:.1f} s, process {r['process_s']:.1f} s)", flush=True)
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    results = {mode: _median(found) for mode, found in runs.items()}
    for other in ("local-dp", "local"):  # local-dp has the same engines as ray: the comparison
        if "ray" in results and other in results:
            print(f"ray / {other} throughput: "
                  f"{results['ray']['output_tokens_per_s'] / results[other]['output_tokens_per_s']:.2f}x; "
                  f"end to end (wall): {results[other]['wall_s'] / results['ray']['wall_s']:.2f}x")
    if opts.json_out:
        opts.json_out.write_text(json.dumps(runs, indent=1))


def _median(found: list[dict]) -> dict:
    """The run with the median generation throughput of a mode."""
    return sorted(found, key=lambda r: r["output_tokens_per_s"])[len(found) // 2]


if __name__ == "__main__":
    main()
