"""Reading batch input: find the files, detect their format, and stream them as fixed-size work units.

Formats:
- `jsonl`: one JSON object a line with `prompt` (text) or `messages` (chat); an `id` field is kept as the id.
- `openai`: OpenAI Batch API request lines `{custom_id, method, url, body}`.
- `parquet` / `arrow`: Parquet or Arrow IPC files (one file or a folder/glob of shards), read in record
  batches so the whole dataset is never in memory; every input column is kept in the output.

A unit is `chunk_rows` consecutive rows of one file, named `FFFFF-CCCCCC` (file number, chunk number). The
same input and `chunk_rows` always give the same units, which is what makes resuming exact.
"""

from __future__ import annotations

import glob
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from llmops.batch.config import InputConfig
from llmops.errors import UsageError

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet",
            ".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow", ".arrows": "arrow"}
OPENAI_URLS = ("/v1/chat/completions", "/v1/completions")
RESULT_COLUMNS = ("row", "generated_text", "finish_reason", "prompt_tokens", "completion_tokens", "error")
# Lines read ahead to detect a JSONL flavour: the first parseable object decides.
_SNIFF_LINES = 100


@dataclass(frozen=True)
class InputSpec:
    """A detected input: its files, format and (for Parquet/Arrow) the columns that matter."""

    files: tuple[Path, ...]
    format: str
    prompt_column: str | None = None
    messages_column: str | None = None
    id_column: str | None = None

    def identity(self):
        """What identifies this input in the job's identity: its format, columns and content digest (not
        its folder, so a job may resume where its input is mounted elsewhere)."""
        from llmops.batch.identity import InputIdentity
        from llmops.fingerprint import files_digest

        try:
            digest = files_digest(self.files)
        except OSError as e:
            raise UsageError(f"cannot read {e.filename}: {(e.strerror or str(e)).lower()}") from None
        return InputIdentity(format=self.format, files=[f.name for f in self.files], digest=digest,
                             prompt_column=self.prompt_column, messages_column=self.messages_column,
                             id_column=self.id_column)


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
    error: str | None = None


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
    files = _find_files(path)
    fmt = config.format
    if fmt == "auto":
        kinds = {f: _sniff(f) for f in files}
        if len(set(kinds.values())) > 1:
            listing = ", ".join(f"{f.name}: {k}" for f, k in list(kinds.items())[:6])
            raise UsageError(f"{path} mixes input formats ({listing})", "give one format per job")
        fmt = next(iter(kinds.values()))
        if fmt == "jsonl":
            fmt = _jsonl_flavour(files[0])
    if fmt in ("jsonl", "openai"):
        if config.prompt_column or config.messages_column or config.id_column:
            raise UsageError("--prompt-column, --messages-column and --id-column apply to Parquet/Arrow input",
                             f"{path} is JSONL: name the fields `prompt`/`messages`/`id` in each line")
        return InputSpec(tuple(files), fmt)
    return _columns(files, fmt, config)


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


def _sniff(path: Path) -> str:
    if path.suffix.lower() in SUFFIXES:
        return SUFFIXES[path.suffix.lower()]
    try:
        with open(path, "rb") as f:
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


def _jsonl_flavour(path: Path) -> str:
    """`openai` for OpenAI Batch request lines, `jsonl` for prompt/messages lines."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f):
            if n >= _SNIFF_LINES:
                break
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(obj, dict):
                continue
            if "custom_id" in obj or "body" in obj:
                return "openai"
            if "prompt" in obj or "messages" in obj:
                return "jsonl"
            raise UsageError(f"cannot detect the input format: the first object in {path} has keys "
                             f"{sorted(obj)[:10]}",
                             "each line needs `prompt` (text), `messages` (chat) or, for OpenAI Batch "
                             "input, `custom_id`, `method`, `url` and `body`")
    raise UsageError(f"cannot detect the input format: no JSON object in the first lines of {path}",
                     "expected one JSON object a line (JSONL)")


def _schema(path: Path, fmt: str):
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(path) if fmt == "parquet" else _open_arrow(path).schema
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for anything unreadable
        raise UsageError(f"cannot read {path} as {fmt}: {e}") from None


def _columns(files: list[Path], fmt: str, config: InputConfig) -> InputSpec:
    schema = _schema(files[0], fmt)
    names = list(schema.names)
    listing = ", ".join(names[:20])
    if config.prompt_column and config.messages_column:
        raise UsageError("Can't provide both `--prompt-column` and `--messages-column`. Choose one.")
    prompt_col, messages_col = config.prompt_column, config.messages_column
    if not prompt_col and not messages_col:
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
    return InputSpec(tuple(files), fmt, prompt_col, messages_col, id_col)


def _open_arrow(path: Path):
    """An Arrow IPC reader for the file format (random access) or the stream format."""
    import pyarrow as pa

    source = pa.memory_map(str(path))
    try:
        return pa.ipc.open_file(source)
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_stream(source)


# --- streaming ----------------------------------------------------------------------------------------


def count_rows(spec: InputSpec) -> list[int]:
    """Rows in each file, cheaply: Parquet footers, Arrow batch headers, JSONL non-blank lines."""
    import pyarrow.parquet as pq

    counts = []
    for f in spec.files:
        if spec.format == "parquet":
            counts.append(pq.ParquetFile(f).metadata.num_rows)
        elif spec.format == "arrow":
            counts.append(sum(batch.num_rows for batch in _arrow_batches(f)))
        else:
            with open(f, "rb") as fh:
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


def _jsonl_chunks(path: Path, chunk_rows: int) -> Iterator[list[tuple[int, bytes]]]:
    chunk: list[tuple[int, bytes]] = []
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            chunk.append((line_no, line))
            if len(chunk) == chunk_rows:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def _arrow_batches(path: Path, fmt: str = "arrow"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if fmt == "parquet":
        yield from pq.ParquetFile(path).iter_batches(batch_size=8192)
        return
    reader = _open_arrow(path)
    if isinstance(reader, pa.ipc.RecordBatchFileReader):
        for b in range(reader.num_record_batches):
            yield reader.get_batch(b)
    else:
        yield from reader


def _arrow_chunks(spec: InputSpec, path: Path, chunk_rows: int):
    """Record batches regrouped into tables of exactly `chunk_rows` rows (the last may be shorter)."""
    import pyarrow as pa

    pending, count = [], 0
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
    for n, (line_no, raw) in enumerate(lines):
        index = start + n
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            rows.append(Row(index, None if openai else f"line-{line_no}",
                            error=f"line {line_no}: not valid JSON ({e})"))
            kept.append(_kept_openai(None) if openai else (None, None, raw.decode(errors="replace")))
            continue
        # Valid JSON may still hold text that is not Unicode (a lone surrogate such as "\ud800"): it could be
        # neither tokenized nor stored, so that row fails alone, its strings kept in escaped form.
        bad_text = _lone_surrogate(raw, obj)
        if bad_text:
            obj = _escaped(obj)
        row = _openai_row(index, line_no, obj) if openai else _prompt_row(index, line_no, obj)
        if bad_text:
            row.error, row.body = f"line {line_no}: {bad_text}", None
        rows.append(row)
        if openai:
            kept.append(_kept_openai(obj))
        else:
            extra = {k: v for k, v in obj.items() if k not in ("prompt", "messages", "id")} \
                if isinstance(obj, dict) else {"value": obj}
            kept.append((obj.get("prompt") if isinstance(obj, dict) and isinstance(obj.get("prompt"), str) else None,
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


def _prompt_row(index: int, line_no: int, obj: Any) -> Row:
    if not isinstance(obj, dict):
        return Row(index, str(index), error=f"line {line_no}: expected a JSON object, got {type(obj).__name__}")
    row_id = str(obj["id"]) if obj.get("id") is not None else str(index)
    row = Row(index, row_id)
    if "messages" in obj:
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
        where = f"{f.name} line" if len(spec.files) > 1 else "line"
        with open(f, "rb") as fh:
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
    source = spec.files[0] if len(spec.files) == 1 else f"{spec.files[0].parent}/"
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


def _openai_row(index: int, line_no: int, obj: Any) -> Row:
    if not isinstance(obj, dict):
        return Row(index, f"line-{line_no}", error=f"line {line_no}: expected a JSON object")
    custom_id = obj.get("custom_id")
    row = Row(index, str(custom_id) if custom_id is not None else None)
    body, url = obj.get("body"), obj.get("url")
    if custom_id is None:
        row.error = f"line {line_no}: no custom_id"
    elif obj.get("method", "POST") != "POST":
        row.error = f"method must be POST, got {obj.get('method')!r}"
    elif url not in OPENAI_URLS:
        row.error = f"url must be one of {', '.join(OPENAI_URLS)}, got {url!r}"
    elif not isinstance(body, dict):
        row.error = "body must be a JSON object"
    elif url == "/v1/chat/completions":
        row.messages, row.error = _messages(body.get("messages"))
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
    source = table.column(spec.messages_column or spec.prompt_column).to_pylist()
    rows = []
    for n, value in enumerate(source):
        index = start + n
        row = Row(index, str(ids[n]) if ids is not None and ids[n] is not None else str(index))
        if spec.messages_column:
            row.messages, row.error = _messages(value)
        else:
            row.prompt, row.error = _prompt(value)
        rows.append(row)
    return Unit(key, rows, table)
