"""Turn a finished run into a model that serve and batch load by name.

`RUN/final/` holds what the loop saved: the whole model, or a LoRA adapter. Export writes `RUN/model/`: the
adapter merged into the base weights (or `RUN/adapter/` alone when `export.merge_lora` is false), with the
tokenizer and its chat template and the resolved recipe, then registers it under the recipe's `name`: a
model, or an adapter entry naming its base, which serve and batch load on the base with vLLM's LoRA support.
Folders are written under a temporary name and renamed, so a crash never leaves a half-written model.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from llmops.errors import RuntimeFailure


def export(run, log: Callable[[str], None] = lambda m: None) -> dict:
    """Write the final model folder for `run` (a `RunPlan`) and register it; returns where it went."""
    from llmops.config import dump_config
    from transformers import AutoTokenizer

    recipe, final = run.recipe, run.run_dir / "final"
    if not (final / "config.json").exists() and not (final / "adapter_config.json").exists():
        raise RuntimeFailure(f"training left no weights in {final}", "see the training log")
    adapter_only = recipe.method != "full" and not recipe.export.merge_lora
    target = run.run_dir / ("adapter" if adapter_only else "model")
    tmp = run.run_dir / f".tmp-{target.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    if recipe.method == "full":
        os.replace(final, tmp)  # moved, not copied: full weights can be many GB
    elif adapter_only:
        shutil.copytree(final, tmp)
    else:
        log("merging the LoRA adapter into the base model")
        merge_lora(recipe.model, final, tmp)
    AutoTokenizer.from_pretrained(recipe.model).save_pretrained(tmp)  # tokenizer and chat template
    dump_config(recipe, tmp / "llmops-recipe.yaml")
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return {"model_dir": str(target), "registered": register(run, target, log), "run_dir": str(run.run_dir)}


def register(run, model_dir: Path, log: Callable[[str], None] = lambda m: None) -> str | None:
    """Add the exported model (or adapter, when it was not merged) to the user registry under the recipe's
    name; returns that name, or None when the recipe asks not to."""
    from llmops.registry import add_adapter, add_model

    recipe = run.recipe
    if not recipe.export.add_to_registry:
        return None
    trained_from = f"{run.base_model} ({recipe.method}, recipe {run.run_dir / 'recipe.yaml'})"
    if recipe.method != "full" and not recipe.export.merge_lora:
        add_adapter(recipe.name, model_dir, run.base_model, replace=True, trained_from=trained_from,
                    description=f"LoRA adapter for {run.base_model}, by llmops train")
        log(f"registered the adapter {recipe.name!r} on {run.base_model}: `llmops serve {recipe.name}`, "
            f"`llmops batch ... --model {recipe.name}`")
        return recipe.name
    add_model(recipe.name, str(model_dir), chat=True, replace=True,
              description=f"fine-tuned from {run.base_model} by llmops train", trained_from=trained_from)
    log(f"registered {recipe.name!r}: `llmops serve {recipe.name}`, `llmops batch ... --model {recipe.name}`")
    return recipe.name


def merge_lora(base_path: str, adapter: Path, out: Path) -> None:
    """Load the base in its saved dtype, apply the adapter, fold it into the weights, save a plain model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype="auto")
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.save_pretrained(out)
