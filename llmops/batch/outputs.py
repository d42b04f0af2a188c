"""The output folder: atomic Parquet shards, a typed manifest, a lock, and the OpenAI Batch files.

    OUTPUT_DIR/
      .llmops-batch.lock              held (flock) by the run writing here; says its pid and host
      config.yaml                     the resolved config of the job
      manifest.json                   the job's identity, the committed units with their counts, the status
      results/part-FFFFF-CCCCCC.parquet     one shard per unit of input (see inputs.py)
      results/part-FFFFF-CCCCCC.N.parquet   pieces of a unit, where a stopped run committed part of it
      output.jsonl, errors.jsonl      OpenAI Batch input only: the results in OpenAI's format

Exactly once: a shard is written to a unique temporary name, fsynced, then linked into place (first writer
wins: a retried or zombie writer never replaces a committed shard) and the folder fsynced, so a shard under
its final name is complete, and it is the commit of its rows. Each shard records its unit, its stats and
the job's identity in its Parquet metadata, so the shards are the truth: the manifest is an index that a
rerun rebuilds from them when it is missing, stale or damaged.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ValidationError

from llmops.batch.identity import JobIdentity
from llmops.atomic import write_atomic
from llmops.errors import StorageError, UsageError

MANIFEST = "manifest.json"
RESULTS = "results"
LOCK = ".llmops-batch.lock"
CONFIG = "config.yaml"
META_STATS = b"llmops.stats"
META_UNIT = b"llmops.unit"
META_JOB = b"llmops.job"
META_IDENTITY = b"llmops.identity"
META_WRITER = b"llmops.writer"
_SHARD = re.compile(r"part-(\d{5}-\d{6})(?:\.(\d+))?\.parquet")


class UnitStats(BaseModel):
    rows: int = 0
    ok: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def __add__(self, other: UnitStats) -> UnitStats:
        return UnitStats(**{k: getattr(self, k) + getattr(other, k) for k in UnitStats.model_fields})


def totals(stats) -> UnitStats:
    return sum(stats, UnitStats())


class Manifest(BaseModel):
    """What the coordinator hands to its workers and to the next run; rebuilt from the shards when lost."""

    job: JobIdentity
    job_key: str
    status: Literal["running", "stopped", "incomplete", "complete"]
    updated: str = ""
    totals: UnitStats = UnitStats()
    units_done: int = 0
    units: dict[str, UnitStats] = {}
    files: list[str] = []
    """Files llmops wrote beside results/ (what --overwrite may remove)."""
    input_paths: list[str] = []
    engine_args: dict[str, Any] = {}
    engine_env: dict[str, str] = {}
    nodes: dict[str, str] = {}
    """With --ray: the Ray node id that committed each unit (also in the shard's `llmops.node` metadata)."""


@dataclass
class Committed:
    """What a folder holds for a job: whole units, and the rows already done of units a stopped run left."""

    done: dict[str, UnitStats] = field(default_factory=dict)
    partial: dict[str, set[int]] = field(default_factory=dict)
    partial_stats: dict[str, UnitStats] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.done.values()) + sum(len(r) for r in self.partial.values())


def shard_name(key: str, piece: int | None = None) -> str:
    return f"part-{key}.parquet" if piece is None else f"part-{key}.{piece}.parquet"


@contextlib.contextmanager
def storage_errors(action: str) -> Iterator[None]:
    """Turn an OSError (permission denied, disk full, a path that is a file) into a one-line StorageError."""
    try:
        yield
    except OSError as e:
        raise StorageError.from_os_error(e, action) from None


class OutputDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.results = self.path / RESULTS
        self._lock_fd: int | None = None

    # --- what is here -------------------------------------------------------------------------------

    def read_manifest(self) -> Manifest | None:
        """The manifest, or None when it is missing or damaged (the shards are the truth)."""
        try:
            return Manifest.model_validate_json((self.path / MANIFEST).read_bytes())
        except FileNotFoundError:
            return None
        except (ValidationError, ValueError):
            return None
        except OSError as e:
            raise StorageError.from_os_error(e, "read") from None

    def _raw_manifest(self) -> dict[str, Any] | None:
        """The manifest as plain JSON, even one from an older llmops; None if missing or unreadable."""
        try:
            data = json.loads((self.path / MANIFEST).read_text())
            return data if isinstance(data, dict) else None
        except (OSError, ValueError):
            return None

    def our_shards(self) -> list[Path]:
        """Shards llmops wrote here: named like ours and carrying our Parquet metadata (unit, job, stats,
        identity, and which engine wrote it)."""
        import pyarrow.parquet as pq

        found = []
        for path in sorted(self.results.glob("part-*.parquet")) if self.results.is_dir() else []:
            try:
                if META_UNIT in (pq.read_schema(path).metadata or {}):
                    found.append(path)
            except Exception:  # unreadable: not provably ours
                continue
        return found

    def _shard_identity(self) -> tuple[bool, JobIdentity | None]:
        """(whether any shard here is ours, the job identity the first of them records)."""
        import pyarrow.parquet as pq

        for path in sorted(self.results.glob("part-*.parquet")) if self.results.is_dir() else []:
            try:
                meta = pq.read_schema(path).metadata or {}
            except Exception:
                continue
            if META_UNIT in meta:
                try:
                    return True, JobIdentity.model_validate_json(meta[META_IDENTITY])
                except (KeyError, ValidationError, ValueError):
                    return True, None
        return False, None

    def _foreign_entries(self) -> list[Path]:
        """What is here besides llmops's own files (lock, leftovers of a run killed before its manifest)."""
        if not self.path.is_dir():
            return []
        ours = {LOCK, MANIFEST, RESULTS}
        return [p for p in self.path.iterdir() if p.name not in ours and not p.name.startswith(MANIFEST + ".")]

    def check(self, job: JobIdentity, overwrite: bool) -> None:
        """Refuse a folder that is not llmops output, or holds another job's results (unless `overwrite`).
        Reads only; every refusal names the folder and says what to do."""
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"cannot use {self.path} as the output folder: it is a file; give a folder with -o")
        if not self.path.exists():
            return
        manifest = self.read_manifest()
        if manifest is not None:
            old = manifest.job
        else:  # lost or damaged: the shards say whose they are (and an older llmops's manifest says it is ours)
            raw = self._raw_manifest()
            has_shards, old = self._shard_identity()
            if not (has_shards or (raw is not None and "job" in raw)):
                stray = self._foreign_entries()
                if self.results.is_dir():
                    stray += [p for p in self.results.iterdir() if not p.name.endswith(".tmp")]
                if stray:
                    raise UsageError(f"{self.path} is not empty and holds no llmops batch output "
                                     f"(found {stray[0].name}); choose a new or empty output folder")
                return
        if overwrite:
            return
        if old is None:
            raise UsageError(f"{self.path} holds batch results that record no job identity (an older llmops, "
                             "or a damaged manifest); use a new --output or --overwrite")
        changes = job.changes_from(old)
        if changes:
            raise UsageError(f"{self.path} holds another job's results: {'; '.join(changes)}; "
                             "use a new --output or --overwrite")

    # --- lock ---------------------------------------------------------------------------------------

    def lock(self) -> None:
        """Take the folder for this process (flock: released when the process ends, however it ends)."""
        import fcntl

        with storage_errors("write"):
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "a process"
            os.close(fd)
            raise UsageError(f"{self.path} is in use by another llmops batch ({holder}); wait for it to "
                             "finish, or stop it, or use another --output") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())
        self._lock_fd = fd

    def lock_fds(self) -> tuple[int, ...]:
        """The lock's file descriptor, for child processes that must hold the folder as long as they run."""
        return () if self._lock_fd is None else (self._lock_fd,)

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- resume -------------------------------------------------------------------------------------

    def prepare(self, job: JobIdentity, unit_sizes: dict[str, int], overwrite: bool, manifest: Manifest
                ) -> Committed:
        """Make the locked folder ready to run: check it, clear it if `overwrite`, return what is committed."""
        self.check(job, overwrite)
        with storage_errors("write"):
            if overwrite:
                self.clear()
            self.results.mkdir(parents=True, exist_ok=True)
            for stale in [*self.results.glob("*.tmp"), *self.path.glob(MANIFEST + ".*")]:
                stale.unlink()  # a write that a killed process left half done (we hold the lock)
            committed = self.committed(unit_sizes, job.key())
            self.write_manifest(manifest, committed, "running")
        return committed

    def clear(self) -> None:
        """--overwrite: remove only what llmops wrote here (what the manifest lists and our shards)."""
        raw = self._raw_manifest() or {}
        names = set(raw.get("files") or ()) | {CONFIG, "output.jsonl", "errors.jsonl"} if raw.get("job") else set()
        for name in names:
            if "/" not in name and name not in (LOCK,):
                (self.path / name).unlink(missing_ok=True)
        listed = set((raw.get("units") or {}) if raw.get("job") else ())
        for path in self.results.glob("part-*.parquet") if self.results.is_dir() else []:
            match = _SHARD.fullmatch(path.name)
            if match and match.group(1) in listed:
                path.unlink()
        for path in self.our_shards():
            path.unlink()
        (self.path / MANIFEST).unlink(missing_ok=True)

    def committed(self, unit_sizes: dict[str, int], job_key: str | None) -> Committed:
        """Scan the shards: whole units and partly done ones. A shard of another job is refused (mixing);
        an unreadable one is set aside as `.damaged` and its rows are generated again."""
        import pyarrow.parquet as pq

        found = Committed()
        pieces: dict[str, list[tuple[Path, UnitStats]]] = {}
        if not self.results.is_dir():
            return found
        for path in sorted(self.results.glob("part-*.parquet")):
            match = _SHARD.fullmatch(path.name)
            if not match or match.group(1) not in unit_sizes:
                continue
            key = match.group(1)
            try:
                meta = pq.read_schema(path).metadata or {}
                stats = UnitStats.model_validate_json(meta[META_STATS])
                shard_job = meta.get(META_JOB, b"").decode()
            except Exception:  # cannot happen with atomic commits, but a damaged disk must not stop a job
                if job_key is not None:  # not in a dry run, which writes nothing
                    with contextlib.suppress(OSError):
                        path.rename(path.with_name(path.name + ".damaged"))
                continue
            if job_key is not None and shard_job != job_key:
                raise UsageError(f"{path} belongs to another job than the rest of {self.path}; "
                                 "use a new --output or --overwrite")
            if match.group(2) is None:
                found.done[key] = stats
            else:
                pieces.setdefault(key, []).append((path, stats))
        for key, parts in pieces.items():
            if key in found.done:
                continue
            rows: set[int] = set()
            for path, _ in parts:
                rows.update(pq.read_table(path, columns=["row"]).column("row").to_pylist())
            stats = totals(s for _, s in parts)
            if len(rows) >= unit_sizes[key]:
                found.done[key] = stats
            else:
                found.partial[key], found.partial_stats[key] = rows, stats
        return found

    def write_manifest(self, manifest: Manifest, committed: Committed, status: str) -> None:
        manifest.status = status  # type: ignore[assignment]
        manifest.updated = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        manifest.units = {key: committed.done[key] for key in sorted(committed.done)}
        manifest.units_done = len(committed.done)
        manifest.totals = totals([*committed.done.values(), *committed.partial_stats.values()])
        with storage_errors("write"):
            write_atomic(self.path / MANIFEST, lambda f: f.write(manifest.model_dump_json(indent=1).encode()))

    # --- commit -------------------------------------------------------------------------------------

    def commit(self, key: str, table, stats: UnitStats, job: JobIdentity, piece: bool = False,
               writer: str = "engine 0") -> bool:
        """Write one unit's shard (or a piece of it) atomically; after this returns its rows are done for
        good. False when another writer committed the unit first (ours is dropped)."""
        import pyarrow.parquet as pq

        table = table.replace_schema_metadata({
            **(table.schema.metadata or {}), META_STATS: stats.model_dump_json(), META_UNIT: key,
            META_JOB: job.key(), META_IDENTITY: job.model_dump_json(),
            META_WRITER: f"{writer} (pid {os.getpid()} on host {socket.gethostname()})"})
        with storage_errors("write"):
            if not piece:
                return write_atomic(self.results / shard_name(key), lambda f: pq.write_table(table, f),
                                    replace=False)
            n = 0
            while not write_atomic(self.results / shard_name(key, n), lambda f: pq.write_table(table, f),
                                   replace=False):
                n += 1
            return True

    # --- reading results ----------------------------------------------------------------------------

    def shards(self) -> list[Path]:
        return sorted(self.results.glob("part-*.parquet"))

    def failed_rows(self, limit: int) -> list[dict[str, Any]]:
        """The first `limit` failed rows: row number, id and error."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        found: list[dict[str, Any]] = []
        for shard in self.shards():
            if len(found) >= limit:
                break
            t = pq.read_table(shard, columns=["row", "id", "error"])
            t = t.filter(pc.is_valid(t.column("error")))
            found += t.slice(0, limit - len(found)).to_pylist()
        return sorted(found, key=lambda r: r["row"])

    def examples(self, limit: int) -> list[dict[str, Any]]:
        """The first `limit` rows as {row, id, prompt, completion, error}, for `--show`."""
        import pyarrow.parquet as pq

        manifest = self.read_manifest()
        described = manifest.job.input.model_dump() if manifest else {}
        rows: list[dict[str, Any]] = []
        for shard in self.shards():
            if len(rows) >= limit:
                break
            for r in pq.read_table(shard).slice(0, limit - len(rows)).to_pylist():
                rows.append({"row": r["row"], "id": r["id"], "prompt": _prompt_text(r, described),
                             "completion": r["generated_text"], "error": r["error"]})
        return rows

    def write_openai_files(self, model: str) -> list[str]:
        """output.jsonl and errors.jsonl in the OpenAI Batch format, from the shards, in input order."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        created = int(time.time())
        columns = ["row", "id", "url", "generated_text", "finish_reason", "prompt_tokens", "completion_tokens",
                   "error"]

        def lines(want_errors: bool):
            shards = self.shards()
            if not shards:
                return
            table = pa.concat_tables(pq.read_table(s, columns=columns) for s in shards).sort_by("row")
            for r in table.to_pylist():
                if (r["error"] is not None) == want_errors:
                    yield (json.dumps(openai_line(r, model, created)) + "\n").encode()

        names = ["output.jsonl", "errors.jsonl"]
        with storage_errors("write"):
            for name, want_errors in zip(names, (False, True)):
                write_atomic(self.path / name, lambda f: f.writelines(lines(want_errors)))
        return names


def openai_line(r: dict[str, Any], model: str, created: int) -> dict[str, Any]:
    """One result line as OpenAI's Batch API writes it."""
    row = r["row"]
    if r["error"] is not None:
        body = {"error": {"message": r["error"], "type": "invalid_request_error", "param": None, "code": None}}
        status = 400
    else:
        chat = r["url"] == "/v1/chat/completions"
        choice = {"index": 0, "finish_reason": r["finish_reason"], "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": r["generated_text"]}} if chat
                      else {"text": r["generated_text"]})
        body = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{row}", "object": "chat.completion" if chat
                else "text_completion", "created": created, "model": model, "choices": [choice],
                "usage": {"prompt_tokens": r["prompt_tokens"], "completion_tokens": r["completion_tokens"],
                          "total_tokens": r["prompt_tokens"] + r["completion_tokens"]}}
        status = 200
    return {"id": f"batch_req_{row}", "custom_id": r["id"],
            "response": {"status_code": status, "request_id": f"req_{row}", "body": body}, "error": None}


def _prompt_text(r: dict[str, Any], described: dict[str, Any]) -> str:
    """The prompt of a result row as one line of text: the text, or a chat's last message."""
    value = r.get(described.get("prompt_column") or described.get("messages_column") or "")
    if value is None and described.get("format") == "openai" and r.get("body"):
        body = json.loads(r["body"]) or {}
        value = body.get("messages") or body.get("prompt")
    elif value is None:
        value = r.get("prompt") or (json.loads(r["messages"]) if r.get("messages") else None)
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        value = value[-1].get("content")
    return str(value) if value is not None else ""

