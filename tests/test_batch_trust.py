"""Bad inputs and broken state for `llmops batch` (issue 8): each case asserts the exit code, a one-line
message naming the field or file, no traceback, and that nothing was deleted or mixed.

The `unit` tests start no engine: every refusal happens at plan time, before vLLM would start. A previous
run's output is made by the library itself (plan, prepare, commit shards of made-up results), and the model
is a tiny folder of a config and made-up weight bytes, which is all the planner and the digest read."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmops.batch import BatchConfig, plan_batch
from llmops.batch.engine import _commit, _failure, _InFlight
from llmops.batch.inputs import count_rows, iter_units, open_input, unit_keys
from llmops.batch.config import InputConfig
from llmops.batch.outputs import OutputDir
from llmops.config import load_config
from llmops.errors import StorageError
from tests.conftest import REPO, run_cli

TINY_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 4, "vocab_size": 1000, "max_position_embeddings": 2048,
              "torch_dtype": "float32"}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def make_model(folder, weights: bytes = b"weights-A"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(TINY_LLAMA))
    (folder / "model.safetensors").write_bytes(weights)
    return folder


@pytest.fixture()
def env(cpu_machine, llmops_home):
    """An empty LLMOPS_HOME, and one fixed machine (2 AVX2 cores, no GPU) for this process and the CLI
    subprocesses alike: the plans of `previous_run` and of the command agree, and neither depends on the
    machine the tests run on."""
    return {"LLMOPS_HARDWARE": str(cpu_machine), "LLMOPS_HOME": str(llmops_home)}


@pytest.fixture()
def job_files(tmp_path):
    """A model folder `runs/A/model`, a 4-row prompt file, and an output folder path."""
    model = make_model(tmp_path / "runs" / "A" / "model")
    prompts = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"question {i}"} for i in range(4)])
    return model, prompts, tmp_path / "out"


def cfg(model, *sets: str) -> BatchConfig:
    return load_config(BatchConfig, sets=[f"model={model}", "chunk_rows=2", *sets])


def previous_run(config: BatchConfig, prompts, out, units: int = 1) -> dict[str, int]:
    """What a killed earlier run leaves: its manifest and `units` committed shards (made-up results).
    Returns each shard's mtime_ns, to show later that nothing was touched."""
    job = plan_batch(config, str(prompts), out)
    job.output.lock()
    committed = job.output.prepare(job.identity, job.unit_sizes, False, job.manifest())
    spec, counts = job.input_spec, job.row_counts
    for unit in iter_units(spec, counts, config.chunk_rows, set(job.units[:units]), committed.partial):
        state = _InFlight(unit, [{"generated_text": "made up", "finish_reason": "stop", "prompt_tokens": 3,
                                  "completion_tokens": 2, "error": None} for _ in unit.rows], 0)
        _commit(state, job.output, job.identity)
    job.output.unlock()
    return {p.name: p.stat().st_mtime_ns for p in out.glob("results/*.parquet")}


def batch(*args, env):
    return run_cli("batch", *map(str, args), env=env, timeout=120)


def assert_refused(proc, code: int, *needles: str):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code, proc.stderr
    assert len(lines) == 1, proc.stderr  # one line: what is wrong and what to do
    assert lines[0].startswith("llmops: error: ") and "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def shards(out) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.glob("results/*.parquet")}


# --- 1. job identity by content -----------------------------------------------------------------------


@pytest.mark.unit
def test_input_edited_in_place_with_the_same_size_is_another_job(job_files, env):
    model, prompts, out = job_files
    before = previous_run(cfg(model), prompts, out)
    text = prompts.read_text()
    prompts.write_text(text.replace("question 3", "question 9"))  # same size, other content
    assert len(prompts.read_text()) == len(text)
    proc = batch(prompts, "-o", out, "--model", model, "--set", "chunk_rows=2", env=env)
    assert_refused(proc, 2, str(out), "input changed: the content of in.jsonl differs",
                   "use a new --output or --overwrite")
    assert shards(out) == before


@pytest.mark.unit
def test_another_model_folder_with_the_same_name_is_another_job(job_files, env, tmp_path):
    model_a, prompts, out = job_files
    model_b = make_model(tmp_path / "runs" / "B" / "model", b"weights-B")
    before = previous_run(cfg(model_a), prompts, out)
    proc = batch(prompts, "-o", out, "--model", model_b, "--set", "chunk_rows=2", env=env)
    assert_refused(proc, 2, f"model changed: {model_a} -> {model_b}; use a new --output or --overwrite")
    # The same weights elsewhere are the same model: the job resumes (dry run: nothing is written).
    copy = make_model(tmp_path / "elsewhere" / "model", b"weights-A")
    proc = batch(prompts, "-o", out, "--model", copy, "--set", "chunk_rows=2", "--dry-run", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["units_done"] == 1
    # Retrained in place: the same path, other weights.
    (model_a / "model.safetensors").write_bytes(b"weights-A, trained again")
    proc = batch(prompts, "-o", out, "--model", model_a, "--set", "chunk_rows=2", env=env)
    assert_refused(proc, 2, f"model changed: the files in {model_a} differ")
    assert shards(out) == before


@pytest.mark.unit
@pytest.mark.parametrize("setting, message", [
    ("engine.dtype=bfloat16", "engine.dtype changed: 'float32' -> 'bfloat16'"),
    ("engine.max_model_len=1024", "engine.max_model_len changed: 2048 -> 1024"),
    ("sampling.max_tokens=7", "sampling.max_tokens changed: 256 -> 7"),
    ("chunk_rows=3", "chunk_rows changed: 2 -> 3"),
])
def test_settings_that_change_results_are_part_of_the_job(job_files, env, setting, message):
    model, prompts, out = job_files
    before = previous_run(cfg(model, "engine.dtype=float32"), prompts, out)
    proc = batch(prompts, "-o", out, "--model", model, "--set", "chunk_rows=2", "--set", "engine.dtype=float32",
                 "--set", setting, env=env)
    assert_refused(proc, 2, message)
    assert shards(out) == before


@pytest.mark.unit
def test_model_digest_is_cached_outside_the_model_folder(tmp_path, llmops_home):
    from llmops.fingerprint import model_digest

    model = make_model(tmp_path / "m")
    first = model_digest(model)
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]  # nothing added
    cache = json.loads((llmops_home / "cache" / "file-digests.json").read_text())
    assert str((model / "model.safetensors").resolve()) in cache
    assert model_digest(model) == first
    (model / "model.safetensors").write_bytes(b"weights-B")
    assert model_digest(model) != first


# --- 2. a row that is not valid Unicode fails alone -----------------------------------------------------


@pytest.mark.unit
def test_a_lone_surrogate_fails_its_row_alone_and_the_unit_commits(tmp_path):
    raw = ['{"prompt": "fine", "id": "a"}', '{"prompt": "bad \\ud800 text", "id": "b"}',
           '{"id": "\\udfff", "prompt": "bad id"}', '{"prompt": "pair \\ud83d\\ude00 is fine"}']
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(raw) + "\n")
    spec = open_input(str(path), InputConfig())
    counts = count_rows(spec)
    (unit,) = iter_units(spec, counts, 10, set(unit_keys(counts, 10)))
    errors = [r.error for r in unit.rows]
    assert errors[0] is None and errors[3] is None
    assert errors[1] == "line 2: text holds a lone surrogate (\\ud800), which is not valid Unicode"
    assert "lone surrogate (\\udfff)" in errors[2] and unit.rows[2].id == "\\udfff"
    state = _InFlight(unit, [_failure(r) if r.error else {"generated_text": "ok", "finish_reason": "stop",
                                                          "prompt_tokens": 1, "completion_tokens": 1, "error": None}
                             for r in unit.rows], 0)
    job = plan_batch(cfg(make_model(tmp_path / "model")), str(path), tmp_path / "out")
    (tmp_path / "out" / "results").mkdir(parents=True)
    key, stats = _commit(state, OutputDir(tmp_path / "out"), job.identity)
    assert (stats.ok, stats.failed) == (2, 2)
    table = pq.read_table(tmp_path / "out" / "results")
    assert table.column("prompt").to_pylist()[1] == "bad \\ud800 text"  # kept, escaped


@pytest.mark.unit
def test_openai_custom_id_with_a_lone_surrogate_fails_that_request(tmp_path):
    line = {"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}
    path = tmp_path / "batch.jsonl"
    path.write_text(json.dumps({**line, "custom_id": "ok"}) + "\n"
                    + json.dumps({**line, "custom_id": "\ud800"}) + "\n")
    spec = open_input(str(path), InputConfig())
    (unit,) = iter_units(spec, count_rows(spec), 10, {"00000-000000"})
    assert unit.rows[0].error is None and unit.rows[1].id == "\\ud800" and "lone surrogate" in unit.rows[1].error
    assert pa.table({"id": [r.id for r in unit.rows]}).num_rows == 2  # storable


# --- 3. --overwrite removes only what llmops wrote ------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_foreign_folder_is_refused_and_nothing_is_deleted(job_files, env, overwrite):
    model, prompts, out = job_files
    out.mkdir()
    (out / "config.yaml").write_text("mine: true\n")
    (out / "output.jsonl").write_text('{"mine": 1}\n')
    proc = batch(prompts, "-o", out, "--model", model, *(["--overwrite"] if overwrite else []), env=env)
    assert_refused(proc, 2, f"{out} is not empty and holds no llmops batch output", "choose a new or empty")
    assert "--overwrite" not in proc.stderr  # never suggest deleting someone's files
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "output.jsonl"]
    assert (out / "config.yaml").read_text() == "mine: true\n"


@pytest.mark.unit
def test_overwrite_removes_only_the_files_llmops_wrote(job_files):
    model, prompts, out = job_files
    before = previous_run(cfg(model), prompts, out)
    assert len(before) == 1
    (out / "notes.txt").write_text("the user's")
    (out / "results" / "mine.parquet").write_bytes(b"not ours")
    other = cfg(model, "sampling.max_tokens=7")
    job = plan_batch(other, str(prompts), out, overwrite=True)
    job.output.lock()
    assert job.output.prepare(job.identity, job.unit_sizes, True, job.manifest()).done == {}
    assert (out / "notes.txt").read_text() == "the user's" and (out / "results" / "mine.parquet").exists()
    assert not shards(out).keys() & before.keys()


# --- 4. one run at a time -------------------------------------------------------------------------------


@pytest.mark.unit
def test_a_second_run_into_a_locked_folder_exits_2_naming_the_holder(job_files, env):
    model, prompts, out = job_files
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from llmops.batch.outputs import OutputDir
        OutputDir({str(out)!r}).lock()
        print("locked", flush=True)
        time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = batch(prompts, "-o", out, "--model", model, env=env)
        assert_refused(proc, 2, f"{out} is in use by another llmops batch (pid {holder.pid} on host ")
    finally:
        holder.kill()  # kill -9: the lock dies with its process
        holder.wait()
    assert list(out.iterdir()) == [out / ".llmops-batch.lock"]  # nothing else written
    OutputDir(out).lock()


# --- 6. OS errors ---------------------------------------------------------------------------------------


@pytest.mark.unit
def test_an_output_path_that_is_a_file_or_under_a_file_says_so(job_files, env, tmp_path):
    model, prompts, _ = job_files
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    proc = batch(prompts, "-o", a_file, "--model", model, env=env)
    assert_refused(proc, 2, f"cannot use {a_file} as the output folder: it is a file")
    proc = batch(prompts, "-o", a_file / "run1", "--model", model, env=env)
    assert_refused(proc, 1, f"cannot write {a_file / 'run1'}: not a directory")
    assert "report it" not in proc.stderr and a_file.read_text() == "x"


@pytest.mark.unit
def test_a_full_disk_leaves_no_temp_file_and_the_rerun_commits(tmp_path):
    # RLIMIT_FSIZE makes the kernel refuse writes past 64 KiB (EFBIG), as a full disk refuses them (ENOSPC);
    # the same code path handles both.
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import resource, signal, sys
        import pyarrow as pa
        from llmops.batch.outputs import OutputDir, UnitStats
        from tests.test_batch_unit import JOB
        from llmops.errors import StorageError
        out = OutputDir({str(out)!r})
        out.results.mkdir(parents=True)
        table = pa.table({{"row": list(range(50_000)), "generated_text": ["x" * 40] * 50_000}})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
        try:
            out.commit("00000-000000", table, UnitStats(rows=50_000), JOB)
        except StorageError as e:
            print(e)
            sys.exit(1)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.strip() == f"cannot write {out / 'results'}: file too large"
    assert list((out / "results").iterdir()) == []  # no temp file left behind
    from tests.test_batch_unit import JOB
    from llmops.batch.outputs import UnitStats

    assert OutputDir(out).commit("00000-000000", pa.table({"row": [0]}), UnitStats(rows=1), JOB)


@pytest.mark.unit
def test_storage_error_names_the_folder_of_a_temp_file():
    error = OSError(28, "No space left on device", "out/run1/results/part-00000-000000.parquet.1-ab.tmp")
    assert str(StorageError.from_os_error(error, "write")) == "cannot write out/run1/results: no space left on device"
    assert StorageError.exit_code == 1


# --- 7. the manifest is rebuilt from the shards ---------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("damage", ["lost", "truncated", "old format"])
def test_a_lost_or_damaged_manifest_is_rebuilt_from_the_shards(job_files, env, damage):
    model, prompts, out = job_files
    before = previous_run(cfg(model), prompts, out)
    manifest = out / "manifest.json"
    if damage == "lost":
        manifest.unlink()
    elif damage == "truncated":
        manifest.write_text(manifest.read_text()[:40])
    else:
        manifest.write_text(json.dumps({"job": {"model": "m"}, "units": {}}))
    proc = batch(prompts, "-o", out, "--model", model, "--set", "chunk_rows=2", "--dry-run", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["units_done"] == 1
    job = plan_batch(cfg(model), str(prompts), out)  # the run itself: prepare rebuilds the manifest
    job.output.lock()
    committed = job.output.prepare(job.identity, job.unit_sizes, False, job.manifest())
    assert list(committed.done) == ["00000-000000"] and shards(out) == before
    assert json.loads(manifest.read_text())["units"]["00000-000000"]["rows"] == 2
    # Without a manifest the shards still say which job they belong to.
    manifest.unlink()
    write_jsonl(prompts, [{"prompt": f"other {i}"} for i in range(4)])
    proc = batch(prompts, "-o", out, "--model", model, "--set", "chunk_rows=2", env=env)
    assert_refused(proc, 2, "input changed: the content of in.jsonl differs")


@pytest.mark.unit
def test_a_shard_of_another_job_in_the_folder_is_refused(job_files, tmp_path):
    model, prompts, out = job_files
    previous_run(cfg(model), prompts, out)
    other_out = tmp_path / "other"
    previous_run(cfg(model, "sampling.max_tokens=7"), prompts, other_out, units=2)
    stray = other_out / "results" / "part-00000-000001.parquet"
    (out / "results" / stray.name).write_bytes(stray.read_bytes())
    job = plan_batch(cfg(model), str(prompts), out)
    from llmops.errors import UsageError

    with pytest.raises(UsageError, match="part-00000-000001.parquet belongs to another job"):
        job.output.prepare(job.identity, job.unit_sizes, False, job.manifest())


# --- 8. OpenAI Batch ids --------------------------------------------------------------------------------


@pytest.mark.unit
def test_duplicate_and_missing_custom_ids_are_refused_at_plan_time(tmp_path, env):
    model = make_model(tmp_path / "model")
    line = {"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}
    path = write_jsonl(tmp_path / "batch.jsonl", [{**line, "custom_id": "r1"}, {**line, "custom_id": "r2"},
                                                  {**line, "custom_id": "r1"}])
    proc = batch(path, "-o", tmp_path / "out", "--model", model, env=env)
    assert_refused(proc, 2, "duplicate custom_id 'r1' on line 1, line 3", "unique custom_id")
    write_jsonl(path, [{**line, "custom_id": "r1"}, line])
    proc = batch(path, "-o", tmp_path / "out", "--model", model, env=env)
    assert_refused(proc, 2, f"{path}: no custom_id on line 2")
    assert not (tmp_path / "out").exists()


# --- preemption: the signal handling itself (the real runs are in test_batch_engine.py) -------------------


@pytest.mark.unit
def test_sigterm_stops_at_once_before_generation_and_winds_down_during_it():
    from llmops.batch.engine import StopRequest, stop_on_signals
    from llmops.errors import Stopped

    previous = signal.getsignal(signal.SIGTERM)
    with stop_on_signals(StopRequest(20)):
        with pytest.raises(Stopped) as stopped:
            os.kill(os.getpid(), signal.SIGTERM)  # planning or engine start: nothing to keep
    assert stopped.value.exit_code == 75 and "stopped by SIGTERM" in str(stopped.value)
    with stop_on_signals(StopRequest(20)) as stop:
        stop.generating = True
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)  # at once again (Ctrl-C reaching a worker twice): the same stop
        assert stop.signal_name == "SIGINT" and stop.finish_by - stop.received == 14
    assert signal.getsignal(signal.SIGTERM) is previous


@pytest.mark.unit
def test_a_unit_committed_in_part_is_finished_by_the_rerun_with_each_row_once(job_files):
    """What a stop leaves: some rows of a unit in a piece; the rerun generates the rest only, as a piece."""
    model, prompts, out = job_files
    write_jsonl(prompts, [{"prompt": f"question {i}"} for i in range(5)])
    config = cfg(model, "chunk_rows=5")
    job = plan_batch(config, str(prompts), out)
    job.output.lock()
    committed = job.output.prepare(job.identity, job.unit_sizes, False, job.manifest())
    ok = {"generated_text": "x", "finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 1, "error": None}
    (unit,) = iter_units(job.input_spec, job.row_counts, 5, {"00000-000000"})
    _commit(_InFlight(unit, [ok, None, ok, None, None], 3), job.output, job.identity)  # rows 0 and 2 finished
    committed = job.output.committed(job.unit_sizes, job.identity.key())
    assert committed.done == {} and committed.partial == {"00000-000000": {0, 2}}
    (rest,) = iter_units(job.input_spec, job.row_counts, 5, {"00000-000000"}, committed.partial)
    assert [r.index for r in rest.rows] == [1, 3, 4] and rest.piece and rest.kept.num_rows == 3
    _commit(_InFlight(rest, [ok, ok, ok], 0), job.output, job.identity)
    committed = job.output.committed(job.unit_sizes, job.identity.key())
    assert committed.done["00000-000000"].rows == 5 and committed.partial == {}
    assert sorted(p.name for p in out.glob("results/*")) == ["part-00000-000000.0.parquet",
                                                            "part-00000-000000.1.parquet"]
    table = pq.read_table(out / "results").sort_by("row")
    assert table.column("row").to_pylist() == [0, 1, 2, 3, 4]
    assert table.column("prompt").to_pylist() == [f"question {i}" for i in range(5)]


# --- the planner sees the job, and vLLM refusing its memory is "does not fit" (issue 9) ----------------


@pytest.mark.unit
def test_the_plan_sizes_the_cpu_kv_cache_from_the_jobs_rows(tmp_path, monkeypatch):
    """A 4-row job never runs 256 sequences at once: its KV cache is the 1 GiB minimum, not the node's room."""
    import llmops.hardware
    from tests.fake_hardware import cpu_only

    monkeypatch.setattr(llmops.hardware, "detect", lambda: cpu_only(64, node_available_gib=60))
    model = make_model(tmp_path / "m")
    (model / "config.json").write_text(json.dumps({**TINY_LLAMA, "num_hidden_layers": 32, "hidden_size": 4096,
                                                   "num_attention_heads": 32, "num_key_value_heads": 32,
                                                   "intermediate_size": 11008, "max_position_embeddings": 4096}))
    small = write_jsonl(tmp_path / "small.jsonl", [{"prompt": "x" * 400}] * 4)
    large = write_jsonl(tmp_path / "large.jsonl", [{"prompt": "x" * 400}] * 1000)
    # 32 layers x 32 KV heads x 128 dims x 2 (K, V) x 2 bytes = 512 KiB a token in bf16-sized caches.
    small_job = plan_batch(cfg(model, "sampling.max_tokens=100"), str(small), tmp_path / "o1")
    large_job = plan_batch(cfg(model, "sampling.max_tokens=100"), str(large), tmp_path / "o2")
    assert "4 sequences at once" in " ".join(small_job.plan.notes)
    assert "256 sequences at once" in " ".join(large_job.plan.notes)
    assert small_job.plan.cpu_kv_cache_gib < large_job.plan.cpu_kv_cache_gib


@pytest.mark.unit
def test_vllm_refusing_its_kv_cache_exits_3_naming_the_knob(job_files, monkeypatch):
    """The engine's own refusal (a NUMA node smaller than /proc/meminfo says) was a traceback and exit 1."""
    import llmops.batch.runner as runner
    from llmops.batch import run_batch
    from llmops.errors import DoesNotFitError

    def refuse(engine):
        # What vLLM's worker process writes to fd 2 (the log file while the engine starts), then raises.
        os.write(2, b"RuntimeError: Available memory on node 0 (6.48/8.46 GiB) on kv cache allocation is less "
                    b"than requested memory for kv (8.0 GiB)\n")
        raise RuntimeError("Engine core initialization failed. See root cause above.")

    monkeypatch.setattr(runner, "load_engine", refuse)
    model, prompts, out = job_files
    with pytest.raises(DoesNotFitError) as err:
        run_batch(cfg(model), str(prompts), out)
    assert err.value.exit_code == 3
    assert "NUMA node 0 had 6.48 of 8.46 GiB available" in str(err.value)
    assert "engine.cpu_kv_cache_gib" in str(err.value)
