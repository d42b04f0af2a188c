"""`llmops batch` on real vLLM with the offline default model (CPU). One engine is shared by the in-process
tests; the CLI tests (a normal run, a kill -9 and resume) start their own, as a user would."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmops.batch import BatchConfig, load_engine, plan_batch, run_batch
from llmops.batch.engine import close_engine
from llmops.batch.worker import run_worker
from llmops.config import load_config
from llmops.errors import StorageError
from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.engine

# The auto plan reserves up to 8 GiB of KV cache, and compiles or not by what the compile cache holds: both
# are set, so every run of the suite runs the same engine.
SMALL_ENGINE = ["engine.cpu_kv_cache_gib=1", "engine.enforce_eager=true"]
PARIS_CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def config(*sets: str) -> BatchConfig:
    return load_config(BatchConfig, sets=[*SMALL_ENGINE, "sampling.max_tokens=16", *sets])


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_results(out_dir):
    return pq.read_table(out_dir / "results").sort_by("row")


@pytest.fixture(scope="module")
def llm(default_model_dir, tmp_path_factory):
    probe = write_jsonl(tmp_path_factory.mktemp("probe") / "p.jsonl", [{"prompt": "x"}])
    # In this process, as the CPU plan runs it (explicit: a larger machine's plan keeps vLLM's processes)
    job = plan_batch(config("engine.in_process=true"), str(probe), tmp_path_factory.mktemp("probe-out"))
    engine = load_engine(job.engine)
    yield engine
    close_engine(engine)


def test_jsonl_prompts_and_chats_with_bad_rows(llm, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [
        {"id": "paris", "messages": PARIS_CHAT},
        {"prompt": "The capital of France is", "topic": "geo"},
        {"prompt": ""},
        "{broken",
        {"prompt": "word " * 9000},  # longer than the model's 8192-token context
    ])
    summary = run_batch(config(), str(path), tmp_path / "out", llm=llm)
    assert (summary.rows_total, summary.rows_ok, summary.rows_failed) == (5, 2, 3)
    assert summary.completion_tokens > 0 and summary.prompt_tokens > 0
    table = read_results(tmp_path / "out")
    assert table.column_names == ["row", "id", "prompt", "messages", "metadata", "generated_text",
                                  "finish_reason", "prompt_tokens", "completion_tokens", "error"]
    assert table.schema.field("completion_tokens").type == pa.int32()
    rows = table.to_pylist()
    assert rows[0]["id"] == "paris" and "Paris" in rows[0]["generated_text"]
    assert rows[0]["finish_reason"] in ("stop", "length") and rows[0]["error"] is None
    assert json.loads(rows[1]["metadata"]) == {"topic": "geo"} and rows[1]["generated_text"]
    assert rows[2]["error"] == "empty prompt"
    assert "line 4: not valid JSON" in rows[3]["error"]
    assert "maximum" in rows[4]["error"] and "8192" in rows[4]["error"] and rows[4]["generated_text"] is None
    assert [f["row"] for f in summary.failed] == [2, 3, 4]
    resolved = load_config(BatchConfig, yaml_path=tmp_path / "out" / "config.yaml")
    assert resolved.engine.dtype in ("float32", "bfloat16") and resolved.sampling.max_tokens == 16
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["status"] == "complete"


def test_openai_batch_requests_with_per_row_overrides(llm, tmp_path):
    chat = {"method": "POST", "url": "/v1/chat/completions", "body": {"model": "x", "messages": PARIS_CHAT}}
    path = write_jsonl(tmp_path / "batch.jsonl", [
        {**chat, "custom_id": "r1", "body": {**chat["body"], "max_tokens": 32}},
        {"custom_id": "r2", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "One, two, three, four,", "max_tokens": 3}},
        {**chat, "custom_id": "r3", "body": {**chat["body"], "temperature": -1}},
        {**chat, "custom_id": "r4", "body": {**chat["body"], "logprobs": True}},
        {**chat, "custom_id": "r5", "url": "/v1/embeddings"},
    ])
    summary = run_batch(config(), str(path), tmp_path / "out", llm=llm)
    assert (summary.rows_ok, summary.rows_failed) == (2, 3)
    ok = [json.loads(line) for line in (tmp_path / "out" / "output.jsonl").read_text().splitlines()]
    errors = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert [r["custom_id"] for r in ok] == ["r1", "r2"]
    assert [r["custom_id"] for r in errors] == ["r3", "r4", "r5"]
    body = ok[0]["response"]["body"]
    assert ok[0]["response"]["status_code"] == 200 and ok[0]["error"] is None
    assert body["object"] == "chat.completion" and "Paris" in body["choices"][0]["message"]["content"]
    completion = ok[1]["response"]["body"]
    assert completion["object"] == "text_completion" and completion["usage"]["completion_tokens"] == 3
    assert completion["choices"][0]["finish_reason"] == "length"  # the row's max_tokens beat the job's 16
    messages = [e["response"]["body"]["error"]["message"] for e in errors]
    assert "temperature must be non-negative" in messages[0]
    assert "unsupported body field `logprobs`" in messages[1]
    assert "url must be one of" in messages[2]
    assert {e["response"]["status_code"] for e in errors} == {400}


def test_parquet_shards_keep_columns_resume_exactly_and_split_over_workers(llm, tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    for i in range(2):
        pq.write_table(pa.table({"qid": [f"q{i}{j}" for j in range(5)], "score": [j * 1.5 for j in range(5)],
                                 "text": [f"Give me a word that rhymes with {w}." for w in
                                          ("cat", "dog", "sun", "tree", "blue")]}), folder / f"{i}.parquet")
    cfg = config("chunk_rows=2", "input.id_column=qid")
    out = tmp_path / "out"
    first = run_batch(cfg, str(folder), out, llm=llm)
    assert (first.rows_total, first.rows_ok) == (10, 10)
    table = read_results(out)
    assert table.column_names[:5] == ["row", "id", "qid", "score", "text"]
    assert table.schema.field("score").type == pa.float64()
    assert table.column("row").to_pylist() == list(range(10))
    assert table.column("id").to_pylist() == [f"q{i}{j}" for i in range(2) for j in range(5)]
    shards = sorted(out.glob("results/*.parquet"))
    assert len(shards) == 6  # 3 units of at most 2 rows per file

    # Lose two shards that the manifest lists as done: the shards are the truth, so the rerun redoes
    # exactly those and leaves the rest alone.
    kept = {s: s.stat().st_mtime_ns for s in shards[1:5]}
    for s in (shards[0], shards[5]):
        s.unlink()
    resumed = run_batch(cfg, str(folder), out, llm=llm)
    assert (resumed.rows_skipped, resumed.rows_ok) == (7, 10)  # 2 + 1 rows were lost
    assert all(s.stat().st_mtime_ns == t for s, t in kept.items())
    again = read_results(out)
    assert again.column("row").to_pylist() == list(range(10))
    assert again.column("generated_text") == table.column("generated_text")  # greedy: the same text

    # Two data-parallel workers share the pending units: together they do each exactly once.
    for s in out.glob("results/*.parquet"):
        s.unlink()
    work = plan_batch(cfg, str(folder), out).work()
    assert run_worker(work, 0, 2, llm=llm) == 3 and run_worker(work, 1, 2, llm=llm) == 3
    final = run_batch(cfg, str(folder), out, llm=llm)
    assert (final.rows_skipped, final.rows_ok, final.generation_s) == (10, 10, 0.0)
    assert read_results(out).column("row").to_pylist() == list(range(10))


def test_arrow_messages_column(llm, tmp_path):
    table = pa.table({"messages": [PARIS_CHAT, [{"role": "user", "content": "Say hello."}]], "lang": ["en", "en"]})
    with pa.ipc.new_file(tmp_path / "chats.arrow", table.schema) as writer:
        writer.write_table(table)
    summary = run_batch(config(), str(tmp_path / "chats.arrow"), tmp_path / "out", llm=llm)
    rows = read_results(tmp_path / "out").to_pylist()
    assert summary.rows_ok == 2 and "Paris" in rows[0]["generated_text"]
    assert rows[0]["messages"] == PARIS_CHAT and rows[1]["lang"] == "en" and rows[1]["id"] == "1"


# --- the command, end to end --------------------------------------------------------------------------


def test_cli_json_summary_show_and_exit_1_for_a_failed_row(tmp_path, default_model_dir):
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": "fr", "messages": PARIS_CHAT}, {"id": "empty", "prompt": " "},
                                              {"prompt": "Name a color."}])
    proc = run_cli("batch", str(path), "-o", str(tmp_path / "out"), "--json", "--show", "2", "--max-tokens", "16",
                   *(a for s in SMALL_ENGINE for a in ("--set", s)))
    assert proc.returncode == 1, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)  # vLLM's logs stay off stdout
    assert (summary["rows_ok"], summary["rows_failed"]) == (2, 1)
    assert summary["output_tokens_per_s"] > 0 and summary["completion_tokens"] > 0
    assert summary["examples"][0]["id"] == "fr" and "Paris" in summary["examples"][0]["completion"]
    assert summary["examples"][1]["error"] == "empty prompt"
    assert "1 of 3 rows failed" in proc.stderr and "row 1 (empty): empty prompt" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_kill_9_mid_job_then_resume_gives_every_row_exactly_once(tmp_path, llm):
    # Beyond what the engine runs at once (max_num_seqs 256): the units of the first 256 rows commit together,
    # and the kill lands before the rest have run (fewer rows than the 600 this had: a shorter rerun).
    rows = 320
    # A prompt whose answer can be checked against its row: the model goes on counting (595 of 600 rows
    # continued with i + 3 here), so a row that got another row's text would show it.
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"Count on: {i}, {i + 1}, {i + 2},"} for i in range(rows)])
    out = tmp_path / "out"
    args = ["batch", str(path), "-o", str(out), "--max-tokens", "24", "--set", "chunk_rows=20",
            *(a for s in SMALL_ENGINE for a in ("--set", s))]
    proc = subprocess.Popen([sys.executable, "-m", "llmops", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, cwd=REPO)
    try:
        deadline = time.monotonic() + 600
        while not list(out.glob("results/*.parquet")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole job, engine included, as a power cut would
        proc.wait()
    before = {s.name: s.stat().st_mtime_ns for s in out.glob("results/*.parquet")}
    assert 0 < len(before) < rows // 20, "the kill must land mid-job"

    # The rerun on the module's engine (the same job as the command line's; an engine start saved)
    summary = run_batch(config("sampling.max_tokens=24", "chunk_rows=20"), str(path), out, llm=llm)
    assert summary.rows_ok == rows and summary.rows_skipped == 20 * len(before)
    table = read_results(out)
    assert table.column("row").to_pylist() == list(range(rows))  # none lost, none twice
    assert table.column("error").null_count == rows and table.column("generated_text").null_count == 0
    texts = table.column("generated_text").to_pylist()
    counted_on = [i for i, text in enumerate(texts) if str(i + 3) in text]
    assert len(counted_on) >= 0.95 * rows, [(i, t) for i, t in enumerate(texts) if i not in set(counted_on)][:10]
    after = {s.name: s.stat().st_mtime_ns for s in out.glob("results/*.parquet")}
    assert all(after[name] == t for name, t in before.items())  # committed work was not redone
    assert not list(out.glob("results/*.tmp"))


def test_a_second_engine_beside_an_in_process_one_runs_in_vllms_processes_and_is_closed_before_exit(
        tmp_path, llm, monkeypatch):
    # 1. Left to vLLM's exit handler, the engine client's output thread could still be freeing tensors while
    # Python finalized, and the process aborted after a finished job ("terminate called without an active
    # exception", exit -6; CI, 1 run in 5 of an embedding job here).
    # 2. The module's engine runs in this process (the CPU plan), and so would the job's own: the second one
    # read the first one's cached vLLM environment, and closing it tore down the distributed state under the
    # first ("pipeline model parallel group is not initialized" in every later test of the module).
    import threading

    import llmops.batch.engine

    def output_threads() -> set[int]:
        return {t.ident for t in threading.enumerate() if t.name == "EngineCoreOutputQueueThread"}

    real_start, started = llmops.batch.engine.start_llm, []

    def recording(*args, **kwargs):
        engine = real_start(*args, **kwargs)
        started.append(type(engine.llm_engine.engine_core).__name__)
        return engine

    monkeypatch.setattr(llmops.batch.engine, "start_llm", recording)
    assert type(llm.llm_engine.engine_core).__name__ == "InprocClient" and not output_threads()
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"Name the number {i}."} for i in range(3)])
    summary = run_batch(config("sampling.max_tokens=4"), str(path), tmp_path / "out")  # planned in-process
    assert summary.rows_ok == 3 and started == ["SyncMPClient"]  # it started an engine of its own, out of process
    assert not output_threads(), "the job's own engine was left for the interpreter's exit to stop"
    # The module's engine still runs
    assert run_batch(config("sampling.max_tokens=4"), str(path), tmp_path / "again", llm=llm).rows_ok == 3


def test_data_parallel_workers_run_as_processes_and_split_the_job(tmp_path, default_model_dir, monkeypatch):
    # No GPUs here: plan two engines on the CPU to run the real coordinator and worker processes.
    import dataclasses

    import llmops.vllm_engine

    plan_for = llmops.vllm_engine.plan_for
    monkeypatch.setattr(llmops.vllm_engine, "plan_for",
                        lambda *a, **k: dataclasses.replace(plan_for(*a, **k), data_parallel_size=2))
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"Name the number {i}."} for i in range(12)])
    summary = run_batch(config("chunk_rows=3", "sampling.max_tokens=8"), str(path), tmp_path / "out")
    assert (summary.engines, summary.rows_ok, summary.rows_failed) == (2, 12, 0)
    assert read_results(tmp_path / "out").column("row").to_pylist() == list(range(12))
    writers = {s.name: pq.read_schema(s).metadata[b"llmops.writer"].decode().split(" (")[0]
               for s in sorted((tmp_path / "out").glob("results/*.parquet"))}
    assert list(writers.values()) == ["worker 0", "worker 1", "worker 0", "worker 1"], writers
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["status"] == "complete"


# --- stopping, resuming, several engines (issue 8 preemption, issue 13 item 7) -------------------------


def start_batch(args, log, *, python_prefix=()):
    """`llmops batch ARGS` in its own process group, stderr to `log`; `python_prefix` replaces `-m llmops`
    (a `-c` script that patches the plan before calling the CLI)."""
    cmd = [sys.executable, *(python_prefix or ("-m", "llmops")), *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "w"), start_new_session=True,
                            cwd=REPO)


def wait_for_shards(out, proc, more_than=0, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list(out.glob("results/*.parquet"))) > more_than:
            return
        time.sleep(0.1)
    raise AssertionError(f"no new shard (exit {proc.poll()})")


def assert_exactly_once(out, rows):
    table = read_results(out)
    assert table.column("row").to_pylist() == list(range(rows))  # none lost, none twice
    assert table.column("error").null_count == rows
    assert not list(out.glob("results/*.tmp"))
    return table


def test_sigterm_commits_finished_rows_exits_75_and_the_rerun_completes_each_row_once(tmp_path, llm):
    rows, grace, chunk = 800, 12, 50
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"Write a sentence about the number {i}."}
                                              for i in range(rows)])
    out = tmp_path / "out"
    # Another job in the folder, a unit a row (units 0-15: most of them this job has not committed when it is
    # stopped, so a shard of that job left behind would show), and a file of the user's: the command line's
    # --overwrite replaces that job and keeps the file (checked below, in the same run: an engine start saved).
    others = [f"Say {i}." for i in range(16)]
    other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": p} for p in others])
    assert run_batch(config("sampling.max_tokens=4", "chunk_rows=1"), str(other), out, llm=llm).rows_ok == 16
    (out / "notes.txt").write_text("mine")
    # Beyond the engine's queue (2 x max_num_seqs = 512 rows), so units commit one by one and SIGTERM at the
    # first commit leaves work that was never admitted. Units still in flight when the 6 s of the grace
    # period left for work run out are committed in part (pieces; test_batch_trust checks their keying).
    args = ["batch", path, "-o", out, "--max-tokens", "32", "--set", f"chunk_rows={chunk}", "--grace-period", grace,
            "--overwrite", *(a for s in SMALL_ENGINE for a in ("--set", s))]
    started_ns = time.time_ns()
    proc = start_batch(args, tmp_path / "first.log")

    def new_shard():  # one of this job's: the other job's are older (and removed first)
        for shard in out.glob("results/*.parquet"):
            with contextlib.suppress(FileNotFoundError):
                if shard.stat().st_mtime_ns > started_ns:
                    return True
        return False

    try:
        wait_until(new_shard, proc, "a first commit")
        proc.send_signal(signal.SIGTERM)  # to llmops alone, as Kubernetes signals a container's main process
        # Shard by shard: the folder also holds the .tmp files of the commits going on now
        at_signal = {row for shard in out.glob("results/*.parquet")
                     for row in pq.read_table(shard, columns=["row"]).column("row").to_pylist()}
        # The contract is the grace period; the ceiling here only catches a hang (a busy CI machine is slow).
        code = proc.wait(timeout=grace + 60)
    finally:
        stop_process(proc)
    log = (tmp_path / "first.log").read_text()
    assert code == 75, log[-3000:]
    assert "stopped by SIGTERM" in log and "rerun the same command" in log and "Traceback" not in log
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "stopped"
    shards = {s.name: s.stat().st_mtime_ns for s in out.glob("results/*.parquet")}
    committed = read_results(out).column("row").to_pylist()
    assert len(committed) == len(set(committed)) and manifest["totals"]["rows"] == len(committed) < rows
    # What finished inside the grace period was committed too (an exit at once would keep only `at_signal`):
    # the units in flight as pieces of their unit.
    assert at_signal < set(committed), (len(at_signal), len(committed))
    assert list(out.glob("results/part-*.*.parquet")), "rows of units still in flight are committed as pieces"
    # --overwrite: nothing of the other job is left (its rows would be duplicates above, or its prompts here);
    # the user's file stays.
    assert not set(others) & set(read_results(out).column("prompt").to_pylist())
    assert (out / "notes.txt").read_text() == "mine"

    # The rerun on the module's engine (the same job as the command line's; an engine start saved)
    summary = run_batch(config("sampling.max_tokens=32", f"chunk_rows={chunk}"), str(path), out, llm=llm)
    assert summary.rows_ok == rows and summary.rows_skipped == len(committed)
    assert_exactly_once(out, rows)
    assert all(s.stat().st_mtime_ns == t for s in out.glob("results/*.parquet") if (t := shards.get(s.name)))
    assert (out / "notes.txt").read_text() == "mine"


# Runs the CLI with two engines planned on the CPU (the CPU plan has one), as on a machine with two GPU groups.
TWO_ENGINES = ("-c", "import dataclasses, sys, llmops.vllm_engine as v\n"
                     "plan_for = v.plan_for\n"
                     "v.plan_for = lambda *a, **k: dataclasses.replace(plan_for(*a, **k), data_parallel_size=2)\n"
                     "from llmops.cli.app import main\nmain(sys.argv[1:])")


def worker_pid(out, rank):
    for proc in os.listdir("/proc"):
        if proc.isdigit():
            try:
                cmdline = open(f"/proc/{proc}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if b"llmops.batch.worker" in cmdline and str(out).encode() in cmdline and \
                    cmdline[cmdline.index(b"--rank") + 1] == str(rank).encode():
                return int(proc)
    return None


def wait_until(condition, proc, what, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (proc is None or proc.poll() is None):
        if value := condition():
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen (exit {proc and proc.poll()})")


def stop_process(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_data_parallel_run_with_a_failing_worker_a_sigterm_and_a_kill_resumes_each_row_once(tmp_path, llm):
    rows = 48
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"Count from {i} to {i + 5}."} for i in range(rows)])
    out = tmp_path / "out"
    # One unit (4 rows) runs at a time on each engine, so units commit apart and a kill lands between them.
    args = ["batch", path, "-o", out, "--max-tokens", "16", "--set", "chunk_rows=4", "--grace-period", "10",
            "--set", "engine.max_num_seqs=4", *(a for s in SMALL_ENGINE for a in ("--set", s))]

    # 1. Worker 1 dies at once (kill -9): the job fails naming it, and worker 0's share is committed.
    proc = start_batch(args, tmp_path / "1.log", python_prefix=TWO_ENGINES)
    try:
        os.kill(wait_until(lambda: worker_pid(out, 1), proc, "worker 1 start"), signal.SIGKILL)
        code = proc.wait(timeout=600)
    finally:
        stop_process(proc)
    log = (tmp_path / "1.log").read_text()
    assert code == 1 and "1 of 2 engine workers failed (rank 1 exited -9" in log, log[-3000:]
    assert "Traceback" not in log
    assert read_results(out).column("row").to_pylist() == [r for r in range(rows) if (r // 4) % 2 == 0]

    # 2. SIGTERM while the engines start: passed on to the workers, exit 75, nothing half written.
    proc = start_batch(args, tmp_path / "2.log", python_prefix=TWO_ENGINES)
    try:
        wait_until(lambda: worker_pid(out, 1) and worker_pid(out, 0), proc, "workers start")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=10)
    finally:
        stop_process(proc)
    log = (tmp_path / "2.log").read_text()
    assert code == 75 and "stopped by SIGTERM" in log and "Traceback" not in log, log[-3000:]
    wait_until(lambda: worker_pid(out, 0) is None and worker_pid(out, 1) is None, None, "workers exit", timeout=60)

    # 3. The whole job is killed (kill -9 of its process group) once worker 1 commits again.
    shards = len(list(out.glob("results/*.parquet")))
    proc = start_batch(args, tmp_path / "3.log", python_prefix=TWO_ENGINES)
    try:
        wait_for_shards(out, proc, more_than=shards)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    kept = len(read_results(out))
    assert kept < rows, "the kill must land mid-job"
    # At once: the killed run's engine processes still hold the folder's lock while the kernel frees their
    # memory, and the rerun waits for them (it failed "in use" before it did).

    # 4. The rerun (the module's one engine: the job does not depend on how many) finishes each row once.
    done = run_batch(config("sampling.max_tokens=16", "chunk_rows=4", "engine.max_num_seqs=4"), str(path), out,
                     llm=llm)
    assert done.rows_ok == rows and done.rows_skipped == kept
    assert_exactly_once(out, rows)


def test_a_full_disk_mid_run_stops_with_one_line_keeps_what_was_committed_and_the_rerun_completes(llm, tmp_path):
    """Issue 25: a full disk during a real run (not only `OutputDir.commit` alone). RLIMIT_FSIZE makes the
    kernel refuse a write past 1 MiB (EFBIG) as a full disk refuses one (ENOSPC); the same path handles both.
    Rows 6 and 7 carry 4 MB of notes each, so their unit's shard cannot be written; the others' can. Rows 0, 1,
    6 and 7 end at the stop string within a few tokens, the others run 16: the failure comes while most rows
    are in flight (in CI they came back as outputs of the rerun's first steps, a KeyError)."""
    import resource
    import secrets

    rows, short = 12, (0, 1, 6, 7)
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(rows)],
                             "prompt": ["a|b|c|d|e|" if i in short else f"Count on: {i}, {i + 1}, {i + 2},"
                                        for i in range(rows)],
                             "notes": [secrets.token_hex(2_000_000) if i in (6, 7) else "" for i in range(rows)]}),
                   path)
    out = tmp_path / "out"
    cfg = config("chunk_rows=2", 'sampling.stop=["|"]')
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel's signal ends the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, limit[1]))
    try:
        with pytest.raises(StorageError) as failed:
            run_batch(cfg, str(path), out, llm=llm)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)
    assert str(failed.value) == f"cannot write {out / 'results'}: file too large"
    assert StorageError.exit_code == 1  # what `llmops batch` exits with, the message on one line
    assert not list(out.glob("results/*.tmp"))  # no half-written shard
    kept = pq.read_table(out / "results", columns=["row"]).column("row").to_pylist() if list(
        out.glob("results/*.parquet")) else []
    assert sorted(kept) == [0, 1]  # the short rows' first unit; the long rows were in flight
    assert not llm.llm_engine.has_unfinished_requests()  # the rows in flight were dropped with the job

    summary = run_batch(cfg, str(path), out, llm=llm)  # the disk has room again
    assert summary.rows_ok == rows and summary.rows_skipped == len(kept)
    table = assert_exactly_once(out, rows)
    assert [len(n) for n in table.column("notes").to_pylist()] == [4_000_000 if i in (6, 7) else 0 for i in range(rows)]
    assert table.column("finish_reason").to_pylist() == ["stop" if i in short else "length" for i in range(rows)]
