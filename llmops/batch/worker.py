"""One data-parallel engine of a batch job:
`python -m llmops.batch.worker OUTPUT_DIR --rank R --world N [--grace-period S]`.

Started by `run_workers` with CUDA_VISIBLE_DEVICES set to its GPU group. It reads the job from the output
folder (config.yaml and the typed manifest.json, written by the coordinator), takes every N-th unit starting
at R that is not committed yet, and commits shards exactly as a single engine does. SIGTERM (passed on by
the coordinator) stops it the same way as a single-engine run: finished rows are committed, exit 75.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from llmops.batch.config import BatchConfig
from llmops.batch.engine import DEFAULT_GRACE_PERIOD_S, Progress, StopRequest, generate, stop_on_signals
from llmops.batch.inputs import InputSpec, count_rows, iter_units, unit_sizes
from llmops.batch.outputs import CONFIG, OutputDir
from llmops.batch.runner import close_engine, start_llm
from llmops.batch.workers import STARTED_FD_VAR, units_for_rank
from llmops.config import load_config
from llmops.errors import LlmopsError


def run_worker(output_dir: str | Path, rank: int, world: int, llm=None, stop: StopRequest | None = None) -> int:
    """Generate this rank's share of the pending units; returns how many shards or pieces it committed.

    `llm` reuses a started engine (tests); normally the worker starts its own on its GPU group."""
    out = OutputDir(output_dir)
    manifest = out.read_manifest()
    if manifest is None:
        raise LlmopsError(f"{output_dir} has no readable manifest.json; workers are started by `llmops batch`")
    import yaml

    config = load_config(BatchConfig, yaml_data=yaml.safe_load(out.read_text(CONFIG) or "{}"), source=out.at(CONFIG))
    described = manifest.job.input
    spec = InputSpec(tuple(manifest.input_paths), described.format,
                     described.prompt_column, described.messages_column, described.id_column)
    counts = count_rows(spec)
    sizes = unit_sizes(counts, config.chunk_rows)
    committed = out.committed(sizes, manifest.job_key)
    mine = units_for_rank(list(sizes), rank, world) - set(committed.done)
    if not mine:
        return 0
    own_engine = llm is None
    llm = llm or start_llm(manifest.engine_args, manifest.engine_env)
    if (started_fd := os.environ.get(STARTED_FD_VAR)) is not None:  # tell the coordinator: generation begins
        with contextlib.suppress(OSError, ValueError):
            os.write(int(started_fd), f"{rank}\n".encode())
    if stop is not None:
        stop.generating = True
    units = iter_units(spec, counts, config.chunk_rows, mine, committed.partial)
    count = sum(1 for _ in generate(llm, units, config.sampling, out, manifest.job, Progress(), stop,
                                   writer=f"worker {rank}"))
    if own_engine and stop is not None and stop.requested:
        close_engine(llm)  # exit within the grace period (vLLM's exit would wait 5 s for it)
    return count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llmops.batch.worker")
    parser.add_argument("output_dir")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--grace-period", type=float, default=DEFAULT_GRACE_PERIOD_S)
    args = parser.parse_args(argv)
    try:
        with stop_on_signals(StopRequest(args.grace_period)) as stop:
            committed = run_worker(args.output_dir, args.rank, args.world, stop=stop)
            if stop.requested:
                raise stop.stopped(f"worker {args.rank} committed {committed} shards or pieces")
    except LlmopsError as e:
        print(f"llmops batch worker {args.rank}: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except OSError as e:
        from llmops.errors import StorageError

        print(f"llmops batch worker {args.rank}: error: {StorageError.from_os_error(e)}", file=sys.stderr)
        sys.exit(1)
    print(f"llmops batch worker {args.rank}: committed {committed} units", file=sys.stderr)


if __name__ == "__main__":
    main()
