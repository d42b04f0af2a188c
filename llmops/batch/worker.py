"""One engine of a batch job in its own process:
`python -m llmops.batch.worker OUTPUT_DIR --rank R --world N [--grace-period S] < WORK` (the job's
`EngineWork`, pickled).

Started by `run_workers` with its GPU group or its cores set in its environment. It takes every N-th unit
starting at R that is not committed yet, and commits shards exactly as a single engine does, reporting each
commit to the coordinator. SIGTERM (passed on by the coordinator) stops it the same way as a single-engine
run: finished rows are committed, exit 75.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import sys

from llmops.batch.engine import (DEFAULT_GRACE_PERIOD_S, Progress, StopRequest, close_engine, load_engine, run_units,
                                 stop_on_signals)
from llmops.batch.inputs import iter_units
from llmops.batch.job import EngineWork
from llmops.batch.outputs import OutputDir
from llmops.batch.workers import REPORT_FD_VAR, units_for_rank
from llmops.errors import LlmopsError


def run_worker(work: EngineWork, rank: int, world: int, llm=None, stop: StopRequest | None = None) -> int:
    """Run this rank's share of the pending units; returns how many shards or pieces it committed.

    `llm` reuses a started engine (tests); normally the worker starts its own on its GPU group."""
    out = OutputDir(work.output_dir)
    sizes = work.unit_sizes
    committed = out.committed(sizes, work.identity.key())
    mine = units_for_rank(list(sizes), rank, world) - set(committed.done)
    if not mine:
        return 0
    own_engine = llm is None
    llm = llm or load_engine(work.engine)
    _report({"started": rank})
    if stop is not None:
        stop.generating = True
    units = iter_units(work.spec, work.row_counts, work.chunk_rows, mine, committed.partial)
    count = 0
    try:
        for key, stats in run_units(llm, units, work.task, out, work.identity, Progress(), stop,
                                    writer=f"worker {rank}"):
            _report({"commit": key, "stats": stats.model_dump()})
            count += 1
    finally:
        if own_engine:  # now: within a stop's grace period (vLLM's exit would wait 5 s), and see close_engine
            close_engine(llm)
    return count


def _report(message: dict) -> None:
    """One line to the coordinator, when there is one (a line this short is written atomically)."""
    if (fd := os.environ.get(REPORT_FD_VAR)) is not None:
        with contextlib.suppress(OSError, ValueError):
            os.write(int(fd), (json.dumps(message) + "\n").encode())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llmops.batch.worker")
    parser.add_argument("output_dir", help="the job's output folder (as in the work on stdin)")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--grace-period", type=float, default=DEFAULT_GRACE_PERIOD_S)
    args = parser.parse_args(argv)
    try:
        work = pickle.load(sys.stdin.buffer)
        if work.output_dir != args.output_dir:
            raise LlmopsError(f"the work on stdin is for {work.output_dir}, not {args.output_dir}")
        with stop_on_signals(StopRequest(args.grace_period)) as stop:
            committed = run_worker(work, args.rank, args.world, stop=stop)
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
