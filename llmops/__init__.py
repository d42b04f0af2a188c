"""llmops: serve, batch-generate and fine-tune LLMs from one CLI, planned from the hardware you have."""

__version__ = "0.1.0"
