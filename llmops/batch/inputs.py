"""Reading batch input: find the files, detect their format, and stream them as fixed-size work units.

Formats:
- `jsonl`: one JSON object a line with `prompt` (text) or `messages` (chat); an `id` field is kept as the id.
- `openai`: OpenAI Batch API request lines `{custom_id, method, url, body}`.
- `parquet` / `arrow`: Parquet or Arrow IPC files (one file or a folder/glob of shards), read in record
  batches so the whole dataset is never in memory; every input column is kept in the output.

Where: a local file, folder or glob; the same on object storage (`s3://bucket/data/`, `gs://b/x.parquet`,
`s3://b/data/*.parquet`), read through pyarrow's filesystems a stream or a row group at a time; or a Hugging
Face dataset (`hf://datasets/OWNER/NAME[@REVISION]`, or a folder written by `Dataset.save_to_disk`), loaded
with `datasets` and read from its Arrow cache files in place, as Arrow input.

A unit is `chunk_rows` consecutive rows of one file, named `FFFFF-CCCCCC` (file number, chunk number). The
same input and `chunk_rows` always give the same units, which is what makes resuming exact.
"""

from __future__ import annotations

import glob
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Union

from llmops.batch.config import InputConfig
from llmops.errors import StorageError, UsageError
from llmops.storage import (base_name, file_size, find_objects, is_uri, missing_error, open_input_file,
                            open_input_stream, parent, reading)

# A local file, or the full URI of an object (`s3://bucket/key`) that any node can open by that name.
Location = Union[Path, str]

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet",
            ".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow", ".arrows": "arrow"}
# The OpenAI Batch URLs a generation job answers; each task says its own (`tasks.RowTask.openai_urls`).
OPENAI_URLS = ("/v1/chat/completions", "/v1/completions")
HF_DATASET_URI = "hf://datasets/"
# The files `Dataset.save_to_disk` writes beside its Arrow shards (`dataset_dict.json` for a DatasetDict).
HF_SAVED_MARKERS = ("state.json", "dataset_dict.json")
# The columns any task writes (`tasks.py`): an input column of the same name would be ambiguous.
RESULT_COLUMNS = ("row", "generated_text", "finish_reason", "prompt_tokens", "completion_tokens", "embedding",
                  "truncated", "label", "confidence", "label_probs", "parsed", "error")
# Lines read ahead to detect a JSONL flavour: the first parseable object decides.
_SNIFF_LINES = 100


@dataclass(frozen=True)
class InputSpec:
    """A detected input: its files, format and (for Parquet/Arrow) the columns that matter."""

    files: tuple[Location, ...]
    """`Path` for a local file, the full URI (`str`) for an object on remote storage. A plain string that
    is not a URI becomes a `Path`, so `InputSpec(tuple(manifest.input_paths), ...)` rebuilds a spec."""
    format: str
    prompt_column: str | None = None
    messages_column: str | None = None
    id_column: str | None = None
    openai_urls: tuple[str, ...] = OPENAI_URLS
    """OpenAI Batch input: the request URLs the job's task answers; a line with another fails alone."""
    prompt_template: str | None = None
    """`input.prompt_template`: each row's prompt is built from its columns (a user chat message)."""

    def __post_init__(self):
        object.__setattr__(self, "files", tuple(f if isinstance(f, Path) or is_uri(f) else Path(f)
                                                for f in self.files))

    def locations(self) -> list[str]:
        """Where each file is, openable on any node that sees the same storage: absolute local paths,
        URIs as they are."""
        return [str(f.resolve()) if isinstance(f, Path) else f for f in self.files]

    def total_bytes(self) -> int | None:
        """The files' total size, or None when one cannot be stat'ed."""
        total = 0
        for f in self.files:
            try:
                size = f.stat().st_size if isinstance(f, Path) else file_size(f)
            except (OSError, UsageError):
                return None
            if size is None:
                return None
            total += size
        return total

    def identity(self):
        """What identifies this input in the job's identity: its format, columns and content digest (not
        its folder or bucket, so a job may resume where its input is mounted or copied elsewhere)."""
        from llmops.batch.identity import InputIdentity
        from llmops.fingerprint import files_digest

        try:
            digest = files_digest(self.files)
        except OSError as e:
            raise UsageError(f"cannot read {e.filename}: {(e.strerror or str(e)).lower()}") from None
        return InputIdentity(format=self.format, files=[base_name(f) for f in self.files], digest=digest,
                             prompt_column=self.prompt_column, messages_column=self.messages_column,
                             id_column=self.id_column, prompt_template=self.prompt_template)


@dataclass
class Row:
    """One request: text or chat, with per-row sampling overrides (OpenAI `body`), or why it is bad."""

    index: int
    """Position in the whole input (0-based, across files)."""
    id: str | None
    """None only for an OpenAI Batch line that cannot be parsed (its custom_id is unknown, never invented)."""
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    body: dict[str, Any] | None = None
    texts: list[str] | None = None
    """An OpenAI `/v1/embeddings` request whose `input` is a list of strings: one embedding each."""
    error: str | None = None
    truncated: bool = False
    """Set by a task that cut the row's text to the model's window (an embedding job flags it)."""


@dataclass
class Unit:
    key: str
    rows: list[Row]
    kept: Any
    """pyarrow Table of input columns to keep, one row per `rows` entry."""
    piece: bool = False
    """Some rows of this unit were committed by an earlier, stopped run: `rows` holds the rest only, and
    they are committed as another piece of the unit."""


# --- detection ----------------------------------------------------------------------------------------


def open_input(path: str, config: InputConfig) -> InputSpec:
    """Find the input files and detect their format; a `UsageError` says what could not be read and why."""
    if path.startswith("hf://") or (Path(path).is_dir() and any((Path(path) / m).is_file() for m in HF_SAVED_MARKERS)):
        return _hf_dataset(path, config)
    if config.split or config.subset:
        raise UsageError("input.split and input.subset apply to Hugging Face datasets",
                         f"{path} is not one: leave them unset, or give hf://datasets/OWNER/NAME or a folder "
                         "written by Dataset.save_to_disk")
    files = _find_remote(path) if is_uri(path) else _find_files(path)
    fmt = config.format
    if fmt == "auto":
        kinds = {f: _sniff(f) for f in files}
        if len(set(kinds.values())) > 1:
            listing = ", ".join(f"{base_name(f)}: {k}" for f, k in list(kinds.items())[:6])
            raise UsageError(f"{path} mixes input formats ({listing})", "give one format per job")
        fmt = next(iter(kinds.values()))
        if fmt == "jsonl":
            fmt = _jsonl_flavour(files[0], templated=config.prompt_template is not None)
    if fmt in ("jsonl", "openai"):
        if config.prompt_column or config.messages_column or config.id_column:
            raise UsageError("--prompt-column, --messages-column and --id-column apply to Parquet/Arrow input",
                             f"{path} is JSONL: name the fields `prompt`/`messages`/`id` in each line")
        if config.prompt_template is not None:
            if fmt == "openai":
                raise UsageError("--prompt-template does not apply to OpenAI Batch input (its requests hold their "
                                 "prompts)", "drop --prompt-template, or give prompt JSONL or Parquet rows")
            _check_template(config.prompt_template, _first_object_keys(files[0]), files[0])
        return InputSpec(tuple(files), fmt, prompt_template=config.prompt_template)
    return _columns(files, fmt, config)


def template_fields(template: str) -> list[str]:
    """The column names a prompt template fills (`{text}`, `{title}`), in order; ValueError if malformed."""
    import string

    names = []
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(f"`{{{name}}}` is not a column name: write {{column}} (double a brace, {{{{ }}}}, "
                             "for a literal one)")
        names.append(name)
    if not names:
        raise ValueError("it names no column: write the columns to fill as {column}")
    return list(dict.fromkeys(names))


def _check_template(template: str, columns: list[str], where: Location) -> None:
    """A template that cannot be filled exits 2 before any engine starts, naming what is missing."""
    try:
        fields = template_fields(template)
    except ValueError as e:
        raise UsageError(f"--prompt-template {template!r}: {e}") from None
    missing = [f for f in fields if f not in columns]
    if missing:
        raise UsageError(f"--prompt-template names {', '.join(map(repr, missing))}, which {base_name(where)} does "
                         f"not have (columns: {', '.join(columns[:20]) or 'none'})",
                         "name existing columns in the template as {column}")


def _first_object_keys(path: Location) -> list[str]:
    with reading(path), _open_bytes(path) as f:
        for n, line in enumerate(f):
            if n >= _SNIFF_LINES:
                break
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(obj, dict):
                return list(obj)
    return []


def _fill(template: str, values: dict[str, Any]) -> tuple[list[dict[str, str]] | None, str | None]:
    """A row's prompt from the template, as one user message; or why this row cannot fill it."""
    missing = [f for f in template_fields(template) if values.get(f) is None]
    if missing:
        return None, f"no value for {', '.join(missing)} (--prompt-template)"
    text = template.format(**{k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()})
    return [{"role": "user", "content": text}], None


def _hf_dataset(location: str, config: InputConfig) -> InputSpec:
    """A Hugging Face dataset, read as Arrow input from the Arrow files `datasets` keeps it in (its cache,
    or the `save_to_disk` folder): nothing is copied, and the files are memory-mapped, never loaded whole."""
    if config.format not in ("auto", "arrow"):
        raise UsageError(f"{location} is a Hugging Face dataset, read as Arrow: input.format "
                         f"{config.format!r} does not apply", "leave input.format at auto")
    try:
        import datasets
    except ImportError:
        raise UsageError(f"reading {location} needs the `datasets` library",
                         "pip install 'llmops[hf]' (or pip install datasets)") from None
    split = config.split or "train"
    if location.startswith("hf://"):
        dataset = _load_hub_dataset(datasets, location, split, config.subset)
    else:
        if config.subset:
            raise UsageError(f"input.subset does not apply to {location}: a saved dataset has one subset",
                             "leave input.subset unset")
        if _saved_without_rows(Path(location)):  # datasets itself fails with "list index out of range"
            raise UsageError(f"{location} is an empty dataset: it has no rows to run",
                             "save the dataset again with its rows, or give another input")
        try:
            dataset = datasets.load_from_disk(location)
        except Exception as e:  # datasets raises FileNotFoundError, ValueError or JSON errors for a bad folder
            raise UsageError(f"cannot load the saved dataset {location}: {_first_line(e)}",
                             "give a folder written by Dataset.save_to_disk or DatasetDict.save_to_disk") from None
        if isinstance(dataset, datasets.Dataset) and config.split is not None and dataset.split != config.split:
            # One saved Dataset has one split: asking for another must not silently read this one.
            raise UsageError(f"{location} is a single dataset (split: {dataset.split or 'not named'}), so "
                             f"input.split={config.split} cannot choose from it",
                             "leave input.split unset, or give the folder of a saved DatasetDict")
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise UsageError(f"{location} has no split {split!r} (splits: {', '.join(dataset)})",
                                 "choose one with --set input.split=NAME")
            dataset = dataset[split]
    files = tuple(Path(f["filename"]) for f in dataset.cache_files)
    if not files:
        raise UsageError(f"{location} is held in memory only, with no Arrow files to read",
                         "save it with Dataset.save_to_disk and give that folder")
    spec = _columns(list(files), "arrow", config)
    # A sliced split (train[:100]) or a dataset with an indices mapping (select, shuffle, filter) covers only
    # some rows of its Arrow files; reading the files would give other rows.
    if dataset._indices is not None or sum(count_rows(spec)) != len(dataset):
        raise UsageError(f"{location}: the split {split!r} is a selection of the rows in its Arrow files",
                         "give a whole split (not a slice such as train[:100]), or save the selection with "
                         "Dataset.save_to_disk (which writes only its rows) and give that folder")
    return spec


def _saved_without_rows(folder: Path) -> bool:
    """A `Dataset.save_to_disk` folder of an empty dataset: its state.json lists no data files."""
    try:
        return json.loads((folder / "state.json").read_text()).get("_data_files") == []
    except (OSError, ValueError, AttributeError):
        return False


def _load_hub_dataset(datasets, uri: str, split: str, subset: str | None):
    """`hf://datasets/OWNER/NAME[@REVISION]` (the form pandas, polars and duckdb read) through
    `datasets.load_dataset`, which downloads it to the local cache once, or finds it there offline."""
    name, _, revision = uri[len(HF_DATASET_URI):].rstrip("/").partition("@")
    if not uri.startswith(HF_DATASET_URI) or name.count("/") > 1 or "/" in revision or not name:
        raise UsageError(f"cannot read {uri}: expected hf://datasets/OWNER/NAME or hf://datasets/OWNER/NAME@REVISION",
                         "choose the split with --set input.split=NAME and the subset with --set input.subset=NAME")
    try:
        return datasets.load_dataset(name, subset, split=split, revision=revision or None)
    except Exception as e:  # datasets raises many types (ConnectionError, ValueError, DatasetNotFoundError...)
        what = f"{name}" + (f" (subset {subset!r}, split {split!r})" if subset else f" (split {split!r})")
        if datasets.config.HF_HUB_OFFLINE:
            hint = ("it is not in the local cache (HF_HOME) and HF_HUB_OFFLINE is set: load it once where the "
                    "Hub is reachable, or give a local folder written by Dataset.save_to_disk")
        elif isinstance(e, ConnectionError):
            hint = ("the Hub cannot be reached: set HF_HUB_OFFLINE=1 and use a dataset in the local cache "
                    "(HF_HOME), or give a local folder written by Dataset.save_to_disk")
        else:
            hint = "check the name, and the split and subset (--set input.split=NAME, --set input.subset=NAME)"
        raise UsageError(f"cannot load the Hugging Face dataset {what}: {_first_line(e)}", hint) from None


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _find_files(path: str) -> list[Path]:
    if any(c in path for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(path, recursive=True) if Path(p).is_file())
        if not files:
            raise UsageError(f"no files match {path}")
        return files
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES
                       and not any(part.startswith((".", "_")) for part in f.relative_to(p).parts))
        if not files:
            raise UsageError(f"{path} holds no input files",
                             f"expected files named {', '.join(sorted(SUFFIXES))}")
        return files
    if p.is_file():
        return [p]
    raise UsageError(f"input not found: {path}", "give a file, a folder of shards or a glob like 'data/*.parquet'")


def _find_remote(uri: str) -> list[str]:
    """The objects a URI names, with the same rules as a local file, folder (prefix) or glob."""
    with reading(uri):
        kind, found = find_objects(uri)
    if kind == "missing":
        raise missing_error(uri)
    if kind == "folder":
        found = [f for f in found if Path(base_name(f)).suffix in SUFFIXES]
        if not found:
            raise UsageError(f"{uri} holds no input files", f"expected files named {', '.join(sorted(SUFFIXES))}")
    if not found:
        raise UsageError(f"no files match {uri}", "check the bucket and the pattern")
    return found


def _open_bytes(path: Location):
    """The file's bytes, read front to back (iterating gives lines)."""
    return open(path, "rb") if isinstance(path, Path) else open_input_stream(path)


def _sniff(path: Location) -> str:
    suffix = Path(base_name(path)).suffix.lower()
    if suffix in SUFFIXES:
        return SUFFIXES[suffix]
    try:
        with reading(path), _open_bytes(path) as f:
            head = f.read(64)
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.startswith(b"ARROW1") or head.startswith(b"\xff\xff\xff\xff"):
        return "arrow"
    if head.lstrip().startswith(b"{"):
        return "jsonl"
    raise UsageError(f"cannot detect the format of {path}: not JSONL, Parquet or Arrow IPC",
                     "name it .jsonl, .parquet or .arrow, or pass --set input.format=jsonl|openai|parquet|arrow")


def _jsonl_flavour(path: Location, templated: bool = False) -> str:
    """`openai` for OpenAI Batch request lines, `jsonl` for prompt/messages lines (or, with a prompt
    template, any object: the template names its fields)."""
    with reading(path), _open_bytes(path) as f:
        for n, line in enumerate(f):
            if n >= _SNIFF_LINES:
                break
            try:
                obj = json.loads(line.decode("utf-8", errors="replace"))
            except json.JSONDecodeError:
                continue
            if not isinstance(obj, dict):
                continue
            if "custom_id" in obj or "body" in obj:
                return "openai"
            if "prompt" in obj or "messages" in obj or templated:
                return "jsonl"
            raise UsageError(f"cannot detect the input format: the first object in {path} has keys "
                             f"{sorted(obj)[:10]}",
                             "each line needs `prompt` (text), `messages` (chat) or, for OpenAI Batch "
                             "input, `custom_id`, `method`, `url` and `body`")
    raise UsageError(f"cannot detect the input format: no JSON object in the first lines of {path}",
                     "expected one JSON object a line (JSONL)")


def _schema(path: Location, fmt: str):
    import pyarrow.parquet as pq

    try:
        with reading(path):
            return pq.read_schema(_random_access(path)) if fmt == "parquet" else _open_arrow(path).schema
    except UsageError:
        raise
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for anything unreadable
        raise UsageError(f"cannot read {path} as {fmt}: {e}") from None


def _random_access(path: Location):
    """What pyarrow's Parquet reader opens: the local path as today, a random-access file for a URI."""
    return path if isinstance(path, Path) else open_input_file(path)


def _columns(files: list[Location], fmt: str, config: InputConfig) -> InputSpec:
    schema = _schema(files[0], fmt)
    names = list(schema.names)
    listing = ", ".join(names[:20])
    if config.prompt_column and config.messages_column:
        raise UsageError("Can't provide both `--prompt-column` and `--messages-column`. Choose one.")
    prompt_col, messages_col = config.prompt_column, config.messages_column
    if config.prompt_template is not None:
        if prompt_col or messages_col:
            raise UsageError("Can't provide both `--prompt-template` and `--prompt-column`/`--messages-column`. "
                             "Choose one.")
        _check_template(config.prompt_template, names, files[0])
    elif not prompt_col and not messages_col:
        if "messages" in names:
            messages_col = "messages"
        else:
            prompt_col = next((c for c in ("prompt", "text") if c in names), None)
        if not prompt_col and not messages_col:
            raise UsageError(f"{files[0]} has no `prompt`, `text` or `messages` column (columns: {listing})",
                             "name the column to use with --prompt-column or --messages-column")
    id_col = config.id_column or ("id" if "id" in names else None)
    clashes = [c for c in RESULT_COLUMNS + (() if id_col == "id" else ("id",)) if c in names]
    if clashes:
        raise UsageError(f"{files[0]} has columns named like result columns: {', '.join(clashes)}",
                         "rename them, or pass --id-column id if `id` holds the row ids")
    for f in files:
        have = set(_schema(f, fmt).names) if f != files[0] else set(names)
        missing = [c for c in (prompt_col, messages_col, id_col) if c and c not in have]
        if missing:
            raise UsageError(f"{f} has no column {', '.join(missing)} (columns: {', '.join(sorted(have)[:20])})",
                             "check --prompt-column/--messages-column/--id-column")
    return InputSpec(tuple(files), fmt, prompt_col, messages_col, id_col, prompt_template=config.prompt_template)


def _open_arrow(path: Location):
    """An Arrow IPC reader for the file format (random access) or the stream format."""
    import pyarrow as pa

    source = pa.memory_map(str(path)) if isinstance(path, Path) else open_input_file(path)
    try:
        return pa.ipc.open_file(source)
    except pa.ArrowInvalid:
        if isinstance(path, Path):
            source.seek(0)
            return pa.ipc.open_stream(source)
        # A stream is read front to back: through a buffer, not one ranged GET per record batch.
        return pa.ipc.open_stream(open_input_stream(path))


# --- streaming ----------------------------------------------------------------------------------------


def count_rows(spec: InputSpec) -> list[int]:
    """Rows in each file, cheaply: Parquet footers, Arrow batch headers, JSONL non-blank lines."""
    import pyarrow.parquet as pq

    counts = []
    for f in spec.files:
        with reading(f):
            if spec.format == "parquet":
                counts.append(pq.ParquetFile(_random_access(f)).metadata.num_rows)
            elif spec.format == "arrow":
                counts.append(sum(batch.num_rows for batch in _arrow_batches(f)))
            else:
                with _open_bytes(f) as fh:
                    counts.append(sum(1 for line in fh if line.strip()))
    return counts


def unit_keys(row_counts: list[int], chunk_rows: int) -> list[str]:
    """Every unit of the input, in order."""
    return [_key(i, c) for i, n in enumerate(row_counts) for c in range(-(-n // chunk_rows))]


def unit_sizes(row_counts: list[int], chunk_rows: int) -> dict[str, int]:
    """Rows in each unit, by key, in order."""
    return {_key(i, c): min(chunk_rows, n - c * chunk_rows)
            for i, n in enumerate(row_counts) for c in range(-(-n // chunk_rows))}


def _key(file_index: int, chunk: int) -> str:
    return f"{file_index:05d}-{chunk:06d}"


def iter_units(spec: InputSpec, row_counts: list[int], chunk_rows: int, wanted: set[str],
               rows_done: dict[str, set[int]] | None = None) -> Iterator[Unit]:
    """Stream the units named in `wanted`, in input order; the others are read past, never parsed.
    `rows_done` names rows of a unit already committed (by a stopped run): the unit comes without them."""
    rows_done = rows_done or {}
    first_row = 0
    for i, path in enumerate(spec.files):
        if any(_key(i, c) in wanted for c in range(-(-row_counts[i] // chunk_rows))):
            chunks = _jsonl_chunks(path, chunk_rows) if spec.format in ("jsonl", "openai") \
                else _arrow_chunks(spec, path, chunk_rows)
            for c, chunk in enumerate(chunks):
                key = _key(i, c)
                if key in wanted:
                    start = first_row + c * chunk_rows
                    unit = _jsonl_unit(spec, key, start, chunk) if isinstance(chunk, list) \
                        else _table_unit(spec, key, start, chunk)
                    yield _without(unit, rows_done[key]) if rows_done.get(key) else unit
        first_row += row_counts[i]


def _jsonl_chunks(path: Location, chunk_rows: int) -> Iterator[list[tuple[int, bytes]]]:
    chunk: list[tuple[int, bytes]] = []
    # Storage failing mid-job is a runtime failure (exit 1, the rerun resumes), not bad input.
    with reading(path, StorageError), _open_bytes(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            chunk.append((line_no, line))
            if len(chunk) == chunk_rows:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def _arrow_batches(path: Location, fmt: str = "arrow"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if fmt == "parquet":
        yield from pq.ParquetFile(_random_access(path)).iter_batches(batch_size=8192)
        return
    reader = _open_arrow(path)
    if isinstance(reader, pa.ipc.RecordBatchFileReader):
        for b in range(reader.num_record_batches):
            yield reader.get_batch(b)
    else:
        yield from reader


def _arrow_chunks(spec: InputSpec, path: Location, chunk_rows: int):
    """Record batches regrouped into tables of exactly `chunk_rows` rows (the last may be shorter)."""
    import pyarrow as pa

    pending, count = [], 0
    with reading(path, StorageError):  # failing mid-job: a runtime failure, the rerun resumes
        for batch in _arrow_batches(path, spec.format):
            while batch.num_rows:
                take = min(chunk_rows - count, batch.num_rows)
                pending.append(batch.slice(0, take))
                count += take
                batch = batch.slice(take)
                if count == chunk_rows:
                    yield pa.Table.from_batches(pending)
                    pending, count = [], 0
    if count:
        yield pa.Table.from_batches(pending)


def _without(unit: Unit, done: set[int]) -> Unit:
    keep = [n for n, row in enumerate(unit.rows) if row.index not in done]
    return Unit(unit.key, [unit.rows[n] for n in keep], unit.kept.take(keep), piece=True)


# --- rows ---------------------------------------------------------------------------------------------


def _jsonl_unit(spec: InputSpec, key: str, start: int, lines: list[tuple[int, bytes]]) -> Unit:
    import pyarrow as pa

    rows, kept = [], []
    openai = spec.format == "openai"
    # In a folder of several files a line is named with its file, and an id made from it carries the file
    # too: "line 1" and `line-1` would be the first line of every file.
    name = base_name(spec.files[int(key.split("-", 1)[0])]) if len(spec.files) > 1 else None
    for n, (line_no, raw) in enumerate(lines):
        index = start + n
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            rows.append(Row(index, None if openai else _in_file(name, f"line-{line_no}", ":"),
                            error=_in_file(name, f"line {line_no}: not valid JSON ({e})")))
            kept.append(_kept_openai(None) if openai else (None, None, raw.decode(errors="replace")))
            continue
        # Valid JSON may still hold text that is not Unicode (a lone surrogate such as "\ud800"): it could be
        # neither tokenized nor stored, so that row fails alone, its strings kept in escaped form.
        bad_text = _lone_surrogate(raw, obj)
        if bad_text:
            obj = _escaped(obj)
        row = _openai_row(index, line_no, obj, spec.openai_urls) if openai \
            else _prompt_row(index, line_no, obj, spec.prompt_template)
        if bad_text:
            row.error, row.body = f"line {line_no}: {bad_text}", None
        if row.error and row.error.startswith("line "):
            row.error = _in_file(name, row.error)
        if not isinstance(obj, dict) and row.id == f"line-{line_no}":  # an id made from the line
            row.id = _in_file(name, row.id, ":")
        rows.append(row)
        if openai:
            kept.append(_kept_openai(obj))
        else:
            extra = {k: v for k, v in obj.items() if k not in ("prompt", "messages", "id")} \
                if isinstance(obj, dict) else {"value": obj}
            prompt = obj.get("prompt") if isinstance(obj, dict) else None
            # Every input column is kept: a prompt that is not text (and fails) is kept as its JSON.
            kept.append((prompt if isinstance(prompt, str) or prompt is None else json.dumps(prompt),
                         json.dumps(obj["messages"]) if isinstance(obj, dict) and "messages" in obj else None,
                         json.dumps(extra) if extra else None))
    names = ("url", "body") if openai else ("prompt", "messages", "metadata")
    columns = list(zip(*kept)) if kept else [[] for _ in names]
    table = pa.table({name: pa.array(list(col), pa.string()) for name, col in zip(names, columns)})
    return Unit(key, rows, table)


# A JSON escape of a UTF-16 surrogate (\ud800-\udfff): the only way valid JSON can hold text that is not
# valid Unicode. Pairs are fine; only a line that has such an escape is checked further.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _lone_surrogate(raw: bytes, obj: Any) -> str | None:
    if not _SURROGATE_ESCAPE.search(raw):
        return None
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        return (f"text holds a lone surrogate ({e.object[e.start:e.end].encode('utf-8', 'backslashreplace').decode()}"
                "), which is not valid Unicode")


def _escaped(value: Any) -> Any:
    """`value` with every string made valid Unicode (a lone surrogate becomes the text `\\ud800`)."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, list):
        return [_escaped(v) for v in value]
    if isinstance(value, dict):
        return {_escaped(k): _escaped(v) for k, v in value.items()}
    return value


def _kept_openai(obj: Any) -> tuple[str | None, str | None]:
    if not isinstance(obj, dict):
        return None, None
    url = obj.get("url") if isinstance(obj.get("url"), str) else None
    return url, json.dumps(obj.get("body")) if "body" in obj else None


def _in_file(name: str | None, text: str, sep: str = " ") -> str:
    return text if name is None else f"{name}{sep}{text}"


def _prompt_row(index: int, line_no: int, obj: Any, template: str | None = None) -> Row:
    if not isinstance(obj, dict):
        return Row(index, str(index), error=f"line {line_no}: expected a JSON object, got {type(obj).__name__}")
    row_id = str(obj["id"]) if obj.get("id") is not None else str(index)
    row = Row(index, row_id)
    if template is not None:
        row.messages, row.error = _fill(template, obj)
    elif "messages" in obj:
        row.messages, row.error = _messages(obj["messages"])
    elif "prompt" in obj:
        row.prompt, row.error = _prompt(obj["prompt"])
    else:
        row.error = f"line {line_no}: no `prompt` or `messages` field"
    return row


def check_custom_ids(spec: InputSpec) -> set[str]:
    """OpenAI Batch input: every request needs its own custom_id (the only way to match results to
    requests), so a missing or repeated one refuses the job before anything runs, naming the lines.
    Returns the `body.model` names the requests ask for (the job plans the LoRA adapters among them)."""
    lines_by_id: dict[str, list[str]] = {}
    missing: list[str] = []
    models: set[str] = set()
    for f in spec.files:
        where = f"{base_name(f)} line" if len(spec.files) > 1 else "line"
        with reading(f), _open_bytes(f) as fh:
            for line_no, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    continue  # fails alone at run time
                if not isinstance(obj, dict):
                    continue
                if isinstance(obj.get("body"), dict) and isinstance(obj["body"].get("model"), str):
                    models.add(obj["body"]["model"])
                if obj.get("custom_id") is None:
                    missing.append(f"{where} {line_no}")
                else:
                    lines_by_id.setdefault(str(obj["custom_id"]), []).append(f"{where} {line_no}")
    source = spec.files[0] if len(spec.files) == 1 else parent(spec.files[0])
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise UsageError(f"{source}: no custom_id on {', '.join(missing[:5])}{more}; every OpenAI Batch "
                         "request needs a unique custom_id")
    repeated = [(cid, where) for cid, where in lines_by_id.items() if len(where) > 1]
    if repeated:
        listing = "; ".join(f"{cid!r} on {', '.join(where)}" for cid, where in repeated[:5])
        more = f" and {len(repeated) - 5} more" if len(repeated) > 5 else ""
        raise UsageError(f"{source}: duplicate custom_id {listing}{more}; every OpenAI Batch request needs a "
                         "unique custom_id")
    return models


def _openai_row(index: int, line_no: int, obj: Any, urls: tuple[str, ...] = OPENAI_URLS) -> Row:
    if not isinstance(obj, dict):
        return Row(index, f"line-{line_no}", error=f"line {line_no}: expected a JSON object")
    custom_id = obj.get("custom_id")
    body, url = obj.get("body"), obj.get("url")
    row = Row(index, str(custom_id) if custom_id is not None else None)
    if custom_id is None:
        row.error = f"line {line_no}: no custom_id"
    elif obj.get("method", "POST") != "POST":
        row.error = f"method must be POST, got {obj.get('method')!r}"
    elif url not in urls:
        row.error = f"url must be one of {', '.join(urls)}, got {url!r}"
    elif not isinstance(body, dict):
        row.error = "body must be a JSON object"
    elif url == "/v1/chat/completions":
        row.messages, row.error = _messages(body.get("messages"))
    elif url == "/v1/embeddings":
        row.prompt, row.texts, row.error = _embedding_input(body.get("input"))
    else:
        row.prompt, row.error = _prompt(body.get("prompt"))
    if row.error is None:
        row.body = body
    return row


def _prompt(value: Any) -> tuple[str | None, str | None]:
    if not isinstance(value, str):
        return None, f"prompt must be a string, got {type(value).__name__}"
    if not value.strip():
        return None, "empty prompt"
    return value, None


def _embedding_input(value: Any) -> tuple[str | None, list[str] | None, str | None]:
    """An OpenAI embeddings `input`: a string, or a list of strings (one embedding each)."""
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        empty = [i for i, v in enumerate(value) if not v.strip()]
        return (None, None, f"input[{empty[0]}] is empty") if empty else (None, value, None)
    if isinstance(value, list):
        return None, None, "input must be a string or a non-empty list of strings (token ids are not supported)"
    prompt, error = _prompt(value)
    return prompt, None, error and error.replace("prompt", "input")


def _messages(value: Any) -> tuple[list[dict[str, str]] | None, str | None]:
    """Chat messages as [{role, content: str}]; OpenAI content parts of type text are joined."""
    if not isinstance(value, list) or not value:
        return None, "messages must be a non-empty list of {role, content}"
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            return None, f"messages[{i}] needs a string `role`"
        content = m.get("content")
        if isinstance(content, list):
            parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
                return None, f"messages[{i}].content: only text parts are supported"
            content = "".join(parts)
        if not isinstance(content, str):
            return None, f"messages[{i}].content must be a string"
        out.append({"role": m["role"], "content": content})
    if not any(m["content"].strip() for m in out):
        return None, "empty prompt (every message is empty)"
    return out, None


def _table_unit(spec: InputSpec, key: str, start: int, table) -> Unit:
    ids = table.column(spec.id_column).to_pylist() if spec.id_column else None
    source = table.select(template_fields(spec.prompt_template)).to_pylist() if spec.prompt_template \
        else table.column(spec.messages_column or spec.prompt_column).to_pylist()
    rows = []
    for n, value in enumerate(source):
        index = start + n
        row = Row(index, str(ids[n]) if ids is not None and ids[n] is not None else str(index))
        if spec.prompt_template:
            row.messages, row.error = _fill(spec.prompt_template, value)
        elif spec.messages_column:
            row.messages, row.error = _messages(value)
        else:
            row.prompt, row.error = _prompt(value)
        rows.append(row)
    return Unit(key, rows, table)
