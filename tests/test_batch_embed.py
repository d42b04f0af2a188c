"""`llmops batch --task embed` on real vLLM (the pooling runner) with the offline default embedding model,
all-MiniLM-L6-v2: vectors checked against sentence-transformers, failed rows, long inputs, OpenAI Batch lines,
identity, and exactly-once resume after kill -9 of the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmops.batch import BatchConfig, load_engine, plan_batch, run_batch
from llmops.batch.engine import close_engine
from llmops.config import load_config
from tests.conftest import run_cli

pytestmark = pytest.mark.engine

MODEL = "all-minilm-l6-v2"
TOPICS = ["the weather", "a football match", "cooking pasta", "the stock market", "a new phone", "gardening",
          "a train journey", "learning French", "a birthday party", "the night sky", "a broken bicycle",
          "painting a room"]
# (query, its paraphrase) pairs for the nearest-neighbour check; the rest of the set is distractors.
PARAPHRASES = [("How do I cook spaghetti?", "What is the way to prepare pasta?"),
               ("The stock market fell sharply today.", "Share prices dropped a lot this afternoon."),
               ("My bike has a flat tyre.", "The tire on my bicycle is punctured."),
               ("Where can I see the stars tonight?", "Best places for stargazing this evening?"),
               ("I am learning to speak French.", "I'm studying the French language.")]


def config(*sets: str) -> BatchConfig:
    return load_config(BatchConfig, sets=[f"model={MODEL}", "engine.cpu_kv_cache_gib=1", *sets])


def texts(n: int) -> list[str]:
    """Short and mixed-length texts, a few of them long."""
    found = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        words = f"This is note {i} about {topic}. " * (1 + (i * 7) % 9)
        found.append(words.strip())
    return found


def write_parquet(path, rows: list[dict]):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def vectors(out) -> tuple[list[str], np.ndarray, pa.Table]:
    table = pq.read_table(out / "results").sort_by("row")
    ok = table.filter(pa.compute.is_null(table.column("error")))
    return ok.column("id").to_pylist(), np.array(ok.column("embedding").to_pylist(), dtype=np.float32), table


@pytest.fixture(scope="module")
def llm(default_embed_model_dir, tmp_path_factory):
    probe = write_parquet(tmp_path_factory.mktemp("probe") / "p.parquet", [{"text": "x"}])
    job = plan_batch(config(), str(probe), tmp_path_factory.mktemp("probe-out"))
    assert job.task.name == "embed"  # the registry records all-minilm-l6-v2 as an embedding model
    engine = load_engine(job.engine)
    yield engine
    close_engine(engine)


@pytest.fixture(scope="module")
def reference(default_embed_model_dir):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(default_embed_model_dir), device="cpu")
    return lambda items: model.encode(items, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)


def test_vectors_match_sentence_transformers_and_find_paraphrases(llm, reference, tmp_path):
    corpus = texts(300) + [t for pair in PARAPHRASES for t in pair]
    path = write_parquet(tmp_path / "docs.parquet", [{"id": f"d{i}", "text": t, "source": "test"}
                                                     for i, t in enumerate(corpus)])
    summary = run_batch(config("chunk_rows=128"), str(path), tmp_path / "out", llm=llm)
    assert (summary.rows_ok, summary.rows_failed) == (len(corpus), 0)
    ids, got, table = vectors(tmp_path / "out")
    assert ids == [f"d{i}" for i in range(len(corpus))]
    assert table.column("source").to_pylist() == ["test"] * len(corpus)  # the input's columns are kept
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 384)
    assert not any(table.column("truncated").to_pylist())
    expected = reference(corpus)
    cosine = np.sum(got * expected, axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosine.min() >= 0.999, (cosine.argmin(), cosine.min())
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)  # output.normalize defaults to true

    # Each query's nearest neighbour (besides itself) is its paraphrase.
    start = 300
    for n, _ in enumerate(PARAPHRASES):
        query, paraphrase = start + 2 * n, start + 2 * n + 1
        scores = got @ got[query]
        scores[query] = -1
        assert scores.argmax() == paraphrase, (PARAPHRASES[n], corpus[scores.argmax()])


def test_bad_rows_fail_alone_and_long_texts_are_flagged_never_cut_silently(llm, tmp_path):
    long_text = "word " * 600  # MiniLM's window is 256 word pieces
    rows = [{"prompt": "a fine sentence"}, {"prompt": ""}, {"prompt": 42}, {"messages": [{"role": "user", "content": "hi"}]},
            {"prompt": long_text}]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run_batch(config("task=embed"), str(path), tmp_path / "out", llm=llm)
    assert (summary.rows_ok, summary.rows_failed) == (2, 3)
    table = pq.read_table(tmp_path / "out" / "results").sort_by("row")
    errors = table.column("error").to_pylist()
    assert errors[0] is None and errors[4] is None
    assert errors[1] == "empty prompt" and "must be a string" in errors[2] and "chat messages" in errors[3]
    assert table.column("truncated").to_pylist() == [False, None, None, None, True]
    assert table.column("embedding")[1].as_py() is None

    failing = run_batch(config("task=embed", "output.on_long=fail"), str(path), tmp_path / "out-fail", llm=llm)
    assert failing.rows_failed == 4
    error = pq.read_table(tmp_path / "out-fail" / "results").sort_by("row").column("error")[4].as_py()
    assert "longer than the model's window of 256" in error and "output.on_long" in error


def test_openai_embeddings_lines_give_openai_shaped_results(llm, tmp_path):
    lines = [{"custom_id": "one", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": MODEL, "input": "The cat sat on the mat."}},
             {"custom_id": "two", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": MODEL, "input": ["First text.", "Second text."]}},
             {"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}}]
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary = run_batch(config(), str(path), tmp_path / "out", llm=llm)
    assert (summary.rows_ok, summary.rows_failed) == (2, 1)
    results = [json.loads(line) for line in (tmp_path / "out" / "output.jsonl").read_text().splitlines()]
    assert [r["custom_id"] for r in results] == ["one", "two"]
    assert set(results[0]) == {"id", "custom_id", "response", "error"}  # vLLM run-batch's line keys
    body = results[1]["response"]["body"]
    assert results[1]["response"]["status_code"] == 200 and body["object"] == "list"
    assert [d["index"] for d in body["data"]] == [0, 1] and len(body["data"][0]["embedding"]) == 384
    assert body["usage"]["prompt_tokens"] > 0
    errors = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert errors[0]["custom_id"] == "bad" and "url must be one of /v1/embeddings" in \
        errors[0]["response"]["body"]["error"]["message"]


def test_on_long_chunk_mean_pools_the_pieces_so_the_whole_text_counts(llm, tmp_path):
    pasta = "Boil the pasta in salted water, stir it, and drain it when it is soft. "
    stocks = "Share prices on the stock market fell sharply as investors sold their bonds. "
    long_text = pasta * 20 + stocks * 20  # ~640 word pieces: the window (256) holds only the pasta half
    path = write_parquet(tmp_path / "docs.parquet", [{"id": "long", "text": long_text}, {"id": "pasta", "text": pasta},
                                                     {"id": "stocks", "text": stocks}])
    found = {}
    for mode in ("truncate", "chunk"):
        summary = run_batch(config(f"long.on_long={mode}"), str(path), tmp_path / mode, llm=llm)
        assert summary.rows_ok == 3
        ids, got, table = vectors(tmp_path / mode)
        found[mode] = dict(zip(ids, got))
        assert table.column("truncated").to_pylist() == [mode == "truncate", False, False]
    chunks = pq.read_table(tmp_path / "chunk" / "results").sort_by("row").column("chunks").to_pylist()
    assert chunks[0] >= 3 and chunks[1:] == [1, 1]
    chunked, truncated = found["chunk"]["long"], found["truncate"]["long"]
    assert abs(np.linalg.norm(chunked) - 1) < 1e-3  # pooled, then normalized
    stocks_vec, pasta_vec = found["chunk"]["stocks"], found["chunk"]["pasta"]
    # The truncated vector saw only the pasta; the pooled one sees both halves.
    assert chunked @ stocks_vec > truncated @ stocks_vec + 0.1, (chunked @ stocks_vec, truncated @ stocks_vec)
    assert chunked @ pasta_vec > 0.4 and np.allclose(found["chunk"]["pasta"], found["truncate"]["pasta"], atol=1e-4)


def test_float16_storage_and_a_changed_option_is_refused_on_resume(llm, tmp_path):
    path = write_parquet(tmp_path / "docs.parquet", [{"text": t} for t in texts(20)])
    run_batch(config("output.dtype=float16"), str(path), tmp_path / "out", llm=llm)
    table = pq.read_table(tmp_path / "out" / "results")
    assert table.schema.field("embedding").type == pa.list_(pa.float16(), 384)
    from llmops.errors import UsageError

    with pytest.raises(UsageError, match="output.normalize changed: True -> False"):
        plan_batch(config("output.dtype=float16", "output.normalize=false"), str(path), tmp_path / "out")


def test_cli_refusals_exit_2_saying_what_to_do(default_embed_model_dir, default_model_dir, tmp_path):
    path = write_parquet(tmp_path / "docs.parquet", [{"text": "hello"}])
    generative = run_cli("batch", str(path), "-o", str(tmp_path / "o1"), "--task", "embed", "--dry-run")
    assert generative.returncode == 2, generative.stderr
    assert "engine.convert=embed" in generative.stderr
    matryoshka = run_cli("batch", str(path), "-o", str(tmp_path / "o2"), "--model", MODEL,
                         "--set", "output.dimensions=128", "--dry-run")
    assert matryoshka.returncode == 2 and "not a Matryoshka model" in matryoshka.stderr
    plan = run_cli("batch", str(path), "-o", str(tmp_path / "o3"), "--model", MODEL, "--dry-run", "--json")
    assert plan.returncode == 0, plan.stderr
    planned = json.loads(plan.stdout)
    assert planned["task"] == "embed" and planned["engines"][0]["llm_args"]["runner"] == "pooling"


def test_sigterm_and_kill_9_mid_job_then_rerun_gives_every_id_once_with_the_same_vectors(default_embed_model_dir, llm,
                                                                                          tmp_path):
    rows = [{"id": f"k{i}", "text": t} for i, t in enumerate(texts(2000))]
    path = write_parquet(tmp_path / "docs.parquet", rows)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "llmops", "batch", str(path), "-o", str(out), "--model", MODEL,
           "--set", "chunk_rows=100", "--set", "engine.cpu_kv_cache_gib=1"]

    def shards() -> int:
        return len(list((out / "results").glob("*.parquet"))) if (out / "results").exists() else 0

    def run_until(more: int, sig: int) -> tuple[subprocess.Popen, str]:
        before = shards()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and shards() < before + more:
                assert proc.poll() is None, proc.stderr.read()
                time.sleep(0.05)
            os.kill(proc.pid, sig)
            _, stderr = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return proc, stderr

    # A preempted machine: SIGTERM commits what finished and exits 75.
    stopped, stderr = run_until(2, signal.SIGTERM)
    assert stopped.returncode == 75, stderr[-2000:]
    assert "stopped by SIGTERM" in stderr
    after_stop = shards()
    # A crash: kill -9 mid-job.
    killed, _ = run_until(2, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    committed = shards()
    assert after_stop < committed < 20, (after_stop, committed)  # both stopped mid-job
    # The rerun on the module's engine (the same job as the command line's; an engine start saved)
    summary = run_batch(config("chunk_rows=100"), str(path), out, llm=llm)
    assert summary.rows_skipped >= 200 and summary.rows_ok == 2000
    ids, got, _ = vectors(out)
    assert ids == [f"k{i}" for i in range(2000)]  # every id exactly once, in order

    whole = tmp_path / "whole"
    run_batch(config("chunk_rows=100"), str(path), whole, llm=llm)
    _, expected, _ = vectors(whole)
    cosine = np.sum(got * expected, axis=1)
    assert cosine.min() > 0.9999, cosine.min()


def test_two_worker_processes_share_an_embedding_job(default_embed_model_dir, llm, tmp_path, monkeypatch):
    # No GPUs here: plan two engines on the CPU to run the real coordinator and worker processes.
    import dataclasses

    import llmops.vllm_engine

    plan_for = llmops.vllm_engine.plan_for
    monkeypatch.setattr(llmops.vllm_engine, "plan_for",
                        lambda *a, **k: dataclasses.replace(plan_for(*a, **k), data_parallel_size=2))
    path = write_parquet(tmp_path / "docs.parquet", [{"id": f"w{i}", "text": t} for i, t in enumerate(texts(40))])
    summary = run_batch(config("chunk_rows=10"), str(path), tmp_path / "out")
    assert (summary.engines, summary.rows_ok, summary.rows_failed) == (2, 40, 0)
    ids, got, _ = vectors(tmp_path / "out")
    assert ids == [f"w{i}" for i in range(40)]
    writers = sorted({pq.read_schema(s).metadata[b"llmops.writer"].decode().split(" (")[0]
                      for s in (tmp_path / "out").glob("results/*.parquet")})
    assert writers == ["worker 0", "worker 1"]
    monkeypatch.undo()
    run_batch(config("chunk_rows=10"), str(path), tmp_path / "here", llm=llm)
    _, expected, _ = vectors(tmp_path / "here")
    assert np.sum(got * expected, axis=1).min() > 0.9999
