"""`llmops serve`: plan the engine from the hardware, launch vLLM's OpenAI server, and own its lifecycle.

1. `plan_server` resolves the model, plans the engine and builds the exact command and environment.
2. `run_server` checks the port, starts vLLM in its own process group, tees its output to the terminal
   and a log file, waits for `/health`, reports the URL, logs a status line from vLLM's `/metrics` while it
   serves (`llmops.serve.status`), and on SIGINT/SIGTERM drains: `/ready` and new
   requests answer 503 at once (`llmops.serve.traffic`, loaded into vLLM), vLLM finishes the streams in flight
   (its `--shutdown-timeout`) and exits; a second signal or the end of `grace_period_s` kills the whole group,
   so no `VLLM::` process outlives it.

No Typer here; the CLI (`llmops.cli.serve`) is a thin layer over these functions.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import ipaddress
import math
import os
import shlex
import signal
import socket
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from llmops.errors import RuntimeFailure, UsageError
from llmops.plan import EnginePlan
from llmops.serve.config import ServeConfig
from llmops.serve.status import StatusLine
from llmops.serve.traffic import DRAIN_FILE_ENV, MAX_QUEUE_ENV, RETRY_AFTER_ENV

if TYPE_CHECKING:
    from llmops.hardware import GPU, ClusterNode

ENTRY_MODULE = "llmops.serve.vllm_entry"
MIDDLEWARE = "llmops.serve.traffic.TrafficMiddleware"
LOG_TAIL_LINES = 40
# Of the grace period, what vLLM needs after its drain to stop its processes and free the port; the streams in
# flight get the rest (its --shutdown-timeout). Measured on 2 cores: 6.7 s from the last stream's end to the
# exit (worker 2 s, engine core 3 s, HTTP server 1-2 s).
VLLM_TEARDOWN_S = 8


@dataclass(frozen=True)
class ServerPlan:
    """Everything `run_server` starts, fully resolved; `--dry-run` prints it."""

    served_model_name: str
    model_path: str
    """The local folder (or, in a dry run for a model not downloaded yet, its Hugging Face id)."""
    engine: EnginePlan
    command: list[str]
    env: dict[str, str] = field(repr=False)  # it may hold the API key
    """Variables set for vLLM on top of the inherited environment."""
    host: str
    port: int
    api_key: str | None = field(default=None, repr=False)
    adapters: dict[str, str] = field(default_factory=dict)
    """LoRA adapters served on the model: name -> folder."""
    nodes: list[NodeStep] = field(default_factory=list)
    """When the engine spans nodes: what to run on each before `command` (which runs on the head)."""

    @property
    def model_names(self) -> list[str]:
        """Every name a client may ask for: the adapters first (`serve ADAPTER` is about the adapter), then
        the base model."""
        return [*self.adapters, self.served_model_name]

    @property
    def url(self) -> str:
        """The base URL clients use (the OpenAI API lives under /v1)."""
        return f"http://{_connect_host(self.host)}:{self.port}"

    def to_dict(self) -> dict:
        env = {k: ("***" if k == "VLLM_API_KEY" else v) for k, v in self.env.items()}
        return {"served_model_name": self.served_model_name, "model_path": self.model_path,
                "adapters": self.adapters, "url": self.url + "/v1", "api_key": self.api_key is not None, "plan": self.engine.to_dict(),
                "command": redacted(self.command), "env": env,
                "nodes": [dataclasses.asdict(step) for step in self.nodes]}


@dataclass(frozen=True)
class NodeStep:
    """One node's part in serving across nodes: a command to run there, and why."""

    node: str
    command: str
    why: str


# Ray's default GCS port; the head's address is HEAD_IP:RAY_HEAD_PORT.
RAY_HEAD_PORT = 6379


def cluster_steps(engine: EnginePlan, nodes: tuple[ClusterNode, ...], ray_address: str | None) -> list[NodeStep]:
    """What each node runs before the head starts vLLM, for an engine that spans nodes (vLLM's multi-node
    recipe: a Ray cluster, then one `vllm serve` on the head). Empty for a single-node engine. A live cluster
    (`ray_address`) needs nothing more than its address."""
    if engine.distributed_executor_backend != "ray":
        return []
    if ray_address is not None:
        return [NodeStep(f"{len(nodes)} live Ray nodes", f"# already running: RAY_ADDRESS={ray_address}",
                         "vLLM's Ray executor joins this cluster and places one pipeline stage per node; "
                         "keep the cluster's RAY_AUTH_MODE and RAY_AUTH_TOKEN in the environment")]
    used = nodes[:engine.pipeline_parallel_size] if nodes else ()
    head_ip = (used[0].address if used and used[0].address else "HEAD_IP")
    # Ray 2.60 turns token auth on: every node and the vLLM process need the same token.
    auth = "RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$RAY_AUTH_TOKEN"
    steps = [NodeStep(_node_label(used, 0, "head (runs vLLM's API server)"),
                      f"{auth} VLLM_HOST_IP={head_ip} ray start --head --node-ip-address {head_ip} "
                      f"--port {RAY_HEAD_PORT}",
                      "create the token once (export RAY_AUTH_TOKEN=$(openssl rand -hex 16)) and use the same one "
                      "on every node; install the same llmops, vLLM and Ray on every node, and put the model at "
                      "the same path on each (or set HF_TOKEN); VLLM_HOST_IP: an address on a private network, "
                      "since vLLM's traffic between nodes is not encrypted")]
    for i in range(1, engine.pipeline_parallel_size):
        ip = used[i].address if i < len(used) and used[i].address else f"NODE{i}_IP"
        steps.append(NodeStep(_node_label(used, i, f"worker {i}"),
                              f"{auth} VLLM_HOST_IP={ip} ray start --address {head_ip}:{RAY_HEAD_PORT} "
                              f"--node-ip-address {ip}",
                              "joins the head; `ray status` on the head should then list "
                              f"{engine.pipeline_parallel_size} nodes"))
    return steps


def _node_label(nodes: tuple[ClusterNode, ...], i: int, role: str) -> str:
    return f"{role}: {nodes[i].name}" if i < len(nodes) and nodes[i].name else role


def ray_cluster_nodes(address: str, local_gpus: tuple[GPU, ...] = ()) -> tuple[ClusterNode, ...]:
    """The live nodes of the Ray cluster at `address` (the head first) as `ClusterNode`s. Ray counts a node's
    GPUs but not their memory: they are taken to be like this machine's (vLLM's recipe assumes alike nodes)."""
    from llmops.ray_cluster import connect
    from llmops.hardware import ClusterNode

    ray = connect(address)
    try:
        alive = [n for n in ray.nodes() if n.get("Alive")]
    finally:
        ray.shutdown()
    alive.sort(key=lambda n: ("node:__internal_head__" not in n.get("Resources", {}), n["NodeID"]))
    if not local_gpus and any(n.get("Resources", {}).get("GPU") for n in alive):
        raise UsageError("the Ray cluster has GPUs but this machine has none, and Ray does not report GPU memory",
                         "run this on a GPU node of the cluster (its head), or describe the cluster in "
                         "LLMOPS_HARDWARE (a `nodes` list, see `llmops hw --json`)")
    found = []
    for n in alive:
        res = n.get("Resources", {})
        gpus = tuple(dataclasses.replace(local_gpus[0], index=i) for i in range(int(res.get("GPU", 0))))
        found.append(ClusterNode(n.get("NodeName") or n["NodeID"][:12], int(res.get("CPU", 0)), gpus,
                                 int(res.get("memory", 0)), n.get("NodeManagerAddress", "")))
    return tuple(found)


def redacted(command: list[str]) -> list[str]:
    """`command` as it may be shown or logged: a key passed through to vLLM (`-- --api-key K`) becomes ***."""
    shown = list(command)
    for i, arg in enumerate(shown):
        if arg == "--api-key" and i + 1 < len(shown):
            shown[i + 1] = "***"
        elif arg.startswith("--api-key="):
            shown[i] = "--api-key=***"
    return shown


def check_access(config: ServeConfig) -> None:
    """Refuse to serve beyond this machine without an API key, unless the user says they mean it.

    Raises `UsageError` (exit 2) before anything is fetched or started: an open LLM server on a public
    address is free compute for anyone who finds it.
    """
    has_key = bool(config.api_key) or any(a == "--api-key" or a.startswith("--api-key=") for a in config.vllm_args)
    if has_key or config.allow_unauthenticated or _is_loopback(config.host):
        return
    raise UsageError(
        f"--host {config.host} accepts connections from other machines, and no API key is set",
        "set a key first: `export LLMOPS_API_KEY=$(openssl rand -hex 16)` (or api_key in the config file); "
        "clients then send it as a bearer token. Pass --allow-unauthenticated if an open server is what you want")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name may resolve to any address: treat it as reachable from outside
        return False


def plan_server(config: ServeConfig, *, download: bool = True, ray_address: str | None = None,
                progress: Callable[[str], None] = lambda msg: None, engines_on_machine: int = 1) -> ServerPlan:
    """Resolve the model, plan the engine for this hardware and build the vLLM command.

    With `download=False` (dry runs) nothing is fetched: a model that is not here yet is planned from its
    registry entry and named by its Hugging Face id in the command. `ray_address` plans for the nodes of that
    live Ray cluster (a model too large for one node is served across them) and points vLLM at it.
    `engines_on_machine`: copies of this engine that share this machine (`--replicas`), for their admission.
    """
    from llmops.hardware import detect
    from llmops.plan import model_facts, plan_admission
    from llmops.serve import conversations
    from llmops.registry import ensure_local, resolve_adapters
    from llmops.vllm_engine import as_cli_flags, engine_args, engine_env, lora_modules_flags, plan_for

    check_access(config)
    resolved, adapters = resolve_adapters(config.model, config.adapters)
    facts = model_facts(resolved)
    hw = detect()
    if ray_address is not None:
        hw = hw.with_cluster(ray_cluster_nodes(ray_address, hw.gpus))
    engine = plan_for(config.engine, facts, hw, "serve",
                      lora_ranks=tuple(a.spec.lora_rank or 16 for a in adapters))  # 16: PEFT's default r
    engine = plan_admission(engine, facts, hw, max_queue=config.max_queue, ttft_target_ms=config.ttft_target_ms,
                            engines_on_machine=engines_on_machine)
    if download:
        path = str(ensure_local(resolved, progress))
    else:
        local = resolved.local_path()
        path = str(local) if local is not None else (resolved.hf_id or resolved.spec.source)
    lora = {a.name: str(ensure_local(a)) if download else a.spec.source for a in adapters}
    name = config.served_model_name or resolved.name
    if name in lora:
        raise UsageError(f"the model and an adapter would both be served as {name!r}",
                         "give the model another name (--set served_model_name=NAME)")
    command = [sys.executable, "-m", ENTRY_MODULE, "serve", path, "--served-model-name", name,
               "--host", config.host, "--port", str(config.port),
               *as_cli_flags(engine_args(engine, path)), *lora_modules_flags(lora),
               "--shutdown-timeout", str(drain_timeout_s(config.grace_period_s)), "--middleware", MIDDLEWARE,
               *config.vllm_args]
    env = {**engine_env(engine), RETRY_AFTER_ENV: str(retry_after_s(config.ttft_target_ms))}
    if engine.max_num_queued_reqs:  # the middleware refuses what is beyond it before vLLM parses it
        env[MAX_QUEUE_ENV] = str(engine.max_num_queued_reqs)
    if ray_address is not None and engine.distributed_executor_backend == "ray":
        env["RAY_ADDRESS"] = ray_address  # vLLM's Ray executor joins the cluster named here
    env[conversations.ENV] = conversations.setting(config.state_dir and Path(config.state_dir),
                                                   config.conversation_ttl_s, config.max_stored_responses,
                                                   config.store, config.state_url)
    if config.api_key:
        # Through the environment rather than --api-key, so the key does not show in `ps`.
        env["VLLM_API_KEY"] = config.api_key
    return ServerPlan(name, path, engine, command, env, config.host, config.port, config.api_key, lora,
                      cluster_steps(engine, hw.nodes, ray_address))


def drain_timeout_s(grace_period_s: float) -> int:
    """vLLM's --shutdown-timeout (whole seconds; 0 aborts the streams in flight) for a grace period: the streams
    get the grace period less vLLM's teardown, or half of it when it is short."""
    return int(max(0.0, grace_period_s - min(VLLM_TEARDOWN_S, grace_period_s / 2)))


def retry_after_s(ttft_target_ms: float) -> int:
    """Retry-After on a refused request: by then the backlog admitted now has had its first tokens."""
    return max(1, math.ceil(ttft_target_ms / 1000))


def check_port_free(host: str, port: int) -> None:
    """Raise `UsageError` (exit 2) if something already listens on host:port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # Uvicorn binds with SO_REUSEADDR too, so a port held only by TIME_WAIT connections counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UsageError(f"port {port} on {host} is already in use",
                                 "stop whatever listens there, or pick another port with --port") from None
            raise UsageError(f"cannot listen on {host}:{port}: {e.strerror}",
                             "check --host (an address of this machine, or 0.0.0.0)") from None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def health_ok(url: str, timeout: float = 2.0, path: str = "/health") -> bool:
    """Whether `URL/health` (or `path`: `/ready`) answers 200 (it needs no API key)."""
    try:
        with urllib.request.urlopen(url + path, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def default_log_path(name: str) -> Path:
    from llmops.paths import logs_dir

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return logs_dir() / f"serve-{name.replace('/', '--')}-{stamp}.log"


class _Output:
    """Copies the child's output, line by line, to a log file (and to our stderr with -v); keeps the last
    lines, which a failure shows."""

    def __init__(self, stream, log_path: Path):
        from llmops.quiet import verbose

        self.tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self._echo = verbose()
        self._stream = stream
        self._log = open(log_path, "a", encoding="utf-8", errors="replace")
        self._thread = threading.Thread(target=self._copy, name="vllm-output", daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        for raw in iter(self._stream.readline, b""):
            line = raw.decode("utf-8", errors="replace")
            self.tail.append(line.rstrip("\n"))
            self._log.write(line)
            self._log.flush()
            if self._echo:
                sys.stderr.write(line)
                sys.stderr.flush()

    def close(self) -> None:
        self._thread.join(timeout=5)
        self._log.close()


def run_server(plan: ServerPlan, config: ServeConfig, *, log_path: Path | None = None,
               on_ready: Callable[[ServerPlan], None] = lambda plan: None,
               log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
               waiting: Callable[[str], object] | None = None) -> int:
    """Run vLLM until we get SIGINT/SIGTERM; returns 0 once it has stopped cleanly, 1 if it had to be killed.

    `waiting(message)` returns a context manager shown while the server starts (the CLI's spinner).
    Raises `RuntimeFailure` with the end of vLLM's log and a hint if vLLM dies on its own.
    """
    if plan.engine.device == "cpu" and plan.engine.pipeline_parallel_size > 1:
        from llmops.plan import CPU_ACROSS_NODES_UNSUPPORTED

        raise UsageError(CPU_ACROSS_NODES_UNSUPPORTED,
                         "serve on one node (leave engine.pipeline_parallel_size at auto or 1), or on GPU nodes; "
                         "--dry-run still prints the plan")
    check_port_free(plan.host, plan.port)
    log_path = log_path or default_log_path(plan.served_model_name)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log(f"llmops serve: logs in {log_path}")
    log("llmops serve: " + shlex.join(redacted(plan.command)))

    # The middleware in vLLM refuses new requests once this file exists (see llmops.serve.traffic).
    drain_file = Path(tempfile.mkdtemp(prefix="llmops-serve-")) / "draining"
    # Signals only set a flag from here on, so nothing interrupts us between starting vLLM and owning it.
    with _StopSignals() as stop:
        proc = subprocess.Popen(plan.command, env={**os.environ, "PYTHONUNBUFFERED": "1", **plan.env,
                                                   DRAIN_FILE_ENV: str(drain_file)},
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group, so we can signal all of vLLM
        output = _Output(proc.stdout, log_path)
        try:
            started = time.monotonic()
            with (waiting or _no_spinner)(f"starting vLLM for {plan.served_model_name} on {plan.url}"):
                ready = _wait_until_ready(proc, plan.url, stop, config.startup_timeout_s)
            if ready:
                log(f"llmops serve: ready in {time.monotonic() - started:.0f} s")
                on_ready(plan)
                status = StatusLine(plan.url, config.status_every_s, log, time.monotonic)
                while proc.poll() is None and not stop.requested:
                    stop.event.wait(0.5)
                    status.tick()
            elif proc.poll() is None and not stop.requested:
                log(f"llmops serve: /health did not answer within {config.startup_timeout_s:.0f} s; stopping")
                _stop_group(proc, config.shutdown_timeout_s, stop)
                raise RuntimeFailure(f"vLLM did not become ready within {config.startup_timeout_s:.0f} s "
                                     f"(log: {log_path})", "raise startup_timeout_s (--set startup_timeout_s=...)")
            if stop.requested and proc.poll() is None:
                if ready:
                    _drain(proc, drain_file, config.grace_period_s, stop, log)
                else:
                    log("llmops serve: shutting down")
                    _stop_group(proc, config.shutdown_timeout_s, stop)
            code = proc.wait()  # negative: killed by that signal
        finally:
            if proc.poll() is None:  # an unexpected error of ours: never leave vLLM behind
                _stop_group(proc, config.shutdown_timeout_s, stop)
            _kill_stragglers(proc.pid)
            output.close()
            shutil.rmtree(drain_file.parent, ignore_errors=True)
    if stop.requested:
        if code != 0:
            log(f"llmops serve: vLLM {_exit_text(code)} while stopping")
        return 0 if code == 0 else 1
    # vLLM's own exit codes mean nothing in llmops's contract (its 3 is not "does not fit"): a child that
    # dies is a runtime failure (1), or a usage error (2) when it rejected the flags passed through to it.
    if not ready:  # llmops's own "does not fit" (exit 3) when the log shows vLLM refusing its memory
        from llmops.vllm_engine import explain_engine_failure

        if (known := explain_engine_failure(RuntimeError(f"vLLM {_exit_text(code)}"), log_path, plan.engine)):
            raise known
    when = "before it was ready" if not ready else "while serving"
    hint = failure_hint(output.tail)
    failure = RuntimeFailure(f"vLLM {_exit_text(code)} {when}; the end of its log ({log_path}):\n"
                             + "\n".join("    " + line for line in output.tail), hint)
    if hint == REJECTED_FLAG_HINT:
        failure.exit_code = 2
    raise failure


def _wait_until_ready(proc: subprocess.Popen, url: str, stop: "_StopSignals", timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not stop.requested and time.monotonic() < deadline:
        if health_ok(url):
            return True
        stop.event.wait(0.5)
    return False


def _drain(proc: subprocess.Popen, drain_file: Path, grace_period_s: float, stop: "_StopSignals",
           log: Callable[[str], None]) -> None:
    """Stop serving without cutting a stream: readiness off and new requests refused at once (the middleware
    sees `drain_file`), then SIGTERM, on which vLLM finishes the streams in flight for up to its
    --shutdown-timeout and exits. A second signal, or the end of the grace period, kills it."""
    drain_file.touch()
    log(f"llmops serve: shutting down: /ready and new requests answer 503; the streams in flight have "
        f"{grace_period_s:.0f} s to finish (a second Ctrl+C or SIGTERM stops at once)")
    _stop_group(proc, grace_period_s, stop)


def _stop_group(proc: subprocess.Popen, timeout: float, stop: "_StopSignals") -> None:
    """SIGTERM to vLLM's API server, which stops its engine processes in order; SIGKILL to the whole process
    group if it has not exited after `timeout` (or on a second Ctrl+C)."""
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    first = stop.count
    while proc.poll() is None and time.monotonic() < deadline and stop.count <= max(first, 1):
        time.sleep(0.1)
    if proc.poll() is None:
        print("llmops serve: vLLM did not stop in time; killing it", file=sys.stderr)
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()


def _kill_stragglers(pgid: int, grace: float = 5.0) -> None:
    """After the server process has gone, give its children a moment to exit, then SIGKILL the rest."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _signal_group(pgid, 0):
            return
        time.sleep(0.1)
    _signal_group(pgid, signal.SIGKILL)


def _signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to a process group; False if the group no longer exists."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # only zombies left, or the ids were reused: nothing of ours to signal
        return False


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _connect_host(host: str) -> str:
    """Where a client on this machine connects for a server listening on `host`."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


REJECTED_FLAG_HINT = ("vLLM rejected a flag: check the flags after `--` against "
                      "`python -m llmops.serve.vllm_entry serve --help`")

# Common ways vLLM fails to start, recognised in the end of its log, and what to do about each.
_HINTS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("out of memory", "outofmemory", "cannot allocate memory", "insufficient memory", "larger than the available kv",
      "kv cache is needed", "to increase `gpu_memory_utilization`", "no available memory for the cache"),
     "out of memory: lower the max model length (--set engine.max_model_len=4096), use more tensor parallelism "
     "(--set engine.tensor_parallel_size=N), a smaller KV cache on the CPU (--set engine.cpu_kv_cache_gib=N), "
     "or a smaller model"),
    (("are not supported for now", "not supported for now", "unrecognized configuration class",
      "model architectures", "has no vllm implementation", "does not recognize this architecture"),
     "unknown architecture: this vLLM version cannot run this model; upgrade vLLM or pick a supported model"),
    (("repository not found", "does not appear to have a file named config.json", "no such file or directory",
      "is not a local folder and is not a valid model identifier", "401 client error", "gated repo"),
     "model not found: check the name or path (`llmops models list`), and HF_TOKEN for gated models"),
    (("unrecognized arguments", "invalid choice", "error: argument"), REJECTED_FLAG_HINT),
)


def failure_hint(lines) -> str:
    text = "\n".join(lines).lower()
    for needles, hint in _HINTS:
        if any(n in text for n in needles):
            return hint
    return "read the log above; rerun with --dry-run to see the exact command"


class _StopSignals:
    """While active, SIGINT and SIGTERM set `event` (counted) instead of raising, so shutdown is orderly."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.count = 0
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.event.is_set()

    def _handle(self, signum, frame) -> None:
        self.count += 1
        self.event.set()

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


class _no_spinner:
    def __init__(self, message: str):
        print(message, file=sys.stderr)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def ready_text(plan: ServerPlan) -> str:
    """What to show once the server answers: the URL, the model name, and examples to paste."""
    base = plan.url + "/v1"
    auth_header = ' -H "Authorization: Bearer $LLMOPS_API_KEY"' if plan.api_key else ""
    key = 'os.environ["LLMOPS_API_KEY"]' if plan.api_key else '"none"'
    model = plan.model_names[0]
    body = ('{"model": "%s", "messages": [{"role": "user", "content": "Hello!"}]}' % model)
    return "\n".join([
        f"Serving {', '.join(plan.model_names)} at {base}" + ("  (API key required)" if plan.api_key else ""),
        "",
        "  curl:",
        f"    curl {base}/chat/completions -H 'Content-Type: application/json'{auth_header} \\",
        f"      -d '{body}'",
        "  Python:",
        "    " + ("import os; " if plan.api_key else "") + "from openai import OpenAI",
        f"    client = OpenAI(base_url=\"{base}\", api_key={key}, max_retries=5)"
        "  # a busy server answers 503: the client waits its Retry-After and tries again",
        f"    print(client.chat.completions.create(model=\"{model}\", "
        "messages=[{\"role\": \"user\", \"content\": \"Hello!\"}]).choices[0].message.content)",
        "  Chat:",
        f"    llmops chat --url {plan.url}" + (" --api-key \"$LLMOPS_API_KEY\"" if plan.api_key else ""),
        "",
        "Press Ctrl+C to stop.",
    ])
