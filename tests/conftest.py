"""Shared test setup: an isolated LLMOPS_HOME, offline hub settings, and the offline default model converted
once per test home (kept in `.test-home/` between local runs; `LLMOPS_TEST_HOME` moves it)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parent.parent
TEST_HOME = Path(os.environ.get("LLMOPS_TEST_HOME", REPO / ".test-home"))

# Set (not setdefault) before anything imports huggingface_hub/datasets/vllm, so every session is offline
# and isolated whatever the caller's shell exports: a user's HF_HOME or LLMOPS_HOME must not leak in.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["HF_HOME"] = str(TEST_HOME / "hf")
os.environ["VLLM_CACHE_ROOT"] = str(TEST_HOME / "vllm-cache")
os.environ["LLMOPS_HOME"] = str(TEST_HOME / "llmops")
# `make test` runs two workers on cores that engines and training runs share: an OpenMP thread that spins while
# it waits burns the time slice another process needs (a LoRA step beside a running test module: 27-35 s with
# passive waits, 42-56 s spinning, half the CPU time). vLLM, torch and accelerate all inherit it.
os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
# The planner reads the machine from LLMOPS_HARDWARE when it is set, and serve takes its API key from
# LLMOPS_API_KEY; -v would put the engines' logs back on stderr. Tests that need one of them set it.
for name in ("LLMOPS_HARDWARE", "LLMOPS_API_KEY", "LLMOPS_VERBOSE"):
    os.environ.pop(name, None)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The offline default model as a Hugging Face folder (fetched and converted on first use)."""
    from llmops.registry import ensure_local, resolve

    return ensure_local(resolve("smollm2-135m"), progress=lambda msg: print(msg, file=sys.stderr))


@pytest.fixture(scope="session")
def default_embed_model_dir() -> Path:
    """The offline default embedding model (all-MiniLM-L6-v2) as a Hugging Face folder (fetched on first use)."""
    from llmops.registry import ensure_local, resolve

    return ensure_local(resolve("all-minilm-l6-v2"), progress=lambda msg: print(msg, file=sys.stderr))


# SmolLM2-135M-Instruct's chat template (ChatML with a default system prompt), for the tiny tokenizer below.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer shaped like SmolLM2's (same special tokens, chat template and offsets), with a
    1k vocabulary learned from the training examples: unit tests get a real tokenizer without the 538 MB
    default model, and tiny models built on it are 1k-vocabulary fast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [line for path in sorted((REPO / "examples" / "train").glob("*.jsonl"))
              for line in path.read_text().splitlines()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=1000, special_tokens=special,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    out = tmp_path_factory.mktemp("tiny-tokenizer")
    fast.save_pretrained(out)
    return out


@pytest.fixture()
def cpu_machine(tmp_path, monkeypatch) -> Iterator[Path]:
    """Plan for a CPU-only machine (2 AVX2 cores, 24 GiB, no GPU) whatever this one is: for tests that expect
    CPU settings (VLLM_CPU_KVCACHE_SPACE, --enforce-eager, ACCELERATE_USE_CPU), which a GPU machine would not
    plan. Applies to this process and to `run_cli`'s."""
    import json

    from llmops.hardware import detect
    from tests.fake_hardware import cpu_only

    path = tmp_path / "cpu-machine.json"
    path.write_text(json.dumps(cpu_only(24).to_dict()))
    monkeypatch.setenv("LLMOPS_HARDWARE", str(path))
    detect.cache_clear()  # probed once per process otherwise
    yield path
    detect.cache_clear()


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


def kill_9_when(cmd: list[str], ready, timeout: float = 300):
    """Run `cmd` in its own session and kill -9 it as soon as `ready()` is true (a crash mid-job); returns the
    process, ended. Everything it started is killed if the test fails before that."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not ready():
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc


# `make test` runs two pytest-xdist workers (`-n 2 --dist loadscope`): on 2 cores an engine test leaves a core
# mostly idle (Python imports in vLLM's three processes, waits on servers), and two modules at once took 184 s
# against 263 s one after the other. Each module is one unit of work, so its shared engine starts once; the
# modules with Ray tests are one unit, run one after another (their nodes' worker-port ranges are fixed and
# each cluster holds two engines). Units start longest first (as measured in full runs on the 2-core machine),
# so that neither worker is left alone with a long module at the end; a module not named here runs after.
RAY_MODULES = ("test_multinode_serve.py", "test_ray.py", "test_serve_replicas.py")
LONGEST_FIRST = ("ray", "test_adapters.py", "test_train.py", "test_batch_engine.py", "test_conversations.py",
                 "test_train_distributed.py", "test_serve_traffic.py", "test_batch_long.py", "test_batch_label.py",
                 "test_batch_embed.py", "test_batch_remote.py", "test_train_resume.py", "test_serve.py")


def work_unit(nodeid: str) -> str:
    """The unit of work a test belongs to: "ray", or its module's file name."""
    module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    return "ray" if module in RAY_MODULES else module


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadscope`, with the Ray modules as one scope (xdist's own `loadgroup` marks do not group
    anything under pytest 9.2: it renames `item._nodeid`, which pytest no longer reads)."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModulesAndRay(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return ModulesAndRay(config, log)


def pytest_collection_modifyitems(config, items):
    """`-m unit` must pass on a fresh clone without fetching the 538 MB default model (or the embedding model): a
    unit test that asks for one is a mistake in the test (mark it `engine`, or give it `tiny_tokenizer_dir`).
    Then the units of work are ordered longest first, each module's tests in their own order."""
    fetched = {"default_model_dir", "default_embed_model_dir"}
    wrong = [item.nodeid for item in items
             if item.get_closest_marker("unit") and fetched & set(getattr(item, "fixturenames", ()))]
    if wrong:
        raise pytest.UsageError("unit tests that need the converted default model: " + ", ".join(wrong))
    unlisted = {item.path.name for item in items if item.get_closest_marker("ray")} - set(RAY_MODULES)
    if unlisted:
        raise pytest.UsageError(f"modules with Ray tests missing from RAY_MODULES in tests/conftest.py: {unlisted}")
    rank = {unit: i for i, unit in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(work_unit(item.nodeid), len(rank)))
