"""`llmops serve MODEL --ray ADDRESS` for a model that fits one node: one vLLM replica per Ray node as a Ray
Serve application behind one OpenAI endpoint; planning with fake nodes, then a real 2-node local cluster (1 CPU
each, token auth) with real vLLM, stopped by SIGTERM. `llmops serve MODEL --replicas N`: N engines on this
machine, each on its own cores, behind one endpoint on a Ray instance llmops starts and stops."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest

from llmops.plan import EnginePlan
from llmops.errors import DoesNotFitError
from llmops.serve.replicas import REPLICA_HEADER, node_command, plan_local, plan_on_ray, serves_replicas
from llmops.serve.server import ServerPlan
from tests.conftest import REPO

SMALL_ENGINE = ["--set", "engine.cpu_kv_cache_gib=1", "--set", "engine.enforce_eager=true"]


# --- planning (no cluster) ------------------------------------------------------------------------------


def _node(node_id, ip, cpus=1.0):
    return {"NodeID": node_id, "NodeManagerAddress": ip, "Alive": True, "Resources": {"CPU": cpus}}


def _server(**engine) -> ServerPlan:
    plan = EnginePlan(model="m", device="cpu", dtype="float32", tensor_parallel_size=1, data_parallel_size=1,
                      max_model_len=2048, enforce_eager=True, cpu_kv_cache_gib=1, max_num_queued_reqs=22, **engine)
    command = [sys.executable, "-m", "llmops.serve.vllm_entry", "serve", "/models/m", "--host", "0.0.0.0",
               "--port", "8000", "--api-key", "secret"]
    return ServerPlan("m", "/models/m", plan, command, {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_API_KEY": "k"},
                      "0.0.0.0", 8000, "k")


@pytest.mark.unit
def test_replicas_for_a_model_that_fits_a_node_and_pipeline_stages_for_one_that_does_not():
    assert serves_replicas(_server())
    assert not serves_replicas(_server(pipeline_parallel_size=2, distributed_executor_backend="ray"))


@pytest.mark.unit
def test_one_replica_per_node_with_its_own_cores_and_the_single_servers_command():
    # Two Ray nodes on one host: their proxies would take the same port (one on the head), and each replica
    # gets its share of the host's cores.
    placed = plan_on_ray(_server(), [_node("b" * 20, "127.0.0.1"), _node("a" * 20, "127.0.0.1")], "127.0.0.1:6379")
    assert [(r.rank, r.node_id[:1], r.host_slot, r.host_replicas) for r in placed.replicas] == [(0, "a", 0, 2),
                                                                                            (1, "b", 1, 2)]
    assert placed.proxy_location == "HeadOnly" and placed.app_name == "llmops-m"
    assert placed.ongoing_per_replica == 44  # vLLM's middleware refuses beyond 22, with Retry-After
    lines = dict(placed.replica_lines())
    assert "<share 1 of 2 of the host's cores>" in lines["replica 0"] and "OMP_NUM_THREADS=1" in lines["replica 0"]
    assert "VLLM_API_KEY=***" in lines["replica 0"] and "secret" not in lines["replica 0"]
    assert "--host 127.0.0.1 --port PORT" in lines["replica 1"]
    data = placed.to_dict()
    assert data["ray"]["replicas"][1]["node_ip"] == "127.0.0.1" and data["env"]["VLLM_API_KEY"] == "***"

    apart = plan_on_ray(_server(), [_node("a", "10.0.0.1", 8), _node("b", "10.0.0.2", 8)], "auto")
    assert apart.proxy_location == "EveryNode"
    assert "<share" not in dict(apart.replica_lines())["replica 0"]
    assert node_command(["x", "--host", "0.0.0.0", "--port", "8000"], "9") == ["x", "--host", "127.0.0.1",
                                                                               "--port", "9"]


@pytest.mark.unit
def test_min_and_max_replicas_autoscale_on_ongoing_requests():
    from llmops.serve.config import ServeConfig

    nodes = [_node("a", "10.0.0.1", 8), _node("b", "10.0.0.2", 8)]
    assert plan_on_ray(_server(), nodes, "auto", ServeConfig()).autoscaling is None  # fixed: one per node
    placed = plan_on_ray(_server(), nodes, "auto", ServeConfig(min_replicas=1, upscale_delay_s=5))
    assert placed.autoscaling == {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 1,
                                  "target_ongoing_requests": 11,  # half the admission limit of 22
                                  "upscale_delay_s": 5, "downscale_delay_s": 600}
    assert placed.scaling_text().startswith("1 to 2, at most one per node")
    assert "waits for a node" in plan_on_ray(_server(), nodes, "auto", ServeConfig(max_replicas=3)).scaling_text()
    with pytest.raises(ValueError, match=r"min_replicas \(3\) is more than max_replicas \(2\)"):
        ServeConfig(min_replicas=3, max_replicas=2)
    proc = subprocess.run([sys.executable, "-m", "llmops", "serve", "--max-replicas", "2", "--dry-run"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "add --ray ADDRESS" in proc.stderr, proc.stderr


@pytest.mark.unit
def test_an_open_host_without_a_key_is_refused_before_ray_is_reached():
    proc = subprocess.run([sys.executable, "-m", "llmops", "serve", "--ray", "127.0.0.1:1", "--host", "0.0.0.0",
                           "--dry-run"], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "LLMOPS_API_KEY"})
    assert proc.returncode == 2 and "no API key is set" in proc.stderr, proc.stderr


@pytest.mark.unit
def test_local_replicas_get_disjoint_cores_and_a_machine_without_room_exits_3_with_the_numbers():
    from tests.fake_hardware import cpu_only, gpus

    placed = plan_local(_server(), 2, cpu_only(24, cores=4), cores=[0, 1, 2, 3])
    assert placed.local and placed.proxy_location == "HeadOnly" and placed.autoscaling is None
    assert [(r.rank, r.cpus, r.host_slot, r.host_replicas) for r in placed.replicas] == [(0, 2.0, 0, 2),
                                                                                        (1, 2.0, 1, 2)]
    lines = dict(placed.replica_lines())  # the exact cores, as each replica binds them (the batch's split)
    assert "OMP_NUM_THREADS=2 VLLM_CPU_OMP_THREADS_BIND=0,1 " in lines["replica 0"]
    assert "VLLM_CPU_OMP_THREADS_BIND=2,3 " in lines["replica 1"] and "--port PORT" in lines["replica 1"]
    assert placed.scaling_text() == "2 on this machine, each on its own cores (fixed)"
    assert len(plan_local(_server(), "auto", cpu_only(24, cores=4), cores=[0, 1, 2, 3]).replicas) == 4
    # 24 GiB x 0.95 available, 4.3 GiB an engine (weights 0, engine 3, KV cache 1): memory holds 5, cores 4.
    with pytest.raises(DoesNotFitError, match=r"--replicas 5: this machine has room for 4 engine\(s\): 4 usable "
                                              r"cores, .* 22\.8 GiB of RAM available for 5, at 4\.0 GiB per engine"):
        plan_local(_server(), 5, cpu_only(24, cores=4), cores=[0, 1, 2, 3])
    with pytest.raises(DoesNotFitError, match="room for 1 engine"):  # 6 GiB: memory for one engine
        plan_local(_server(), 2, cpu_only(6, cores=4), cores=[0, 1, 2, 3])
    gpu = EnginePlan(model="m", device="cuda", dtype="bfloat16", tensor_parallel_size=2, data_parallel_size=1,
                     max_model_len=2048, enforce_eager=False)
    on_gpus = plan_local(ServerPlan("m", "/m", gpu, ["v", "--host", "h", "--port", "1"], {}, "h", 1, None), "auto",
                         gpus(8, 80))
    assert [r.gpus for r in on_gpus.replicas] == [2, 2, 2, 2]  # Ray gives each its own 2 GPUs

    cli = [sys.executable, "-m", "llmops", "serve", "smollm2-135m", "--dry-run", "--set", "engine.cpu_kv_cache_gib=1"]
    proc = subprocess.run([*cli, "--replicas", "999"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3 and "this machine has room for" in proc.stderr and "GiB" in proc.stderr, proc.stderr
    proc = subprocess.run([*cli, "--replicas", "auto", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    calls = [r["call"] for r in json.loads(proc.stdout)["ray"]["replicas"]]
    assert calls and all("llmops.serve.vllm_entry serve" in c for c in calls)
    if len(calls) > 1:
        bound = [set(c.split("VLLM_CPU_OMP_THREADS_BIND=")[1].split()[0].split(",")) for c in calls]
        assert all(not (a & b) for i, a in enumerate(bound) for b in bound[i + 1:]), bound
    proc = subprocess.run([*cli, "--replicas", "2", "--ray", "auto"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "give one of them" in proc.stderr, proc.stderr


@contextlib.contextmanager
def _serving(cmd: list[str], env: dict[str, str], stderr):
    """`llmops serve ... --json` in its own session: yields it and its ready line (indented JSON, printed once
    Serve reports the application running; a failure with its stderr after 240 s); killed if still running."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=stderr.open("w"), text=True,
                            start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        text, deadline = "", time.monotonic() + 240
        while not text.endswith("}\n"):
            try:
                text += lines.get(timeout=max(1.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"not ready within 240 s: {text}{stderr.read_text()}")
        yield proc, json.loads(text)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _sigterm_deletes_the_app(proc: subprocess.Popen, stderr) -> None:
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=90) == 0, stderr.read_text()
    assert "shutting down: deleting llmops-smollm2-135m" in stderr.read_text()


def _replicas_answering(client, max_tokens: int) -> set[str]:
    """The replicas (x-llmops-replica) that answer a few greedy requests: Serve picks the less busy of two
    replicas at random, so both answer soon."""
    seen: set[str] = set()
    for _ in range(30):
        raw = client.chat.completions.with_raw_response.create(
            model="smollm2-135m", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=max_tokens, temperature=0)
        assert "Paris" in raw.parse().choices[0].message.content
        seen.add(raw.headers[REPLICA_HEADER])
        if len(seen) == 2:
            break
    return seen


# --- a live Ray cluster (2 nodes of 1 CPU on this host) ----------------------------------------------------


@pytest.fixture()
def ray_cluster():
    """A cluster of each test's own: a test may kill a node for good."""
    pytest.importorskip("ray.serve")
    from tests.ray_cluster import LocalRayCluster

    with LocalRayCluster(cpus_per_node=1, nodes=2) as c:
        yield c


def _ours(cluster) -> list:
    """This cluster's Serve replicas of llmops and the vLLM processes they started, still running."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            title = " ".join(proc.cmdline())
            if ("VLLM::" in title or "llmops.serve.vllm_entry" in title or "ServeReplica:llmops-" in title) \
                    and proc.environ().get("LLMOPS_TEST_RAY_CLUSTER") == str(cluster.root):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _replica_metrics(base_url: str) -> dict[str, int]:
    """Replicas by state, from the endpoint's /metrics (vLLM's, with llmops's replica states after them)."""
    import httpx

    from llmops.serve.replicas import REPLICAS_METRIC

    text = httpx.get(base_url.removesuffix("/v1") + "/metrics", timeout=30).text
    return {line.split('state="')[1].split('"')[0]: int(float(line.rsplit(" ", 1)[1]))
            for line in text.splitlines() if line.startswith(REPLICAS_METRIC + "{")}


def _load_until(client, stop: threading.Event, outcomes: list, max_tokens: int = 32) -> None:
    """One client of a bounded load: greedy requests, each with a timeout (the client's), until `stop`; each
    outcome (when it ended, what came back) in `outcomes`."""
    import openai

    while not stop.is_set():
        try:
            raw = client.chat.completions.with_raw_response.create(
                model="smollm2-135m", messages=[{"role": "user", "content": "Tell me about France."}],
                max_tokens=max_tokens, temperature=0)
            outcomes.append((time.monotonic(), "ok", raw.headers[REPLICA_HEADER]))
        except openai.APITimeoutError:
            outcomes.append((time.monotonic(), "timeout", None))
        except openai.APIStatusError as e:
            outcomes.append((time.monotonic(), "status", e.status_code))
            time.sleep(0.2)
        except openai.APIConnectionError as e:
            outcomes.append((time.monotonic(), "connection", str(e)))
            time.sleep(0.2)


@pytest.mark.ray
@pytest.mark.engine
def test_two_replicas_on_two_nodes_keep_sessions_survive_a_lost_node_and_sigterm_deletes_the_app(
        ray_cluster, default_model_dir, tmp_path):
    from openai import OpenAI

    from llmops.serve.replicas import SESSION_HEADER
    from llmops.serve.server import free_port

    port = free_port()
    dry = subprocess.run([sys.executable, "-m", "llmops", "serve", "smollm2-135m", "--ray", ray_cluster.address,
                          "--dry-run", "--json", *SMALL_ENGINE], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **ray_cluster.env})
    assert dry.returncode == 0, dry.stderr
    placed = json.loads(dry.stdout)["ray"]
    assert [(r["rank"], r["cpus"]) for r in placed["replicas"]] == [(0, 1.0), (1, 1.0)]
    assert placed["proxy_location"] == "HeadOnly"  # both nodes are 127.0.0.1: one proxy, on the head
    assert all("VLLM_CPU_KVCACHE_SPACE=1" in r["call"] for r in placed["replicas"])

    cmd = [sys.executable, "-m", "llmops", "serve", "smollm2-135m", "--ray", ray_cluster.address, "--port",
           str(port), "--json", "--grace-period", "10", *SMALL_ENGINE]
    stderr = tmp_path / "stderr.txt"
    with _serving(cmd, {**os.environ, **ray_cluster.env}, stderr) as (proc, ready):
        assert ready["url"] == f"http://127.0.0.1:{port}/v1" and ready["served_model_name"] == "smollm2-135m"
        client = OpenAI(base_url=ready["url"], api_key="none", max_retries=0, timeout=60)
        seen = _replicas_answering(client, max_tokens=8)
        assert len(seen) == 2, seen
        assert len({label.split("@")[1] for label in seen}) == 2  # one replica on each node
        raw = client.chat.completions.with_raw_response.create(
            model="smollm2-135m", messages=[{"role": "user", "content": "Count to five."}], max_tokens=12, stream=True)
        chunks = [c for c in raw.parse() if c.choices and c.choices[0].delta.content]  # forwarded as they come
        assert len(chunks) > 1 and raw.headers[REPLICA_HEADER] in seen

        # A conversation's turns (one session header) go to one replica; 12 conversations use both.
        by_session: dict[str, set[str]] = {}
        for turn in range(2):
            for s in range(12):
                raw = client.chat.completions.with_raw_response.create(
                    model="smollm2-135m", messages=[{"role": "user", "content": f"Say {s}."}], max_tokens=1,
                    extra_headers={SESSION_HEADER: f"conversation-{s}"})
                by_session.setdefault(f"conversation-{s}", set()).add(raw.headers[REPLICA_HEADER])
        assert all(len(replicas) == 1 for replicas in by_session.values()), by_session
        assert set().union(*by_session.values()) == seen, by_session
        assert _replica_metrics(ready["url"]).get("RUNNING") == 2

        servers = [p for p in _ours(ray_cluster) if "llmops.serve.vllm_entry" in " ".join(p.cmdline())]
        assert len(servers) == 2  # what must be gone after the stop: one vLLM server per replica

        # The worker node dies (its raylet, the replica and its vLLM) under a bounded load of 2 clients.
        lost = next(label for label in seen if label.split("@")[1] == placed["replicas"][1]["node_id"][:12])
        stop, outcomes = threading.Event(), []
        loaders = [threading.Thread(target=_load_until, args=(OpenAI(base_url=ready["url"], api_key="none",
                                                                     max_retries=0, timeout=60), stop, outcomes))
                   for _ in range(2)]
        for t in loaders:
            t.start()
        deadline = time.monotonic() + 120
        while not any(o[2] == lost for o in outcomes) and time.monotonic() < deadline:
            time.sleep(0.2)
        killed_at = time.monotonic()
        ray_cluster.kill_node(1)
        while sum(o[0] > killed_at and o[1] == "ok" for o in outcomes) < 6 and time.monotonic() < deadline + 60:
            time.sleep(0.5)
        stop.set()
        for t in loaders:
            t.join(timeout=90)
        assert not any(t.is_alive() for t in loaders), "a request hung past its timeout"
        after = [o for o in outcomes if o[0] > killed_at]
        assert sum(o[1] == "ok" for o in after) >= 6, after  # the endpoint keeps answering, from node 0
        assert not [o for o in after if o[1] == "timeout"], after  # nothing hangs
        # A request in flight on the lost replica: Serve's proxy answers 500 (its replica died: RayActorError)
        # or the replica 503; the OpenAI clients retry both (5xx), and the retry goes to the live replica.
        failed = [o for o in after if o[1] != "ok"]
        assert all(o[1] == "status" and o[2] in (500, 503) for o in failed), failed

        # The lost replica cannot come back (one per node, one node left): it waits for a node, and says so
        # on /metrics and on stderr.
        # (The driver polls Serve every 2 s: its line may come after /metrics shows the change, or before.)
        def reported() -> bool:
            after_ready = stderr.read_text().partition("application RUNNING: replicas 2 RUNNING")[2]
            return "replicas 1 RUNNING, 1 STARTING" in after_ready

        deadline = time.monotonic() + 90
        while (states := _replica_metrics(ready["url"])).get("RUNNING") != 1 or not states.get("STARTING") \
                or not reported():
            assert time.monotonic() < deadline, (states, stderr.read_text())
            time.sleep(1)
        _sigterm_deletes_the_app(proc, stderr)
    # The application is gone (Serve too: llmops started it and nothing else runs on it), the cluster is not.
    probe = ("import ray, sys, logging; ray.init(address=sys.argv[1], logging_level=logging.ERROR, "
             "log_to_driver=False); from ray import serve; from ray.serve._private.constants import *; "
             "print(sum(n['Alive'] for n in ray.nodes()), "
             "[a['name'] for a in ray.util.list_named_actors(all_namespaces=True)])")
    state = subprocess.run([sys.executable, "-c", probe, ray_cluster.address], capture_output=True, text=True,
                           env={**os.environ, **ray_cluster.env}, timeout=120)
    assert state.returncode == 0, state.stderr
    alive, actors = state.stdout.split(" ", 1)
    assert alive == "1" and "SERVE" not in actors and "llmops" not in actors, state.stdout
    assert not _group_alive(proc.pid)
    deadline = time.monotonic() + 30
    while (left := _ours(ray_cluster)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, [" ".join(p.cmdline()) for p in left]


@pytest.mark.ray
@pytest.mark.engine
def test_min_1_max_2_replicas_scale_up_under_load_and_back_down_after_it(ray_cluster, default_model_dir, tmp_path):
    from openai import OpenAI

    from llmops.serve.server import free_port

    # --max-queue 4: Serve's target is 2 requests in flight per replica; 6 clients are well past it.
    cmd = [sys.executable, "-m", "llmops", "serve", "smollm2-135m", "--ray", ray_cluster.address, "--port",
           str(free_port()), "--json", "--grace-period", "5", "--min-replicas", "1", "--max-replicas", "2",
           "--max-queue", "4", "--set", "upscale_delay_s=1", "--set", "downscale_delay_s=5", *SMALL_ENGINE]
    stderr = tmp_path / "stderr.txt"
    with _serving(cmd, {**os.environ, **ray_cluster.env}, stderr) as (proc, ready):
        assert _replica_metrics(ready["url"]).get("RUNNING") == 1
        stop, outcomes = threading.Event(), []
        loaders = [threading.Thread(target=_load_until, args=(OpenAI(base_url=ready["url"], api_key="none",
                                                                     max_retries=0, timeout=120), stop, outcomes),
                                    kwargs={"max_tokens": 48}) for _ in range(6)]
        for t in loaders:
            t.start()
        try:
            deadline = time.monotonic() + 240
            while _replica_metrics(ready["url"]).get("RUNNING") != 2 and time.monotonic() < deadline:
                time.sleep(1)
            grown = time.monotonic()
            while len({o[2] for o in outcomes if o[1] == "ok"}) < 2 and time.monotonic() < grown + 60:
                time.sleep(0.5)
        finally:
            stop.set()
            for t in loaders:
                t.join(timeout=150)
        answered_by = {o[2] for o in outcomes if o[1] == "ok"}
        assert len(answered_by) == 2, (answered_by, stderr.read_text())  # the new replica took requests
        assert all(o[1] == "ok" or (o[1] == "status" and o[2] == 503) for o in outcomes), outcomes
        deadline = time.monotonic() + 120  # idle: after downscale_delay_s, back to min_replicas
        while (states := _replica_metrics(ready["url"])).get("RUNNING") != 1 or states.get("STOPPING"):
            assert time.monotonic() < deadline, (states, stderr.read_text())
            time.sleep(1)
        said = stderr.read_text()
        up, down = said.find("replicas 2 RUNNING"), said.rfind("replicas 1 RUNNING")
        assert 0 <= up < down, said  # stderr followed the replicas up and back down
        _sigterm_deletes_the_app(proc, stderr)


# --- replicas on this machine (a Ray instance that llmops starts) ------------------------------------------


def _started_by(marker: str) -> list:
    """Processes whose environment carries `marker`: the llmops under test and all it started (Ray's, vLLM's)."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("LLMOPS_TEST_LOCAL_REPLICAS") == marker:
                found.append(proc)
        except psutil.Error:
            continue
    return found


@pytest.mark.ray
@pytest.mark.engine
def test_two_local_replicas_on_disjoint_cores_answer_through_one_endpoint_and_sigterm_stops_all(default_model_dir,
                                                                                               tmp_path):
    pytest.importorskip("ray.serve")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("two replicas need two cores")
    from openai import OpenAI

    from llmops.serve.server import free_port

    marker = str(tmp_path)
    cmd = [sys.executable, "-m", "llmops", "serve", "smollm2-135m", "--replicas", "2", "--port", str(free_port()),
           "--json", "--grace-period", "5", *SMALL_ENGINE]
    stderr = tmp_path / "stderr.txt"
    with _serving(cmd, {**os.environ, "LLMOPS_TEST_LOCAL_REPLICAS": marker}, stderr) as (proc, ready):
        client = OpenAI(base_url=ready["url"], api_key="none", max_retries=0, timeout=60)
        seen = _replicas_answering(client, max_tokens=8)
        assert {label.split("@")[0] for label in seen} == {"0", "1"}, seen  # two replicas behind one port
        servers = [p for p in _started_by(marker) if "llmops.serve.vllm_entry" in " ".join(p.cmdline())]
        bound = sorted(p.environ().get("VLLM_CPU_OMP_THREADS_BIND") for p in servers)
        cores = sorted(os.sched_getaffinity(0))
        assert bound == [",".join(map(str, cores[:len(cores) // 2])), ",".join(map(str, cores[len(cores) // 2:]))]
        _sigterm_deletes_the_app(proc, stderr)
    # Nothing llmops started lives on: no VLLM:: process, no replica, no Ray process of its instance.
    deadline = time.monotonic() + 30
    while (left := _started_by(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, [" ".join(p.cmdline()) for p in left]
