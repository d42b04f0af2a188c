"""Estimates before a job runs (issue 26): the roofline on known hardware against published figures, the record of
measured runs and how estimates learn from it, `llmops batch status`, and `llmops hw --compare`."""

from __future__ import annotations

import json
import multiprocessing
import os
import time

import pyarrow as pa
import pytest

from llmops import throughput
from llmops.batch.identity import EngineIdentity, InputIdentity, JobIdentity, ModelIdentity
from llmops.batch.outputs import Manifest, OutputDir, UnitStats
from llmops.estimate import (UNKNOWN_GPU, batch_roofline, estimate_batch, estimate_train, gpu_spec, load_prices,
                             startup)
from llmops.plan import ModelFacts, plan_engine
from llmops.registry import ModelShape
from llmops.train.plan import plan_train
from tests.conftest import run_cli
from tests.fake_hardware import cpu_only, gpus
from tests.test_storage import bucket, s3_server  # noqa: F401
from tests.train_helpers import tiny_model_dir  # noqa: F401  (a fixture)

# Llama-3.1-8B's shape (config.json of meta-llama/Llama-3.1-8B-Instruct): 8.03 B parameters, 32 layers, 8 KV heads.
LLAMA_8B = ModelFacts("llama-3.1-8b", 8_030_261_248, 131072, ModelShape(
    hidden_size=4096, num_layers=32, num_attention_heads=32, num_kv_heads=8, head_dim=128,
    intermediate_size=14336, vocab_size=128256))
SMOL = ModelFacts("smollm2-135m", 134_515_008, 8192, ModelShape(
    hidden_size=576, num_layers=30, num_attention_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536,
    vocab_size=49152, tie_word_embeddings=True))
H100 = gpus(1, 80, "NVIDIA H100 80GB HBM3", "9.0")
H200 = gpus(1, 141, "NVIDIA H200", "9.0")


def batch_estimate(facts, hw, rows, prompt, out, **kw):
    plan = plan_engine(None, facts, hw, workload="batch", rows=rows, prompt_tokens=prompt, max_tokens=out)
    return plan, estimate_batch(plan, facts, hw, rows=rows, prompt_tokens=prompt, max_tokens=out, **kw)


# --- the roofline --------------------------------------------------------------------------------------


@pytest.mark.unit
def test_gpu_table_matches_the_names_nvml_reports():
    assert gpu_spec("NVIDIA H100 80GB HBM3").name == "H100 SXM"
    assert gpu_spec("NVIDIA H100 PCIe").name == "H100 PCIe"
    assert gpu_spec("NVIDIA A100-SXM4-40GB").name == "A100 40GB"
    assert gpu_spec("NVIDIA A100 80GB PCIe").name == "A100 80GB"
    assert gpu_spec("NVIDIA L40S").name == "L40S" and gpu_spec("NVIDIA L4").name == "L4"
    assert gpu_spec("NVIDIA A10G").name == "A10G" and gpu_spec("NVIDIA GeForce RTX 4090").name == "RTX 4090"
    assert gpu_spec("NVIDIA H200").name == "H200"
    assert gpu_spec("NVIDIA Test") is UNKNOWN_GPU


# TensorRT-LLM's published offline throughput for Llama-3.1-8B on one H100 SXM (TP1, FP8 weights and KV cache,
# trtllm-bench, "Total Output Throughput (tokens/sec)"), from docs/source/performance/perf-overview.md
# (https://nvidia.github.io/TensorRT-LLM/performance/perf-overview.html, the "Llama 3.1 8B" table):
TRTLLM_LLAMA_8B_H100_FP8 = {(128, 128): 28_312, (128, 2048): 22_714, (1000, 1000): 15_220, (2048, 128): 3_450,
                            (5000, 500): 3_459}


@pytest.mark.unit
@pytest.mark.parametrize("isl,osl", sorted(TRTLLM_LLAMA_8B_H100_FP8))
def test_roofline_for_llama_8b_on_one_h100_is_within_the_published_range(isl, osl):
    """llmops plans bf16. FP8 halves the bytes read per decode step (weights and KV cache) and doubles the
    tensor-core rate, so a bf16 engine cannot beat the FP8 figure and, bound by the same memory and compute
    at twice the bytes and half the FLOPs, reaches about half of it: the roofline must say 35-100% of it."""
    _, est = batch_estimate(LLAMA_8B, H100, 3000, isl, osl)
    published = TRTLLM_LLAMA_8B_H100_FP8[(isl, osl)]
    assert 0.35 * published <= est.rate.value <= 1.0 * published, (est.rate.value, published)
    assert est.rate.low <= est.rate.value <= est.rate.high


@pytest.mark.unit
def test_decode_is_bound_by_bandwidth_and_prefill_by_compute():
    """An H200 has the H100's compute and 1.43x its bandwidth: decode-heavy work gains, prefill-heavy barely."""
    decode = [batch_roofline(plan_engine(None, LLAMA_8B, hw, workload="batch", rows=3000, prompt_tokens=128,
                                         max_tokens=2048), LLAMA_8B, hw, rows=3000, prompt_tokens=128,
                             output_tokens=2048) for hw in (H100, H200)]
    assert decode[0].bound == "memory bandwidth (decode)"
    assert decode[0].generation_s / decode[1].generation_s > 1.3
    prefill = [batch_roofline(plan_engine(None, LLAMA_8B, hw, workload="batch", rows=3000, prompt_tokens=8000,
                                          max_tokens=1), LLAMA_8B, hw, rows=3000, prompt_tokens=8000,
                              output_tokens=1) for hw in (H100, H200)]
    assert prefill[0].bound == "compute (prefill)"
    assert prefill[0].generation_s / prefill[1].generation_s < 1.05


@pytest.mark.unit
def test_cpu_estimate_follows_cores_and_native_bf16():
    slow = batch_estimate(SMOL, cpu_only(24, ("avx2",), cores=2, node_available_gib=20), 500, 30, 64)[1]
    more = batch_estimate(SMOL, cpu_only(24, ("avx2",), cores=8, node_available_gib=20), 500, 30, 64)[1]
    bf16 = batch_estimate(SMOL, cpu_only(24, ("avx2", "avx512_bf16"), cores=2, node_available_gib=20), 500, 30, 64)[1]
    assert more.rate.value > 2 * slow.rate.value  # 7 compute cores against 2 (one reserved from 5 cores up)
    assert bf16.rate.value > 2 * slow.rate.value
    assert "CPU core" in slow.rate.source and "roofline" in slow.rate.source


@pytest.mark.unit
def test_wall_time_is_start_up_plus_generation_with_a_range():
    plan, est = batch_estimate(SMOL, cpu_only(24, node_available_gib=20), 2000, 100, 128)
    assert est.wall.value == pytest.approx(est.startup.value + est.generation.value)
    assert est.wall.low < est.wall.value < est.wall.high
    assert est.output_tokens == 2000 * 128 and est.rows == 2000
    eager = startup(plan, SMOL)
    compiled = startup(plan.__class__(**{**plan.__dict__, "enforce_eager": False}), SMOL)
    assert compiled.value > eager.value + 30  # a cold compile costs about a minute on the CPU
    # Twice the rows on the same plan, about twice the generation time; start-up unchanged.
    double = estimate_batch(plan, SMOL, cpu_only(24, node_available_gib=20), rows=4000, prompt_tokens=100,
                            max_tokens=128)
    assert double.generation.value == pytest.approx(2 * est.generation.value, rel=0.05)
    assert double.startup.value == est.startup.value


@pytest.mark.unit
def test_data_parallel_engines_share_the_rows():
    one = batch_estimate(LLAMA_8B, H100, 8000, 256, 256)[1]
    eight = batch_estimate(LLAMA_8B, gpus(8, 80, "NVIDIA H100 80GB HBM3"), 8000, 256, 256)[1]
    assert eight.engines == 8
    assert 6 < one.generation.value / eight.generation.value <= 8.01


@pytest.mark.unit
def test_training_time_from_flops_with_method_and_checkpointing():
    hw = H100
    base = plan_train(LLAMA_8B, gpus(8, 80, "NVIDIA H100 80GB HBM3"), method="full", strategy="fsdp",
                      gradient_checkpointing=False).to_dict()
    ckpt = {**base, "gradient_checkpointing": True}
    lora = {**base, "method": "lora"}
    est = {name: estimate_train(p, LLAMA_8B, hw, seq_len=2048, steps=100, steps_source="test")
           for name, p in (("full", base), ("ckpt", ckpt), ("lora", lora))}
    # 6 x params per token for full fine-tuning (3 passes), 8 x with recomputation, 4 x for LoRA; x1.1 sharded.
    assert est["full"].flops_per_token == pytest.approx(6 * LLAMA_8B.params * 1.1, rel=0.15)
    assert est["ckpt"].step.value / est["full"].step.value == pytest.approx(4 / 3, rel=0.01)
    assert est["lora"].step.value / est["full"].step.value == pytest.approx(2 / 3, rel=0.01)
    assert est["full"].wall.value == pytest.approx(100 * est["full"].step.value)
    assert est["full"].gpu_hours == pytest.approx(est["full"].wall.value / 3600 * base["num_processes"])


# --- learning from runs --------------------------------------------------------------------------------


def measurement(hw, est, *, ratio: float, rows: int = 500, startup_s: float = 20.0, **kw) -> dict:
    return {"model": SMOL.name, "model_digest": "d1", "hardware": throughput.hardware_fingerprint(hw),
            "task": "generate", "dtype": "bfloat16", "rows": rows, "prompt_tokens": rows * 30,
            "completion_tokens": rows * 64, "max_tokens": 64, "startup_s": startup_s, "enforce_eager": True,
            "generation_s": est.roofline_generation_s * ratio, "roofline_generation_s": est.roofline_generation_s,
            "tok_s": rows * 64 / (est.roofline_generation_s * ratio), **kw}


@pytest.mark.unit
def test_estimates_use_the_median_of_measurements_and_say_so(tmp_path):
    hw = cpu_only(24, ("avx2", "avx512_bf16"), node_available_gib=20)
    path = tmp_path / "throughput.jsonl"
    plan, roof = batch_estimate(SMOL, hw, 500, 30, 64)
    for ratio, start in ((0.5, 18.0), (0.6, 22.0), (2.0, 30.0)):
        throughput.append(measurement(hw, roof, ratio=ratio, startup_s=start), path)
    # Another model, another machine and another task are not this job's measurements.
    throughput.append(measurement(hw, roof, ratio=9.0, model_digest="other"), path)
    throughput.append(measurement(hw, roof, ratio=9.0, hardware="elsewhere"), path)
    throughput.append(measurement(hw, roof, ratio=9.0, task="embed"), path)
    found = throughput.matching(hardware=throughput.hardware_fingerprint(hw), task="generate", model_digest="d1",
                                model=SMOL.name, dtype=plan.dtype, path=path)
    assert len(found) == 3
    learned = estimate_batch(plan, SMOL, hw, rows=1000, prompt_tokens=30, max_tokens=64, measurements=found)
    _, fresh = batch_estimate(SMOL, hw, 1000, 30, 64)
    assert learned.generation.value == pytest.approx(fresh.generation.value * 0.6, rel=0.01)  # the median ratio
    assert learned.generation.source.startswith("measured 3 run(s)") and "median" in learned.generation.source
    assert learned.startup.value == 22.0 and "measured 3 start(s)" in learned.startup.source
    assert learned.generation.low < learned.generation.value < learned.generation.high


@pytest.mark.unit
def test_output_tokens_come_from_what_earlier_runs_generated():
    hw = cpu_only(24, node_available_gib=20)
    plan, roof = batch_estimate(SMOL, hw, 500, 30, 64)
    earlier = [measurement(hw, roof, ratio=1.0, completion_tokens=500 * 20)]  # stopped at 20 of 64 tokens a row
    est = estimate_batch(plan, SMOL, hw, rows=500, prompt_tokens=30, max_tokens=64, measurements=earlier)
    assert est.output_tokens == 500 * 20 and "produced 20 per row" in est.tokens_source
    other = estimate_batch(plan, SMOL, hw, rows=500, prompt_tokens=30, max_tokens=128, measurements=earlier)
    assert other.output_tokens == 500 * 128  # another max_tokens: the earlier runs say nothing about it


@pytest.mark.unit
def test_corrupt_and_torn_lines_are_skipped(tmp_path):
    path = tmp_path / "throughput.jsonl"
    throughput.append({"task": "generate", "rows": 1, "generation_s": 1.0}, path)
    with open(path, "a") as f:
        f.write("not json\n[1, 2]\n\x00\x00\n")
    throughput.append({"task": "generate", "rows": 2, "generation_s": 2.0}, path)
    with open(path, "a") as f:
        f.write('{"task": "generate", "rows": 3, "gen')  # a writer killed mid-line (not llmops's writer)
    assert [m["rows"] for m in throughput.read(path)] == [1, 2]
    throughput.append({"task": "generate", "rows": 4, "generation_s": 4.0}, path)
    assert [m["rows"] for m in throughput.read(path)] == [1, 2, 4]


def _append_many(path: str, writer: int, count: int, start_at: float) -> None:
    while time.time() < start_at:
        time.sleep(0.001)
    for i in range(count):
        throughput.append({"writer": writer, "i": i}, pytest_path(path))


def pytest_path(path: str):
    from pathlib import Path

    return Path(path)


@pytest.mark.unit
def test_concurrent_writers_all_land(tmp_path):
    path = tmp_path / "throughput.jsonl"
    ctx = multiprocessing.get_context("spawn")
    start_at = time.time() + 3.0  # every writer starts at the same moment (spawned interpreters need ~1 s)
    procs = [ctx.Process(target=_append_many, args=(str(path), w, 25, start_at)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    lines = throughput.read(path)
    assert sorted((m["writer"], m["i"]) for m in lines) == [(w, i) for w in range(4) for i in range(25)]
    stamps = [m["writer"] for m in lines]
    assert any(a != b for a, b in zip(stamps, stamps[1:-1])), "the writers ran one after another: nothing tested"


@pytest.mark.unit
def test_hardware_fingerprint_ignores_free_memory_but_not_the_machine():
    a = cpu_only(24, node_available_gib=20)
    assert throughput.hardware_fingerprint(a) == throughput.hardware_fingerprint(cpu_only(24, node_available_gib=7))
    assert throughput.hardware_fingerprint(a) != throughput.hardware_fingerprint(cpu_only(24, cores=4))
    assert throughput.hardware_fingerprint(H100) != throughput.hardware_fingerprint(gpus(2, 80, "NVIDIA H100 80GB HBM3"))


# --- prices, compare, hw -----------------------------------------------------------------------------------


@pytest.mark.unit
def test_prices_from_examples_file_and_flags(llmops_home):
    prices = load_prices()
    assert prices["1xH100"][1].startswith("example price")
    llmops_home.mkdir(parents=True)
    (llmops_home / "prices.yaml").write_text("1xH100: 2.5\nthis: 0.1\n")
    prices = load_prices(["8xH100=20"])
    assert prices["1xH100"][0] == 2.5 and prices["this"][0] == 0.1 and prices["8xH100"] == (20.0, "--price")
    (llmops_home / "prices.yaml").write_text("1xH100: cheap\n")
    proc = run_cli("hw", "--compare", env={"LLMOPS_HOME": str(llmops_home)})
    assert proc.returncode == 2 and "1xH100" in proc.stderr and "USD" in proc.stderr
    proc = run_cli("hw", "--compare", "--price", "1xH100", env={"LLMOPS_HOME": str(llmops_home / "x")})
    assert proc.returncode == 2 and "NAME=USD_PER_HOUR" in proc.stderr


@pytest.mark.unit
def test_compare_a_70b_batch_job_over_the_profiles(tmp_path, cpu_machine):
    extra = tmp_path / "my-h200.json"
    extra.write_text(json.dumps({"hardware": gpus(2, 141, "NVIDIA H200").to_dict()}))
    proc = run_cli("hw", "-m", "llama-3.3-70b", "--workload", "batch", "--rows", "2000000", "--max-tokens", "64",
                   "--compare", "--profile", str(extra), "--price", "8xH100=10", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["profile"]: r for r in json.loads(proc.stdout)["profiles"]}
    assert list(rows) == ["this (cpu-machine)", "my-h200", "1xL4", "1xA100-80GB", "1xH100", "8xH100", "cpu-32"]
    for name in ("this (cpu-machine)", "1xL4", "1xA100-80GB", "1xH100", "cpu-32"):
        assert not rows[name]["fits"] and "does not fit" in rows[name]["why"], name
    big = rows["8xH100"]
    assert big["fits"] and big["price_source"] == "--price"
    assert big["cost_usd"] == pytest.approx(big["estimate"]["wall"]["value"] / 3600 * 10, abs=0.01)
    assert rows["my-h200"]["fits"] and "cost_usd" not in rows["my-h200"]  # no price known for a file's profile
    text = run_cli("hw", "-m", "llama-3.3-70b", "--rows", "2000000", "--max-tokens", "64", "--compare").stdout
    assert "8xH100" in text and "(example price)" in text and "does not fit" in text


@pytest.mark.unit
def test_hw_prints_the_estimates_for_the_model(cpu_machine):
    data = json.loads(run_cli("hw", "-m", "smollm2-135m", "--rows", "100", "--json").stdout)
    batch = data["estimates"]["batch"]["estimate"]
    assert batch["rows"] == 100 and batch["wall"]["low"] < batch["wall"]["value"] < batch["wall"]["high"]
    assert data["estimates"]["train"]["estimate"]["steps"] == 25  # 100 sequences, global batch 4
    big = json.loads(run_cli("hw", "-m", "llama-3.3-70b", "--json").stdout)["estimates"]["batch"]
    assert big["fits"] is False and "does not fit" in big["why"]
    text = run_cli("hw", "-m", "smollm2-135m").stdout
    assert "batch estimate here" in text and "wall time" in text and "train estimate here" in text


# --- llmops batch status ---------------------------------------------------------------------------------

JOB = JobIdentity(input=InputIdentity(format="jsonl", files=["a.jsonl"], digest="00"),
                  model=ModelIdentity(name="m", path="/models/m", digest="11"), sampling={"temperature": 0.0},
                  engine=EngineIdentity(dtype="float32", max_model_len=2048), chunk_rows=2)


def _half_done_job(folder) -> OutputDir:
    out = OutputDir(folder)
    sizes = {"00000-000000": 2, "00000-000001": 2, "00000-000002": 2}
    manifest = Manifest(job=JOB, job_key=JOB.key(), status="running", rows_total=6)
    committed = out.prepare(JOB, sizes, False, manifest)
    stats = UnitStats(rows=2, ok=1, failed=1, prompt_tokens=10, completion_tokens=5)
    out.commit("00000-000000", pa.table({"row": [0, 1], "error": [None, "bad"]}), stats, JOB)
    committed.done["00000-000000"] = stats
    manifest.runs = [{"started": time.time() - 100, "host": "h1", "pid": 1, "rows_before": 0,
                      "ended": time.time() - 10, "rows_after": 2, "rows_per_s": 0.5}]
    out.write_manifest(manifest, committed, "stopped")
    return out


@pytest.mark.unit
def test_batch_status_reports_rows_runs_rate_and_time_left(tmp_path):
    out = _half_done_job(tmp_path / "out")
    proc = run_cli("batch", "status", str(tmp_path / "out"), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["rows"] == {"total": 6, "done": 2, "ok": 1, "failed": 1, "left": 4}
    assert report["runs"][0]["host"] == "h1" and report["runs"][0]["rows"] == 2
    assert report["time_left_s"] == pytest.approx(4 / 0.5) and report["held_by"] is None
    # A run holding the folder now: named, without status taking (or waiting for) its lock.
    out.lock()
    try:
        held = json.loads(run_cli("batch", "status", str(tmp_path / "out"), "--json").stdout)["held_by"]
        assert held is not None and "pid" in held
        text = run_cli("batch", "status", str(tmp_path / "out")).stdout
        assert "4 left of 6" in text and "held by" in text
    finally:
        out.unlock()


@pytest.mark.unit
def test_batch_status_on_a_bucket_reads_the_lease_without_taking_it(bucket):  # noqa: F811
    from llmops.cli.batch_status import job_status

    uri = f"s3://{bucket}/jobs/run1"
    out = _half_done_job(uri)
    report = job_status(uri)
    assert report["rows"]["left"] == 4 and report["held_by"] is None and report["shards"] == 1
    out.lock()  # a live run: its lease is renewed
    try:
        held = job_status(uri)["held_by"]
        assert held is not None and "lease renewed" in held and f"pid {os.getpid()}" in held
    finally:
        out.unlock()
    assert job_status(uri)["held_by"] is None


@pytest.mark.unit
def test_batch_status_refuses_a_folder_that_is_not_llmops_output(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    proc = run_cli("batch", "status", str(tmp_path / "other"))
    assert proc.returncode == 2 and "not the output of `llmops batch`" in proc.stderr
    proc = run_cli("batch", "status", str(tmp_path / "missing"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr


@pytest.mark.unit
def test_batch_input_positional_still_runs_beside_status(tmp_path, cpu_machine):
    """`status` is a word in INPUT's place; `llmops batch FILE` is the job as before (here its dry run, with the
    estimate)."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {i}"}) + "\n" for i in range(10)))
    proc = run_cli("batch", str(prompts), "-o", str(tmp_path / "out"), "--max-tokens", "32", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "# Estimate" in proc.stdout and "wall time" in proc.stdout and "10 rows" in proc.stdout
    data = json.loads(run_cli("batch", str(prompts), "-o", str(tmp_path / "out"), "--max-tokens", "32",
                              "--dry-run", "--json").stdout)
    est = data["estimate"]
    assert est["rows"] == 10 and est["output_tokens"] == 320 and est["rate"]["source"].startswith("roofline")


# --- the learning loop on a real engine ------------------------------------------------------------------

from tests.test_batch_engine import llm  # noqa: E402,F401  (the engine tests' engine fixture: one start here)


@pytest.mark.engine
def test_a_run_records_its_throughput_and_the_next_estimate_uses_it(llm, tmp_path, monkeypatch):  # noqa: F811
    from llmops.batch import BatchConfig, plan_batch, run_batch
    from llmops.batch.runner import dry_run
    from llmops.cli.batch_status import job_status
    from llmops.config import load_config
    from llmops.hardware import detect

    record = tmp_path / "throughput.jsonl"
    monkeypatch.setattr(throughput, "record_file", lambda: record)
    cfg = load_config(BatchConfig, sets=["engine.cpu_kv_cache_gib=1", "sampling.max_tokens=16"])
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Count from {i} to {i + 5}:"}) + "\n" for i in range(12)))
    summary = run_batch(cfg, str(prompts), tmp_path / "out", llm=llm)
    assert summary.rows_ok == 12
    assert summary.estimate is not None and summary.estimate["source"].startswith("roofline")
    [line] = throughput.read(record)
    assert line["rows"] == 12 and line["completion_tokens"] == summary.completion_tokens
    assert line["generation_s"] == pytest.approx(summary.generation_s, abs=0.02) and line["roofline_generation_s"] > 0
    assert line["hardware"] == throughput.hardware_fingerprint(detect()) and line["model_digest"]
    assert line["task"] == "generate" and line["max_tokens"] == 16
    # The next job of this model here is estimated from the measurement.
    other = tmp_path / "q.jsonl"
    other.write_text("".join(json.dumps({"prompt": f"Name a colour, {i}."}) + "\n" for i in range(40)))
    estimate = dry_run(plan_batch(cfg, str(other), tmp_path / "out2"))["estimate"]
    assert estimate["generation"]["source"].startswith("measured 1 run(s)"), estimate["generation"]
    ratio = line["generation_s"] / line["roofline_generation_s"]
    assert estimate["generation"]["value"] == pytest.approx(estimate["roofline_generation_s"] * ratio, rel=0.01)
    # And the finished job's status.
    report = job_status(str(tmp_path / "out"))
    assert report["rows"]["done"] == 12 and report["rows"]["left"] == 0 and report["held_by"] is None
    assert report["runs"][0]["rows"] == 12 and report["status"] == "complete"


@pytest.mark.engine
def test_calibrate_measures_a_warm_sample_records_it_and_leaves_the_output_alone(tmp_path, monkeypatch):
    from llmops.batch import BatchConfig
    from llmops.batch.calibrate import calibrate
    from llmops.config import load_config

    record = tmp_path / "throughput.jsonl"
    monkeypatch.setattr(throughput, "record_file", lambda: record)
    cfg = load_config(BatchConfig, sets=["engine.cpu_kv_cache_gib=1", "engine.enforce_eager=true",
                                         "sampling.max_tokens=8"])
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Count from {i} to {i + 5}:"}) + "\n" for i in range(200)))
    found = calibrate(cfg, str(prompts), str(tmp_path / "out"), rows=24)
    assert not (tmp_path / "out").exists()  # the job's own folder is not touched
    sample = found["calibration"]
    assert sample["rows_ok"] == 24 and sample["engine_start_s"] > 0 and sample["warmup_s"] >= 0
    [line] = throughput.read(record)  # the warm-up rows are not recorded as a run of their own
    assert line["rows"] == 24 and line["warmup_s"] == pytest.approx(sample["warmup_s"], abs=0.01)
    assert line["startup_s"] == pytest.approx(sample["engine_start_s"] + sample["warmup_s"], abs=0.02)
    assert line["input_bytes_per_prompt_token"] > 0 and line["max_tokens"] == 8
    estimate = found["estimate"]
    assert estimate["rows"] == 200 and estimate["generation"]["source"].startswith("measured 1 run(s)")
    assert "counted on a sample" in estimate["tokens_source"]
    assert estimate["prompt_tokens"] == 200 * round(sample["prompt_tokens"] / 24)
    # The whole job's generation is the sample's, scaled by the roofline from 24 rows to 200.
    assert estimate["generation"]["value"] == pytest.approx(
        estimate["roofline_generation_s"] * line["generation_s"] / line["roofline_generation_s"], rel=0.01)


@pytest.mark.engine
def test_calibrate_an_embedding_job(tmp_path, monkeypatch, default_embed_model_dir):
    # Its warm-up rows once ran with a shorter max_tokens, a sampling setting an embedding job refuses.
    from llmops.batch import BatchConfig
    from llmops.batch.calibrate import calibrate
    from llmops.config import load_config

    record = tmp_path / "throughput.jsonl"
    monkeypatch.setattr(throughput, "record_file", lambda: record)
    cfg = load_config(BatchConfig, sets=[f"model={default_embed_model_dir}", "engine.enforce_eager=true"])
    texts = tmp_path / "t.jsonl"
    texts.write_text("".join(json.dumps({"prompt": f"Note {i}: the river runs past the mill."}) + "\n"
                             for i in range(120)))
    found = calibrate(cfg, str(texts), str(tmp_path / "out"), rows=24)
    assert found["calibration"]["rows_ok"] == 24 and found["estimate"]["rows"] == 120
    [line] = throughput.read(record)
    assert line["task"] == "embed" and line["rows"] == 24


@pytest.mark.unit
def test_train_dry_run_gives_steps_and_time(cpu_machine, tmp_path):
    def estimate(*sets):
        proc = run_cli("train", "lora-smollm2", "--dry-run", "--json", *(a for s in sets for a in ("--set", s)))
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)["estimate"]

    short, double = estimate("train.max_steps=10"), estimate("train.max_steps=20")
    assert short["steps"] == 10 and short["steps_source"] == "train.max_steps"
    assert double["wall"]["value"] == pytest.approx(2 * short["wall"]["value"])
    data = tmp_path / "d.jsonl"
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    data.write_text("".join(json.dumps({"messages": chat}) + "\n" for i in range(30)) + "\n")
    epochs = estimate(f"data.path={data}", "train.epochs=2", "train.max_steps=null", "data.eval_fraction=0",
                      "train.micro_batch_size=4")
    assert epochs["steps"] == 2 * 8 and "30 examples" in epochs["steps_source"]  # ceil(30 / 4) a epoch
    text = run_cli("train", "lora-smollm2", "--dry-run").stdout
    assert "# Estimate" in text and "step time" in text


@pytest.mark.unit
def test_calibration_samples_rows_spread_over_jsonl_and_parquet_inputs(tmp_path):
    import pyarrow.parquet as pq

    from llmops.batch.calibrate import _sample
    from llmops.batch.config import InputConfig
    from llmops.batch.inputs import open_input

    lines = tmp_path / "in.jsonl"
    lines.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" + ("\n" if i % 3 else "") for i in range(100)))
    sample = _sample(open_input(str(lines), InputConfig()), 64, tmp_path / "a")
    assert [json.loads(x)["prompt"] for x in sample.read_text().splitlines()] == [f"p{i}" for i in range(64)]
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(2):
        pq.write_table(pa.table({"text": [f"t{s}-{i}" for i in range(40)]}), shards / f"{s}.parquet")
    sample = _sample(open_input(str(shards), InputConfig()), 64, tmp_path / "b")
    assert pq.read_table(sample).num_rows == 64
    # Spread over the whole input (a sorted input's first rows are not like the rest), across files too.
    sample = _sample(open_input(str(lines), InputConfig()), 10, tmp_path / "c", total=100)
    assert [json.loads(x)["prompt"] for x in sample.read_text().splitlines()] == [f"p{i}" for i in range(0, 100, 10)]
    sample = _sample(open_input(str(shards), InputConfig()), 8, tmp_path / "d", total=80)
    assert pq.read_table(sample).column("text").to_pylist() == [f"t{i // 40}-{i % 40}" for i in range(0, 80, 10)]


@pytest.mark.unit
def test_calibration_warms_up_on_the_first_rows_and_measures_the_rest(tmp_path):
    import pyarrow.parquet as pq

    from llmops.batch.calibrate import _split

    lines = tmp_path / "sample.jsonl"
    lines.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(80)))
    warm, rest = _split(lines, 16)
    assert [json.loads(x)["prompt"] for x in warm.read_text().splitlines()] == [f"p{i}" for i in range(16)]
    assert [json.loads(x)["prompt"] for x in rest.read_text().splitlines()] == [f"p{i}" for i in range(16, 80)]
    table = tmp_path / "sample.parquet"
    pq.write_table(pa.table({"text": [f"t{i}" for i in range(80)]}), table)
    warm, rest = _split(table, 16)
    assert pq.read_table(warm).column("text").to_pylist() == [f"t{i}" for i in range(16)]
    assert pq.read_table(rest).column("text").to_pylist() == [f"t{i}" for i in range(16, 80)]
    small = tmp_path / "small" / "sample.jsonl"
    small.parent.mkdir()
    small.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(20)))
    assert _split(small, 16) == (None, small)  # too few rows to leave a sample after a warm-up: none


@pytest.mark.engine
def test_a_training_run_records_its_time_per_token_and_the_next_dry_run_uses_it(tiny_model_dir, tmp_path):  # noqa: F811
    from tests.train_helpers import TRAIN_ENV, tiny_recipe

    home = {"LLMOPS_HOME": str(tmp_path / "home")}
    recipe = tiny_recipe(tmp_path, tiny_model_dir, **{"train.max_steps": 6, "export.add_to_registry": False})

    def dry_run():
        proc = run_cli("train", str(recipe), "-o", str(tmp_path / "run"), "--dry-run", "--json", env=home)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)["estimate"]["step"]

    before = dry_run()
    assert "forward passes per token" in before["source"]
    done = run_cli("train", str(recipe), "-o", str(tmp_path / "run"), env={**TRAIN_ENV, **home})
    assert done.returncode == 0, done.stderr[-2000:]
    [line] = throughput.read(tmp_path / "home" / "throughput.jsonl")
    assert line["task"] == "train" and line["model"] == str(tiny_model_dir) and line["steps"] == 5  # step 1 left out
    assert line["s_per_token"] > 0 and line["roofline_s_per_token"] > 0 and line["num_processes"] == 1
    after = dry_run()
    assert after["source"].startswith("measured 1 run(s) of this model here")
    ratio = line["s_per_token"] / line["roofline_s_per_token"]
    assert after["value"] == pytest.approx(before["value"] * ratio, rel=1e-3)
