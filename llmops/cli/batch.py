"""`llmops batch`: offline generation or embeddings over a prompt file or Parquet/Arrow shards, resumable
(llmops.batch)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from llmops.batch.config import BatchConfig, InputConfig, LabelConfig, LongConfig, SamplingConfig
from llmops.cli import _output as out
from llmops.cli._options import ConfigOpt, DryRunOpt, JsonOpt, ModelOpt, SetOpt
from llmops.cli.batch_status import BatchCommand, duration, estimated_vs_actual, print_estimate


def _doc(model, name: str) -> str:
    """Help text from the config schema's attribute docstring, so flag and YAML key say the same thing."""
    return model.model_fields[name].description or ""


def batch_command(
    input: Annotated[str, typer.Argument(
        help="A .jsonl (prompt/messages lines or OpenAI Batch requests), .parquet or .arrow file, a folder "
             "of such shards, or a quoted glob like 'data/*.parquet'; local, or on object storage "
             "(s3://BUCKET/PREFIX, gs://…); or a Hugging Face dataset: hf://datasets/OWNER/NAME\\[@REV] or a "
             "save_to_disk folder (--set input.split=…).", show_default=False)],
    output: Annotated[str, typer.Option(
        "--output", "-o", help="Output folder (a local path, or s3://BUCKET/PREFIX, gs://… on object storage): "
                               "Parquet shards, manifest, config; rerun to resume.",
        show_default=False)],
    model: ModelOpt = None,
    task: Annotated[Optional[str], typer.Option(
        "--task", metavar="auto|generate|embed", help=_doc(BatchConfig, "task")
        + " Embedding options: --set output.normalize=false, output.dimensions=N, output.dtype=float16, "
          "output.on_long=fail.", show_default=False)] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    max_tokens: Annotated[Optional[int], typer.Option(help=_doc(SamplingConfig, "max_tokens"))] = None,
    temperature: Annotated[Optional[float], typer.Option(help=_doc(SamplingConfig, "temperature"))] = None,
    top_p: Annotated[Optional[float], typer.Option(help=_doc(SamplingConfig, "top_p"))] = None,
    seed: Annotated[Optional[int], typer.Option(help=_doc(SamplingConfig, "seed"))] = None,
    stop: Annotated[Optional[list[str]], typer.Option(help=_doc(SamplingConfig, "stop") + " Repeatable.")] = None,
    prompt_column: Annotated[Optional[str], typer.Option(help=_doc(InputConfig, "prompt_column"))] = None,
    messages_column: Annotated[Optional[str], typer.Option(help=_doc(InputConfig, "messages_column"))] = None,
    id_column: Annotated[Optional[str], typer.Option(help=_doc(InputConfig, "id_column"))] = None,
    prompt_template: Annotated[Optional[str], typer.Option(help=_doc(InputConfig, "prompt_template"))] = None,
    choices: Annotated[Optional[str], typer.Option(
        help=_doc(LabelConfig, "choices") + " Comma-separated.", show_default=False)] = None,
    choices_file: Annotated[Optional[str], typer.Option(help=_doc(LabelConfig, "choices_file"))] = None,
    json_schema: Annotated[Optional[str], typer.Option(help=_doc(LabelConfig, "json_schema"))] = None,
    regex: Annotated[Optional[str], typer.Option(help=_doc(LabelConfig, "regex"))] = None,
    on_long: Annotated[Optional[str], typer.Option(
        "--on-long", metavar="fail|truncate|chunk", help=_doc(LongConfig, "on_long")
        + " Options: --set long.keep=head|tail|middle, long.overlap_tokens=N.", show_default=False)] = None,
    reduce_prompt: Annotated[Optional[str], typer.Option(
        help=_doc(LongConfig, "reduce_prompt"), show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Discard the results of another job in OUTPUT (other model, input, sampling or "
                            "engine dtype/context); removes only files llmops wrote there.")] = False,
    grace_period: Annotated[float, typer.Option(
        "--grace-period", min=1.0,
        help="Seconds between SIGTERM/SIGINT and exit: finished rows are committed, then exit 75 (rerun to "
             "finish). Set it below your platform's grace period (Kubernetes 30 s, GCP spot 30 s, AWS 120 s).")
    ] = 20.0,
    show: Annotated[int, typer.Option(help="After the summary, print the first N prompt -> completion pairs "
                                           "(with --json: an `examples` list).", min=0)] = 0,
    ray: Annotated[Optional[str], typer.Option(
        "--ray", metavar="ADDRESS",
        help="Place one engine per node (or GPU group) on a Ray cluster: HOST:PORT, or `auto` for the cluster "
             "this machine belongs to. Needs `pip install 'llmops[ray]'` and the output on storage every node "
             "sees.")] = None,
    json: JsonOpt = False,
    dry_run: DryRunOpt = False,
    calibrate: Annotated[bool, typer.Option(
        "--calibrate", help="Run the input's first rows (as many as the engine runs at once, at least 64) "
                            "into a scratch folder (OUTPUT is not touched), record their throughput and print the whole job's estimate from it; later --dry-runs and "
                            "runs of this model here use the measurement.")] = False,
) -> None:
    """Generate completions (or, with --task embed, embeddings) for every row of INPUT with vLLM, as fast as
    the hardware allows.

    Labeling, on the offline default model (every label is one of the choices, with its confidence):
    `llmops batch examples/batch/reviews.jsonl -o out/reviews --choices "positive,negative,neutral"
    --prompt-template "Classify the sentiment of this review as positive, negative or neutral: {text}"`
    writes `label`, `confidence` and `label_probs`; `--json-schema schema.json` writes JSON answers and a
    typed `parsed` column; `--regex` constrains answers to a pattern.

    Embeddings, on the offline default embedding model (an embedding model embeds by default):
    `llmops batch examples/batch/docs.jsonl -o out/docs --model all-minilm-l6-v2` writes each row's
    `embedding` (a fixed-size float32 list) and `truncated` flag beside its columns; for another model, or a
    Parquet text column: `--task embed --prompt-column text`.

    `--dry-run` says how long the job will take (from the hardware, or from earlier runs of the model here),
    and `llmops batch status OUTPUT` where a job stands.

    Long documents, summarized piece by piece and combined (map-reduce), one result row each:
    `llmops batch examples/batch/long/docs.jsonl -o out/summaries --on-long chunk --max-tokens 96
    --set engine.max_model_len=1024 --prompt-template "Summarize this part of a document in a few
    sentences: {text}"` writes `chunks` and `reduce_rounds` beside each summary; `--on-long truncate`
    keeps the start instead (--set long.keep=tail|middle).

    Finished work is committed shard by shard: after a crash or kill, the same command resumes where it
    stopped, and every row ends up in the output exactly once. Exit 0 when all rows succeeded, 1 when
    some failed (see the `error` column), 2 for bad usage, unreadable input or an output folder in use or
    holding another job, 75 when stopped by SIGTERM/SIGINT (rerun to finish).
    """
    from llmops.batch import BatchConfig, dry_run as plan_text, plan_batch, run_batch
    from llmops.batch.outputs import OutputDir
    from llmops.config import load_config

    flags = {"model": model, "task": task, "sampling.max_tokens": max_tokens, "sampling.temperature": temperature,
             "sampling.top_p": top_p, "sampling.seed": seed, "sampling.stop": stop or None,
             "input.prompt_column": prompt_column, "input.messages_column": messages_column,
             "input.id_column": id_column, "input.prompt_template": prompt_template,
             "label.choices": choices.split(",") if choices is not None else None,
             "label.choices_file": choices_file, "label.json_schema": json_schema, "label.regex": regex,
             "long.on_long": on_long, "long.reduce_prompt": reduce_prompt}
    cfg = load_config(BatchConfig, yaml_path=config, sets=set_, flags=flags,
                      source=str(config) if config else "batch config")
    if calibrate:
        from llmops.batch.calibrate import calibrate as run_calibration

        found = run_calibration(cfg, input, output, progress=_Bar())
        if json:
            out.print_json(found)
        else:
            sample = found["calibration"]
            out.result(f"calibrated on {sample['rows_total']} rows: engine start {sample['engine_start_s']:.1f} s, "
                       f"{sample['output_tokens_per_s'] or sample['rows_per_s']:.1f} "
                       f"{'output tok/s' if sample['output_tokens_per_s'] else 'rows/s'}")
            print_estimate(found["estimate"])
        return
    if dry_run:
        if ray is not None:
            from llmops.batch.ray_engines import ray_dry_run
            from llmops.ray_cluster import import_ray

            import_ray()
        job = plan_batch(cfg, input, output, overwrite=overwrite)
        _print_plan({**plan_text(job), **(ray_dry_run(job, ray) if ray is not None else {})}, json)
        return
    summary = run_batch(cfg, input, output, overwrite=overwrite, progress=_Bar(), grace_period_s=grace_period,
                        ray_address=ray)
    examples = OutputDir(output).examples(show) if show else []
    if json:
        out.print_json({**summary.to_dict(), **({"examples": examples} if show else {})})
    else:
        out.key_values("Batch summary", [
            ("rows", f"{summary.rows_ok} ok, {summary.rows_failed} failed, {summary.rows_total} total"
                     + (f" ({summary.rows_skipped} done by an earlier run)" if summary.rows_skipped else "")),
            ("tokens", f"{summary.prompt_tokens} prompt, {summary.completion_tokens} output"),
            ("wall time", f"{summary.wall_s:.1f} s (engine start {summary.engine_start_s:.1f} s, "
                          f"generation {summary.generation_s:.1f} s)"),
            ("rows/s", f"{summary.rows_per_s:.1f}") if summary.completion_tokens == 0 else
            ("output tokens/s", f"{summary.output_tokens_per_s:.1f}"),
            *estimated_vs_actual(summary.estimate, summary.wall_s),
            ("results", f"{summary.output_dir}/results/*.parquet"),
            *(("OpenAI results", f) for f in summary.files),
            *((("long rows", _long_line(summary.long)),) if summary.long else ()),
        ])
        for ex in examples:
            out.result(f"\n[{ex['id']}] {ex['prompt'].strip()}\n  -> "
                       + (ex["completion"].strip() if ex["error"] is None else f"ERROR: {ex['error']}"))
    if summary.rows_failed:
        where = ", ".join(f"row {f['row']} ({f['id']}): {f['error']}" for f in summary.failed[:3])
        out.log(f"llmops: {summary.rows_failed} of {summary.rows_total} rows failed; their `error` column in "
                f"{summary.output_dir}/results says why (first: {where})")
        raise typer.Exit(1)


def _long_line(found: dict) -> str:
    parts = [f"{found['truncated']} truncated"] if "truncated" in found else []
    if "chunked" in found:
        parts.append(f"{found['chunked']} chunked ({found['pieces_median']:g} pieces median, "
                     f"{found['pieces_max']} max)")
    return ", ".join(parts)


def _print_plan(plan: dict, json: bool) -> None:
    from llmops.batch.long import describe_survey

    if json:
        out.print_json(plan)
        return
    inp = plan["input"]
    engine_plan = plan["plan"]
    notes = engine_plan.pop("notes", ())
    out.key_values("Batch plan", [
        ("model", f"{plan['model']} ({plan['model_path'] or 'not downloaded yet'})"),
        ("task", plan["task"]),
        ("input", f"{inp['format']}, {inp['rows']} rows in {len(inp['files'])} file(s)"),
        ("output", f"{plan['output_dir']}: {plan['units']} shards, {plan['units_done']} already done"),
        *((f"engine.{k}", v) for k, v in engine_plan.items()),
        *(("why", n) for n in notes),
        *((("long rows", describe_survey(plan["long"])),) if plan.get("long") else ()),
    ])
    for engine in plan["engines"]:
        out.result(f"engine {engine['rank']}: " + (engine.get("command") or engine["call"]))
    if len(plan["engines"]) > 1:
        out.result(f"each engine: vllm.LLM(**{plan['engines'][0]['llm_args']!r})")
    for warning in plan["warnings"]:
        out.log(f"llmops batch: warning: {warning}")
    print_estimate(plan.get("estimate"))


batch_command.click_cls = BatchCommand  # type: ignore[attr-defined]  # `llmops batch status OUT` (batch_status.py)


class _Bar:
    """Progress on stderr: a rich bar on a terminal, a log line every 30 s otherwise."""

    def __init__(self) -> None:
        self.bar = None
        self.total = self.done = self.tokens = self.rows = 0
        self.started = self.last_log = time.monotonic()

    def phase(self, text: str) -> None:
        out.log(f"llmops batch: {text}")
        self.started = time.monotonic()

    def start(self, total_rows: int, done_rows: int) -> None:
        self.total, self.done = total_rows, done_rows
        self.last_log = time.monotonic()
        if done_rows:
            out.log(f"llmops batch: resuming, {done_rows} of {total_rows} rows already done")
        if out.stderr.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("rows"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[speed]}"), TimeRemainingColumn(), console=out.stderr)
            self.task = self.bar.add_task("batch", total=total_rows, completed=done_rows, speed="")
            self.bar.start()

    def advance(self, rows: int, completion_tokens: int) -> None:
        if not rows and not completion_tokens:  # nothing happened: no "0/N rows, 0 tok/s" line in a CI log
            return
        self.done += rows
        self.rows += rows
        self.tokens += completion_tokens
        now = time.monotonic()
        elapsed = max(now - self.started, 1e-9)
        # rows/s where nothing is generated (embeddings), output tokens/s where text is
        speed = f"{self.tokens / elapsed:.0f} tok/s" if self.tokens else f"{self.rows / elapsed:.0f} rows/s"
        if self.bar is not None:
            self.bar.update(self.task, advance=rows, speed=speed)
        elif now - self.last_log >= 30:
            self.last_log = now
            left = (self.total - self.done) / (self.rows / elapsed) if self.rows else None
            out.log(f"llmops batch: {self.done}/{self.total} rows, {speed}"
                    + (f", ~{duration(left)} left at this rate" if left is not None else ""))

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
