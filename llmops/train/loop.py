"""The training loop, on accelerate. It reads top to bottom: accelerator, data, model, optimizer, one
`prepare`, resume, loop (with `accelerator.accumulate`), eval, checkpoint, save.

It runs in-process for one process, or in each process started by `accelerate launch -m llmops.train.loop
RUN_DIR/recipe.yaml` (see `llmops.train.launch`). It takes a fully resolved recipe (no `auto` left, `model` a
local folder) and writes, under the run folder:
- `metrics.jsonl`: one JSON line per logged step (loss, lr, tokens/s, processes) and per evaluation;
- `tensorboard/NAME/` and `mlruns/` when `logging.log_with` names them: the same numbers for those trackers;
- `checkpoints/step-NNNNNNNN/`: `accelerator.save_state` plus `progress.json` (step, epoch, batches seen) and
  copies of the run's `recipe.yaml` and `fingerprint.json` (what a resume checks against);
- `final/`: the trained weights (the whole model, or the LoRA adapter) for `llmops.train.export`;
- `train.log`: what torch, datasets, accelerate and peft print (`llmops.quiet`; on screen with -v).

SIGTERM (a preempted spot machine's notice) stops a run cleanly: every process finishes its step, they all
checkpoint it and `train` raises `Stopped` (exit 75), so rerunning the same command continues the curve.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from llmops.errors import Stopped
from llmops.quiet import engine_output, terminal
from llmops.train.data import build_dataloaders
from llmops.train.distributed import enable_fsdp_on_cpu, process_group_kwargs
from llmops.train.recipe import Recipe

TRAIN_LOG = "train.log"
MIXED_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}


def train(recipe: Recipe, run_dir: Path, resume: str = "auto",
          stop_requested: Callable[[], bool] = lambda: False, when_saved: Callable[[], None] = lambda: None) -> dict:
    """Train as `recipe` says; returns a summary (steps, last loss, processes, checkpoint resumed from).
    `resume`: auto, never or a checkpoint folder. When `stop_requested()` turns true on any process (see
    `catch_sigterm`), the step in progress is finished and checkpointed, then `Stopped` is raised.
    `when_saved()` runs once the trained weights are saved on every process, before the shutdown."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
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
        log_with=recipe.logging.log_with or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard")),
        kwargs_handlers=process_group_kwargs(recipe),
    )
    enable_fsdp_on_cpu(accelerator, recipe)
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

    # 6. Resume: model, optimizer, scheduler and RNG states, and where in which epoch we were.
    progress = {"step": 0, "epoch": 0, "batches_in_epoch": 0}
    checkpoint = resumed_from = find_checkpoint(run_dir, resume)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        progress = json.loads((checkpoint / "progress.json").read_text())
        if main:
            print(f"resuming from {checkpoint} (step {progress['step']}, epoch {progress['epoch']})", file=terminal())
    if any_process(accelerator, stop_requested()):  # stopped while loading: nothing new to save
        raise stopped(checkpoint)

    # 7. Metrics: `metrics.jsonl`, and the trackers the recipe names. Both start after the resume, so that
    #    the steps an interrupted run logged past its checkpoint are replaced, not repeated.
    if recipe.logging.log_with:
        start_trackers(accelerator, recipe, run_dir, resumed_step=progress["step"])
    metrics = MetricsFile(run_dir / "metrics.jsonl", main, keep_until=progress["step"], also=accelerator.log)

    # 8. The loop. A stop request is honoured at the end of a step, by every process at the same step.
    bar = tqdm(total=total_steps, initial=progress["step"], desc=recipe.name, unit="step", dynamic_ncols=True,
               disable=not (main and recipe.logging.progress_bar), file=terminal())
    model.train()
    window = Window()
    last = None
    while progress["step"] < total_steps:
        train_dl.set_epoch(progress["epoch"])
        skip = progress["batches_in_epoch"]
        batches = accelerator.skip_first_batches(train_dl, skip) if skip else train_dl
        for batch in batches:
            real_tokens, rows = batch.pop("num_tokens"), batch.pop("rows")
            with accelerator.accumulate(model):
                # use_cache=False: with a cache transformers ignores the packed-sequence position ids.
                loss = model(**batch, use_cache=False).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()  # a no-op until the last micro-batch of the step (accelerate)
                optimizer.zero_grad()
            progress["batches_in_epoch"] += 1
            window.add(loss.detach(), real_tokens, batch["input_ids"].numel(), rows)
            if not accelerator.sync_gradients:
                continue
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            scheduler.step()
            progress["step"] += 1
            step = progress["step"]
            last = window.flush(accelerator, recipe.logging.row_indices)
            row = {"step": step, "epoch": progress["epoch"], "loss": round(last["loss"], 6),
                   "lr": lr, "tokens": last["tokens"], "tokens_per_s": round(last["tokens_per_s"], 1),
                   "real_token_fraction": round(last["real_fraction"], 4),
                   "num_processes": accelerator.num_processes, **last["rows"]}
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            if step % recipe.logging.every_n_steps == 0 or step == total_steps:
                metrics.write(row)
            # The last step is evaluated and saved after the loop.
            if eval_dl is not None and due(recipe.eval.every_n_steps, step, total_steps):
                metrics.write({"step": step, "eval_loss": evaluate(model, eval_dl, accelerator,
                                                                    recipe.eval.max_batches)})
            stop = any_process(accelerator, stop_requested())
            if stop or due(recipe.checkpoint.every_n_steps, step, total_steps):
                checkpoint = save_checkpoint(accelerator, run_dir, progress, recipe.checkpoint.keep_last)
            if stop:
                bar.close()
                accelerator.end_training()  # flush the trackers
                raise stopped(checkpoint)
            if step >= total_steps:
                break
        else:  # the epoch ran out before max_steps: on to the next one
            progress["epoch"] += 1
            progress["batches_in_epoch"] = 0
    bar.close()

    # 9. Evaluate and save the trained weights (the adapter alone for LoRA; export merges it).
    eval_loss = None
    if eval_dl is not None:
        eval_loss = evaluate(model, eval_dl, accelerator, recipe.eval.max_batches)
        metrics.write({"step": progress["step"], "eval_loss": eval_loss})
    save_final(accelerator, model, run_dir / "final")
    when_saved()
    accelerator.end_training()
    return {"steps": progress["step"], "loss": last["loss"] if last else None, "eval_loss": eval_loss,
            "num_processes": accelerator.num_processes,
            "resumed_from": str(resumed_from) if resumed_from else None}


def due(every: int | None, step: int, total_steps: int) -> bool:
    return bool(every) and step % every == 0 and step < total_steps


def start_trackers(accelerator, recipe: Recipe, run_dir: Path, resumed_step: int) -> None:
    """Start accelerate's trackers offline in the run folder: TensorBoard in `tensorboard/NAME`, MLflow in the
    file store `mlruns` (experiment NAME). A resumed run purges the TensorBoard events past its checkpoint and
    continues the latest MLflow run."""
    init_kwargs: dict = {}
    if resumed_step:
        init_kwargs["tensorboard"] = {"purge_step": resumed_step + 1}
    if "mlflow" in recipe.logging.log_with and accelerator.is_main_process:
        import mlflow

        # A file store: offline, and readable without a database (mlflow-skinny has no SQL store). MLflow 3
        # keeps it in maintenance mode and refuses it unless told this opt-out.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri((run_dir / "mlruns").as_uri())
        previous = mlflow.search_runs(experiment_names=[recipe.name], order_by=["attributes.start_time DESC"],
                                      max_results=1, output_format="list") if resumed_step else []
        init_kwargs["mlflow"] = {"run_id": previous[0].info.run_id if previous else None}
    # Trackers take flat scalars (TensorBoard's hparams refuse lists and None).
    hparams = {"model": recipe.model, "method": recipe.method, "precision": recipe.precision, "seed": recipe.seed,
               **{f"train.{k}": v for k, v in recipe.train.model_dump().items()
                  if isinstance(v, (bool, int, float, str))}}
    accelerator.init_trackers(recipe.name, config=hparams, init_kwargs=init_kwargs)


# --- stopping early -----------------------------------------------------------------------------------


@contextlib.contextmanager
def catch_sigterm(then: Callable[[int], None] = lambda signum: None) -> Iterator[Callable[[], bool]]:
    """While inside, SIGTERM (a spot machine's preemption notice) no longer kills the process: it is noted,
    and `then(signum)` runs. Yields a function that says whether it came. Outside the main thread, where
    Python cannot set handlers, SIGTERM keeps its usual effect."""
    received = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield received.is_set
        return

    def note(signum, frame):
        received.set()
        then(signum)

    previous = signal.signal(signal.SIGTERM, note)
    try:
        yield received.is_set
    finally:
        signal.signal(signal.SIGTERM, previous)


def any_process(accelerator, flag: bool) -> bool:
    """True on every process when `flag` is true on any, so that all of them take the same branch (the
    signal reaches the ranks at different moments; a rank that checkpointed alone would hang the others)."""
    if accelerator.num_processes == 1:
        return flag
    import torch

    return accelerator.reduce(torch.tensor(int(flag), device=accelerator.device), "sum").item() > 0


def stopped(checkpoint: Path | None) -> Stopped:
    """The error for a run stopped on request: exit 75, rerun to continue from `checkpoint`."""
    if checkpoint is None:
        return Stopped("training stopped by SIGTERM before its first checkpoint",
                       "rerun the same command to start it again")
    step = json.loads((checkpoint / "progress.json").read_text())["step"]
    return Stopped(f"training stopped by SIGTERM at step {step}; checkpoint {checkpoint}",
                   "rerun the same command to continue from it")


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
    checkpointing = recipe.train.gradient_checkpointing and not fsdp_checkpoints_activations(accelerator)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if recipe.method == "full":
        return model

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if recipe.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    lora = recipe.lora
    model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    if checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    return model


def fsdp_checkpoints_activations(accelerator) -> bool:
    """Whether accelerate's `prepare` will wrap each transformer block in an activation checkpoint (FSDP with
    `fsdp_activation_checkpointing`, which `llmops.train.launch` sets from train.gradient_checkpointing). Then
    transformers' own gradient checkpointing stays off: both on wrapped every block in two nested checkpoints.
    torch's nesting kept the recompute to one (measured, torch 2.13), but transformers' checkpointing under
    FSDP costs a redundant all-gather in the backward pass; transformers' Trainer refuses the pair and
    recommends FSDP's (https://github.com/huggingface/transformers/issues/30404)."""
    from accelerate.utils import DistributedType

    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    return accelerator.distributed_type == DistributedType.FSDP and bool(plugin and plugin.activation_checkpointing)


class Window:
    """Loss and token counts of the micro-batches since the last optimizer step."""

    def __init__(self):
        self.losses, self.real, self.total, self.rows, self.start = [], 0, 0, [], time.perf_counter()

    def add(self, loss, real_tokens, total_tokens: int, rows) -> None:
        self.losses.append(loss)
        self.real += int(real_tokens)
        self.total += total_tokens
        self.rows += rows.tolist()

    def flush(self, accelerator, with_rows: bool = False) -> dict:
        """Mean loss and token counts over all processes (and, `with_rows`, the row indices each process
        trained on, as `{"rows": [[...] per process]}`), then start a new window."""
        import torch
        from accelerate.utils import gather_object

        loss = accelerator.reduce(torch.stack(self.losses).float().mean(), "mean").item()
        counts = accelerator.reduce(torch.tensor([self.real, self.total], device=accelerator.device), "sum")
        real, total = counts.tolist()
        rows = {"rows": gather_object([self.rows])} if with_rows else {}
        elapsed = time.perf_counter() - self.start
        self.__init__()
        return {"loss": loss, "tokens": int(real), "tokens_per_s": real / elapsed,
                "real_fraction": real / max(total, 1), "rows": rows}


def evaluate(model, eval_dl, accelerator, max_batches: int | None) -> float:
    """Loss per trained token over the evaluation data, summed over all processes."""
    import torch

    model.eval()
    total = torch.zeros(2, device=accelerator.device)  # loss x tokens, tokens
    for i, batch in enumerate(eval_dl):
        if max_batches is not None and i >= max_batches:
            break
        batch.pop("num_tokens"), batch.pop("rows")
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


def save_checkpoint(accelerator, run_dir: Path, progress: dict, keep_last: int) -> Path:
    """`save_state` by every process, plus the data position and the recipe with its fingerprint, put in
    place by a rename (`saved_by_every_process`): a crash mid-save leaves the previous checkpoint as the
    latest good one. Returns the folder."""
    final = Path(run_dir) / "checkpoints" / f"step-{progress['step']:08d}"
    with saved_by_every_process(accelerator, final) as tmp:
        accelerator.save_state(str(tmp))  # every process writes its RNG state; the main one the rest
        if accelerator.is_main_process:
            for name in ("recipe.yaml", "fingerprint.json"):  # written by `llmops.train.launch` for the run
                if (Path(run_dir) / name).exists():
                    shutil.copy2(Path(run_dir) / name, tmp / name)
            (tmp / "progress.json").write_text(json.dumps(progress))
    if accelerator.is_main_process:
        for old in checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


@contextlib.contextmanager
def saved_by_every_process(accelerator, out: Path) -> Iterator[Path]:
    """Yields a temporary folder beside `out` for every process to save into; once all have, the main process
    puts it in place of `out` by a rename. A crash mid-save never leaves a half-written `out`, and no process
    removes a folder that another is writing into: removing an old `out` before `save_pretrained` raced the
    other processes, which make the folder and list it (FileNotFoundError, a failed run at its last step)."""
    tmp = out.with_name(f".tmp-{out.name}")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)  # a crash mid-save left it
    accelerator.wait_for_everyone()
    yield tmp
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)


def save_final(accelerator, model, out: Path) -> None:
    """The trained weights as a Hugging Face folder (PEFT saves only the adapter), put in place by a rename
    (`saved_by_every_process`). Every process takes part in `get_state_dict`, which gathers sharded
    (FSDP/ZeRO-3) weights onto the main process."""
    with saved_by_every_process(accelerator, out) as tmp:
        state_dict = accelerator.get_state_dict(model)
        accelerator.unwrap_model(model).save_pretrained(tmp, is_main_process=accelerator.is_main_process,
                                                        save_function=accelerator.save, state_dict=state_dict)
    accelerator.wait_for_everyone()
    if accelerator.is_local_main_process and not accelerator.is_main_process:
        with contextlib.suppress(OSError):  # not empty, or gone: a folder shared with the main machine
            tmp.rmdir()  # another machine's empty folder: only the main process writes the weights


class MetricsFile:
    """`metrics.jsonl`, written by the main process. On resume, lines past the checkpoint's step (logged by
    the interrupted run before it died) are dropped, so the file tells one consistent story; so is a torn
    last line (a crash mid-write). The trimmed file replaces the old one by a rename. Each row's TRACKED
    numbers also go to `also(values, step=)` (`accelerator.log`: the trackers)."""

    TRACKED = ("loss", "eval_loss", "lr", "tokens_per_s")

    def __init__(self, path: Path, main: bool, keep_until: int, also: Callable[..., None] = lambda values, step: None):
        self.path, self.main, self.also = path, main, also
        if main and path.exists():
            keep = [row for row in read_jsonl(path) if row.get("step", 0) <= keep_until] if keep_until else []
            tmp = path.with_name(f".tmp-{path.name}")
            tmp.write_text("".join(json.dumps(row) + "\n" for row in keep))
            os.replace(tmp, path)

    def write(self, row: dict) -> None:
        if self.main:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            self.also({k: row[k] for k in self.TRACKED if k in row}, step=row["step"])


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file, skipping lines that do not parse (a torn last line after a crash)."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


COMMAND_PID_ENV = "LLMOPS_TRAIN_COMMAND_PID"
"""Set by `llmops train` for the processes it launches: the pid of the command itself."""


def end_with_launchers(poll_s: float = 0.2) -> None:
    """End this process when its launcher (torch's elastic agent, `accelerate launch`) or the `llmops train`
    command above it is gone, killed with SIGKILL, say.

    The agent starts its workers in their own session and nothing ends them when it dies: the orphaned rank
    trained on with the other machines, and at the end the main machine's agent waited in torch's exit barrier
    (`exit_barrier_timeout`, 300 s) for the dead agent. Ended here, the rank's connections close, the other
    ranks' gloo collectives fail at once, and every command exits with an error."""
    import psutil

    try:
        launcher = psutil.Process(os.getppid())
        watched = [launcher]
        if command := os.environ.get(COMMAND_PID_ENV):
            watched.append(psutil.Process(int(command)))
            if launcher.ppid() != int(command):  # the launcher died before we looked: we were adopted
                watched = []
    except psutil.NoSuchProcess:
        watched = []  # gone already: the loop below ends us at once

    def watch() -> None:
        try:
            while watched and all(alive(p) for p in watched):
                time.sleep(poll_s)
            print("llmops: this training process's launcher is gone (was its `llmops train` killed?): ending it",
                  file=terminal(), flush=True)
        finally:
            os._exit(1)

    threading.Thread(target=watch, name="llmops-launcher-watch", daemon=True).start()


def exit_if_stuck_after(grace_s: float) -> None:
    """Once this launched process's work is saved: if it has not exited `grace_s` later, write every
    thread's stack to stderr (RUN/train.log) and end it with exit 0, as it would have ended.

    Seen once in several full test runs under load: both machines of a two-machine run had saved the final
    weights, and a rank did not exit. Its launcher waited for it, the main machine's launcher waited for that
    one in torch's exit barrier (`exit_barrier_timeout`, 300 s), and both `llmops train` commands hung past
    `distributed.timeout_s`. Nothing is left to do by then, so a stuck shutdown does not fail the run; the
    stacks say where it stuck. Should Python itself not run again (stuck holding the interpreter),
    faulthandler's own thread writes the stacks and exits 1 a little later."""
    import faulthandler

    def end() -> None:
        time.sleep(grace_s)
        print(f"llmops: this training process saved its work but had not exited {grace_s:g} s later "
              "(distributed.timeout_s); ending it. Where it was stuck:", file=sys.__stderr__, flush=True)
        faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(0)

    threading.Thread(target=end, name="llmops-exit-watch", daemon=True).start()
    faulthandler.dump_traceback_later(grace_s + 15, exit=True, file=sys.__stderr__)


def alive(process) -> bool:
    """Whether a `psutil.Process` still runs: an ended one may linger as a zombie until its parent (or, for an
    orphan, a reaper that a container may lack) collects its exit status."""
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def main(argv: list[str] | None = None) -> None:
    """Entry point of each process started by `accelerate launch -m llmops.train.loop RECIPE [RESUME]`.
    Exits 75 when stopped by SIGTERM (forwarded by the launcher) after checkpointing."""
    from llmops.config import load_config

    args = sys.argv[1:] if argv is None else argv
    end_with_launchers()
    with catch_sigterm() as stop_requested:
        recipe = load_config(Recipe, yaml_path=args[0])
        try:
            with engine_output(Path(recipe.output_dir) / TRAIN_LOG):
                train(recipe, Path(recipe.output_dir), resume=args[1] if len(args) > 1 else "auto",
                      stop_requested=stop_requested,
                      when_saved=lambda: exit_if_stuck_after(recipe.distributed.timeout_s))
        except Stopped as e:
            print(f"llmops: {e.message}", file=sys.stderr)
            sys.exit(Stopped.exit_code)


if __name__ == "__main__":
    main()
