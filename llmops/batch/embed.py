"""The embedding task (`llmops batch --task embed`): one vector per row from vLLM's pooling runner.

Each text is tokenized here (so a text longer than the model's window is seen, never cut silently: it is
truncated and flagged, or it fails, as `output.on_long` says) and sent as token ids with `PoolingParams`
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
        return {"tokenizer": llm.get_tokenizer(), "params": params, "window": model_config.max_model_len,
                "dimensions": self.output.dimensions or model_config.embedding_size}

    def requests(self, state, row: Row):
        return [(tokens_input(ids), state["params"], None) for ids in self._token_ids(state, row)]

    def _token_ids(self, state, row: Row) -> list[list[int]]:
        tokenizer, window = state["tokenizer"], state["window"]
        found = []
        for text in row.texts or [row.prompt]:
            ids = tokenizer.encode(text)
            if len(ids) > window:
                if self.output.on_long == "fail":
                    raise ValueError(f"the text is {len(ids)} tokens, longer than the model's window of {window} "
                                     "(output.on_long=fail; set output.on_long=truncate to embed its start)")
                # The tokenizer's own truncation keeps the closing special token ([SEP]) that pooling expects.
                ids = tokenizer.encode(text, truncation=True, max_length=window)
                row.truncated = True
            found.append(ids)
        return found

    def result(self, state, row: Row, outputs: list[Any]) -> dict[str, Any]:
        import numpy as np

        dtype = np.float16 if self.output.dtype == "float16" else np.float32
        vectors = [output.outputs.data.float().numpy().astype(dtype, copy=False) for output in outputs]
        return {"embedding": vectors if self.openai else vectors[0], "truncated": row.truncated,
                "prompt_tokens": sum(len(output.prompt_token_ids or ()) for output in outputs), "error": None}

    def columns(self, state=None) -> list[tuple[str, Any]]:
        import pyarrow as pa

        value = pa.float16() if self.output.dtype == "float16" else pa.float32()
        vector = pa.list_(value, state["dimensions"]) if state else pa.list_(value)
        return [("embedding", pa.list_(vector) if self.openai else vector), ("truncated", pa.bool_()),
                ("prompt_tokens", pa.int32()), ("error", pa.string())]

    def openai_body(self, r: dict[str, Any], model: str, created: int) -> dict[str, Any]:
        vectors = r["embedding"] if self.openai else [r["embedding"]]
        return {"id": f"embd-{r['row']}", "object": "list", "created": created, "model": model,
                "data": [{"index": i, "object": "embedding", "embedding": [float(v) for v in vector]}
                         for i, vector in enumerate(vectors)],
                "usage": {"prompt_tokens": r["prompt_tokens"], "total_tokens": r["prompt_tokens"]}}
