"""What the planner knows about a model without loading its weights: its shape, parameter count, context and
the bytes each parameter and each token of KV cache take in a given dtype.

The shape comes from the local `config.json` when the model is here, else from its registry entry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from llmops.errors import UsageError
from llmops.registry import ModelShape, ResolvedModel, Task, model_task, read_model_config, shape_from_config

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelFacts:
    """What the planner knows about a model, without loading its weights."""

    name: str
    params: int
    context_length: int
    shape: ModelShape
    task: Task = "generate"
    """What the model does without conversion (`registry.model_task`): `embed` for an embedding model."""

    def weight_bytes(self, dtype: str) -> int:
        return self.params * DTYPE_BYTES[dtype]

    def kv_bytes_per_token(self, dtype: str) -> int:
        """K and V for every layer and KV head of one token."""
        s = self.shape
        return 2 * s.num_layers * s.num_kv_heads * s.head_dim * DTYPE_BYTES[dtype]


def estimate_params(shape: ModelShape) -> int:
    """Parameter count of a decoder-only transformer from its config (embeddings, attention, MLP, norms)."""
    h, kv = shape.hidden_size, shape.num_kv_heads * shape.head_dim
    q = shape.num_attention_heads * shape.head_dim
    inter = shape.intermediate_size or 4 * h
    attention = h * q + 2 * h * kv + q * h
    mlp = 3 * h * inter  # gated MLP (gate, up, down), the common case today
    embeddings = shape.vocab_size * h * (1 if shape.tie_word_embeddings else 2)
    return shape.num_layers * (attention + mlp + 2 * h) + embeddings + h


def sentence_transformers_window(resolved: ResolvedModel) -> int | None:
    """The window a sentence-transformers folder was trained for (`max_seq_length` in
    `sentence_bert_config.json`: 256 for all-MiniLM-L6-v2, whose `max_position_embeddings` is 512). vLLM reads
    the same file and caps its max_model_len there."""
    path = resolved.local_path()
    try:
        value = json.loads((path / "sentence_bert_config.json").read_text()).get("max_seq_length")
    except (TypeError, OSError, ValueError, AttributeError):  # no folder, no file, or not a JSON object
        return None
    return value if isinstance(value, int) and value > 0 else None


def model_facts(resolved: ResolvedModel) -> ModelFacts:
    """Shape from the local `config.json` when present, else from the registry entry."""
    spec = resolved.spec
    config = read_model_config(resolved)
    if config is not None:
        try:
            shape = shape_from_config(config)
        except KeyError as e:
            raise UsageError(f"{resolved.name}: config.json lacks {e}; llmops cannot plan for this architecture")
        text = config.get("text_config", config)
        context = (spec.context_length or sentence_transformers_window(resolved)
                   or text.get("max_position_embeddings") or 2048)
    elif spec.shape is not None:
        shape, context = spec.shape, spec.context_length or 2048
    else:
        raise UsageError(f"llmops does not know the size of {resolved.name} yet",
                         f"download it first: `llmops models pull {resolved.name}`")
    return ModelFacts(resolved.name, spec.params or estimate_params(shape), context, shape, model_task(resolved))
