"""Labeling throughput on the CPU: the same job (sentiment of N short reviews, one prompt template) run as
`--choices`, unconstrained with a max_tokens that holds a label, and `--json-schema` with one enum field;
and the two ways of computing `label_probs` (first-token logprobs under the constraint, llmops's default,
against scoring every label with prompt logprobs), compared for speed and agreement.

    flock /tmp/llmops-heavy.lock .venv/bin/python scripts/bench_label.py [--rows 2000] [--json-out FILE]

One engine (llmops's plan for the default model) runs every job in this process, through `run_batch`, so
engine start is paid once and excluded; rows/s and output tok/s are over each job's generation time. Not a
test: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path

LABELS = ["positive", "negative", "neutral"]
TEMPLATE = "Classify the sentiment of this review as positive, negative or neutral.\nReview: {text}"
GOOD = ["love it", "works perfectly", "excellent quality", "best purchase this year", "superb service",
        "very happy with it", "fantastic value", "would buy again"]
BAD = ["broke after a day", "a waste of money", "awful quality", "the worst service", "very disappointed",
       "do not buy this", "it smells bad", "stopped working"]
FLAT = ["arrived on Tuesday", "comes in a blue box", "has twelve pages", "was bought in March",
        "comes in two sizes", "weighs about a kilo", "has a black lid", "was shipped from Leeds"]
THINGS = ["kettle", "lamp", "book", "jacket", "phone case", "blender", "backpack", "mug"]


def reviews(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        phrases, truth = [(GOOD, "positive"), (BAD, "negative"), (FLAT, "neutral")][i % 3]
        text = f"The {rng.choice(THINGS)} {rng.choice(phrases)}" if truth == "neutral" else \
            f"This {rng.choice(THINGS)}: {rng.choice(phrases)}, {rng.choice(phrases)}."
        rows.append({"id": f"r{i}", "text": text, "truth": truth})
    return rows


def force_scoring() -> None:
    """Make --choices score every label (the fallback for labels that share a first token) for this run."""
    from llmops.batch.label import Label

    opened = Label.open

    def open_scoring(self, llm, job):
        state = opened(self, llm, job)
        state["score"] = True
        state["params"] = self._params(state, None)
        return state

    Label.open = open_scoring


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--free-max-tokens", type=int, default=16,
                        help="max_tokens of the unconstrained job (a label is 1-2 tokens; free text runs on)")
    parser.add_argument("--scored-rows", type=int, default=500,
                        help="rows of the scoring run (3 requests a row, ~4x slower: 810 rows took as long as "
                             "2000 --choices rows plus 60 s)")
    parser.add_argument("--json-out")
    args = parser.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq

    from llmops.batch import BatchConfig, load_engine, plan_batch, run_batch
    from llmops.config import load_config
    from llmops.registry import ensure_local, resolve

    work = Path(tempfile.mkdtemp(prefix="bench-label-"))
    rows = reviews(args.rows)
    data = work / "reviews.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)
    pq.write_table(pa.Table.from_pylist(rows[:args.scored_rows]), work / "scored.parquet")
    (work / "schema.json").write_text(json.dumps({"type": "object", "properties": {"sentiment": {"enum": LABELS}},
                                                  "required": ["sentiment"], "additionalProperties": False}))
    base = ["engine.cpu_kv_cache_gib=2", f"input.prompt_template={json.dumps(TEMPLATE)}"]
    jobs = {"choices": [f"label.choices={json.dumps(LABELS)}"],
            "free": [f"sampling.max_tokens={args.free_max_tokens}"],
            "json_schema": [f"label.json_schema={work / 'schema.json'}", "sampling.max_tokens=32"],
            "choices_scored": [f"label.choices={json.dumps(LABELS)}"]}

    started = time.monotonic()
    job = plan_batch(load_config(BatchConfig, sets=base), str(data), work / "probe")
    job.with_model(ensure_local(resolve(job.model_name)))
    llm = load_engine(job.engine)
    print(f"engine start {time.monotonic() - started:.1f} s; {args.rows} rows; {job.plan.dtype}", file=sys.stderr)

    results, answers, prompt_tokens = {}, {}, 0
    for name, sets in jobs.items():
        if name == "choices_scored":
            force_scoring()
        source = work / "scored.parquet" if name == "choices_scored" else data
        summary = run_batch(load_config(BatchConfig, sets=[*base, *sets]), str(source), work / name, llm=llm)
        table = pq.read_table(work / name / "results").sort_by("row").to_pylist()
        answers[name] = table
        if name.startswith("choices"):
            said = [r["label"] for r in table]
        elif name == "json_schema":
            said = [json.loads(r["generated_text"])["sentiment"] if r["error"] is None else None for r in table]
        else:
            said = [_as_label(r["generated_text"]) for r in table]
        gen = summary.generation_s
        if name == "choices":
            prompt_tokens = summary.prompt_tokens  # the same prompts in every job
        results[name] = {"rows_ok": summary.rows_ok, "generation_s": round(gen, 1),
                         "rows_per_s": round(summary.rows_ok / gen, 1),
                         "output_tokens": summary.completion_tokens,
                         "output_tok_per_s": round(summary.completion_tokens / gen, 1),
                         "s_per_output_token_ms": round(1000 * gen / max(summary.completion_tokens, 1), 2),
                         "not_a_label": sum(s is None for s in said),
                         "accuracy": round(sum(s == r["truth"] for s, r in zip(said, rows)) / len(said), 3)}
        print(name, results[name], file=sys.stderr)

    first, scored = answers["choices"], answers["choices_scored"]
    diffs = [abs(a["label_probs"][c] - b["label_probs"][c]) for a, b in zip(first, scored) for c in LABELS]
    results["first_token_vs_scored"] = {
        "same_label": round(sum(a["label"] == b["label"] for a, b in zip(first, scored)) / len(scored), 3),
        "mean_abs_prob_diff": round(sum(diffs) / len(diffs), 4), "max_abs_prob_diff": round(max(diffs), 4),
        "calibration_first_token": _calibration(first[:len(scored)], rows),
        "calibration_scored": _calibration(scored, rows)}
    results["choices_over_free_rows_per_s"] = round(results["choices"]["rows_per_s"] / results["free"]["rows_per_s"], 2)
    # A label is 2 output tokens after ~56 prompt tokens: output tokens alone do not say what a step costs.
    # time = a * prompt_tokens + b * output_tokens, fitted on the two constrained jobs (same prompts, both
    # with a grammar), gives the constrained cost per output token b, to set against the free job's.
    c, j, f = (results[k] for k in ("choices", "json_schema", "free"))
    b = (j["generation_s"] - c["generation_s"]) / max(j["output_tokens"] - c["output_tokens"], 1)
    a = (c["generation_s"] - b * c["output_tokens"]) / prompt_tokens
    results["constrained_over_free_cost_per_output_token"] = round(
        b / ((f["generation_s"] - a * prompt_tokens) / f["output_tokens"]), 2)
    print(json.dumps(results, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))


def _as_label(text: str) -> str | None:
    """An unconstrained answer that is exactly a label (case, spaces and a final full stop aside)."""
    word = re.sub(r"[.!\s]+$", "", text.strip()).lower()
    return word if word in LABELS else None


def _calibration(table: list[dict], rows: list[dict]) -> dict[str, float]:
    """Accuracy of the more confident half against the less confident half."""
    ranked = sorted(zip(table, rows), key=lambda p: -p[0]["confidence"])
    half = len(ranked) // 2
    acc = [sum(a["label"] == r["truth"] for a, r in part) / max(len(part), 1)
           for part in (ranked[:half], ranked[half:])]
    return {"high_half_accuracy": round(acc[0], 3), "low_half_accuracy": round(acc[1], 3)}


if __name__ == "__main__":
    main()
