"""One data-parallel engine of a batch job: `python -m llmops.batch.worker OUTPUT_DIR --rank R --world N`.

Started by `run_workers` with CUDA_VISIBLE_DEVICES set to its GPU group. It reads the job from the output
folder (config.yaml and manifest.json, written by the coordinator), takes every N-th unit starting at R
that is not committed yet, and commits shards exactly as a single engine does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llmops.batch.config import BatchConfig
from llmops.batch.inputs import InputSpec, count_rows, iter_units, unit_keys
from llmops.batch.outputs import OutputDir
from llmops.batch.runner import Progress, generate, start_llm, units_for_rank
from llmops.config import load_config
from llmops.errors import LlmopsError


def run_worker(output_dir: str | Path, rank: int, world: int, llm=None) -> int:
    """Generate this rank's share of the pending units; returns how many it committed.

    `llm` reuses a started engine (tests); normally the worker starts its own on its GPU group."""
    out = OutputDir(output_dir)
    manifest = out.read_manifest()
    if manifest is None:
        raise LlmopsError(f"{output_dir} has no manifest.json; workers are started by `llmops batch`")
    config = load_config(BatchConfig, yaml_path=out.path / "config.yaml")
    described = manifest["job"]["input"]
    spec = InputSpec(tuple(Path(p) for p in manifest["input_paths"]), described["format"],
                     described["prompt_column"], described["messages_column"], described["id_column"])
    counts = count_rows(spec)
    keys = unit_keys(counts, config.chunk_rows)
    done = out.committed(keys)
    mine = units_for_rank(keys, rank, world) - set(done)
    if not mine:
        return 0
    llm = llm or start_llm(manifest["engine"]["args"], manifest["engine"]["env"])
    units = iter_units(spec, counts, config.chunk_rows, mine)
    return sum(1 for _ in generate(llm, units, config.sampling, out, Progress()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llmops.batch.worker")
    parser.add_argument("output_dir")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        committed = run_worker(args.output_dir, args.rank, args.world)
    except LlmopsError as e:
        print(f"llmops batch worker {args.rank}: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    print(f"llmops batch worker {args.rank}: committed {committed} units", file=sys.stderr)


if __name__ == "__main__":
    main()
