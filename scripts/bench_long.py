"""Map-reduce over long documents two ways, on one engine (issue 22):

1. `llmops batch --on-long chunk` (`run_batch`): the pieces and reduce requests of every document share the
   engine's batches;
2. the same map-reduce as a loop of one document at a time (what a LangChain-style chain does): map that
   document's pieces together (one `LLM.generate`), then each reduce round (one `LLM.generate` each).

Both split with the same code (`LongDocuments.plan`), prompt the same way and decode greedily with the same
max_tokens, so they send the same requests; only the scheduling differs.

    flock /tmp/llmops-heavy.lock .venv/bin/python scripts/bench_long.py [--docs 50] [--context 512] [--json-out FILE]

The documents are made-up reports (plain generated text, each about `--times` contexts long). The engine
starts once (llmops's plan for the default model with max_model_len=--context) and its start is excluded
from both timings. Not a test: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

TEMPLATE = "Summarize this part of a report in two sentences.\n\n{text}"
TOPICS = ["the harbour was rebuilt after the storm", "the school opened a new library",
          "the mayor raised the bridge toll", "farmers reported a record apple harvest",
          "the old mill was turned into a museum", "a new railway line reached the valley",
          "the river flooded the lower streets", "the council voted to plant a thousand trees",
          "a fire destroyed the market hall", "the town band won a national prize"]


def report(n: int, paragraphs: int) -> str:
    town = f"Town {n}"
    found = []
    for p in range(paragraphs):
        topic = TOPICS[(n + p) % len(TOPICS)]
        found.append(f"In year {1900 + p}, in {town}, {topic}. The people of {town} talked about it for months, "
                     f"and the local paper wrote that {topic} changed daily life. Visitors came to {town} to see "
                     f"it, and shops stayed open late.")
    return "\n\n".join(found)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=50)
    parser.add_argument("--context", type=int, default=512, help="planned max_model_len")
    parser.add_argument("--times", type=float, default=4.0, help="document length in contexts")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--json-out")
    args = parser.parse_args()

    from vllm import LLM

    from llmops.batch import BatchConfig, load_engine, plan_batch, run_batch
    from llmops.batch.inputs import Row
    from llmops.batch.long import LongDocuments, survey
    from llmops.config import load_config

    tmp = Path(tempfile.mkdtemp(prefix="bench-long-"))
    paragraphs = max(1, round(args.times * args.context / 75))  # a paragraph is about 75 tokens
    docs = [{"id": f"d{i}", "text": report(i, paragraphs)} for i in range(args.docs)]
    data = tmp / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    config = load_config(BatchConfig, sets=["engine.cpu_kv_cache_gib=2", f"engine.max_model_len={args.context}",
                                            f"sampling.max_tokens={args.max_tokens}", "long.on_long=chunk",
                                            f"input.prompt_template={json.dumps(TEMPLATE)}"])
    job = plan_batch(config, str(data), tmp / "out")
    planned = survey(job)
    print(f"{args.docs} documents of ~{args.times:g} contexts ({args.context} tokens); plan: {planned}",
          file=sys.stderr)
    t0 = time.monotonic()
    llm: LLM = load_engine(job.engine)
    print(f"engine started in {time.monotonic() - t0:.1f} s", file=sys.stderr)

    # 2. One document at a time, on the same engine, with the same requests.
    task = job.task
    assert isinstance(task, LongDocuments)
    state = task.open(llm, job.identity)
    requests_per_doc = []
    loop_answers = {}
    t0 = time.monotonic()
    for n, d in enumerate(docs):
        row = Row(n, d["id"], messages=[{"role": "user", "content": TEMPLATE.format(text=d["text"])}])
        sent = 0
        batch = task.requests(state, row)
        while True:
            sent += len(batch)
            outputs = llm.generate([p for p, _, _ in batch], [s for _, s, _ in batch], use_tqdm=False)
            follow = task.more(state, row, outputs)
            if not follow:
                loop_answers[d["id"]] = task.result(state, row, outputs)["generated_text"]
                break
            batch = follow
        requests_per_doc.append(sent)
    loop_s = time.monotonic() - t0
    print(f"one document at a time: {loop_s:.1f} s", file=sys.stderr)

    # 1. llmops batch --on-long chunk.
    t0 = time.monotonic()
    summary = run_batch(config, str(data), tmp / "out", llm=llm)
    batch_s = time.monotonic() - t0
    print(f"llmops batch --on-long chunk: {batch_s:.1f} s ({summary.generation_s:.1f} s generating)",
          file=sys.stderr)
    import pyarrow.parquet as pq

    table = pq.read_table(tmp / "out" / "results").to_pylist()
    same = sum(r["generated_text"] == loop_answers[r["id"]] for r in table)
    result = {"docs": args.docs, "context": args.context, "max_tokens": args.max_tokens,
              "prompt_tokens_per_doc_median": statistics.median(r["prompt_tokens"] for r in table),
              "chunks_median": statistics.median(r["chunks"] for r in table),
              "reduce_rounds_max": max(r["reduce_rounds"] for r in table),
              "requests_per_doc_median": statistics.median(requests_per_doc),
              "requests_total": sum(requests_per_doc), "requests_planned": planned["requests"],
              "rows_ok": summary.rows_ok, "loop_s": round(loop_s, 1), "batch_s": round(batch_s, 1),
              "speedup": round(loop_s / batch_s, 2), "same_answers": same}
    print(json.dumps(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
