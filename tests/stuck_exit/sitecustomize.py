"""On PYTHONPATH for a test's `llmops train`, Python loads this in every process it starts. The training
process of rank 1 (torchrun sets LOCAL_RANK for the ranks alone, not for the launcher or the command) then
does not exit: it sleeps in its shutdown, as a rank once stuck after saving its work."""

import atexit
import os
import time

if os.environ.get("LOCAL_RANK") == "1":
    atexit.register(time.sleep, 3600)
