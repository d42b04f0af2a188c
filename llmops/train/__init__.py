"""`llmops train`: accelerate-driven fine-tuning from a validated recipe.

recipe.py (the `Recipe` schema and loading) -> launch.py (plan, resolve `auto`, launch) -> loop.py (the
accelerate training function, in each process) -> export.py (merge LoRA, save, register). data.py turns
examples into packed or length-grouped token batches. Nothing here imports torch at module level.
"""
