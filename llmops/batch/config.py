"""`BatchConfig`: everything that decides what `llmops batch` produces, and how sampling maps to vLLM.

The model's and the input's content, the sampling defaults, the input options, `chunk_rows` and the planned
engine dtype and max_model_len make up the job's identity (`identity.py`): resuming an output folder with
any of them changed is refused. The rest of the engine section only decides how fast the same results
come, so a job may resume on other hardware.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field

from llmops.config import StrictModel
from llmops.registry import DEFAULT_MODEL
from llmops.vllm_engine import EngineConfig


class SamplingConfig(StrictModel):
    """Defaults for every row; OpenAI Batch rows may override them in their `body`."""

    max_tokens: int = Field(default=256, ge=1)
    """Most tokens generated per row."""
    temperature: float = Field(default=0.0, ge=0.0)
    """0 is greedy: reproducible, so a resumed job gives the same text as an uninterrupted one."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    """Nucleus sampling: sample from the smallest token set whose probability reaches top_p."""
    seed: Optional[int] = None
    """Seed for every row's sampler; with it, sampled (temperature > 0) results are reproducible too."""
    stop: list[str] = Field(default_factory=list)
    """Strings that end a completion (not included in the text)."""


class InputConfig(StrictModel):
    """How rows are read from the input."""

    format: Literal["auto", "jsonl", "openai", "parquet", "arrow"] = "auto"
    """auto detects it from the file extension and the first line or the file's magic bytes."""
    prompt_column: Optional[str] = None
    """Parquet/Arrow: the column holding prompt text; auto picks `prompt` or `text`."""
    messages_column: Optional[str] = None
    """Parquet/Arrow: the column holding chat messages (list of {role, content}); auto picks `messages`."""
    id_column: Optional[str] = None
    """Parquet/Arrow: the column used as each row's id; auto picks `id`, else the row number is the id."""
    split: Optional[str] = None
    """Hugging Face dataset input (`hf://datasets/OWNER/NAME`, a `save_to_disk` folder): the split to read;
    none means `train`. A slice such as `train[:100]` is not supported."""
    subset: Optional[str] = None
    """Hugging Face dataset input: the subset (configuration) of a dataset that has several."""
    prompt_template: Optional[str] = None
    """Build each row's prompt from its columns (Parquet/Arrow columns, JSONL fields), e.g. "Classify the
    sentiment of this review: {text}"; sent as a user chat message (chat-formatted by the model's template).
    Part of the job's identity."""


class EmbedOutput(StrictModel):
    """Embedding jobs (`--task embed`): what each vector is and how it is stored. All of it is part of the
    job's identity: a resume that changes it is refused."""

    normalize: bool = True
    """Scale each vector to length 1 (cosine similarity is then a dot product); vLLM's `use_activation`."""
    dimensions: Optional[int] = Field(default=None, ge=1)
    """Keep the first N dimensions (Matryoshka truncation); only for models trained for it."""
    dtype: Literal["float32", "float16"] = "float32"
    """How vectors are stored: float16 halves the size."""
    on_long: Literal["truncate", "fail", "chunk"] = "truncate"
    """A text longer than the model's window: embed its start and set the row's `truncated` flag, fail the
    row, or embed every window-sized piece and mean-pool them (`--on-long`, which sets this for an
    embedding job)."""


class LabelConfig(StrictModel):
    """Constrained answers (labeling): each row's answer is one of `choices`, JSON valid against `json_schema`,
    or text matching `regex` (vLLM structured outputs). Set at most one; all are part of the job's identity
    (the schema by content)."""

    choices: list[str] = Field(default_factory=list)
    """The label set: every answer is exactly one of them, with `label`, `confidence` and `label_probs`
    columns (--choices "positive,negative,neutral")."""
    choices_file: Optional[str] = None
    """A file with one choice a line (blank lines skipped), instead of `choices`."""
    json_schema: Optional[str] = None
    """A JSON Schema file: every answer validates against it; a typed `parsed` column holds it as a struct
    where the schema maps to Arrow types."""
    regex: Optional[str] = None
    """Every answer matches this regular expression (IDs, dates, short codes)."""


DEFAULT_REDUCE_PROMPT = ("Below are summaries of consecutive parts of one long document, in order. Combine them "
                         "into one concise summary of the whole document.\n\n{parts}")


class LongConfig(StrictModel):
    """Rows too long for the context (`llmops/batch/long.py`). Part of the job's identity when `on_long` is not
    `fail`."""

    on_long: Optional[Literal["fail", "truncate", "chunk"]] = None
    """A row whose prompt and max_tokens do not fit the planned context: fail it; truncate its document (the
    row gets `truncated` and `dropped_tokens`); or chunk it: run the prompt on every piece of the document,
    in the same engine batches as the other rows, then combine the answers with the reduce prompt, in
    rounds, until one answer is left (`chunks`, `reduce_rounds`). Unset: fail for generation, truncate for
    embeddings (output.on_long)."""
    keep: Literal["head", "tail", "middle"] = "head"
    """truncate: the part of the document that is kept: its start (head), its end (tail), or both ends."""
    overlap_tokens: int = Field(default=64, ge=0)
    """chunk: tokens each piece repeats from the end of the one before, so no sentence is only ever seen cut."""
    reduce_prompt: str = DEFAULT_REDUCE_PROMPT
    """chunk: the prompt that combines the pieces' answers; `{parts}` is replaced by them, in document order."""


class BatchConfig(StrictModel):
    """One `llmops batch` job (YAML file, `--set`, flags)."""

    model: str = DEFAULT_MODEL
    """Registry alias, local model folder or Hugging Face id."""
    task: Literal["auto", "generate", "embed"] = "auto"
    """What each row becomes: generated text, or an embedding vector. auto: embed for a model the registry
    records as an embedding model, else generate."""
    output: EmbedOutput = Field(default_factory=EmbedOutput)
    long: LongConfig = Field(default_factory=LongConfig)
    label: LabelConfig = Field(default_factory=LabelConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    input: InputConfig = Field(default_factory=InputConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    chunk_rows: int = Field(default=500, ge=1)
    """Rows per output shard. A shard is the unit of work that is committed, resumed and spread over
    data-parallel engines: smaller loses less work when a job dies, larger makes fewer files."""


# OpenAI Batch `body` fields that map onto SamplingParams, and those accepted but without effect here.
_BODY_SAMPLING_FIELDS = {"max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
                         "presence_penalty", "frequency_penalty", "n"}
_BODY_IGNORED_FIELDS = {"model", "messages", "prompt", "user", "stream", "metadata", "store"}


def sampling_params(base: SamplingConfig, body: dict[str, Any] | None = None):
    """vLLM `SamplingParams` from the job's defaults and a row's overrides; raises ValueError for bad rows."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    values: dict[str, Any] = base.model_dump()
    for key, value in (body or {}).items():
        if key in _BODY_IGNORED_FIELDS:
            if key == "stream" and value:
                raise ValueError("stream: true is not supported in a batch")
            continue
        if key == "response_format":
            values["structured_outputs"] = response_format(value)
            continue
        if key not in _BODY_SAMPLING_FIELDS:
            raise ValueError(f"unsupported body field `{key}`")
        if key == "n":
            if value != 1:
                raise ValueError("only n = 1 is supported")
            continue
        if key == "max_completion_tokens":
            key = "max_tokens"
        if key == "stop" and isinstance(value, str):
            value = [value]
        if value is not None:
            values[key] = value
    for key in ("max_tokens", "seed"):
        if values.get(key) is not None and (isinstance(values[key], bool) or not isinstance(values[key], int)):
            raise ValueError(f"{key} must be an integer, got {values[key]!r}")
    for key in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        if key in values and (isinstance(values[key], bool) or not isinstance(values[key], (int, float))):
            raise ValueError(f"{key} must be a number, got {values[key]!r}")
    if not isinstance(values["stop"], list) or not all(isinstance(s, str) for s in values["stop"]):
        raise ValueError(f"stop must be a string or a list of strings, got {values['stop']!r}")
    if values.get("structured_outputs") is None:
        values.pop("structured_outputs", None)
    try:
        # FINAL_ONLY: the engine reports a request once, when it is finished (what LLM.generate does too).
        return SamplingParams(**values, output_kind=RequestOutputKind.FINAL_ONLY)
    except Exception as e:  # vLLM raises its own validation error type; every one of them fails this row
        raise ValueError(str(e)) from None


def response_format(value: Any):
    """vLLM `StructuredOutputsParams` for an OpenAI `response_format` (`text`, `json_object`, `json_schema`),
    as OpenAI's API takes it; None for plain text. Raises ValueError for a malformed one (the row fails)."""
    from vllm.sampling_params import StructuredOutputsParams

    kind = value.get("type") if isinstance(value, dict) else None
    if value is None or kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise ValueError("response_format.json_schema.schema must be a JSON Schema object")
        return StructuredOutputsParams(json=spec["schema"])
    raise ValueError(f"response_format.type must be text, json_object or json_schema, got {kind!r}")
