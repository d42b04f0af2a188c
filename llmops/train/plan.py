"""The training planner: from a model's shape, the hardware and a recipe's wishes, decide how to train.

It searches every way of running the same training: the method (full, LoRA, QLoRA on GPUs), the strategy
(one process, DDP, FSDP, which shards weights, LoRA's frozen ones included), gradient checkpointing on or off,
and the micro-batch size, with gradient accumulation keeping the recipe's global batch. It estimates the
peak memory per device of each and picks the fastest that fits; only when nothing fits does it raise
`DoesNotFitError` (exit 3), with the numbers. Values the recipe sets explicitly (a method, a strategy,
gradient checkpointing) are kept; the micro-batch is the largest the planner may use.

Memory per device (`training_memory`), for P parameters over S shards (FSDP/ZeRO-3 processes, else 1):
- full: fp32 master weights, fp32 gradients and AdamW's two fp32 moments = 16 B/param / S. This is
  `accelerate estimate-memory`'s "Training using Adam" figure for float32 (4 x the fp32 model size); its
  bf16 row (8 B/param) is the peak of one stage, not weights, gradients and moments held together. Under
  mixed precision autocast caches a bf16 copy of every weight through the forward (+2 B/param); DDP adds a
  gradient-sized bucket copy (+4 B/param; accelerate leaves gradient_as_bucket_view off).
- lora: frozen base in the compute dtype (2 B/param in bf16) / S, adapters (rank r on every linear layer)
  trained in fp32 with AdamW (16 B per adapter parameter) / S.
- qlora: NF4 weights with double quantization, 4.127 bits/param (QLoRA paper, section 3), for the linear
  layers; embeddings and head stay unquantized (fp32 after peft's prepare_model_for_kbit_training, the
  compute dtype under FSDP, which stores them that way), adapters as for LoRA.
- FSDP also holds unsharded units while it computes: the root unit (embeddings and head) and two decoder
  layers (the one computing and the one prefetched), plus their full gradients for full fine-tuning.
- activations, counted per token per layer the way Korthikanti et al. count them ("Reducing Activation
  Recomputation in Large Transformer Models", 2022, eq. 1: 34·s·b·h + 5·a·s²·b bytes for a GPT layer in
  16-bit) but for a Llama layer, tensor by tensor as autograd saves them (`activation_bytes_per_token`):
  the RMSNorms' fp32 inputs, q/k/v and the attention output, the MLP's tensors of the intermediate width,
  and either every linear layer's input (full) or only the adapters' inputs and dropout masks (LoRA and
  QLoRA: frozen layers need no weight gradients, so they keep no inputs). Attention is memory-efficient
  (SDPA/flash, transformers' default), so the 5·a·s²·b
  score term is not there. With gradient checkpointing only each layer's input is kept (their 2·s·b·h,
  in the residual stream's dtype), plus one layer recomputed at a time in the backward pass.
  `scripts/measure_train_activations.py` checks this count against the tensors autograd really saves:
  within 1% for SmolLM2-135M (2 x 512 tokens, CPU, fp32 and bf16 autocast), full and LoRA, with and
  without checkpointing.
- logits: bf16 logits, their fp32 upcast and fp32 log-softmax, tokens x vocab x (2 + 4 + 4) bytes.

Checked against published figures in tests/test_train_plan.py: QLoRA fine-tunes a 65B model on one 48 GB
GPU, Llama-3.1-8B QLoRA (and LoRA at micro-batch 1) fits a 24 GiB RTX 4090, and LoRA over FSDP on 8 x 80 GiB
holds about 17.6 GiB of a 70B model's frozen bf16 weights per GPU.

Speed model (`relative_step_time`), per token, in units of the model's forward FLOPs (2N): a full
fine-tune costs 3 (forward 1, backward 2: gradients of inputs and of weights); LoRA 2 (no gradients for
frozen weights); gradient checkpointing adds a forward (+1); QLoRA dequantizes NF4 in every matmul, x1.4
(Raschka, "Practical Tips for Finetuning LLMs Using LoRA", 2023: QLoRA took 39% longer than LoRA);
FSDP's all-gathers and reduce-scatters that do not overlap compute, x1.1; and each micro-batch costs a fixed
overhead worth about 512 tokens (kernel launches, under-filled matmuls), x(1 + 512 / tokens per micro-batch).
With `method: auto` the method is a choice of what is trained, not of speed: full, then lora, then qlora,
the first with any configuration that fits; the speed model then chooses among that method's configurations.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from llmops.errors import DoesNotFitError, UsageError
from llmops.facts import ModelFacts
from llmops.hardware import GIB, Hardware
from llmops.plan import choose_dtype

# Of the free memory of each GPU, what training may plan to use: the rest is the CUDA context, cuBLAS and
# NCCL workspaces and the caching allocator's fragmentation.
GPU_USABLE_FRACTION = 0.92
# Of the available RAM on a CPU-only machine (the page cache and the data loader need the rest).
CPU_USABLE_FRACTION = 0.85
# Buffers outside the model: the data batch, the loss, small optimizer temporaries.
FIXED_OVERHEAD_BYTES = GIB // 2
# NF4 (4 bits) plus double-quantized block constants (0.127 bits/param): QLoRA paper, section 3.
NF4_BYTES_PER_PARAM = 4.127 / 8
# fp32 weight, fp32 gradient and AdamW's two fp32 moments, per trained parameter.
TRAINED_BYTES_PER_PARAM = 16
# Per micro-batch fixed cost, in tokens' worth of compute (see the speed model above).
MICRO_BATCH_OVERHEAD_TOKENS = 512
# Prefer configurations that leave this share of the usable memory unplanned, when there is one: the estimate
# does not see allocator fragmentation or the attention kernels' workspaces.
ESTIMATE_HEADROOM = 0.10
QLORA_SLOWDOWN = 1.4
SHARDED_SLOWDOWN = 1.1
METHOD_PREFERENCE = ("full", "lora", "qlora")
# Not planned, and refused when asked for: FSDP2 (the FSDP llmops launches) cannot shard bitsandbytes' 4-bit
# weights (accelerate issue 3874, open), and FSDP1's FSDP-QLoRA recipe was never run here (no GPU lent).
QLORA_OVER_FSDP = ("method qlora over FSDP is not supported: FSDP2 cannot shard bitsandbytes' 4-bit weights "
                   "(huggingface/accelerate#3874)")

Method = Literal["full", "lora", "qlora"]
Strategy = Literal["none", "ddp", "fsdp", "deepspeed"]


@dataclass(frozen=True)
class TrainPlan:
    """How a run trains, fully resolved. `notes` says why each choice was made."""

    device: Literal["cuda", "cpu"]
    num_processes: int
    """Processes on this machine."""
    precision: Literal["bf16", "fp16", "fp32"]
    method: Method
    strategy: Strategy
    gradient_checkpointing: bool
    micro_batch_size: int
    gradient_accumulation_steps: int
    global_batch_size: int
    """Sequences per optimizer step over every process = micro-batch x accumulation x processes."""
    memory_per_device_gib: float
    """Estimated peak memory per process."""
    memory_available_gib: float
    memory_breakdown_gib: dict[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Layout:
    """The parameter counts the memory model needs, derived from the registry's shape and count."""

    layer_params: int
    """Parameters of one decoder layer (attention, MLP, norms)."""
    outer_params: int
    """Embeddings, the output head (unless tied) and the final norm: FSDP's root unit."""
    intermediate_size: int
    adapter_params_per_rank: int
    """LoRA parameters per unit of rank with every linear layer adapted: sum of (in + out) features."""

    @classmethod
    def of(cls, facts: ModelFacts) -> Layout:
        s = facts.shape
        h, q, kv = s.hidden_size, s.num_attention_heads * s.head_dim, s.num_kv_heads * s.head_dim
        outer = s.vocab_size * h * (1 if s.tie_word_embeddings else 2) + h
        layer = max(1, (facts.params - outer) // s.num_layers)
        attention = 2 * h * q + 2 * h * kv
        # Registry shapes often omit the MLP width; the published parameter count pins it (gated MLP: 3 x h x i).
        inter = s.intermediate_size or max(h, (layer - attention - 2 * h) // (3 * h))
        per_layer_rank = (h + q) + 2 * (h + kv) + (q + h) + 3 * (h + inter)  # q, k, v, o, gate, up, down
        return cls(layer, outer, inter, per_layer_rank * s.num_layers)


def activation_bytes_per_token(facts: ModelFacts, method: str, compute_bytes: int, dropout_mask_bytes: int) -> int:
    """Bytes one decoder layer saves for the backward pass, per token, without checkpointing (counted from
    the tensors autograd saves: scripts/measure_train_activations.py)."""
    s, inter = facts.shape, Layout.of(facts).intermediate_size
    h, q, kv = s.hidden_size, s.num_attention_heads * s.head_dim, s.num_kv_heads * s.head_dim
    attention = compute_bytes * (q + 2 * kv) + compute_bytes * q  # q, k, v and the output, saved by SDPA
    if method == "full":
        if compute_bytes == 4:  # fp32: each RMSNorm saves its input, the normed x and its output
            norms = 2 * 3 * 4 * h
        else:  # fp32 weights under autocast: the norms' fp32 input and normed x, a bf16 cast per linear layer
            norms = 2 * 2 * 4 * h + compute_bytes * 5 * h  # q, k, v; gate, up
        return norms + attention + 4 * compute_bytes * inter  # gate, up, act(gate), act(gate) * up
    # Frozen base layers save no inputs (their weight gradients are not needed); the adapters save theirs.
    norms = 2 * 4 * h  # the fp32 input, for the rsqrt's gradient
    mlp = 3 * compute_bytes * inter  # gate, up, act(gate)
    adapted = 3 * h + q + 2 * h + inter  # the inputs of q, k, v; o; gate, up; down
    # Each adapter keeps its own copy of its input, and with dropout a mask: a bool on CUDA (native_dropout),
    # on the CPU one of the input's dtype, fp32 (peft casts the input to the adapters' fp32 first).
    return norms + attention + mlp + (compute_bytes + dropout_mask_bytes) * adapted


def training_memory(facts: ModelFacts, *, method: str, strategy: str, shards: int, precision: str,
                    micro_batch_size: int, seq_len: int, gradient_checkpointing: bool,
                    lora_rank: int = 16, lora_dropout: float = 0.05, on_gpu: bool = True) -> dict[str, int]:
    """Peak bytes per device, by part (see the module docstring for the model and its sources)."""
    layout, s = Layout.of(facts), facts.shape
    p = facts.params
    compute_bytes = 4 if precision == "fp32" else 2
    sharded = strategy in ("fsdp", "deepspeed")
    shards = shards if sharded else 1
    adapters = lora_rank * layout.adapter_params_per_rank
    parts: dict[str, int] = {}
    if method == "full":
        parts["weights"] = 4 * p // shards
        parts["gradients_and_optimizer"] = (TRAINED_BYTES_PER_PARAM - 4) * p // shards
        if strategy == "ddp":
            parts["gradients_and_optimizer"] += 4 * p  # DDP's gradient buckets
        if compute_bytes < 4 and not sharded:
            parts["weights"] += compute_bytes * p  # autocast's cached low-precision weight copies
        gathered = (layout.outer_params + 2 * layout.layer_params) * (compute_bytes + 4)
    else:
        if method == "lora":
            base = p * compute_bytes
            gathered = (layout.outer_params + 2 * layout.layer_params) * compute_bytes
        else:
            linear = p - layout.outer_params - 2 * s.hidden_size * s.num_layers
            unquantized_bytes = compute_bytes if sharded else 4  # prepare_model_for_kbit_training upcasts
            base = int(linear * NF4_BYTES_PER_PARAM) + (p - linear) * unquantized_bytes
            gathered = int(layout.outer_params * compute_bytes + 2 * layout.layer_params * NF4_BYTES_PER_PARAM)
        parts["weights"] = base // shards
        parts["gradients_and_optimizer"] = TRAINED_BYTES_PER_PARAM * adapters // shards
        if strategy == "ddp":
            parts["gradients_and_optimizer"] += 4 * adapters
    if sharded and shards > 1:
        parts["fsdp_gathered"] = gathered
    tokens = micro_batch_size * seq_len
    mask_bytes = 0 if lora_dropout == 0 else 1 if on_gpu else 4
    per_layer = tokens * activation_bytes_per_token(facts, method, compute_bytes, mask_bytes)
    if gradient_checkpointing:
        # Full fine-tuning (fp32 weights) and QLoRA (fp32 embeddings) keep the residual stream in fp32.
        stream_bytes = 4 if method != "lora" else compute_bytes
        parts["activations"] = s.num_layers * tokens * s.hidden_size * stream_bytes + per_layer
    else:
        parts["activations"] = s.num_layers * per_layer
    parts["logits"] = tokens * s.vocab_size * (compute_bytes + 4 + 4)
    parts["overhead"] = FIXED_OVERHEAD_BYTES
    return parts


def relative_step_time(method: str, strategy: str, gradient_checkpointing: bool, tokens_per_micro_batch: int) -> float:
    """Time per token, in forward passes, for comparing configurations (see the module docstring)."""
    cost = (3.0 if method == "full" else 2.0) + (1.0 if gradient_checkpointing else 0.0)
    if method == "qlora":
        cost *= QLORA_SLOWDOWN
    if strategy in ("fsdp", "deepspeed"):
        cost *= SHARDED_SLOWDOWN
    return cost * (1 + MICRO_BATCH_OVERHEAD_TOKENS / tokens_per_micro_batch)


@dataclass(frozen=True)
class _Option:
    method: str
    strategy: str
    gradient_checkpointing: bool
    micro_batch_size: int
    memory: dict[str, int]
    time: float

    @property
    def need(self) -> int:
        return sum(self.memory.values())

    def describe(self) -> str:
        return (f"{self.method}, strategy {self.strategy}, gradient checkpointing "
                f"{'on' if self.gradient_checkpointing else 'off'}, micro-batch {self.micro_batch_size}")


def plan_train(
    facts: ModelFacts,
    hw: Hardware,
    *,
    method: str = "auto",
    precision: str = "auto",
    num_processes: int | str = "auto",
    strategy: str = "auto",
    gradient_checkpointing: bool | str = "auto",
    micro_batch_size: int = 4,
    global_batch_size: int | None = None,
    gradient_accumulation_steps: int | None = None,
    seq_len: int = 1024,
    num_machines: int = 1,
    lora_rank: int = 16,
    lora_dropout: float = 0.05,
    method_is_default: bool = False,
) -> TrainPlan:
    """Search methods, strategies, gradient checkpointing and micro-batch sizes; return the fastest that fits.

    `method_is_default`: the recipe did not name its method, so a lora that does not fit a GPU becomes qlora.
    `micro_batch_size` is the largest micro-batch to use. The global batch is `global_batch_size`, else
    `micro_batch_size x gradient_accumulation_steps (default 1) x processes`; every plan keeps it."""
    notes: list[str] = []
    use_gpu = hw.has_gpu
    if method == "qlora" and not use_gpu:
        raise UsageError("method qlora needs a CUDA GPU (bitsandbytes 4-bit kernels)", "use method: lora on the CPU")
    if method == "qlora" and strategy == "fsdp":
        raise UsageError(QLORA_OVER_FSDP, "use method: lora with strategy fsdp, or qlora with strategy ddp or none")

    # 1. Processes and what each may use.
    if use_gpu:
        procs = len(hw.gpus) if num_processes == "auto" else int(num_processes)
        if procs > len(hw.gpus):
            raise DoesNotFitError(f"num_processes {procs} needs {procs} GPUs, this machine has {len(hw.gpus)}")
        capacity = min(g.memory_free_bytes for g in hw.gpus[:procs]) * GPU_USABLE_FRACTION
        where = f"{procs} x {min(g.memory_total_bytes for g in hw.gpus) / GIB:.0f} GiB GPU"
    else:
        # One process per machine on the CPU: a second one halves the cores each gets and doubles memory.
        procs = 1 if num_processes == "auto" else int(num_processes)
        capacity = hw.ram.available_bytes * CPU_USABLE_FRACTION / procs
        where = f"this machine's {hw.ram.available_bytes / GIB:.1f} GiB of available RAM"
    total = procs * num_machines

    # 2. Precision.
    if precision == "auto":
        dtype, why = choose_dtype(hw, "cuda" if use_gpu else "cpu")  # the one dtype decision (llmops.plan)
        precision = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[dtype]
        notes.append(f"precision {precision}: {why}")

    # 3. The global batch every plan keeps, and the micro-batches that divide it.
    if global_batch_size is None:
        global_batch_size = micro_batch_size * (gradient_accumulation_steps or 1) * total
    if global_batch_size % total:
        raise UsageError(f"train.global_batch_size {global_batch_size} is not a multiple of the {total} processes",
                         f"use a multiple of {total}, or set train.gradient_accumulation_steps instead")
    per_process = global_batch_size // total
    micro_batches = [m for m in range(min(micro_batch_size, per_process), 0, -1) if per_process % m == 0]

    # 4. Every configuration, with its memory and speed.
    methods = [method] if method != "auto" else [m for m in METHOD_PREFERENCE if use_gpu or m != "qlora"]
    if method == "lora" and method_is_default and use_gpu:
        methods.append("qlora")
    if strategy != "auto":
        strategies = [strategy]
    else:
        strategies = ["none"] if total == 1 else ["ddp", "fsdp"]
    checkpointing = [False, True] if gradient_checkpointing == "auto" else [bool(gradient_checkpointing)]
    options = [
        _Option(m, st, gc, mb, training_memory(
            facts, method=m, strategy=st, shards=total, precision=precision, micro_batch_size=mb, seq_len=seq_len,
            gradient_checkpointing=gc, lora_rank=lora_rank, lora_dropout=lora_dropout, on_gpu=use_gpu),
            relative_step_time(m, st, gc, mb * seq_len))
        for m in methods for st in strategies for gc in checkpointing for mb in micro_batches
        if not (m == "qlora" and st == "fsdp")]  # see QLORA_OVER_FSDP
    fitting = [o for o in options if o.need <= capacity]
    if not fitting:
        raise _does_not_fit(facts, options, capacity, where, method, hw, use_gpu, precision, seq_len, total,
                            lora_rank, lora_dropout)

    # 5. The method (by preference when auto), then the fastest configuration of it.
    chosen_method = next(m for m in methods if any(o.method == m for o in fitting))
    pool = [o for o in fitting if o.method == chosen_method]
    roomy = [o for o in pool if o.need <= (1 - ESTIMATE_HEADROOM) * capacity]
    best = min(roomy or pool, key=lambda o: (o.time, o.need))
    if method == "auto" or len(methods) > 1:
        if chosen_method != methods[0]:
            smallest = {m: min(o.need for o in options if o.method == m) for m in methods[:methods.index(chosen_method)]}
            notes.append(f"method {chosen_method}: " + "; ".join(
                f"{m} fine-tuning needs at least {n / GIB:.1f} GiB per device" for m, n in smallest.items())
                + f", {capacity / GIB:.1f} GiB available"
                + (" (the recipe does not set `method`; set it to choose)" if method_is_default else ""))
        elif method == "auto":
            notes.append(f"method {chosen_method}: auto prefers training every weight (full > lora > qlora)")
    notes.append(_why_this_configuration(best, options, fitting, capacity, strategies, micro_batches))
    accumulation = per_process // best.micro_batch_size
    notes.append(f"global batch {global_batch_size} = micro-batch {best.micro_batch_size} x accumulation "
                 f"{accumulation} x {total} process(es)"
                 + (f" (micro-batch lowered from {micro_batch_size})" if best.micro_batch_size < micro_batch_size
                    else ""))
    breakdown = {k: round(v / GIB, 2) for k, v in best.memory.items()}
    notes.append(f"memory per device {best.need / GIB:.1f} GiB of {capacity / GIB:.1f} GiB usable: "
                 + ", ".join(f"{k} {v}" for k, v in breakdown.items()))
    return TrainPlan("cuda" if use_gpu else "cpu", procs, precision, best.method, best.strategy,  # type: ignore[arg-type]
                     best.gradient_checkpointing, best.micro_batch_size, accumulation, global_batch_size,
                     round(best.need / GIB, 2), round(capacity / GIB, 2), breakdown, tuple(notes))


def _why_this_configuration(best: _Option, options: list[_Option], fitting: list[_Option], capacity: float,
                            strategies: list[str], micro_batches: list[int]) -> str:
    """The chosen configuration, and what each faster alternative of the same method would have needed."""
    same = [o for o in options if o.method == best.method]
    faster = sorted((o for o in same if o.time < best.time), key=lambda o: o.time)
    reasons = [f"{o.describe()} would be faster but needs {o.need / GIB:.1f} GiB"
               + (f" (less than {ESTIMATE_HEADROOM:.0%} headroom)" if o.need <= capacity else "") for o in faster[:2]]
    if best.strategy == "fsdp" and "ddp" in strategies:
        ddp = min((o.need for o in same if o.strategy == "ddp"), default=0)
        reasons.append(f"ddp keeps a whole copy on every device: at least {ddp / GIB:.1f} GiB")
    text = (f"{best.describe()}: the fastest of {sum(o.method == best.method for o in fitting)} configurations "
            f"of {best.method} that fit {capacity / GIB:.1f} GiB per device (of {len(options)} searched)")
    return text + ("; " + "; ".join(reasons) if reasons else "")


def _does_not_fit(facts, options, capacity, where, method, hw, use_gpu, precision, seq_len, total,
                  lora_rank, lora_dropout) -> DoesNotFitError:
    smallest = min(options, key=lambda o: o.need)
    parts = ", ".join(f"{k} {v / GIB:.1f}" for k, v in smallest.memory.items())
    hints = []
    if method != "auto":  # an explicit method: say which other one would fit
        for other in METHOD_PREFERENCE:
            if other == method or (other == "qlora" and not use_gpu):
                continue
            need = min(sum(training_memory(facts, method=other, strategy=o.strategy, shards=total,
                                           precision=precision, micro_batch_size=1, seq_len=seq_len,
                                           gradient_checkpointing=True, lora_rank=lora_rank,
                                           lora_dropout=lora_dropout, on_gpu=use_gpu).values()) for o in options)
            if need <= capacity:
                hints.append(f"method {other} fits ({need / GIB:.1f} GiB per device): --set method={other}")
                break
    if use_gpu:
        # How many GPUs of this size FSDP would need for the smallest configuration (LoRA for QLoRA, which
        # llmops does not run over FSDP).
        over_fsdp = "lora" if smallest.method == "qlora" else smallest.method
        for shards in (2, 4, 8, 16, 32, 64, 128):
            if shards <= total:
                continue
            need = sum(training_memory(facts, method=over_fsdp, strategy="fsdp", shards=shards,
                                       precision=precision, micro_batch_size=1, seq_len=seq_len,
                                       gradient_checkpointing=True, lora_rank=lora_rank,
                                       lora_dropout=lora_dropout).values())
            if need <= capacity:
                hints.append(f"{over_fsdp} over FSDP fits on {shards} such GPUs ({need / GIB:.1f} GiB each)")
                break
    hints.append("a shorter data.max_seq_len or a smaller model needs less")
    return DoesNotFitError(
        f"training {facts.name} does not fit on {where}: the smallest of {len(options)} configurations "
        f"searched ({smallest.describe()}, {seq_len}-token sequences) needs about {smallest.need / GIB:.1f} GiB "
        f"per device ({parts}), {capacity / GIB:.1f} GiB usable", "; ".join(hints))
