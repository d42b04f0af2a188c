"""The embedding task (`llmops batch --task embed`): one vector per row from vLLM's pooling runner.

Each text is tokenized here (so a text longer than the model's window is seen, never cut silently: it is
truncated and flagged, or it fails, or it is embedded in window-sized pieces whose vectors are mean-pooled,
as `output.on_long` says) and sent as token ids with `PoolingParams`
(task "embed"; `use_activation` is vLLM 0.32's name for normalizing the embedding). The result is a
fixed-size list of float32 (or float16) per row, which pandas and numpy read as one array.
"""

from __future__ import annotations

from typing import Any

from llmops.batch.config import EmbedOutput
from llmops.batch.identity import JobIdentity
from llmops.batch.inputs import Row
from llmops.batch.tasks import RowTask, tokens_input


class Embed(RowTask):
    name = "embed"
    openai_urls = ("/v1/embeddings",)

    def __init__(self, output: EmbedOutput, openai: bool = False):
        self.output = output
        self.openai = openai
        """OpenAI Batch input: a request may embed a list of texts, so each row holds a list of vectors."""

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, **self.output.model_dump(mode="json")}

    def check(self, row: Row) -> str | None:
        if row.messages is not None:
            return "an embedding job takes text, not chat messages: give a text column (--prompt-column)"
        return None

    def open(self, llm, job: JobIdentity) -> dict[str, Any]:
        from vllm import PoolingParams

        model_config = llm.llm_engine.model_config
        params = PoolingParams(task="embed", use_activation=self.output.normalize,
                               dimensions=self.output.dimensions)
        # The pieces of a long text are pooled here, so they are embedded unnormalized and normalized after.
        raw = PoolingParams(task="embed", use_activation=False, dimensions=self.output.dimensions)
        return {"tokenizer": llm.get_tokenizer(), "params": params, "raw": raw, "window": model_config.max_model_len,
                "dimensions": self.output.dimensions or model_config.embedding_size, "pieces": {}}

    def requests(self, state, row: Row):
        texts = self._token_ids(state, row)
        state["pieces"][row.index] = [len(pieces) for pieces in texts]
        return [(tokens_input(ids), state["params"] if len(pieces) == 1 else state["raw"], None)
                for pieces in texts for ids in pieces]

    def _token_ids(self, state, row: Row) -> list[list[list[int]]]:
        """Each text's token ids: one list, or one per piece (output.on_long=chunk)."""
        tokenizer, window = state["tokenizer"], state["window"]
        found = []
        for text in row.texts or [row.prompt]:
            ids = tokenizer.encode(text)
            if len(ids) > window:
                if self.output.on_long == "fail":
                    raise ValueError(f"the text is {len(ids)} tokens, longer than the model's window of {window} "
                                     "(output.on_long=fail; --on-long truncate embeds its start, chunk all of it)")
                if self.output.on_long == "chunk":
                    found.append(self._pieces(tokenizer, text, window))
                    continue
                # The tokenizer's own truncation keeps the closing special token ([SEP]) that pooling expects.
                ids = tokenizer.encode(text, truncation=True, max_length=window)
                row.truncated = True
            found.append([ids])
        return found

    @staticmethod
    def _pieces(tokenizer, text: str, window: int) -> list[list[int]]:
        """A long text as window-sized pieces, each with the model's special tokens ([CLS] ... [SEP]), cut at
        sentence edges where there are some and without overlap (as vLLM's chunked processing)."""
        from llmops.batch.long import EDGE_TOKENS, split

        special = len(tokenizer.encode(""))  # [CLS] and [SEP] (vLLM's tokenizer has no build_inputs_with_special_tokens)
        return [tokenizer.encode(piece, truncation=True, max_length=window)
                for piece in split(text, tokenizer, window - special - EDGE_TOKENS, 0)]

    def result(self, state, row: Row, outputs: list[Any]) -> dict[str, Any]:
        import numpy as np

        dtype = np.float16 if self.output.dtype == "float16" else np.float32
        vectors, at = [], 0
        counts = state["pieces"].pop(row.index, None) or [1] * len(outputs)
        for count in counts:
            group, at = outputs[at:at + count], at + count
            if count == 1:
                vector = group[0].outputs.data.float().numpy()
            else:  # mean-pool the pieces, weighted by their tokens (vLLM's enable_chunked_processing), then normalize
                vector = np.average([o.outputs.data.float().numpy() for o in group], axis=0,
                                    weights=[len(o.prompt_token_ids or ()) for o in group])
                if self.output.normalize:
                    vector = vector / np.linalg.norm(vector)
            vectors.append(vector.astype(dtype, copy=False))
        r = {"embedding": vectors if self.openai else vectors[0], "truncated": row.truncated,
             "prompt_tokens": sum(len(output.prompt_token_ids or ()) for output in outputs), "error": None}
        if self.output.on_long == "chunk":
            r = {**{k: v for k, v in r.items() if k != "error"}, "chunks": sum(counts), "error": None}
        return r

    def columns(self, state=None) -> list[tuple[str, Any]]:
        import pyarrow as pa

        value = pa.float16() if self.output.dtype == "float16" else pa.float32()
        vector = pa.list_(value, state["dimensions"]) if state else pa.list_(value)
        return [("embedding", pa.list_(vector) if self.openai else vector), ("truncated", pa.bool_()),
                ("prompt_tokens", pa.int32()),
                *([("chunks", pa.int32())] if self.output.on_long == "chunk" else []), ("error", pa.string())]

    def openai_body(self, r: dict[str, Any], model: str, created: int) -> dict[str, Any]:
        vectors = r["embedding"] if self.openai else [r["embedding"]]
        return {"id": f"embd-{r['row']}", "object": "list", "created": created, "model": model,
                "data": [{"index": i, "object": "embedding", "embedding": [float(v) for v in vector]}
                         for i, vector in enumerate(vectors)],
                "usage": {"prompt_tokens": r["prompt_tokens"], "total_tokens": r["prompt_tokens"]}}
