"""Config loading shared by every workload: defaults < YAML file < `--set key=value` < CLI flags.

Each workload has one pydantic model built on `StrictModel`. Validation happens once, on the merged data,
and a failure raises `ConfigError` listing every problem with its dotted path and, for a misspelt key,
the closest valid one.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from llmops.errors import ConfigError, UsageError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for every config: unknown keys are errors, attribute docstrings become field descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, turning unreadable or malformed files into a `UsageError`."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UsageError(f"config file not found: {path}", "check the path") from None
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UsageError(f"{path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{path} must hold a mapping of keys to values, not {type(data).__name__}")
    return data


def parse_sets(sets: list[str]) -> dict[str, Any]:
    """Turn `["train.lr=1e-4", "data.packing=false"]` into a nested dict; values are parsed as YAML."""
    out: dict[str, Any] = {}
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {item!r} is not key=value", "write it like --set sampling.temperature=0.7")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        set_dotted(out, key.strip(), value)
    return out


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """A new dict: `override` wins, nested mappings are merged rather than replaced."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(
    model: type[M],
    *,
    yaml_path: str | Path | None = None,
    yaml_data: dict[str, Any] | None = None,
    sets: list[str] | None = None,
    flags: dict[str, Any] | None = None,
    source: str | None = None,
) -> M:
    """Build and validate `model` from a YAML file (or data), `--set` overrides and CLI flags.

    `flags` holds dotted keys for options the user actually gave (None values are dropped), so a flag
    overrides the file only when it was typed.
    """
    data: dict[str, Any] = {}
    if yaml_path is not None:
        data = read_yaml(yaml_path)
    if yaml_data is not None:
        data = deep_merge(data, yaml_data)
    data = deep_merge(data, parse_sets(sets or []))
    flag_data: dict[str, Any] = {}
    for key, value in (flags or {}).items():
        if value is not None:
            set_dotted(flag_data, key, value)
    data = deep_merge(data, flag_data)
    return validate(model, data, source or (str(yaml_path) if yaml_path else model.__name__))


def validate(model: type[M], data: dict[str, Any], source: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(source, [_describe(model, err) for err in e.errors()]) from None


def _describe(model: type[BaseModel], err: Any) -> tuple[str, str]:
    loc = [str(p) for p in err["loc"]]
    path = ".".join(loc)
    if err["type"] == "extra_forbidden":
        parent = _model_at(model, loc[:-1])
        msg = "unknown key"
        if parent is not None:
            close = difflib.get_close_matches(loc[-1], list(parent.model_fields), n=1, cutoff=0.6)
            if close:
                msg += f"; did you mean `{'.'.join(loc[:-1] + close)}`?"
            else:
                msg += f"; valid keys here: {', '.join(parent.model_fields)}"
        return path, msg
    if err["type"] == "missing":
        return path, "required, but not given"
    msg = err["msg"]
    if "input" in err and err["type"] not in ("value_error", "assertion_error"):
        shown = repr(err["input"])
        msg += f" (got {shown[:60]})"
    return path, msg.removeprefix("Value error, ")


def _model_at(model: type[BaseModel], loc: list[str]) -> type[BaseModel] | None:
    """The nested model class found by following field names in `loc` (for did-you-mean)."""
    current: Any = model
    for part in loc:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return None
        current = _model_class(field.annotation)
        if current is None:
            return None
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _model_class(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_class(arg)
        if found is not None:
            return found
    return None


def dump_config(config: BaseModel, path: str | Path) -> None:
    """Write the resolved config as YAML next to an output, so every result records what produced it."""
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
