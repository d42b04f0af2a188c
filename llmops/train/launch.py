"""From a validated recipe to a running job: plan (hardware + model), resolve every `auto`, write the run
folder (resolved recipe, accelerate config), then train in-process (one process) or with `accelerate launch`
(several processes or machines), and export the result.

Multi-node: run the same command on every machine with `distributed.machine_rank` set to that machine's rank
(0 on the one at `distributed.main_process_ip`); they map to accelerate's `num_machines`, `machine_rank`,
`main_process_ip` and `main_process_port`. The run folder (`output_dir`) should be on a file system every machine
shares: checkpoints hold every rank's RNG state and are renamed into place by the main process.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from llmops.errors import RuntimeFailure, UsageError
from llmops.train.recipe import Recipe


@dataclass
class RunPlan:
    """Everything a run needs, resolved: shown by `--dry-run`, then executed by `run`."""

    recipe: Recipe
    """The recipe with no `auto` left; `model` is the local folder of the base model (or its id if it is
    not downloaded yet)."""
    base_model: str
    """The `model` value as written in the recipe (recorded as `trained_from`)."""
    run_dir: Path
    plan: dict
    """The hardware planner's `TrainPlan` (processes, precision, method, strategy, memory, notes)."""
    accelerate_config: dict
    command: list[str]
    """The exact launch command (empty when the run trains in this process)."""
    env: dict[str, str] = field(default_factory=dict)

    @property
    def total_processes(self) -> int:
        return self.accelerate_config["num_processes"]

    def to_dict(self) -> dict:
        return {"name": self.recipe.name, "base_model": self.base_model, "run_dir": str(self.run_dir),
                "plan": self.plan, "accelerate_config": self.accelerate_config,
                "command": shlex.join(self.command) if self.command else "(in this process)", "env": self.env,
                "recipe": self.recipe.model_dump(mode="json")}


def plan_recipe(recipe: Recipe, output: Path | None = None, hw=None) -> RunPlan:
    """Resolve every `auto` in `recipe` from the hardware and the model (nothing is downloaded)."""
    from llmops.hardware import detect
    from llmops.paths import llmops_home
    from llmops.plan import model_facts
    from llmops.registry import resolve
    from llmops.train.plan import plan_train

    hw = hw or detect()
    resolved = resolve(recipe.model)
    facts = model_facts(resolved)
    dist, t = recipe.distributed, recipe.train
    # Gradient checkpointing the recipe does not mention is the planner's to choose; micro_batch_size is the
    # largest micro-batch it may use (accumulation keeps the global batch).
    tp = plan_train(facts, hw, method=recipe.method, method_is_default="method" not in recipe.model_fields_set,
                    precision=recipe.precision,
                    num_processes=dist.num_processes, strategy=dist.strategy,
                    gradient_checkpointing=t.gradient_checkpointing if "gradient_checkpointing" in t.model_fields_set
                    else "auto", micro_batch_size=t.micro_batch_size, global_batch_size=t.global_batch_size,
                    gradient_accumulation_steps=t.gradient_accumulation_steps, seq_len=recipe.data.max_seq_len,
                    num_machines=dist.num_machines, lora_rank=recipe.lora.r, lora_dropout=recipe.lora.dropout)
    total = tp.num_processes * dist.num_machines
    if recipe.logging.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise UsageError("logging.tensorboard is on but the tensorboard package is not installed",
                             "pip install tensorboard, or --set logging.tensorboard=false") from None
    run_dir = Path(output or recipe.output_dir or llmops_home() / "runs" / recipe.name).expanduser().resolve()
    local = resolved.local_path()
    final = recipe.model_copy(update={
        "model": str(local) if local else (resolved.hf_id or recipe.model),
        "method": tp.method, "precision": tp.precision, "output_dir": str(run_dir),
        "train": t.model_copy(update={"micro_batch_size": tp.micro_batch_size,
                                      "gradient_accumulation_steps": tp.gradient_accumulation_steps,
                                      "global_batch_size": None, "gradient_checkpointing": tp.gradient_checkpointing}),
        "distributed": dist.model_copy(update={"num_processes": tp.num_processes, "strategy": tp.strategy}),
    })
    config = accelerate_config(final, tp.device, total)
    command, env = [], {}
    # FSDP needs accelerate's launcher even for one process: in-process training would not shard (accelerate
    # builds its FSDP plugin from the variables `accelerate launch` sets), and one process is how FSDP is
    # checked on a single GPU.
    if total > 1 or tp.strategy == "fsdp":
        rank = dist.machine_rank
        config_file = machine_file(run_dir, "accelerate_config.yaml", rank)
        # The rendezvous waits for every machine's launcher at most `distributed.timeout_s` (torch's static
        # rendezvous waits 900 s unless its `timeout` is set), as the collectives do.
        command = ["accelerate", "launch", "--config_file", str(config_file),
                   "--rdzv_conf", f"timeout={dist.timeout_s}",
                   "-m", "llmops.train.loop", str(machine_file(run_dir, "recipe.yaml", rank))]
        if tp.device == "cpu":
            # accelerate's MULTI_CPU type ran one process here; MULTI_GPU with ACCELERATE_USE_CPU=1 runs
            # every rank on the CPU with gloo (measured). Split the cores between the processes.
            threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, hw.cpu.usable_cores // tp.num_processes))
            env = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": threads}
    return RunPlan(final, recipe.model, run_dir, tp.to_dict(), config, command, env)


def accelerate_config(recipe: Recipe, device: str, total_processes: int) -> dict:
    """The `accelerate launch --config_file` contents for this run."""
    dist = recipe.distributed
    strategy = dist.strategy
    config: dict = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "FSDP" if strategy == "fsdp" else "NO" if total_processes == 1 else
        {"ddp": "MULTI_GPU", "deepspeed": "DEEPSPEED"}.get(strategy, "MULTI_GPU"),
        "mixed_precision": {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[recipe.precision],
        "num_processes": total_processes,
        "num_machines": dist.num_machines,
        "machine_rank": dist.machine_rank,
        "main_process_port": dist.main_process_port,
        "use_cpu": device == "cpu",
    }
    if dist.main_process_ip:
        config["main_process_ip"] = dist.main_process_ip
    if strategy == "fsdp":
        config["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_reshard_after_forward": True,
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",  # checkpoints; the final save gathers a full copy
            "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_activation_checkpointing": recipe.train.gradient_checkpointing,
        }
    elif strategy == "deepspeed":
        config["deepspeed_config"] = {
            "zero_stage": 3,
            "gradient_accumulation_steps": recipe.train.gradient_accumulation_steps,
            "gradient_clipping": recipe.train.max_grad_norm or 0.0,
            "zero3_init_flag": True,
            "zero3_save_16bit_model": True,
        }
    return config


def machine_file(run_dir: Path, name: str, machine_rank: int) -> Path:
    """`RUN/name` for the main machine, `RUN/name` with `.machine-RANK` before its suffix for the others: the
    machines share the run folder, and each one's accelerate config (and resolved recipe) holds its own rank.
    With one shared file, the last machine to write it decides every machine's rank, and the rendezvous
    waits forever for the missing one."""
    if machine_rank == 0:
        return run_dir / name
    path = Path(name)
    return run_dir / f"{path.stem}.machine-{machine_rank}{path.suffix}"


def write_run_dir(run: RunPlan, fingerprint: dict[str, str]) -> None:
    from llmops.config import dump_config
    import yaml

    rank = run.recipe.distributed.machine_rank
    run.run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(run.recipe, machine_file(run.run_dir, "recipe.yaml", rank))
    (run.run_dir / "fingerprint.json").write_text(json.dumps(fingerprint, indent=1))
    machine_file(run.run_dir, "accelerate_config.yaml", rank).write_text(
        yaml.safe_dump(run.accelerate_config, sort_keys=False))
    (run.run_dir / "plan.json").write_text(json.dumps(run.plan, indent=2))


def run(run: RunPlan, resume: str = "auto", allow_changed_recipe: bool = False,
        log: Callable[[str], None] = lambda m: None) -> dict:
    """Train (in this process or with `accelerate launch`), then export and register the model.

    `resume`: auto (the latest checkpoint in the run folder), never, or a checkpoint folder. A checkpoint
    is resumed from only if it was written under the same recipe fingerprint (`recipe_fingerprint`), unless
    `allow_changed_recipe`. SIGTERM checkpoints the step in progress and raises `Stopped` (exit 75)."""
    from llmops.train.export import export, register
    from llmops.quiet import engine_output
    from llmops.train.loop import TRAIN_LOG, catch_sigterm, find_checkpoint, train
    from llmops.train.recipe import recipe_fingerprint

    # 1. Which checkpoint, if any, and is it one of this recipe's?
    if resume not in ("auto", "never") and not (Path(resume) / "progress.json").exists():
        raise UsageError(f"--resume {resume}: not a checkpoint folder (no progress.json)",
                         f"checkpoints are under {run.run_dir / 'checkpoints'}")
    if not Path(run.recipe.model).exists():
        _download_base(run)
    fingerprint = recipe_fingerprint(run.recipe)
    finished = run.run_dir / "finished.json"
    recipe_as_given = run.recipe.model_dump(mode="json")
    if resume == "auto" and finished.exists():
        done = _read_json(finished)
        exported = done.get("export", {})
        if (done.get("recipe") == recipe_as_given and done.get("fingerprint") == fingerprint
                and Path(exported.get("model_dir", "")).is_dir()):
            # Export moved a full fine-tune's weights out of RUN/final, so only the registration is redone.
            log(f"{run.run_dir} already holds a finished run of this recipe: registering its model again "
                "without training (pass --resume never to train from scratch)")
            registered = register(run, Path(exported["model_dir"]), log)
            return {**done["summary"], **exported, "registered": registered}
    checkpoint = find_checkpoint(run.run_dir, resume)
    if checkpoint is not None:
        check_same_recipe(checkpoint, fingerprint, allow_changed_recipe, log)

    # 2. The run folder: the resolved recipe and its fingerprint, which every checkpoint copies.
    if resume == "never" and (run.run_dir / "checkpoints").exists():
        import shutil

        shutil.rmtree(run.run_dir / "checkpoints")  # a fresh run: old checkpoints would mix with the new
    write_run_dir(run, fingerprint)
    finished.unlink(missing_ok=True)

    # 3. Train, here or in launched processes; SIGTERM is relayed to them, and they checkpoint and stop.
    resume_arg = str(checkpoint) if checkpoint else "never"
    if not run.command:
        with catch_sigterm() as stop_requested, engine_output(run.run_dir / TRAIN_LOG):
            summary = train(run.recipe, run.run_dir, resume=resume_arg, stop_requested=stop_requested)
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", *run.command[2:], resume_arg]
        log(f"launching {run.total_processes} process{'es' if run.total_processes > 1 else ''}: "
            f"{shlex.join([*run.command, resume_arg])}")
        summary = {**launch(run, command), "resumed_from": str(checkpoint) if checkpoint else None}

    # 4. Export and register (on the main machine), then mark the run done, so rerunning the same command
    #    (a CI retry, say) does not train again. What the steps measured teaches later estimates.
    if run.recipe.distributed.machine_rank != 0:
        return {**summary, "run_dir": str(run.run_dir)}
    record_training(run, log)
    with engine_output(run.run_dir / TRAIN_LOG):  # loading and saving weights is chatty too
        exported = export(run, log=log)
    write_json_atomic(finished, {"recipe": recipe_as_given, "fingerprint": fingerprint, "summary": summary,
                                 "export": exported})
    return {**summary, **exported}


def launch(run: RunPlan, command: list[str]) -> dict:
    """Run `command` (accelerate launch) and wait; the run's metrics when it succeeded.

    The launcher (torch's elastic agent) and the ranks share one stderr: the agent's logs, the ranks' start-up
    output and, on a failure, every process's traceback. All of it goes to RUN/train.log (the ranks write
    their own logs there too) and, with --verbose, to the screen. The ranks' own progress (the progress bar,
    "resuming from") goes to their stdout (`TERMINAL_ON_STDOUT_ENV`), which is shown on our stderr: our stdout
    holds the result. A failure shows its exception lines and the cause read from the launcher's output."""
    from llmops.quiet import TERMINAL_ON_STDOUT_ENV, show_excerpt, verbose
    from llmops.train.loop import COMMAND_PID_ENV, TRAIN_LOG, catch_sigterm, checkpoints, stopped

    log_path = run.run_dir / TRAIN_LOG
    env = {**os.environ, **run.env, COMMAND_PID_ENV: str(os.getpid())}  # ranks end with this command
    if not verbose():
        env[TERMINAL_ON_STDOUT_ENV] = "1"
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    relay(proc.stdout, screen=True)
    launcher_output = relay(proc.stderr, screen=verbose(), log_path=log_path)
    # torch's launcher passes SIGTERM on to every rank, and kills those still running 30 s later
    # (`LocalElasticAgent._shutdown`).
    with catch_sigterm(then=proc.send_signal) as stop_requested:
        returncode = proc.wait()
    output = launcher_output()
    if returncode != 0 and stop_requested():
        found = checkpoints(run.run_dir)
        raise stopped(found[-1] if found else None)
    if returncode != 0:
        from llmops.train.distributed import failure_cause

        if not verbose():
            show_excerpt(output, log_path)
        cause = failure_cause(output, run.recipe)
        raise RuntimeFailure(f"training failed: {cause or f'accelerate launch exited with {returncode}'}",
                             f"the launcher's and training processes' full output is in {log_path}; rerun the "
                             f"same command to resume from the last checkpoint in {run.run_dir / 'checkpoints'}")
    return last_metrics(run.run_dir)


def relay(stream, screen: bool, log_path: Path | None = None, keep: int = 256 * 1024) -> Callable[[], str]:
    """Copy `stream` (a launched process's pipe) to our stderr and/or to the end of `log_path` as it comes, in
    chunks, so progress bars still redraw in place. Returns a function that gives its last `keep` bytes as
    text, once the process has closed it (or 10 s later: a rank that outlived its launcher may hold it open)."""
    import threading

    tail = bytearray()

    def copy() -> None:
        with open(log_path or os.devnull, "ab", buffering=0) as log_file:
            while chunk := os.read(stream.fileno(), 65536):
                if screen:
                    os.write(2, chunk)
                log_file.write(chunk)
                tail.extend(chunk)
                del tail[:-keep]

    thread = threading.Thread(target=copy, name="llmops-launcher-output", daemon=True)
    thread.start()

    def text() -> str:
        thread.join(timeout=10)
        return bytes(tail).decode("utf-8", "replace")

    return text


def check_same_recipe(checkpoint: Path, fingerprint: dict[str, str], allow_changed_recipe: bool,
                      log: Callable[[str], None]) -> None:
    """Refuse (exit 2) to resume from a checkpoint written under another recipe, naming what changed."""
    from llmops.train.recipe import fingerprint_changes

    saved = _read_json(checkpoint / "fingerprint.json")
    if not saved:
        log(f"{checkpoint} records no recipe fingerprint (an older llmops wrote it): resuming without checking")
        return
    changes = fingerprint_changes(saved, fingerprint)
    if not changes:
        return
    if allow_changed_recipe:
        log(f"resuming from {checkpoint} although the recipe changed ({'; '.join(changes)}): "
            "--allow-changed-recipe")
        return
    raise UsageError(f"the recipe changed since checkpoint {checkpoint} was saved: {'; '.join(changes)}",
                     "rerun with the recipe it was saved under; or start over with --resume never (or another "
                     "--output); or continue anyway with --allow-changed-recipe")


def _read_json(path: Path) -> dict:
    """A JSON object from `path`; {} when it is missing or damaged."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json_atomic(path: Path, data: dict) -> None:
    """Through a temporary file, fsync and rename: a crash leaves the old file or the new one, never half."""
    from llmops.atomic import write_atomic

    write_atomic(path, lambda f: f.write(json.dumps(data).encode()))


def _download_base(run: RunPlan) -> None:
    from llmops.registry import ensure_local, resolve

    path = ensure_local(resolve(run.base_model))
    run.recipe = run.recipe.model_copy(update={"model": str(path)})


def record_training(run: RunPlan, log: Callable[[str], None] = lambda m: None) -> dict | None:
    """Append the run's measured time per trained token (the median over its logged steps: a step's window
    also holds the evaluation and checkpoint before it) and the FLOPs estimate's, to $LLMOPS_HOME/
    throughput.jsonl; the next `--dry-run` of this model here scales its estimate by them. A failure to
    record is a warning: it never fails a finished run."""
    import statistics

    from llmops import throughput
    from llmops.estimate import estimate_train
    from llmops.hardware import detect
    from llmops.plan import model_facts
    from llmops.registry import resolve
    from llmops.train.loop import read_jsonl

    try:
        rows = [r for r in read_jsonl(run.run_dir / "metrics.jsonl")
                if r.get("tokens") and r.get("tokens_per_s") and r.get("step", 0) > 1]  # step 1 warms up
        if not rows:
            return None
        hw, plan, seq_len = detect(), run.plan, run.recipe.data.max_seq_len
        roof = estimate_train(plan, model_facts(resolve(run.base_model)), hw, seq_len=seq_len, steps=None,
                              steps_source="")
        line = {"task": "train", "model": run.base_model, "hardware": throughput.hardware_fingerprint(hw),
                "method": plan["method"], "strategy": plan["strategy"], "dtype": plan["precision"],
                "num_processes": plan["num_processes"], "seq_len": seq_len,
                "global_batch_size": plan["global_batch_size"], "steps": len(rows),
                "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in rows), 1),
                "s_per_token": statistics.median(1 / r["tokens_per_s"] for r in rows),
                "roofline_s_per_token": roof.step.value / roof.tokens_per_step}
        throughput.append(line)
        return line
    except Exception as e:
        log(f"warning: could not record this run's throughput: {e}")
        return None


def last_metrics(run_dir: Path) -> dict:
    """Steps, last loss and process count, read back from the metrics file of a launched run."""
    from llmops.train.loop import read_jsonl

    rows = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    if not steps:
        return {}
    return {"steps": steps[-1]["step"], "loss": steps[-1]["loss"], "num_processes": steps[-1]["num_processes"],
            "eval_loss": evals[-1]["eval_loss"] if evals else None}
