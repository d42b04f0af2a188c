"""A throwaway Ray cluster of several nodes on this host, for tests and `scripts/bench_ray.py`.

Each node is `ray start --block` with its own temp dir, ports and CPU count, in its own session, so that
stopping it ends exactly the processes it started (its GCS, raylet, workers and their vLLM engine
processes), never another user's Ray (`ray stop` would kill every Ray process on the machine). Token auth
is on, as Ray 2.60 wants by default: the driver needs `env` (RAY_AUTH_MODE and RAY_AUTH_TOKEN).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
# The smallest object store Ray accepts is 75 MiB; results travel as small dicts, shards go to storage.
OBJECT_STORE_BYTES = 100 * 1024 * 1024
# Ports each node needs besides the head's GCS port (Ray's defaults collide between two nodes on one host).
_NODE_PORT_OPTIONS = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                      "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@dataclass
class LocalRayCluster:
    """Nodes started with `start()`; `address` and `env` are what a driver needs to join."""

    cpus_per_node: int = 1
    nodes: int = 2
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="llmops-ray-")))
    address: str = ""
    env: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)

    def start(self, timeout_s: float = 120) -> LocalRayCluster:
        gcs_port, client_port = free_ports(2)
        self.address = f"127.0.0.1:{gcs_port}"
        self.env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
        # The marker lets engine_processes() find this cluster's engines even where one was orphaned.
        env = {**os.environ, **self.env, "RAY_USAGE_STATS_ENABLED": "0", "LLMOPS_TEST_RAY_CLUSTER": str(self.root)}
        for i in range(self.nodes):
            ports = free_ports(len(_NODE_PORT_OPTIONS) + 2)
            # Ray's temp dir path must stay short (a Unix socket path lives under it).
            temp = self.root / f"n{i}"
            temp.mkdir(parents=True, exist_ok=True)
            cmd = [RAY, "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", str(self.cpus_per_node),
                   "--num-gpus", "0", "--temp-dir", str(temp), "--object-store-memory", str(OBJECT_STORE_BYTES),
                   "--disable-usage-stats", "--min-worker-port", str(20000 + 1000 * i),
                   "--max-worker-port", str(20999 + 1000 * i)]
            for option, port in zip(_NODE_PORT_OPTIONS, ports):
                cmd += [option, str(port)]
            if i == 0:
                cmd += ["--head", "--port", str(gcs_port), "--include-dashboard", "false",
                        "--ray-client-server-port", str(client_port)]
            else:
                cmd += ["--address", self.address]
            log = open(self.root / f"node{i}.log", "wb")
            self.procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, start_new_session=True))
            if i == 0:
                self._wait_for_nodes(1, timeout_s)
        self._wait_for_nodes(self.nodes, timeout_s)
        return self

    def _wait_for_nodes(self, n: int, timeout_s: float) -> None:
        probe = ("import ray, sys, logging; ray.init(address=sys.argv[1], logging_level=logging.ERROR, "
                 "log_to_driver=False); print(sum(1 for x in ray.nodes() if x['Alive']))")
        deadline = time.monotonic() + timeout_s
        while True:
            for i, p in enumerate(self.procs):
                if p.poll() is not None:
                    log = (self.root / f"node{i}.log").read_text(errors="replace")[-2000:]
                    self.stop()
                    raise RuntimeError(f"ray node {i} exited {p.returncode}:\n{log}")
            r = subprocess.run([sys.executable, "-c", probe, self.address], capture_output=True, text=True,
                               env={**os.environ, **self.env}, timeout=120)
            if r.returncode == 0 and r.stdout.strip().isdigit() and int(r.stdout.strip()) >= n:
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the local Ray cluster did not reach {n} nodes: {r.stderr[-2000:]}")
            time.sleep(1)

    def engine_processes(self) -> list:
        """This cluster's engine replicas and their vLLM processes that are still running."""
        import psutil

        found = []
        for proc in psutil.process_iter():
            try:
                title = " ".join(proc.cmdline())
                if ("EngineReplica" in title or "EngineCore" in title) and \
                        proc.environ().get("LLMOPS_TEST_RAY_CLUSTER") == str(self.root):
                    found.append(proc)
            except psutil.Error:
                continue
        return found

    def wait_for_engines_gone(self, timeout_s: float = 120) -> None:
        """Block until a finished or killed driver's engines have exited (each holds ~3.5 GB)."""
        deadline = time.monotonic() + timeout_s
        while (left := self.engine_processes()) and time.monotonic() < deadline:
            time.sleep(0.5)
        if left:
            raise RuntimeError(f"{len(left)} engine processes outlived their driver: {left}")

    def node_id(self, i: int) -> str | None:
        """Node `i`'s Ray node id (hex), as its raylet logged it; None before the raylet has started."""
        import re

        for log in (self.root / f"n{i}").glob("session_*/logs/raylet.out"):
            if found := re.search(r"Setting node ID node_id=([0-9a-f]+)", log.read_text(errors="replace")):
                return found.group(1)
        return None

    def kill_node(self, i: int) -> None:
        """SIGKILL node `i` and everything it started, as if its machine had died."""
        _kill_tree(self.procs[i].pid, signal.SIGKILL)
        self.procs[i].wait()

    def stop(self) -> None:
        """End every process these nodes started (worker nodes first), by pid."""
        for p in reversed(self.procs):
            if p.poll() is None:
                _kill_tree(p.pid, signal.SIGKILL)  # gcs_server ignores SIGTERM for about 20 s
            p.wait()

    def __enter__(self) -> LocalRayCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _kill_tree(pid: int, sig: int) -> None:
    import psutil

    try:
        root = psutil.Process(pid)
        tree = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for proc in tree:
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=30)
