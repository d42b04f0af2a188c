import pytest

from llmops.errors import DoesNotFitError, UsageError
from llmops.hardware import GIB
from llmops.plan import EngineConfig, estimate_params, model_facts, plan_engine
from llmops.registry import resolve
from tests.fake_hardware import EIGHT_80GIB_GPUS, ONE_24GIB_GPU, cpu_only, gpus

pytestmark = pytest.mark.unit


def facts(name):
    return model_facts(resolve(name))


def plan_of(name, hw, workload, job=None, **config):
    """The engine plan for registry model `name`; `config` holds EngineConfig fields, `job` a batch job's size."""
    return plan_engine(EngineConfig(**config), facts(name), hw, workload=workload, **(job or {}))


def test_param_estimate_matches_published_counts():
    # The registry's counts come from the model cards; the formula must land close without them.
    for name in ("smollm2-135m", "llama-3.1-8b", "qwen2.5-7b", "llama-3.3-70b"):
        spec = resolve(name).spec
        shape = spec.shape.model_copy(update={"intermediate_size": {
            "smollm2-135m": 1536, "llama-3.1-8b": 14336, "qwen2.5-7b": 18944, "llama-3.3-70b": 28672}[name],
            "tie_word_embeddings": name == "smollm2-135m"})
        assert estimate_params(shape) == pytest.approx(spec.params, rel=0.03), name


def test_cpu_without_native_bf16_plans_fp32_eager_and_a_sized_kv_cache():
    plan = plan_of("smollm2-135m", cpu_only(24), "batch")
    assert (plan.device, plan.dtype, plan.enforce_eager) == ("cpu", "float32", True)
    assert plan.tensor_parallel_size == plan.data_parallel_size == 1
    assert 1 <= plan.cpu_kv_cache_gib <= 8
    assert plan.max_model_len == 8192  # the whole context fits
    # 2 (K,V) x 30 layers x 3 KV heads x 64 dims x 4 bytes = 46080 bytes a token
    assert plan.kv_cache_tokens == plan.cpu_kv_cache_gib * GIB // 46080


def test_cpu_with_native_bf16_plans_bf16():
    plan = plan_of("smollm2-135m", cpu_only(24, ("avx2", "avx512f", "avx512_bf16")), "serve")
    assert plan.dtype == "bfloat16"


def test_cpu_model_too_big_exits_3_with_numbers():
    with pytest.raises(DoesNotFitError) as err:
        plan_of("llama-3.1-8b", cpu_only(24), "serve")
    msg = str(err.value)
    assert err.value.exit_code == 3
    assert "needs" in msg and "has" in msg and "GiB" in msg
    assert err.value.hint


def test_small_kv_cache_shortens_max_model_len():
    plan = plan_of("llama-3.1-8b", ONE_24GIB_GPU, "serve")
    assert (plan.device, plan.dtype, plan.tensor_parallel_size) == ("cuda", "bfloat16", 1)
    # 24 GiB x 0.9 - 2 GiB overhead - the bf16 weights leaves ~4.6 GiB: ~37k tokens at 128 KiB each.
    weights = resolve("llama-3.1-8b").spec.params * 2
    kv_tokens = int((24 * GIB * 0.9 - 2 * GIB - weights) // (2 * 32 * 8 * 128 * 2))
    assert plan.kv_cache_tokens == kv_tokens == pytest.approx(37_000, rel=0.03)
    assert plan.max_model_len == kv_tokens // 256 * 256
    assert any(f"max_model_len {plan.max_model_len}: the KV cache holds {kv_tokens} tokens" in n for n in plan.notes)


def test_explicit_max_model_len_that_does_not_fit_a_gpu_exits_3_with_the_numbers():
    # It was shortened silently to what the cache holds; an explicit value is never changed.
    with pytest.raises(DoesNotFitError, match=r"max_model_len 131072 does not fit: .* cache holds 3\d{4}") as err:
        plan_of("llama-3.1-8b", ONE_24GIB_GPU, "serve", max_model_len=131072)
    assert err.value.exit_code == 3 and "at most 3" in err.value.hint
    assert plan_of("llama-3.1-8b", ONE_24GIB_GPU, "serve", max_model_len=16384).max_model_len == 16384


def test_gpu_memory_held_by_other_processes_lowers_gpu_memory_utilization():
    from llmops.hardware import GPU

    base = gpus(1, 80)
    busy = base.__class__(cpu=base.cpu, ram=base.ram, disk=base.disk,
                          gpus=(GPU(0, "NVIDIA H100", 80 * GIB, 50 * GIB, "9.0"),))  # 30 GiB held elsewhere
    plan = plan_of("llama-3.1-8b", busy, "serve")
    # vLLM refuses to start unless utilization x total is free: 50/80 = 0.625, less a 2% margin.
    assert plan.gpu_memory_utilization == 0.60
    assert any("other processes hold 30.0 GiB of GPU 0" in n for n in plan.notes)
    expected = int((80 * GIB * 0.60 - 2 * GIB - resolve("llama-3.1-8b").spec.params * 2) // (2 * 32 * 8 * 128 * 2))
    assert plan.kv_cache_tokens == expected
    assert plan_of("llama-3.1-8b", ONE_24GIB_GPU, "serve").gpu_memory_utilization == 0.90  # 98% free: default


def test_70b_on_eight_h100s_uses_every_gpu():
    # serve: tensor parallel 2 fits the weights but holds only ~26k tokens; 4 holds the whole 131k context,
    # and two such replicas use all 8 GPUs (vLLM's --data-parallel-size).
    serve = plan_of("llama-3.3-70b", EIGHT_80GIB_GPUS, "serve")
    assert (serve.tensor_parallel_size, serve.data_parallel_size, serve.max_model_len) == (4, 2, 131072)
    assert any("whole 131072-token context" in n for n in serve.notes)
    assert any("data_parallel_size 2" in n and "all 8 GPUs" in n for n in serve.notes)
    from llmops.vllm_engine import as_cli_flags, engine_args

    assert as_cli_flags(engine_args(serve, "/m"))[-2:] == ["--data-parallel-size", "2"]
    batch = plan_of("llama-3.3-70b", EIGHT_80GIB_GPUS, "batch")
    assert (batch.tensor_parallel_size, batch.data_parallel_size) == (2, 4)
    assert "data_parallel_size" not in engine_args(batch, "/m")  # llmops runs one engine per GPU group
    small = plan_of("llama-3.1-8b", EIGHT_80GIB_GPUS, "serve")
    assert (small.tensor_parallel_size, small.data_parallel_size) == (1, 8)


def test_70b_on_one_24gib_gpu_does_not_fit():
    with pytest.raises(DoesNotFitError, match=r"needs about .* GiB per GPU"):
        plan_of("llama-3.3-70b", ONE_24GIB_GPU, "serve")


def test_old_gpu_gets_fp16_and_explicit_values_are_checked():
    assert plan_of("qwen2.5-0.5b", gpus(1, 16, "Tesla T4", "7.5"), "serve").dtype == "float16"
    with pytest.raises(DoesNotFitError, match="needs 4 GPUs"):
        plan_of("qwen2.5-7b", ONE_24GIB_GPU, "serve", tensor_parallel_size=4)
    with pytest.raises(UsageError, match="longer than"):
        plan_of("smollm2-135m", cpu_only(), "serve", max_model_len=100000)
    with pytest.raises(DoesNotFitError, match="no NVIDIA GPU"):
        plan_of("smollm2-135m", cpu_only(), "serve", device="cuda")


# --- the CPU KV cache: the NUMA node vLLM binds to, and what the workload can use ----------------------

SMOLLM2_BF16_KV_PER_TOKEN = 2 * 30 * 3 * 64 * 2  # 23040 bytes
AVX512_BF16 = ("avx2", "avx512f", "avx512_bf16")


def test_cpu_kv_cache_fits_a_numa_node_smaller_than_half_the_ram():
    # The machine of issue 9: /proc/meminfo 23.5 GiB, node 0 with 6.48 GiB available; vLLM refused 8 GiB.
    hw = cpu_only(23.5, AVX512_BF16, node_available_gib=6.48)
    plan = plan_of("smollm2-135m", hw, "batch")
    weights = plan.weights_gib * GIB
    room = 6.48 * GIB * 0.9 - weights - 1.5 * GIB  # node less 10%, the weights and the engine's processes
    assert plan.cpu_kv_cache_gib == int(room // GIB) == 4
    assert plan.cpu_kv_cache_gib * GIB + weights < 6.48 * GIB
    assert any("NUMA node 0" in n and "6.5 GiB available" in n for n in plan.notes)
    # A node with 3.7 GiB still gets a 1 GiB cache, the most that fits beside the engine.
    small = plan_of("smollm2-135m", cpu_only(23.5, AVX512_BF16, node_available_gib=3.7), "serve")
    assert small.cpu_kv_cache_gib == 1
    with pytest.raises(DoesNotFitError, match="NUMA node 0") as err:
        plan_of("smollm2-135m", cpu_only(23.5, AVX512_BF16, node_available_gib=2.0), "serve")
    assert err.value.exit_code == 3


def test_explicit_cpu_kv_cache_larger_than_the_node_exits_3():
    hw = cpu_only(23.5, AVX512_BF16, node_available_gib=6.48)
    with pytest.raises(DoesNotFitError, match=r"8 GiB does not fit on NUMA node 0.*6\.5 GiB available"):
        plan_of("smollm2-135m", hw, "batch", cpu_kv_cache_gib=8)
    assert plan_of("smollm2-135m", hw, "batch", cpu_kv_cache_gib=2).cpu_kv_cache_gib == 2


def test_cpu_kv_cache_is_no_bigger_than_the_workload_can_use():
    hw = cpu_only(64, AVX512_BF16, node_available_gib=60)
    # batch: 256 running sequences x the row length the caller expects (200 tokens: 1.1 GiB -> 2 GiB).
    batch = plan_of("smollm2-135m", hw, "batch", job={"prompt_tokens": 100, "max_tokens": 100})
    assert batch.cpu_kv_cache_gib == -(-256 * 200 * SMOLLM2_BF16_KV_PER_TOKEN // GIB) == 2
    assert any("256 sequences at once x 200 tokens" in n for n in batch.notes)
    # serve: 8 streams per core (16 on 2 cores) at the full 8192-token context: 2.8 GiB -> 3 GiB.
    serve = plan_of("smollm2-135m", hw, "serve")
    assert serve.cpu_kv_cache_gib == -(-16 * 8192 * SMOLLM2_BF16_KV_PER_TOKEN // GIB) == 3
    assert serve.kv_cache_tokens == 3 * GIB // SMOLLM2_BF16_KV_PER_TOKEN


def test_vllm_refusing_its_kv_allocation_becomes_exit_3_naming_the_knob(tmp_path):
    from llmops.vllm_engine import explain_engine_failure

    # The message of issue 9, logged by vLLM's engine process; the caller's exception says only "see above".
    log = ("ValueError: Available memory on node 0 (6.48/8.46 GiB) on kv cache allocation is less than requested "
           "memory for kv (8.0 GiB). Decrease --kv-cache-memory-bytes, VLLM_CPU_KVCACHE_SPACE, or reduce CPU ...")
    err = explain_engine_failure(RuntimeError("Engine core initialization failed. See root cause above."), log)
    assert err is not None and err.exit_code == 3
    assert "node 0 had 6.48 of 8.46 GiB available when 8.0 GiB were asked for" in err.message
    assert "engine.cpu_kv_cache_gib" in err.hint
    gpu = explain_engine_failure(ValueError(
        "Free memory on device cuda:0 (30.1/79.2 GiB) on startup is less than desired GPU memory utilization "
        "(0.9, 71.3 GiB). Decrease GPU memory utilization or reduce GPU memory used by other processes."))
    assert gpu is not None and "engine.gpu_memory_utilization" in gpu.hint
    # vLLM's own default (no KV size given) is refused at start-up instead, as seen on this machine
    startup = explain_engine_failure(RuntimeError("see above"), (
        "ValueError: Available memory on node 0 (14.01/20.34 GiB) on startup is less than desired CPU memory "
        "utilization (0.92, 18.71 GiB). On the CPU backend, the `--gpu-memory-utilization` flag controls ..."))
    assert "node 0 had 14.01 of 20.34 GiB available when 18.71 GiB were asked for" in startup.message
    assert explain_engine_failure(RuntimeError("something else")) is None
    # batch passes the path of the log its engine wrote to
    (tmp_path / "batch.log").write_text("Loading weights...\n" + log + "\n")
    assert explain_engine_failure(RuntimeError("see above"), tmp_path / "batch.log").exit_code == 3


def test_cpu_cores_reserved_for_vllms_front_end_follow_the_core_count():
    from llmops.vllm_engine import engine_env

    two = plan_of("smollm2-135m", cpu_only(24, AVX512_BF16, cores=2), "batch")
    assert two.cpu_reserved_cores == 0  # vLLM's default of 1 leaves the engine one core of two
    assert engine_env(two) == {"VLLM_CPU_KVCACHE_SPACE": str(two.cpu_kv_cache_gib), "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
                               "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    assert any(n.startswith("cpu_reserved_cores 0:") and "1.52x" in n for n in two.notes)
    assert plan_of("smollm2-135m", cpu_only(64, AVX512_BF16, cores=16), "serve").cpu_reserved_cores == 1
    assert plan_of("smollm2-135m", cpu_only(64, AVX512_BF16, cores=64), "serve").cpu_reserved_cores == 2
    assert plan_of("smollm2-135m", cpu_only(64, AVX512_BF16, cores=64), "batch").cpu_reserved_cores == 1
    explicit = plan_of("smollm2-135m", cpu_only(24, AVX512_BF16), "batch", cpu_reserved_cores=1)
    assert explicit.cpu_reserved_cores == 1 and not any("cpu_reserved_cores" in n for n in explicit.notes)


def test_a_cpu_batch_engine_runs_in_process_where_no_core_is_kept_for_a_front_end():
    from llmops.vllm_engine import engine_env

    two = plan_of("smollm2-135m", cpu_only(24, AVX512_BF16, cores=2), "batch")
    assert two.in_process and engine_env(two)["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert any(n.startswith("in_process: ") and "11 s against 26 s" in n for n in two.notes)
    embed = plan_engine(EngineConfig(), facts("all-minilm-l6-v2"), cpu_only(24, AVX512_BF16, cores=2), workload="batch",
                        task="embed")
    assert embed.runner == "pooling" and embed.in_process
    # A reserved core runs vLLM's front end beside the engine: its own processes, as vLLM runs them
    sixteen = plan_of("smollm2-135m", cpu_only(64, AVX512_BF16, cores=16), "batch")
    assert sixteen.cpu_reserved_cores == 1 and not sixteen.in_process
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in engine_env(sixteen)
    assert any(n.startswith("in_process false: ") for n in sixteen.notes)
    for hw, workload in ((cpu_only(24, AVX512_BF16, cores=2), "serve"), (ONE_24GIB_GPU, "batch")):
        plan = plan_of("smollm2-135m", hw, workload)
        assert not plan.in_process and "VLLM_ENABLE_V1_MULTIPROCESSING" not in engine_env(plan)
        assert not any("in_process" in n for n in plan.notes)
    # Either way on request, for batch; a server's engine always runs beside its API server
    assert not plan_of("smollm2-135m", cpu_only(24, AVX512_BF16, cores=2), "batch", in_process=False).in_process
    assert plan_of("smollm2-135m", cpu_only(64, AVX512_BF16, cores=16), "batch", in_process=True).in_process
    with pytest.raises(UsageError, match="engine.in_process applies to batch"):
        plan_of("smollm2-135m", cpu_only(24, AVX512_BF16, cores=2), "serve", in_process=True)


def test_batch_compiles_only_when_the_job_is_long_enough_to_win_back_the_compile_time():
    hw = cpu_only(24, AVX512_BF16)
    small = plan_of("smollm2-135m", hw, "batch", job={"rows": 300, "max_tokens": 64})
    assert small.enforce_eager and any("compiling would cost" in n for n in small.notes)
    large = plan_of("smollm2-135m", hw, "batch", job={"rows": 200_000, "max_tokens": 256})
    assert not large.enforce_eager and any(n.startswith("torch.compile: the job is") for n in large.notes)
    assert plan_of("smollm2-135m", hw, "batch").enforce_eager  # size unknown: start fast
    assert not plan_of("smollm2-135m", hw, "batch", enforce_eager=False).enforce_eager
    # A warm compile cache makes compiling cheap (~9 s, not ~1 min): a mid-sized job then compiles too.
    mid = {"rows": 3000, "max_tokens": 128}
    assert plan_of("smollm2-135m", hw, "batch", job=mid).enforce_eager
    assert not plan_of("smollm2-135m", hw, "batch", job={**mid, "compile_cache_warm": True}).enforce_eager


def test_a_server_compiles_once_its_compile_cache_is_warm():
    hw = cpu_only(24, AVX512_BF16)
    cold = plan_of("smollm2-135m", hw, "serve")
    assert cold.enforce_eager and any("never compiled here" in n for n in cold.notes)
    warm = plan_of("smollm2-135m", hw, "serve", job={"compile_cache_warm": True})
    assert not warm.enforce_eager and any("compile cache is warm" in n for n in warm.notes)


@pytest.mark.parametrize("field,value", [("tensor_parallel_size", 0), ("tensor_parallel_size", -1),
                                         ("data_parallel_size", 0), ("gpu_memory_utilization", 1.5),
                                         ("gpu_memory_utilization", 0), ("cpu_kv_cache_gib", 0),
                                         ("max_model_len", 0), ("cpu_reserved_cores", -1), ("max_num_seqs", 0)])
def test_engine_settings_out_of_bounds_are_config_errors(field, value):
    from llmops.config import validate
    from llmops.errors import ConfigError
    from llmops.serve.config import ServeConfig

    with pytest.raises(ConfigError, match=f"engine.{field}") as err:
        validate(ServeConfig, {"engine": {field: value}}, "serve.yaml")
    assert err.value.exit_code == 2


def test_a_compiled_cpu_engine_uses_inductors_cache_instead_of_vllms_broken_aot_loader(tmp_path, monkeypatch):
    from llmops.vllm_engine import compile_cache_dir, compile_cache_warm, engine_env

    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/torchinductor_x")  # what importing torch leaves behind
    compiled = plan_of("smollm2-135m", cpu_only(24, AVX512_BF16), "batch", enforce_eager=False)
    env = engine_env(compiled)
    assert env["VLLM_USE_AOT_COMPILE"] == "0"
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(compile_cache_dir("smollm2-135m"))
    assert env["TORCHINDUCTOR_CACHE_DIR"].startswith(str(tmp_path / "llmops-inductor" / "smollm2-135m-"))
    eager = engine_env(plan_of("smollm2-135m", cpu_only(24, AVX512_BF16), "batch"))
    assert "VLLM_USE_AOT_COMPILE" not in eager and "TORCHINDUCTOR_CACHE_DIR" not in eager
    assert not compile_cache_warm("smollm2-135m")
    (compile_cache_dir("smollm2-135m") / "fxgraph").mkdir(parents=True)
    assert compile_cache_warm("smollm2-135m")


# --- embeddings: a pooling engine ------------------------------------------------------------------------

BF16_CPU = ("avx2", "avx512f", "avx512_bf16")


def test_an_embedding_model_plans_a_pooling_engine_with_no_kv_cache():
    from llmops.plan import CPU_POOLING_MAX_NUM_BATCHED_TOKENS
    from llmops.vllm_engine import as_cli_flags, engine_args, engine_env

    plan = plan_of("all-minilm-l6-v2", cpu_only(24, BF16_CPU, node_available_gib=8), "batch",
                   {"rows": 5000, "task": "embed"})
    assert (plan.runner, plan.convert, plan.dtype) == ("pooling", None, "bfloat16")
    assert plan.max_model_len == 256  # the model's window (sentence_bert_config.json), not a KV cache's
    assert plan.cpu_kv_cache_gib == 0 and plan.kv_cache_tokens == 0 and plan.enforce_eager
    assert plan.max_num_batched_tokens == CPU_POOLING_MAX_NUM_BATCHED_TOKENS
    notes = " ".join(plan.notes)
    assert "runner pooling" in notes and "no prefix caching" in notes and "KV cache 0 GiB" in notes
    args = engine_args(plan, "/m")
    assert args["runner"] == "pooling" and "convert" not in args and args["max_model_len"] == 256
    assert engine_env(plan)["VLLM_CPU_KVCACHE_SPACE"] == "0"
    assert as_cli_flags(args)[-4:] == ["--runner", "pooling", "--max-num-batched-tokens",
                                       str(CPU_POOLING_MAX_NUM_BATCHED_TOKENS)]
    # Explicit settings win; an encoder cannot split an input across steps, so a step holds a whole one.
    assert plan_of("all-minilm-l6-v2", cpu_only(24), "batch", {"task": "embed"},
                   max_num_batched_tokens=512, max_num_seqs=64).max_num_batched_tokens == 512
    with pytest.raises(UsageError, match="less than max_model_len 256"):
        plan_of("all-minilm-l6-v2", cpu_only(24), "batch", {"task": "embed"}, max_num_batched_tokens=128)


def test_a_text_generation_model_embeds_only_when_converted():
    from llmops.vllm_engine import engine_args

    with pytest.raises(UsageError) as err:
        plan_of("smollm2-135m", cpu_only(24), "batch", {"task": "embed"})
    assert err.value.exit_code == 2 and "not an embedding model" in err.value.message
    assert "--set engine.convert=embed" in err.value.hint
    plan = plan_of("smollm2-135m", cpu_only(24), "batch", {"rows": 100, "task": "embed"}, convert="embed")
    assert (plan.runner, plan.convert, plan.max_model_len) == ("pooling", "embed", 8192)
    # A decoder keeps the KV cache of the prompts in one step: 8192 tokens x 46080 bytes fit in 1 GiB.
    assert plan.cpu_kv_cache_gib == 1
    assert engine_args(plan, "/m")["convert"] == "embed"


@pytest.mark.parametrize("name, task, config, message", [
    ("all-minilm-l6-v2", "generate", {}, "is an embedding model: it cannot generate text"),
    ("all-minilm-l6-v2", "embed", {"convert": "embed"}, "is already an embedding model"),
    ("smollm2-135m", "generate", {"convert": "embed"}, "engine.convert=embed runs a model as an embedding model"),
])
def test_a_task_the_model_does_not_do_is_a_usage_error(name, task, config, message):
    with pytest.raises(UsageError, match=message) as err:
        plan_of(name, cpu_only(24), "batch", {"task": task}, **config)
    assert err.value.hint


def test_generation_plans_stay_generation_and_gpus_plan_pooling_too():
    from llmops.vllm_engine import engine_args

    plan = plan_of("smollm2-135m", cpu_only(24), "batch")
    assert (plan.runner, plan.convert) == ("generate", None) and "runner" not in engine_args(plan, "/m")
    gpu = plan_of("all-minilm-l6-v2", ONE_24GIB_GPU, "batch", {"task": "embed"})
    assert (gpu.device, gpu.runner, gpu.max_model_len) == ("cuda", "pooling", 256)
    assert engine_args(gpu, "/m")["runner"] == "pooling"
