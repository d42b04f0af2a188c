"""Engine processes end with the llmops process that started them, even when it is SIGKILLed (`llmops.reaper`).

Seen before the fix: after `kill -9` of `llmops batch` (its pid only, as the OOM killer does), vLLM's
EngineCore and Worker ran on for 45 minutes holding 2.7 GB each."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

PARENT = """
import subprocess, sys, time
from llmops.reaper import watch_children
watch_children()
# A child that ignores SIGTERM, and its own child: both must go (SIGKILL after the grace period).
child = subprocess.Popen([sys.executable, "-c", "import signal, subprocess, sys, time\\n"
                          "signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
                          "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\\n"
                          "print(g.pid, flush=True)\\ntime.sleep(600)"], stdout=subprocess.PIPE, text=True)
grandchild = child.stdout.readline().strip()
print(child.pid, grandchild, flush=True)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids, timeout: float = 60) -> list[int]:
    """Pids still alive after `timeout` (a hang guard, not a timing claim)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if alive(p)]


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(name))
    found, todo = [], [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            found.append(pid)
            todo.append(pid)
    return found


@pytest.mark.unit
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc (Linux)")
def test_a_sigkilled_process_takes_its_descendants_with_it(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True, cwd=REPO,
                              start_new_session=True)
    try:
        child, grandchild = (int(p) for p in parent.stdout.readline().split())
        time.sleep(1.5)  # the watchdog notes descendants every 0.5 s
        parent.kill()
        parent.wait()
        assert wait_gone([child, grandchild]) == []
    finally:
        try:
            os.killpg(parent.pid, signal.SIGKILL)
        except OSError:
            pass


@pytest.mark.engine
def test_kill_9_of_llmops_batch_alone_leaves_no_engine_process(tmp_path, default_model_dir):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(f'{{"prompt": "Count to {i}."}}\n' for i in range(400)))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "llmops", "batch", str(path), "-o", str(out), "--max-tokens", "32",
                             "--set", "chunk_rows=10", "--set", "engine.cpu_kv_cache_gib=1",
                             # vLLM's own engine processes, as on machines of more than 4 cores (here the
                             # planner runs the engine in the llmops process, which leaves nothing behind)
                             "--set", "engine.in_process=false"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, cwd=REPO)
    try:
        deadline = time.monotonic() + 600
        while not list(out.glob("results/*.parquet")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        engines = [p for p in descendants(proc.pid) if "VLLM" in open(f"/proc/{p}/cmdline", "rb").read().decode(
            "utf-8", "replace") or "VLLM" in open(f"/proc/{p}/comm").read()]
        assert engines, "vLLM's engine processes should be running mid-job"
        proc.kill()  # llmops only, not its process group: what the OOM killer or `kill -9 PID` does
        proc.wait()
        assert wait_gone(engines, timeout=120) == []
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
