"""`llmops hw`: what hardware is here, and what each workload would run a model with."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from llmops.cli import _output as out
from llmops.cli._options import JsonOpt, ModelOpt


def hw_command(model: ModelOpt = None, json: JsonOpt = False, ray: Annotated[Optional[str], typer.Option(
        "--ray", metavar="ADDRESS", help="Also show the nodes of a live Ray cluster (HOST:PORT, or `auto`) and "
                                         "plan serve across them.")] = None) -> None:
    """Show the GPUs, CPU, RAM and disk found here (and the cluster's nodes, when LLMOPS_HARDWARE lists
    `nodes` or --ray names a cluster), and the serve, batch and train plans for --model."""
    from llmops.errors import LlmopsError
    from llmops.hardware import detect
    from llmops.plan import model_facts, plan_engine
    from llmops.registry import resolve
    from llmops.train.plan import plan_train

    hw = detect()
    if ray is not None:
        from llmops.serve.server import ray_cluster_nodes

        hw = hw.with_cluster(ray_cluster_nodes(ray, hw.gpus))
    resolved = resolve(model)
    facts = model_facts(resolved)
    plans: dict[str, object] = {}
    for name, make in (("serve", lambda: plan_engine(None, facts, hw, workload="serve").to_dict()),
                       ("batch", lambda: plan_engine(None, facts, hw, workload="batch").to_dict()),
                       ("train", lambda: plan_train(facts, hw).to_dict())):
        try:
            plans[name] = make()
        except LlmopsError as e:  # a plan that does not fit is information here, not a failure
            plans[name] = {"error": e.message, "hint": e.hint}
    if json:
        out.print_json({"hardware": hw.to_dict(), "model": resolved.name, "plans": plans})
        return
    gpus = [(g.index, g.name, out.gib(g.memory_total_bytes), out.gib(g.memory_free_bytes),
             g.compute_capability, "yes" if g.supports_bf16 else "no") for g in hw.gpus]
    if gpus:
        out.table("GPUs", ["#", "name", "memory", "free", "compute cap.", "bf16"], gpus)
    out.key_values("Machine", [
        ("GPUs", len(hw.gpus) or "none (NVIDIA GPUs are found through NVML or nvidia-smi)"),
        ("CPU", hw.cpu.model),
        ("usable cores", hw.cpu.usable_cores),
        ("ISA", ", ".join(hw.cpu.isa) or "-"),
        ("native bf16 on CPU", "yes" if hw.cpu.has_native_bf16 else "no"),
        ("RAM", f"{out.gib(hw.ram.total_bytes)} total, {out.gib(hw.ram.available_bytes)} available"),
        *((f"NUMA node {n.index}", f"{out.gib(n.memory_total_bytes)} total, {out.gib(n.memory_available_bytes)} "
           f"available, CPUs {','.join(map(str, n.cpus)) or '-'} ({n.physical_cores} cores)"
           + (" (vLLM binds here)" if n == hw.engine_numa_node else "")) for n in hw.numa_nodes),
        ("disk free", f"{out.gib(hw.disk.free_bytes)} at {hw.disk.path}"),
    ])
    if hw.nodes:
        out.table(f"Cluster: {len(hw.nodes)} nodes (the first is this machine, the head)",
                  ["node", "address", "CPUs", "GPUs", "GPU memory", "RAM"],
                  [(n.name, n.address or "-", n.cpus, len(n.gpus),
                    out.gib(min(g.memory_total_bytes for g in n.gpus)) if n.gpus else "-",
                    out.gib(n.ram_bytes) if n.ram_bytes else "-") for n in hw.nodes])
    for name, plan in plans.items():
        assert isinstance(plan, dict)
        if "error" in plan:
            out.key_values(f"{name} plan for {resolved.name}", [("does not fit", plan["error"]),
                                                                ("hint", plan["hint"])])
            continue
        notes = plan.pop("notes", ())
        shown = [(k, v) for k, v in plan.items() if v is not None and k != "model"]
        out.key_values(f"{name} plan for {resolved.name}", [*shown, *(("why", n) for n in notes)])
