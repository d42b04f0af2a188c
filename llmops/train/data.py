"""Training data: load with `datasets`, tokenize with the model's chat template (loss on assistant tokens
only), then pack examples into sequences of up to `max_seq_len` tokens, or group them by length.

Packed rows carry `position_ids` that restart at 0 for every example and no attention mask: transformers then
builds a block-diagonal causal mask from the position ids (`masking_utils.find_packed_sequence_indices`), so
an example never attends to the one packed before it. Padding at the end of a batch becomes one more
"example" with label -100.
"""

from __future__ import annotations

import bisect
from typing import Any

from llmops.errors import ConfigError
from llmops.train.recipe import LOCAL_DATA_SUFFIXES, DataConfig, as_list, detect_format, format_problem, is_local

IGNORE_INDEX = -100  # label value the loss skips (torch cross_entropy's ignore_index)


def load_datasets(data: DataConfig, seed: int, source: str = "recipe"):
    """The train and eval `datasets.Dataset`s (eval is None when there is no eval data)."""
    train = _load(as_list(data.path), data.split, "data.path", source)
    if data.eval_path is not None:
        return train, _load(as_list(data.eval_path), data.split, "data.eval_path", source)
    if data.eval_fraction > 0:
        split = train.train_test_split(test_size=data.eval_fraction, seed=seed)
        return split["train"], split["test"]
    return train, None


def _load(paths: list[str], split: str, field: str, source: str):
    import datasets

    try:
        if all(is_local(p) for p in paths):
            kind = LOCAL_DATA_SUFFIXES.get(_suffix(paths[0]), "json")
            return datasets.load_dataset(kind, data_files=paths, split="train")
        return datasets.load_dataset(paths[0], split=split)
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
        raise ConfigError(source, [(field, f"cannot load {', '.join(paths)}: {e}")]) from None
    except datasets.exceptions.DatasetGenerationError as e:  # a file that does not parse (a malformed line)
        cause = e.__cause__ or e
        raise ConfigError(source, [(field, f"cannot read {', '.join(paths)}: {str(cause).splitlines()[0]}")]) from None


def _suffix(path: str) -> str:
    return "." + path.rsplit(".", 1)[-1].lower() if "." in path else ""


def resolve_format(data: DataConfig, columns: list[str], source: str = "recipe") -> str:
    problem = format_problem(data.format, columns)
    if problem:
        raise ConfigError(source, [("data.format", problem)])
    return data.format if data.format != "auto" else detect_format(columns)  # type: ignore[return-value]


# --- tokenization -------------------------------------------------------------------------------------


def tokenize_example(example: dict[str, Any], tokenizer, fmt: str, max_seq_len: int) -> dict[str, list[int]]:
    """`input_ids` and `labels` for one example; labels are IGNORE_INDEX outside the trained spans."""
    if fmt == "chat":
        text, spans = _chat_spans(example["messages"], tokenizer)
        special = False  # the chat template writes the special tokens itself
    elif fmt == "prompt_completion":
        text = example["prompt"] + example["completion"]
        spans = [(len(example["prompt"]), len(text))]
        special = True
    else:
        text, spans, special = example["text"], [(0, len(example["text"]))], True
    enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [tok if any(s <= start < e for s, e in spans) else IGNORE_INDEX
              for tok, (start, _) in zip(ids, enc["offset_mapping"])]
    if fmt != "chat" and tokenizer.eos_token_id is not None:  # teach the model to stop
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return {"input_ids": ids[:max_seq_len], "labels": labels[:max_seq_len]}


def _chat_spans(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the assistant turns in it.

    Many chat templates (SmolLM2's among them) have no `{% generation %}` markers, so the assistant spans
    come from rendering the conversation up to each assistant turn: the text added by that turn, after the
    generation prompt, is what the model should learn to write (its end-of-turn token included).
    """
    render = tokenizer.apply_chat_template
    text = render(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(messages[:i], tokenize=False, add_generation_prompt=True))
        end = len(render(messages[: i + 1], tokenize=False))
        spans.append((start, end))
    return text, spans


def tokenize_dataset(dataset, tokenizer, fmt: str, max_seq_len: int):
    columns = dataset.column_names
    out = dataset.map(tokenize_example, fn_kwargs={"tokenizer": tokenizer, "fmt": fmt, "max_seq_len": max_seq_len},
                      remove_columns=columns, desc="tokenizing")
    # An example whose trained part was cut off by max_seq_len teaches nothing.
    return out.filter(lambda ex: any(label != IGNORE_INDEX for label in ex["labels"]), desc="dropping empty")


# --- packing and batching -----------------------------------------------------------------------------


def pack(dataset, max_seq_len: int):
    """Best-fit-decreasing packing of whole examples into rows of at most `max_seq_len` tokens.

    Deterministic (sorted by length, ties by index), so a resumed run packs exactly as the first one did.
    """
    from datasets import Dataset

    lengths = [len(ids) for ids in dataset["input_ids"]]
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin index), sorted: the first fit is the best fit
    for i in order:
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k == len(free):
            bins.append([i])
            bisect.insort(free, (max_seq_len - lengths[i], len(bins) - 1))
        else:
            space, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (space - lengths[i], b))
    rows: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
    ids_col, labels_col = dataset["input_ids"], dataset["labels"]
    for members in bins:
        rows["input_ids"].append([t for i in members for t in ids_col[i]])
        rows["labels"].append([t for i in members for t in labels_col[i]])
        rows["position_ids"].append([p for i in members for p in range(lengths[i])])
    return Dataset.from_dict(rows)


def with_positions(dataset):
    """Unpacked rows get position ids too, so both layouts go through the same collator."""
    return dataset.map(lambda ex: {"position_ids": list(range(len(ex["input_ids"])))}, desc="positions")


class Collator:
    """Right-pads a batch to its longest row. The padding restarts its position ids at 0, so the packed-
    sequence mask treats it as a separate example that no real token attends to; its labels are ignored.
    Rows that carry their index in the dataset (`row`) pass it on as `rows` (see `logging.row_indices`)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, list[int]]]):
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        batch: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
        for r in rows:
            pad = width - len(r["input_ids"])
            batch["input_ids"].append(r["input_ids"] + [self.pad_token_id] * pad)
            batch["labels"].append(r["labels"] + [IGNORE_INDEX] * pad)
            batch["position_ids"].append(r["position_ids"] + list(range(pad)))
        out = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
        # Not a model input: the loop pops it to count real tokens (the pad id may equal a real token's id).
        out["num_tokens"] = torch.tensor(sum(len(r["input_ids"]) for r in rows))
        if "row" in rows[0]:
            out["rows"] = torch.tensor([r["row"] for r in rows])
        return out


def length_grouped_sampler(lengths: list[int], batch_size: int, seed: int):
    """transformers' LengthGroupedSampler, reshuffled from `seed + epoch` so a resumed run sees the same order
    (accelerate's DataLoader forwards `set_epoch` to the sampler)."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    class SeededLengthGroupedSampler(LengthGroupedSampler):
        def set_epoch(self, epoch: int) -> None:
            self.generator = torch.Generator().manual_seed(seed + epoch)

    sampler = SeededLengthGroupedSampler(batch_size, lengths=lengths)
    sampler.set_epoch(0)
    return sampler


def build_dataloaders(recipe, tokenizer, source: str = "recipe"):
    """Train and eval DataLoaders (eval may be None), with the real-token count of the training data."""
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    data = recipe.data
    train_raw, eval_raw = load_datasets(data, recipe.seed, source)
    fmt = resolve_format(data, train_raw.column_names, source)

    def prepare(ds):
        ds = tokenize_dataset(ds, tokenizer, fmt, data.max_seq_len)
        ds = pack(ds, data.max_seq_len) if data.packing else with_positions(ds)
        return ds.add_column("row", list(range(len(ds))))  # which rows a step trained on, for the metrics

    train_ds = prepare(train_raw)
    if len(train_ds) == 0:
        raise ConfigError(source, [("data.path", "no training example is left after tokenization")])
    collate = Collator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    micro = recipe.train.micro_batch_size
    if data.packing:
        sampler = RandomSampler(train_ds)  # accelerate swaps in its seedable sampler (use_seedable_sampler)
    else:
        sampler = length_grouped_sampler([len(x) for x in train_ds["input_ids"]], micro, recipe.seed)
    # Own generators: creating a DataLoader iterator otherwise draws from the global RNG, so a resumed run
    # (which starts a new iterator mid-epoch) would shift the dropout noise after the restored RNG state.
    train_dl = DataLoader(train_ds, batch_size=micro, sampler=sampler, collate_fn=collate,
                          generator=torch.Generator().manual_seed(recipe.seed))
    eval_dl = None
    if eval_raw is not None and len(eval_raw):
        eval_dl = DataLoader(prepare(eval_raw), batch_size=micro, shuffle=False, collate_fn=collate,
                             generator=torch.Generator().manual_seed(recipe.seed))
    return train_dl, eval_dl
