"""Planning a batch job: resolve the model, read the input's shape, plan the engine, fix the job's identity
and check the output folder, all before anything is written or any engine starts (so every refusal is
fast and leaves the folder as it was)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llmops.batch.config import BatchConfig
from llmops.batch.identity import AdapterIdentity, EngineIdentity, JobIdentity, ModelIdentity
from llmops.batch.inputs import InputSpec, check_custom_ids, count_rows, open_input, unit_sizes
from llmops.batch.outputs import Manifest, OutputDir
from llmops.batch.engine import DEFAULT_GRACE_PERIOD_S
from llmops.batch.embed import Embed
from llmops.batch.tasks import Generate, RowTask
from llmops.errors import UsageError


@dataclass
class EngineWork:
    """Everything an engine needs to run its share of a job, wherever it runs: in this process, in a local
    worker process (pickled on its stdin) or in a Ray actor (`ray.put`). Nothing is re-planned there."""

    spec: InputSpec
    """With absolute locations: openable from any process and any node that sees the same storage."""
    row_counts: list[int]
    chunk_rows: int
    task: RowTask
    identity: JobIdentity
    output_dir: str
    engine: Any
    """llmops.vllm_engine.ResolvedEngine"""
    grace_period_s: float = DEFAULT_GRACE_PERIOD_S
    """Time from a stop (SIGTERM) to the end: finished rows are committed within it."""

    @property
    def unit_sizes(self) -> dict[str, int]:
        return unit_sizes(self.row_counts, self.chunk_rows)


@dataclass
class BatchJob:
    """A job resolved and checked, before anything is written or started."""

    config: BatchConfig
    input_spec: InputSpec
    row_counts: list[int]
    unit_sizes: dict[str, int]
    """Rows of every unit, by key, in input order."""
    plan: Any
    """llmops.plan.EnginePlan"""
    model_name: str
    model_path: Path | None
    identity: JobIdentity
    output: OutputDir
    overwrite: bool
    base_model: str | None = None
    """When `model_name` is a LoRA adapter: the model it runs on (what `model_path` holds)."""
    task: RowTask | None = None
    """What each row becomes (`tasks.py`); from the config when not given."""

    def __post_init__(self):
        self.task = self.task or task_for(self.config, "generate" if self.config.task == "auto" else self.config.task,
                                          self.input_spec.format == "openai")

    @property
    def units(self) -> list[str]:
        return list(self.unit_sizes)

    @property
    def engine(self):
        """The engine, resolved once from the plan (llmops.vllm_engine.ResolvedEngine): the manifest, the
        dry run and every placement use this one."""
        from llmops.vllm_engine import resolve_engine

        path = self.model_path or f"<{self.model_name}, not downloaded yet>"
        if getattr(self, "_engine_for", None) != path:
            self._engine, self._engine_for = resolve_engine(self.plan, path), path
        return self._engine

    def work(self, grace_period_s: float = DEFAULT_GRACE_PERIOD_S) -> EngineWork:
        spec = self.input_spec
        absolute = replace(spec, files=tuple(spec.locations()))
        return EngineWork(absolute, list(self.row_counts), self.config.chunk_rows, self.task, self.identity,
                          self.output.location, self.engine, grace_period_s)

    def with_model(self, model_path: Path) -> None:
        """Record the model's folder once it is local, and its digest in the identity."""
        from llmops.fingerprint import model_digest

        self.model_path = model_path
        self.identity.model = self.identity.model.model_copy(update={"path": str(model_path),
                                                                     "digest": model_digest(model_path)})

    def manifest(self) -> Manifest:
        return Manifest(job=self.identity, job_key=self.identity.key(), status="running",
                        files=["config.yaml", *(["output.jsonl", "errors.jsonl"]
                                                if self.input_spec.format == "openai" else [])],
                        input_paths=self.input_spec.locations(),
                        engine_args=self.engine.llm_args, engine_env=self.engine.env)

    def warnings(self) -> list[str]:
        dp = self.plan.data_parallel_size
        if dp > 1 and len(self.unit_sizes) < 2 * dp:
            return [f"{len(self.unit_sizes)} shards for {dp} engines leaves engines idle: lower chunk_rows "
                    f"(--set chunk_rows=N) to about {max(1, sum(self.row_counts) // (4 * dp))}"]
        return []


def task_for(config: BatchConfig, name: str = "generate", openai: bool = False) -> RowTask:
    """The job's row task: `name` is the config's task with "auto" resolved (`plan_batch`); rows too long for
    the context are handled as `long.on_long` says (`long.py`)."""
    from llmops.batch.label import label_task
    from llmops.batch.long import LongDocuments

    labeling = label_task(config.label, config.sampling)
    on_long = config.long.on_long
    if name == "embed":
        if labeling is not None:
            raise UsageError("--choices, --json-schema and --regex constrain generated answers: they do not apply "
                             "to an embedding job", "drop them, or use --task generate")
        output = config.output if on_long is None else config.output.model_copy(update={"on_long": on_long})
        return Embed(output, openai=openai)
    task = labeling or Generate(config.sampling)
    if on_long == "chunk" and labeling is not None:
        raise UsageError("--on-long chunk combines free-text answers: it does not apply to --choices, "
                         "--json-schema or --regex", "use --on-long truncate for labeling long documents")
    if on_long == "chunk" and "{parts}" not in config.long.reduce_prompt:
        raise UsageError(f"--reduce-prompt {config.long.reduce_prompt!r} has no {{parts}}",
                         "put {parts} where the pieces' answers go")
    if on_long in (None, "fail"):
        return task
    return LongDocuments(task, config.long, config.input.prompt_template)


def plan_batch(config: BatchConfig, input_path: str, output_dir: str | Path, *,
               overwrite: bool = False) -> BatchJob:
    """Resolve the model, read the input's shape and content digest, plan the engine and check the output
    folder; no writes. A model that is already local is digested here (cached after its first time)."""
    from llmops.hardware import detect
    from llmops.plan import model_facts
    from llmops.registry import all_entries, resolve_adapters
    from llmops.vllm_engine import plan_for

    _check_output_outside_input(input_path, output_dir)
    spec = open_input(input_path, config.input)
    asked = check_custom_ids(spec) if spec.format == "openai" else set()
    # An adapter name gives its base and itself; requests may name other adapters of that base.
    entries = all_entries()
    resolved, adapters = resolve_adapters(config.model, sorted(n for n in asked if n in entries
                                                               and entries[n][0].is_adapter))
    counts = count_rows(spec)
    rows = sum(counts)
    facts = model_facts(resolved)
    name = config.task if config.task != "auto" else ("embed" if facts.task == "embed" else "generate")
    plan = plan_for(config.engine, facts, detect(), "batch", rows=rows,
                    prompt_tokens=typical_prompt_tokens(spec, rows),
                    max_tokens=config.sampling.max_tokens if name == "generate" else 0,
                    lora_ranks=tuple(a.spec.lora_rank or 16 for a in adapters),  # 16: PEFT's default r
                    task=name)
    model = ModelIdentity(name=resolved.name, adapters={a.name: _adapter_identity(a) for a in adapters},
                          adapter=adapters[0].name if adapters and adapters[0].name == config.model else None)
    task = task_for(config, name, spec.format == "openai")
    spec = replace(spec, openai_urls=task.openai_urls)
    if task.name == "embed":
        _check_embedding_options(config, resolved)
    identity = JobIdentity(input=spec.identity(), model=model,
                           sampling=config.sampling.model_dump(mode="json") if task.name != "embed" else {},
                           engine=EngineIdentity(dtype=plan.dtype, max_model_len=plan.max_model_len),
                           chunk_rows=config.chunk_rows, task=task.identity())
    job = BatchJob(config, spec, counts, unit_sizes(counts, config.chunk_rows), plan, model.adapter or model.name,
                   None, identity, OutputDir(output_dir), overwrite, adapters[0].spec.base if adapters else None,
                   task)
    if (path := resolved.local_path()) is not None:
        job.with_model(path)
    job.output.check(job.identity, overwrite)
    return job


# Bytes of input per prompt token: about 4 characters a token for English text with BPE tokenizers, plus the
# JSON or Parquet framing around each prompt. Only the planner's estimate of the job's size uses it.
INPUT_BYTES_PER_PROMPT_TOKEN = 4


def typical_prompt_tokens(spec: InputSpec, rows: int) -> int | None:
    """A rough prompt length from the input's size, without reading it again (the plan only needs a scale)."""
    if rows <= 0:
        return None
    size = spec.total_bytes()
    if size is None:
        return None
    return max(1, size // rows // INPUT_BYTES_PER_PROMPT_TOKEN)


def _adapter_identity(adapter) -> AdapterIdentity:
    from llmops.fingerprint import model_digest

    path = adapter.local_path()
    if path is None:
        raise UsageError(f"the adapter folder {adapter.spec.source} of {adapter.name!r} is missing",
                         f"train it again, or remove the entry with `llmops models rm {adapter.name}`")
    return AdapterIdentity(path=str(path), digest=model_digest(path))


def resolved_config(config: BatchConfig, plan) -> BatchConfig:
    """`config` with every "auto" engine field replaced by the planned value (what is written to config.yaml)."""
    from pydantic import ValidationError

    from llmops.vllm_engine import EngineConfig

    planned = {k: getattr(config.engine, k) if getattr(plan, k) is None else getattr(plan, k)
               for k in EngineConfig.model_fields}
    try:
        engine = EngineConfig(**planned)
    except ValidationError as e:  # a planned value the config cannot say (an encoder's 0 GiB KV cache): as given
        for error in e.errors():
            planned[error["loc"][0]] = getattr(config.engine, error["loc"][0])
        engine = EngineConfig(**planned)
    return config.model_copy(update={"engine": engine})


def _check_embedding_options(config: BatchConfig, resolved) -> None:
    """Refuse, before any engine starts, the embedding options this model cannot honour."""
    from llmops.batch.config import SamplingConfig
    from llmops.registry import matryoshka_dimensions, read_model_config

    if config.sampling != SamplingConfig():
        raise UsageError("sampling settings do not apply to an embedding job (--task embed)",
                         "drop the --max-tokens/--temperature/sampling.* settings, or use --task generate")
    if config.output.dimensions is not None:
        sizes = matryoshka_dimensions(read_model_config(resolved) or {})
        if not sizes:
            raise UsageError(f"{resolved.name} is not a Matryoshka model: output.dimensions cannot shorten its "
                             "embeddings", "drop output.dimensions (the model's full size is used)")
        if sizes is not True and config.output.dimensions not in sizes:
            raise UsageError(f"{resolved.name} supports output.dimensions of {', '.join(map(str, sizes))}, not "
                             f"{config.output.dimensions}")


def _check_output_outside_input(input_path: str, output_dir: str | Path) -> None:
    """An output folder inside a folder (or glob, or bucket prefix) that is the input would be read as input
    by the next run, which then refused every resume ("mixes input formats"): refuse it before anything runs."""
    from llmops.storage import is_uri

    def folder_of(location: str) -> str:
        glob_at = min((location.find(c) for c in "*?[" if c in location), default=-1)
        if glob_at >= 0:
            return location[:location.rfind("/", 0, glob_at) + 1]
        if is_uri(location):
            return location if location.endswith("/") else ""  # an object, or a prefix given with its '/'
        return location if Path(location).is_dir() else ""

    inputs, output = folder_of(str(input_path)), str(output_dir)
    if not inputs or input_path.startswith("hf://") or is_uri(inputs) != is_uri(output):
        return
    if is_uri(output):
        inside = (output.rstrip("/") + "/").startswith(inputs.rstrip("/") + "/")
    else:
        inside = Path(output).resolve().is_relative_to(Path(inputs).resolve())
    if inside:
        raise UsageError(f"the output folder {output} is inside the input {input_path}: the next run would read "
                         "the results as input", "give an --output outside the input folder")

