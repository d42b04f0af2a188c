"""The planner: from a model's shape and the hardware, decide what each workload runs with.

Every "auto" in a workload config is resolved here, separately from validation, and each decision carries
a note that says why, so `--dry-run` and `llmops hw` can show the reasoning. A model that cannot fit raises
`DoesNotFitError` (exit 3) with the numbers and what would make it fit.

Memory model (deliberately simple, and on the safe side):
- weights: parameters x bytes per parameter of the dtype;
- KV cache: 2 (K and V) x layers x KV heads x head dim x dtype bytes, per token;
- a fixed overhead per engine for activations, CUDA graphs and the runtime.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from llmops.errors import DoesNotFitError, UsageError
from llmops.hardware import GIB, Hardware
from llmops.registry import ModelShape, ResolvedModel, read_model_config, shape_from_config

Dtype = Literal["float32", "bfloat16", "float16"]
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# vLLM on a GPU reserves this fraction of the card for weights + KV cache + activations.
DEFAULT_GPU_MEMORY_UTILIZATION = 0.90
# Activations, CUDA graphs and the CUDA context on each GPU, outside the KV cache.
GPU_ENGINE_OVERHEAD_BYTES = int(2.0 * GIB)
# On the CPU vLLM runs three processes (API server, EngineCore, worker): about 3 GiB beside the weights
# for a small model (measured: 0.75 + 0.65 + 1.7 GB with SmolLM2-135M).
CPU_ENGINE_OVERHEAD_BYTES = int(3.0 * GIB)
# The KV cache should hold at least this many tokens (or the whole context, if shorter) to be useful.
MIN_USEFUL_MODEL_LEN = 2048
# Never reserve more KV cache than this on the CPU by default: more only helps very long batches.
MAX_AUTO_CPU_KV_CACHE_GIB = 8
# vLLM's engine processes take about 1.1 GiB of the NUMA node's memory beside the weights before the KV cache
# is allocated (measured with SmolLM2-135M: node 0's available memory fell 2.1 GiB with a 1 GiB cache).
CPU_ENGINE_NODE_BYTES = int(1.5 * GIB)
# A NUMA node's memory moves on VMs (node 0 grew 8.6 -> 9.1 GiB during one start; 3.7-17 GiB over a day),
# and the page cache other processes use counts as available: keep this fraction of the node free.
CPU_NODE_MARGIN = 0.10
# vLLM's own defaults on the CPU (vllm/engine/arg_utils.py, `_get_default_max_num_seqs...`): 256 sequences
# for `vllm.LLM`, 128 for the OpenAI server.
CPU_DEFAULT_MAX_NUM_SEQS = {"batch": 256, "serve": 128}
# A batch job's prompt + completion length when the caller does not say (row lengths are not known).
DEFAULT_BATCH_TOKENS_PER_ROW = 1024
# Streams a CPU server plans a full-context KV cache for: past a few per core, latency, not the cache, limits.
SERVE_STREAMS_PER_CORE = 8


@dataclass(frozen=True)
class ModelFacts:
    """What the planner knows about a model, without loading its weights."""

    name: str
    params: int
    context_length: int
    shape: ModelShape

    def weight_bytes(self, dtype: str) -> int:
        return self.params * DTYPE_BYTES[dtype]

    def kv_bytes_per_token(self, dtype: str) -> int:
        s = self.shape
        return 2 * s.num_layers * s.num_kv_heads * s.head_dim * DTYPE_BYTES[dtype]


def estimate_params(shape: ModelShape) -> int:
    """Parameter count of a decoder-only transformer from its config (embeddings, attention, MLP, norms)."""
    h, kv = shape.hidden_size, shape.num_kv_heads * shape.head_dim
    q = shape.num_attention_heads * shape.head_dim
    inter = shape.intermediate_size or 4 * h
    attention = h * q + 2 * h * kv + q * h
    mlp = 3 * h * inter  # gated MLP (gate, up, down), the common case today
    embeddings = shape.vocab_size * h * (1 if shape.tie_word_embeddings else 2)
    return shape.num_layers * (attention + mlp + 2 * h) + embeddings + h


def model_facts(resolved: ResolvedModel) -> ModelFacts:
    """Shape from the local `config.json` when present, else from the registry entry."""
    spec = resolved.spec
    config = read_model_config(resolved)
    if config is not None:
        try:
            shape = shape_from_config(config)
        except KeyError as e:
            raise UsageError(f"{resolved.name}: config.json lacks {e}; llmops cannot plan for this architecture")
        text = config.get("text_config", config)
        context = spec.context_length or text.get("max_position_embeddings") or 2048
    elif spec.shape is not None:
        shape, context = spec.shape, spec.context_length or 2048
    else:
        raise UsageError(f"llmops does not know the size of {resolved.name} yet",
                         f"download it first: `llmops models pull {resolved.name}`")
    return ModelFacts(resolved.name, spec.params or estimate_params(shape), context, shape)


# --- vLLM (serve and batch) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class EnginePlan:
    """Everything vLLM is started with, fully resolved. `notes` says why each choice was made."""

    model: str
    device: Literal["cuda", "cpu"]
    dtype: Dtype
    tensor_parallel_size: int
    data_parallel_size: int
    """Independent engines, one per group of `tensor_parallel_size` GPUs (offline batch only)."""
    max_model_len: int
    enforce_eager: bool
    gpu_memory_utilization: float | None = None
    cpu_kv_cache_gib: int | None = None
    """VLLM_CPU_KVCACHE_SPACE, in whole GiB."""
    weights_gib: float = 0.0
    kv_cache_tokens: int = 0
    """How many tokens the KV cache holds (per engine)."""
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def plan_engine(
    facts: ModelFacts,
    hw: Hardware,
    *,
    workload: Literal["serve", "batch"],
    device: str = "auto",
    dtype: str = "auto",
    tensor_parallel_size: int | str = "auto",
    data_parallel_size: int | str = "auto",
    max_model_len: int | str = "auto",
    gpu_memory_utilization: float | str = "auto",
    cpu_kv_cache_gib: int | str = "auto",
    enforce_eager: bool | str = "auto",
    tokens_per_row: int | None = None,
) -> EnginePlan:
    notes: list[str] = []
    use_gpu = hw.has_gpu if device == "auto" else device == "cuda"
    if use_gpu and not hw.has_gpu:
        raise DoesNotFitError("device: cuda was asked for, but no NVIDIA GPU is visible here",
                              "run on a GPU machine, or leave device at auto to run on the CPU")

    # 1. dtype: bf16 where the hardware computes in it natively, else fp16 on old GPUs, fp32 on CPUs.
    if dtype == "auto":
        if use_gpu:
            dtype = "bfloat16" if all(g.supports_bf16 for g in hw.gpus) else "float16"
            notes.append(f"dtype {dtype}: " + ("the GPUs compute in bf16" if dtype == "bfloat16"
                                               else "a GPU older than Ampere has no bf16"))
        elif hw.cpu.has_native_bf16:
            dtype = "bfloat16"
            notes.append("dtype bfloat16: this CPU has AVX512-BF16/AMX")
        else:
            dtype = "float32"
            notes.append("dtype float32: this CPU has no native bf16 (emulated bf16 measured ~6x slower)")

    # 2. compilation: CUDA graphs pay off on a GPU; on the CPU torch.compile adds ~90 s of start-up for 0-8%.
    if enforce_eager == "auto":
        enforce_eager = not use_gpu
        if not use_gpu:
            notes.append("enforce_eager: compiling on the CPU costs ~90 s at start-up for <8% throughput")

    weights = facts.weight_bytes(dtype)
    kv_per_token = facts.kv_bytes_per_token(dtype)
    wanted_len = facts.context_length if max_model_len == "auto" else int(max_model_len)
    if wanted_len > facts.context_length:
        raise UsageError(f"max_model_len {wanted_len} is longer than {facts.name}'s context of "
                         f"{facts.context_length} tokens", f"use at most {facts.context_length}")
    min_len = min(wanted_len, MIN_USEFUL_MODEL_LEN)

    if use_gpu:
        return _plan_gpu(facts, hw, workload, dtype, weights, kv_per_token, wanted_len, min_len,
                         tensor_parallel_size, data_parallel_size, gpu_memory_utilization, enforce_eager, notes)
    return _plan_cpu(facts, hw, workload, dtype, weights, kv_per_token, wanted_len, min_len, max_model_len,
                     cpu_kv_cache_gib, enforce_eager, notes, tokens_per_row)


def _plan_cpu(facts, hw, workload, dtype, weights, kv_per_token, wanted_len, min_len, max_model_len,
              cpu_kv_cache_gib, enforce_eager, notes, tokens_per_row=None) -> EnginePlan:
    if cpu_kv_cache_gib == "auto":
        kv_gib = _auto_cpu_kv_gib(facts, hw, workload, dtype, weights, kv_per_token, wanted_len, min_len, notes,
                                  tokens_per_row)
    else:
        kv_gib = int(cpu_kv_cache_gib)
        node = hw.engine_numa_node
        if node is not None and kv_gib * GIB + weights > node.memory_available_bytes:
            raise DoesNotFitError(
                f"a CPU KV cache of {kv_gib} GiB does not fit on NUMA node {node.index}, where vLLM allocates "
                f"it: the node has {node.memory_available_bytes / GIB:.1f} GiB available (of "
                f"{node.memory_total_bytes / GIB:.1f} GiB) and the weights take {weights / GIB:.1f} GiB",
                "lower engine.cpu_kv_cache_gib (--set engine.cpu_kv_cache_gib=N) or leave it at auto")
    need = weights + CPU_ENGINE_OVERHEAD_BYTES + kv_gib * GIB
    if need > hw.ram.available_bytes or kv_gib <= 0:
        raise DoesNotFitError(
            f"{facts.name} does not fit in this machine's memory: needs {need / GIB:.1f} GiB "
            f"(weights {weights / GIB:.1f} GiB in {dtype}, KV cache {kv_gib:.2f} GiB, engine "
            f"{CPU_ENGINE_OVERHEAD_BYTES / GIB:.0f} GiB), has {hw.ram.available_bytes / GIB:.1f} GiB available",
            "use a smaller model, a smaller kv cache (--set engine.cpu_kv_cache_gib=...), or a GPU machine")
    kv_tokens = int(kv_gib * GIB // kv_per_token)
    max_len = _fit_len(wanted_len, kv_tokens, max_model_len, facts, kv_gib, "cpu_kv_cache_gib")
    if max_len < wanted_len:
        notes.append(f"max_model_len {max_len}: the KV cache holds {kv_tokens} tokens")
    return EnginePlan(facts.name, "cpu", dtype, 1, 1, max_len, bool(enforce_eager), None, kv_gib,
                      round(weights / GIB, 3), kv_tokens, tuple(notes))


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


def _auto_cpu_kv_gib(facts, hw, workload, dtype, weights, kv_per_token, wanted_len, min_len, notes,
                     tokens_per_row) -> int:
    """Whole GiB (vLLM takes VLLM_CPU_KVCACHE_SPACE in GiB): what the workload can use, within the room.
    Allocating costs start-up time (measured ~1.5 s per GiB: 27 s with 2 GiB, 39 s with 8 GiB)."""
    room, room_why = cpu_kv_room_bytes(hw, weights)
    if workload == "batch":
        # The running sequences are all the cache serves in a batch; more only costs start-up time.
        seq_len = min(wanted_len, tokens_per_row or DEFAULT_BATCH_TOKENS_PER_ROW)
        seqs = CPU_DEFAULT_MAX_NUM_SEQS["batch"]
        use = seqs * seq_len * kv_per_token
        use_why = (f"{seqs} sequences at once x {seq_len} tokens"
                   + ("" if tokens_per_row else " (a guess: the job's row lengths are not known)"))
    else:
        streams = min(CPU_DEFAULT_MAX_NUM_SEQS["serve"], SERVE_STREAMS_PER_CORE * hw.cpu.usable_cores)
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
    limit = ("what the workload can use: " + use_why if kv_gib == use_gib
             else "the memory there is room for: " + room_why if kv_gib == fits
             else f"at most {MAX_AUTO_CPU_KV_CACHE_GIB} GiB by default")
    notes.append(f"CPU KV cache {kv_gib} GiB: {limit}")
    return kv_gib


def _plan_gpu(facts, hw, workload, dtype, weights, kv_per_token, wanted_len, min_len,
              tensor_parallel_size, data_parallel_size, gpu_memory_utilization, enforce_eager, notes):
    util = DEFAULT_GPU_MEMORY_UTILIZATION if gpu_memory_utilization == "auto" else float(gpu_memory_utilization)
    per_gpu = min(g.memory_total_bytes for g in hw.gpus)
    budget = per_gpu * util - GPU_ENGINE_OVERHEAD_BYTES
    heads = facts.shape.num_attention_heads

    def kv_tokens(tp: int) -> int:
        # Each GPU holds 1/tp of the weights and of every KV head (vLLM replicates KV heads when tp > heads).
        spare = budget - weights / tp
        per_token = kv_per_token / min(tp, facts.shape.num_kv_heads)
        return int(spare // per_token) if spare > 0 else 0

    candidates = [tp for tp in (1, 2, 4, 8, 16, 32) if tp <= len(hw.gpus) and heads % tp == 0]
    if tensor_parallel_size == "auto":
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
        notes.append(f"tensor_parallel_size {tp}: the smallest that fits the weights "
                     f"({weights / GIB:.1f} GiB) and a {min_len}-token KV cache")
    else:
        tp = int(tensor_parallel_size)
        if tp > len(hw.gpus):
            raise DoesNotFitError(f"tensor_parallel_size {tp} needs {tp} GPUs, this machine has {len(hw.gpus)}")
        if heads % tp:
            raise UsageError(f"tensor_parallel_size {tp} does not divide {facts.name}'s {heads} attention heads")
        if kv_tokens(tp) < min_len:
            raise DoesNotFitError(
                f"{facts.name} does not fit at tensor_parallel_size {tp}: weights need "
                f"{weights / tp / GIB:.1f} GiB per GPU, {budget / GIB:.1f} GiB usable",
                "raise tensor_parallel_size or leave it at auto")
    if workload == "batch":
        dp = len(hw.gpus) // tp if data_parallel_size == "auto" else int(data_parallel_size)
        if dp * tp > len(hw.gpus):
            raise DoesNotFitError(f"data_parallel_size {dp} x tensor_parallel_size {tp} needs {dp * tp} GPUs, "
                                  f"this machine has {len(hw.gpus)}")
        if dp > 1:
            notes.append(f"data_parallel_size {dp}: one engine per {tp} GPU(s); vLLM has no offline data "
                         "parallelism, so llmops runs one engine process per GPU group")
    else:
        dp = 1
    tokens = kv_tokens(tp)
    max_len = _fit_len(wanted_len, tokens, "auto", facts, None, "max_model_len")
    if max_len < wanted_len:
        notes.append(f"max_model_len {max_len}: the KV cache holds {tokens} tokens per engine")
    return EnginePlan(facts.name, "cuda", dtype, tp, dp, max_len, bool(enforce_eager), util, None,
                      round(weights / GIB, 3), tokens, tuple(notes))


def _fit_len(wanted_len: int, kv_tokens: int, explicit: int | str, facts: ModelFacts, kv_gib, knob) -> int:
    if kv_tokens >= wanted_len:
        return wanted_len
    if explicit != "auto":
        raise DoesNotFitError(
            f"max_model_len {wanted_len} needs a KV cache of {wanted_len} tokens; "
            f"the planned cache holds {kv_tokens}", f"lower max_model_len or raise {knob}")
    return max(256, (kv_tokens // 256) * 256)


# --- training -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainPlan:
    device: Literal["cuda", "cpu"]
    num_processes: int
    precision: Literal["bf16", "fp16", "fp32"]
    method: Literal["full", "lora", "qlora"]
    strategy: Literal["none", "ddp", "fsdp", "deepspeed"]
    memory_per_device_gib: float
    """Estimated peak memory per process (weights, gradients, optimizer, activations)."""
    memory_available_gib: float
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def training_memory_bytes(facts: ModelFacts, method: str, precision: str, shards: int, micro_batch: int,
                          seq_len: int, gradient_checkpointing: bool) -> int:
    """Peak bytes per device. Full: fp32 master weights + grads + two Adam moments = 16 B/param (sharded by
    FSDP/ZeRO); LoRA: frozen weights in the compute dtype, adapters negligible; QLoRA: ~0.55 B/param."""
    p, s = facts.params, facts.shape
    if method == "full":
        states = 16 * p / shards
    elif method == "lora":
        states = p * (4 if precision == "fp32" else 2) + 0.02 * p * 16
    else:
        states = p * 0.55 + 0.02 * p * 16
    act_bytes = 2 if precision != "fp32" else 4
    tokens = micro_batch * seq_len
    # Saved activations per token per layer: ~12 hidden-sized tensors without checkpointing, 1 with it.
    per_layer = (1 if gradient_checkpointing else 12) * s.hidden_size * act_bytes
    activations = tokens * s.num_layers * per_layer
    logits = tokens * s.vocab_size * 4 * 2  # fp32 logits and their gradient
    return int(states + activations + logits + GIB // 2)


def plan_train(
    facts: ModelFacts,
    hw: Hardware,
    *,
    method: str = "auto",
    precision: str = "auto",
    num_processes: int | str = "auto",
    strategy: str = "auto",
    micro_batch_size: int = 4,
    seq_len: int = 1024,
    gradient_checkpointing: bool = False,
) -> TrainPlan:
    notes: list[str] = []
    use_gpu = hw.has_gpu
    if use_gpu:
        capacity = min(g.memory_total_bytes for g in hw.gpus) * 0.92
        procs = len(hw.gpus) if num_processes == "auto" else int(num_processes)
        if procs > len(hw.gpus):
            raise DoesNotFitError(f"num_processes {procs} needs {procs} GPUs, this machine has {len(hw.gpus)}")
    else:
        capacity = hw.ram.available_bytes * 0.85
        # One process per machine on the CPU: a second one halves the cores each gets and doubles memory.
        procs = 1 if num_processes == "auto" else int(num_processes)
        capacity /= procs
    if precision == "auto":
        if use_gpu:
            precision = "bf16" if all(g.supports_bf16 for g in hw.gpus) else "fp16"
        else:
            precision = "bf16" if hw.cpu.has_native_bf16 else "fp32"
            if precision == "fp32":
                notes.append("precision fp32: this CPU has no native bf16 (bf16 autocast measured ~9x slower)")
    if method == "qlora" and not use_gpu:
        raise UsageError("method qlora needs a CUDA GPU (bitsandbytes 4-bit kernels)", "use method: lora on the CPU")

    def need(m: str, strat: str) -> int:
        shards = procs if strat in ("fsdp", "deepspeed") else 1
        return training_memory_bytes(facts, m, precision, shards, micro_batch_size, seq_len, gradient_checkpointing)

    if strategy == "auto":
        if procs == 1:
            strategy = "none"
        elif need(method if method != "auto" else "full", "ddp") <= capacity:
            strategy = "ddp"
        else:
            strategy = "fsdp"
    if method == "auto":
        for m in ("full", "lora", "qlora") if use_gpu else ("full", "lora"):
            if need(m, strategy) <= capacity:
                method = m
                break
        else:
            method = "qlora" if use_gpu else "lora"
        if method != "full":
            notes.append(f"method {method}: full fine-tuning needs {need('full', strategy) / GIB:.1f} GiB "
                         f"per device, {capacity / GIB:.1f} GiB available")
    required = need(method, strategy)
    if required > capacity:
        raise DoesNotFitError(
            f"training {facts.name} with method {method} needs about {required / GIB:.1f} GiB per device, "
            f"has {capacity / GIB:.1f} GiB",
            "use method lora/qlora, gradient checkpointing, a smaller micro-batch or seq length, "
            "or more GPUs with strategy fsdp")
    return TrainPlan("cuda" if use_gpu else "cpu", procs, precision, method, strategy,  # type: ignore[arg-type]
                     round(required / GIB, 2), round(capacity / GIB, 2), tuple(notes))
