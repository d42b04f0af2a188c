"""The training loop, on accelerate. It reads top to bottom: accelerator, data, model, optimizer, one
`prepare`, resume, loop (with `accelerator.accumulate`), eval, checkpoint, save.

It runs in-process for one process, or in each process started by `accelerate launch -m llmops.train.loop
RUN_DIR/recipe.yaml` (see `llmops.train.launch`). It takes a fully resolved recipe (no `auto` left, `model` a
local folder) and writes, under the run folder:
- `metrics.jsonl`: one JSON line per logged step (loss, lr, tokens/s, processes) and per evaluation;
- `checkpoints/step-NNNNNNNN/`: `accelerator.save_state` plus `progress.json` (step, epoch, batches seen);
- `final/`: the trained weights (the whole model, or the LoRA adapter) for `llmops.train.export`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

from llmops.train.data import build_dataloaders
from llmops.train.recipe import Recipe

MIXED_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}


def train(recipe: Recipe, run_dir: Path, resume: str = "auto") -> dict:
    """Train as `recipe` says; returns a summary (steps, last loss, processes). `resume`: auto, never or a
    checkpoint folder."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer, get_scheduler

    cfg = recipe.train
    run_dir = Path(run_dir)

    # 1. Accelerator. The seedable sampler reshuffles from `seed + epoch`, so a resumed run sees the same
    #    batches as an uninterrupted one.
    accelerator = Accelerator(
        mixed_precision=MIXED_PRECISION[recipe.precision],
        gradient_accumulation_steps=cfg.gradient_accumulation_steps or 1,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        log_with="tensorboard" if recipe.logging.tensorboard else None,
        project_dir=str(run_dir),
    )
    set_seed(recipe.seed)
    main = accelerator.is_main_process

    # 2. Data: tokenized once on the main process, read from the datasets cache by the others.
    tokenizer = AutoTokenizer.from_pretrained(recipe.model)
    with accelerator.main_process_first():
        train_dl, eval_dl = build_dataloaders(recipe, tokenizer)

    # 3. Model (with LoRA adapters when asked), 4. optimizer and schedule.
    model = load_model(recipe, accelerator)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=cfg.learning_rate, weight_decay=cfg.weight_decay)

    # 5. One prepare. The scheduler stays outside it: accelerate would step a prepared scheduler once per
    #    process. It is stepped once per optimizer step below and saved with the checkpoints.
    model, optimizer, train_dl, eval_dl = accelerator.prepare(model, optimizer, train_dl, eval_dl)
    steps_per_epoch = math.ceil(len(train_dl) / accelerator.gradient_accumulation_steps)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=total_steps)
    accelerator.register_for_checkpointing(scheduler)
    if recipe.logging.tensorboard:
        accelerator.init_trackers("llmops", config={"name": recipe.name})

    # 6. Resume: model, optimizer, scheduler and RNG states, and where in which epoch we were.
    progress = {"step": 0, "epoch": 0, "batches_in_epoch": 0}
    checkpoint = find_checkpoint(run_dir, resume)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        progress = json.loads((checkpoint / "progress.json").read_text())
        if main:
            print(f"resuming from {checkpoint} (step {progress['step']}, epoch {progress['epoch']})", file=sys.stderr)
    metrics = MetricsFile(run_dir / "metrics.jsonl", main, keep_until=progress["step"])

    # 7. The loop.
    bar = tqdm(total=total_steps, initial=progress["step"], desc=recipe.name, unit="step", dynamic_ncols=True,
               disable=not (main and recipe.logging.progress_bar), file=sys.stderr)
    model.train()
    window = Window()
    last = None
    while progress["step"] < total_steps:
        train_dl.set_epoch(progress["epoch"])
        skip = progress["batches_in_epoch"]
        batches = accelerator.skip_first_batches(train_dl, skip) if skip else train_dl
        for batch in batches:
            real_tokens = batch.pop("num_tokens")
            with accelerator.accumulate(model):
                # use_cache=False: with a cache transformers ignores the packed-sequence position ids.
                loss = model(**batch, use_cache=False).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()  # a no-op until the last micro-batch of the step (accelerate)
                optimizer.zero_grad()
            progress["batches_in_epoch"] += 1
            window.add(loss.detach(), real_tokens, batch["input_ids"].numel())
            if not accelerator.sync_gradients:
                continue
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            scheduler.step()
            progress["step"] += 1
            step = progress["step"]
            last = window.flush(accelerator)
            row = {"step": step, "epoch": progress["epoch"], "loss": round(last["loss"], 6),
                   "lr": lr, "tokens": last["tokens"], "tokens_per_s": round(last["tokens_per_s"], 1),
                   "real_token_fraction": round(last["real_fraction"], 4),
                   "num_processes": accelerator.num_processes}
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            if step % recipe.logging.every_n_steps == 0 or step == total_steps:
                metrics.write(row)
                if recipe.logging.tensorboard:
                    accelerator.log({k: row[k] for k in ("loss", "lr", "tokens_per_s")}, step=step)
            # The last step is evaluated and saved after the loop.
            if eval_dl is not None and due(recipe.eval.every_n_steps, step, total_steps):
                metrics.write({"step": step, "eval_loss": evaluate(model, eval_dl, accelerator,
                                                                    recipe.eval.max_batches)})
            if due(recipe.checkpoint.every_n_steps, step, total_steps):
                save_checkpoint(accelerator, run_dir, progress, recipe.checkpoint.keep_last)
            if step >= total_steps:
                break
        else:  # the epoch ran out before max_steps: on to the next one
            progress["epoch"] += 1
            progress["batches_in_epoch"] = 0
    bar.close()

    # 8. Evaluate and save the trained weights (the adapter alone for LoRA; export merges it).
    eval_loss = None
    if eval_dl is not None:
        eval_loss = evaluate(model, eval_dl, accelerator, recipe.eval.max_batches)
        metrics.write({"step": progress["step"], "eval_loss": eval_loss})
    save_final(accelerator, model, run_dir / "final")
    accelerator.end_training()
    return {"steps": progress["step"], "loss": last["loss"] if last else None, "eval_loss": eval_loss,
            "num_processes": accelerator.num_processes}


def due(every: int | None, step: int, total_steps: int) -> bool:
    return bool(every) and step % every == 0 and step < total_steps


def load_model(recipe: Recipe, accelerator):
    """The base model, with gradient checkpointing and LoRA adapters as the recipe asks."""
    import torch
    from transformers import AutoModelForCausalLM

    # Full fine-tuning keeps fp32 master weights (autocast computes in bf16/fp16); LoRA freezes the base,
    # so it can sit in the compute dtype and use half the memory.
    dtype = torch.float32
    if recipe.method in ("lora", "qlora") and recipe.precision != "fp32":
        dtype = torch.bfloat16 if recipe.precision == "bf16" else torch.float16
    kwargs = {}
    if recipe.method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": accelerator.local_process_index}
    model = AutoModelForCausalLM.from_pretrained(recipe.model, dtype=dtype, **kwargs)
    if recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if recipe.method == "full":
        return model

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if recipe.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.train.gradient_checkpointing)
    lora = recipe.lora
    model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    if recipe.train.gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    return model


class Window:
    """Loss and token counts of the micro-batches since the last optimizer step."""

    def __init__(self):
        self.losses, self.real, self.total, self.start = [], 0, 0, time.perf_counter()

    def add(self, loss, real_tokens, total_tokens: int) -> None:
        self.losses.append(loss)
        self.real += int(real_tokens)
        self.total += total_tokens

    def flush(self, accelerator) -> dict:
        """Mean loss and token counts over all processes, then start a new window."""
        import torch

        loss = accelerator.reduce(torch.stack(self.losses).float().mean(), "mean").item()
        counts = accelerator.reduce(torch.tensor([self.real, self.total], device=accelerator.device), "sum")
        real, total = counts.tolist()
        elapsed = time.perf_counter() - self.start
        self.__init__()
        return {"loss": loss, "tokens": int(real), "tokens_per_s": real / elapsed,
                "real_fraction": real / max(total, 1)}


def evaluate(model, eval_dl, accelerator, max_batches: int | None) -> float:
    """Loss per trained token over the evaluation data, summed over all processes."""
    import torch

    model.eval()
    total = torch.zeros(2, device=accelerator.device)  # loss x tokens, tokens
    for i, batch in enumerate(eval_dl):
        if max_batches is not None and i >= max_batches:
            break
        batch.pop("num_tokens")
        with torch.no_grad():
            loss = model(**batch, use_cache=False).loss
        tokens = (batch["labels"][:, 1:] != -100).sum()  # the labels the (shifted) loss was averaged over
        total += torch.stack([loss.float() * tokens, tokens.float()])
    model.train()
    loss_sum, tokens = accelerator.reduce(total, "sum").tolist()
    return round(loss_sum / tokens, 6) if tokens else float("nan")


# --- checkpoints --------------------------------------------------------------------------------------


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a crash mid-save leaves only a `.tmp-` folder, ignored here)."""
    root = Path(run_dir) / "checkpoints"
    found = [p for p in root.glob("step-*") if (p / "progress.json").exists()] if root.exists() else []
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def find_checkpoint(run_dir: Path, resume: str) -> Path | None:
    if resume == "never":
        return None
    if resume == "auto":
        found = checkpoints(run_dir)
        return found[-1] if found else None
    return Path(resume)  # a folder, checked by the CLI


def save_checkpoint(accelerator, run_dir: Path, progress: dict, keep_last: int) -> None:
    """`save_state` into a temporary folder, add the data position, then rename: a crash mid-save leaves the
    previous checkpoint as the latest good one."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{progress['step']:08d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every process writes its RNG state; the main one the rest
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "progress.json").write_text(json.dumps(progress))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def save_final(accelerator, model, out: Path) -> None:
    """The trained weights as a Hugging Face folder (PEFT saves only the adapter). Every process takes part
    in `get_state_dict`, which gathers sharded (FSDP/ZeRO-3) weights onto the main process."""
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        if out.exists():
            shutil.rmtree(out)
    accelerator.unwrap_model(model).save_pretrained(out, is_main_process=accelerator.is_main_process,
                                                    save_function=accelerator.save, state_dict=state_dict)
    accelerator.wait_for_everyone()


class MetricsFile:
    """`metrics.jsonl`, written by the main process. On resume, lines past the checkpoint's step (logged by
    the interrupted run before it died) are dropped, so the file tells one consistent story."""

    def __init__(self, path: Path, main: bool, keep_until: int):
        self.path, self.main = path, main
        if main and path.exists():
            keep = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= keep_until]
            path.write_text("".join(line + "\n" for line in keep) if keep_until else "")

    def write(self, row: dict) -> None:
        if self.main:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")


def main(argv: list[str] | None = None) -> None:
    """Entry point of each process started by `accelerate launch -m llmops.train.loop RECIPE [RESUME]`."""
    from llmops.config import load_config

    args = sys.argv[1:] if argv is None else argv
    recipe = load_config(Recipe, yaml_path=args[0])
    train(recipe, Path(recipe.output_dir), resume=args[1] if len(args) > 1 else "auto")


if __name__ == "__main__":
    main()
