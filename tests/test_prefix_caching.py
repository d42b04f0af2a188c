"""Prefix caching (issue 24): planned per workload, model and hardware, passed to vLLM explicitly and shown by
`--dry-run`; and `llmops serve`'s status line, read from vLLM's `/metrics`. Unit tests on fake hardware; the
status line of a real server is checked in tests/test_serve.py."""

from __future__ import annotations

import http.server
import threading

import pytest

from llmops.errors import UsageError
from llmops.facts import ModelFacts
from llmops.plan import EngineConfig, plan_engine
from llmops.registry import shape_from_config
from llmops.serve.status import Snapshot, StatusLine, parse_metrics, status_line
from llmops.vllm_engine import as_cli_flags, engine_args
from tests.conftest import run_cli
from tests.fake_hardware import ONE_24GIB_GPU, cpu_only, gpus
from tests.test_plan import facts, plan_of

pytestmark = pytest.mark.unit

AMX_CPU = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
# The attention part of DeepSeek-V2-Lite's config.json: a latent KV (kv_lora_rank), so vLLM uses MLA.
MLA_CONFIG = {"model_type": "deepseek_v2", "num_hidden_layers": 27, "hidden_size": 2048, "num_attention_heads": 16,
              "num_key_value_heads": 16, "vocab_size": 102400, "intermediate_size": 10944, "kv_lora_rank": 512,
              "qk_rope_head_dim": 64, "max_position_embeddings": 163840}


def mla_facts(**config) -> ModelFacts:
    shape = shape_from_config({**MLA_CONFIG, **config})
    return ModelFacts("deepseek-v2-lite", 15_700_000_000, 4096, shape)


def flags(plan) -> list[str]:
    return as_cli_flags(engine_args(plan, "/m"))


# --- the plan ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [cpu_only(24), ONE_24GIB_GPU], ids=["cpu", "gpu"])
@pytest.mark.parametrize("workload", ["serve", "batch"])
def test_generation_turns_prefix_caching_on_and_tells_vllm_so(hw, workload):
    plan = plan_of("smollm2-135m", hw, workload)
    assert plan.enable_prefix_caching is True
    assert engine_args(plan, "/m")["enable_prefix_caching"] is True and "--enable-prefix-caching" in flags(plan)
    why = next(n for n in plan.notes if n.startswith("prefix caching"))
    assert ("conversation" in why) == (workload == "serve") and ("rows" in why) == (workload == "batch")


def test_enable_prefix_caching_false_turns_it_off_with_the_negative_flag():
    plan = plan_of("smollm2-135m", cpu_only(24), "serve", enable_prefix_caching=False)
    assert plan.enable_prefix_caching is False and engine_args(plan, "/m")["enable_prefix_caching"] is False
    assert "--no-enable-prefix-caching" in flags(plan) and "--enable-prefix-caching" not in flags(plan)
    assert any("engine.enable_prefix_caching=false" in n for n in plan.notes)


def test_an_encoder_embedder_has_none_and_asking_for_it_is_a_usage_error():
    plan = plan_of("all-minilm-l6-v2", cpu_only(24), "batch", {"task": "embed"})
    assert plan.enable_prefix_caching is False and "--no-enable-prefix-caching" in flags(plan)
    assert any(n.startswith("no prefix caching: an encoder") for n in plan.notes)
    with pytest.raises(UsageError, match="enable_prefix_caching=true: vLLM does not support it here"):
        plan_of("all-minilm-l6-v2", cpu_only(24), "batch", {"task": "embed"}, enable_prefix_caching=True)


def test_a_decoder_run_as_an_embedder_leaves_it_to_vllm_which_reads_its_pooling():
    plan = plan_of("smollm2-135m", cpu_only(24), "batch", {"task": "embed"}, convert="embed")
    assert plan.enable_prefix_caching is None and "enable_prefix_caching" not in engine_args(plan, "/m")
    assert any("vLLM decides from the model's pooling" in n for n in plan.notes)


def test_mla_is_read_from_config_json_and_a_bidirectional_variant_is_not_mla():
    assert mla_facts().shape.mla and not mla_facts(is_causal=False).shape.mla
    assert not shape_from_config({k: v for k, v in MLA_CONFIG.items() if k != "kv_lora_rank"}).mla


@pytest.mark.parametrize("isa, on", [(("avx2", "avx512f"), False), (AMX_CPU, True)], ids=["no-amx", "amx"])
def test_an_mla_model_on_the_cpu_has_prefix_caching_only_with_amx(isa, on):
    plan = plan_engine(EngineConfig(), mla_facts(), cpu_only(256, isa, cores=32), workload="serve")
    assert plan.enable_prefix_caching is on
    assert any("uses MLA" in n for n in plan.notes) != on
    if not on:
        with pytest.raises(UsageError, match="uses MLA"):
            plan_engine(EngineConfig(enable_prefix_caching=True), mla_facts(), cpu_only(256, isa, cores=32),
                        workload="serve")
    # a GPU runs MLA with prefix caching
    gpu = plan_engine(EngineConfig(), mla_facts(), gpus(1, 80), workload="serve")
    assert gpu.enable_prefix_caching is True


def test_serve_and_batch_dry_runs_show_the_field_and_why(cpu_machine, tmp_path):
    serve = run_cli("serve", "--dry-run", "--set", "engine.enable_prefix_caching=false")
    assert serve.returncode == 0, serve.stderr
    assert "enable_prefix_caching: False" in serve.stdout and "--no-enable-prefix-caching" in serve.stdout
    assert "why: no prefix caching (engine.enable_prefix_caching=false)" in serve.stdout
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "hi"}\n')
    batch = run_cli("batch", str(rows), "-o", str(tmp_path / "out"), "--dry-run")
    assert batch.returncode == 0, batch.stderr
    assert "enable_prefix_caching: True" in batch.stdout and "'enable_prefix_caching': True" in batch.stdout
    assert "why: prefix caching: rows that share a prefix" in batch.stdout
    wrong = run_cli("serve", "--dry-run", "--set", "engine.enable_prefix_caching=maybe")
    assert wrong.returncode == 2 and "enable_prefix_caching" in wrong.stderr


# --- the status line -----------------------------------------------------------------------------------

# What vLLM 0.32's /metrics holds for these (prometheus_client's text format): two engines (data parallel),
# counters with their _total and _created samples.
METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="smollm2-135m"} 2.0
vllm:num_requests_running{engine="1",model_name="smollm2-135m"} 1.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="smollm2-135m"} 0.0
vllm:num_requests_waiting{engine="1",model_name="smollm2-135m"} 4.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="smollm2-135m"} 0.125
vllm:kv_cache_usage_perc{engine="1",model_name="smollm2-135m"} 0.0625
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="smollm2-135m"} {q0}
vllm:prefix_cache_queries_total{engine="1",model_name="smollm2-135m"} 1000.0
vllm:prefix_cache_queries_created{engine="0",model_name="smollm2-135m"} 1.7650e+09
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="smollm2-135m"} {h0}
vllm:prefix_cache_hits_total{engine="1",model_name="smollm2-135m"} 500.0
# HELP vllm:external_prefix_cache_hits_total External prefix cache hits.
# TYPE vllm:external_prefix_cache_hits_total counter
vllm:external_prefix_cache_hits_total{engine="0",model_name="smollm2-135m"} 99999.0
"""


def metrics(queries: int, hits: int) -> str:
    return METRICS.replace("{q0}", f"{queries}.0").replace("{h0}", f"{hits}.0")


def test_metrics_are_summed_over_engines_and_the_kv_cache_is_the_fullest():
    snap = parse_metrics(metrics(3000, 2500))
    assert snap == Snapshot(running=3, waiting=4, kv_usage=0.125, prefix_queries=4000, prefix_hits=3000)


def test_the_hit_rate_is_since_the_last_line_and_an_idle_server_prints_nothing():
    first = parse_metrics(metrics(3000, 2500))
    assert status_line(None, first) == ("llmops serve: 3 running, 4 waiting; KV cache 12.5% used; "
                                        "prefix cache hits 75% of 4,000 prompt tokens")
    assert status_line(first, first) is None
    later = parse_metrics(metrics(4000, 3400))  # 1000 more tokens queried, 900 of them hits
    assert status_line(first, later).endswith("prefix cache hits 90% of 1,000 prompt tokens")
    drained = Snapshot(0, 0, 0.0, later.prefix_queries, later.prefix_hits)  # the same tokens, requests done
    assert status_line(later, drained) == ("llmops serve: 0 running, 0 waiting; KV cache 0.0% used; "
                                           "no new prompts")
    assert status_line(None, Snapshot(0, 0, 0.0, 0, 0)) is None  # nothing served yet
    restarted = Snapshot(1, 0, 0.01, 200, 50)  # counters went back: counted from zero
    assert status_line(later, restarted).endswith("prefix cache hits 25% of 200 prompt tokens")


def test_the_status_line_polls_metrics_on_its_interval_and_logs_only_changes():
    served = {"text": metrics(3000, 2500)}

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = served["text"].encode()
            self.send_response(200 if self.path == "/metrics" else 404)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    now = [0.0]
    logged: list[str] = []
    try:
        status = StatusLine(f"http://127.0.0.1:{server.server_address[1]}", 30, logged.append, lambda: now[0])
        status.tick()
        assert logged == []  # not due yet
        now[0] = 30
        status.tick()
        now[0] = 45
        status.tick()  # due at 60: no second reading
        assert logged == [status_line(None, parse_metrics(served["text"]))]
        now[0] = 60
        status.tick()  # nothing changed: no line
        served["text"] = metrics(3400, 2600)
        now[0] = 90
        status.tick()
        assert len(logged) == 2 and logged[1].endswith("prefix cache hits 25% of 400 prompt tokens")
        off = StatusLine(f"http://127.0.0.1:{server.server_address[1]}", 0, logged.append, lambda: now[0])
        now[0] = 1e6
        off.tick()
        assert len(logged) == 2
    finally:
        server.shutdown()
    gone = StatusLine("http://127.0.0.1:9", 1, logged.append, lambda: now[0] + 10)
    gone.tick()  # a server that does not answer is skipped
    assert len(logged) == 2


def test_status_every_comes_from_the_flag_and_negative_is_a_usage_error(cpu_machine):
    from llmops.config import load_config
    from llmops.serve.config import ServeConfig

    assert load_config(ServeConfig, flags={"status_every_s": 5}).status_every_s == 5
    assert ServeConfig().status_every_s == 30
    proc = run_cli("serve", "--status-every", "-1", "--dry-run")
    assert proc.returncode == 2 and "--status-every" in proc.stderr
