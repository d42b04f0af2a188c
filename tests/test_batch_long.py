"""Long documents in `llmops batch` (issue 22): `--on-long truncate` keeps the part asked for, `--on-long chunk`
map-reduces a document of several times the context into one row (in several reduce rounds when the
answers do not fit one request), short rows beside them are unchanged, OpenAI chat lines are handled the
same way, and a kill -9 mid-job then a rerun gives every document exactly once. The engine tests share one
engine planned with a context of 512 tokens, so a document of ~1500 tokens is three contexts long."""

from __future__ import annotations

import json
import pickle
import re
import signal
import sys

import pyarrow.parquet as pq
import pytest

from llmops.batch import BatchConfig, load_engine, plan_batch, run_batch
from llmops.batch.config import LongConfig, SamplingConfig
from llmops.batch.engine import close_engine
from llmops.batch.inputs import Row
from llmops.batch.long import LongDocuments, cut, split
from llmops.batch.tasks import Generate
from llmops.config import load_config
from llmops.errors import UsageError
from tests.conftest import kill_9_when, run_cli
from tests.test_batch_label import env  # noqa: F401 (a fixed machine and an empty LLMOPS_HOME for CLI runs)
from tests.test_batch_trust import make_model

CONTEXT = 512
ENGINE = ["engine.cpu_kv_cache_gib=1", f"engine.max_model_len={CONTEXT}"]
TEMPLATE = "Summarize this part of a report in two sentences.\n\n{text}"
# Made-up place names: one per document, so an answer that holds another document's name came from its pieces.
NAMES = ["Zorbington", "Quillmarsh", "Vantrelle", "Ostravin", "Pellucid Bay", "Hargrove", "Ixworth", "Balfrey",
         "Corvanne", "Drummelow", "Eskerfield", "Fennimoor"]
TOPICS = ["the harbour was rebuilt after the storm", "the school opened a new library", "the mayor raised the bridge toll",
          "farmers reported a record apple harvest", "the old mill was turned into a museum",
          "a new railway line reached the valley", "the river flooded the lower streets",
          "the council voted to plant a thousand trees"]


def report(name: str, paragraphs: int) -> str:
    """A plain report about one town, each paragraph naming it (about 75 tokens a paragraph)."""
    found = []
    for p in range(paragraphs):
        topic = TOPICS[p % len(TOPICS)]
        found.append(f"In year {1900 + p}, in {name}, {topic}. The people of {name} talked about it for months, "
                     f"and the local paper wrote that {topic} changed daily life. Visitors came to {name} to see "
                     f"it, and shops stayed open late.")
    return "\n\n".join(found)


def config(*sets: str) -> BatchConfig:
    return load_config(BatchConfig, sets=[*ENGINE, *sets])


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- unit: splitting, cutting, rounds, options ---------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


@pytest.mark.unit
def test_split_covers_the_text_in_overlapping_pieces_cut_at_paragraph_edges(tokenizer):
    text = report("Hargrove", 30)
    paragraph = max(len(tokenizer.encode(p, add_special_tokens=False)) for p in text.split("\n\n"))
    budget = 3 * paragraph  # an edge is always in a piece's second half
    pieces = split(text, tokenizer, budget, 24)
    assert len(pieces) >= 3
    assert all(len(tokenizer.encode(p, add_special_tokens=False)) <= budget for p in pieces)
    assert pieces[0].startswith("In year 1900") and text.endswith(pieces[-1])
    for before, after in zip(pieces, pieces[1:]):
        assert before.endswith("late.\n\n") or before.endswith("late.")  # a paragraph edge, not mid-sentence
        start = after.lstrip()
        assert start[:30] in before and text[text.index(start) - 1].isspace()  # the overlap starts at a word
    # Every paragraph is in some piece, whole.
    for paragraph in text.split("\n\n"):
        assert any(paragraph in p for p in pieces), paragraph[:40]
    assert split("no edges at all " * 80, tokenizer, 50, 0)  # no edges: cut on tokens


@pytest.mark.unit
def test_cut_keeps_the_head_the_tail_or_both_ends(tokenizer):
    text = " ".join(str(i) for i in range(400))
    n = len(tokenizer.encode(text, add_special_tokens=False))
    head, dropped = cut(text, tokenizer, 100, "head")
    assert text.startswith(head) and dropped == n - 100
    tail, _ = cut(text, tokenizer, 100, "tail")
    assert text.endswith(tail) and len(tokenizer.encode(tail, add_special_tokens=False)) <= 101
    middle, _ = cut(text, tokenizer, 100, "middle")
    front, back = middle.split("[...]")
    assert text.startswith(front.rstrip("\n")) and text.endswith(back.lstrip("\n"))
    assert cut("short", tokenizer, 100, "head") == ("short", 0)


@pytest.mark.unit
def test_reduce_rounds_group_answers_that_fit_and_always_shrink(tokenizer):
    task = LongDocuments(Generate(SamplingConfig(max_tokens=40)), LongConfig(on_long="chunk"), TEMPLATE)
    state = {"tokenizer": tokenizer, "window": 300}
    row = Row(0, "a", prompt="x")
    room = task._reduce_room(state, row, 40)
    words = report("Hargrove", 1).split()
    answer = " ".join(w for n, w in enumerate(words) if len(tokenizer.encode(" ".join(words[:n + 1]))) <= 38)
    answers = [answer] * 9  # as long as max_tokens allows
    groups = task._groups(state, row, answers)
    assert sum(len(g) for g in groups) == 9 and all(len(g) >= 2 for g in groups[:-1]) and 1 < len(groups) < 9
    for g in groups:  # each group fits one reduce request
        assert sum(len(tokenizer.encode(t, add_special_tokens=False)) + 2 for t in g) <= room
    assert task._groups(state, row, ["short answer"] * 5) == [["short answer"] * 5]  # all fit: one request
    # max_tokens so large that two answers cannot share a request: the row fails with what to lower
    greedy = LongDocuments(Generate(SamplingConfig(max_tokens=120)), LongConfig(on_long="chunk"), TEMPLATE)
    with pytest.raises(ValueError, match="lower --max-tokens to at most"):
        greedy.plan(state, Row(0, "a", prompt=report("Ixworth", 20)))


@pytest.mark.unit
def test_on_long_options_are_checked_and_recorded_in_the_identity(tmp_path, tiny_tokenizer_dir):
    from llmops.batch.job import task_for
    from llmops.batch.identity import JobIdentity

    with pytest.raises(UsageError, match="chunk combines free-text answers"):
        task_for(load_config(BatchConfig, sets=["long.on_long=chunk", 'label.choices=["a","b"]']))
    with pytest.raises(UsageError, match="has no {parts}"):
        task_for(load_config(BatchConfig, sets=["long.on_long=chunk", "long.reduce_prompt=Combine these"]))
    assert task_for(load_config(BatchConfig, sets=["long.on_long=fail"])).identity() == {}  # the key stays
    chunk = task_for(load_config(BatchConfig, sets=["long.on_long=chunk"])).identity()
    truncate = task_for(load_config(BatchConfig, sets=["long.on_long=truncate"])).identity()
    base = {"input": {"format": "jsonl", "files": [], "digest": "d"}, "model": {"name": "m"}, "sampling": {},
            "engine": {"dtype": "float32", "max_model_len": 512}, "chunk_rows": 10}
    old, new = JobIdentity(**base, task=truncate), JobIdentity(**base, task=chunk)
    assert old.key() != new.key()
    assert "--on-long changed: 'truncate' -> 'chunk'" in new.changes_from(old)
    embed = task_for(load_config(BatchConfig, sets=["long.on_long=chunk"]), "embed")
    assert embed.output.on_long == "chunk"
    # The task travels pickled to worker processes and Ray replicas.
    task = task_for(load_config(BatchConfig, sets=["long.on_long=chunk", 'input.prompt_template="S: {text}"']))
    assert pickle.loads(pickle.dumps(task)).identity() == task.identity() and task.template == "S: {text}"


@pytest.mark.unit
def test_cli_refusals_exit_2_before_any_engine_starts(tmp_path, env):
    model = make_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "docs.jsonl", [{"text": "a short document"}])
    cases = [(["--on-long", "chunk", "--choices", "a,b"], "--on-long chunk combines free-text answers"),
             (["--on-long", "chunk", "--reduce-prompt", "Combine these."], "has no {parts}"),
             (["--on-long", "squeeze"], "long.on_long")]
    for args, needle in cases:
        proc = run_cli("batch", str(data), "-o", str(tmp_path / "out"), "--model", str(model),
                       "--prompt-template", "Summarize: {text}", *args, env=env, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not (tmp_path / "out").exists()


# --- engine: one shared engine with a 512-token context --------------------------------------------------


@pytest.fixture(scope="module")
def llm(default_model_dir, tmp_path_factory):
    probe = write_jsonl(tmp_path_factory.mktemp("probe") / "p.jsonl", [{"prompt": "x"}])
    job = plan_batch(config(), str(probe), tmp_path_factory.mktemp("probe-out"))
    assert job.plan.max_model_len == CONTEXT
    engine = load_engine(job.engine)
    yield engine
    close_engine(engine)


@pytest.mark.engine
def test_chunk_map_reduces_long_documents_in_rounds_and_short_rows_are_unchanged(llm, tmp_path):
    rows = [{"id": "short-1", "text": "The bakery in Balfrey sells bread."},
            {"id": "three", "text": report(NAMES[0], 20)},   # ~1500 tokens: three contexts
            {"id": "short-2", "text": "Hargrove has a small railway station."},
            {"id": "eight", "text": report(NAMES[1], 54)}]   # ~4000 tokens: eight contexts
    data = write_jsonl(tmp_path / "docs.jsonl", rows)
    sets = [f"input.prompt_template={json.dumps(TEMPLATE)}", "sampling.max_tokens=96"]
    plan = plan_batch(config(*sets, "long.on_long=chunk"), str(data), tmp_path / "out")
    from llmops.batch.long import survey

    found = survey(plan)
    assert (found["rows"], found["too_long"], found["on_long"]) == (4, 2, "chunk")
    assert found["requests"] > found["pieces_max"] >= 8
    summary = run_batch(config(*sets, "long.on_long=chunk"), str(data), tmp_path / "out", llm=llm)
    assert (summary.rows_ok, summary.rows_failed) == (4, 0)
    got = {r["id"]: r for r in pq.read_table(tmp_path / "out" / "results").to_pylist()}
    assert got["three"]["chunks"] >= 3 and got["three"]["reduce_rounds"] >= 1
    assert got["eight"]["chunks"] >= 8 and got["eight"]["reduce_rounds"] >= 2
    for doc in ("three", "eight"):
        assert got[doc]["generated_text"].strip() and got[doc]["prompt_tokens"] > CONTEXT
    assert summary.long == {"chunked": 2, "pieces_max": got["eight"]["chunks"],
                            "pieces_median": (got["three"]["chunks"] + got["eight"]["chunks"]) / 2}
    # Short rows are one request each, exactly as a job without --on-long gives them.
    plain = run_batch(config(*sets), str(write_jsonl(tmp_path / "short.jsonl", [rows[0], rows[2]])),
                      tmp_path / "plain", llm=llm)
    assert plain.rows_ok == 2
    for r in pq.read_table(tmp_path / "plain" / "results").to_pylist():
        assert (got[r["id"]]["chunks"], got[r["id"]]["reduce_rounds"]) == (1, 0)
        assert got[r["id"]]["generated_text"] == r["generated_text"]
    # Without --on-long the long rows fail alone, saying what to do.
    failing = run_batch(config(*sets), str(data), tmp_path / "fail", llm=llm)
    assert (failing.rows_ok, failing.rows_failed) == (2, 2)
    assert "too long" in str(failing.failed) or "longer than" in str(failing.failed), failing.failed


@pytest.mark.engine
def test_truncate_keeps_the_head_the_tail_or_both_ends(llm, tmp_path):
    # A counting prompt: the model goes on from the last number it sees, so the answer shows which part was kept.
    counting = ", ".join(str(i) for i in range(1, 501)) + ","
    data = write_jsonl(tmp_path / "count.jsonl", [{"id": "count", "prompt": counting},
                                                  {"id": "short", "prompt": "1, 2, 3, 4,"}])
    first_number = {}
    for keep in ("head", "tail", "middle"):
        summary = run_batch(config("long.on_long=truncate", f"long.keep={keep}", "sampling.max_tokens=8"),
                            str(data), tmp_path / keep, llm=llm)
        assert summary.rows_ok == 2 and summary.long == {"truncated": 1}
        got = {r["id"]: r for r in pq.read_table(tmp_path / keep / "results").to_pylist()}
        assert got["count"]["truncated"] and got["count"]["dropped_tokens"] > 0
        assert got["count"]["prompt_tokens"] + 8 <= CONTEXT
        assert (got["short"]["truncated"], got["short"]["dropped_tokens"]) == (False, 0)
        first_number[keep] = int(re.search(r"\d+", got["count"]["generated_text"]).group())
    assert first_number["head"] < 200, first_number  # it went on from where the head was cut
    assert first_number["tail"] == 501 and first_number["middle"] == 501, first_number
    # Labeling takes truncate too: the label columns, and the truncation beside them.
    labeled = run_batch(config("long.on_long=truncate", 'label.choices=["numbers","words"]'), str(data),
                        tmp_path / "label", llm=llm)
    assert labeled.rows_ok == 2
    got = {r["id"]: r for r in pq.read_table(tmp_path / "label" / "results").to_pylist()}
    assert got["count"]["label"] in ("numbers", "words") and got["count"]["truncated"]
    assert got["count"]["dropped_tokens"] > 0 and not got["short"]["truncated"]


@pytest.mark.engine
def test_an_openai_chat_line_too_long_for_the_context_is_chunked(llm, tmp_path):
    def line(cid, text):
        return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "smollm2-135m", "max_tokens": 48,
                         "messages": [{"role": "user", "content": f"Summarize this report:\n\n{text}"}]}}

    data = write_jsonl(tmp_path / "requests.jsonl", [line("long", report(NAMES[2], 20)),
                                                      line("short", "Ostravin has a lighthouse.")])
    summary = run_batch(config("long.on_long=chunk"), str(data), tmp_path / "out", llm=llm)
    assert (summary.rows_ok, summary.rows_failed) == (2, 0)
    results = {r["custom_id"]: r for r in map(json.loads, (tmp_path / "out" / "output.jsonl").read_text().splitlines())}
    assert set(results) == {"long", "short"}
    body = results["long"]["response"]["body"]
    assert body["choices"][0]["message"]["content"].strip() and body["usage"]["prompt_tokens"] > CONTEXT
    table = {r["id"]: r for r in pq.read_table(tmp_path / "out" / "results").to_pylist()}
    assert table["long"]["chunks"] >= 3 and table["short"]["chunks"] == 1


@pytest.mark.engine
def test_kill_9_while_pieces_are_in_flight_then_rerun_gives_every_document_once(llm, tmp_path):
    docs = [{"id": f"d{i}", "text": report(NAMES[i], 20)} for i in range(8)]
    data = write_jsonl(tmp_path / "docs.jsonl", docs)
    out = tmp_path / "out"
    # Two sequences at a time, so that documents finish one after another: running all 8 at once, the engine
    # committed them within 0.1 s, and a busy machine (make test runs two modules) killed it after the last.
    cmd = [sys.executable, "-m", "llmops", "batch", str(data), "-o", str(out), "--on-long", "chunk",
           "--prompt-template", TEMPLATE, "--max-tokens", "32", "--set", "chunk_rows=1",
           *[arg for s in [*ENGINE, "engine.max_num_seqs=2"] for arg in ("--set", s)]]

    def shards() -> int:
        return len(list((out / "results").glob("*.parquet"))) if (out / "results").exists() else 0

    proc = kill_9_when(cmd, lambda: shards() >= 1)
    assert proc.returncode == -signal.SIGKILL and 1 <= shards() < len(docs), shards()
    # The rerun on the module's engine (the same job as the command line's; an engine start saved)
    summary = run_batch(config("long.on_long=chunk", f"input.prompt_template={json.dumps(TEMPLATE)}",
                               "sampling.max_tokens=32", "chunk_rows=1"), str(data), out, llm=llm)
    assert summary.rows_skipped >= 1 and summary.rows_ok == len(docs)
    got = pq.read_table(out / "results").sort_by("row").to_pylist()
    assert [r["id"] for r in got] == [d["id"] for d in docs]  # every document exactly once, in order
    for r, name in zip(got, NAMES):
        assert r["chunks"] >= 3 and r["generated_text"].strip()
        others = [n for n in NAMES if n != name and n in r["generated_text"]]
        assert not others, (r["id"], others, r["generated_text"])  # no other document's pieces in it
