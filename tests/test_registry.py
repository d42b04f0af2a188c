import json

import pytest

from llmops.errors import UsageError
from llmops.registry import DEFAULT_MODEL, add_model, all_entries, ensure_local, remove_model, resolve


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
