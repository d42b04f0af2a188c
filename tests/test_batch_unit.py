"""Fast tests of `llmops batch` that start no engine: format detection, units, commits and resume
bookkeeping, config validation, the data-parallel plan and `--dry-run`."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmops.batch import BatchConfig
from llmops.batch.config import InputConfig
from llmops.batch.inputs import count_rows, iter_units, open_input, unit_keys
from llmops.batch.identity import EngineIdentity, InputIdentity, JobIdentity, ModelIdentity
from llmops.batch.outputs import LOCK, Manifest, OutputDir, UnitStats
from llmops.batch.workers import units_for_rank
from llmops.config import load_config
from llmops.errors import ConfigError, UsageError
from tests.conftest import run_cli
from tests.fake_hardware import EIGHT_80GIB_GPUS

pytestmark = pytest.mark.unit


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def units(path, chunk_rows=2, config=InputConfig()):
    spec = open_input(str(path), config)
    counts = count_rows(spec)
    return spec, list(iter_units(spec, counts, chunk_rows, set(unit_keys(counts, chunk_rows))))


# --- detection ----------------------------------------------------------------------------------------


def test_detects_prompt_and_messages_jsonl_and_reads_bad_lines_as_failed_rows(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [
        {"prompt": "Hello", "id": "a", "lang": "en"},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]},
        "{not json",
        "",
        {"prompt": "   "},
        {"text": "no prompt field"},
    ])
    spec, got = units(path)
    assert spec.format == "jsonl"
    rows = [r for u in got for r in u.rows]
    assert [u.key for u in got] == ["00000-000000", "00000-000001", "00000-000002"]  # the blank line is skipped
    assert [r.index for r in rows] == [0, 1, 2, 3, 4]
    assert (rows[0].id, rows[0].prompt, rows[0].error) == ("a", "Hello", None)
    assert rows[1].messages == [{"role": "user", "content": "Hi"}]
    assert "line 3: not valid JSON" in rows[2].error
    assert rows[3].error == "empty prompt"
    assert "no `prompt` or `messages`" in rows[4].error
    assert json.loads(got[0].kept.column("metadata")[0].as_py()) == {"lang": "en"}


def test_detects_openai_batch_requests_and_validates_each_line(tmp_path):
    ok = {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
          "body": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}}
    path = write_jsonl(tmp_path / "batch.jsonl", [
        ok,
        {**ok, "custom_id": "r2", "url": "/v1/embeddings"},
        {**ok, "custom_id": "r3", "method": "GET"},
        {"custom_id": "r4", "method": "POST", "url": "/v1/completions", "body": {"prompt": "Once"}},
    ])
    spec, got = units(path, chunk_rows=10)
    rows = got[0].rows
    assert spec.format == "openai"
    assert [r.id for r in rows] == ["r1", "r2", "r3", "r4"]
    assert rows[0].body["max_tokens"] == 5 and rows[0].error is None
    assert "url must be one of" in rows[1].error
    assert "method must be POST" in rows[2].error
    assert (rows[3].prompt, rows[3].error) == ("Once", None)
    assert got[0].kept.column_names == ["url", "body"]


@pytest.mark.parametrize("content, message", [
    ("just some text\n", "cannot detect the format"),
    ('{"question": "x"}\n', "cannot detect the input format"),
])
def test_undetectable_input_is_a_usage_error(tmp_path, content, message):
    path = tmp_path / "data.txt"
    path.write_text(content)
    with pytest.raises(UsageError, match=message) as err:
        open_input(str(path), InputConfig())
    assert err.value.exit_code == 2 and err.value.hint


def test_missing_input_and_mixed_folder_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="input not found"):
        open_input(str(tmp_path / "nope.jsonl"), InputConfig())
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "x"}])
    pq.write_table(pa.table({"prompt": ["y"]}), tmp_path / "b.parquet")
    with pytest.raises(UsageError, match="mixes input formats"):
        open_input(str(tmp_path), InputConfig())


def test_parquet_shards_are_streamed_in_units_across_batches_and_files(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    for i in range(2):
        table = pa.table({"id": [f"f{i}-{j}" for j in range(5)], "text": [f"prompt {i}-{j}" for j in range(5)],
                          "score": list(range(5))})
        pq.write_table(table, folder / f"part-{i}.parquet", row_group_size=2)  # units cross row groups
    spec, got = units(folder, chunk_rows=3)
    assert (spec.format, spec.prompt_column, spec.id_column) == ("parquet", "text", "id")
    assert [u.key for u in got] == ["00000-000000", "00000-000001", "00001-000000", "00001-000001"]
    assert [len(u.rows) for u in got] == [3, 2, 3, 2]
    assert [r.index for u in got for r in u.rows] == list(range(10))
    assert got[2].rows[0].id == "f1-0" and got[2].kept.column("score").to_pylist() == [0, 1, 2]
    # Reading only some units parses only those.
    counts = count_rows(spec)
    assert [u.key for u in iter_units(spec, counts, 3, {"00001-000001"})] == ["00001-000001"]
    assert units(str(folder / "*.parquet"), chunk_rows=3)[0].files == spec.files  # a glob finds the same


def test_arrow_file_and_stream_with_a_messages_column(tmp_path):
    table = pa.table({"messages": [[{"role": "user", "content": "Hi"}], []], "n": [1, 2]})
    for name, opener in (("file.arrow", pa.ipc.new_file), ("stream.arrows", pa.ipc.new_stream)):
        with opener(tmp_path / name, table.schema) as writer:
            writer.write_table(table)
        spec, got = units(tmp_path / name)
        assert (spec.format, spec.messages_column) == ("arrow", "messages")
        assert got[0].rows[0].messages == [{"role": "user", "content": "Hi"}]
        assert "non-empty list" in got[0].rows[1].error


def test_column_options_are_checked(tmp_path):
    pq.write_table(pa.table({"q": ["a"], "error": ["x"]}), tmp_path / "clash.parquet")
    pq.write_table(pa.table({"q": ["a"]}), tmp_path / "plain.parquet")
    with pytest.raises(UsageError, match="no `prompt`, `text` or `messages` column"):
        open_input(str(tmp_path / "plain.parquet"), InputConfig())
    assert open_input(str(tmp_path / "plain.parquet"), InputConfig(prompt_column="q")).prompt_column == "q"
    with pytest.raises(UsageError, match="Choose one"):
        open_input(str(tmp_path / "plain.parquet"), InputConfig(prompt_column="q", messages_column="q"))
    with pytest.raises(UsageError, match="has no column nope"):
        open_input(str(tmp_path / "plain.parquet"), InputConfig(prompt_column="q", id_column="nope"))
    with pytest.raises(UsageError, match="named like result columns: error"):
        open_input(str(tmp_path / "clash.parquet"), InputConfig(prompt_column="q"))
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x"}])
    with pytest.raises(UsageError, match="apply to Parquet/Arrow"):
        open_input(str(tmp_path / "p.jsonl"), InputConfig(prompt_column="q"))


# --- config -------------------------------------------------------------------------------------------


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError) as err:
        load_config(BatchConfig, sets=["sampling.temprature=0.5", "chunk_rows=0", "sampling.top_p=2"])
    text = str(err.value)
    assert "did you mean `sampling.temperature`" in text
    assert "chunk_rows" in text and "sampling.top_p" in text and "3 problems" in text


# --- outputs and resume bookkeeping -------------------------------------------------------------------

JOB = JobIdentity(input=InputIdentity(format="jsonl", files=["a.jsonl"], digest="00"),
                  model=ModelIdentity(name="m", path="/models/m", digest="11"), sampling={"temperature": 0.0},
                  engine=EngineIdentity(dtype="float32", max_model_len=2048), chunk_rows=2)


def manifest(job=JOB) -> Manifest:
    return Manifest(job=job, job_key=job.key(), status="running")


def test_commit_is_atomic_and_resume_trusts_shards_over_the_manifest(tmp_path):
    out = OutputDir(tmp_path / "out")
    sizes = {"00000-000000": 2, "00000-000001": 2, "00000-000002": 2}
    keys = list(sizes)
    assert out.prepare(JOB, sizes, False, manifest()).done == {}
    stats = UnitStats(rows=2, ok=1, failed=1, prompt_tokens=10, completion_tokens=5)
    assert out.commit(keys[0], pa.table({"row": [0, 1], "id": ["a", "b"], "error": [None, "bad"]}), stats, JOB)
    out.commit(keys[1], pa.table({"row": [2, 3], "id": ["c", "d"], "error": [None, None]}), stats, JOB)
    # First writer wins: a second commit of a unit (a retried or zombie writer) leaves the first in place.
    assert not out.commit(keys[0], pa.table({"row": [0, 1], "id": ["x", "y"], "error": [None, None]}), stats, JOB)
    # A kill after the rename but before the manifest update, and a half-written shard:
    (out.results / "part-00000-000002.parquet.123-abcd.tmp").write_bytes(b"PAR1 half")
    assert json.loads((out.path / "manifest.json").read_text())["units"] == {}
    done = out.prepare(JOB, sizes, False, manifest()).done
    assert set(done) == set(keys[:2]) and done[keys[0]] == stats
    assert not list(out.results.glob("*.tmp"))
    saved = json.loads((out.path / "manifest.json").read_text())
    assert saved["units_done"] == 2 and saved["totals"]["rows"] == 4
    assert out.failed_rows(5) == [{"row": 1, "id": "b", "error": "bad"}]


def test_another_job_in_the_output_folder_is_refused_unless_overwrite(tmp_path):
    out = OutputDir(tmp_path / "out")
    out.prepare(JOB, {"00000-000000": 1}, False, manifest())
    out.commit("00000-000000", pa.table({"row": [0]}), UnitStats(rows=1), JOB)
    other = JOB.model_copy(update={"sampling": {"temperature": 0.7}})
    assert other.changes_from(JOB) == ["sampling.temperature changed: 0.0 -> 0.7"]
    with pytest.raises(UsageError, match=r"another job's results: sampling.temperature changed: 0.0 -> 0.7; "
                                         r"use a new --output or --overwrite"):
        out.prepare(other, {"00000-000000": 1}, False, manifest(other))
    assert out.prepare(other, {"00000-000000": 1}, True, manifest(other)).done == {}  # old shards are gone
    killed_early = tmp_path / "killed-early"  # a first run killed before its manifest was written
    (killed_early / "results").mkdir(parents=True)
    (killed_early / "manifest.json.123-abcd.tmp").write_text("{")
    OutputDir(killed_early).check(JOB, overwrite=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="holds no llmops batch output"):
        OutputDir(foreign).check(JOB, overwrite=False)


def test_data_parallel_ranks_split_units_exactly():
    keys = [f"00000-{i:06d}" for i in range(11)]
    shares = [units_for_rank(keys, rank, 4) for rank in range(4)]
    assert set().union(*shares) == set(keys)
    assert sum(len(s) for s in shares) == len(keys)
    assert [len(s) for s in shares] == [3, 3, 3, 2]


# --- CLI: plan and dry run (no engine) ----------------------------------------------------------------


@pytest.fixture()
def eight_gpus(tmp_path):
    path = tmp_path / "hw.json"
    path.write_text(json.dumps(EIGHT_80GIB_GPUS.to_dict()))
    return {"LLMOPS_HARDWARE": str(path)}


@pytest.mark.parametrize("model, engines, gpus", [("llama-3.1-8b", 8, "7"), ("llama-3.3-70b", 4, "6,7")])
def test_dry_run_on_eight_gpus_plans_one_engine_per_gpu_group(tmp_path, eight_gpus, model, engines, gpus):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"q{i}"} for i in range(5)])
    proc = run_cli("batch", str(prompts), "-o", str(tmp_path / "out"), "--model", model, "--dry-run", "--json",
                   env=eight_gpus)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["plan"]["data_parallel_size"] == engines and plan["input"]["rows"] == 5
    assert len(plan["engines"]) == engines
    last = plan["engines"][-1]
    assert last["env"]["CUDA_VISIBLE_DEVICES"] == gpus
    assert f"CUDA_VISIBLE_DEVICES={gpus}" in last["command"] and "-m llmops.batch.worker" in last["command"]
    assert f"--rank {engines - 1} --world {engines}" in last["command"]
    assert last["llm_args"]["tensor_parallel_size"] == len(gpus.split(","))
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
    human = run_cli("batch", str(prompts), "-o", str(tmp_path / "out"), "--model", model, "--dry-run",
                    env=eight_gpus)
    assert human.returncode == 0 and f"engine {engines - 1}: " in human.stdout


def test_cli_usage_errors_exit_2_before_any_engine_starts(tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q"}])
    out = OutputDir(tmp_path / "out")
    out.prepare(JOB, {}, False, manifest())
    proc = run_cli("batch", str(prompts), "-o", str(out.path), "--temperature", "0.5")
    assert proc.returncode == 2 and "another job's results" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("batch", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o2"))
    assert proc.returncode == 2 and "input not found" in proc.stderr
    proc = run_cli("batch", str(prompts), "-o", str(tmp_path / "o3"), "--set", "sampling.max_tokens=0")
    assert proc.returncode == 2 and "sampling.max_tokens" in proc.stderr


def test_shipped_example_config_and_inputs_are_valid():
    from tests.conftest import REPO

    head = (REPO / "examples/batch/batch.yaml").read_text().splitlines()[0]
    assert head.startswith("# llmops batch ")  # the file says how to run it
    cfg = load_config(BatchConfig, yaml_path=REPO / "examples/batch/batch.yaml")
    assert open_input(str(REPO / "examples/batch/questions.parquet"), cfg.input).prompt_column == "prompt"
    assert open_input(str(REPO / "examples/batch/openai_requests.jsonl"), InputConfig()).format == "openai"
    spec, got = units(REPO / "examples/prompts.jsonl", chunk_rows=100)
    assert len(got[0].rows) >= 20 and not any(r.error for r in got[0].rows)


def test_batch_help_imports_no_engine():
    import subprocess
    import sys

    code = ("import sys\nfrom llmops.cli.app import main\ntry:\n    main(['batch', '--help'])\nexcept SystemExit:\n"
            "    pass\nassert not [m for m in ('torch', 'vllm', 'transformers') if m in sys.modules]")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "--prompt-column" in proc.stdout and "--dry-run" in proc.stdout


def test_openai_results_name_the_model_each_request_asked_for(tmp_path):
    out = OutputDir(tmp_path / "out")
    bodies = [{"model": "base-m", "messages": []}, {"model": "product-facts", "messages": []},
              {"model": "unknown-m", "messages": []}]
    table = pa.table({"row": [0, 1, 2], "id": ["a", "b", "c"], "url": ["/v1/chat/completions"] * 3,
                      "body": [json.dumps(b) for b in bodies], "generated_text": ["x", "y", "z"],
                      "finish_reason": ["stop"] * 3, "prompt_tokens": pa.array([1, 1, 1], pa.int32()),
                      "completion_tokens": pa.array([1, 1, 1], pa.int32()), "error": pa.array([None] * 3, pa.string())})
    out.results.mkdir(parents=True)
    out.commit("00000-000000", table, UnitStats(rows=3, ok=3), JOB)
    files = out.write_openai_files("base-m", {"base-m", "product-facts"})
    assert files == [str(tmp_path / "out" / "output.jsonl"), str(tmp_path / "out" / "errors.jsonl")]
    lines = [json.loads(line) for line in (tmp_path / "out" / "output.jsonl").read_text().splitlines()]
    # A request for a name the job did not serve was answered by the job's model, and says so.
    assert [line["response"]["body"]["model"] for line in lines] == ["base-m", "product-facts", "base-m"]


def test_cpu_engines_of_one_host_each_get_their_own_cores(tmp_path, monkeypatch):
    """The worker path forced to two engines on a CPU (as scripts/bench_ray.py compares it with Ray): vLLM's
    automatic binding would put both on the same cores, 4x slower than apart."""
    from types import SimpleNamespace

    from llmops.batch.workers import engines

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    plan = SimpleNamespace(device="cpu", data_parallel_size=2, tensor_parallel_size=1)
    from llmops.vllm_engine import ResolvedEngine

    engine = ResolvedEngine(plan, {"model": str(tmp_path)}, {"VLLM_CPU_OMP_THREADS_BIND": "auto"})
    job = SimpleNamespace(plan=plan, engine=engine, output=OutputDir(tmp_path / "out"))
    found = engines(job)
    assert [e["env"]["VLLM_CPU_OMP_THREADS_BIND"] for e in found] == ["0,1", "2,3"]
    assert all("CUDA_VISIBLE_DEVICES" not in e["env"] for e in found)


def test_progress_off_a_terminal_logs_only_what_happened(monkeypatch, capsys):
    """Off a TTY (a CI log) the bar printed `0/N rows, 0 tok/s` before anything was done: the first unit's
    zero failed rows, 30 s after the bar was made (while the engine started)."""
    from llmops.cli import batch as cli_batch

    now = [1000.0]
    monkeypatch.setattr(cli_batch.time, "monotonic", lambda: now[0])
    bar = cli_batch._Bar()
    now[0] += 60  # the engine took a minute to start
    bar.start(10, 0)
    bar.advance(0, 0)
    now[0] += 31
    bar.advance(0, 0)
    assert "rows" not in capsys.readouterr().err
    bar.advance(4, 40)
    assert "4/10 rows" in capsys.readouterr().err


def test_an_output_folder_inside_the_input_folder_is_refused_before_anything_runs(tmp_path):
    """`llmops batch DIR -o DIR/out` ran once, then every rerun was refused ("DIR mixes input formats"), so the
    job could never resume (issue 25)."""
    from llmops.batch import plan_batch
    from llmops.errors import UsageError

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"prompt": "hi"}\n')
    for given, out in ((str(folder), folder / "out"), (f"{folder}/*.jsonl", folder / "sub" / "out"),
                       (f"{folder}/", folder), ("s3://bucket/in/", "s3://bucket/in/out"),
                       ("s3://bucket/in/*.parquet", "s3://bucket/in/out")):
        with pytest.raises(UsageError, match="inside the input"):
            plan_batch(BatchConfig(), given, out)
    assert sorted(p.name for p in folder.iterdir()) == ["a.jsonl"]  # nothing written


def test_lines_of_a_folder_of_jsonl_files_are_named_with_their_file(tmp_path):
    """Row errors said "line 1" without the file, generated `line-N` ids collided between files, and a prompt
    that is not text was kept as null (issue 25)."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{not json\n{"prompt": 42}\n')
    (folder / "b.jsonl").write_text('{not json\n[1]\n')
    spec = open_input(str(folder), InputConfig())
    counts = count_rows(spec)
    units = list(iter_units(spec, counts, 10, set(unit_keys(counts, 10))))
    rows = [r for u in units for r in u.rows]
    assert [r.id for r in rows] == ["a.jsonl:line-1", "1", "b.jsonl:line-1", "3"]
    assert rows[0].error.startswith("a.jsonl line 1: not valid JSON")
    assert rows[2].error.startswith("b.jsonl line 1: not valid JSON")
    assert rows[3].error.startswith("b.jsonl line 2: expected a JSON object")
    assert "must be a string" in rows[1].error
    assert units[0].kept.column("prompt").to_pylist() == [None, "42"]  # kept as its JSON, not dropped
    single = open_input(str(folder / "a.jsonl"), InputConfig())
    one = next(iter(iter_units(single, count_rows(single), 10, {"00000-000000"})))
    assert (one.rows[0].id, one.rows[0].error.split(":")[0]) == ("line-1", "line 1")  # one file: as before


@pytest.mark.unit
def test_ctrl_c_winds_down_and_a_second_ctrl_c_stops_at_once_with_130_a_second_sigterm_with_75():
    """The README's exit-code table says 130 for a second Ctrl+C; batch exited 75 (issue 25)."""
    import os
    import signal
    import time

    from llmops.batch.engine import REPEAT_SIGNAL_S, StopRequest, stop_on_signals
    from llmops.errors import Interrupted, Stopped

    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 75)):
        stop = StopRequest(grace_period_s=60)
        stop.generating = True
        with stop_on_signals(stop):
            os.kill(os.getpid(), sig)  # the first: wind down (no exception; the loop sees stop.requested)
            time.sleep(0.05)
            assert stop.requested and stop.signal_name == signal.Signals(sig).name
            os.kill(os.getpid(), sig)  # a repeat within REPEAT_SIGNAL_S is the same request
            time.sleep(0.05)
            stop.received -= REPEAT_SIGNAL_S + 1  # a later one means "now"
            with pytest.raises(Stopped) as stopped:
                os.kill(os.getpid(), sig)
                time.sleep(0.05)
        assert stopped.value.exit_code == code and isinstance(stopped.value, Interrupted) == (code == 130)
        assert "stopped at once" in str(stopped.value)


@pytest.mark.unit
def test_a_folder_whose_run_died_is_taken_once_the_processes_it_started_let_go(tmp_path):
    """A run killed with its process group leaves its engine processes dying for some seconds, still holding
    the folder's lock (they inherited it): a rerun at once waited for nothing and failed "in use"."""
    import socket
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    holder = f"pid {dead.stdout.strip()} on host {socket.gethostname()}\n"
    hold = ("import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "os.write(fd, sys.argv[2].encode())\n"
            "print('held', flush=True)\n"
            "time.sleep(float(sys.argv[3]))\n")
    child = subprocess.Popen([sys.executable, "-c", hold, str(out / LOCK), holder, "2"], stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline() == "held\n"
    t0 = time.monotonic()
    folder = OutputDir(out)
    folder.lock()  # the holder named in the file is gone: wait for its children to let go
    assert time.monotonic() - t0 > 0.5 and child.wait(10) == 0
    folder.unlock()

    # A holder that still runs: refused at once, naming it.
    alive = subprocess.Popen([sys.executable, "-c", hold, str(out / LOCK), f"pid {os.getpid()} on host "
                              f"{socket.gethostname()}\n", "30"], stdout=subprocess.PIPE, text=True)
    try:
        assert alive.stdout.readline() == "held\n"
        t0 = time.monotonic()
        with pytest.raises(UsageError, match=f"in use by another llmops batch \\(pid {os.getpid()} on host "):
            OutputDir(out).lock()
        assert time.monotonic() - t0 < 5
    finally:
        alive.kill()
        alive.wait()


def test_what_an_in_process_engine_start_cannot_look_through_is_found(monkeypatch):
    """vllm-cpu's worker start looks through every module attribute with `hasattr(value, "__dict__")`; a proxy
    that raises anything but AttributeError there (Flask's `current_app`, imported here by the S3 test server)
    failed every in-process engine of the test process ("Working outside of application context")."""
    import sys
    import types

    from llmops.batch.engine import _breaks_vllms_module_scan

    class ContextProxy:  # as werkzeug's LocalProxy behaves outside its context
        def __getattribute__(self, name):
            raise RuntimeError("Working outside of application context.")

    module = types.ModuleType("an_app")
    module.current_app = ContextProxy()
    # This process's modules stand in for vLLM's (other tests may have imported Flask already)
    monkeypatch.setattr(sys, "modules", {"json": json, "os": os, "pyarrow": pa})
    assert _breaks_vllms_module_scan() is None
    sys.modules["an_app"] = module
    assert _breaks_vllms_module_scan() == "an_app.current_app"
