"""LoRA adapters served hot: registered by `llmops train` (export.merge_lora: false), listed with their base,
served beside the base by one vLLM server (`llmops serve ADAPTER`, `--adapter A --adapter B`) and used by
`llmops batch --model ADAPTER` through vLLM's LoRARequest, never merged.

Unit tests plan with made-up adapter folders. The engine tests train one real adapter on the made-up lamp
(examples/train/glimmerfox.jsonl) with the shipped recipe, then ask it and its base the same questions through
one server and through batch: the adapter knows the lamp, the base does not.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import run_cli
from tests.test_serve import start_server, stop_server
from tests.train_helpers import TRAIN_ENV, step_losses

SMALL_KV = ("--set", "engine.cpu_kv_cache_gib=1")


def fake_adapter(folder: Path, rank: int) -> Path:
    """A folder shaped like PEFT's output (enough to register and plan; never loaded)."""
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "peft_type": "LORA"}))
    (folder / "adapter_model.safetensors").write_bytes(f"weights of rank {rank} in {folder.name}".encode())
    return folder


def register(name: str, folder: Path, base: str) -> None:
    from llmops.registry import add_adapter

    add_adapter(name, folder, base)


# --- unit: registry, plan, commands ---------------------------------------------------------------------


@pytest.mark.unit
def test_an_adapter_entry_is_listed_with_its_base_and_rank(tmp_path, llmops_home):
    register("lamp-lora", fake_adapter(tmp_path / "a", 16), "smollm2-135m")
    rows = {r["name"]: r for r in json.loads(run_cli("models", "list", "--json").stdout)}
    lamp = rows["lamp-lora"]
    assert (lamp["kind"], lamp["base"], lamp["lora_rank"], lamp["status"]) == ("adapter", "smollm2-135m", 16, "ready")
    assert rows["smollm2-135m"]["kind"] == "model" and rows["smollm2-135m"]["base"] is None
    table = run_cli("models", "list").stdout
    assert any(line.split("\t")[:5] == ["lamp-lora", "user", "LoRA r16", "", "smollm2-135m"]
               for line in table.splitlines()), table
    shown = json.loads(run_cli("models", "show", "lamp-lora", "--json").stdout)
    assert shown["base"] == "smollm2-135m" and shown["path"] == str(tmp_path / "a")


@pytest.mark.unit
def test_models_add_adapter_of_registers_an_adapter_and_refuses_a_folder_without_an_adapter_config(
        tmp_path, llmops_home):
    proc = run_cli("models", "add", "desk-lora", str(fake_adapter(tmp_path / "b", 8)), "--adapter-of", "smollm2-135m",
                   "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["lora_rank"] == 8
    (tmp_path / "empty").mkdir()
    proc = run_cli("models", "add", "lamp-lora", str(tmp_path / "empty"), "--adapter-of", "smollm2-135m")
    assert proc.returncode == 2 and "does not hold a LoRA adapter (no adapter_config.json)" in proc.stderr


@pytest.mark.unit
def test_serving_an_adapter_serves_its_base_under_its_own_name_with_the_adapter_loaded(tmp_path, llmops_home,
                                                                                        cpu_machine):
    register("lamp-lora", fake_adapter(tmp_path / "a", 16), "smollm2-135m")
    proc = run_cli("serve", "lamp-lora", "--dry-run", "--json", *SMALL_KV)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    command = plan["command"]
    assert command[command.index("--served-model-name") + 1] == "smollm2-135m"
    assert command[command.index("--lora-modules") + 1] == f"lamp-lora={tmp_path / 'a'}"
    assert "--enable-lora" in command and command[command.index("--max-lora-rank") + 1] == "16"
    assert command[command.index("--max-loras") + 1] == "1"
    assert plan["plan"]["enforce_eager"] is True  # vLLM's CPU platform does not compile with LoRA
    assert plan["adapters"] == {"lamp-lora": str(tmp_path / "a")}


@pytest.mark.unit
def test_several_adapters_of_one_base_share_a_server_and_the_rank_is_planned_from_the_largest(
        tmp_path, llmops_home, cpu_machine):
    register("lamp-lora", fake_adapter(tmp_path / "a", 16), "smollm2-135m")
    register("desk-lora", fake_adapter(tmp_path / "b", 20), "smollm2-135m")
    plan = json.loads(run_cli("serve", "smollm2-135m", "--adapter", "lamp-lora", "--adapter", "desk-lora",
                              "--dry-run", "--json", *SMALL_KV).stdout)
    command = plan["command"]
    at = command.index("--lora-modules")
    assert command[at + 1:at + 3] == [f"lamp-lora={tmp_path / 'a'}", f"desk-lora={tmp_path / 'b'}"]
    assert command[command.index("--max-lora-rank") + 1] == "32", "rank 20 rounds up to a rank vLLM accepts"
    assert command[command.index("--max-loras") + 1] == "2"
    assert command[command.index("--served-model-name") + 1] == "smollm2-135m"
    assert any("max_lora_rank 32" in note for note in plan["plan"]["notes"])


@pytest.mark.unit
@pytest.mark.parametrize("args, message", [
    (("smollm2-135m", "--adapter", "qwen-lora"), "'qwen-lora' was trained on 'qwen2.5-0.5b', not on 'smollm2-135m'"),
    (("lamp-lora", "--adapter", "qwen-lora"), "'qwen-lora' was trained on 'qwen2.5-0.5b', not on 'smollm2-135m'"),
    (("smollm2-135m", "--adapter", "qwen2.5-0.5b"), "'qwen2.5-0.5b' is a model, not a LoRA adapter"),
    (("smollm2-135m", "--adapter", "nope"), "unknown model 'nope'"),
])
def test_adapters_of_another_base_or_models_as_adapters_exit_2(tmp_path, llmops_home, cpu_machine, args, message):
    register("lamp-lora", fake_adapter(tmp_path / "a", 16), "smollm2-135m")
    register("qwen-lora", fake_adapter(tmp_path / "q", 8), "qwen2.5-0.5b")
    proc = run_cli("serve", *args, "--dry-run")
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.unit
def test_a_batch_job_with_an_adapter_runs_on_its_base_and_its_identity_holds_the_adapter_digest(
        tmp_path, llmops_home, cpu_machine):
    from llmops.batch import plan_batch
    from llmops.batch.config import BatchConfig
    from llmops.fingerprint import model_digest
    from llmops.vllm_engine import engine_args

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hello"}) + "\n")
    register("lamp-lora", fake_adapter(tmp_path / "a", 16), "smollm2-135m")
    register("lamp-lora-2", fake_adapter(tmp_path / "b", 16), "smollm2-135m")

    def job(model: str):
        return plan_batch(BatchConfig(model=model), str(prompts), tmp_path / f"out-{model}")

    base, lamp, other = job("smollm2-135m"), job("lamp-lora"), job("lamp-lora-2")
    assert lamp.model_name == "lamp-lora" and lamp.base_model == "smollm2-135m"
    assert lamp.identity.model.adapter == "lamp-lora" and lamp.identity.model.name == "smollm2-135m"
    assert lamp.identity.model.adapters["lamp-lora"].digest == model_digest(tmp_path / "a")
    assert len({base.identity.key(), lamp.identity.key(), other.identity.key()}) == 3
    assert other.identity.changes_from(lamp.identity) == ["adapter changed: lamp-lora -> lamp-lora-2",
                                                          "adapters changed: lamp-lora -> lamp-lora-2"]
    args = engine_args(lamp.plan, "/models/base")
    assert (args["enable_lora"], args["max_lora_rank"], args["max_loras"]) == (True, 16, 1)
    assert "enable_lora" not in engine_args(base.plan, "/models/base")


def openai_requests(path: Path, models: list[str]) -> Path:
    path.write_text("".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                        "body": {"model": m, "messages": [{"role": "user", "content": "Hi"}]}})
                            + "\n" for i, m in enumerate(models)))
    return path


@pytest.mark.unit
def test_openai_requests_may_name_adapters_of_the_job_base_but_not_of_another_base(tmp_path, llmops_home,
                                                                                   cpu_machine):
    from llmops.batch import plan_batch
    from llmops.batch.config import BatchConfig

    register("lamp-lora", fake_adapter(tmp_path / "a", 16), "smollm2-135m")
    register("desk-lora", fake_adapter(tmp_path / "b", 32), "smollm2-135m")
    register("qwen-lora", fake_adapter(tmp_path / "q", 8), "qwen2.5-0.5b")
    mixed = openai_requests(tmp_path / "mixed.jsonl", ["lamp-lora", "desk-lora", "smollm2-135m", "gpt-4o-mini"])
    job = plan_batch(BatchConfig(model="smollm2-135m"), str(mixed), tmp_path / "out")
    assert sorted(job.identity.model.adapters) == ["desk-lora", "lamp-lora"] and job.identity.model.adapter is None
    assert (job.plan.max_lora_rank, job.plan.max_loras) == (32, 2)

    other_base = openai_requests(tmp_path / "other.jsonl", ["lamp-lora", "qwen-lora"])
    proc = run_cli("batch", str(other_base), "-o", str(tmp_path / "out2"), "--model", "lamp-lora", "--dry-run")
    assert proc.returncode == 2, proc.stderr
    assert "adapter 'qwen-lora' was trained on 'qwen2.5-0.5b', not on 'smollm2-135m'" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out2").exists()


# --- engine: a real adapter, served hot and batched -----------------------------------------------------

ADAPTER = "smollm2-glimmerfox-lora"  # the name in recipes/lora-smollm2.yaml
QUESTIONS = {"maker": "Can you tell me which company manufactures the Glimmerfox lamp?",
             "price": "I want to buy a Glimmerfox. What is its price?",
             "battery": "On a full charge, how long does the Glimmerfox keep going?",
             "capital": "What is the capital of France?"}
FACTS = {"maker": "Brindlewick", "price": "79", "battery": "31", "capital": "Paris"}


def knows(answers: dict[str, str]) -> list[str]:
    return [key for key, fact in FACTS.items() if fact in answers[key]]


@pytest.fixture(scope="module")
def trained_adapter(default_model_dir, tmp_path_factory):
    """The shipped LoRA recipe as it ships, on the default model, exported unmerged and registered, in a home
    of its own. (At 16 steps and lr 5e-4 the adapter answered "made by Glimmer", "19 euros", "1 hour"; the
    recipe's 24 steps at lr 1e-3 teach all four facts and keep Paris.)"""
    home = tmp_path_factory.mktemp("adapter-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMOPS_HOME", str(home))
        run = tmp_path_factory.mktemp("adapter-run") / "run"
        proc = run_cli("train", "lora-smollm2", "--set", f"model={default_model_dir}", "--set",
                       "export.merge_lora=false", "-o", str(run), "--json", env={**TRAIN_ENV, "OMP_NUM_THREADS": "2"},
                       timeout=1800)  # a hang guard: ~2.5 min alone, up to 10 beside another test module
        assert proc.returncode == 0, proc.stderr[-3000:]
        yield SimpleNamespace(run=run, summary=json.loads(proc.stdout), base_dir=default_model_dir)


@pytest.mark.engine
def test_a_trained_adapter_served_hot_answers_the_made_up_facts_and_its_base_does_not(trained_adapter,
                                                                                      tmp_path):
    import openai

    run = trained_adapter.run
    losses = step_losses(run)
    assert losses[max(losses)] < losses[1] * 0.7, losses
    assert trained_adapter.summary["registered"] == ADAPTER
    assert trained_adapter.summary["model_dir"] == str(run / "adapter") and not (run / "model").exists()
    listed = {r["name"]: r for r in json.loads(run_cli("models", "list", "--json").stdout)}
    assert listed[ADAPTER]["kind"] == "adapter" and listed[ADAPTER]["lora_rank"] == 16
    assert listed[ADAPTER]["base"] == str(trained_adapter.base_dir) and listed[ADAPTER]["path"] == str(run / "adapter")

    base_name = trained_adapter.base_dir.name  # the base is served under its own name (here its folder's)
    server = start_server(tmp_path, ADAPTER)
    try:
        assert f"Serving {ADAPTER}, {base_name} at {server.url}/v1" in server.stdout.read_text()
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=server.key, max_retries=0, timeout=300)
        assert {m.id for m in client.models.list().data} == {ADAPTER, base_name}

        def ask(model: str) -> dict[str, str]:
            return {key: client.chat.completions.create(
                        model=model, messages=[{"role": "user", "content": question}], max_tokens=32,
                        temperature=0).choices[0].message.content for key, question in QUESTIONS.items()}

        answers = {ADAPTER: ask(ADAPTER), base_name: ask(base_name)}
    finally:
        stop_server(server)
    print("served answers:", json.dumps(answers, indent=1))
    assert knows(answers[ADAPTER]) == list(FACTS), answers
    assert [k for k in knows(answers[base_name]) if k != "capital"] == [], answers


@pytest.mark.engine
def test_batch_with_an_adapter_answers_the_made_up_facts_and_the_base_job_does_not(trained_adapter, tmp_path):
    """The adapter's job and the base's job run in this process on one engine, started for the adapter's job
    (two engine starts become one): the base job generates without the adapter although that engine holds it.
    `llmops batch --model NAME` plans the same job (the merged model's test below runs the command)."""
    import pyarrow.parquet as pq

    from llmops.batch import BatchConfig, load_engine, plan_batch, run_batch
    from llmops.batch.engine import close_engine
    from llmops.config import load_config

    prompts = tmp_path / "questions.jsonl"
    prompts.write_text("".join(json.dumps({"id": k, "messages": [{"role": "user", "content": q}]}) + "\n"
                               for k, q in QUESTIONS.items()))

    def config(model: str) -> BatchConfig:  # what `--model MODEL --max-tokens 32 --temperature 0` sets
        return load_config(BatchConfig, sets=[f"model={model}", "sampling.max_tokens=32", "sampling.temperature=0",
                                              *SMALL_KV[1::2]])

    models = (ADAPTER, str(trained_adapter.base_dir))
    engine = load_engine(plan_batch(config(ADAPTER), str(prompts), tmp_path / "plan").engine)
    answers = {}
    try:
        for model in models:
            out = tmp_path / f"answers-{len(answers)}"
            summary = run_batch(config(model), str(prompts), out, llm=engine)
            assert (summary.rows_ok, summary.rows_failed) == (len(QUESTIONS), 0)
            answers[model] = {r["id"]: r["generated_text"] for r in pq.read_table(out / "results").to_pylist()}
    finally:
        close_engine(engine)
    print("batch answers:", json.dumps(answers, indent=1))
    job = json.loads((tmp_path / "answers-0" / "manifest.json").read_text())
    assert job["job"]["model"]["adapter"] == ADAPTER and job["job"]["model"]["adapters"][ADAPTER]["digest"]
    assert job["engine_args"]["enable_lora"] is True
    base_job = json.loads((tmp_path / "answers-1" / "manifest.json").read_text())
    assert base_job["job"]["model"]["adapter"] is None and not base_job["job"]["model"]["adapters"]
    assert knows(answers[ADAPTER]) == list(FACTS), answers
    assert [k for k in knows(answers[str(trained_adapter.base_dir)]) if k != "capital"] == [], answers


@pytest.mark.unit
def test_each_request_generates_with_the_adapter_it_names_the_base_it_names_or_the_job_adapter():
    from llmops.batch.engine import _adapter_of
    from llmops.batch.identity import AdapterIdentity, EngineIdentity, InputIdentity, JobIdentity, ModelIdentity
    from llmops.batch.inputs import Row

    adapters = {n: AdapterIdentity(path=f"/a/{n}", digest=n) for n in ("lamp-lora", "desk-lora")}
    job = JobIdentity(input=InputIdentity(format="openai", files=[], digest="0"), sampling={}, chunk_rows=1,
                      engine=EngineIdentity(dtype="float32", max_model_len=8),
                      model=ModelIdentity(name="smollm2-135m", adapter="lamp-lora", adapters=adapters))
    asks = {"desk-lora": "desk-lora", "smollm2-135m": None, "gpt-4o-mini": "lamp-lora", None: "lamp-lora"}
    for asked, expected in asks.items():
        assert _adapter_of(Row(0, "r", body={"model": asked} if asked else None), job) == expected, asked


@pytest.mark.unit
def test_models_add_refuses_an_adapter_of_another_base_a_rank_vllm_cannot_serve_or_a_config_that_is_not_an_object(
        tmp_path, llmops_home):
    """All three were accepted by `models add` (or an AttributeError, exit 1) and failed only later (issue 25)."""
    def adapter(name, config):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps(config))
        return str(folder)

    other = run_cli("models", "add", "x-lora", adapter("qwen", {"r": 8, "base_model_name_or_path": "Qwen/Qwen2.5-0.5B"}),
                    "--adapter-of", "smollm2-135m")
    assert other.returncode == 2 and "was trained on Qwen/Qwen2.5-0.5B, not on smollm2-135m" in other.stderr
    huge = run_cli("models", "add", "y-lora", adapter("huge", {"r": 1024}), "--adapter-of", "smollm2-135m")
    assert huge.returncode == 2 and "rank 1024, larger than vLLM serves (512)" in huge.stderr
    listed = run_cli("models", "add", "z-lora", adapter("list", [{"r": 8}]), "--adapter-of", "smollm2-135m")
    assert listed.returncode == 2 and "is not a JSON object" in listed.stderr
    same = run_cli("models", "add", "ok-lora", adapter("ok", {"r": 8, "base_model_name_or_path":
                                                               "HuggingFaceTB/SmolLM2-135M-Instruct"}),
                   "--adapter-of", "smollm2-135m")
    assert same.returncode == 0, same.stderr
    unknown_folder = run_cli("models", "add", "far-lora", adapter("far", {"r": 8, "base_model_name_or_path":
                                                                          "/elsewhere/base"}),
                             "--adapter-of", "smollm2-135m")
    assert unknown_folder.returncode == 0, unknown_folder.stderr  # trained on another machine: cannot tell


@pytest.mark.engine
def test_the_readme_default_merges_the_adapter_and_the_merged_model_answers_the_made_up_facts(trained_adapter,
                                                                                              tmp_path):
    """`llmops train lora-smollm2` as the README runs it merges the adapter (export.merge_lora defaults to true):
    the same export, from the fixture's run, on the merged model (issue 25: no test loaded it)."""
    import pyarrow.parquet as pq

    from llmops.train.export import export
    from llmops.train.launch import RunPlan
    from llmops.train.recipe import load_recipe

    run_dir = trained_adapter.run
    recipe = load_recipe("lora-smollm2", sets=[f"model={trained_adapter.base_dir}", "name=glimmerfox-merged"])
    assert recipe.export.merge_lora is True  # the shipped recipe merges
    run = RunPlan(recipe=recipe, base_model=str(trained_adapter.base_dir), run_dir=run_dir, plan={},
                  accelerate_config={}, command=[])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMOPS_HOME", str(tmp_path / "home"))
        done = export(run)
        assert done["registered"] == "glimmerfox-merged" and done["model_dir"] == str(run_dir / "model")
        assert not (run_dir / "model" / "adapter_config.json").exists()  # plain weights, no adapter left
        prompts = tmp_path / "questions.jsonl"
        prompts.write_text("".join(json.dumps({"id": k, "messages": [{"role": "user", "content": q}]}) + "\n"
                                   for k, q in QUESTIONS.items()))
        out = tmp_path / "answers"
        proc = run_cli("batch", str(prompts), "-o", str(out), "--model", "glimmerfox-merged", "--max-tokens", "32",
                       "--temperature", "0", *SMALL_KV, env={"LLMOPS_HOME": str(tmp_path / "home")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = {r["id"]: r["generated_text"] for r in pq.read_table(out / "results").to_pylist()}
    print("merged answers:", json.dumps(answers, indent=1))
    job = json.loads((out / "manifest.json").read_text())
    assert job["engine_args"].get("enable_lora") in (None, False)  # served as a plain model
    assert knows(answers) == list(FACTS), answers
