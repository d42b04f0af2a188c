"""The output folder: atomic Parquet shards, a manifest, resume bookkeeping and the OpenAI Batch files.

    OUTPUT_DIR/
      config.yaml                     the resolved config of the job
      manifest.json                   the job's identity, the committed units with their counts, the status
      results/part-FFFFF-CCCCCC.parquet   one shard per unit of input (see inputs.py)
      output.jsonl, errors.jsonl      OpenAI Batch input only: the results in OpenAI's format

Exactly once: a shard is written to a temporary name, fsynced, renamed into place and the folder fsynced,
so a shard under its final name is always complete, and it is the commit of its unit. The manifest is
rewritten (atomically too) after commits as an index; on start it is rebuilt from the shards present,
so a process killed between a rename and the manifest update loses nothing and repeats nothing.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterable

from llmops.errors import UsageError

MANIFEST = "manifest.json"
RESULTS = "results"
STATS_KEY = b"llmops.stats"
_OUR_FILES = (MANIFEST, "config.yaml", "output.jsonl", "errors.jsonl")
STAT_FIELDS = ("rows", "ok", "failed", "prompt_tokens", "completion_tokens")


def shard_name(key: str) -> str:
    return f"part-{key}.parquet"


def write_atomic(path: Path, write) -> None:
    """Write through `write(file)` to a temporary file, fsync it, rename it over `path`, fsync the folder."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class OutputDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.results = self.path / RESULTS
        self.extra: dict[str, Any] = {}
        """Kept in every manifest write: the input paths and engine arguments data-parallel workers read."""

    # --- resume --------------------------------------------------------------------------------------

    def read_manifest(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.path / MANIFEST).read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f"cannot read {self.path / MANIFEST}: {e}",
                             "pass --overwrite to start this output folder afresh") from None

    def check(self, job: dict[str, Any], overwrite: bool) -> None:
        """Refuse an output folder that holds another job's results (unless `overwrite`)."""
        if overwrite or not self.path.exists():
            return
        manifest = self.read_manifest()
        if manifest is None:
            # What a first run killed before its manifest was in place leaves: an empty results/ and a
            # half-written manifest. Anything else is someone else's.
            leftovers = (self.results, self.path / (MANIFEST + ".tmp"))
            if any(p not in leftovers or (p == self.results and any(p.iterdir())) for p in self.path.iterdir()):
                raise UsageError(f"{self.path} is not empty and holds no llmops batch results",
                                 "choose a new output folder, or pass --overwrite to write into it anyway")
            return
        differences = job_differences(manifest.get("job", {}), job)
        if differences:
            raise UsageError(f"{self.path} holds results of a different job ({'; '.join(differences)}); "
                             "mixing them would give inconsistent results",
                             "use a new output folder, or pass --overwrite to discard the old results")

    def prepare(self, job: dict[str, Any], units: list[str], overwrite: bool, **extra: Any) -> dict[str, dict]:
        """Make the folder ready to run: check it, clear it if `overwrite`, return the committed units."""
        self.check(job, overwrite)
        self.extra = extra
        if overwrite:
            self.clear()
        self.results.mkdir(parents=True, exist_ok=True)
        for stale in self.results.glob("*.tmp"):  # a write that a killed process left half done
            stale.unlink()
        done = self.committed(units)
        self.write_manifest(job, done, "running")
        return done

    def clear(self) -> None:
        """Remove what llmops wrote here (never other files)."""
        for name in _OUR_FILES:
            (self.path / name).unlink(missing_ok=True)
        if self.results.exists():
            for f in self.results.glob("part-*.parquet*"):
                f.unlink()

    def committed(self, units: Iterable[str]) -> dict[str, dict]:
        """{unit key: stats} for every unit whose shard is in place (an unreadable one counts as not done and
        is replaced when its unit is generated again)."""
        import pyarrow.parquet as pq

        done: dict[str, dict] = {}
        for key in units:
            path = self.results / shard_name(key)
            if not path.exists():
                continue
            try:
                meta = pq.read_schema(path).metadata or {}
                done[key] = json.loads(meta[STATS_KEY])
            except Exception:  # cannot happen with atomic renames, but a damaged disk must not stop a job
                continue
        return done

    def write_manifest(self, job: dict[str, Any], done: dict[str, dict], status: str) -> None:
        data = {"job": job, "status": status, "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "totals": totals(done.values()), "units_done": len(done), **self.extra,
                "units": {key: done[key] for key in sorted(done)}}
        write_atomic(self.path / MANIFEST, lambda f: f.write(json.dumps(data, indent=1).encode()))

    # --- commit --------------------------------------------------------------------------------------

    def commit(self, key: str, table, stats: dict[str, int]) -> None:
        """Write one unit's shard atomically; after this returns the unit is done for good."""
        import pyarrow.parquet as pq

        table = table.replace_schema_metadata({**(table.schema.metadata or {}), STATS_KEY: json.dumps(stats)})
        write_atomic(self.results / shard_name(key), lambda f: pq.write_table(table, f))

    # --- reading results -----------------------------------------------------------------------------

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
        return found

    def examples(self, limit: int) -> list[dict[str, Any]]:
        """The first `limit` rows as {row, id, prompt, completion, error}, for `--show`."""
        import pyarrow.parquet as pq

        described = (self.read_manifest() or {}).get("job", {}).get("input", {})
        rows: list[dict[str, Any]] = []
        for shard in self.shards():
            if len(rows) >= limit:
                break
            for r in pq.read_table(shard).slice(0, limit - len(rows)).to_pylist():
                rows.append({"row": r["row"], "id": r["id"], "prompt": _prompt_text(r, described),
                             "completion": r["generated_text"], "error": r["error"]})
        return rows

    def write_openai_files(self, model: str) -> None:
        """output.jsonl and errors.jsonl in the OpenAI Batch format, from the shards, in input order."""
        import pyarrow.parquet as pq

        created = int(time.time())
        columns = ["row", "id", "url", "generated_text", "finish_reason", "prompt_tokens", "completion_tokens",
                   "error"]

        def lines(want_errors: bool):
            for shard in self.shards():
                for r in pq.read_table(shard, columns=columns).to_pylist():
                    if (r["error"] is not None) == want_errors:
                        yield (json.dumps(openai_line(r, model, created)) + "\n").encode()

        for name, want_errors in (("output.jsonl", False), ("errors.jsonl", True)):
            write_atomic(self.path / name, lambda f: f.writelines(lines(want_errors)))


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


def totals(stats: Iterable[dict]) -> dict[str, int]:
    out = dict.fromkeys(STAT_FIELDS, 0)
    for s in stats:
        for k in STAT_FIELDS:
            out[k] += s.get(k, 0)
    return out


def job_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What changed between two job identities, as 'sampling.temperature: 0.0 -> 0.7' lines."""
    diffs: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        elif a != b:
            diffs.append(f"{path} differ" if path.endswith("files") else f"{path}: {a!r} -> {b!r}")

    walk(old, new, "")
    return diffs
