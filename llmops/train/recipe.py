"""The training recipe: one pydantic model, every field typed, defaulted and documented.

`load_recipe` reads a recipe file (or the name of a shipped recipe), applies `--set` overrides, resolves data
paths against the recipe's folder and checks what can be checked without loading anything: the schema, and
that local data files exist and hold the columns their format needs. `auto` fields stay `auto` here; the
planner (`llmops.train.launch.plan_recipe`) resolves them.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from llmops.config import StrictModel, deep_merge, load_config, parse_sets, read_yaml
from llmops.errors import ConfigError, UsageError
from llmops.registry import DEFAULT_MODEL, NAME_PATTERN

LOCAL_DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# Columns each data format needs; `auto` picks the first format whose columns are all present.
FORMAT_COLUMNS = {"chat": ("messages",), "prompt_completion": ("prompt", "completion"), "text": ("text",)}


class DataConfig(StrictModel):
    """Where the examples come from and how they become token sequences."""

    path: str | list[str]
    """Local JSONL/JSON/Parquet/CSV file(s), relative to the recipe file, or a Hugging Face dataset name."""
    format: Literal["auto", "chat", "prompt_completion", "text"] = "auto"
    """`chat`: a `messages` column (loss on assistant turns); `prompt_completion`: `prompt` and `completion`
    columns (loss on the completion); `text`: a `text` column (loss on all of it). `auto` looks at the columns."""
    split: str = "train"
    """Split to read from a Hugging Face dataset."""
    eval_path: str | list[str] | None = None
    """Separate evaluation file(s) or dataset; else `eval_fraction` of the training data is held out."""
    eval_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Fraction of the training data held out for evaluation when `eval_path` is not given."""
    max_seq_len: int = Field(default=1024, ge=8)
    """Longest sequence in tokens; longer examples are truncated."""
    packing: bool = True
    """Pack several examples into each sequence of up to `max_seq_len` tokens (attention stays within each
    example); without packing, batches group examples of similar length so little is padding."""


class LoraConfig(StrictModel):
    """LoRA adapter settings (used by `method: lora` and `method: qlora`)."""

    r: int = Field(default=16, ge=1)
    """Rank of the adapter matrices."""
    alpha: int = Field(default=32, ge=1)
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"
    """Module names to adapt (e.g. [q_proj, v_proj]), or `all-linear`."""


class TrainConfig(StrictModel):
    """Optimisation: length of the run, batch shape, learning rate and schedule."""

    epochs: int = Field(default=1, ge=1)
    """Passes over the training data (ignored when `max_steps` is set)."""
    max_steps: int | None = Field(default=None, ge=1)
    """Stop after this many optimizer steps."""
    micro_batch_size: int = Field(default=4, ge=1)
    """Sequences per process per forward pass."""
    gradient_accumulation_steps: int | None = Field(default=None, ge=1)
    """Forward passes per optimizer step; derived from `global_batch_size` when that is given, else 1."""
    global_batch_size: int | None = Field(default=None, ge=1)
    """Sequences per optimizer step over all processes = micro_batch_size x accumulation x processes."""
    learning_rate: float = Field(default=2e-5, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    """Clip gradients to this norm; null turns clipping off."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% slower."""

    @model_validator(mode="after")
    def _one_way_to_size_the_batch(self) -> TrainConfig:
        if self.global_batch_size is not None and self.gradient_accumulation_steps is not None:
            raise ValueError("give `train.global_batch_size` or `train.gradient_accumulation_steps`, not both")
        return self


class CheckpointConfig(StrictModel):
    every_n_steps: int | None = Field(default=None, ge=1)
    """Save the full training state (model, optimizer, scheduler, RNG, data position) every N steps."""
    keep_last: int = Field(default=2, ge=1)
    """How many checkpoints to keep; older ones are deleted."""


class EvalConfig(StrictModel):
    every_n_steps: int | None = Field(default=None, ge=1)
    """Evaluate every N steps (and at the end) when there is evaluation data."""
    max_batches: int | None = Field(default=None, ge=1)
    """Cap on evaluation batches per evaluation."""


class LoggingConfig(StrictModel):
    every_n_steps: int = Field(default=1, ge=1)
    """How often a line goes to the metrics file."""
    progress_bar: bool = True
    """A progress bar on stderr (main process only): step, loss, learning rate, tokens/s, ETA."""
    log_with: list[Literal["tensorboard", "mlflow"]] = []
    """Trackers that also get the metrics, offline in the run folder: `tensorboard` (`tensorboard --logdir
    OUTPUT/tensorboard`) and `mlflow` (a file store: `mlflow ui --backend-store-uri OUTPUT/mlruns`). Each
    needs its package: `pip install 'llmops[track]'`."""
    row_indices: bool = False
    """Add to each step's metrics line the training rows each process trained on (`rows`: one list of row
    indices per process), to check data-parallel sharding and that a resumed run sees the same data."""

    @field_validator("log_with")
    @classmethod
    def _trackers_are_installed(cls, value: list[str]) -> list[str]:
        from importlib.util import find_spec

        # The `mlflow` module comes from the mlflow or the lighter mlflow-skinny distribution.
        missing = [name for name in dict.fromkeys(value) if find_spec(name) is None]
        if missing:
            raise ValueError(f"{' and '.join(missing)} not installed: pip install 'llmops[track]' (or "
                             f"{' '.join('mlflow-skinny' if m == 'mlflow' else m for m in missing)}), or drop "
                             f"{'them' if len(missing) > 1 else 'it'} from logging.log_with")
        return list(dict.fromkeys(value))

    @property
    def tensorboard(self) -> bool:
        # Read by launch.plan_recipe's older package check, which the validator above now makes redundant.
        return "tensorboard" in self.log_with


class DistributedConfig(StrictModel):
    """How many processes and machines, and how the model is spread over them."""

    num_processes: int | Literal["auto"] = "auto"
    """Processes per machine; `auto`: one per GPU, one on a CPU-only machine."""
    strategy: Literal["auto", "ddp", "fsdp", "deepspeed"] = "auto"
    """`ddp` copies the model to every GPU; `fsdp` and `deepspeed` (ZeRO-3) shard it. `auto`: ddp when the
    model fits on one device, else fsdp."""
    num_machines: int = Field(default=1, ge=1)
    """Machines taking part; run the same command on each with its own `machine_rank`."""
    machine_rank: int = Field(default=0, ge=0)
    main_process_ip: str | None = None
    """Address of the machine with rank 0 (needed when num_machines > 1)."""
    main_process_port: int = Field(default=29500, ge=1, le=65535)
    timeout_s: int = Field(default=600, ge=1)
    """How long a process waits for the others in a collective (or to join) before the run fails: a rank
    or machine that died then ends the run with an error instead of a hang. Also how long a process that
    saved the trained weights may take to exit before it is ended."""

    @model_validator(mode="after")
    def _multi_node(self) -> DistributedConfig:
        if self.num_machines > 1 and not self.main_process_ip:
            raise ValueError("`distributed.main_process_ip` is required when num_machines > 1")
        if self.machine_rank >= self.num_machines:
            raise ValueError(f"`distributed.machine_rank` must be below num_machines ({self.num_machines})")
        return self


class ExportConfig(StrictModel):
    merge_lora: bool = True
    """Merge the LoRA adapter into the base weights (a plain model that serve and batch load by name);
    false saves the adapter alone (not registered: the registry holds whole models)."""
    add_to_registry: bool = True
    """Register the result under `name` in the user registry."""


class Recipe(StrictModel):
    """A fine-tuning run: `llmops train RECIPE.yaml`."""

    name: str
    """Name the trained model is registered under (`llmops serve NAME`, `llmops batch --model NAME`)."""
    model: str = DEFAULT_MODEL
    """Base model: registry alias, local folder or Hugging Face id."""
    data: DataConfig
    method: Literal["auto", "full", "lora", "qlora"] = "lora"
    """`full` trains every weight; `lora` trains small adapters; `qlora` adds a 4-bit base (CUDA only);
    `auto` picks full when it fits in memory, else lora, else qlora. Not set: lora, or qlora on GPUs where
    lora does not fit."""
    lora: LoraConfig = LoraConfig()
    train: TrainConfig = TrainConfig()
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """`auto`: bf16 where the hardware computes in it natively (recent GPUs, AVX512-BF16/AMX CPUs), else
    fp16 on older GPUs and fp32 on other CPUs."""
    seed: int = 42
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    logging: LoggingConfig = LoggingConfig()
    distributed: DistributedConfig = DistributedConfig()
    export: ExportConfig = ExportConfig()
    output_dir: str | None = None
    """Run folder (checkpoints, metrics, the exported model); default `$LLMOPS_HOME/runs/NAME`."""

    @field_validator("name")
    @classmethod
    def _name_is_a_registry_name(cls, value: str) -> str:
        if not NAME_PATTERN.match(value):
            raise ValueError("use lower-case letters, digits, '.', '-' and '_', starting with a letter or digit")
        return value


# --- identity -----------------------------------------------------------------------------------------

# Recipe fields that do not change the trained weights: names and places, how the run is logged, evaluated,
# checkpointed and exported, and how the machines find each other.
NOT_IN_FINGERPRINT = ("name", "output_dir", "checkpoint", "eval", "logging", "export", "distributed.machine_rank",
                      "distributed.main_process_ip", "distributed.main_process_port", "distributed.timeout_s")


def recipe_fingerprint(recipe: Recipe) -> dict[str, str]:
    """What decides a resolved recipe's training result, as {dotted field: JSON value}: every field not in
    NOT_IN_FINGERPRINT, plus the content digests of the local data files and of the base model's folder
    (their paths then do not count, so a moved copy is the same data). Stored with every checkpoint."""
    from llmops.fingerprint import files_digest, model_digest

    fields = {key: json.dumps(value) for key, value in _flatten(recipe.model_dump(mode="json")).items()
              if not any(key == skip or key.startswith(skip + ".") for skip in NOT_IN_FINGERPRINT)
              and not (recipe.method == "full" and key.startswith("lora."))}
    for key in ("path", "eval_path"):
        paths = as_list(getattr(recipe.data, key))
        local = [p for p in paths if is_local(p)]
        if local:
            fields[f"data.{key} content"] = files_digest(local)
        if local and len(local) == len(paths):
            del fields[f"data.{key}"]
    if Path(recipe.model).is_dir():
        del fields["model"]
        fields["model content"] = model_digest(recipe.model)
    return fields


def fingerprint_changes(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """The fields that differ, each as `field: old -> new` (content digests by name alone)."""
    changes = []
    for key in sorted(old.keys() | new.keys()):
        if old.get(key) != new.get(key):
            changes.append(f"{key} differs" if key.endswith("content") else
                           f"{key}: {old.get(key, '(unset)')} -> {new.get(key, '(unset)')}")
    return changes


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# --- loading ------------------------------------------------------------------------------------------


def shipped_recipes() -> dict[str, Path]:
    """Recipes shipped with llmops: inside the package (wheel installs), then the repository's `recipes/`."""
    found: dict[str, Path] = {}
    folders = [Path(__file__).resolve().parents[2] / "recipes"]
    packaged = resources.files("llmops").joinpath("recipes")
    if packaged.is_dir():
        folders.insert(0, Path(str(packaged)))
    for folder in folders:
        if folder.is_dir():
            for file in sorted(folder.glob("*.yaml")):
                found.setdefault(file.stem, file)
    return found


def find_recipe(recipe: str | Path) -> Path:
    """A recipe file path, or the name of a shipped recipe (`lora-smollm2`)."""
    path = Path(recipe).expanduser()
    if path.exists():
        return path.resolve()
    shipped = shipped_recipes()
    if str(recipe) in shipped:
        return shipped[str(recipe)]
    names = ", ".join(shipped) or "none found"
    raise UsageError(f"recipe {str(recipe)!r} is neither a file nor a shipped recipe",
                     f"shipped recipes: {names}")


def load_recipe(recipe: str | Path, sets: list[str] | None = None, flags: dict | None = None,
                check_files: bool = True) -> Recipe:
    """Validate a recipe and its local data files (nothing is loaded or downloaded); raises ConfigError."""
    path = find_recipe(recipe)
    data = read_yaml(path)
    _resolve_paths(data, path.parent)  # paths in the file are relative to the file,
    overrides = parse_sets(sets or [])
    _resolve_paths(overrides, Path.cwd())  # paths typed with --set to the current folder
    data = deep_merge(data, overrides)
    config = load_config(Recipe, yaml_data=data, flags=flags, source=str(path))
    if check_files:
        problems = check_data(config.data)
        if problems:
            raise ConfigError(str(path), problems)
    return config


def _resolve_paths(data: dict, base: Path) -> None:
    """Make local data paths absolute, relative to the recipe's folder (HF dataset names stay as they are)."""
    section = data.get("data")
    if not isinstance(section, dict):
        return
    for key in ("path", "eval_path"):
        value = section.get(key)
        if isinstance(value, str):
            section[key] = _resolve_one(value, base)
        elif isinstance(value, list):
            section[key] = [_resolve_one(v, base) if isinstance(v, str) else v for v in value]
    if isinstance(data.get("output_dir"), str):
        data["output_dir"] = str((base / Path(data["output_dir"]).expanduser()).resolve())


def _resolve_one(value: str, base: Path) -> str:
    candidate = Path(value).expanduser()
    if is_local(value) or (base / candidate).exists():
        return str((base / candidate).resolve())
    return value


def is_local(path: str) -> bool:
    """A data path names a local file when it has a data-file suffix or exists; otherwise a hub dataset."""
    return Path(path).suffix.lower() in LOCAL_DATA_SUFFIXES or Path(path).exists()


def as_list(value: str | list[str] | None) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def check_data(data: DataConfig) -> list[tuple[str, str]]:
    """Problems with local data files: missing files, unknown suffixes, columns the format needs."""
    problems: list[tuple[str, str]] = []
    for key in ("path", "eval_path"):
        for file in as_list(getattr(data, key)):
            if not is_local(file):
                continue  # a Hugging Face dataset: checked when it is loaded
            p = Path(file)
            if not p.is_file():
                problems.append((f"data.{key}", f"file not found: {file}"))
            elif p.suffix.lower() not in LOCAL_DATA_SUFFIXES:
                problems.append((f"data.{key}", f"unsupported file type {p.suffix!r} "
                                                f"(use {', '.join(LOCAL_DATA_SUFFIXES)})"))
            else:
                try:
                    columns = peek_columns(p)
                except (OSError, ValueError) as e:
                    problems.append((f"data.{key}", f"cannot read {file}: {e}"))
                    continue
                problem = format_problem(data.format, columns)
                if problem:
                    problems.append(("data.format", f"{file}: {problem}"))
                problems += [(f"data.{key}", line) for line in bad_json_lines(p)]
    return problems


def bad_json_lines(path: Path, limit: int = 5) -> list[str]:
    """The first `limit` lines of a JSON-lines file that are not a JSON object, as `FILE line N: why` (a
    malformed line passed validation, then the run failed in `datasets` with exit 1). Reads the whole file:
    validation is the one place that can say it before anything loads."""
    if LOCAL_DATA_SUFFIXES.get(path.suffix.lower()) != "json":
        return []
    found: list[str] = []
    with path.open("rb") as f:
        if f.read(1) == b"[":  # a .json array of records: json.load in peek_columns has parsed it whole
            return []
        f.seek(0)
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                found.append(f"{path} line {number}: not valid JSON ({e})")
            else:
                if not isinstance(record, dict):
                    found.append(f"{path} line {number}: not a JSON object")
            if len(found) >= limit:
                found.append(f"{path}: more lines like these may follow")
                break
    return found


def format_problem(fmt: str, columns: list[str]) -> str | None:
    """Why `columns` cannot be read as `fmt`, or None when they can."""
    if fmt == "auto":
        if detect_format(columns) is None:
            return (f"no known columns (found {', '.join(columns) or 'none'}); chat data needs `messages`, "
                    "prompt_completion `prompt` and `completion`, text `text`")
        return None
    missing = [c for c in FORMAT_COLUMNS[fmt] if c not in columns]
    if missing:
        return f"format {fmt} needs column(s) {', '.join(missing)}; found {', '.join(columns) or 'none'}"
    return None


def detect_format(columns: list[str]) -> str | None:
    for fmt, needed in FORMAT_COLUMNS.items():
        if all(c in columns for c in needed):
            return fmt
    return None


def peek_columns(path: Path) -> list[str]:
    """Column names of a local data file, reading only its first record (or schema)."""
    kind = LOCAL_DATA_SUFFIXES[path.suffix.lower()]
    if kind == "parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    with path.open() as f:
        if kind == "csv":
            import csv

            return next(csv.reader(f), [])
        if path.suffix.lower() == ".json":  # a JSON array of records, or JSON lines with a .json name
            head = f.read(1)
            f.seek(0)
            if head == "[":
                records = json.load(f)
                return list(records[0]) if records else []
        for line in f:
            if line.strip():
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("each line must be a JSON object")
                return list(record)
    return []
