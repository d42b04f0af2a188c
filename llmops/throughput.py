"""What runs measured: `$LLMOPS_HOME/throughput.jsonl`, one JSON line per batch or training run, read back by
`llmops.estimate` so that the next estimate for the same model on the same hardware uses the measurement.

A line: when, the model (name and content digest), the hardware's fingerprint, the task, the engine settings
that change speed, the work (rows, prompt and output tokens, max_tokens), start-up and generation seconds,
the rate, and the roofline's generation time for the same work (what a later estimate scales by).

Written as the registry is: read-modify-write under an exclusive flock, then an atomic replace, so two runs
finishing together both land and a reader never sees half a line. A line that does not parse (an older or
damaged file) is skipped, never fatal: the record only ever improves an estimate.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from llmops.atomic import write_atomic
from llmops.hardware import Hardware
from llmops.paths import llmops_home

FILE = "throughput.jsonl"
# Keep the newest lines only: an estimate needs a few recent measurements, not a history.
MAX_LINES = 5000


def record_file() -> Path:
    return llmops_home() / FILE


def hardware_fingerprint(hw: Hardware) -> str:
    """What decides speed, hashed: the GPUs (name, count, memory) or the CPU (model, cores, ISA, NUMA cores).
    Free memory is left out: it changes between runs without changing the speed."""
    if hw.gpus:
        what = ["gpu", *sorted(f"{g.name}/{g.memory_total_bytes >> 30}" for g in hw.gpus)]
    else:
        node = hw.engine_numa_node
        what = ["cpu", hw.cpu.model, str(hw.cpu.usable_cores), *hw.cpu.isa,
                str(node.physical_cores if node is not None else "")]
    return hashlib.blake2b("\0".join(what).encode(), digest_size=8).hexdigest()


def append(entry: dict[str, Any], path: Path | None = None) -> None:
    """Add one measurement (a JSON object) to the record, under the lock, atomically."""
    path = path or record_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **entry}, sort_keys=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if we crash
        try:
            old = path.read_bytes().splitlines()
        except FileNotFoundError:
            old = []
        kept = [x for x in old if x.strip()][-(MAX_LINES - 1):]
        write_atomic(path, lambda f: f.write(b"\n".join([*kept, line.encode()]) + b"\n"))


def read(path: Path | None = None) -> list[dict[str, Any]]:
    """Every measurement that parses as a JSON object; torn or corrupt lines are skipped."""
    path = path or record_file()
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    found = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict):
                found.append(entry)
    return found


def matching(*, hardware: str, task: str, model_digest: str | None, model: str, dtype: str | None = None,
             path: Path | None = None, newest: int = 9,
             required: tuple[str, ...] = ("generation_s", "rows")) -> list[dict[str, Any]]:
    """The newest measurements of this model (by digest when known, else by name) on this hardware for this
    task (and dtype when given), with a positive number in each `required` field."""
    found = []
    for m in read(path):
        same_model = (m.get("model_digest") == model_digest) if model_digest else (m.get("model") == model)
        if not (same_model and m.get("hardware") == hardware and m.get("task") == task):
            continue
        if dtype is not None and m.get("dtype") not in (None, dtype):
            continue
        try:
            if any(float(m.get(k) or 0) <= 0 for k in required):
                continue
        except (TypeError, ValueError):
            continue
        found.append(m)
    return found[-newest:]
