"""llmops.quiet: engines' output goes to a log file, llmops's own lines stay on the terminal, the log's end is
shown when something fails. Run in a subprocess, so the real file descriptors 1 and 2 are redirected."""

import subprocess
import sys

import pytest

SCRIPT = """
import os, subprocess, sys, warnings
from llmops import quiet
from llmops.cli import _output as out

out.log("llmops: before")
try:
    with quiet.engine_output(sys.argv[1]):
        out.log("llmops: own progress")
        print("python stdout noise")
        print("python stderr noise", file=sys.stderr)
        warnings.warn("FutureWarning noise", FutureWarning)
        os.write(2, b"fd 2 noise\\n")
        subprocess.run(["sh", "-c", "echo child noise >&2; echo child stdout noise"])
        if sys.argv[2] == "fail":
            raise RuntimeError("engine died")
finally:
    out.log("llmops: after")
"""


def run(tmp_path, mode: str, env: dict | None = None):
    import os

    log = tmp_path / "logs" / "engine.log"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(log), mode], capture_output=True, text=True,
                          env={**os.environ, "LLMOPS_VERBOSE": "", **(env or {})}, timeout=120)
    return proc, log


NOISE = ("python stdout noise", "python stderr noise", "FutureWarning noise", "fd 2 noise", "child noise",
         "child stdout noise")


@pytest.mark.unit
def test_engine_output_goes_to_the_log_and_llmops_lines_to_the_terminal(tmp_path):
    proc, log = run(tmp_path, "ok")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["llmops: before", "llmops: own progress", "llmops: after"]
    assert proc.stdout == ""
    logged = log.read_text()
    for noise in NOISE:
        assert noise in logged


@pytest.mark.unit
def test_a_failure_shows_the_end_of_the_log(tmp_path):
    proc, log = run(tmp_path, "fail")
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert lines[:2] == ["llmops: before", "llmops: own progress"]
    assert lines[2] == f"--- last {len(NOISE)} lines of {log} ---"
    tail = lines[3:lines.index("--- end of log ---")]
    for noise in NOISE:
        assert any(noise in line for line in tail), noise
    assert "--- end of log ---" in lines and "llmops: after" in lines
    assert "RuntimeError: engine died" in proc.stderr  # the exception itself is not swallowed


@pytest.mark.unit
def test_verbose_keeps_everything_on_the_terminal(tmp_path):
    proc, log = run(tmp_path, "ok", env={"LLMOPS_VERBOSE": "1"})
    assert proc.returncode == 0
    for noise in ("python stderr noise", "fd 2 noise", "child noise", "FutureWarning noise"):
        assert noise in proc.stderr
    assert "python stdout noise" in proc.stdout
    assert not log.exists() or log.read_text() == ""


@pytest.mark.unit
def test_the_root_cause_above_the_tail_is_shown_too(tmp_path, capsys):
    from llmops.quiet import TAIL_LINES, show_tail

    log = tmp_path / "engine.log"
    log.write_text("starting\n(Worker pid=7) ERROR 11-27 13:29:59 [cpu_worker.py:219] ValueError: Available memory "
                   "on node 0 (6.63/8.59 GiB) is less than requested\n"
                   + "".join(f"  File \"x.py\", line {i}\n" for i in range(TAIL_LINES))
                   + "RuntimeError: Engine core initialization failed\n")
    show_tail(log)
    shown = capsys.readouterr().err.splitlines()
    assert shown[:2] == [f"--- errors in {log} ---",
                         "ValueError: Available memory on node 0 (6.63/8.59 GiB) is less than requested"]
    assert shown[2] == f"--- last {TAIL_LINES} lines of {log} ---"
    assert shown[-2:] == ["RuntimeError: Engine core initialization failed", "--- end of log ---"]
