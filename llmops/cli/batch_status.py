"""`llmops batch status OUTPUT`: where a batch job stands, read from its folder without taking its lock; and
the estimate lines `llmops batch` prints (before a run and in its summary)."""

from __future__ import annotations

import os
import socket
import time
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from llmops.cli import _output as out
from llmops.cli._options import JsonOpt


def status_command(
    output: Annotated[str, typer.Argument(
        metavar="OUTPUT", help="The job's output folder (a local path, or s3://BUCKET/PREFIX, gs://…).",
        show_default=False)],
    json: JsonOpt = False,
) -> None:
    """Say where a batch job stands: rows done, failed and left, the runs (and Ray nodes) that committed them,
    the last run's rate and the time left at that rate, and whether a run holds the folder now. Reads the
    folder only: it never takes the job's lock. A folder that is not llmops batch output exits 2."""
    report = job_status(output)
    if json:
        out.print_json(report)
        return
    rows = report["rows"]
    last = report["last_run"]
    out.key_values(f"Batch job in {report['output_dir']}", [
        ("status", report["status"]),
        ("rows", f"{rows['done']} done ({rows['ok']} ok, {rows['failed']} failed), "
                 + (f"{rows['left']} left of {rows['total']}" if rows["total"] is not None else "total not recorded")),
        ("shards", report["shards"]),
        ("runs", "; ".join(f"{r['host']} pid {r['pid']}: {r['rows']} rows" for r in report["runs"]) or "-"),
        *((("Ray nodes", ", ".join(f"{n}: {c} shards" for n, c in report["nodes"].items())),) if report["nodes"] else ()),
        ("last run's rate", f"{last['rows_per_s']:.2f} rows/s" + (" (running)" if last["running"] else "")
         if last and last.get("rows_per_s") else "-"),
        ("time left", duration(report["time_left_s"]) + " at that rate" if report["time_left_s"] is not None
         else "-"),
        ("held by", report["held_by"] or "no run holds it now"),
    ])


def job_status(location: str) -> dict[str, Any]:
    """The status of the job in `location` as data (see `status_command`)."""
    from llmops.batch.outputs import OutputDir
    from llmops.errors import UsageError

    folder = OutputDir(location)
    if not folder.exists():
        raise UsageError(f"{location} does not exist", "give the --output folder of a `llmops batch` job")
    manifest = folder.read_manifest()
    shards = folder.our_shards() if manifest is None else folder.shards()
    if manifest is None and not shards:
        raise UsageError(f"{location} is not the output of `llmops batch` (no manifest.json, no llmops shards)",
                         "give the --output folder of a `llmops batch` job")
    if manifest is None:  # lost or damaged: the shards are the truth
        done, units, runs, nodes, total, status, updated = _from_shards(folder, shards)
    else:
        done, units = manifest.totals, manifest.units_done
        runs, nodes, total, status = manifest.runs, manifest.nodes, manifest.rows_total, manifest.status
        updated = _epoch(manifest.updated)
    held_by = _holder(folder)
    last = dict(runs[-1]) if runs else None
    if last is not None:
        last["running"] = "ended" not in last and held_by is not None
        if last["running"] and updated and updated > last.get("started", updated):
            last["rows_per_s"] = (done.rows - last.get("rows_before", 0)) / (updated - last["started"])
        if last["running"] is False and "ended" not in last:
            status = f"{status} (its last run ended without finishing: rerun the same command to resume)"
    rate = last.get("rows_per_s") if last else None
    left = None if total is None else max(0, total - done.rows)
    return {"output_dir": folder.location, "status": status,
            "rows": {"total": total, "done": done.rows, "ok": done.ok, "failed": done.failed, "left": left},
            "units_done": units, "shards": len(shards),
            "runs": [{"host": r.get("host"), "pid": r.get("pid"), "started": r.get("started"), "ended": r.get("ended"),
                      "rows": (r["rows_after"] - r.get("rows_before", 0)) if "rows_after" in r else None,
                      "rows_per_s": r.get("rows_per_s"), "estimated_s": r.get("estimated_s")} for r in runs],
            "nodes": _count(nodes.values()), "last_run": last,
            "time_left_s": left / rate if left is not None and rate else None, "held_by": held_by}


def _from_shards(folder, shards: list[str]):
    from llmops.batch.outputs import META_STATS, META_WRITER, UnitStats, totals

    stats, writers = [], []
    for path in shards:
        try:
            meta = folder._schema_meta(path)
            stats.append(UnitStats.model_validate_json(meta[META_STATS]))
            writers.append(meta.get(META_WRITER, b"").decode())
        except Exception:
            continue
    runs = [{"host": w, "pid": None, "rows_after": n, "rows_before": 0} for w, n in _count(writers).items()]
    return totals(stats), len(stats), runs, {}, None, "manifest missing (counted from the shards)", None


def _count(values) -> dict[str, int]:
    counted: dict[str, int] = {}
    for v in values:
        counted[v] = counted.get(v, 0) + 1
    return counted


def _epoch(stamp: str) -> float | None:
    import calendar

    try:
        return calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ"))
    except (ValueError, TypeError):
        return None


def _holder(folder) -> str | None:
    """Who holds the folder now, read without taking it: on a local disk the kernel's table of flocks
    (/proc/locks) for the lock file, else whether the pid the lock file names lives here; on object storage the
    lease, when renewed within the takeover time."""
    import json

    from llmops.batch.outputs import LEASE_STALE_S, LOCK

    raw = folder._read(LOCK)
    if raw is None:
        return None
    if folder.remote:
        try:
            lease = json.loads(raw)
        except ValueError:
            return None
        age = time.time() - float(lease.get("renewed", 0))
        return f"{lease.get('holder', 'a run')} (lease renewed {age:.0f} s ago)" if age < LEASE_STALE_S else None
    text = raw.decode(errors="replace").strip()
    inode = os.stat(folder.path / LOCK).st_ino
    try:
        with open("/proc/locks") as f:
            locks = f.read().splitlines()
    except OSError:
        locks = None
    if locks is not None:
        for line in locks:
            parts = line.split()
            # "1: FLOCK  ADVISORY  WRITE 12345 fd:01:123456 0 EOF": pid, then major:minor:inode
            if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5].rsplit(":", 1)[-1] == str(inode):
                return text or f"pid {parts[4]}"
        return None
    words = text.split()
    if len(words) >= 5 and words[0] == "pid" and words[4] == socket.gethostname() and words[1].isdigit():
        try:
            os.kill(int(words[1]), 0)
            return text
        except ProcessLookupError:
            return None
        except PermissionError:
            return text
    return None


def duration(seconds: float) -> str:
    """`llmops.estimate.duration`, imported when used (the planner behind it is not needed for --help)."""
    from llmops import estimate

    return estimate.duration(seconds)


# --- the estimate in `llmops batch`'s output ---------------------------------------------------------------


def print_estimate(estimate: dict[str, Any] | None) -> None:
    """The estimate of a dry run, as key-value lines on stdout (its cost when prices.yaml prices `this`)."""
    if not estimate:
        return
    if "error" in estimate:
        out.log(f"llmops batch: {estimate['error']}")
        return
    from llmops.estimate import Estimate, load_prices

    price = load_prices(examples=False).get("this")
    out.key_values("Estimate", Estimate.from_dict(estimate).lines(price[0] if price else None))


def estimated_vs_actual(estimate: dict[str, Any] | None, wall_s: float) -> list[tuple[str, str]]:
    """The summary's line saying how good the estimate was."""
    if not estimate:
        return []
    return [("estimated", f"~{duration(estimate['wall_s'])} ({duration(estimate['low_s'])}-"
                          f"{duration(estimate['high_s'])}) from {estimate['source']}; actual {duration(wall_s)} "
                          f"({wall_s / estimate['wall_s']:.2f}x the estimate)")] if estimate["wall_s"] else []


# --- `llmops batch status` beside `llmops batch INPUT` ------------------------------------------------------


class BatchCommand(TyperCommand):
    """`llmops batch INPUT ...` runs a job; `llmops batch status OUTPUT` is the status command. A command with
    a positional INPUT cannot also be a group, so the word `status` in INPUT's place picks the other command
    (an input file named `status` is still `./status`)."""

    def make_context(self, info_name, args, parent=None, **extra):
        if args and args[0] == "status":
            return _status_click_command().make_context(f"{info_name} status", list(args[1:]), parent=parent, **extra)
        return super().make_context(info_name, args, parent=parent, **extra)


def _status_click_command():
    from llmops.cli._options import verbose_option
    from llmops.cli.app import _tidy_help

    single = typer.Typer(add_completion=False)
    single.command("status")(status_command)
    command = typer.main.get_command(single)
    command.params.append(verbose_option())
    _tidy_help(command)
    return command
