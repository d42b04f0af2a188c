"""`llmops batch INPUT -o OUT --calibrate`: run a sample of the job's rows into a scratch folder, record what they
measured (`llmops.throughput`), and estimate the whole job from that measurement. The job's own output folder
is not touched.

What makes a sample tell the job's rate (measured with scripts/bench_estimates.py on 2 cores):
- its rows are spread over the whole input, not its first rows (`_sample`);
- it runs on the whole job's planned engine, not one planned for the sample's size;
- it is as large as the batch the job's engine runs at once (at least 64 rows): a 64-row sample of a job that
  decodes 256 rows at a time ran at 0.7x the job's rate;
- it follows a few short warm-up rows on the same engine: a fresh engine's first requests carry one-time costs
  (about 1 s here) that a small sample would count as its rate and multiply over the job. They are recorded as
  start-up instead."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from llmops.batch.config import BatchConfig
from llmops.errors import UsageError

CALIBRATE_ROWS = 64
WARMUP_ROWS = 16
WARMUP_MAX_TOKENS = 16


def calibrate(config: BatchConfig, input_path: str, output_dir: str, *, rows: int | None = None,
              progress=None) -> dict[str, Any]:
    """Run a sample of `rows` rows (default: `sample_rows`) after `WARMUP_ROWS` short warm-up rows, record it,
    and return {"calibration": its summary, "estimate": the whole job's estimate, from this measurement}."""
    from llmops.batch.engine import close_engine, load_engine
    from llmops.batch.runner import _record_quietly, estimate_job, plan_batch, run_batch
    from llmops.paths import llmops_home
    from llmops.quiet import engine_output, new_log_file
    from llmops.registry import ensure_local, resolve

    job = plan_batch(config, input_path, output_dir)  # every refusal of the real job, before anything runs
    scratch = llmops_home() / "calibrate" / job.identity.key()[:16]
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        if job.model_path is None:
            job.with_model(ensure_local(resolve(job.base_model or config.model)))
        warm, sample = _split(_sample(job.input_spec, WARMUP_ROWS + (rows or sample_rows(job)), scratch,
                                      total=sum(job.row_counts)), WARMUP_ROWS)
        t0 = time.monotonic()
        with engine_output(new_log_file("batch")):
            engine = load_engine(job.engine)  # the whole job's engine, not one planned for the sample's size
        started_s = time.monotonic() - t0
        try:
            warmup_s = 0.0
            if warm is not None:  # short rows: their time is mostly the engine's one-time cost
                # Shorter outputs for generation only: an embedding job refuses any sampling setting.
                short = config if job.task.name != "generate" else config.model_copy(update={
                    "sampling": config.sampling.model_copy(
                        update={"max_tokens": min(config.sampling.max_tokens, WARMUP_MAX_TOKENS)})})
                warmup_s = run_batch(short, str(warm), scratch / "warm", llm=engine, progress=progress,
                                     record=False).generation_s
            summary = run_batch(config, str(sample), scratch / "out", llm=engine, progress=progress, record=False)
        finally:
            close_engine(engine)
        sample_job = plan_batch(config, str(sample), scratch / "out")
        line = _record_quietly(job, rows=summary.rows_ok + summary.rows_failed, prompt_tokens=summary.prompt_tokens,
                               completion_tokens=summary.completion_tokens, startup_s=started_s + warmup_s,
                               generation_s=summary.generation_s, wall_s=summary.wall_s,
                               input_bytes=sample_job.input_spec.total_bytes(), warmup_s=warmup_s,
                               progress=progress or _Silent())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    found = summary.to_dict() | {"engine_start_s": round(started_s, 2), "warmup_s": round(warmup_s, 2)}
    # This job's estimate from this sample alone: its rate, its start-up, its prompt and output lengths.
    per_row = max(1, round(summary.prompt_tokens / max(1, summary.rows_total)))
    estimate = estimate_job(job, measurements=[line] if line else None, prompt_tokens=per_row)
    return {"calibration": found, "estimate": estimate.to_dict()}


def sample_rows(job) -> int:
    """As many rows as the job's engine runs at once (the roofline's decode batch), at least CALIBRATE_ROWS,
    and no more than half the job (a sample, not the job)."""
    from llmops.batch.job import typical_prompt_tokens
    from llmops.estimate import batch_roofline
    from llmops.hardware import detect
    from llmops.plan import model_facts
    from llmops.registry import resolve

    total = sum(job.row_counts)
    if job.task.name == "embed":
        return CALIBRATE_ROWS
    roof = batch_roofline(job.plan, model_facts(resolve(job.base_model or job.config.model)), detect(), rows=total,
                          prompt_tokens=typical_prompt_tokens(job.input_spec, total) or 256,
                          output_tokens=job.config.sampling.max_tokens)
    return max(CALIBRATE_ROWS, min(roof.batch, total // 2))


class _Silent:
    def phase(self, text: str) -> None:
        pass


def _split(path: Path, first: int) -> tuple[Path | None, Path]:
    """`path`'s first `first` rows (the warm-up) and the rest (the sample), as two files of its format; no
    warm-up where the input is too small to leave a sample."""
    if path.suffix == ".jsonl":
        lines = path.read_bytes().splitlines(keepends=True)
        if len(lines) <= 2 * first:
            return None, path
        warm, rest = path.with_name("warm.jsonl"), path.with_name("measured.jsonl")
        warm.write_bytes(b"".join(lines[:first]))
        rest.write_bytes(b"".join(lines[first:]))
        return warm, rest
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if table.num_rows <= 2 * first:
        return None, path
    warm, rest = path.with_name("warm.parquet"), path.with_name("measured.parquet")
    pq.write_table(table.slice(0, first), warm)
    pq.write_table(table.slice(first), rest)
    return warm, rest

def _sample(spec, rows: int, folder: Path, total: int | None = None) -> Path:
    """`rows` rows of the input spread evenly over its `total` rows (the first ones when `total` is not
    given), as one file of the same format. Spread, because inputs are often sorted (by id, by length, by
    source): the first rows of a list of numbers to spell out had 8 output tokens a row, the whole list 20."""
    files = spec.files
    folder.mkdir(parents=True, exist_ok=True)
    if any(not isinstance(f, Path) for f in files):
        raise UsageError("--calibrate samples local input files only", "copy a sample of the input here and "
                                                                       "calibrate on it")
    picks = sorted({i * total // rows for i in range(rows)}) if total and total > rows else list(range(rows))
    if spec.format in ("jsonl", "openai"):
        wanted, lines, index = set(picks), [], 0
        for f in files:
            with open(f, "rb") as stream:
                for line in stream:
                    if not line.strip():
                        continue
                    if index in wanted:
                        lines.append(line if line.endswith(b"\n") else line + b"\n")
                    index += 1
                    if len(lines) == len(picks):
                        break
            if len(lines) == len(picks):
                break
        target = folder / "sample.jsonl"
        target.write_bytes(b"".join(lines))
        return target
    if spec.format in ("parquet", "arrow"):
        import pyarrow.dataset as ds
        import pyarrow.parquet as pq

        dataset = ds.dataset([str(f) for f in files], format="parquet" if spec.format == "parquet" else "arrow")
        count = dataset.count_rows()
        table = dataset.take([i for i in picks if i < count])
        target = folder / "sample.parquet"
        pq.write_table(table, target)
        return target
    raise UsageError(f"--calibrate does not sample {spec.format} input", "calibrate on a JSONL or Parquet sample")
