"""What llmops adds to accelerate for distributed runs: a bounded wait on the other ranks and FSDP on CPU-only
machines (both called by `llmops.train.loop.train` around its `Accelerator(...)`), and what a failed launch
tells the user (`failure_cause`, called by `llmops.train.launch.run`).
"""

from __future__ import annotations

import re

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


def failure_cause(launcher_output: str, recipe: Recipe) -> str | None:
    """Why `accelerate launch` failed, in a few words, when its output (torch's elastic agent and the ranks'
    tracebacks) shows a cause seen before; None otherwise. A lost peer is looked for before a signal: a rank
    whose gloo connection was reset may then die of SIGABRT ("terminate called without an active exception")."""
    timeout = f"distributed.timeout_s ({recipe.distributed.timeout_s} s)"
    if re.search(r"Connection (reset|closed) by peer", launcher_output):
        return "another training process of this run ended (the `llmops train` that started it says why)"
    if re.search(r"Timed out waiting \d+ms for (recv|send)", launcher_output):
        return f"another training process of this run stopped answering for {timeout}"
    if match := re.search(r"waiting for clients\. (\d+)/(\d+) clients joined", launcher_output):
        return (f"only {match[1]} of {match[2]} machines joined the run within {timeout}: start `llmops train` "
                f"on every machine, each with its own distributed.machine_rank")
    if match := re.search(r"timed out after \S+ while trying to connect to \(([^,]+), (\d+)\)", launcher_output):
        return f"the main machine did not answer at {match[1]}:{match[2]} within {timeout}: start its `llmops train` too"
    if match := re.search(r"Signal \d+ \((SIG\w+)\) received by PID", launcher_output):
        return f"a training process on this machine was killed ({match[1]})"
    return None
