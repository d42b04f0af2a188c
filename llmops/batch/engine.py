"""Running one engine over units: keep vLLM's batch full, commit every finished unit, stop cleanly.

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
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from llmops.batch.config import SamplingConfig, sampling_params
from llmops.batch.identity import JobIdentity
from llmops.batch.inputs import Row, Unit
from llmops.batch.outputs import OutputDir, UnitStats
from llmops.errors import RuntimeFailure, Stopped

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

    def request(self, name: str) -> None:
        if self.signal_name is None:
            self.signal_name, self.received = name, time.monotonic()

    def stopped(self, done: str) -> Stopped:
        return Stopped(f"stopped by {self.signal_name}: {done}; rerun the same command to finish the job")


@contextlib.contextmanager
def stop_on_signals(stop: StopRequest) -> Iterator[StopRequest]:
    """SIGTERM and SIGINT request a stop while generating; before that (or a second signal) they stop at
    once. The previous handlers are put back afterwards (the caller may be a test session or a notebook)."""

    def handle(signum, frame):
        # A repeat within a moment is the same request (Ctrl-C reaches a data-parallel worker both from the
        # terminal and from its coordinator); a later one means "now".
        again = stop.requested and time.monotonic() - stop.received > REPEAT_SIGNAL_S
        stop.request(signal.Signals(signum).name)
        if again or not stop.generating:
            raise stop.stopped("stopped at once, unfinished rows dropped" if again else "nothing was generating")

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


def generate(llm, units: Iterable[Unit], sampling: SamplingConfig, out: OutputDir, job: JobIdentity,
             progress: Progress, stop: StopRequest | None = None, writer: str = "engine 0"
             ) -> Iterator[tuple[str, UnitStats]]:
    """Run every unit through the engine; yield (key, stats) as each unit's shard (or piece) is committed.
    With `stop` requested, returns early after committing the finished rows of the units in flight."""
    from jinja2 import TemplateError

    stop = stop or StopRequest()
    row_errors: tuple[type[Exception], ...] = (ValueError, TypeError, TemplateError, UnicodeError)
    try:  # newer vLLM raises its own type for invalid requests; older ones a ValueError
        from vllm.exceptions import VLLMValidationError

        row_errors += (VLLMValidationError,)
    except ImportError:
        pass
    try:  # newer vLLM takes pre-tokenized input as an EngineInput; older ones as a TokensPrompt dict
        from vllm.inputs import tokens_input
    except ImportError:
        def tokens_input(ids: list[int]) -> dict:
            return {"prompt_token_ids": ids}
    engine = llm.llm_engine
    tokenizer = llm.get_tokenizer()
    lora_requests = {}  # an adapter rides on each request that uses it; the base weights stay as they are
    if job.model.adapters:
        from vllm.lora.request import LoRARequest

        lora_requests = {name: LoRARequest(name, number, adapter.path)
                         for number, (name, adapter) in enumerate(sorted(job.model.adapters.items()), 1)}
    # One SamplingParams for every row without overrides, as LLM.generate does (the engine copies it).
    job_params = sampling_params(sampling)
    depth = QUEUE_DEPTH_FACTOR * engine.vllm_config.scheduler_config.max_num_seqs
    inflight: dict[str, _InFlight] = {}
    where: dict[str, tuple[str, int]] = {}  # request id -> (unit key, position in unit)
    units = iter(units)
    more = True
    step_s = 0.0
    while True:
        # 1. Top the queue up with whole units before it runs low (none once a stop is requested).
        while more and not stop.requested and engine.get_num_unfinished_requests() < depth:
            unit = next(units, None)
            if unit is None:
                more = False
                break
            state = inflight[unit.key] = _InFlight(unit, [None] * len(unit.rows), len(unit.rows))
            failed = 0
            for pos, row in enumerate(unit.rows):
                if row.error is None:
                    request_id = f"{unit.key}/{pos}"
                    try:
                        params = sampling_params(sampling, row.body) if row.body else job_params
                        engine.add_request(request_id, tokens_input(_token_ids(tokenizer, row)), params,
                                           lora_request=lora_requests.get(_adapter_of(row, job)))
                        where[request_id] = (unit.key, pos)
                        continue
                    except row_errors as e:  # a bad row fails alone: too long, bad parameter, bad template
                        row.error = str(e).strip() or type(e).__name__
                state.results[pos] = _failure(row)
                state.remaining -= 1
                failed += 1
            progress.advance(failed, 0)
            if state.remaining == 0:
                yield _commit(inflight.pop(unit.key), out, job, writer)
        # A step can take seconds on a CPU (a long prefill): stop before one that would end past finish_by.
        if stop.requested and (not inflight or time.monotonic() + step_s >= stop.finish_by):
            break
        if not engine.has_unfinished_requests():
            if not more or stop.requested:
                break
            continue
        # 2. One engine step; record what finished and commit every unit that is complete.
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
            key, pos = where.pop(output.request_id)
            state = inflight[key]
            completion = output.outputs[0]
            state.results[pos] = {"generated_text": completion.text, "finish_reason": completion.finish_reason,
                                  "prompt_tokens": len(output.prompt_token_ids or ()),
                                  "completion_tokens": len(completion.token_ids), "error": None}
            state.remaining -= 1
            rows += 1
            tokens += len(completion.token_ids)
            if state.remaining == 0:
                yield _commit(inflight.pop(key), out, job, writer)
        if rows:
            progress.advance(rows, tokens)
    if inflight and stop.requested:
        # 3. Stopping: drop what is unfinished, commit the finished rows of each unit as a piece.
        with contextlib.suppress(Exception):
            engine.abort_request(list(where))
        for state in inflight.values():
            if any(r is not None for r in state.results):
                yield _commit(state, out, job, writer)
    elif inflight:  # cannot happen: every request of a unit ends finished or failed
        raise RuntimeFailure(f"{len(inflight)} units were left unfinished by the engine")


def _adapter_of(row: Row, job: JobIdentity) -> str | None:
    """The adapter a row generates with: the one its OpenAI `body.model` names, none when it names the base
    model, else the job's (`--model ADAPTER`)."""
    asked = (row.body or {}).get("model")
    if asked in job.model.adapters:
        return asked
    return None if asked == job.model.name else job.model.adapter


def _token_ids(tokenizer, row: Row) -> list[int]:
    if row.messages is not None:
        text = tokenizer.apply_chat_template(row.messages, tokenize=False, add_generation_prompt=True)
        # The chat template already holds the special tokens (as vLLM's chat path does).
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(row.prompt)


def _failure(row: Row) -> dict[str, Any]:
    return {"generated_text": None, "finish_reason": None, "prompt_tokens": None, "completion_tokens": None,
            "error": row.error}


def _commit(state: _InFlight, out: OutputDir, job: JobIdentity, writer: str = "engine 0") -> tuple[str, UnitStats]:
    """Commit the finished rows of a unit: all of them (a shard), or some (a piece, when stopping or when
    an earlier run committed the others)."""
    import pyarrow as pa

    unit = state.unit
    positions = [pos for pos, r in enumerate(state.results) if r is not None]
    results = [state.results[pos] for pos in positions]
    rows = [unit.rows[pos] for pos in positions]
    kept = unit.kept if len(positions) == len(unit.rows) else unit.kept.take(positions)
    arrays = {"row": pa.array([r.index for r in rows], pa.int64())}
    if "id" not in kept.column_names:
        arrays["id"] = pa.array([r.id for r in rows], pa.string())
    for name in kept.column_names:
        arrays[name] = kept.column(name)
    for name, kind in (("generated_text", pa.string()), ("finish_reason", pa.string()),
                       ("prompt_tokens", pa.int32()), ("completion_tokens", pa.int32()), ("error", pa.string())):
        arrays[name] = pa.array([r[name] for r in results], kind)
    failed = sum(r["error"] is not None for r in results)
    stats = UnitStats(rows=len(results), ok=len(results) - failed, failed=failed,
                      prompt_tokens=sum(r["prompt_tokens"] or 0 for r in results),
                      completion_tokens=sum(r["completion_tokens"] or 0 for r in results))
    out.commit(unit.key, pa.table(arrays), stats, job, piece=unit.piece or len(positions) < len(unit.rows),
               writer=writer)
    return unit.key, stats
