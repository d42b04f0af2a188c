"""Row tasks: what a row of a batch job becomes. The one seam between "which job is this" and everything
below it (units, the engine loop, commits, resume, placement), so a task is written once and runs on every
backend.

A task says:
- which engine requests a row becomes (`requests`; a row may take several rounds of them, `more`), and
  which rows it cannot take at all (`check`);
- which result columns it writes, with their Arrow types (`columns`), what a finished row holds (`result`)
  and what a failed one holds (`failure`);
- what it adds to the job's identity (`identity`: a resume that changes it is refused);
- which OpenAI Batch URLs it answers (`openai_urls`: `inputs.py` parses the request lines) and how a
  result row maps to an OpenAI Batch result body (`openai_body`).

Tasks are small picklable objects: a Ray replica or a worker process gets the same one. `open` gives the
per-engine state (tokenizer, parameters, adapters) once the engine is up.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from llmops.batch.config import SamplingConfig, sampling_params
from llmops.batch.identity import JobIdentity
from llmops.batch.inputs import Row


class RowTask:
    """Base class: the interface every task implements (see the module's docstring)."""

    name: ClassVar[str]
    openai_urls: ClassVar[tuple[str, ...]]
    """The OpenAI Batch request URLs this task answers."""

    def identity(self) -> dict[str, Any]:
        """What of this task decides its output, beside sampling (empty for plain generation, so the job keys
        of generation jobs stay as they were)."""
        return {}

    def check(self, row: Row) -> str | None:
        """Why this task cannot take `row` at all (None: it can)."""
        return None

    def open(self, llm, job: JobIdentity) -> Any:
        """Per-engine state, built once the engine is up."""
        return None

    def requests(self, state: Any, row: Row) -> list[tuple[Any, Any, Any]]:
        """The engine requests of one row: (prompt, params, lora_request) each."""
        raise NotImplementedError

    def more(self, state: Any, row: Row, outputs: list[Any]) -> list[tuple[Any, Any, Any]] | None:
        """The requests of the row's next round, built from its last round's outputs; None when the row is
        done (most tasks: one round). A long document's map-reduce (`long.py`) runs in rounds."""
        return None

    def result(self, state: Any, row: Row, outputs: list[Any]) -> dict[str, Any]:
        """A finished row's result columns, from its last round's outputs (in request order)."""
        raise NotImplementedError

    def failure(self, row: Row) -> dict[str, Any]:
        return {**{name: None for name, _ in self.columns(None)}, "error": row.error}

    def columns(self, state: Any) -> list[tuple[str, Any]]:
        """Result columns and their Arrow types, `error` last."""
        raise NotImplementedError

    def openai_body(self, r: dict[str, Any], model: str, created: int) -> dict[str, Any]:
        """The response body of an OpenAI Batch result line for a row that did not fail."""
        raise NotImplementedError


class Generate(RowTask):
    """Free-text generation (completions and chat): one request a row, sampled as the job says."""

    name = "generate"
    openai_urls = ("/v1/chat/completions", "/v1/completions")

    def __init__(self, sampling: SamplingConfig):
        self.sampling = sampling

    def open(self, llm, job: JobIdentity) -> dict[str, Any]:
        model = job.model
        lora_requests = {}  # an adapter rides on each request that uses it; the base weights stay as they are
        if model.adapters:
            from vllm.lora.request import LoRARequest

            lora_requests = {name: LoRARequest(name, number, adapter.path)
                             for number, (name, adapter) in enumerate(sorted(model.adapters.items()), 1)}
        # One SamplingParams for every row without overrides, as LLM.generate does (the engine copies it).
        return {"tokenizer": llm.get_tokenizer(), "params": sampling_params(self.sampling),
                "lora": lora_requests, "job": job}

    def requests(self, state, row: Row):
        params = sampling_params(self.sampling, row.body) if row.body else state["params"]
        return [(tokens_input(_token_ids(state["tokenizer"], row)), params,
                 state["lora"].get(_adapter_of(row, state["job"])))]

    def result(self, state, row: Row, outputs: list[Any]) -> dict[str, Any]:
        output = outputs[0]
        completion = output.outputs[0]
        r = {"generated_text": completion.text, "finish_reason": completion.finish_reason,
             "prompt_tokens": len(output.prompt_token_ids or ()), "completion_tokens": len(completion.token_ids),
             "error": None}
        if ((row.body or {}).get("response_format") or {}).get("type") in ("json_object", "json_schema"):
            try:  # an OpenAI row that asked for JSON: half a JSON object (cut by max_tokens) fails the row
                json.loads(completion.text)
            except json.JSONDecodeError:
                r["error"] = (f"the answer is not complete JSON (finish_reason {completion.finish_reason}"
                              + (f": max_tokens cut it after {r['completion_tokens']} tokens; raise max_tokens)"
                                 if completion.finish_reason == "length" else ")"))
        return r

    def columns(self, state=None) -> list[tuple[str, Any]]:
        import pyarrow as pa

        return [("generated_text", pa.string()), ("finish_reason", pa.string()), ("prompt_tokens", pa.int32()),
                ("completion_tokens", pa.int32()), ("error", pa.string())]

    def openai_body(self, r: dict[str, Any], model: str, created: int) -> dict[str, Any]:
        chat = r["url"] == "/v1/chat/completions"
        choice = {"index": 0, "finish_reason": r["finish_reason"], "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": r["generated_text"]}} if chat
                      else {"text": r["generated_text"]})
        return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{r['row']}",
                "object": "chat.completion" if chat else "text_completion", "created": created, "model": model,
                "choices": [choice],
                "usage": {"prompt_tokens": r["prompt_tokens"], "completion_tokens": r["completion_tokens"],
                          "total_tokens": r["prompt_tokens"] + r["completion_tokens"]}}


# --- shared by the tasks ------------------------------------------------------------------------------


def tokens_input(ids: list[int]):
    """Pre-tokenized input as this vLLM takes it: newer vLLM an EngineInput, older ones a TokensPrompt dict."""
    try:
        from vllm.inputs import tokens_input as make
    except ImportError:
        return {"prompt_token_ids": ids}
    return make(ids)


def _adapter_of(row: Row, job: JobIdentity) -> str | None:
    """The adapter a row generates with: the one its OpenAI `body.model` names, none when it names the base
    model, else the job's (`--model ADAPTER`)."""
    asked = (row.body or {}).get("model")
    if asked in job.model.adapters:
        return asked
    return None if asked == job.model.name else job.model.adapter


def _token_ids(tokenizer, row: Row) -> list[int]:
    if row.messages is not None:
        text = tokenizer.apply_chat_template(row.messages, tokenize=False, add_generation_prompt=True)
        # The chat template already holds the special tokens (as vLLM's chat path does).
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(row.prompt)
