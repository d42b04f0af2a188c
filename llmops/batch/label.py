"""Labeling (`llmops batch --choices/--json-schema/--regex`): generation whose answer is constrained by vLLM's
structured outputs (xgrammar), so every ok row's answer parses.

- `--choices`: the answer is exactly one of the labels. `label_probs` is the engine's probability of each
  label's first token at the answer's first position, renormalised over the labels; `confidence` is the
  chosen label's entry. vLLM applies the grammar's mask to the logits before it computes logprobs, so the
  logprobs asked for (`logprob_token_ids`, the labels' first tokens) are already those of the constrained
  decoder; with distinct first tokens the rest of a label is forced, so this is exactly the probability the
  constrained decoder gives each label, from the one request that also generates the label. Labels that
  share their first token (`neutral`, `neutrality`) cannot be told apart there: such a job scores every
  label instead (one request per label, the sum of its tokens' prompt logprobs after the prompt,
  renormalised), and the label is the most probable one.
- `--json-schema`: the answer validates against the schema; `parsed` holds it as a typed struct where the
  schema maps to Arrow types (a part that does not map is kept as its JSON text).
- `--regex`: the answer matches the pattern.

A row whose answer still cannot be used (`max_tokens` cut it inside a JSON object, or inside a label) fails
alone, with its `finish_reason`, and is never written as half an answer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from llmops.batch.config import LabelConfig, SamplingConfig, sampling_params
from llmops.batch.identity import JobIdentity
from llmops.batch.inputs import Row
from llmops.batch.tasks import Generate, _adapter_of, _token_ids, tokens_input
from llmops.errors import UsageError

# Constrained decoding stops when the grammar is complete; a label needs at most one token per character
# (the model may spell it in pieces), plus the end-of-sequence token.
LABEL_TOKENS_SLACK = 1


class Label(Generate):
    name = "label"

    def __init__(self, sampling: SamplingConfig, choices: list[str] | None = None, schema: dict | None = None,
                 regex: str | None = None):
        super().__init__(sampling)
        self.choices = list(choices or [])
        self.schema = schema
        self.regex = regex

    def identity(self) -> dict[str, Any]:
        if self.choices:
            return {"name": self.name, "choices": self.choices}
        if self.schema is not None:
            return {"name": self.name, "json_schema": self.schema}
        return {"name": self.name, "regex": self.regex}

    def _structured(self):
        from vllm.sampling_params import StructuredOutputsParams

        if self.choices:
            return StructuredOutputsParams(choice=self.choices)
        if self.schema is not None:
            # No free whitespace: the small model spent tokens on blank lines between fields ('"neutral"\n\n,\n\n').
            return StructuredOutputsParams(json=self.schema, disable_any_whitespace=True)
        return StructuredOutputsParams(regex=self.regex)

    def open(self, llm, job: JobIdentity) -> dict[str, Any]:
        state = super().open(llm, job)
        tokenizer = state["tokenizer"]
        state["choice_ids"] = [tokenizer.encode(c, add_special_tokens=False) for c in self.choices]
        firsts = [ids[0] for ids in state["choice_ids"]]
        state["score"] = len(set(firsts)) < len(firsts)  # shared first tokens: score each label instead
        state["params"] = self._params(state, None)
        return state

    def _params(self, state, body: dict | None):
        params = sampling_params(self.sampling, body)
        if self.choices and state["score"]:
            params.max_tokens, params.prompt_logprobs = 1, 0
            return params
        params.structured_outputs = self._structured()
        if self.choices:
            params.max_tokens = max(len(c) for c in self.choices) + LABEL_TOKENS_SLACK
            params.logprob_token_ids = sorted({ids[0] for ids in state["choice_ids"]})
        return params

    def requests(self, state, row: Row):
        params = self._params(state, row.body) if row.body else state["params"]
        ids = _token_ids(state["tokenizer"], row)
        lora = state["lora"].get(_adapter_of(row, state["job"]))
        if self.choices and state["score"]:
            return [(tokens_input(ids + choice), params, lora) for choice in state["choice_ids"]]
        return [(tokens_input(ids), params, lora)]

    def result(self, state, row: Row, outputs: list[Any]) -> dict[str, Any]:
        if self.choices:
            return self._label(state, outputs)
        r = super().result(state, row, outputs)
        if self.schema is not None:
            try:
                value = json.loads(r["generated_text"])
            except json.JSONDecodeError:
                return {**r, "parsed": None, "error": _unusable(r, "the answer is not complete JSON")}
            r["parsed"] = _arrow_value(self.schema, value)
        elif r["finish_reason"] == "length":  # the pattern may not be complete
            return {**r, "error": _unusable(r, "the answer may not match the pattern yet")}
        return r

    def _label(self, state, outputs: list[Any]) -> dict[str, Any]:
        prompt_tokens = len(outputs[0].prompt_token_ids or ()) - (len(state["choice_ids"][0]) if state["score"] else 0)
        if state["score"]:
            logprobs = [_choice_logprob(output, len(ids)) for output, ids in zip(outputs, state["choice_ids"])]
            probs = _normalised(logprobs)
            label = self.choices[max(range(len(probs)), key=probs.__getitem__)]
            finish, completion = "stop", 0
        else:
            completion = outputs[0].outputs[0]
            finish = completion.finish_reason
            first = (completion.logprobs or [{}])[0]
            probs = _normalised([first[ids[0]].logprob if ids[0] in first else -math.inf
                                 for ids in state["choice_ids"]])
            label = completion.text if completion.text in self.choices else None
            completion = len(completion.token_ids)
        r = {"label": label, "confidence": probs[self.choices.index(label)] if label is not None else None,
             "label_probs": dict(zip(self.choices, probs)), "finish_reason": finish,
             "prompt_tokens": prompt_tokens, "completion_tokens": completion, "error": None}
        if label is None:
            r.update(label_probs=None, error=_unusable(r, "the answer is not one of the labels"))
        return r

    def columns(self, state=None) -> list[tuple[str, Any]]:
        import pyarrow as pa

        if self.choices:
            return [("label", pa.string()), ("confidence", pa.float64()),
                    ("label_probs", pa.struct([(c, pa.float64()) for c in self.choices])),
                    ("finish_reason", pa.string()), ("prompt_tokens", pa.int32()),
                    ("completion_tokens", pa.int32()), ("error", pa.string())]
        columns = super().columns(state)
        if self.schema is not None:
            columns.insert(1, ("parsed", arrow_type(self.schema)))
        return columns

    def openai_body(self, r: dict[str, Any], model: str, created: int) -> dict[str, Any]:
        if self.choices:
            r = {**r, "generated_text": r["label"]}
        return super().openai_body(r, model, created)


def _unusable(r: dict[str, Any], what: str) -> str:
    if r["finish_reason"] == "length":
        return f"{what}: max_tokens cut it after {r['completion_tokens']} tokens (finish_reason length); " \
               "raise --max-tokens"
    return f"{what} (finish_reason {r['finish_reason']})"


def _choice_logprob(output, n: int) -> float:
    """The log-probability of the last `n` prompt tokens (a label after its prompt)."""
    scored = output.prompt_logprobs[-n:]
    return sum(step[token].logprob for step, token in zip(scored, output.prompt_token_ids[-n:]))


def _normalised(logprobs: list[float]) -> list[float]:
    top = max(logprobs)
    if top == -math.inf:
        return [1 / len(logprobs)] * len(logprobs)
    weights = [math.exp(lp - top) for lp in logprobs]
    total = sum(weights)
    return [w / total for w in weights]


# --- JSON Schema to Arrow -------------------------------------------------------------------------------


def arrow_type(schema: Any):
    """The Arrow type of values valid against `schema`: objects become structs, strings and enums strings,
    numbers float64, integers int64, booleans bool, arrays lists; anything else (anyOf, $ref, free objects)
    is kept as its JSON text (string)."""
    import pyarrow as pa

    kind = _kind(schema)
    if kind == "object":
        props = schema.get("properties") or {}
        return pa.struct([(name, arrow_type(sub)) for name, sub in props.items()]) if props else pa.string()
    if kind == "array":
        return pa.list_(arrow_type(schema.get("items") or {}))
    return {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_()}.get(
        kind, pa.string())


def _kind(schema: Any) -> str | None:
    if not isinstance(schema, dict):
        return None
    kind = schema.get("type")
    if isinstance(kind, list):  # ["string", "null"]: the value or null
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if len(kinds) == 1 else None
    if kind is None and isinstance(schema.get("enum"), list) and all(isinstance(v, str) for v in schema["enum"]):
        return "string"
    if kind is None and "const" in schema and isinstance(schema["const"], str):
        return "string"
    return kind


def _arrow_value(schema: Any, value: Any) -> Any:
    """`value` shaped for `arrow_type(schema)`."""
    if value is None:
        return None
    kind = _kind(schema)
    if kind == "object" and schema.get("properties") and isinstance(value, dict):
        return {name: _arrow_value(sub, value.get(name)) for name, sub in schema["properties"].items()}
    if kind == "array" and isinstance(value, list):
        return [_arrow_value(schema.get("items") or {}, v) for v in value]
    if kind in ("integer", "number", "boolean") or (kind == "string" and isinstance(value, str)):
        return value
    return json.dumps(value)


# --- reading and checking the options, before any engine starts ------------------------------------------


def label_task(config: LabelConfig, sampling: SamplingConfig) -> Label | None:
    """The job's labeling task from `label.*`, or None when no constraint is set; a `UsageError` lists every
    problem (an empty label set, an unreadable or invalid schema, a bad pattern) with its fix."""
    problems: list[str] = []
    choices = list(config.choices)
    if config.choices_file is not None:
        path = Path(config.choices_file)
        try:
            choices += [line.strip() for line in path.read_text().splitlines() if line.strip()]
        except OSError as e:
            problems.append(f"--choices-file {path}: {(e.strerror or str(e)).lower()}")
        else:
            if not choices:
                problems.append(f"--choices-file {path} holds no labels: write one label a line")
    asked = [name for name, on in (("--choices", bool(config.choices) or config.choices_file is not None),
                                   ("--json-schema", config.json_schema is not None),
                                   ("--regex", config.regex is not None)) if on]
    if len(asked) > 1:
        problems.append(f"Can't provide both {' and '.join(f'`{a}`' for a in asked)}. Choose one.")
    if any(not c.strip() for c in config.choices):
        problems.append("--choices holds an empty label: give labels separated by commas, e.g. "
                        "--choices \"positive,negative,neutral\"")
    if len(set(choices)) < len(choices):
        repeated = sorted({c for c in choices if choices.count(c) > 1})
        problems.append(f"--choices names {', '.join(map(repr, repeated))} more than once: give each label once")
    schema = _read_schema(config.json_schema, problems) if config.json_schema is not None else None
    if config.regex is not None:
        problems += _grammar_problems("regex", config.regex)
    if problems:
        raise UsageError("; ".join(problems))
    if not asked:
        return None
    return Label(sampling, choices=[c.strip() for c in choices], schema=schema, regex=config.regex)


def _read_schema(location: str, problems: list[str]) -> dict | None:
    path = Path(location)
    try:
        schema = json.loads(path.read_text())
    except OSError as e:
        problems.append(f"--json-schema {path}: {(e.strerror or str(e)).lower()}")
        return None
    except json.JSONDecodeError as e:
        problems.append(f"--json-schema {path} is not JSON: {e}")
        return None
    if not isinstance(schema, dict):
        problems.append(f"--json-schema {path} is not a JSON Schema object (it holds a {type(schema).__name__})")
        return None
    try:
        import jsonschema  # optional (the `dev` extra): the full metaschema check where it is installed
    except ImportError:
        pass
    else:
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as e:
            problems.append(f"--json-schema {path} is not valid JSON Schema: {e.message} (at "
                            f"{'/'.join(map(str, e.absolute_path)) or 'the top'})")
            return None
    found = _grammar_problems("json", schema)
    problems += [f"--json-schema {path}: {p}" for p in found]
    return None if found else schema


def _grammar_problems(kind: str, value: Any) -> list[str]:
    """What vLLM's structured-output backend (xgrammar) says about a schema or a pattern: it compiles both
    without a tokenizer, in milliseconds, so the refusal comes before any engine starts."""
    import xgrammar

    try:
        if kind == "json":
            xgrammar.Grammar.from_json_schema(json.dumps(value))
        else:
            xgrammar.Grammar.from_regex(value)
    except Exception as e:  # xgrammar raises RuntimeError carrying its C++ message
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        message = message.split(": ", 1)[-1] if message.startswith("[") else message
        what = "vLLM's structured-output backend (xgrammar) cannot compile it" if kind == "json" \
            else f"--regex {value!r} is not a pattern xgrammar can compile"
        return [f"{what}: {message}"]
    return []
