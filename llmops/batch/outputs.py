"""The output folder: atomic Parquet shards, a typed manifest, a lock, and the OpenAI Batch files. It is a
local folder or a prefix on object storage (`s3://bucket/jobs/run1`, `gs://…`), read and written the same
way through pyarrow's filesystems.

    OUTPUT_DIR/
      .llmops-batch.lock              held (flock, or a renewed lease on object storage) by the run writing
                                      here; says its pid and host
      config.yaml                     the resolved config of the job
      manifest.json                   the job's identity, the committed units with their counts, the status
      results/part-FFFFF-CCCCCC.parquet     one shard per unit of input (see inputs.py)
      results/part-FFFFF-CCCCCC.N.parquet   pieces of a unit, where a stopped run committed part of it
      output.jsonl, errors.jsonl      OpenAI Batch input only: the results in OpenAI's format

Exactly once: on a local disk a shard is written to a unique temporary name, fsynced, then linked into place
(first writer wins: a retried or zombie writer never replaces a committed shard) and the folder fsynced; on
object storage it is one PUT of the finished shard. Either way a shard under its final name is complete, and
it is the commit of its rows. Each shard records its unit, its stats and
the job's identity in its Parquet metadata, so the shards are the truth: the manifest is an index that a
rerun rebuilds from them when it is missing, stale or damaged.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

from pydantic import BaseModel, ValidationError

from llmops.batch.identity import JobIdentity
from llmops.atomic import write_atomic
from llmops.errors import StorageError, UsageError

MANIFEST = "manifest.json"
RESULTS = "results"
LOCK = ".llmops-batch.lock"
CONFIG = "config.yaml"
# The lock of a folder on object storage is a lease (see _Lease): renewed every LEASE_RENEW_S, taken over
# when not renewed for LEASE_STALE_S (its holder died), read back LEASE_SETTLE_S after writing it.
LEASE_RENEW_S = 5.0
LEASE_STALE_S = 20.0
LEASE_POLL_S = 1.0
LEASE_SETTLE_S = 1.0
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
    rows_total: int | None = None
    """Rows of the whole job (None in manifests rebuilt from shards or written before it was recorded)."""
    runs: list[dict[str, Any]] = []
    """The runs of this job, oldest first: started, host, pid, rows_before, estimated_s; when ended: ended,
    rows_after, engine_start_s, generation_s, rows_per_s (`llmops batch status` reads them)."""


@dataclass
class Committed:
    """What a folder holds for a job: whole units, and the rows already done of units a stopped run left."""

    done: dict[str, UnitStats] = field(default_factory=dict)
    partial: dict[str, set[int]] = field(default_factory=dict)
    partial_stats: dict[str, UnitStats] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.done.values()) + sum(len(r) for r in self.partial.values())


# The shards are the commit; the manifest is an index, refreshed every few seconds so that rewriting it
# stays cheap however many shards a job has.
MANIFEST_EVERY_S = 5.0


class CommitLog:
    """The one path by which every placement (this process, worker processes, Ray replicas) reports a
    committed shard or piece: it updates what is committed, advances the progress and refreshes the
    manifest every MANIFEST_EVERY_S."""

    def __init__(self, out: OutputDir, manifest: Manifest, committed: Committed, unit_sizes: dict[str, int],
                 progress) -> None:
        self.out, self.manifest, self.committed = out, manifest, committed
        self.unit_sizes, self.progress = unit_sizes, progress
        self.written = time.monotonic()

    def record(self, key: str, stats: UnitStats, *, counted: bool = False, node: str | None = None) -> None:
        """`stats` of a shard or piece just committed for unit `key`. `counted`: its rows were already shown
        as progress (an engine in this process reports rows as they finish)."""
        if self.out._lease is not None and self.out._lease.lost_to is not None:
            self.out._lease.check()  # another run took the folder over: stop the job (raises)
        if not counted:
            self.progress.advance(stats.rows, stats.completion_tokens)
        committed = self.committed
        done = committed.partial_stats.pop(key, UnitStats()) + stats  # the rest of a unit a stopped run began
        if done.rows < self.unit_sizes[key]:  # a piece committed while stopping (its rows are in the shards)
            committed.partial_stats[key] = done
        else:
            committed.partial.pop(key, None)
            committed.done[key] = done
        if node is not None:
            self.manifest.nodes[key] = node
        if time.monotonic() - self.written > MANIFEST_EVERY_S:
            self.out.write_manifest(self.manifest, committed, "running")
            self.written = time.monotonic()


def shard_name(key: str, piece: int | None = None) -> str:
    return f"part-{key}.parquet" if piece is None else f"part-{key}.{piece}.parquet"


@contextlib.contextmanager
def storage_errors(action: str, where: str | None = None) -> Iterator[None]:
    """Turn an OSError (permission denied, disk full, a path that is a file, an object store that refuses)
    into a one-line StorageError; `where` names the place when the error does not (pyarrow's S3 errors)."""
    try:
        yield
    except OSError as e:
        from llmops.storage import is_uri, storage_error

        if e.filename is None and where is not None and is_uri(where):  # pyarrow's object store errors
            raise storage_error(where, e, action, StorageError) from None
        if e.filename is None and where is not None:
            e = OSError(e.errno, e.strerror or str(e), where)
        raise StorageError.from_os_error(e, action) from None


# How long a new run waits for the folder when the run that held it has exited but processes it started (its
# engines, being killed with it) still hold the lock.
LOCK_RELEASE_WAIT_S = 60.0


def _holder_exited(holder: str) -> bool:
    """Whether the lock file's `pid N on host H` names a process of this host that no longer runs."""
    match = re.fullmatch(r"pid (\d+) on host (\S+)", holder)
    if match is None or match[2] != socket.gethostname():
        return False
    try:
        os.kill(int(match[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _lock_within(fd: int, seconds: float) -> bool:
    import fcntl

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            continue
    return False


class OutputDir:
    """An output folder on the local disk or on object storage (`s3://bucket/prefix`, `gs://…`).

    Everything is read through pyarrow's filesystem, so both behave the same. The writes differ where the
    stores do: a local commit is a temp file linked into place, an object store's is one PUT of the whole
    shard. Both are first-writer-wins and atomic, which is all exactly-once needs."""

    def __init__(self, location: str | Path):
        from llmops import storage

        self.remote = storage.is_uri(location)
        self.fs, self.root = storage.filesystem(location)
        self.location = str(location).rstrip("/") if self.remote else self.root
        """Where the folder is, as the user and other processes name it: a URI or an absolute path."""
        self.path: Path | None = None if self.remote else Path(self.root)
        """The local folder (None on object storage)."""
        self.results: Path | None = None if self.remote else self.path / RESULTS
        self._results = f"{self.root}/{RESULTS}"
        self._lock_fd: int | None = None
        self._lease: _Lease | None = None

    def __str__(self) -> str:
        return self.location

    def at(self, name: str) -> str:
        """The location of a file in the folder (for messages and other processes)."""
        return f"{self.location}/{name}"

    # --- reading, on any store ------------------------------------------------------------------------

    def _kind(self, path: str):
        return self.fs.get_file_info(path).type

    def _read(self, name: str) -> bytes | None:
        """A file of the folder's top level; None when it is not there."""
        import pyarrow.fs as pafs

        path = f"{self.root}/{name}"
        if self.remote and self._kind(path) != pafs.FileType.File:
            return None  # an object store answers a missing key with a generic error: ask first
        try:
            with self.fs.open_input_stream(path) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def read_text(self, name: str) -> str | None:
        with storage_errors("read", self.at(name)):
            data = self._read(name)
        return None if data is None else data.decode(errors="replace")

    def _write(self, name: str, data: bytes | Iterable[bytes]) -> None:
        """Replace a top-level file whole: a temp file renamed (local), one upload of a finished file (object
        store: the content is spooled first, so a failure while producing it uploads nothing)."""
        chunks = [data] if isinstance(data, bytes) else data
        with storage_errors("write", self.at(name)):
            if not self.remote:
                write_atomic(self.path / name, lambda f: f.writelines(chunks))
                return
            with tempfile.SpooledTemporaryFile(max_size=64 << 20) as spool:
                spool.writelines(chunks)
                spool.seek(0)
                with self.fs.open_output_stream(f"{self.root}/{name}") as f:
                    while block := spool.read(8 << 20):
                        f.write(block)

    def _delete(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(path)

    def _schema_meta(self, path: str) -> dict[bytes, bytes]:
        import pyarrow.parquet as pq

        return pq.read_schema(path, filesystem=self.fs).metadata or {}

    def _read_table(self, path: str, columns: list[str] | None = None):
        import pyarrow.parquet as pq

        return pq.read_table(path, columns=columns, filesystem=self.fs)

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        with storage_errors("read", self.location):
            if not self.remote:
                return self._kind(self.root) != pafs.FileType.NotFound
            # An object store has no folders: the prefix "exists" when something is under it.
            return bool(self._entries())

    def _entries(self) -> list[str]:
        """Names at the folder's top level."""
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return sorted(i.base_name for i in infos)

    def shards(self) -> list[str]:
        """Every shard file in results/, ours or not (locations inside the filesystem)."""
        from llmops.storage import list_files

        with storage_errors("read", self.at(RESULTS)):
            return [p for p in list_files(self.fs, self._results, ".parquet")
                    if p.rsplit("/", 1)[-1].startswith("part-")]

    def shard_path(self, key: str, piece: int | None = None) -> str:
        return f"{self._results}/{shard_name(key, piece)}"

    # --- what is here -------------------------------------------------------------------------------

    def read_manifest(self) -> Manifest | None:
        """The manifest, or None when it is missing or damaged (the shards are the truth)."""
        with storage_errors("read", self.at(MANIFEST)):
            data = self._read(MANIFEST)
        if data is None:
            return None
        try:
            return Manifest.model_validate_json(data)
        except (ValidationError, ValueError):
            return None

    def _raw_manifest(self) -> dict[str, Any] | None:
        """The manifest as plain JSON, even one from an older llmops; None if missing or unreadable."""
        try:
            data = json.loads(self._read(MANIFEST) or b"null")
            return data if isinstance(data, dict) else None
        except (OSError, ValueError):
            return None

    def our_shards(self) -> list[str]:
        """Shards llmops wrote here: named like ours and carrying our Parquet metadata (unit, job, stats,
        identity, and which engine wrote it)."""
        found = []
        for path in self.shards():
            try:
                if META_UNIT in self._schema_meta(path):
                    found.append(path)
            except Exception:  # unreadable: not provably ours
                continue
        return found

    def _shard_identity(self) -> tuple[bool, JobIdentity | None]:
        """(whether any shard here is ours, the job identity the first of them records)."""
        for path in self.shards():
            try:
                meta = self._schema_meta(path)
            except Exception:
                continue
            if META_UNIT in meta:
                try:
                    return True, JobIdentity.model_validate_json(meta[META_IDENTITY])
                except (KeyError, ValidationError, ValueError):
                    return True, None
        return False, None

    def _foreign_entries(self) -> list[str]:
        """What is here besides llmops's own files (lock, leftovers of a run killed before its manifest)."""
        ours = {LOCK, MANIFEST, RESULTS}
        return [name for name in self._entries() if name not in ours and not name.startswith(MANIFEST + ".")]

    def check(self, job: JobIdentity, overwrite: bool) -> None:
        """Refuse a folder that is not llmops output, or holds another job's results (unless `overwrite`).
        Reads only; every refusal names the folder and says what to do."""
        import pyarrow.fs as pafs

        with storage_errors("read", self.location):
            kind = self._kind(self.root)
        if kind == pafs.FileType.File:
            raise UsageError(f"cannot use {self} as the output folder: it is a file; give a folder with -o")
        if not self.exists():
            if self.remote:
                from llmops.storage import bucket_missing_of, missing_error

                if bucket_missing_of(self.location):  # said now, not as raw AWS text at the first write
                    raise missing_error(self.location, "write", bucket_missing=True)
            return
        with storage_errors("read", self.location):
            manifest = self.read_manifest()
            if manifest is not None:
                old = manifest.job
            else:  # lost or damaged: the shards say whose they are (and an older llmops's manifest says so)
                raw = self._raw_manifest()
                has_shards, old = self._shard_identity()
                if not (has_shards or (raw is not None and "job" in raw)):
                    stray = self._foreign_entries()
                    if RESULTS in self._entries():
                        from llmops.storage import list_files

                        stray += [p.rsplit("/", 1)[-1] for p in list_files(self.fs, self._results)
                                  if not p.endswith(".tmp")]
                    if stray:
                        raise UsageError(f"{self} is not empty and holds no llmops batch output "
                                         f"(found {stray[0]}); choose a new or empty output folder")
                    return
        if overwrite:
            return
        if old is None:
            raise UsageError(f"{self} holds batch results that record no job identity (an older llmops, "
                             "or a damaged manifest); use a new --output or --overwrite")
        changes = job.changes_from(old)
        if changes:
            raise UsageError(f"{self} holds another job's results: {'; '.join(changes)}; "
                             "use a new --output or --overwrite")

    # --- lock ---------------------------------------------------------------------------------------

    def lock(self) -> None:
        """Take the folder for this process: flock on a local disk (released when the process ends, however
        it ends), a lease object renewed while the job runs on an object store."""
        if self.remote:
            self._lease = _Lease(self)
            self._lease.take()
            return
        import fcntl

        with storage_errors("write"):
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "a process"
            # A run killed with its process group: its engine and worker processes hold the lock until the
            # kernel has freed their memory, some seconds after the run itself is gone. Wait for them.
            if not (_holder_exited(holder) and _lock_within(fd, LOCK_RELEASE_WAIT_S)):
                os.close(fd)
                gone = " (it has exited; processes it started still run)" if _holder_exited(holder) else ""
                raise UsageError(f"{self} is in use by another llmops batch ({holder}){gone}; wait for it to "
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
        if self._lease is not None:
            self._lease.release()
            self._lease = None

    # --- resume -------------------------------------------------------------------------------------

    def prepare(self, job: JobIdentity, unit_sizes: dict[str, int], overwrite: bool, manifest: Manifest
                ) -> Committed:
        """Make the locked folder ready to run: check it, clear it if `overwrite`, return what is committed."""
        self.check(job, overwrite)
        with storage_errors("write", self.location):
            if overwrite:
                self.clear()
            if not self.remote:  # an object store has no folders and no temp files
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
                self._delete(f"{self.root}/{name}")
        listed = set((raw.get("units") or {}) if raw.get("job") else ())
        for path in self.shards():
            match = _SHARD.fullmatch(path.rsplit("/", 1)[-1])
            if match and match.group(1) in listed:
                self._delete(path)
        for path in self.our_shards():
            self._delete(path)
        self._delete(f"{self.root}/{MANIFEST}")

    def committed(self, unit_sizes: dict[str, int], job_key: str | None) -> Committed:
        """Scan the shards: whole units and partly done ones. A shard of another job is refused (mixing);
        an unreadable one is set aside as `.damaged` and its rows are generated again."""
        found = Committed()
        pieces: dict[str, list[tuple[str, UnitStats]]] = {}
        for path in self.shards():
            match = _SHARD.fullmatch(path.rsplit("/", 1)[-1])
            if not match or match.group(1) not in unit_sizes:
                continue
            key = match.group(1)
            try:
                meta = self._schema_meta(path)
                stats = UnitStats.model_validate_json(meta[META_STATS])
                shard_job = meta.get(META_JOB, b"").decode()
            except Exception:  # cannot happen with atomic commits, but a damaged disk must not stop a job
                if job_key is not None:  # not in a dry run, which writes nothing
                    with contextlib.suppress(OSError):
                        self.fs.move(path, path + ".damaged")
                continue
            if job_key is not None and shard_job != job_key:
                raise UsageError(f"{self._shown(path)} belongs to another job than the rest of {self}; "
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
                rows.update(self._read_table(path, ["row"]).column("row").to_pylist())
            stats = totals(s for _, s in parts)
            if len(rows) >= unit_sizes[key]:
                found.done[key] = stats
            else:
                found.partial[key], found.partial_stats[key] = rows, stats
        return found

    def _shown(self, path: str) -> str:
        """A location inside the filesystem as the user names it."""
        return self.location + path[len(self.root):] if path.startswith(self.root) else path

    def write_manifest(self, manifest: Manifest, committed: Committed, status: str) -> None:
        manifest.status = status  # type: ignore[assignment]
        manifest.updated = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        manifest.units = {key: committed.done[key] for key in sorted(committed.done)}
        manifest.units_done = len(committed.done)
        manifest.totals = totals([*committed.done.values(), *committed.partial_stats.values()])
        self._write(MANIFEST, manifest.model_dump_json(indent=1).encode())

    def write_config(self, config: BaseModel) -> None:
        """config.yaml: the resolved config, so every result records what produced it."""
        import yaml

        self._write(CONFIG, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False).encode())

    # --- commit -------------------------------------------------------------------------------------

    def commit(self, key: str, table, stats: UnitStats, job: JobIdentity, piece: bool = False,
               writer: str = "engine 0") -> bool:
        """Write one unit's shard (or a piece of it) atomically; after this returns its rows are done for
        good. False when another writer committed the unit first (ours is dropped)."""
        from llmops.storage import parquet_bytes, put_once

        if self._lease is not None:
            self._lease.check()
        table = table.replace_schema_metadata({
            **(table.schema.metadata or {}), META_STATS: stats.model_dump_json(), META_UNIT: key,
            META_JOB: job.key(), META_IDENTITY: job.model_dump_json(),
            META_WRITER: f"{writer} (pid {os.getpid()} on host {socket.gethostname()})"})
        data = parquet_bytes(table)  # whole before the first byte is written: one PUT on an object store
        with storage_errors("write", self.at(RESULTS)):
            if not piece:
                return put_once(self.fs, self.shard_path(key), data)
            n = 0
            while not put_once(self.fs, self.shard_path(key, n), data):
                n += 1
            return True

    # --- reading results ----------------------------------------------------------------------------

    def failed_rows(self, limit: int) -> list[dict[str, Any]]:
        """The first `limit` failed rows: row number, id and error."""
        import pyarrow.compute as pc

        found: list[dict[str, Any]] = []
        for shard in self.shards():
            if len(found) >= limit:
                break
            t = self._read_table(shard, ["row", "id", "error"])
            t = t.filter(pc.is_valid(t.column("error")))
            found += t.slice(0, limit - len(found)).to_pylist()
        return sorted(found, key=lambda r: r["row"])

    def examples(self, limit: int) -> list[dict[str, Any]]:
        """The first `limit` rows as {row, id, prompt, completion, error}, for `--show`."""
        manifest = self.read_manifest()
        described = manifest.job.input.model_dump() if manifest else {}
        rows: list[dict[str, Any]] = []
        for shard in self.shards():
            if len(rows) >= limit:
                break
            for r in self._read_table(shard).slice(0, limit - len(rows)).to_pylist():
                rows.append({"row": r["row"], "id": r["id"], "prompt": _prompt_text(r, described),
                             "completion": _result_text(r), "error": r["error"]})
        return rows

    def write_openai_files(self, model: str, served: Iterable[str] = (), task=None) -> list[str]:
        """output.jsonl and errors.jsonl in the OpenAI Batch format, from the shards, in input order; returns
        their locations. Each line names the model that answered it: the one its request's `body.model` asked
        for where the job served that name (the base or one of its adapters), else `model`. The response
        body of a row that did not fail is the task's (`RowTask.openai_body`)."""
        import pyarrow as pa

        if task is None:
            from llmops.batch.config import SamplingConfig
            from llmops.batch.tasks import Generate

            task = Generate(SamplingConfig())
        created = int(time.time())
        served = set(served)
        columns = ["row", "id", "url", "body", *(name for name, _ in task.columns(None))]
        shards = self.shards()
        table = (pa.concat_tables(self._read_table(s, columns) for s in shards).sort_by("row") if shards else None)

        def lines(want_errors: bool):
            for batch in table.to_batches(max_chunksize=1000) if table is not None else ():
                for r in batch.to_pylist():
                    if (r["error"] is not None) == want_errors:
                        line = openai_line(r, task, _answered_by(r, model, served), created)
                        yield (json.dumps(line) + "\n").encode()

        names = ["output.jsonl", "errors.jsonl"]
        for name, want_errors in zip(names, (False, True)):
            self._write(name, lines(want_errors))
        return [self.at(name) for name in names]


class _Lease:
    """The lock of an output folder on object storage, which has no flock: an object naming its holder,
    renewed by a thread every LEASE_RENEW_S while the job runs.

    A second run refuses the folder when it sees the lease renewed. A lease that is not renewed is its
    holder's death: the holder's own host knows at once (its pid is gone), another host after LEASE_STALE_S;
    then the folder is taken over, so a rerun after a kill -9 or a lost node goes on by itself. Two runs
    starting in the same moment can both write the object: each reads it back after a pause and only the one
    whose token stands goes on. Shards are first-writer-wins either way, so a lost race cannot mix rows."""

    def __init__(self, out: OutputDir):
        import threading
        import uuid

        self.out = out
        self.token = uuid.uuid4().hex
        self.host = socket.gethostname()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="llmops-lease", daemon=True)
        self.lost_to: str | None = None
        """Who took the folder over while this run held it (set by the renewal thread or a commit's check)."""

    def _body(self) -> bytes:
        return json.dumps({"holder": f"pid {os.getpid()} on host {self.host}", "pid": os.getpid(),
                           "host": self.host, "token": self.token, "renewed": time.time()}).encode()

    def _current(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.out._read(LOCK) or b"null")
            return data if isinstance(data, dict) else None
        except ValueError:
            return None

    def _dead(self, held: dict[str, Any]) -> bool:
        """Whether the holder is known to be gone: its pid has ended on this host."""
        if held.get("host") != self.host or not isinstance(held.get("pid"), int):
            return False
        try:
            os.kill(held["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def take(self) -> None:
        with storage_errors("write", self.out.at(LOCK)):
            held = self._current()
            while held and not self._dead(held) and time.time() - float(held.get("renewed", 0)) < LEASE_STALE_S:
                time.sleep(LEASE_POLL_S)  # a live holder renews it within LEASE_RENEW_S: watch for that
                now = self._current()
                if now and now.get("renewed") != held.get("renewed"):
                    self._refuse(now)
                held = now
            self.out._write(LOCK, self._body())
            time.sleep(LEASE_SETTLE_S)  # let a racing writer's PUT land before reading back
            held = self._current()
            if held and held.get("token") != self.token:
                self._refuse(held)
        self._thread.start()

    def _refuse(self, held: dict[str, Any]) -> None:
        raise UsageError(f"{self.out} is in use by another llmops batch ({held.get('holder', 'a process')}); "
                         "wait for it to finish, or stop it, or use another --output")

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_RENEW_S):
            with contextlib.suppress(Exception):  # a missed renewal is retried; the next ones still hold it
                # Fenced: a run that paused past the takeover (a GC pause, a suspended VM) finds the lease
                # another run's, and stops instead of overwriting it and writing beside it.
                held = self._current()
                if held is None:  # unreadable this time (or gone): never write over what was not read
                    continue
                if held.get("token") != self.token:
                    self.lost_to = held.get("holder", "another run")
                    return
                self.out._write(LOCK, self._body())

    def check(self) -> None:
        """Before a commit: raise if another run has taken the folder over (read from the store, not only
        what the renewal thread saw). Without conditional writes in pyarrow's S3 client a takeover between
        this read and the PUT is still possible; the shard is then first-writer-wins as ever."""
        if self.lost_to is None:
            held = self._current()
            if held is not None and held.get("token") != self.token:
                self.lost_to = held.get("holder", "another run")
        if self.lost_to is not None:
            raise StorageError(f"{self.out} was taken over by another llmops batch ({self.lost_to}) while this "
                               "run was not renewing its lease (paused past the takeover time); this run stops "
                               "and writes nothing more", "let the other run finish the job")

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        with contextlib.suppress(Exception):
            if (self._current() or {}).get("token") == self.token:
                self.out._delete(f"{self.out.root}/{LOCK}")


def _answered_by(r: dict[str, Any], model: str, served: set[str]) -> str:
    try:
        asked = (json.loads(r.get("body") or "null") or {}).get("model")
    except (ValueError, AttributeError):
        return model
    return asked if asked in served else model


def openai_line(r: dict[str, Any], task, model: str, created: int) -> dict[str, Any]:
    """One result line as OpenAI's Batch API (and vLLM's `run-batch`) writes it."""
    row = r["row"]
    if r["error"] is not None:
        body = {"error": {"message": r["error"], "type": "invalid_request_error", "param": None, "code": None}}
        status = 400
    else:
        body, status = task.openai_body(r, model, created), 200
    return {"id": f"batch_req_{row}", "custom_id": r["id"],
            "response": {"status_code": status, "request_id": f"req_{row}", "body": body}, "error": None}


def _result_text(r: dict[str, Any]) -> str | None:
    """A result row's answer in one line: the generated text, or an embedding's size and first values."""
    if "embedding" in r and "generated_text" not in r:
        vector = r["embedding"]
        if vector is None:
            return None
        if vector and isinstance(vector[0], list):  # an OpenAI request with a list of inputs
            return f"{len(vector)} embeddings of {len(vector[0])} dimensions"
        head = ", ".join(f"{v:.4f}" for v in vector[:4])
        return f"embedding of {len(vector)} dimensions [{head}, ...]" + (" (input truncated)" if r.get("truncated") else "")
    if "label" in r and "generated_text" not in r:  # a --choices job
        return None if r["label"] is None else f"{r['label']} (confidence {r['confidence']:.2f})"
    return r.get("generated_text")


def _prompt_text(r: dict[str, Any], described: dict[str, Any]) -> str:
    """The prompt of a result row as one line of text: the text, or a chat's last message."""
    if described.get("prompt_template"):  # --prompt-template: the prompt as it was filled
        try:
            return described["prompt_template"].format(**r)
        except (KeyError, IndexError, ValueError):
            return ""
    value = r.get(described.get("prompt_column") or described.get("messages_column") or "")
    if value is None and described.get("format") == "openai" and r.get("body"):
        body = json.loads(r["body"]) or {}
        value = body.get("messages") or body.get("prompt")
    elif value is None:
        value = r.get("prompt") or (json.loads(r["messages"]) if r.get("messages") else None)
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        value = value[-1].get("content")
    return str(value) if value is not None else ""

