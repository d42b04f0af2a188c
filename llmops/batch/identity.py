"""A batch job's identity: everything that decides its output, so that one output folder never mixes jobs.

It is the input's content, the model's content, the sampling settings, the engine settings that change the
text or which rows fail (dtype, max_model_len) and `chunk_rows` (which decides the units). File names,
folders and the hardware are not part of it: a job may resume with its input or model mounted elsewhere,
or on another machine, as long as the plan resolves to the same dtype and context length.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

from pydantic import BaseModel


class InputIdentity(BaseModel):
    format: str
    files: list[str]
    """File names, for messages only."""
    digest: str
    """BLAKE2b over the files' contents (llmops.fingerprint.files_digest)."""
    prompt_column: Optional[str] = None
    messages_column: Optional[str] = None
    id_column: Optional[str] = None
    prompt_template: Optional[str] = None


class AdapterIdentity(BaseModel):
    path: str
    digest: str
    """llmops.fingerprint.model_digest of the adapter folder: part of the job's identity, as the base's is."""


class ModelIdentity(BaseModel):
    name: str
    path: Optional[str] = None
    """Where the weights were, for messages only."""
    digest: Optional[str] = None
    """llmops.fingerprint.model_digest; None until a model from the hub is downloaded."""
    adapter: Optional[str] = None
    """The LoRA adapter rows generate with (`--model ADAPTER`), unless an OpenAI request's `body.model` names
    another adapter of the job, or the base model (`name`)."""
    adapters: dict[str, AdapterIdentity] = {}
    """Every LoRA adapter the job uses, by registry name: applied per request with vLLM's LoRARequest, never
    merged into the base."""


class EngineIdentity(BaseModel):
    dtype: str
    max_model_len: int


class JobIdentity(BaseModel):
    input: InputIdentity
    model: ModelIdentity
    sampling: dict[str, Any]
    engine: EngineIdentity
    chunk_rows: int
    task: dict[str, Any] = {}
    """What the row task adds (`tasks.RowTask.identity`): its name and the options that change its output
    (an embedding's pooling, normalization and dimensions). Empty for generation."""

    def key(self) -> str:
        """A short digest of what decides the output (names and paths left out); stored in every shard."""
        # prompt_template only when set, so jobs without one keep their key
        unset = {"prompt_template"} if self.input.prompt_template is None else set()
        deciding = {"input": self.input.model_dump(exclude={"files"} | unset), "model": self.model.digest,
                    "sampling": self.sampling, "engine": self.engine.model_dump(), "chunk_rows": self.chunk_rows}
        if self.task:  # only then, so generation jobs keep their key
            deciding["task"] = self.task
        if self.model.adapters:  # only then, so jobs without adapters keep their key
            deciding["adapters"] = {"default": self.model.adapter,
                                    **{name: a.digest for name, a in self.model.adapters.items()}}
        text = json.dumps(deciding, sort_keys=True)
        return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()

    def changes_from(self, old: JobIdentity) -> list[str]:
        """What changed since `old`, one phrase each: 'model changed: runs/A/model -> runs/B/model'."""
        changes: list[str] = []
        if old.input.model_dump(exclude={"files"}) != self.input.model_dump(exclude={"files"}):
            before, after = ", ".join(old.input.files), ", ".join(self.input.files)
            columns = [f"input.{k}: {getattr(old.input, k)!r} -> {getattr(self.input, k)!r}"
                       for k in ("format", "prompt_column", "messages_column", "id_column", "prompt_template")
                       if getattr(old.input, k) != getattr(self.input, k)]
            changes += columns or [f"input changed: {before} -> {after}" if before != after
                                   else f"input changed: the content of {after} differs"]
        if old.model.digest and self.model.digest and old.model.digest != self.model.digest:
            before, after = old.model.path or old.model.name, self.model.path or self.model.name
            changes.append(f"model changed: {before} -> {after}" if before != after
                           else f"model changed: the files in {after} differ")
        if old.model.adapter != self.model.adapter:
            changes.append(f"adapter changed: {old.model.adapter or 'none'} -> {self.model.adapter or 'none'}")
        if set(old.model.adapters) != set(self.model.adapters):
            changes.append(f"adapters changed: {', '.join(old.model.adapters) or 'none'} -> "
                           f"{', '.join(self.model.adapters) or 'none'}")
        changes += [f"adapter {name} changed: the files in {a.path} differ" for name, a in self.model.adapters.items()
                    if name in old.model.adapters and old.model.adapters[name].digest != a.digest]
        for key in sorted(set(old.sampling) | set(self.sampling)):
            if old.sampling.get(key) != self.sampling.get(key):
                changes.append(f"sampling.{key} changed: {old.sampling.get(key)!r} -> {self.sampling.get(key)!r}")
        for key, value in self.engine.model_dump().items():
            if getattr(old.engine, key) != value:
                changes.append(f"engine.{key} changed: {getattr(old.engine, key)!r} -> {value!r}")
        for key in sorted(set(old.task) | set(self.task)):
            if old.task.get(key) != self.task.get(key):
                before, after = (t.get(key, "generate" if key == "name" else None) for t in (old.task, self.task))
                what = {"name": "task", "choices": "--choices", "json_schema": "--json-schema (its content)",
                        "regex": "--regex", "on_long": "--on-long", "keep": "long.keep",
                        "overlap_tokens": "long.overlap_tokens", "reduce_prompt": "--reduce-prompt"}.get(key, "output." + key)
                if key == "json_schema":  # a schema is long: say that it changed, not how
                    before, after = ("none" if v is None else "a schema" for v in (before, after))
                changes.append(f"{what} changed: {before!r} -> {after!r}" if key != "json_schema"
                               else f"{what} changed: {before} -> {after}")
        if old.chunk_rows != self.chunk_rows:
            changes.append(f"chunk_rows changed: {old.chunk_rows} -> {self.chunk_rows}")
        return changes
