#!/usr/bin/env bash
# The GPU check, for a lent GPU machine (the `device` tool), in about 3-5 minutes of its time:
#   1. install llmops there without dependencies, plus the wheels its image lacks (carried in .whl/);
#   2. `llmops hw --json` sees the GPU;
#   3. `llmops train` on a tiny random Llama, bf16, one GPU: LoRA, full fine-tuning, and FSDP with one process;
#      each run's loss must go down and its exported model must load and generate on the GPU;
#   4. `pytest -m gpu` (tests/test_train.py's GPU test);
#   5. a summary table (and gpu_check.json, gpu_check.log under $OUT when the device tool sets it).
# It needs no vLLM and no network. The image has torch (CUDA), transformers, accelerate, peft, pyarrow, typer,
# rich, pyyaml and huggingface-hub, but no pydantic and no datasets; Python 3.12 (see the device README).
#
#   scripts/gpu_check.sh fetch        here, with PyPI: download those wheels into .whl/ (ignored by git, ~5 MB)
#   bash scripts/gpu_check.sh         there: device run with carry [".whl"] (the folder is git-ignored)
#   GPU_CHECK_ALLOW_CPU=1 GPU_CHECK_PYTHON_VERSION=3.11 ...   a rehearsal on a machine without a GPU: the same
#                                     steps, fp32 on the CPU, no pytest -m gpu (fetch cp311 wheels for it too)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
WHEELS=${GPU_CHECK_WHEELS:-$REPO/.whl}
PY=${GPU_CHECK_PYTHON:-python3}
WORK=${GPU_CHECK_WORK:-/tmp/llmops-gpu-check}
REPORT=${OUT:-$WORK}

# What the image lacks, pinned to the versions the CPU test suite runs with. typer is carried although the
# image has one: llmops pins typer's minor version (its help rendering changes between minors).
CARRIED="pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
typing-extensions==4.16.0 typer==0.29.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0
plotext==6.1.0"

if [[ ${1:-} == fetch ]]; then
  version=${GPU_CHECK_PYTHON_VERSION:-3.12}
  mkdir -p "$WHEELS"
  # shellcheck disable=SC2086
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" $CARRIED
  du -sh "$WHEELS"
  exit 0
fi

mkdir -p "$WORK" "$REPORT"
exec > >(tee "$REPORT/gpu_check.log") 2>&1

echo "== 1. install llmops (no dependencies) and the carried wheels into $WORK/site"
ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "no wheels in $WHEELS: run 'scripts/gpu_check.sh fetch' here and carry .whl"; exit 2; }
rm -rf "$WORK/site"
install() { "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \
              --target "$WORK/site" "$@"; }
# One pip call (a second --target install into the same folder would not replace its bin/). llmops is built
# from this tree with the image's setuptools; should that fail, the tree runs in place behind an `llmops` command.
if ! install "$WHEELS"/*.whl "$REPO"; then
  echo "(pip could not build llmops here: using the source tree in place)"
  rm -rf "$WORK/site" && install "$WHEELS"/*.whl
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
  mkdir -p "$WORK/site/bin"
  printf '#!/bin/sh\nexec %s -m llmops "$@"\n' "$PY" > "$WORK/site/bin/llmops" && chmod +x "$WORK/site/bin/llmops"
fi
export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}" PATH="$WORK/site/bin:$PATH"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 \
  HF_HOME="$WORK/hf" LLMOPS_HOME="$WORK/home"
command -v llmops
"$PY" -c "import vllm" 2>/dev/null && echo "(vllm is importable here; nothing below uses it)" || echo "no vllm: as intended"

echo "== 2-5. hardware, training runs, pytest -m gpu, summary"
cd "$WORK"
"$PY" - "$REPO" "$REPORT" <<'PYTHON'
import json, os, subprocess, sys, time
from pathlib import Path

repo, report = Path(sys.argv[1]), Path(sys.argv[2])
work = Path.cwd()
allow_cpu = os.environ.get("GPU_CHECK_ALLOW_CPU") == "1"
results = []  # (check, ok, detail)


def check(name, ok, detail=""):
    results.append((name, bool(ok), str(detail)))
    print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}", flush=True)


def llmops(*args, timeout=600):
    start = time.time()
    proc = subprocess.run(["llmops", *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], flush=True)
    return proc, time.time() - start


import torch
cuda = torch.cuda.is_available()
print(f"torch {torch.__version__}, CUDA available: {cuda}", flush=True)

# A tiny random Llama (4 layers, hidden 256) with a 1k BPE tokenizer learned from the shipped examples and
# SmolLM2's special tokens and ChatML chat format; nothing is downloaded.
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

model_dir = work / "tiny-llama"
data = repo / "examples" / "train" / "glimmerfox.jsonl"
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
bpe = Tokenizer(models.BPE())
bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
bpe.train_from_iterator(data.read_text().splitlines(), trainers.BpeTrainer(
    vocab_size=1000, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                              pad_token="<|im_end|>", unk_token="<|endoftext|>")
tok.chat_template = CHATML
torch.manual_seed(0)
LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)).save_pretrained(model_dir)
tok.save_pretrained(model_dir)

# 2. The planner's view of this machine.
proc, _ = llmops("hw", "--json", "--model", str(model_dir))
hw = json.loads(proc.stdout) if proc.returncode == 0 else {}
gpus = hw.get("hardware", {}).get("gpus", [])
check("llmops hw --json sees the GPU" if cuda else "llmops hw --json (no GPU here)", gpus if cuda else proc.returncode == 0,
      "; ".join(f"{g.get('name')} {g.get('memory_total_bytes', 0) / 2**30:.0f} GiB" for g in gpus)
      or f"no GPU (exit {proc.returncode}); the train plan: {hw.get('plans', {}).get('train', {}).get('device')}, "
         f"{hw.get('plans', {}).get('train', {}).get('precision')}")

if not cuda and not allow_cpu:
    print("no CUDA GPU here: stopping before the GPU steps (GPU_CHECK_ALLOW_CPU=1 rehearses them on the CPU)")
    sys.exit(3)  # the steps above need no GPU: they ran

# 3. Training runs: bf16 on the GPU (fp32 in a CPU rehearsal), 40 steps at a high rate so a random model's loss
#    falls clearly.
precision = "bf16" if cuda else "fp32"
runs = {
    "lora": {"method": "lora", "lora": {"r": 16}},
    "full": {"method": "full"},
    # One process, but through `accelerate launch` with an FSDP config (llmops launches FSDP even for one
    # process): the model is wrapped by fully_shard and checkpoints are sharded, which the check below reads.
    "fsdp-1": {"method": "full", "distributed": {"strategy": "fsdp", "num_processes": 1},
               "checkpoint": {"every_n_steps": 20}},
}
for name, extra in runs.items():
    recipe = {"name": f"gpu-check-{name}", "model": str(model_dir), "precision": precision,
              "data": {"path": str(data), "eval_path": str(data.with_name("glimmerfox-eval.jsonl")),
                       "max_seq_len": 256},
              "train": {"max_steps": 40, "micro_batch_size": 8, "learning_rate": 2e-3, "warmup_steps": 4},
              "eval": {"every_n_steps": 20}, "logging": {"progress_bar": False}, **extra}
    path = work / f"{name}.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    run_dir = work / "runs" / name
    plan_proc, _ = llmops("train", str(path), "-o", str(run_dir), "--dry-run", "--json")
    plan = json.loads(plan_proc.stdout) if plan_proc.returncode == 0 else {}
    proc, seconds = llmops("train", str(path), "-o", str(run_dir), "--json")
    if proc.returncode != 0:
        check(f"train {name}", False, f"exit {proc.returncode}")
        continue
    summary = json.loads(proc.stdout)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    device = json.loads((run_dir / "plan.json").read_text()).get("device")
    check(f"train {name}: loss goes down", losses and losses[-1] < 0.8 * losses[0] and (not evals or evals[-1] < evals[0]),
          f"{device} {precision}, loss {losses[0]:.3f} -> {losses[-1]:.3f}, eval loss "
          f"{' -> '.join(f'{e:.3f}' for e in evals) or '-'}, {len(losses)} steps in {seconds:.0f} s (with start-up)")
    if name == "fsdp-1":
        accel = plan.get("accelerate_config", {})
        sharded = run_dir / "checkpoints" / "step-00000020" / "pytorch_model_fsdp_0"
        check("fsdp-1 ran under FSDP", accel.get("distributed_type") == "FSDP" and plan.get("command") != "(in this process)"
              and sharded.is_dir(), f"distributed_type {accel.get('distributed_type')}, sharded checkpoint "
              f"{'saved' if sharded.is_dir() else 'missing'} ({sharded.parent.name}), command: {plan.get('command')}")
    # The export: a Hugging Face folder that loads and generates (LoRA merged into the base by default).
    from transformers import AutoModelForCausalLM, AutoTokenizer
    target = "cuda" if cuda else "cpu"
    try:
        exported = Path(summary["model_dir"])
        model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.bfloat16 if cuda else torch.float32).to(target)
        tokenizer = AutoTokenizer.from_pretrained(exported)
        ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the Glimmerfox?"}],
                                            add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**ids.to(target), max_new_tokens=12, do_sample=False)
        text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        check(f"train {name}: export loads and generates", out.shape[1] > ids["input_ids"].shape[1],
              f"{exported.name}/ ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params): {text!r}")
    except Exception as e:  # report and go on to the other runs
        check(f"train {name}: export loads and generates", False, f"{type(e).__name__}: {e}")

# 4. The GPU-marked tests.
if cuda:
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                           str(repo / "tests" / "test_train.py")], cwd=repo, capture_output=True, text=True,
                          timeout=420)
    print(proc.stdout[-3000:], proc.stderr[-2000:], flush=True)
    check("pytest -m gpu", proc.returncode == 0, f"{proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ''} "
          f"({time.time() - start:.0f} s)")
else:
    print("(pytest -m gpu skipped: no CUDA)")

# 5. Summary.
print("\n== summary" + (" (CPU rehearsal: GPU_CHECK_ALLOW_CPU=1)" if not cuda else ""))
width = max(len(name) for name, _, _ in results)
for name, ok, detail in results:
    print(f"{'PASS' if ok else 'FAIL'}  {name.ljust(width)}  {detail}")
(report / "gpu_check.json").write_text(json.dumps([{"check": n, "ok": o, "detail": d} for n, o, d in results], indent=1))
sys.exit(0 if all(ok for _, ok, _ in results) else 1)
PYTHON
