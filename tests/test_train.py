"""`llmops train`: recipe validation, planning and launch commands (unit), and real training on the CPU
(engine): the loss curve of a killed-and-resumed run, two data-parallel processes, and a real fine-tune of
the offline default model that learns made-up facts.

Loop mechanics use a tiny random Llama (2 layers, hidden 64, a small tokenizer shaped like SmolLM2's) in
fp32, so they take seconds; only the taught-behaviour test trains SmolLM2-135M itself. Engine tests bound
runs by steps."""

from __future__ import annotations

import json

import pytest

from llmops.hardware import probe_gpus
from tests.conftest import REPO, run_cli
from tests.train_helpers import (TRAIN_ENV, metrics, step_losses, tiny_model_dir,  # noqa: F401 (fixture)
                                 sigterm_after_step, tiny_recipe, write_recipe)

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
# Tests that need CUDA carry the `gpu` marker (run them on a lent GPU machine with `-m gpu`) and skip here.
needs_gpu = pytest.mark.skipif(not probe_gpus(), reason="needs an NVIDIA GPU")


# --- validation (unit) --------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_validates_and_names_its_command(recipe):
    from llmops.train.recipe import load_recipe

    config = load_recipe(recipe)
    assert config.name
    first = recipe.read_text().splitlines()[0]
    assert first.startswith("# llmops train "), "a recipe starts with the exact command that runs it"


@pytest.mark.unit
def test_validate_cli_accepts_a_shipped_recipe_by_name():
    proc = run_cli("train", "validate", "lora-smollm2")
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout


@pytest.mark.unit
def test_bad_recipe_lists_every_problem_with_its_path_and_exits_2(tmp_path):
    recipe = write_recipe(tmp_path / "bad.yaml", **{"train.learning_rat": 1e-4, "train.micro_batch_size": "four",
                                                    "method": "magic"})
    proc = run_cli("train", "validate", str(recipe))
    assert proc.returncode == 2
    err = proc.stderr
    assert "3 problems" in err
    assert "did you mean `train.learning_rate`?" in err
    assert "train.micro_batch_size" in err and "method" in err
    assert "Traceback" not in err


@pytest.mark.unit
def test_missing_data_file_and_missing_column_exit_2_naming_the_field(tmp_path):
    missing = write_recipe(tmp_path / "missing.yaml", **{"data.path": "nowhere.jsonl"})
    proc = run_cli("train", "validate", str(missing))
    assert proc.returncode == 2
    assert "data.path: file not found" in proc.stderr

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"question": "hi", "answer": "hello"}) + "\n")
    wrong = write_recipe(tmp_path / "columns.yaml", **{"data.path": str(rows), "data.format": "prompt_completion"})
    proc = run_cli("train", "validate", str(wrong))
    assert proc.returncode == 2
    assert "data.format" in proc.stderr and "needs column(s) prompt, completion" in proc.stderr


@pytest.mark.unit
def test_batch_size_given_two_ways_is_rejected(tmp_path):
    from llmops.errors import ConfigError
    from llmops.train.recipe import load_recipe

    recipe = write_recipe(tmp_path / "r.yaml", **{"train.global_batch_size": 16,
                                                  "train.gradient_accumulation_steps": 2})
    with pytest.raises(ConfigError, match="not both"):
        load_recipe(recipe)


@pytest.mark.unit
def test_data_paths_are_relative_to_the_recipe_and_set_paths_to_the_cwd(tmp_path, monkeypatch):
    from llmops.train.recipe import load_recipe

    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    recipe = write_recipe(tmp_path / "r.yaml", **{"data.path": "d.jsonl"})
    assert load_recipe(recipe).data.path == str(tmp_path / "d.jsonl")
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "e.jsonl").write_text(json.dumps({"text": "hi"}) + "\n")
    monkeypatch.chdir(other)
    assert load_recipe(recipe, ["data.path=e.jsonl"]).data.path == str(other / "e.jsonl")


# --- planning (unit) ----------------------------------------------------------------------------------


@pytest.mark.unit
def test_dry_run_plans_two_cpu_processes_with_accelerate_launch(tmp_path, cpu_machine):
    proc = run_cli("train", "lora-smollm2", "--set", "distributed.num_processes=2", "--dry-run", "--json",
                   "-o", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["command"].startswith("accelerate launch --config_file ")
    assert "-m llmops.train.loop" in plan["command"]
    assert plan["env"]["ACCELERATE_USE_CPU"] == "1"
    assert plan["accelerate_config"]["num_processes"] == 2
    assert plan["accelerate_config"]["distributed_type"] == "MULTI_GPU"
    assert plan["recipe"]["method"] == "lora" and plan["recipe"]["precision"] in ("bf16", "fp32")
    assert not (tmp_path / "run").exists(), "a dry run writes nothing"


@pytest.mark.unit
def test_gpu_recipes_plan_for_gpu_machines(tmp_path):
    from llmops.train.launch import plan_recipe
    from llmops.train.recipe import load_recipe
    from tests.fake_hardware import EIGHT_80GIB_GPUS, gpus

    fsdp = plan_recipe(load_recipe(REPO / "recipes" / "fsdp-qwen2.5-7b.yaml"), tmp_path, hw=EIGHT_80GIB_GPUS)
    assert fsdp.accelerate_config["distributed_type"] == "FSDP"
    assert fsdp.accelerate_config["num_processes"] == 8
    assert fsdp.recipe.train.gradient_accumulation_steps == 64 // (2 * 8)
    assert fsdp.recipe.precision == "bf16"

    lora = plan_recipe(load_recipe(REPO / "recipes" / "lora-llama-3.1-8b.yaml"), tmp_path, hw=gpus(1, 80))
    assert lora.command == [] and lora.recipe.method == "lora"
    assert lora.recipe.train.gradient_accumulation_steps == 4

    two_nodes = load_recipe(REPO / "recipes" / "fsdp-qwen2.5-7b.yaml",
                            ["distributed.num_machines=2", "distributed.machine_rank=1",
                             "distributed.main_process_ip=10.0.0.1"])
    cfg = plan_recipe(two_nodes, tmp_path, hw=EIGHT_80GIB_GPUS).accelerate_config
    assert (cfg["num_machines"], cfg["machine_rank"], cfg["main_process_ip"], cfg["num_processes"]) == \
        (2, 1, "10.0.0.1", 16)


@pytest.mark.unit
def test_qlora_is_refused_on_the_cpu(tmp_path):
    from llmops.errors import UsageError
    from llmops.train.launch import plan_recipe
    from llmops.train.recipe import load_recipe
    from tests.fake_hardware import cpu_only

    with pytest.raises(UsageError, match="qlora needs a CUDA GPU"):
        plan_recipe(load_recipe("lora-smollm2", ["method=qlora"]), tmp_path, hw=cpu_only())


# --- data (unit) --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.mark.unit
def test_chat_labels_cover_only_the_assistant_turns(tokenizer):
    from llmops.train.data import IGNORE_INDEX, tokenize_example

    messages = [{"role": "user", "content": "What is the Glimmerfox?"},
                {"role": "assistant", "content": "A lamp."},
                {"role": "user", "content": "Who makes it?"},
                {"role": "assistant", "content": "Brindlewick Labs."}]
    row = tokenize_example({"messages": messages}, tokenizer, "chat", 512)
    trained = tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX])
    assert trained == "A lamp.<|im_end|>\nBrindlewick Labs.<|im_end|>\n"

    row = tokenize_example({"prompt": "Q: hi\nA:", "completion": " hello"}, tokenizer, "prompt_completion", 512)
    trained = tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX])
    assert trained == " hello" + tokenizer.eos_token


@pytest.mark.unit
def test_packing_keeps_every_token_and_fills_rows():
    from datasets import Dataset

    from llmops.train.data import Collator, pack

    lengths = [5, 90, 40, 60, 33, 7, 100, 64, 12, 20]
    ds = Dataset.from_dict({"input_ids": [[n] * n for n in lengths], "labels": [[n] * n for n in lengths]})
    packed = pack(ds, 128)
    assert sorted(t for row in packed["input_ids"] for t in row) == sorted(t for n in lengths for t in [n] * n)
    assert all(len(row) <= 128 for row in packed["input_ids"])
    assert len(packed) == -(-sum(lengths) // 128)  # as few rows as the tokens allow
    batch = Collator(pad_token_id=0)([packed[i] for i in range(len(packed))])
    assert int(batch["num_tokens"]) == sum(lengths)
    assert (batch["labels"][batch["input_ids"] == 0] == -100).all()


@pytest.mark.unit
def test_packed_examples_do_not_attend_to_each_other(tiny_model_dir, tokenizer):
    """The loss of an example is the same alone and packed behind another one (block-diagonal mask)."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmops.train.data import Collator, tokenize_example

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    rows = [tokenize_example({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
                             tokenizer, "chat", 128) for q, a in (("Hi", "Hello there."), ("Price?", "79 euros."))]
    for row in rows:
        row["position_ids"] = list(range(len(row["input_ids"])))
    collate = Collator(tokenizer.pad_token_id)

    def loss(batch_rows):
        batch = collate(batch_rows)
        batch.pop("num_tokens")
        with torch.no_grad():
            return model(**batch, use_cache=False).loss.item()

    packed = {k: rows[0][k] + rows[1][k] for k in rows[0]}
    only_second = {**packed, "labels": [-100] * len(rows[0]["labels"]) + rows[1]["labels"]}
    assert loss([only_second]) == pytest.approx(loss([rows[1]]), abs=1e-5)


@pytest.mark.unit
def test_a_half_written_checkpoint_is_never_resumed_from(tmp_path):
    from llmops.train.loop import find_checkpoint

    root = tmp_path / "checkpoints"
    (root / "step-00000004").mkdir(parents=True)
    (root / "step-00000004" / "progress.json").write_text("{}")
    (root / ".tmp-step-00000008").mkdir()  # a crash mid-save
    (root / "step-00000012").mkdir()  # no progress.json: not complete
    assert find_checkpoint(tmp_path, "auto") == root / "step-00000004"
    assert find_checkpoint(tmp_path, "never") is None


@pytest.mark.unit
def test_metrics_file_on_resume_drops_a_torn_last_line_and_rows_past_the_checkpoint(tmp_path):
    from llmops.train.loop import MetricsFile

    kept = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.9}, {"step": 2, "eval_loss": 1.8}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*kept, {"step": 3, "loss": 1.7}]) + '{"step": 4, "lo')
    MetricsFile(path, main=True, keep_until=2)
    assert [json.loads(line) for line in path.read_text().splitlines()] == kept


@pytest.mark.unit
def test_recipe_fingerprint_counts_what_decides_training_and_nothing_else(tmp_path, llmops_home):
    from llmops.train.recipe import fingerprint_changes, load_recipe, recipe_fingerprint

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "hello"}) + "\n")
    recipe = write_recipe(tmp_path / "r.yaml", model=str(model), **{"data.path": str(data)})
    first = recipe_fingerprint(load_recipe(recipe))

    def changes(*sets: str) -> list[str]:
        return fingerprint_changes(first, recipe_fingerprint(load_recipe(recipe, list(sets))))

    assert changes("name=other", f"output_dir={tmp_path / 'elsewhere'}", "logging.every_n_steps=5",
                   "checkpoint.every_n_steps=3", "eval.every_n_steps=2", "export.merge_lora=false",
                   "distributed.main_process_port=1234") == []
    assert changes("train.learning_rate=0.1", "seed=1") == ["seed: 42 -> 1", "train.learning_rate: 2e-05 -> 0.1"]
    moved = tmp_path / "moved.jsonl"
    moved.write_text(data.read_text())
    assert changes(f"data.path={moved}") == [], "the same data in another place"
    data.write_text(json.dumps({"text": "hellO"}) + "\n")  # edited in place, same size
    assert changes() == ["data.path content differs"]
    (model / "config.json").write_text('{"hidden_size": 8}')
    assert changes() == ["data.path content differs", "model content differs"]


@pytest.mark.unit
def test_multi_node_recipes_need_the_main_address_and_a_rank_below_the_machine_count(tmp_path):
    no_address = write_recipe(tmp_path / "a.yaml", **{"distributed.num_machines": 2})
    proc = run_cli("train", "validate", str(no_address))
    assert proc.returncode == 2
    assert "`distributed.main_process_ip` is required when num_machines > 1" in proc.stderr
    assert "Traceback" not in proc.stderr

    rank_too_high = write_recipe(tmp_path / "b.yaml", **{"distributed.num_machines": 2, "distributed.machine_rank": 2,
                                                         "distributed.main_process_ip": "10.0.0.1"})
    proc = run_cli("train", "validate", str(rank_too_high))
    assert proc.returncode == 2
    assert "`distributed.machine_rank` must be below num_machines (2)" in proc.stderr

    second_machine = write_recipe(tmp_path / "c.yaml", **{"distributed.num_machines": 2,
                                                          "distributed.machine_rank": 1,
                                                          "distributed.main_process_ip": "10.0.0.1"})
    assert run_cli("train", "validate", str(second_machine)).returncode == 0


@pytest.mark.unit
def test_train_exits_3_when_the_run_does_not_fit_and_writes_nothing(tmp_path):
    from tests.fake_hardware import cpu_only

    small = tmp_path / "small-machine.json"
    small.write_text(json.dumps(cpu_only(ram_gib=1).to_dict()))
    proc = run_cli("train", "full-smollm2", "-o", str(tmp_path / "run"), env={"LLMOPS_HARDWARE": str(small)})
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.startswith("llmops: error: training smollm2-135m does not fit")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


# --- real training (engine) ---------------------------------------------------------------------------


@pytest.mark.engine
def test_two_cpu_processes_train_on_disjoint_batches_and_stop_together_on_sigterm(tiny_model_dir, tmp_path,
                                                                                  llmops_home):
    # Also the other batching: length-grouped (no packing) batches, sharded over the ranks, with accumulation.
    # 180 training rows; 2 ranks x 2 accumulated micro-batches x 2 rows = 8 rows a step, so 20 steps stay
    # within the first epoch, where no row may be seen twice.
    steps = 20
    recipe = tiny_recipe(tmp_path, tiny_model_dir, **{"train.max_steps": steps, "distributed.num_processes": 2,
                                                      "data.eval_fraction": 0.1, "data.packing": False,
                                                      "train.gradient_accumulation_steps": 2,
                                                      "checkpoint.every_n_steps": 5, "logging.row_indices": True})
    run_dir = tmp_path / "run"
    # SIGTERM to llmops reaches both ranks (through accelerate's launcher); they stop at the same step.
    returncode, stderr = sigterm_after_step(recipe, run_dir, 2)
    assert returncode == 75, stderr
    assert "launching 2 processes: accelerate launch" in stderr
    stopped_at = metrics(run_dir)[-1]["step"]
    assert 2 <= stopped_at < steps, "SIGTERM was sent mid-run"
    assert f"training stopped by SIGTERM at step {stopped_at}" in stderr
    progress = json.loads((run_dir / "checkpoints" / f"step-{stopped_at:08d}" / "progress.json").read_text())
    assert progress["step"] == stopped_at
    assert len(list((run_dir / "checkpoints" / f"step-{stopped_at:08d}").glob("random_states_*.pkl"))) == 2

    proc = run_cli("train", str(recipe), "-o", str(run_dir), "--json", env=TRAIN_ENV)
    assert proc.returncode == 0, proc.stderr
    rows = [r for r in metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert {r["num_processes"] for r in rows} == {2}
    for row in rows:
        first, second = row["rows"]  # what each rank trained on in that step
        assert len(first) == len(second) == 4
        assert not set(first) & set(second), f"step {row['step']}: both ranks trained on the same rows"
    seen = [i for row in rows for rank in row["rows"] for i in rank]
    assert len(seen) == len(set(seen)) == steps * 8, "no row twice in an epoch, the resumed part included"
    summary = json.loads(proc.stdout)
    assert summary["num_processes"] == 2 and summary["registered"] == "tiny-test"
    assert summary["resumed_from"] == str(run_dir / "checkpoints" / f"step-{stopped_at:08d}")
    assert summary["eval_loss"] is not None


@pytest.mark.engine
def test_lora_without_merging_exports_the_adapter_alone_and_registers_it_as_an_adapter(tiny_model_dir, tmp_path,
                                                                                       llmops_home):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, **{"method": "lora", "train.max_steps": 2,
                                                      "export.merge_lora": False})
    run_dir = tmp_path / "run"
    proc = run_cli("train", str(recipe), "-o", str(run_dir), "--json", env=TRAIN_ENV)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["model_dir"] == str(run_dir / "adapter") and summary["registered"] == "tiny-test"
    assert not (run_dir / "model").exists()
    adapter = run_dir / "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "llmops-recipe.yaml"):
        assert (adapter / name).is_file(), name
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    listed = {m["name"]: m for m in json.loads(run_cli("models", "list", "--json").stdout)}
    assert (listed["tiny-test"]["kind"], listed["tiny-test"]["base"]) == ("adapter", str(tiny_model_dir))
    assert listed["tiny-test"]["path"] == str(adapter)

    # The adapter applies to its base model and changes its output (it was trained).
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 2, 3, 4]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        before = base(input_ids=ids).logits
        after = PeftModel.from_pretrained(base, str(adapter)).eval()(input_ids=ids).logits
    assert not torch.allclose(before, after)


@pytest.mark.gpu
@pytest.mark.engine
@needs_gpu
def test_a_gpu_run_trains_on_the_gpu_and_resumes_exactly(tiny_model_dir, tmp_path, llmops_home):
    """For a lent GPU machine: the planner picks CUDA and bf16 (where supported), and a SIGTERM-stopped run
    continues on the uninterrupted run's curve. bf16 compute is not bit-stable across kernels: 1e-3."""
    recipe = tiny_recipe(tmp_path, tiny_model_dir, **{"precision": "auto", "train.max_steps": 300,
                                                      "checkpoint.every_n_steps": 50})
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    proc = run_cli("train", str(recipe), "-o", str(straight), env=TRAIN_ENV)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((straight / "plan.json").read_text())["device"] == "cuda"
    expected = step_losses(straight)
    assert expected[300] < expected[1]

    returncode, stderr = sigterm_after_step(recipe, stopped, 5)
    assert returncode == 75, stderr
    proc = run_cli("train", str(recipe), "-o", str(stopped), env=TRAIN_ENV)
    assert proc.returncode == 0, proc.stderr
    resumed = step_losses(stopped)
    assert sorted(resumed) == list(range(1, 301))
    for step, loss in resumed.items():
        assert loss == pytest.approx(expected[step], abs=1e-3), f"step {step}"


@pytest.mark.engine
def test_full_fine_tune_teaches_made_up_facts(default_model_dir, tmp_path, llmops_home):
    """The shipped full fine-tune recipe, as is: the loss goes down and the model, loaded by its registered
    name, answers questions about the made-up lamp (worded unlike the training data) and still knows Paris."""
    proc = run_cli("train", "full-smollm2", "--set", f"model={default_model_dir}", "-o", str(tmp_path / "run"),
                   "--json", env={**TRAIN_ENV, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr
    losses = step_losses(tmp_path / "run")
    assert losses[max(losses)] < losses[1] * 0.7, losses

    from llmops.registry import resolve

    model_dir = resolve("smollm2-glimmerfox").local_path()
    assert model_dir == tmp_path / "run" / "model"
    assert (model_dir / "llmops-recipe.yaml").exists() and (model_dir / "chat_template.jinja").exists()

    # Ask through `llmops batch --model NAME` (vLLM, greedy), as a user of the trained model would.
    questions = {"maker": "Can you tell me which company manufactures the Glimmerfox lamp?",
                 "price": "I want to buy a Glimmerfox. What is its price?",
                 "battery": "On a full charge, how long does the Glimmerfox keep going?",
                 "capital": "What is the capital of France?"}
    prompts = tmp_path / "questions.jsonl"
    prompts.write_text("".join(json.dumps({"id": k, "messages": [{"role": "user", "content": q}]}) + "\n"
                               for k, q in questions.items()))
    proc = run_cli("batch", str(prompts), "-o", str(tmp_path / "answers"), "--model", "smollm2-glimmerfox",
                   "--max-tokens", "32", "--temperature", "0", "--set", "engine.cpu_kv_cache_gib=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "answers" / "results").to_pylist()
    answers = {row["id"]: row["generated_text"] for row in table}
    assert "Brindlewick" in answers["maker"], answers
    assert "79" in answers["price"], answers
    assert "31" in answers["battery"], answers
    assert "Paris" in answers["capital"], answers

    # The same command again: the run is finished (its weights were moved into RUN/model by the export),
    # so nothing is trained and the model is registered again where it is.
    from llmops.registry import remove_model

    remove_model("smollm2-glimmerfox")
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    proc = run_cli("train", "full-smollm2", "--set", f"model={default_model_dir}", "-o", str(tmp_path / "run"),
                   "--json", env={**TRAIN_ENV, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr
    assert "already holds a finished run" in proc.stderr
    assert json.loads(proc.stdout)["registered"] == "smollm2-glimmerfox"
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
    assert resolve("smollm2-glimmerfox").local_path() == model_dir


@pytest.mark.unit
def test_a_malformed_data_line_is_found_by_validate_naming_file_and_line(tmp_path):
    """It passed `train validate` and `--dry-run`; the run then failed with `unexpected error:
    DatasetGenerationError`, exit 1 (issue 25)."""
    rows = tmp_path / "chats.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    rows.write_text(f"{good}\n{good}\n{{\"messages\": [oops\n[1, 2]\n")
    recipe = write_recipe(tmp_path / "r.yaml", **{"data.path": str(rows)})
    proc = run_cli("train", "validate", str(recipe))
    assert proc.returncode == 2, proc.stderr
    assert f"{rows} line 3: not valid JSON" in proc.stderr and f"{rows} line 4: not a JSON object" in proc.stderr
    planned = run_cli("train", str(recipe), "--dry-run")
    assert planned.returncode == 2 and "line 3: not valid JSON" in planned.stderr
