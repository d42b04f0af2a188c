"""How long `llmops --help` takes, and how many llmops modules it imports (issue 12: goal 0.3 s or less).

    .venv/bin/python scripts/bench_help.py [RUNS] [-- ARGS...]

Prints min and median wall time of RUNS (default 10) runs of `llmops ARGS` (default `--help`), each a fresh
process as a user's shell starts it, and the load average, since other processes on the machine slow it.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

LLMOPS = str(Path(sys.executable).with_name("llmops"))


def main() -> None:
    argv = sys.argv[1:]
    args = argv[argv.index("--") + 1:] if "--" in argv else ["--help"]
    runs = int(argv[0]) if argv and argv[0] != "--" else 10
    subprocess.run([LLMOPS, *args], capture_output=True)  # warm the file cache
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([LLMOPS, *args], capture_output=True)
        times.append(time.perf_counter() - start)
    code = ("import sys\nfrom llmops.cli.app import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print(sum(1 for m in sys.modules if m == 'llmops' or m.startswith('llmops.')), file=sys.stderr)")
    modules = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True).stderr.split()[-1]
    print(f"llmops {' '.join(args)}: min {min(times):.3f} s, median {statistics.median(times):.3f} s over {runs} runs; "
          f"{modules} llmops modules; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
