"""Keep the terminal for llmops's own lines: the engines' output goes to the run's log file.

vLLM, torch, transformers, datasets and accelerate print start-up logs, deprecation warnings and loading
bars, and vLLM's engine and worker processes write to file descriptor 2 directly, so redirecting Python's
`sys.stderr` or configuring `logging` would miss most of it. `engine_output(log)` therefore points fds 1 and 2
of this process at the log file while an engine starts (or a training run works): every library, and every
process started meanwhile, writes there for good. llmops's own progress goes to `terminal()`, a copy of the
terminal's stderr saved first. If the block fails, the end of the log is shown before the error.

`-v/--verbose` (every command has it; it sets `LLMOPS_VERBOSE=1`, so worker processes follow it) leaves
everything on the terminal.
"""

from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from llmops.errors import Stopped

VERBOSE_ENV = "LLMOPS_VERBOSE"
TERMINAL_ON_STDOUT_ENV = "LLMOPS_TERMINAL_ON_STDOUT"
"""Set by an llmops command for processes it starts through a launcher that shares one stderr with them
(`llmops train` -> `accelerate launch` -> ranks): their terminal is their stdout, which the command shows,
while their stderr, the launcher's included, goes to the log file."""
TAIL_LINES = 30
"""Lines of the log shown when the block fails: about one Python traceback."""

_terminal: IO[str] | None = None


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def set_verbose(on: bool) -> None:
    if on:
        os.environ[VERBOSE_ENV] = "1"


def new_log_file(kind: str) -> Path:
    """A fresh log file under `$LLMOPS_HOME/logs/`, where serve keeps its logs too: batch-DATE-TIME-PID.log."""
    import time

    from llmops.paths import logs_dir

    return logs_dir() / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


def terminal() -> IO[str]:
    """Where llmops's own progress goes: the terminal's stderr (stdout in a launched rank, see
    `TERMINAL_ON_STDOUT_ENV`), also while `engine_output` is active."""
    return _terminal or (sys.stdout if os.environ.get(TERMINAL_ON_STDOUT_ENV) else sys.stderr)


@contextmanager
def engine_output(log_path: str | Path) -> Iterator[Path]:
    """Send everything written to stdout/stderr while the block runs (by this process, by the libraries it
    loads, and for good by the processes it starts) to `log_path` (appended), unless --verbose.

    On an exception the log's last lines go to the terminal, then the exception propagates, so the error
    itself still ends in llmops's one-line message. Yields the log's path.
    """
    global _terminal
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if verbose() or _terminal is not None:  # verbose, or already inside an engine_output block
        yield log_path
        return
    _quiet_libraries()
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    screen = saved_out if os.environ.get(TERMINAL_ON_STDOUT_ENV) else saved_err
    _terminal = os.fdopen(os.dup(screen), "w", buffering=1, encoding=sys.stderr.encoding or "utf-8",
                          errors="replace")
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    failed = False
    try:
        yield log_path
    except Exception as e:
        # A stop that the user asked for (SIGTERM, Ctrl+C) is no failure: no log to read then.
        failed = not isinstance(e, Stopped)
        raise
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        os.close(saved_err)
        _terminal.close()
        _terminal = None
        if failed:
            show_tail(log_path)


def show_tail(log_path: Path, lines: int = TAIL_LINES) -> None:
    """The last `lines` lines of the log on stderr, framed so they read as a quote, not as llmops's lines;
    before them, the distinct exception lines of the whole log that the tail leaves out (vLLM's root cause
    often sits above a second, longer traceback)."""
    try:
        with open(log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return
    # Progress bars rewrite their line with \r: keep what the line said last.
    all_lines = [line.rsplit("\r", 1)[-1] for line in text.splitlines() if line.strip()]
    tail = all_lines[-lines:]
    if not tail:
        return
    causes: list[str] = []
    for line in all_lines[:-lines]:
        match = _EXCEPTION_LINE.search(line)
        if match and match.group(0) not in causes and not any(match.group(0) in t for t in tail):
            causes.append(match.group(0))
    if causes:
        print(f"--- errors in {log_path} ---", file=sys.stderr)
        print("\n".join(causes[-5:]), file=sys.stderr)
    print(f"--- last {len(tail)} lines of {log_path} ---", file=sys.stderr)
    print("\n".join(tail), file=sys.stderr)
    print("--- end of log ---", file=sys.stderr, flush=True)


def show_excerpt(output: str, log_path: Path, lines: int = 10) -> None:
    """For a launcher whose output went to `log_path` and that failed: the distinct exception lines and exit
    reasons in `output` (its last part), at most `lines` of them, or its last `lines` lines when it names none,
    framed as `show_tail` frames its quote."""
    all_lines = [line.rsplit("\r", 1)[-1].strip() for line in output.splitlines() if line.strip()]
    reasons: list[str] = []
    for line in all_lines:
        match = _EXCEPTION_LINE.search(line) or _EXIT_REASON.search(line)
        if match and match.group(0) not in reasons:
            reasons.append(match.group(0))
    shown = reasons[-lines:] or all_lines[-lines:]
    if shown:
        print(f"--- from {log_path} ---", file=sys.stderr)
        print("\n".join(shown), file=sys.stderr)
        print("--- end of excerpt ---", file=sys.stderr, flush=True)


# torch's launcher on a rank that died of a signal: "traceback : Signal 9 (SIGKILL) received by PID 123".
_EXIT_REASON = re.compile(r"Signal \d+ \(SIG\w+\) received by PID \d+")
# "ValueError: Available memory on node 0 ...", also behind vLLM's "(Worker pid=1) ERROR ... [file.py:1] " prefix.
_EXCEPTION_LINE = re.compile(r"\b[A-Z]\w*(Error|Exception): .+")


def _quiet_libraries() -> None:
    """What the libraries let us turn down at the source, so the log file is readable too."""
    # datasets' map/filter bars (read when datasets is imported; the call covers an earlier import).
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
