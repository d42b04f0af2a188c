"""Engine processes end with the llmops process that started them, however it ends.

vLLM runs its engine core (and, on the CPU, its worker) in processes of its own, and nothing in vLLM watches
its parent: when `llmops batch` is SIGKILLed (the OOM killer, `kill -9 PID`, a crashed container runtime)
those processes were seen running on for 45 minutes, holding 2.7 GB each. A killed process runs no code, so
the clean-up has to live in another process: `watch_children()` starts a small watchdog that notes this
process's descendants every half second and, once this process is gone, stops the ones it noted
(SIGTERM, then SIGKILL), checking each one's start time so that a reused pid is never touched.

Linux only (it reads /proc); elsewhere it does nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys

_started_for: int | None = None

# The watchdog's code, run as `python -c` so that it imports nothing of llmops (and starts in ~20 ms).
WATCHDOG = r"""
import os, signal, sys, time

def stat(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[1]), fields[19]  # ppid, start time (clock ticks since boot)
    except (OSError, IndexError, ValueError):
        return None

def descendants(root, me):
    children = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != me:
            s = stat(int(name))
            if s:
                children.setdefault(s[0], []).append((int(name), s[1]))
    found, todo = [], [root]
    while todo:
        for pid, start in children.get(todo.pop(), []):
            found.append((pid, start))
            todo.append(pid)
    return found

parent, me = int(sys.argv[1]), os.getpid()
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # sent to the whole group: outlive llmops, then act
    signal.signal(sig, signal.SIG_IGN)
parent_start = stat(parent)[1] if stat(parent) else None
noted = []
while True:
    s = stat(parent)
    if s is None or s[1] != parent_start:
        break
    noted = descendants(parent, me) or noted
    time.sleep(0.5)

def alive(pid, start):
    s = stat(pid)
    return s is not None and s[1] == start

for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
    left = [(p, st) for p, st in noted if alive(p, st)]
    for pid, _ in left:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    deadline = time.monotonic() + grace
    while grace and time.monotonic() < deadline and any(alive(p, st) for p, st in left):
        time.sleep(0.1)
"""


def watch_children() -> None:
    """Start (once per process) the watchdog that stops this process's descendants when it is gone."""
    global _started_for
    if _started_for == os.getpid() or not os.path.isdir("/proc/self"):
        return
    subprocess.Popen([sys.executable, "-c", WATCHDOG, str(os.getpid())], stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True)
    _started_for = os.getpid()
