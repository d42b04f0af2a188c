"""`llmops batch INPUT -o OUT --calibrate`: run the job's first rows (64 by default) into a scratch folder,
record what they measured (`llmops.throughput`), and estimate the whole job from that measurement. The job's
own output folder is not touched."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from llmops.batch.config import BatchConfig
from llmops.errors import UsageError

CALIBRATE_ROWS = 64


def calibrate(config: BatchConfig, input_path: str, output_dir: str, *, rows: int = CALIBRATE_ROWS,
              progress=None) -> dict[str, Any]:
    """Run a sample of `rows` rows, record it, and return {"calibration": its summary, "estimate": the whole
    job's estimate (now from the measurement)}."""
    from llmops.batch.runner import estimate_job, plan_batch, run_batch
    from llmops.paths import llmops_home

    job = plan_batch(config, input_path, output_dir)  # every refusal of the real job, before anything runs
    scratch = llmops_home() / "calibrate" / job.identity.key()[:16]
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        sample = _sample(job.input_spec, rows, scratch)
        summary = run_batch(config, str(sample), scratch / "out", progress=progress)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"calibration": summary.to_dict(), "estimate": estimate_job(plan_batch(config, input_path,
                                                                                  output_dir)).to_dict()}


def _sample(spec, rows: int, folder: Path) -> Path:
    """The input's first `rows` rows as one file of the same format."""
    files = spec.files
    folder.mkdir(parents=True, exist_ok=True)
    if any(not isinstance(f, Path) for f in files):
        raise UsageError("--calibrate samples local input files only", "copy a sample of the input here and "
                                                                       "calibrate on it")
    if spec.format in ("jsonl", "openai"):
        lines: list[bytes] = []
        for f in files:
            with open(f, "rb") as stream:
                lines += [line for line, _ in zip((x for x in stream if x.strip()), range(rows - len(lines)))]
            if len(lines) >= rows:
                break
        target = folder / "sample.jsonl"
        target.write_bytes(b"".join(x if x.endswith(b"\n") else x + b"\n" for x in lines))
        return target
    if spec.format in ("parquet", "arrow"):
        import pyarrow.dataset as ds
        import pyarrow.parquet as pq

        table = ds.dataset([str(f) for f in files], format="parquet" if spec.format == "parquet" else "arrow").head(rows)
        target = folder / "sample.parquet"
        pq.write_table(table, target)
        return target
    raise UsageError(f"--calibrate does not sample {spec.format} input", "calibrate on a JSONL or Parquet sample")
