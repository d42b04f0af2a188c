"""The CLI surface: fast help, exit codes, JSON output, registry and hardware commands."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import run_cli
from tests.fake_hardware import EIGHT_80GIB_GPUS

HEAVY = ("torch", "vllm", "transformers", "accelerate", "datasets", "peft", "openai")


@pytest.mark.unit
@pytest.mark.parametrize("args", [["--help"], ["--version"], ["serve", "--help"], ["batch", "--help"],
                                  ["train", "--help"], ["models", "--help"], ["chat", "--help"], ["hw", "--help"],
                                  ["models", "list"]])
def test_help_imports_no_heavy_library(args):
    code = (
        "import sys\nfrom llmops.cli.app import main\n"
        f"try:\n    main({args!r})\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\nprint(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


ROOT_HELP_MAX_LLMOPS_MODULES = 6  # llmops, llmops.cli, llmops.cli.app, llmops.errors, and a little slack


@pytest.mark.unit
def test_root_help_loads_no_command_module():
    """`llmops --help` lists the commands from their one-line summaries; their modules load when they run."""
    code = ("import sys\nfrom llmops.cli.app import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "print(sorted(m for m in sys.modules if m == 'llmops' or m.startswith('llmops.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = eval(out.stdout.strip().splitlines()[-1])
    assert len(loaded) <= ROOT_HELP_MAX_LLMOPS_MODULES, loaded
    assert not [m for m in loaded if m.startswith(("llmops.cli.", "llmops.batch", "llmops.serve", "llmops.train"))
                and m != "llmops.cli.app"], loaded
    for name in ("serve", "chat", "batch", "train", "models", "hw"):
        assert name in out.stdout


def _all_help_pages(columns: int) -> dict[str, str]:
    """Every command's and subcommand's --help as a terminal of `columns` columns shows it."""
    code = (
        "import contextlib, io, json, sys\n"
        "from llmops.cli.app import COMMANDS, load_command, main\n"
        "pages = [[]] + [[name] for name in COMMANDS]\n"
        "pages += [[name, sub] for name in COMMANDS for sub in getattr(load_command(name), 'commands', {})]\n"
        "shown = {}\n"
        "for args in pages:\n"
        "    buf = io.StringIO()\n"
        "    with contextlib.redirect_stdout(buf):\n"
        "        try:\n            main([*args, '--help'])\n        except SystemExit:\n            pass\n"
        "    shown[' '.join(args)] = buf.getvalue()\n"
        "print(json.dumps(shown))\n"
    )
    env = {**os.environ, "COLUMNS": str(columns), "TERM": "xterm", "NO_COLOR": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.unit
def test_help_paragraphs_are_reflowed_and_switches_have_no_metavar():
    pages = _all_help_pages(80)
    assert {"", "batch", "serve", "train run", "models list"} <= set(pages)
    for name, text in pages.items():
        lines = text.splitlines()
        # The description between the usage line and the first panel: rich wraps it at 78 columns (80 less
        # the padding), so a line followed by a word that would have fitted on it is a hard break from the
        # docstring's source, such as "the same command resumes where it" / "stopped, and ...".
        start = next(i for i, line in enumerate(lines) if "Usage:" in line) + 1
        end = next((i for i, line in enumerate(lines) if line.startswith("╭")), len(lines))
        body = [line.strip() for line in lines[start:end]]
        for line, following in zip(body, body[1:]):
            if line and following and not following.startswith(("-", "`")):
                assert len(line) + 1 + len(following.split()[0]) > 78, f"llmops {name} --help: {line!r} / {following!r}"
        assert "<bool>" not in text, f"llmops {name} --help shows a metavar on a switch"
        for switch in ("--json", "--dry-run", "--overwrite", "--verbose"):
            for line in lines:
                if f" {switch} " in line:
                    assert not line.split(switch, 1)[1].lstrip(" -v").startswith("<"), line
    assert "resumes where it stopped" in " ".join(pages["batch"].split())
    assert "Examples:" in pages["batch"] and "llmops batch examples/prompts.jsonl" in pages["batch"]
    assert "--verbose" in pages["batch"] and "--verbose" in pages["train run"]


@pytest.mark.unit
def test_verbose_means_the_same_in_every_command():
    pages = _all_help_pages(200)
    leaves = [name for name, text in pages.items() if name and "Commands" not in text]
    assert len(leaves) >= 10
    for name in leaves:
        line = next(line for line in pages[name].splitlines() if "--verbose" in line)
        assert line.split("--verbose", 1)[1].split()[:2] == ["-v", "Show"], (name, line)
        assert "Show the engines' own logs" in line, (name, line)


@pytest.mark.unit
@pytest.mark.parametrize("args", [["models", "list", "-v"], ["train", "recipes", "--verbose"], ["hw", "-v", "--json"]])
def test_verbose_flag_reaches_the_quiet_switch(args, monkeypatch, capsys):
    """-v sets LLMOPS_VERBOSE, which llmops.quiet (and worker processes, through the environment) read."""
    from llmops import quiet
    from llmops.cli.app import main

    monkeypatch.setenv("LLMOPS_VERBOSE", "")  # recorded, so the "1" that -v sets is undone after the test
    with pytest.raises(SystemExit) as exit:
        main(args)
    assert exit.value.code == 0
    assert quiet.verbose()


@pytest.mark.unit
def test_version():
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("llmops ")


@pytest.mark.unit
def test_usage_errors_exit_2_with_one_line_message(llmops_home):
    proc = run_cli("models", "show", "no-such-model")
    assert proc.returncode == 2
    assert proc.stderr.startswith("llmops: error: unknown model 'no-such-model'")
    assert "Traceback" not in proc.stderr
    proc = run_cli("models", "frobnicate")
    assert proc.returncode == 2 and "No such command" in proc.stderr


@pytest.mark.unit
def test_debug_variable_shows_traceback(llmops_home):
    proc = run_cli("models", "show", "no-such-model", env={"LLMOPS_DEBUG": "1"})
    assert proc.returncode == 2 and "Traceback" in proc.stderr


@pytest.mark.unit
def test_models_list_show_add_rm_json(llmops_home, tmp_path):
    listed = json.loads(run_cli("models", "list", "--json").stdout)
    assert {"smollm2-135m", "llama-3.1-8b"} <= {m["name"] for m in listed}
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"num_hidden_layers": 2, "hidden_size": 64,
                                                    "num_attention_heads": 4, "vocab_size": 1000,
                                                    "max_position_embeddings": 512}))
    added = run_cli("models", "add", "tiny", str(folder), "--base", "--json")
    assert added.returncode == 0, added.stderr
    shown = json.loads(run_cli("models", "show", "tiny", "--json").stdout)
    assert shown["status"] == "ready" and shown["context_length"] == 512 and shown["chat"] is False
    assert shown["params"] > 0 and shown["shape"]["num_kv_heads"] == 4
    removed = json.loads(run_cli("models", "rm", "tiny", "--json").stdout)
    assert removed["removed"] == ["registry entry"]
    assert run_cli("models", "show", "tiny").returncode == 2


@pytest.mark.unit
def test_pull_offline_hub_model_exits_2_with_hint(llmops_home):
    proc = run_cli("models", "pull", "qwen2.5-0.5b", env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert "cannot be reached" in proc.stderr and "hint:" in proc.stderr


@pytest.mark.unit
def test_hw_json_on_this_machine_and_on_fake_hardware(tmp_path):
    data = json.loads(run_cli("hw", "--json").stdout)
    assert data["hardware"]["cpu"]["usable_cores"] >= 1
    assert set(data["plans"]) == {"serve", "batch", "train"}
    fake = tmp_path / "hw.json"
    fake.write_text(json.dumps(EIGHT_80GIB_GPUS.to_dict()))
    data = json.loads(run_cli("hw", "--json", "-m", "llama-3.3-70b", env={"LLMOPS_HARDWARE": str(fake)}).stdout)
    assert len(data["hardware"]["gpus"]) == 8
    assert data["plans"]["serve"]["tensor_parallel_size"] == 4  # holds the whole context; 2 replicas (issue 9)
    assert data["plans"]["batch"]["data_parallel_size"] == 4
    text = run_cli("hw", "-m", "llama-3.3-70b", env={"LLMOPS_HARDWARE": str(fake)}).stdout
    assert "NVIDIA H100 80GB HBM3" in text and "tensor_parallel_size" in text


@pytest.mark.engine
def test_models_pull_and_show_default_model(default_model_dir):
    proc = run_cli("models", "pull", "smollm2-135m", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["path"] == str(default_model_dir)
    shown = json.loads(run_cli("models", "show", "smollm2-135m", "--json").stdout)
    assert shown["status"] == "ready" and shown["shape"]["num_layers"] == 30


@pytest.mark.unit
def test_wheel_ships_the_registry_recipes_and_their_training_data(tmp_path):
    import zipfile
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(repo)], check=True, capture_output=True)
    names = set(zipfile.ZipFile(next(tmp_path.glob("llmops-*.whl"))).namelist())
    assert "llmops/models.yaml" in names
    for recipe in (repo / "recipes").glob("*.yaml"):
        assert f"llmops/recipes/{recipe.name}" in names
    # the CPU recipes point at ../examples/train/*.jsonl; the same relative path must hold inside the wheel
    assert {"llmops/examples/train/glimmerfox.jsonl", "llmops/examples/train/glimmerfox-eval.jsonl"} <= names


@pytest.mark.engine
def test_batch_prints_only_its_own_lines_and_logs_the_engine(default_model_dir, tmp_path):
    """vLLM, torch and safetensors write start-up logs and bars (some from worker processes, straight to fd 2):
    they belong in the log file, not between llmops's lines."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "What is the capital of France?"}\n{"prompt": "Name a colour."}\n')
    home = tmp_path / "home"  # its own, so that another test module's jobs (make test runs two) log elsewhere
    proc = run_cli("batch", str(prompts), "-o", str(tmp_path / "out"), "--model", str(default_model_dir),
                   "--max-tokens", "8", "--set", "engine.cpu_kv_cache_gib=1", env={"LLMOPS_HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and all(line.startswith("llmops") for line in lines), proc.stderr
    assert "rows: 2 ok" in proc.stdout
    new_logs = set((home / "logs").glob("batch-*.log"))
    assert len(new_logs) == 1
    logged = new_logs.pop().read_text()
    assert "Loading safetensors checkpoint shards" in logged  # written by vLLM's worker process
