"""Check the training planner's activation model against what autograd really saves.

Runs one forward pass of a local model (default: the converted SmolLM2-135M in the test home) with the
recipe's method (full or LoRA via peft, as llmops.train.loop builds it), with and without gradient
checkpointing, and sums the bytes of the distinct tensors autograd saves for the backward pass
(`torch.autograd.graph.saved_tensors_hooks`). It prints them beside what `llmops.train.plan` counts for the
same tensors. CPU only; a few seconds. Run under the shared lock:

    flock /tmp/llmops-heavy.lock .venv/bin/python scripts/measure_train_activations.py [MODEL_DIR] [--bf16]
"""

from __future__ import annotations

import sys
from pathlib import Path


def saved_bytes(model, batch) -> int:
    """Bytes of distinct storages autograd keeps for backward after one forward pass (loss included)."""
    import torch

    storages: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in weights:  # weights (and their transposed views) are not activations
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch, use_cache=False).loss
    loss.backward()
    return sum(storages.values())


def main(model_dir: str, precision: str) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llmops.plan import model_facts
    from llmops.registry import resolve
    from llmops.train.plan import activation_bytes_per_token

    torch.set_num_threads(1)
    facts = model_facts(resolve("smollm2-135m"))
    seq, micro = 512, 2
    ids = torch.randint(0, facts.shape.vocab_size, (micro, seq))
    batch = {"input_ids": ids, "labels": ids}
    # As llmops.train.loop runs (LoRA dropout masks are fp32 on the CPU: 4 bytes): full fine-tuning keeps fp32 weights under bf16 autocast; LoRA loads bf16.
    bf16 = precision == "bf16"
    compute_bytes = 2 if bf16 else 4
    print(f"{precision}: {'method':6} {'ckpt':5} {'measured MiB':>13} {'planned MiB':>12}")
    for method in ("full", "lora"):
        for ckpt in (False, True):
            dtype = torch.bfloat16 if bf16 and method == "lora" else torch.float32
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
            if ckpt:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if method == "lora":
                model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                         target_modules="all-linear", task_type="CAUSAL_LM"))
                if ckpt:
                    model.enable_input_require_grads()
            model.train()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                measured = saved_bytes(model, batch)
            # What stays saved through the forward pass: every layer's tensors (or, with checkpointing, each
            # layer's input: the hooks do not see inside checkpointed layers), plus the fp32 log-softmax.
            # The planner's figure adds the peaks on top (one recomputed layer, the logits' other copies).
            tokens, s = micro * seq, facts.shape
            stream_bytes = 4 if method == "full" else compute_bytes
            layers = (s.num_layers * tokens * s.hidden_size * stream_bytes if ckpt else
                      s.num_layers * tokens * activation_bytes_per_token(facts, method, compute_bytes, 4))
            planned = layers + tokens * s.vocab_size * 4
            if bf16 and method == "full":  # the hooks also see autocast's bf16 weight copies (the planner
                # counts them as weights); inside checkpointed layers only the head's
                planned += 2 * (s.vocab_size * s.hidden_size if ckpt else facts.params)
            print(f"{precision}: {method:6} {'on' if ckpt else 'off':5} {measured / 2**20:13.1f} {planned / 2**20:12.1f}")


if __name__ == "__main__":
    here = Path(__file__).resolve().parents[1]
    args = [a for a in sys.argv[1:] if a != "--bf16"]
    main(args[0] if args else str(here / ".test-home/llmops/models/smollm2-135m"),
         "bf16" if "--bf16" in sys.argv else "fp32")
