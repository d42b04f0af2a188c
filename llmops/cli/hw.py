"""`llmops hw`: what hardware is here, and what each workload would run a model with."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from llmops.cli import _output as out
from llmops.cli._options import JsonOpt, ModelOpt


def hw_command(
    model: ModelOpt = None,
    json: JsonOpt = False,
    ray: Annotated[Optional[str], typer.Option(
        "--ray", metavar="ADDRESS", help="Also show the nodes of a live Ray cluster (HOST:PORT, or `auto`) and "
                                         "plan serve across them.")] = None,
    workload: Annotated[str, typer.Option(
        metavar="batch|train", help="What the estimates and --compare are for: a batch job of --rows rows, or "
                                    "training one epoch over --rows sequences of --seq-len tokens.")] = "batch",
    rows: Annotated[int, typer.Option(min=1, help="Rows of the batch job (or sequences to train on).")] = 1000,
    prompt_tokens: Annotated[int, typer.Option(min=1, help="Prompt tokens per row.")] = 256,
    max_tokens: Annotated[int, typer.Option(min=0, help="Output tokens per row (0: embeddings).")] = 256,
    seq_len: Annotated[int, typer.Option(min=8, help="Training sequence length.")] = 1024,
    compare: Annotated[bool, typer.Option(
        "--compare", help="One row per hardware profile: this machine, each --profile file, and built-in 1x L4, "
                          "1x A100 80GB, 1x H100, 8x H100 and a 32-core CPU server: plan, time, cost.")] = False,
    profile: Annotated[Optional[list[str]], typer.Option(
        "--profile", metavar="FILE", help="A hardware file to compare (the `hardware` object of `llmops hw "
                                          "--json` on that machine). Repeatable.")] = None,
    price: Annotated[Optional[list[str]], typer.Option(
        "--price", metavar="NAME=USD", help="Price per hour of a profile (`this` is this machine), over "
                                            "$LLMOPS_HOME/prices.yaml and the dated example prices. Repeatable.")
    ] = None,
) -> None:
    """Show the GPUs, CPU, RAM and disk found here (and the cluster's nodes, when LLMOPS_HARDWARE lists
    `nodes` or --ray names a cluster), the serve, batch and train plans for --model, and how long a batch job
    (or training) of that size takes here: from the hardware's roofline, or from earlier runs of the model here.
    --compare answers the same on other hardware, with the cost."""
    from llmops.errors import LlmopsError, UsageError
    from llmops.estimate import load_prices, profiles
    from llmops.hardware import detect
    from llmops.plan import model_facts, plan_engine
    from llmops.registry import resolve
    from llmops.train.plan import plan_train

    if workload not in ("batch", "train"):
        raise UsageError(f"--workload {workload!r} is not batch or train", "use --workload batch or --workload train")
    hw = detect()
    if ray is not None:
        from llmops.serve.server import ray_cluster_nodes

        hw = hw.with_cluster(ray_cluster_nodes(ray, hw.gpus))
    resolved = resolve(model)
    facts = model_facts(resolved)
    prices = load_prices(price)
    if compare:
        _compare(facts, profiles(hw, profile or []), prices, workload, rows, prompt_tokens, max_tokens, seq_len,
                 _digest(resolved), json)
        return
    plans: dict[str, object] = {}
    for name, make in (("serve", lambda: plan_engine(None, facts, hw, workload="serve").to_dict()),
                       ("batch", lambda: plan_engine(None, facts, hw, workload="batch").to_dict()),
                       ("train", lambda: plan_train(facts, hw).to_dict())):
        try:
            plans[name] = make()
        except LlmopsError as e:  # a plan that does not fit is information here, not a failure
            plans[name] = {"error": e.message, "hint": e.hint}
    only_here = {k: v for k, v in profiles(hw).items() if k.startswith("this")}
    this_price = prices.get("this")
    estimates = {
        "batch": _one(_batch_rows(facts, only_here, prices, rows, prompt_tokens, max_tokens, _digest(resolved))),
        "train": _one(_train_rows(facts, only_here, prices, rows, seq_len)),
    }
    if json:
        out.print_json({"hardware": hw.to_dict(), "model": resolved.name, "plans": plans, "estimates": estimates})
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
    _print_estimates(estimates, this_price[0] if this_price else None, rows, prompt_tokens, max_tokens, seq_len)


def _digest(resolved) -> str | None:
    """The model's content digest when it is here (taken when it was pulled, so cached)."""
    from llmops.fingerprint import model_digest

    path = resolved.local_path()
    return model_digest(path) if path is not None and path.exists() else None


def _batch_rows(facts, machines, prices, rows, prompt_tokens, max_tokens, digest):
    from llmops.estimate import compare_batch

    task = "embed" if facts.task == "embed" or max_tokens == 0 else "generate"
    return compare_batch(facts, machines, prices, rows=rows, prompt_tokens=prompt_tokens,
                         max_tokens=0 if task == "embed" else max_tokens, task=task, model_digest=digest)


def _train_rows(facts, machines, prices, rows, seq_len):
    from llmops.estimate import compare_train

    return compare_train(facts, machines, prices, examples=rows, seq_len=seq_len)


def _one(found: list[dict]) -> dict:
    return found[0] if found else {}


def _print_estimates(estimates: dict, price: float | None, rows, prompt_tokens, max_tokens, seq_len) -> None:
    from llmops.estimate import Estimate, Span, TrainEstimate

    batch, train = estimates["batch"], estimates["train"]
    if batch.get("fits"):
        out.key_values(f"batch estimate here: {rows} rows x {prompt_tokens} prompt + {max_tokens} output tokens "
                       "(--rows, --prompt-tokens, --max-tokens)", Estimate.from_dict(batch["estimate"]).lines(price))
    if train.get("fits"):
        data = dict(train["estimate"])
        data["step"] = Span(**data["step"])
        data["wall"] = Span(**data["wall"]) if data["wall"] else None
        out.key_values(f"train estimate here: one epoch over {rows} sequences of {seq_len} tokens",
                       TrainEstimate(**data).lines(price))


def _compare(facts, machines, prices, workload, rows, prompt_tokens, max_tokens, seq_len, digest, json) -> None:
    from llmops.estimate import EXAMPLE_PRICES_DATE, duration

    if workload == "batch":
        found = _batch_rows(facts, machines, prices, rows, prompt_tokens, max_tokens, digest)
        title = f"{facts.name}: batch of {rows} rows x {prompt_tokens} prompt + {max_tokens} output tokens"
    else:
        found = _train_rows(facts, machines, prices, rows, seq_len)
        title = f"{facts.name}: training one epoch over {rows} sequences of {seq_len} tokens"
    if json:
        out.print_json({"model": facts.name, "workload": workload, "profiles": found})
        return
    table = []
    for r in found:
        if not r["fits"]:
            table.append((r["profile"], r["hardware"], "does not fit", "", "", "", r["why"]))
            continue
        est = r["estimate"]
        if workload == "batch":
            speed = f"{est['rate']['value']:,.0f} {est['rate_unit']}"
            wall = est["wall"]
            source = est["generation"]["source"].split(":")[0]
        else:
            speed = f"{est['step']['value']:.2f} s/step" + (f", {est['gpu_hours']:.1f} GPU-h" if est["gpu_hours"]
                                                          else "")
            wall = est["wall"]
            source = "FLOPs x utilisation"
        time = f"{duration(wall['value'])} ({duration(wall['low'])}-{duration(wall['high'])})" if wall else "?"
        cost = (f"${r['cost_usd']:,.2f}" + (" (example price)" if r["price_source"].startswith("example") else "")
                if "cost_usd" in r else "no price (--price)")
        table.append((r["profile"], r["hardware"], r["plan"], speed, time, cost, source))
    out.table(title, ["profile", "hardware", "plan", "throughput", "wall time (range)", "cost", "from"], table)
    out.log(f"llmops hw: example prices are list prices as of {EXAMPLE_PRICES_DATE}, not quotes: give yours with "
            "--price NAME=USD or $LLMOPS_HOME/prices.yaml")
