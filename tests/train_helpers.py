"""What the training tests share: recipe files, the metrics a run wrote, and a tiny random model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

EXAMPLES = REPO / "examples" / "train"
TRAIN_ENV = {"OMP_NUM_THREADS": "1", "LLMOPS_DEBUG": "1"}


def write_recipe(path: Path, **overrides) -> Path:
    recipe = {"name": "tiny-test", "model": "smollm2-135m",
              "data": {"path": str(EXAMPLES / "glimmerfox.jsonl"), "max_seq_len": 128}}
    for key, value in overrides.items():
        node = recipe
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path.write_text(yaml.safe_dump(recipe))
    return path


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def step_losses(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in metrics(run_dir) if "loss" in row}


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_tokenizer_dir, tmp_path_factory) -> Path:
    """A random 2-layer Llama with a 1k tokenizer shaped like SmolLM2's (conftest): ~0.1 M parameters, fast
    steps, and no need for the converted default model."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def tiny_recipe(tmp_path: Path, model: Path, **overrides) -> Path:
    settings = {"model": str(model), "method": "full", "precision": "fp32", "train.micro_batch_size": 2,
                "train.learning_rate": 1e-3, "train.warmup_steps": 2, "logging.progress_bar": False}
    return write_recipe(tmp_path / "tiny.yaml", **{**settings, **overrides})


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int) -> None:
    """Until the run has logged `step` (the file is read while being written: a torn line is skipped)."""
    from llmops.train.loop import read_jsonl

    path = run_dir / "metrics.jsonl"
    while proc.poll() is None:
        if path.exists() and max((r["step"] for r in read_jsonl(path)), default=0) >= step:
            return
        time.sleep(0.02)


def start_training(recipe: Path, run_dir: Path) -> subprocess.Popen:
    """`llmops train RECIPE -o RUN_DIR` in the background, as a user runs it (without LLMOPS_DEBUG, so a known
    stop prints no traceback); its stderr is piped."""
    env = {**os.environ, **TRAIN_ENV}
    env.pop("LLMOPS_DEBUG")
    return subprocess.Popen([sys.executable, "-m", "llmops", "train", str(recipe), "-o", str(run_dir)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def sigterm_after_step(recipe: Path, run_dir: Path, step: int) -> tuple[int, str]:
    """Start a run, send it SIGTERM once it has logged `step`; its exit code and stderr."""
    proc = start_training(recipe, run_dir)
    wait_for_step(proc, run_dir, step)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=600)
    return proc.returncode, stderr
