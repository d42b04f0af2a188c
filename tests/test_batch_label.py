"""`llmops batch` for labeling (issue 21): --choices with a confidence per row, --json-schema with a typed
`parsed` column, --regex, --prompt-template, OpenAI `response_format` rows, refusals before any engine starts,
and kill -9 then rerun. The engine tests share one engine on the offline default model; the kill -9 test
runs the real CLI, as a user would."""

from __future__ import annotations

import json
import pickle
import re
import signal
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmops.batch import BatchConfig, plan_batch, run_batch
from llmops.batch.inputs import template_fields
from llmops.batch.label import Label, arrow_type, label_task, _arrow_value
from llmops.batch.config import LabelConfig, SamplingConfig
from llmops.config import load_config
from llmops.errors import UsageError
from tests.conftest import kill_9_when, run_cli
from tests.test_batch_engine import llm  # noqa: F401 (the module-scoped engine the engine tests share)
from tests.test_batch_trust import make_model, previous_run

SMALL_ENGINE = ["engine.cpu_kv_cache_gib=1", "engine.enforce_eager=true"]  # the same engine on every run
LABELS = ["positive", "negative", "neutral"]
TEMPLATE = "Classify the sentiment of this review as positive, negative or neutral.\nReview: {text}"

# Obvious cases, made up for this test: 50 reviews whose sentiment no reader would doubt.
_GOOD = ["I love it, absolutely wonderful", "Fantastic quality, best purchase I have made", "Excellent, it works "
         "perfectly and I am delighted", "Amazing! Five stars, highly recommended", "Superb service, very happy"]
_BAD = ["Terrible, it broke after one day, I hate it", "Awful quality, a complete waste of money", "The worst "
        "product ever, very disappointed", "Horrible, do not buy this, it is garbage", "Rude staff and awful food"]
_FLAT = ["The package arrived on Tuesday", "It is a blue box with a lid", "The manual has twelve pages",
         "I bought it in March", "It comes in two sizes"]


def reviews(n: int = 50) -> list[dict]:
    sets = [(_GOOD, "positive"), (_BAD, "negative"), (_FLAT, "neutral")]
    rows = []
    for i in range(n):
        texts, truth = sets[i % 3]
        rows.append({"id": f"r{i}", "text": texts[(i // 3) % len(texts)] + "." * (1 + i // 15), "truth": truth})
    return rows


# Obvious cases for the default model (135M parameters: its sentiment labels were right 56-62% of the time,
# and its confidence did not follow; on these words it is right about 60% of the time, more so when sure).
KINDS = {"animal": ["dog", "cat", "horse", "cow", "lion", "tiger", "elephant", "rabbit", "sheep", "wolf", "bear",
                    "mouse", "fox", "goat", "zebra", "monkey", "camel"],
         "fruit": ["apple", "banana", "orange", "grape", "mango", "pear", "cherry", "peach", "lemon", "strawberry",
                   "pineapple", "plum", "kiwi", "melon", "apricot", "lime", "coconut"],
         "vehicle": ["car", "bus", "truck", "bicycle", "motorcycle", "train", "airplane", "boat", "tractor",
                     "scooter", "van", "taxi", "ship", "helicopter", "tram", "jeep", "subway"]}
KIND_TEMPLATE = "Classify the word as animal, fruit or vehicle.\nWord: {text}"


def words(n: int = 50) -> list[dict]:
    kinds = list(KINDS)
    return [{"id": f"w{i}", "text": KINDS[kinds[i % 3]][i // 3], "truth": kinds[i % 3]} for i in range(n)]


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(*sets: str) -> BatchConfig:
    return load_config(BatchConfig, sets=[*SMALL_ENGINE, "sampling.max_tokens=48", *sets])


def labeled(*sets: str) -> BatchConfig:
    return config(f"label.choices={json.dumps(LABELS)}", f"input.prompt_template={json.dumps(TEMPLATE)}", *sets)


# --- unit: options, schemas, templates, identity --------------------------------------------------------


@pytest.mark.unit
def test_schema_maps_to_arrow_types_and_free_parts_stay_json():
    schema = {"type": "object", "properties": {
        "sentiment": {"enum": LABELS}, "score": {"type": "integer"}, "p": {"type": "number"},
        "ok": {"type": "boolean"}, "tags": {"type": "array", "items": {"type": "string"}},
        "who": {"type": "object", "properties": {"name": {"type": ["string", "null"]}}},
        "extra": {"anyOf": [{"type": "string"}, {"type": "integer"}]}}}
    kind = arrow_type(schema)
    assert kind == pa.struct([("sentiment", pa.string()), ("score", pa.int64()), ("p", pa.float64()),
                              ("ok", pa.bool_()), ("tags", pa.list_(pa.string())),
                              ("who", pa.struct([("name", pa.string())])), ("extra", pa.string())])
    value = _arrow_value(schema, {"sentiment": "positive", "score": 3, "p": 1, "ok": True, "tags": ["a"],
                                  "who": {"name": None}, "extra": 7, "unknown": 1})
    assert pa.array([value], kind).to_pylist()[0] == {"sentiment": "positive", "score": 3, "p": 1.0, "ok": True,
                                                      "tags": ["a"], "who": {"name": None}, "extra": "7"}


@pytest.mark.unit
def test_label_options_are_checked_all_at_once(tmp_path):
    assert label_task(LabelConfig(), SamplingConfig()) is None
    with pytest.raises(UsageError, match="empty label"):
        label_task(LabelConfig(choices=["a", ""]), SamplingConfig())
    (tmp_path / "labels.txt").write_text("spam\n\nham\n")
    task = label_task(LabelConfig(choices_file=str(tmp_path / "labels.txt")), SamplingConfig())
    assert task.choices == ["spam", "ham"] and task.identity() == {"name": "label", "choices": ["spam", "ham"]}
    (tmp_path / "bad.json").write_text('{"type": "objekt"}')
    with pytest.raises(UsageError) as e:
        label_task(LabelConfig(choices=["a", "a"], json_schema=str(tmp_path / "bad.json"), regex="(["),
                   SamplingConfig())
    for needle in ("more than once", "Can't provide both `--choices` and `--json-schema` and `--regex`",
                   "bad.json is not valid JSON Schema", "--regex '([' is not a pattern"):
        assert needle in str(e.value)
    # A task travels pickled to worker processes and Ray replicas.
    assert pickle.loads(pickle.dumps(task)).identity() == task.identity()


@pytest.mark.unit
def test_a_schema_xgrammar_cannot_compile_is_refused(tmp_path):
    (tmp_path / "ref.json").write_text(json.dumps({"type": "object", "properties": {"a": {"$ref": "#/nope"}}}))
    with pytest.raises(UsageError, match="xgrammar.*cannot compile it"):
        label_task(LabelConfig(json_schema=str(tmp_path / "ref.json")), SamplingConfig())


@pytest.mark.unit
def test_template_fields():
    assert template_fields("Review: {text} ({stars} stars) {text}") == ["text", "stars"]
    for bad in ("no field", "{0}", "{text!r}", "{a.b}"):
        with pytest.raises(ValueError):
            template_fields(bad)


@pytest.fixture()
def env(tmp_path, llmops_home):
    from llmops.hardware import detect

    hw = tmp_path / "hw.json"
    hw.write_text(json.dumps(detect().to_dict()))
    return {"LLMOPS_HARDWARE": str(hw), "LLMOPS_HOME": str(llmops_home)}


@pytest.mark.unit
def test_cli_refusals_exit_2_before_any_engine_starts(tmp_path, env):
    model = make_model(tmp_path / "model")
    data = write_parquet(tmp_path / "reviews.parquet", reviews(6))
    (tmp_path / "schema.json").write_text('{"type": "object", "properties": {"a": {"type": "strng"}}}')
    cases = [(["--choices", ""], "empty label"),
             (["--choices", "a,b", "--prompt-template", "Review: {body}"],
              "--prompt-template names 'body', which reviews.parquet does not have (columns: id, text, truth)"),
             (["--json-schema", str(tmp_path / "schema.json")], "schema.json is not valid JSON Schema"),
             (["--regex", "(["], "--regex '([' is not a pattern xgrammar can compile")]
    for args, needle in cases:
        proc = run_cli("batch", str(data), "-o", str(tmp_path / "out"), "--model", str(model), *args, env=env,
                       timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not (tmp_path / "out").exists()  # refused before anything was written or started


@pytest.mark.unit
def test_a_resume_that_changes_the_labels_or_the_template_is_refused(tmp_path, env, monkeypatch):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    model = make_model(tmp_path / "model")
    data = write_parquet(tmp_path / "reviews.parquet", reviews(4))
    base = [f"model={model}", "chunk_rows=2", f"input.prompt_template={json.dumps(TEMPLATE)}"]
    previous_run(load_config(BatchConfig, sets=[*base, 'label.choices=["yes","no"]']), data, tmp_path / "out")
    with pytest.raises(UsageError, match=r"--choices changed: \['yes', 'no'\] -> \['yes', 'no', 'maybe'\]"):
        plan_batch(load_config(BatchConfig, sets=[*base, 'label.choices=["yes","no","maybe"]']), str(data),
                   tmp_path / "out")
    with pytest.raises(UsageError, match="input.prompt_template: .* -> 'Say: {text}'"):
        plan_batch(load_config(BatchConfig, sets=[*base[:2], 'input.prompt_template="Say: {text}"',
                                                  'label.choices=["yes","no"]']), str(data), tmp_path / "out")
    with pytest.raises(UsageError, match="task changed: 'label' -> 'generate'"):
        plan_batch(load_config(BatchConfig, sets=base), str(data), tmp_path / "out")


# --- engine: one shared engine ---------------------------------------------------------------------------


@pytest.mark.engine
def test_choices_give_a_label_confidence_and_probabilities_and_confidence_means_something(llm, tmp_path):  # noqa: F811
    rows = words(50)
    data = write_parquet(tmp_path / "words.parquet", rows)
    kinds = list(KINDS)
    summary = run_batch(config(f"label.choices={json.dumps(kinds)}",
                               f"input.prompt_template={json.dumps(KIND_TEMPLATE)}"), str(data), tmp_path / "out",
                        llm=llm)
    assert (summary.rows_ok, summary.rows_failed) == (50, 0)
    table = pq.read_table(tmp_path / "out" / "results").sort_by("row")
    assert table.schema.field("label_probs").type == pa.struct([(c, pa.float64()) for c in kinds])
    got = table.to_pylist()
    assert [r["id"] for r in got] == [r["id"] for r in rows]
    for r in got:
        assert r["label"] in kinds
        assert 0 < r["confidence"] <= 1 and r["confidence"] == r["label_probs"][r["label"]]
        assert abs(sum(r["label_probs"].values()) - 1) < 1e-3
    # High-confidence rows are right more often than low-confidence ones.
    ranked = sorted(got, key=lambda r: -r["confidence"])
    right = [r["label"] == r["truth"] for r in ranked]
    high, low = right[:25], right[25:]
    assert sum(high) > sum(low), (sum(high), sum(low), [(r["label"], r["truth"], round(r["confidence"], 3))
                                                        for r in ranked])


@pytest.mark.engine
def test_json_schema_rows_validate_with_a_typed_parsed_column_and_a_cut_answer_fails_alone(llm, tmp_path):  # noqa: F811
    import jsonschema

    schema = {"type": "object", "properties": {"sentiment": {"enum": LABELS},
                                               "stars": {"type": "integer", "minimum": 1, "maximum": 5}},
              "required": ["sentiment", "stars"], "additionalProperties": False}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    data = write_parquet(tmp_path / "reviews.parquet", reviews(8))
    template = "Rate this review as JSON with its sentiment and 1-5 stars.\nReview: {text}"
    sets = [f"label.json_schema={tmp_path / 'schema.json'}", f"input.prompt_template={json.dumps(template)}"]
    summary = run_batch(config(*sets), str(data), tmp_path / "out", llm=llm)
    assert (summary.rows_ok, summary.rows_failed) == (8, 0)
    table = pq.read_table(tmp_path / "out" / "results")
    assert table.schema.field("parsed").type == pa.struct([("sentiment", pa.string()), ("stars", pa.int64())])
    frame = table.to_pandas()
    for text, parsed in zip(frame["generated_text"], frame["parsed"]):
        jsonschema.validate(json.loads(text), schema)
        assert parsed == json.loads(text)
    # max_tokens cuts every answer inside its object: each row fails, never half a JSON
    run_batch(config(*sets, "sampling.max_tokens=3"), str(data), tmp_path / "cut", llm=llm)
    for r in pq.read_table(tmp_path / "cut" / "results").to_pylist():
        assert r["parsed"] is None and r["finish_reason"] == "length"
        assert "not complete JSON: max_tokens cut it after 3 tokens" in r["error"]


@pytest.mark.engine
def test_regex_answers_match(llm, tmp_path):  # noqa: F811
    data = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"Write the date of day {d} of March 2024 as YYYY-MM-DD:"}
                                               for d in (1, 9, 17)])
    summary = run_batch(config(r"label.regex=2024-03-[0-3][0-9]"), str(data), tmp_path / "out", llm=llm)
    assert summary.rows_ok == 3
    for text in pq.read_table(tmp_path / "out" / "results").column("generated_text").to_pylist():
        assert re.fullmatch(r"2024-03-[0-3][0-9]", text), text


@pytest.mark.engine
def test_openai_batch_mixes_plain_and_response_format_rows(llm, tmp_path):  # noqa: F811
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    ask = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]

    def line(cid, **body):
        return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "smollm2-135m", "messages": ask, "max_tokens": 32, **body}}

    data = write_jsonl(tmp_path / "requests.jsonl", [
        line("plain"),
        line("schema", response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}),
        line("object", response_format={"type": "json_object"}),
        line("cut", response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
             max_tokens=2),
        line("bad", response_format={"type": "xml"})])
    summary = run_batch(config(), str(data), tmp_path / "out", llm=llm)
    assert (summary.rows_ok, summary.rows_failed) == (3, 2)
    results = {r["custom_id"]: r for r in map(json.loads, (tmp_path / "out" / "output.jsonl").read_text().splitlines())}
    errors = {r["custom_id"]: r for r in map(json.loads, (tmp_path / "out" / "errors.jsonl").read_text().splitlines())}
    assert set(results) == {"plain", "schema", "object"} and set(errors) == {"cut", "bad"}
    content = {cid: r["response"]["body"]["choices"][0]["message"]["content"] for cid, r in results.items()}
    assert isinstance(json.loads(content["schema"])["city"], str)
    assert isinstance(json.loads(content["object"]), dict)
    assert "finish_reason length" in errors["cut"]["response"]["body"]["error"]["message"]
    assert "response_format.type must be" in errors["bad"]["response"]["body"]["error"]["message"]


@pytest.mark.engine
def test_kill_9_mid_job_then_rerun_gives_every_id_once_with_the_labels_of_a_whole_run(llm, tmp_path):  # noqa: F811
    rows = reviews(240)
    data = write_parquet(tmp_path / "reviews.parquet", rows)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "llmops", "batch", str(data), "-o", str(out), "--choices", ",".join(LABELS),
           "--prompt-template", TEMPLATE, "--set", "chunk_rows=20", "--set", "engine.cpu_kv_cache_gib=1"]

    def shards() -> int:
        return len(list((out / "results").glob("*.parquet"))) if (out / "results").exists() else 0

    proc = kill_9_when(cmd, lambda: shards() >= 2)
    assert proc.returncode == -signal.SIGKILL and 2 <= shards() < 12, shards()
    # The rerun on the module's engine (the same job as the command line's; an engine start saved)
    summary = run_batch(labeled("chunk_rows=20", "sampling.max_tokens=256"), str(data), out, llm=llm)  # the CLI's
    assert summary.rows_skipped >= 40 and summary.rows_ok == 240
    got = pq.read_table(out / "results").sort_by("row")
    assert got.column("id").to_pylist() == [r["id"] for r in rows]  # every id exactly once, in order

    run_batch(labeled("chunk_rows=20"), str(data), tmp_path / "whole", llm=llm)
    whole = pq.read_table(tmp_path / "whole" / "results").sort_by("row")
    assert got.column("label").to_pylist() == whole.column("label").to_pylist()


@pytest.mark.engine
def test_two_worker_processes_share_a_labeling_job(llm, tmp_path, monkeypatch):  # noqa: F811
    # No GPUs here: plan two engines on the CPU to run the real coordinator and worker processes, which get
    # the task pickled (Ray replicas get the same EngineWork).
    import dataclasses

    import llmops.vllm_engine

    plan_for = llmops.vllm_engine.plan_for
    monkeypatch.setattr(llmops.vllm_engine, "plan_for",
                        lambda *a, **k: dataclasses.replace(plan_for(*a, **k), data_parallel_size=2))
    data = write_parquet(tmp_path / "words.parquet", words(40))
    sets = [f"label.choices={json.dumps(list(KINDS))}", f"input.prompt_template={json.dumps(KIND_TEMPLATE)}",
            "chunk_rows=10"]
    summary = run_batch(config(*sets), str(data), tmp_path / "out")
    assert (summary.engines, summary.rows_ok, summary.rows_failed) == (2, 40, 0)
    writers = sorted({pq.read_schema(s).metadata[b"llmops.writer"].decode().split(" (")[0]
                      for s in (tmp_path / "out").glob("results/*.parquet")})
    assert writers == ["worker 0", "worker 1"]
    monkeypatch.undo()
    run_batch(config(*sets), str(data), tmp_path / "here", llm=llm)
    got, here = (pq.read_table(tmp_path / d / "results").sort_by("row") for d in ("out", "here"))
    assert got.column("id").to_pylist() == [f"w{i}" for i in range(40)]
    assert got.column("label").to_pylist() == here.column("label").to_pylist()
