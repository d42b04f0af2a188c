"""Planning a batch job: resolve the model, read the input's shape, plan the engine, fix the job's identity
and check the output folder, all before anything is written or any engine starts (so every refusal is
fast and leaves the folder as it was)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmops.batch.config import BatchConfig
from llmops.batch.identity import AdapterIdentity, EngineIdentity, JobIdentity, ModelIdentity
from llmops.batch.inputs import InputSpec, check_custom_ids, count_rows, open_input, unit_sizes
from llmops.batch.outputs import Manifest, OutputDir
from llmops.errors import UsageError


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

    @property
    def units(self) -> list[str]:
        return list(self.unit_sizes)

    def with_model(self, model_path: Path) -> None:
        """Record the model's folder once it is local, and its digest in the identity."""
        from llmops.fingerprint import model_digest

        self.model_path = model_path
        self.identity.model = self.identity.model.model_copy(update={"path": str(model_path),
                                                                     "digest": model_digest(model_path)})

    def manifest(self) -> Manifest:
        from llmops.vllm_engine import engine_args, engine_env

        return Manifest(job=self.identity, job_key=self.identity.key(), status="running",
                        files=["config.yaml", *(["output.jsonl", "errors.jsonl"]
                                                if self.input_spec.format == "openai" else [])],
                        input_paths=self.input_spec.locations(),
                        engine_args=engine_args(self.plan, self.model_path), engine_env=engine_env(self.plan))

    def warnings(self) -> list[str]:
        dp = self.plan.data_parallel_size
        if dp > 1 and len(self.unit_sizes) < 2 * dp:
            return [f"{len(self.unit_sizes)} shards for {dp} engines leaves engines idle: lower chunk_rows "
                    f"(--set chunk_rows=N) to about {max(1, sum(self.row_counts) // (4 * dp))}"]
        return []


def plan_batch(config: BatchConfig, input_path: str, output_dir: str | Path, *,
               overwrite: bool = False) -> BatchJob:
    """Resolve the model, read the input's shape and content digest, plan the engine and check the output
    folder; no writes. A model that is already local is digested here (cached after its first time)."""
    from llmops.hardware import detect
    from llmops.plan import model_facts
    from llmops.registry import all_entries, resolve_adapters
    from llmops.vllm_engine import plan_for

    spec = open_input(input_path, config.input)
    asked = check_custom_ids(spec) if spec.format == "openai" else set()
    # An adapter name gives its base and itself; requests may name other adapters of that base.
    entries = all_entries()
    resolved, adapters = resolve_adapters(config.model, sorted(n for n in asked if n in entries
                                                               and entries[n][0].is_adapter))
    counts = count_rows(spec)
    rows = sum(counts)
    plan = plan_for(config.engine, model_facts(resolved), detect(), "batch", rows=rows,
                    prompt_tokens=typical_prompt_tokens(spec, rows), max_tokens=config.sampling.max_tokens,
                    lora_ranks=tuple(a.spec.lora_rank or 16 for a in adapters))  # 16: PEFT's default r
    model = ModelIdentity(name=resolved.name, adapters={a.name: _adapter_identity(a) for a in adapters},
                          adapter=adapters[0].name if adapters and adapters[0].name == config.model else None)
    identity = JobIdentity(input=spec.identity(), model=model,
                           sampling=config.sampling.model_dump(mode="json"),
                           engine=EngineIdentity(dtype=plan.dtype, max_model_len=plan.max_model_len),
                           chunk_rows=config.chunk_rows)
    job = BatchJob(config, spec, counts, unit_sizes(counts, config.chunk_rows), plan, model.adapter or model.name,
                   None, identity, OutputDir(output_dir), overwrite, adapters[0].spec.base if adapters else None)
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
    from llmops.vllm_engine import EngineConfig

    planned = {k: getattr(plan, k) for k in EngineConfig.model_fields}
    return config.model_copy(update={"engine": EngineConfig(**{k: "auto" if v is None else v
                                                                for k, v in planned.items()})})


def dry_run(job: BatchJob) -> dict[str, Any]:
    """The resolved plan and the exact engine calls, as data (the CLI prints it)."""
    from llmops.batch.workers import engines

    done = 0 if job.overwrite else len(job.output.committed(job.unit_sizes, None).done)
    return {"model": job.model_name, "model_path": str(job.model_path) if job.model_path else None,
            "input": {"format": job.input_spec.format, "files": [str(f) for f in job.input_spec.files],
                      "rows": sum(job.row_counts), "prompt_column": job.input_spec.prompt_column,
                      "messages_column": job.input_spec.messages_column, "id_column": job.input_spec.id_column},
            "output_dir": job.output.location, "units": len(job.unit_sizes), "units_done": done,
            "identity": job.identity.model_dump(mode="json"),
            "config": job.config.model_dump(mode="json"), "plan": job.plan.to_dict(), "engines": engines(job),
            "warnings": job.warnings()}
