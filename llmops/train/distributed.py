"""What each training process adds to accelerate for distributed runs: a bounded wait on the other ranks,
and FSDP on CPU-only machines.

Both are called by `llmops.train.loop.train` around its `Accelerator(...)`.
"""

from __future__ import annotations

from llmops.train.recipe import Recipe


def process_group_kwargs(recipe: Recipe) -> list:
    """accelerate's kwargs handlers: collectives give up after `distributed.timeout_s` (torch's default for
    gloo is 30 minutes), so a rank that died or a machine that is gone ends the run with an error instead of
    leaving the others waiting."""
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    return [InitProcessGroupKwargs(timeout=timedelta(seconds=recipe.distributed.timeout_s))]


def enable_fsdp_on_cpu(accelerator, recipe: Recipe) -> None:
    """Make accelerate shard the model with FSDP2 on CPU processes (gloo), as the recipe asks.

    accelerate 1.15 turns FSDP on only for accelerator devices: with `ACCELERATE_USE_CPU=1` its state stays
    MULTI_CPU and `prepare` wraps the model in DDP, silently, although `accelerate launch` was given an FSDP
    config (AcceleratorState.__init__ checks `distributed_type in [MULTI_GPU, MULTI_XPU, ...]`). torch's
    `fully_shard` itself runs on CPU tensors over gloo (measured with torch 2.13: training, sharded
    `save_state`/`load_state` through torch.distributed.checkpoint, and the full state dict for the export).
    So the FSDP plugin accelerate would have built from the launcher's environment is installed here, and the
    state is switched to FSDP before `prepare`."""
    from accelerate import FullyShardedDataParallelPlugin, PartialState
    from accelerate.utils import DistributedType

    if recipe.distributed.strategy != "fsdp" or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables `accelerate launch` set
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
