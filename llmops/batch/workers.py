"""Placing several engines: one worker process per GPU group (`EnginePlan.data_parallel_size` > 1).

Each worker (`llmops.batch.worker`) reads the job from the output folder's typed manifest, takes every
n-th unit and commits shards exactly as a single engine does, so resume works the same way. The
coordinator follows the commits, forwards a stop request to the workers and waits for them within the
grace period.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from typing import Any

from llmops.batch.engine import Progress, StopRequest
from llmops.batch.outputs import Committed
from llmops.errors import RuntimeFailure

# A worker gets this much less of the grace period than the coordinator, which then still has time to
# collect its commits and write the manifest.
WORKER_GRACE_MARGIN_S = 3.0
# A worker writes its rank to this file descriptor once its engine has started (the coordinator reports the
# engines' start apart from generation, as for a single engine).
STARTED_FD_VAR = "LLMOPS_WORKER_STARTED_FD"


def worker_gpus(plan, rank: int) -> list[int]:
    """The physical GPU indices of engine `rank`: consecutive groups of tensor_parallel_size GPUs."""
    from llmops.hardware import detect

    tp = plan.tensor_parallel_size
    indices = [g.index for g in detect().gpus]
    return indices[rank * tp:(rank + 1) * tp]


def worker_command(job, rank: int, grace_period_s: float | None = None) -> list[str]:
    command = [sys.executable, "-m", "llmops.batch.worker", job.output.location, "--rank", str(rank),
               "--world", str(job.plan.data_parallel_size)]
    if grace_period_s is not None:
        command += ["--grace-period", str(max(1.0, grace_period_s - WORKER_GRACE_MARGIN_S))]
    return command


def engines(job, grace_period_s: float | None = None) -> list[dict[str, Any]]:
    """One entry per engine: the GPUs it gets, its environment and the exact call or command."""
    from llmops.vllm_engine import engine_args, engine_env

    args = engine_args(job.plan, job.model_path or f"<{job.model_name}, not downloaded yet>")
    env = engine_env(job.plan)
    dp = job.plan.data_parallel_size
    if dp == 1:
        call = " ".join([*(f"{k}={v}" for k, v in env.items()), f"vllm.LLM(**{args!r})"])
        return [{"rank": 0, "env": env, "call": call, "llm_args": args}]
    found = []
    cores = sorted(os.sched_getaffinity(0))
    for rank in range(dp):
        if job.plan.device == "cpu":
            # Each engine on its own share of the cores: vLLM's automatic binding would put every engine on
            # the same ones (measured: 2 engines on 2 cores, 273 tok/s bound alike against 1160 apart).
            gpus = ""
            worker_env = {**env, "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, host_cores(cores, rank, dp)))}
        else:
            gpus = ",".join(str(i) for i in worker_gpus(job.plan, rank))
            worker_env = {**env, "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": gpus}
        cmd = worker_command(job, rank, grace_period_s)
        command = " ".join([*(f"{k}={v}" for k, v in worker_env.items()), *cmd])
        found.append({"rank": rank, "gpus": gpus, "env": worker_env, "command": command, "argv": cmd,
                      "llm_args": args})
    return found


def host_cores(cores: list[int], slot: int, engines: int) -> list[int]:
    """Engine `slot`'s even share of this host's cores (one core each, shared round-robin, if there are more
    engines than cores)."""
    cores = sorted(cores)
    share = cores[slot * len(cores) // engines:(slot + 1) * len(cores) // engines]
    return share or cores[slot % len(cores):slot % len(cores) + 1]


def units_for_rank(units: list[str], rank: int, world: int) -> set[str]:
    """Every world-th unit of the whole job, from `rank`: an even share in input order.

    Taken over all units, not the pending ones, so the split does not depend on when each worker looks:
    a worker that starts late cannot see a different split than one that has already committed."""
    return {key for i, key in enumerate(units) if i % world == rank}


def run_workers(job, committed: Committed, progress: Progress, stop: StopRequest, on_commit) -> float:
    """Start one worker per engine, follow their commits, fail if any of them fails. On a stop request,
    pass it on (SIGTERM) and wait for the workers to commit what they finished, within the grace period.
    Returns the seconds until the last engine had started."""
    procs = []
    t0 = time.monotonic()
    started_r, started_w = os.pipe()
    os.set_blocking(started_r, False)
    for engine in engines(job, stop.grace_period_s):
        # The workers share the folder's lock (the same open file): a rerun cannot start while a worker of
        # a killed coordinator is still committing.
        procs.append(subprocess.Popen(engine["argv"], env={**os.environ, **engine["env"],
                                                           STARTED_FD_VAR: str(started_w)},
                                      preexec_fn=_die_with_parent, pass_fds=(*job.output.lock_fds(), started_w)))
    os.close(started_w)
    engine_start = 0.0
    forwarded = False
    seen = {key: stats.rows for key, stats in committed.done.items()}
    seen.update({key: len(rows) for key, rows in committed.partial.items()})
    try:
        while True:
            if stop.requested and not forwarded:
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
                forwarded = True
            running = [p for p in procs if p.poll() is None]
            with contextlib.suppress(BlockingIOError):
                for rank in os.read(started_r, 4096).decode().split():
                    engine_start = time.monotonic() - t0
                    progress.phase(f"engine {rank} started in {engine_start:.1f} s")
            now = job.output.committed(job.unit_sizes, job.identity.key())
            rows_now = {key: stats.rows for key, stats in now.done.items()}
            rows_now.update({key: len(rows) for key, rows in now.partial.items()})
            new_rows = sum(rows_now.values()) - sum(seen.values())
            if new_rows:
                new_tokens = (sum(s.completion_tokens for s in now.done.values())
                              + sum(s.completion_tokens for s in now.partial_stats.values())
                              - sum(s.completion_tokens for s in committed.done.values())
                              - sum(s.completion_tokens for s in committed.partial_stats.values()))
                progress.advance(new_rows, new_tokens)
                seen, committed = rows_now, now
                on_commit(now)
            if not running or (stop.requested and time.monotonic() >= stop.finish_by):
                break
            select.select([started_r], [], [], 0.5 if stop.requested else 2)  # wakes early when an engine starts
    finally:
        os.close(started_r)
        for p in procs:
            if p.poll() is None:
                p.kill()  # past the grace period (or the coordinator failed): its committed units are safe
                p.wait()
    if stop.requested:
        return engine_start
    failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]
    if failed:
        raise RuntimeFailure(f"{len(failed)} of {len(procs)} engine workers failed (rank {failed[0][0]} exited "
                             f"{failed[0][1]}; its log is above); rerun the same command to resume")
    return engine_start


def _die_with_parent() -> None:
    """Workers end with the coordinator (Linux), so a killed job leaves no engine running on."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass
