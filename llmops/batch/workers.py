"""Local worker processes: one engine per GPU group (`EnginePlan.data_parallel_size` > 1), or several CPU
engines of one host, each on its own cores.

Each worker (`llmops.batch.worker`) gets the job's `EngineWork` pickled on its stdin, takes every n-th unit
and commits shards exactly as a single engine does, so resume works the same way. It reports each commit on
a pipe; the coordinator records it through the job's `CommitLog`, forwards a stop request to the workers
and waits for them within the grace period.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import select
import signal
import subprocess
import sys
import time
from typing import Any

from llmops.batch.engine import Progress, StopRequest
from llmops.batch.job import EngineWork
from llmops.batch.outputs import CommitLog, UnitStats
from llmops.errors import RuntimeFailure
from llmops.placement import gpu_group, host_cores

# A worker gets this much less of the grace period than the coordinator, which then still has time to
# collect its commits and write the manifest.
WORKER_GRACE_MARGIN_S = 3.0
# A worker reports on this file descriptor (one JSON line each): its engine has started (the coordinator
# reports the engines' start apart from generation, as for a single engine), and each commit.
REPORT_FD_VAR = "LLMOPS_WORKER_REPORT_FD"


def worker_command(output_dir: str, rank: int, world: int, grace_period_s: float | None = None) -> list[str]:
    """The worker's command line; the output folder is there for `ps` (the work itself comes on stdin)."""
    command = [sys.executable, "-m", "llmops.batch.worker", output_dir, "--rank", str(rank), "--world", str(world)]
    if grace_period_s is not None:
        command += ["--grace-period", str(max(1.0, grace_period_s - WORKER_GRACE_MARGIN_S))]
    return command


def engines(job, grace_period_s: float | None = None) -> list[dict[str, Any]]:
    """One entry per engine: the GPUs or cores it gets, its environment and the exact call or command."""
    engine = job.engine
    dp = job.plan.data_parallel_size
    if dp == 1:
        return [{"rank": 0, "env": engine.env, "call": engine.call(), "llm_args": engine.llm_args}]
    found = []
    cores = sorted(os.sched_getaffinity(0))
    for rank in range(dp):
        if job.plan.device == "cpu":
            gpus = ""
            worker_env = {**engine.env, "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, host_cores(cores, rank, dp)))}
        else:
            from llmops.hardware import detect

            gpus = ",".join(str(i) for i in gpu_group([g.index for g in detect().gpus],
                                                      job.plan.tensor_parallel_size, rank))
            worker_env = {**engine.env, "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": gpus}
        cmd = worker_command(job.output.location, rank, dp, grace_period_s)
        command = " ".join([*(f"{k}={v}" for k, v in worker_env.items()), *cmd, "< (the job, pickled)"])
        found.append({"rank": rank, "gpus": gpus, "env": worker_env, "command": command, "argv": cmd,
                      "llm_args": engine.llm_args})
    return found


def units_for_rank(units: list[str], rank: int, world: int) -> set[str]:
    """Every world-th unit of the whole job, from `rank`: an even share in input order.

    Taken over all units, not the pending ones, so the split does not depend on when each worker looks:
    a worker that starts late cannot see a different split than one that has already committed."""
    return {key for i, key in enumerate(units) if i % world == rank}


def run_workers(job, work: EngineWork, commits: CommitLog, progress: Progress, stop: StopRequest) -> float:
    """Start one worker per engine, record their commits, fail if any of them fails. On a stop request,
    pass it on (SIGTERM) and wait for the workers to commit what they finished, within the grace period.
    Returns the seconds until the last engine had started."""
    procs = []
    t0 = time.monotonic()
    report_r, report_w = os.pipe()
    os.set_blocking(report_r, False)
    payload = pickle.dumps(work)
    for engine in engines(job, stop.grace_period_s):
        # The workers share the folder's lock (the same open file): a rerun cannot start while a worker of
        # a killed coordinator is still committing.
        proc = subprocess.Popen(engine["argv"], env={**os.environ, **engine["env"], REPORT_FD_VAR: str(report_w)},
                                stdin=subprocess.PIPE, preexec_fn=_die_with_parent,
                                pass_fds=(*job.output.lock_fds(), report_w))
        with contextlib.suppress(BrokenPipeError):  # a worker that died at once is reported below
            proc.stdin.write(payload)
            proc.stdin.close()
        procs.append(proc)
    os.close(report_w)
    engine_start = 0.0
    forwarded = False
    pending = b""
    try:
        while True:
            if stop.requested and not forwarded:
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
                forwarded = True
            running = [p for p in procs if p.poll() is None]
            with contextlib.suppress(BlockingIOError):
                while chunk := os.read(report_r, 65536):
                    pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                report = json.loads(line)
                if "started" in report:
                    engine_start = time.monotonic() - t0
                    progress.phase(f"engine {report['started']} started in {engine_start:.1f} s")
                else:
                    commits.record(report["commit"], UnitStats(**report["stats"]))
            if not running or (stop.requested and time.monotonic() >= stop.finish_by):
                break
            select.select([report_r], [], [], 0.5 if stop.requested else 2)  # wakes at once on a report
    finally:
        os.close(report_r)
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
