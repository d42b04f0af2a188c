"""`pack()` end to end (issue 13 item 2): its own output, not position ids built by hand. Positions restart at
0 for every example, every example lands whole in one row exactly once, and a model run on the packed,
collated batch gives each example the logits it gets alone, so packed examples cannot attend to each other.

A random Llama with a 256-token vocabulary and random token ids: no tokenizer and no downloaded model."""

from __future__ import annotations

import random

import pytest

LENGTHS = [5, 90, 40, 60, 33, 7, 100, 64, 12, 20]
MAX_SEQ_LEN = 128
VOCAB = 256


@pytest.fixture(scope="module")
def examples() -> list[dict[str, list[int]]]:
    rng = random.Random(0)
    out = []
    for n in LENGTHS:
        ids = [rng.randrange(1, VOCAB) for _ in range(n)]
        prompt = n // 3  # untrained prompt tokens, as chat data has
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


@pytest.fixture(scope="module")
def packed(examples):
    from datasets import Dataset

    from llmops.train.data import pack

    rows = pack(Dataset.from_dict({k: [ex[k] for ex in examples] for k in ("input_ids", "labels")}), MAX_SEQ_LEN)
    return [rows[i] for i in range(len(rows))]


def example_spans(row: dict, examples: list[dict]) -> list[tuple[int, int]]:
    """[start, end) of each example in a packed row, found by its tokens (not by the row's position ids)."""
    spans, at = [], 0
    while at < len(row["input_ids"]):
        n = next(len(ex["input_ids"]) for ex in examples
                 if row["input_ids"][at:at + len(ex["input_ids"])] == ex["input_ids"])
        spans.append((at, at + n))
        at += n
    return spans


def segments(row: dict) -> list[tuple[int, int]]:
    """[start, end) of each example in a packed row: where its position ids restart at 0."""
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
    return list(zip(starts, starts[1:] + [len(row["position_ids"])]))


@pytest.mark.unit
def test_positions_restart_for_every_example_and_each_example_is_packed_whole_once(examples, packed):
    found = []
    for row in packed:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) <= MAX_SEQ_LEN
        for start, end in segments(row):
            assert row["position_ids"][start:end] == list(range(end - start))
            found.append({"input_ids": row["input_ids"][start:end], "labels": row["labels"][start:end]})
    key = lambda ex: (ex["input_ids"], ex["labels"])  # noqa: E731
    assert sorted(found, key=key) == sorted(examples, key=key)
    assert len(packed) < len(examples), "rows hold several examples"


@pytest.mark.unit
def test_a_packed_batch_gives_each_example_the_logits_it_gets_alone(examples, packed):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmops.train.data import Collator

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=512)).eval()
    batch = Collator(pad_token_id=0)(packed)  # padded to the longest row, as the training loop sees it
    batch.pop("num_tokens")
    assert len(packed) > 1 and any(len(r["input_ids"]) < batch["input_ids"].shape[1] for r in packed)
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits  # as the loop calls it: no attention mask
        for r, row in enumerate(packed):
            for start, end in example_spans(row, examples):
                alone = model(input_ids=torch.tensor([row["input_ids"][start:end]]), use_cache=False).logits[0]
                torch.testing.assert_close(logits[r, start:end], alone, atol=1e-4, rtol=1e-4)
