"""Shared test setup: an isolated LLMOPS_HOME, offline hub settings, and the offline default model converted
once per test home (kept in `.test-home/` between local runs; `LLMOPS_TEST_HOME` moves it)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TEST_HOME = Path(os.environ.get("LLMOPS_TEST_HOME", REPO / ".test-home"))

# Set before anything imports huggingface_hub/datasets/vllm, so the whole session is offline and isolated.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HOME", str(TEST_HOME / "hf"))
os.environ.setdefault("VLLM_CACHE_ROOT", str(TEST_HOME / "vllm-cache"))
os.environ["LLMOPS_HOME"] = str(TEST_HOME / "llmops")


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The offline default model as a Hugging Face folder (fetched and converted on first use)."""
    from llmops.registry import ensure_local, resolve

    return ensure_local(resolve("smollm2-135m"), progress=lambda msg: print(msg, file=sys.stderr))


@pytest.fixture()
def llmops_home(tmp_path, monkeypatch) -> Path:
    """A fresh, empty LLMOPS_HOME for tests that change the registry."""
    home = tmp_path / "llmops-home"
    monkeypatch.setenv("LLMOPS_HOME", str(home))
    return home


def run_cli(*args: str, env: dict[str, str] | None = None, input: str | None = None, timeout: float = 900):
    """Run `python -m llmops ARGS` in a subprocess, as a user would; returns the CompletedProcess."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "llmops", *args], capture_output=True, text=True,
                          env=full_env, input=input, timeout=timeout)
