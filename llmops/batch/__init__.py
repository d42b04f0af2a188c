"""`llmops batch`: offline generation and embeddings with vLLM over prompt files and Parquet/Arrow shards,
resumable.

    from llmops.batch import BatchConfig, run_batch
    summary = run_batch(BatchConfig(model="smollm2-135m"), "prompts.jsonl", "out/")
"""

from llmops.batch.config import BatchConfig, InputConfig, SamplingConfig
from llmops.batch.runner import BatchJob, BatchSummary, Progress, dry_run, load_engine, plan_batch, run_batch

__all__ = ["BatchConfig", "BatchJob", "BatchSummary", "InputConfig", "Progress", "SamplingConfig", "dry_run",
           "load_engine", "plan_batch", "run_batch"]
