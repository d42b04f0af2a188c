"""`llmops batch --ray` on a real 2-node Ray cluster on this host (1 CPU each, token auth) with real vLLM.

The cluster is started once for the module (tests/ray_cluster.py) and stopped by pid. The tests run in file
order: the last one kills a node. Each engine start is ~25 s and ~3.5 GB, so a test waits for the previous
driver's engines to be gone before starting its own."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmops.batch.ray_engines import Replica, host_cores, plan_replicas, replica_env
from llmops.errors import UsageError
from tests.test_batch_engine import wait_for_shards
from tests.conftest import REPO, run_cli

SMALL_ENGINE = ["--set", "engine.cpu_kv_cache_gib=1", "--set", "engine.enforce_eager=true"]


# --- planning (no cluster) ------------------------------------------------------------------------------


class _Plan:
    def __init__(self, device="cpu", tp=1):
        self.device, self.tensor_parallel_size = device, tp


def _node(node_id, ip="10.0.0.1", cpus=8.0, gpus=0, alive=True):
    return {"NodeID": node_id, "NodeManagerAddress": ip, "Alive": alive,
            "Resources": {"CPU": cpus, **({"GPU": float(gpus)} if gpus else {})}}


@pytest.mark.unit
def test_one_replica_per_cpu_node_and_per_gpu_group():
    nodes = [_node("a", "10.0.0.1"), _node("b", "10.0.0.2"), _node("c", "10.0.0.3", alive=False),
             _node("d", "10.0.0.4", cpus=0)]
    cpu = plan_replicas(nodes, _Plan())
    assert [(r.node_id, r.cpus, r.gpus, r.host_replicas) for r in cpu] == [("a", 8.0, 0, 1), ("b", 8.0, 0, 1)]
    gpu_nodes = [_node("a", gpus=8), _node("b", "10.0.0.2", gpus=3)]
    gpu = plan_replicas(gpu_nodes, _Plan("cuda", tp=2))
    assert [(r.node_id, r.gpus) for r in gpu] == [("a", 2)] * 4 + [("b", 2)]  # b's third GPU stays idle
    with pytest.raises(UsageError, match="no live node with 4 GPU"):
        plan_replicas(gpu_nodes[1:], _Plan("cuda", tp=4))


@pytest.mark.unit
def test_replicas_sharing_a_host_get_their_own_cores():
    # Two Ray nodes on one machine: vLLM's automatic binding would put both engines on the same cores.
    replicas = plan_replicas([_node("a", "127.0.0.1", 1), _node("b", "127.0.0.1", 1)], _Plan())
    assert [(r.host_slot, r.host_replicas) for r in replicas] == [(0, 2), (1, 2)]
    binds = [replica_env({"VLLM_CPU_KVCACHE_SPACE": "1"}, r, [0, 1])["VLLM_CPU_OMP_THREADS_BIND"] for r in replicas]
    assert binds == ["0", "1"]
    assert host_cores(list(range(8)), 2, 3) == [5, 6, 7]
    assert [host_cores([0, 1], slot, 3) for slot in range(3)] == [[0], [0], [1]]  # more engines than cores
    alone = Replica(0, "a", "10.0.0.1", 8, 0)
    assert "VLLM_CPU_OMP_THREADS_BIND" not in replica_env({}, alone, [0, 1])


@pytest.mark.unit
def test_a_cpu_replica_process_starts_with_its_openmp_thread_count():
    from llmops.batch.ray_engines import process_env

    # Set at process start (runtime_env), where libgomp reads it when LD_PRELOAD loads it first.
    assert process_env(Replica(0, "a", "10.0.0.1", 1.0, 0)) == {"OMP_NUM_THREADS": "1"}
    assert process_env(Replica(0, "a", "10.0.0.1", 32.0, 0)) == {"OMP_NUM_THREADS": "32"}
    assert process_env(Replica(0, "a", "10.0.0.1", 1.0, 2)) == {}  # a GPU engine: Ray's default


@pytest.mark.unit
def test_ray_missing_or_unreachable_exits_2_with_the_fix(tmp_path):
    prompts = tmp_path / "in.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    fake = tmp_path / "no-ray" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    missing = run_cli("batch", str(prompts), "-o", str(tmp_path / "out"), "--ray", "auto",
                      env={"PYTHONPATH": f"{fake.parent}{os.pathsep}{REPO}"})
    assert missing.returncode == 2, missing.stderr
    assert "pip install 'llmops[ray]'" in missing.stderr and "Traceback" not in missing.stderr
    assert not (tmp_path / "out").exists()
    unreachable = run_cli("batch", str(prompts), "-o", str(tmp_path / "out"), "--ray", "127.0.0.1:1", "--dry-run")
    assert unreachable.returncode == 2 and "cannot reach a Ray cluster at 127.0.0.1:1" in unreachable.stderr


@pytest.mark.unit
def test_an_output_folder_some_node_cannot_see_is_refused(tmp_path):
    from types import SimpleNamespace

    from llmops.batch.outputs import OutputDir
    from llmops.batch.ray_engines import _check_shared_output, _Replicas

    from llmops.batch.inputs import InputSpec
    from llmops.batch.ray_engines import EngineReplica

    out = tmp_path / "out"
    (tmp_path / "in.jsonl").write_text('{"prompt": "hi"}\n')
    spec = InputSpec((tmp_path / "in.jsonl",), "jsonl")

    class Actor:  # answers as the real replica does, on this machine or on one without the folder
        def __init__(self, same_machine):
            work = SimpleNamespace(output_dir=str(out if same_machine else tmp_path / "elsewhere"), spec=spec)
            replica = EngineReplica.__new__(EngineReplica)
            replica.work = work
            self.sees = SimpleNamespace(remote=replica.sees)

    fake_ray = SimpleNamespace(get=lambda answers, timeout: list(answers),
                               exceptions=SimpleNamespace(GetTimeoutError=TimeoutError))
    replicas = [Replica(0, "a", "10.0.0.1", 8, 0), Replica(1, "b", "10.0.0.2", 8, 0)]
    out.mkdir()
    _check_shared_output(fake_ray, _Replicas([Actor(True), Actor(True)], replicas), OutputDir(out), spec)
    with pytest.raises(UsageError, match="output folder .* is not reachable from Ray node 10.0.0.2 .*shared storage"):
        _check_shared_output(fake_ray, _Replicas([Actor(True), Actor(False)], replicas), OutputDir(out), spec)
    assert list(out.iterdir()) == []  # the probe file is removed
    (tmp_path / "in.jsonl").rename(tmp_path / "moved.jsonl")
    with pytest.raises(UsageError, match="the input .*in.jsonl is not reachable from Ray node 10.0.0.1"):
        _check_shared_output(fake_ray, _Replicas([Actor(True), Actor(True)], replicas), OutputDir(out), spec)


# --- a real cluster ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("ray")
    from tests.ray_cluster import LocalRayCluster

    with LocalRayCluster(cpus_per_node=1, nodes=2) as c:
        yield c


def write_prompts(path, rows, words=("story", "poem", "list")):
    pq.write_table(pa.table({"id": [f"q{i}" for i in range(rows)],
                             "prompt": [f"Write a long {words[i % len(words)]} about the number {i}." for i in
                                        range(rows)]}), path)
    return path


LONG_REPORTS = ["--on-long", "chunk", "--set", "engine.max_model_len=512"]


def write_prompts_and_reports(path, short, at):
    """`short` prompts, and at each index of `at` two reports of ~3 contexts (ids long0, long1, ...) that
    `LONG_REPORTS` map-reduces (issue 22)."""
    from tests.test_batch_long import NAMES, report

    rows = pq.read_table(write_prompts(path, short)).to_pylist()
    for n, index in enumerate(sorted(at, reverse=True)):
        first = 2 * (len(at) - 1 - n)
        rows[index:index] = [{"id": f"long{k}", "prompt": "Summarize this report in two sentences.\n\n"
                              + report(NAMES[k], 20)} for k in (first, first + 1)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def assert_reports_whole(out, short, reports):
    """Every report map-reduced from its own pieces only; every short prompt one request."""
    from tests.test_batch_long import NAMES

    results = {r["id"]: r for r in pq.read_table(out / "results").to_pylist()}
    for k in range(reports):
        doc = results[f"long{k}"]
        assert doc["chunks"] >= 3 and doc["generated_text"].strip(), doc
        assert not [n for n in NAMES if n != NAMES[k] and n in doc["generated_text"]], doc["generated_text"]
    assert {results[f"q{i}"]["chunks"] for i in range(short)} == {1}


def batch_args(cluster, path, out, *extra):
    return ["batch", str(path), "-o", str(out), "--ray", cluster.address, *SMALL_ENGINE, *extra]


@contextmanager
def running_driver(cluster, args, log, stdout=None):
    """`llmops batch ARGS` in its own session, its stderr in `log` (its stdout in `stdout`, if given); killed
    with everything it started if it is still running when the block ends (a failed assertion, a hang guard)."""
    driver = subprocess.Popen([sys.executable, "-m", "llmops", *args],
                              stdout=open(stdout, "w") if stdout else subprocess.DEVNULL,
                              stderr=open(log, "w"), start_new_session=True, cwd=REPO,
                              env={**os.environ, **cluster.env})
    try:
        yield driver
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()


def wait_for_engines_started(log, driver, count):
    deadline = time.monotonic() + 600
    while log.read_text().count(" started on node ") < count:
        assert driver.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)


def assert_exactly_once(out, rows):
    table = pq.read_table(out / "results").sort_by("row")
    assert table.column("row").to_pylist() == list(range(rows))  # none lost, none twice
    assert table.column("error").null_count == rows and table.column("generated_text").null_count == 0
    assert not list(out.glob("results/*.tmp"))
    return table


@pytest.mark.ray
@pytest.mark.engine
def test_parquet_job_runs_on_both_nodes_and_the_rerun_skips_it(cluster, tmp_path, default_model_dir):
    # Which engine takes which unit depends on when each is up: beside other test modules one engine started in
    # 36 s, the other in 157 s, after the first had run the whole job. So the test looks at how much was left
    # when the second engine came up: each engine runs one sequence at a time and holds at most
    # CALLS_PER_ACTOR calls of QUEUE_DEPTH_FACTOR x 1 rows (one unit of 2), so with more units than that left
    # uncommitted, the second engine must take some (alone, all 25 were left). Two of the rows are
    # reports of ~3 contexts, map-reduced (issue 22) on whichever node takes them.
    short = 48
    path = write_prompts_and_reports(tmp_path / "in.parquet", short, at=(short,))
    rows, units = short + 2, short // 2 + 1
    out = tmp_path / "out"
    args = batch_args(cluster, path, out, "--max-tokens", "64", "--set", "chunk_rows=2", "--set",
                      "engine.max_num_seqs=1", *LONG_REPORTS)

    plan = run_cli(*args, "--dry-run", "--json", env=cluster.env)
    assert plan.returncode == 0, plan.stderr[-2000:]
    planned = json.loads(plan.stdout)
    assert len(planned["ray"]["nodes"]) == 2 and len(planned["engines"]) == 2
    assert {e["host_slot"] for e in planned["engines"]} == {0, 1}  # one host: each engine its own cores
    assert not out.exists()

    log, stdout = tmp_path / "driver.log", tmp_path / "driver.json"
    with running_driver(cluster, [*args, "--json"], log, stdout=stdout) as driver:
        wait_for_engines_started(log, driver, 2)
        left = units - len(list(out.glob("results/*.parquet")))
        driver.wait(timeout=900)
    stderr = log.read_text()
    assert driver.returncode == 0, stderr[-3000:]
    started = re.findall(r"engine (\d) started on node (\w+)", stderr)
    assert len(started) == 2 and len({node for _, node in started}) == 2, stderr  # an engine on each node
    print(f"{left} of {units} units were left when the second engine started")
    summary = json.loads(stdout.read_text())
    assert (summary["rows_ok"], summary["engines"]) == (rows, 2)
    assert_exactly_once(out, rows)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and sorted(manifest["nodes"]) == sorted(manifest["units"])
    assert len(manifest["units"]) == units
    if left > 3:  # see above: the second engine was up while work was left for it
        assert len(set(manifest["nodes"].values())) == 2, f"{left} units were left for the second engine"
    assert all(line.startswith("llmops") for line in stderr.splitlines() if line.strip())
    assert_reports_whole(out, short, 2)
    assert summary["long"]["chunked"] == 2
    cluster.wait_for_engines_gone()

    again = run_cli(*args, "--json", env=cluster.env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout)["rows_skipped"] == rows and "starting" not in again.stderr
    assert json.loads((out / "manifest.json").read_text())["nodes"] == manifest["nodes"]


@pytest.mark.ray
@pytest.mark.engine
def test_an_embedding_job_runs_on_both_nodes(cluster, tmp_path, default_embed_model_dir):
    rows = 40
    path = tmp_path / "docs.parquet"
    texts = [f"Note {i}: " + "the quick brown fox jumps. " * (1 + i % 5) for i in range(rows)]
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(rows)], "text": texts}), path)
    out = tmp_path / "out"
    done = run_cli(*batch_args(cluster, path, out, "--model", "all-minilm-l6-v2", "--set", "chunk_rows=4", "--json"),
                   env=cluster.env)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert (summary["rows_ok"], summary["engines"]) == (rows, 2)
    table = pq.read_table(out / "results").sort_by("row")
    assert table.column("id").to_pylist() == [f"d{i}" for i in range(rows)]
    assert table.column("embedding").null_count == 0 and len(table.column("embedding")[0].as_py()) == 384
    assert done.stderr.count(" started on node ") == 2  # an engine on each node
    # Which node embeds which unit depends on when each engine is up (an embedding unit takes well under a
    # second; test_parquet_job_runs_on_both_nodes checks that both take units); the vectors must not.
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["job"]["task"]["name"] == "embed" and sorted(manifest["nodes"]) == sorted(manifest["units"])
    from sentence_transformers import SentenceTransformer

    expected = SentenceTransformer(str(default_embed_model_dir), device="cpu").encode(
        texts, normalize_embeddings=True, convert_to_numpy=True)
    got = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    cosine = np.sum(got * expected, axis=1) / np.linalg.norm(got, axis=1)
    assert cosine.min() >= 0.999, (cosine.argmin(), cosine.min())
    cluster.wait_for_engines_gone()


@pytest.mark.ray
@pytest.mark.engine
def test_killing_the_driver_mid_job_then_rerun_gives_every_row_once(cluster, tmp_path, default_model_dir):
    rows = 24
    path = write_prompts(tmp_path / "in.parquet", rows)
    out = tmp_path / "out"
    args = batch_args(cluster, path, out, "--max-tokens", "48", "--set", "chunk_rows=2")
    with running_driver(cluster, args, tmp_path / "driver.log") as driver:
        wait_for_shards(out, driver)
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    before = {s.name: s.stat().st_mtime_ns for s in out.glob("results/*.parquet")}
    assert 0 < len(before) < rows // 2, "the kill must land mid-job"
    cluster.wait_for_engines_gone()  # Ray ends a dead driver's actors, and vLLM's processes with them

    done = run_cli(*args, "--json", env=cluster.env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["rows_skipped"] >= 2 * len(before)
    assert_exactly_once(out, rows)
    after = {s.name: s.stat().st_mtime_ns for s in out.glob("results/*.parquet")}
    assert all(after[name] == t for name, t in before.items())  # committed work was not redone
    cluster.wait_for_engines_gone()


@pytest.mark.ray
@pytest.mark.engine
def test_sigterm_to_the_driver_commits_what_every_node_finished_exits_75_and_the_rerun_completes(
        cluster, tmp_path, default_model_dir):
    rows, grace = 96, 3.0
    # Text to continue, so that every row runs to max_tokens (a bare instruction often ends at once).
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [f"q{i}" for i in range(rows)], "prompt": [
        f"Chapter {i + 1}. The lighthouse keeper opened the door on a cold morning, when" for i in range(rows)]}), path)
    out = tmp_path / "out"
    # One sequence at a time, so a unit's rows finish one after another; a short grace period, so the
    # engines stop mid-unit and commit the rows they finished as pieces.
    job = batch_args(cluster, path, out, "--max-tokens", "32", "--set", "chunk_rows=16")
    args = [*job, "--set", "engine.max_num_seqs=1", "--grace-period", str(grace)]
    log = tmp_path / "driver.log"
    with running_driver(cluster, args, log) as driver:
        wait_for_engines_started(log, driver, 2)  # both engines are generating from here on
        started = time.monotonic()
        wait_for_shards(out, driver)
        # The next units are under way: wait for about 3 of their 16 rows (timed by the first unit's rows, so a
        # slow machine waits longer), so each engine has finished rows and none has finished its unit.
        time.sleep(max(2.0, 3 * (time.monotonic() - started) / 16))
        driver.send_signal(signal.SIGTERM)  # the driver's machine is being preempted
        stopped = time.monotonic()
        driver.wait(timeout=120)
        took = time.monotonic() - stopped
    stderr = log.read_text()
    assert driver.returncode == 75, stderr[-3000:]
    assert "stopped by SIGTERM" in stderr and "rerun the same command to finish the job" in stderr
    assert took < grace + 60, f"exit took {took:.1f} s for a {grace:.0f} s grace period"  # catches a hang only
    kept = pq.read_table(out / "results", columns=["row"]).column("row").to_pylist()
    assert len(kept) == len(set(kept)) < rows
    pieces = list(out.glob("results/part-*.*.parquet"))  # part-UNIT.N.parquet: some rows of a unit
    print(f"SIGTERM: exit 75 after {took:.1f} s; {len(kept)} rows kept, {len(pieces)} pieces of unfinished units")
    assert pieces, "the engines committed the rows they had finished of the units they were running"
    cluster.wait_for_engines_gone()

    # The rerun is the same job (max_num_seqs is not part of it) with the engines' default batch: the rest of
    # the rows in a few batches instead of one at a time.
    done = run_cli(*job, "--json", env=cluster.env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["rows_skipped"] == len(kept)  # what the stop committed is not redone
    assert_exactly_once(out, rows)
    cluster.wait_for_engines_gone()


@pytest.fixture()
def own_cluster():
    """A cluster of this test's own: it kills a node for good, which must not depend on running last."""
    pytest.importorskip("ray")
    from tests.ray_cluster import LocalRayCluster

    with LocalRayCluster(cpus_per_node=1, nodes=2) as c:
        yield c


@pytest.mark.ray
@pytest.mark.engine
def test_killing_a_node_mid_job_finishes_on_the_other_and_rerun_gives_every_row_once(own_cluster, tmp_path,
                                                                                     default_model_dir):
    cluster = own_cluster
    short = 60
    rows = short + 4  # and 4 reports, map-reduced, in the first units: in flight on the node killed, or done there
    path = write_prompts_and_reports(tmp_path / "in.parquet", short, at=(2, 10))
    out = tmp_path / "out"
    args = batch_args(cluster, path, out, "--max-tokens", "48", "--set", "chunk_rows=2", *LONG_REPORTS)
    log = tmp_path / "driver.log"

    def committed_on_node_1() -> bool:  # an event, not a time: one engine can start 15 s sooner and run half
        on_node_1 = f" on node {cluster.node_id(1)[:12]} ".encode()  # the job alone (CI), and the kill must
        for shard in out.glob("results/*.parquet"):  # find work on the node it kills
            try:
                if on_node_1 in pq.read_schema(shard).metadata[b"llmops.writer"]:
                    return True
            except (OSError, pa.ArrowInvalid):
                continue  # being linked into place
        return False

    with running_driver(cluster, args, log) as driver:
        # Both engines are up (killed while starting, the node's engine "did not start": another path), and
        # the worker node's engine is committing units (engine 0 or 1: Ray places them).
        wait_for_engines_started(log, driver, 2)
        deadline = time.monotonic() + 600
        while not committed_on_node_1():
            assert driver.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        cluster.kill_node(1)  # the worker node, with its raylet, engine actor and vLLM processes
        driver.wait(timeout=600)
    stderr = log.read_text()
    assert driver.returncode == 0, stderr[-3000:]
    assert "was lost" in stderr and "1 of 2 engines left" in stderr
    assert_exactly_once(out, rows)
    assert_reports_whole(out, short, 4)
    cluster.wait_for_engines_gone()

    again = run_cli(*args, "--json", env=cluster.env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout)["rows_skipped"] == rows
    assert_exactly_once(out, rows)
