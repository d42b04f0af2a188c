"""Placing engine replicas on a Ray cluster: `llmops batch INPUT -o OUT --ray [ADDRESS|auto]`.

The driver plans the job as a local run does and owns the output folder's lock, the manifest, the progress
and the summary. It asks the cluster for its live nodes and places one engine replica per node (CPU) or per
group of `tensor_parallel_size` GPUs, as Ray actors pinned to their node. Each actor starts vLLM the way a
local run does and runs the same unit loop (`engine.generate`), committing each unit's shard through the
same exactly-once path (unique temp name, first writer wins), so a retried or zombie actor cannot corrupt a
shard and a rerun skips what is committed. The driver hands out one unit at a time (two queued per actor,
so an engine never waits for the driver) and takes results as they come: a unit that raises is a failed
unit; a replica whose node dies has its units handed to the others.

Why actors and not Ray Data's `map_batches`: the driver must see a dead node as a lost unit to requeue, and
report each commit to its own progress and manifest; Ray Data's executor fails the whole dataset on an actor
error and keeps its own progress. `ray.data.llm` is unusable on CPU clusters (it waits for a GPU forever).
"""

from __future__ import annotations

import os
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmops.batch.engine import QUEUE_DEPTH_FACTOR, Progress, StopRequest, close_engine, start_llm
from llmops.batch.inputs import InputSpec
from llmops.batch.job import EngineWork
from llmops.batch.outputs import CommitLog, Committed, OutputDir, UnitStats
from llmops.errors import RuntimeFailure, UsageError
from llmops.placement import Replica, host_cores, plan_replicas
from llmops.ray_cluster import connect
from llmops.storage import is_uri

__all__ = ["EngineReplica", "Replica", "host_cores", "nodes_of", "plan_replicas", "process_env", "ray_dry_run",
           "replica_env", "run_ray"]

# Calls queued on each actor: the next one is already there when the current one returns.
CALLS_PER_ACTOR = 2
META_NODE = b"llmops.node"
CLOSE_TIMEOUT_S = 20.0
CONTROL_GROUP = "control"
# Placing the actors waits for free CPUs/GPUs on their nodes; past this the cluster is busy with other work.
PLACE_TIMEOUT_S = 300.0


# --- the replicas' environment -------------------------------------------------------------------------


def process_env(replica: Replica) -> dict[str, str]:
    """Environment the replica's process must have from its start (Ray's runtime_env), not set later.

    vLLM binds and sizes OpenMP only for the worker processes it spawns; an engine in the actor's own process
    gets neither. libgomp reads OMP_NUM_THREADS when it loads, which is at process start where LD_PRELOAD
    holds it (as vLLM's CPU install guide sets it, and as vLLM sets it for its children): Ray's own
    OMP_NUM_THREADS comes later and is ignored. Each engine then ran an OpenMP team of every core of the
    host, and two engines on two cores made 5.5 tok/s each against 50 (measured, max_num_seqs 1)."""
    if replica.gpus:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, int(replica.cpus)))}


def replica_env(engine_env: dict[str, str], replica: Replica, cores: list[int] | None) -> dict[str, str]:
    # vLLM's engine core in the actor's own process: Ray ends an actor with SIGKILL (its driver died, the job
    # ended), and a separate engine core process would live on as an orphan holding its memory.
    env = {**engine_env, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if replica.gpus == 0 and replica.host_replicas > 1 and cores is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in host_cores(cores, replica.host_slot,
                                                                              replica.host_replicas))
    return env


# --- what each replica runs -----------------------------------------------------------------------------


class _StopFromDriver(StopRequest):
    """The driver's stop as a replica sees it: the driver calls `EngineReplica.request_stop` (in the actor's
    control group, beside the running `run_units` call) with the seconds left to commit; the unit loop then
    admits no more rows, commits the rows it finished as pieces by then, and returns them to the driver."""

    def __init__(self, replica: EngineReplica):
        super().__init__(replica.work.grace_period_s)
        self.replica = replica

    @property
    def requested(self) -> bool:
        if self.signal_name is None and self.replica.stop_within_s is not None:
            self.request("the driver's stop")
        return self.signal_name is not None

    @property
    def finish_by(self) -> float:
        # The driver's clock is not ours: it sends the seconds left, not a time.
        return self.received + (self.replica.stop_within_s or 0.0)


class _NodeOutputDir(OutputDir):
    """Commits like OutputDir and records the Ray node in the shard's metadata (kept by `commit`)."""

    def __init__(self, path, node: str):
        super().__init__(path)
        self.node = node

    def commit(self, key, table, *args, **kwargs):
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), META_NODE: self.node})
        return super().commit(key, table, *args, **kwargs)


class EngineReplica:
    """A Ray actor: one vLLM engine on its node, generating and committing whole units."""

    def __init__(self, work: EngineWork, replica: Replica):
        import ray

        self.work, self.replica = work, replica
        self.node = ray.get_runtime_context().get_node_id()
        self.out = _NodeOutputDir(work.output_dir, self.node)
        self.llm = None
        self.start_error: str | None = None
        self.stop_within_s: float | None = None
        """Set by the driver's stop: commit the finished rows within this many seconds and return."""

    def sees(self, name: str, token: str) -> str | None:
        """What this node cannot reach, or None: the probe file `name` the driver just wrote in the output
        folder (is it shared, are this node's credentials good), and the input's first file."""
        try:
            if OutputDir(self.work.output_dir).read_text(name) != token:
                return f"the output folder {self.work.output_dir}"
        except Exception:
            return f"the output folder {self.work.output_dir}"
        first = self.work.spec.files[0] if self.work.spec.files else None
        if first is not None and not _readable(first):
            return f"the input {first}"
        return None

    def start(self) -> dict[str, Any]:
        cores = sorted(os.sched_getaffinity(0))
        env = replica_env(self.work.engine.env, self.replica, cores)
        if "VLLM_CPU_OMP_THREADS_BIND" in env:
            # vLLM does not bind an engine in its caller's process: pin this thread before the engine starts
            # its OpenMP threads, which inherit it (+15% against unpinned, measured).
            os.sched_setaffinity(0, [int(c) for c in env["VLLM_CPU_OMP_THREADS_BIND"].split(",")])
        t0 = time.monotonic()
        try:
            self.llm = start_llm(self.work.engine.llm_args, env)
        except Exception as e:
            self.start_error = f"{type(e).__name__}: {e}"
            raise
        return {"node": self.node, "start_s": round(time.monotonic() - t0, 1),
                "cores": env.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
                "max_num_seqs": self.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs}

    def request_stop(self, within_s: float) -> None:
        """Called in the actor's control group while `run_units` runs (a cancel would not do: `ray.get` on a
        cancelled call may raise at once, and the driver would end the actors before their pieces land)."""
        self.stop_within_s = max(0.0, within_s)

    def close(self) -> None:
        if self.llm is not None:
            close_engine(self.llm)
            self.llm = None

    def run_units(self, keys: list[str], done_rows: dict[str, list[int]]) -> dict[str, Any]:
        """Run and commit these units (without the rows in `done_rows`) in one engine loop, so the engine's
        batch stays full from one unit to the next. An exception fails the units not committed yet."""
        from llmops.batch.engine import run_units
        from llmops.batch.inputs import iter_units

        if self.llm is None:
            return {"node": self.node, "lost": True, "done": {}, "error": self.start_error or "engine not started"}
        if self.stop_within_s is not None:  # queued behind the call that was running when the stop came
            return {"node": self.node, "done": {}, "error": None}
        w = self.work
        done: dict[str, list[dict]] = {}
        try:
            units = iter_units(w.spec, w.row_counts, w.chunk_rows, set(keys),
                               {k: set(rows) for k, rows in done_rows.items()})
            writer = f"ray engine {self.replica.rank} on node {self.node[:12]}"
            stop = _StopFromDriver(self)
            for key, stats in run_units(self.llm, units, w.task, self.out, w.identity, Progress(), stop, writer):
                done.setdefault(key, []).append(stats.model_dump())
        except Exception as e:
            return {"node": self.node, "done": done, "error": f"{type(e).__name__}: {e}".strip()}
        return {"node": self.node, "done": done, "error": None}


def _readable(location) -> bool:
    from llmops.storage import exists, filesystem

    try:
        fs, path = filesystem(location)
        return exists(fs, path)
    except Exception:
        return False


# --- the driver -----------------------------------------------------------------------------------------


def ray_dry_run(job, address: str) -> dict[str, Any]:
    """The cluster, the replicas and each one's engine call, as data (`--dry-run --ray`)."""
    ray = connect(address)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    replicas = plan_replicas(nodes, job.plan)
    engine = job.engine
    engines = []
    for r in replicas:
        env = replica_env(engine.env, r, None)
        bind = (f" VLLM_CPU_OMP_THREADS_BIND=<share {r.host_slot + 1} of {r.host_replicas} of the host's cores>"
                if r.gpus == 0 and r.host_replicas > 1 else "")
        where = f"node {r.node_ip} {r.node_id[:12]} ({r.cpus:g} CPU{f', {r.gpus} GPU' if r.gpus else ''}):"
        call = " ".join([where, *(f"{k}={v}" for k, v in env.items())]) + bind + f" vllm.LLM(**{engine.llm_args!r})"
        engines.append({"rank": r.rank, "node_id": r.node_id, "node_ip": r.node_ip, "cpus": r.cpus,
                        "gpus": r.gpus, "host_slot": r.host_slot, "host_replicas": r.host_replicas, "env": env,
                        "call": call, "llm_args": engine.llm_args})
    cluster = [{"node_id": n["NodeID"], "ip": n["NodeManagerAddress"], "resources": {
        k: v for k, v in n.get("Resources", {}).items() if k in ("CPU", "GPU", "memory")}} for n in nodes]
    ray.shutdown()
    return {"ray": {"address": address, "nodes": cluster}, "engines": engines}


@dataclass
class _Replicas:
    """The driver's view of its actors."""

    actors: list[Any]
    replicas: list[Replica]
    alive: set[int] = field(default_factory=set)
    queued: dict[int, int] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)


def run_ray(job, work: EngineWork, commits: CommitLog, progress: Progress, stop: StopRequest, address: str
            ) -> tuple[int, float]:
    """Place the replicas, hand out the pending units, follow their commits; returns how many replicas ran
    and the seconds until the last of them had started its engine.

    A unit whose replica raised is left uncommitted (the job ends incomplete; a rerun retries it). A unit
    whose replica died (its node lost) goes to another replica; with none left the job fails, keeping
    every committed shard."""
    ray = connect(address)
    out = job.output
    state = None
    try:
        replicas = plan_replicas(ray.nodes(), job.plan)
        # One `run_units` call at a time; `request_stop` runs beside it in its own group.
        remote = ray.remote(max_restarts=0, max_concurrency=1, concurrency_groups={CONTROL_GROUP: 1})(EngineReplica)
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        work_ref = ray.put(work)
        actors = [remote.options(num_cpus=r.cpus, num_gpus=r.gpus, runtime_env={"env_vars": process_env(r)},
                                 scheduling_strategy=NodeAffinitySchedulingStrategy(r.node_id, soft=False)
                                 ).remote(work_ref, r) for r in replicas]
        state = _Replicas(actors, replicas, set(range(len(actors))), {i: 0 for i in range(len(actors))})
        _check_shared_output(ray, state, out, job.input_spec)
        hosts = len({r.node_ip for r in replicas})
        progress.phase(f"starting {len(replicas)} vLLM engines on {len({r.node_id for r in replicas})} Ray nodes "
                       f"({hosts} host{'s' if hosts > 1 else ''}); engine logs are in each node's Ray log folder")
        t0 = time.monotonic()
        started = _dispatch(ray, state, job, commits, progress, stop)
        return len(replicas), round(max(started, t0) - t0, 2)
    finally:
        if state is not None and not stop.requested:
            ray.wait([state.actors[i].close.remote() for i in state.alive], num_returns=len(state.alive),
                     timeout=CLOSE_TIMEOUT_S)
        ray.shutdown()  # ends this job's actors (and with them their engines)


def _check_shared_output(ray, state: _Replicas, out: OutputDir, spec: InputSpec) -> None:
    """Refuse an output folder or input that some node cannot reach (a local disk with nodes on other
    machines, a node without the bucket's credentials)."""
    token = uuid.uuid4().hex
    probe = f".llmops-probe-{token[:12]}"
    out._write(probe, token.encode())
    try:
        seen = ray.get([a.sees.remote(probe, token) for a in state.actors], timeout=PLACE_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise RuntimeFailure(f"Ray did not place the {len(state.actors)} engine replicas within {PLACE_TIMEOUT_S:.0f} s "
                             "(another job may hold the nodes' CPUs or GPUs)", "see `ray status`") from None
    finally:
        out._delete(f"{out.root}/{probe}")
    blind = [(r, what) for r, what in zip(state.replicas, seen) if what is not None]
    if blind:
        (replica, what), remote = blind[0], out.remote or any(is_uri(f) for f in spec.files)
        fix = ("check that node's credentials and AWS_ENDPOINT_URL (the same environment on every node)" if remote
               else "with nodes on several machines, give folders on shared storage (NFS, a mounted bucket, "
                    "or s3://, gs:// URIs) that every node sees at the same path")
        raise UsageError(f"{what} is not reachable from Ray node {replica.node_ip} ({len(blind)} of {len(seen)} "
                         f"replicas): {fix}")


def nodes_of(out: OutputDir, committed: Committed) -> dict[str, str]:
    """The node that committed each unit already done (from its shard's metadata), for the manifest."""
    import pyarrow.parquet as pq

    nodes = {}
    for key in committed.done:
        try:
            node = (pq.read_schema(out.shard_path(key), filesystem=out.fs).metadata or {}).get(META_NODE)
        except Exception:
            continue
        if node:
            nodes[key] = node.decode()
    return nodes


def _dispatch(ray, state: _Replicas, job, commits: CommitLog, progress: Progress, stop: StopRequest) -> float:
    """Returns when the last engine had started (time.monotonic)."""
    out, committed = job.output, commits.committed
    last_start = 0.0
    todo = deque(k for k in job.units if k not in committed.done)
    running: dict[Any, tuple[int, list[str]]] = {}  # ObjectRef -> (replica, unit keys)
    starting = {state.actors[i].start.remote(): i for i in state.alive}
    depth: dict[int, int] = {}  # rows an engine keeps queued (QUEUE_DEPTH_FACTOR x its max_num_seqs)
    # Rows per call for an even split of the job over every engine's queued calls.
    share = -(-sum(job.unit_sizes[k] for k in todo) // (len(state.actors) * CALLS_PER_ACTOR))
    stopping = False
    while True:
        # 1. Keep CALLS_PER_ACTOR calls queued on every started replica (none once a stop is requested).
        while todo and not stop.requested:
            free = [i for i in sorted(state.alive & set(depth)) if state.queued[i] < CALLS_PER_ACTOR]
            if not free:
                break
            i = min(free, key=lambda i: state.queued[i])
            keys = _take(todo, job.unit_sizes, depth[i], share)
            done_rows = {k: sorted(committed.partial[k]) for k in keys if k in committed.partial}
            running[state.actors[i].run_units.remote(keys, done_rows)] = (i, keys)
            state.queued[i] += 1
        if not running and not starting:
            break
        if not state.alive and todo:
            break
        if stop.requested and not stopping:
            # Preempted: every replica commits its finished rows as pieces by the stop's deadline and returns
            # (its queued call returns at once); the driver waits for them until halfway through its exit
            # reserve, which leaves the replicas the time to write after the deadline.
            within = max(0.0, stop.finish_by - time.monotonic())
            for i in {i for i, _ in running.values()}:
                state.actors[i].request_stop.options(concurrency_group=CONTROL_GROUP).remote(within)
            stopping = True
        if stop.requested and (not running or time.monotonic() >= (stop.finish_by + stop.exit_by) / 2):
            break
        ready, _ = ray.wait([*running, *starting], num_returns=1, timeout=1.0)
        for ref in ready:
            if ref in starting:
                i = starting.pop(ref)
                last_start = time.monotonic()
                try:
                    info = ray.get(ref)
                    depth[i] = QUEUE_DEPTH_FACTOR * info["max_num_seqs"]
                    progress.phase(f"engine {i} started on node {info['node'][:12]} in {info['start_s']} s "
                                   f"(cores: {info['cores']})")
                except Exception as e:
                    _lose(state, i, f"engine {i} did not start: {_one_line(e)}", progress)
                continue
            i, keys = running.pop(ref)
            state.queued[i] -= 1
            try:
                result = ray.get(ref)
            except Exception as e:  # the actor or its node died: its units go to the other replicas
                _lose(state, i, f"engine {i} on node {state.replicas[i].node_ip} was lost ({_one_line(e)})", progress)
                _requeue(todo, keys, job, committed, progress)
                continue
            for key, stats in result["done"].items():
                for piece in stats:
                    commits.record(key, UnitStats(**piece), node=result["node"])
            if result.get("lost"):
                _lose(state, i, f"engine {i} did not start: {result['error']}", progress)
                _requeue(todo, keys, job, committed, progress)
            elif result["error"] is not None:
                # Left uncommitted: the runner ends the job as incomplete, and a rerun retries them.
                unfinished = [k for k in keys if k not in result["done"]]
                progress.phase(f"{len(unfinished)} units failed on node {result['node'][:12]} (first: "
                               f"{unfinished[0] if unfinished else '-'}): {result['error']}")
    if todo and not state.alive and not stop.requested:
        out.write_manifest(commits.manifest, committed, "incomplete")
        raise RuntimeFailure(f"every engine replica is gone ({state.lost[-1]}); {len(todo)} units were not run",
                             "the committed shards are kept: run the same command again to finish the job")
    return last_start


def _take(todo: deque, sizes: dict[str, int], depth: int, share: int) -> list[str]:
    """The next units for one call: enough rows to keep the engine's queue full (`depth`), but no more than
    `share`, so a small job still spreads over every engine."""
    want = max(1, min(depth, share))
    keys, rows = [], 0
    while todo and (not keys or rows + sizes[todo[0]] <= want):
        keys.append(todo.popleft())
        rows += sizes[keys[-1]]
    return keys


def _requeue(todo: deque, keys: list[str], job, committed: Committed, progress: Progress) -> None:
    """Put back the units of a lost call that its replica did not commit before it died."""
    now = job.output.committed(job.unit_sizes, job.identity.key())
    for key in keys:
        if key in now.done and key not in committed.done:  # committed just before its replica died
            before = committed.partial_stats.pop(key, UnitStats())
            committed.partial.pop(key, None)
            committed.done[key] = now.done[key]
            progress.advance(now.done[key].rows - before.rows, now.done[key].completion_tokens - before.completion_tokens)
    todo.extendleft(reversed([k for k in keys if k not in now.done]))
    for key in keys:
        if key in now.partial:
            committed.partial[key], committed.partial_stats[key] = now.partial[key], now.partial_stats[key]


def _lose(state: _Replicas, i: int, why: str, progress: Progress) -> None:
    if i in state.alive:
        state.alive.discard(i)
        state.lost.append(why)
        progress.phase(f"warning: {why}; {len(state.alive)} of {len(state.actors)} engines left")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]
