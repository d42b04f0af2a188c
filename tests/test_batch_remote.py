"""Batch output on object storage: the same exactly-once folder as on a local disk, on a local S3-compatible
server (moto) that the tests start themselves."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from llmops.batch import plan_batch
from llmops.batch.engine import _commit, _InFlight
from llmops.batch.inputs import iter_units
from llmops.batch.outputs import OutputDir
from llmops.errors import StorageError, UsageError
from llmops.storage import filesystem, list_files
from tests.conftest import REPO
from tests.test_batch_trust import assert_refused, batch, cfg, env, job_files, write_jsonl  # noqa: F401
from tests.test_storage import bucket, s3_server  # noqa: F401


def s3_env(env, s3_server):  # noqa: F811
    return {**env, "AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1"}


def objects(uri: str) -> list[str]:
    fs, root = filesystem(uri)
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return sorted(i.path[len(root) + 1:] for i in infos if i.type == pafs.FileType.File)


def commit_made_up(config, prompts, out: str, units: int) -> list[str]:
    """What a killed earlier run leaves: its manifest and `units` committed shards (made-up results)."""
    job = plan_batch(config, str(prompts), out)
    job.output.lock()
    committed = job.output.prepare(job.identity, job.unit_sizes, False, job.manifest())
    for unit in iter_units(job.input_spec, job.row_counts, config.chunk_rows, set(job.units[:units]),
                           committed.partial):
        state = _InFlight(unit, [{"generated_text": "made up", "finish_reason": "stop", "prompt_tokens": 3,
                                  "completion_tokens": 2, "error": None} for _ in unit.rows], 0)
        _commit(state, job.output, job.identity)
    job.output.unlock()
    return job.units[:units]


@pytest.mark.unit
def test_a_job_on_the_bucket_resumes_refuses_another_job_and_overwrites_only_its_own(job_files, bucket):  # noqa: F811
    model, prompts, _ = job_files
    out = f"s3://{bucket}/jobs/run1"
    done = commit_made_up(cfg(model), prompts, out, units=1)
    assert objects(out) == ["manifest.json", f"results/part-{done[0]}.parquet"]
    assert ".llmops-batch.lock" not in objects(out), "the lease is released"

    # The rerun sees the committed unit, also with the manifest lost (rebuilt from the shards).
    fs, root = filesystem(out)
    fs.delete_file(f"{root}/manifest.json")
    job = plan_batch(cfg(model), str(prompts), out)
    job.output.lock()
    committed = job.output.prepare(job.identity, job.unit_sizes, False, job.manifest())
    job.output.unlock()
    assert list(committed.done) == done
    assert json.loads(fs.open_input_stream(f"{root}/manifest.json").read())["units"][done[0]]["rows"] == 2

    # A committed shard is never replaced: a zombie writer's commit of the same unit is dropped.
    shard = f"{root}/results/part-{done[0]}.parquet"
    before = pq.read_table(shard, filesystem=fs)
    unit = next(iter_units(job.input_spec, job.row_counts, 2, {done[0]}, {}))
    zombie = _InFlight(unit, [{"generated_text": "zombie", "finish_reason": "stop", "prompt_tokens": 1,
                               "completion_tokens": 1, "error": None} for _ in unit.rows], 0)
    _commit(zombie, job.output, job.identity)
    assert pq.read_table(shard, filesystem=fs).equals(before)

    # Another job is refused; --overwrite removes only what llmops wrote.
    with pytest.raises(UsageError, match=f"{out} holds another job's results: sampling.max_tokens"):
        plan_batch(cfg(model, "sampling.max_tokens=7"), str(prompts), out)
    with fs.open_output_stream(f"{root}/notes.txt") as f:
        f.write(b"the user's")
    other = plan_batch(cfg(model, "sampling.max_tokens=7"), str(prompts), out, overwrite=True)
    other.output.lock()
    assert other.output.prepare(other.identity, other.unit_sizes, True, other.manifest()).done == {}
    other.output.unlock()
    assert objects(out) == ["manifest.json", "notes.txt"]


@pytest.mark.unit
def test_a_prefix_holding_other_data_is_refused(job_files, bucket):  # noqa: F811
    model, prompts, _ = job_files
    fs, root = filesystem(f"s3://{bucket}/data")
    with fs.open_output_stream(f"{root}/table.parquet") as f:
        f.write(b"PAR1 someone else's")
    with pytest.raises(UsageError, match=f"s3://{bucket}/data is not empty and holds no llmops batch output "
                                         r"\(found table.parquet\)"):
        plan_batch(cfg(model), str(prompts), f"s3://{bucket}/data")


@pytest.mark.unit
def test_a_run_that_paused_past_the_takeover_stops_instead_of_writing_beside_the_new_holder(bucket,  # noqa: F811
                                                                                            monkeypatch):
    """The lease was renewed without looking: a driver paused longer than the takeover time (20 s) came back,
    overwrote the new holder's lease, and both wrote (issue 25). Two drivers on one bucket, the first one's
    renewals held back as by SIGSTOP."""
    import threading

    from llmops.batch import outputs
    from llmops.errors import StorageError

    for name, value in (("LEASE_RENEW_S", 0.1), ("LEASE_POLL_S", 0.05), ("LEASE_SETTLE_S", 0.05),
                        ("LEASE_STALE_S", 0.5)):
        monkeypatch.setattr(outputs, name, value)
    uri = f"s3://{bucket}/fenced"
    first = OutputDir(uri)
    paused = threading.Event()
    real_renew = outputs._Lease._renew

    def renew_unless_paused(lease):
        if lease.out is first:
            paused.wait()  # stopped: no renewal until resumed
        real_renew(lease)

    monkeypatch.setattr(outputs._Lease, "_renew", renew_unless_paused)
    first.lock()
    second = OutputDir(uri)
    second.lock()  # the first's lease went stale: taken over, as a rerun on another host would
    theirs = json.loads(second.read_text(outputs.LOCK))["token"]
    paused.set()  # the first driver resumes
    deadline = time.monotonic() + 30
    while first._lease.lost_to is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first._lease.lost_to is not None  # its renewal saw another holder and stopped
    assert json.loads(second.read_text(outputs.LOCK))["token"] == theirs  # and did not overwrite the lease
    import pyarrow as pa

    from llmops.batch.identity import EngineIdentity, InputIdentity, JobIdentity, ModelIdentity

    job = JobIdentity(input=InputIdentity(format="jsonl", files=[], digest="0"), model=ModelIdentity(name="m"),
                      sampling={}, engine=EngineIdentity(dtype="float32", max_model_len=8), chunk_rows=1)
    with pytest.raises(StorageError, match="was taken over by another llmops batch"):
        first.commit("00000-000000", pa.table({"row": [0]}), outputs.UnitStats(rows=1, ok=1), job)
    assert all(not name.startswith("results/") for name in objects(uri))  # the paused run wrote nothing
    second.unlock()
    first._lease._stop.set()


@pytest.mark.unit
def test_the_lease_keeps_a_second_run_out_and_a_dead_holder_does_not(bucket, monkeypatch):  # noqa: F811
    import socket

    from llmops.batch import outputs

    # A live holder renews every 0.2 s; 15 s without a renewal is stale. The second run waits only until the
    # first renewal it sees, so the window costs nothing on a quiet machine; with 5 s, under `make test`'s two
    # workers, no renewal reached the local S3 server in time once and the second run took the lease.
    for name, value in (("LEASE_RENEW_S", 0.2), ("LEASE_POLL_S", 0.05), ("LEASE_SETTLE_S", 0.05),
                        ("LEASE_STALE_S", 15.0)):
        monkeypatch.setattr(outputs, name, value)
    uri = f"s3://{bucket}/leased"
    first = OutputDir(uri)
    first.lock()
    held = json.loads(first.read_text(outputs.LOCK))
    assert held["holder"] == f"pid {held['pid']} on host {socket.gethostname()}"
    with pytest.raises(UsageError, match=f"{uri} is in use by another llmops batch \\(pid \\d+ on host "):
        OutputDir(uri).lock()  # the live holder renews its lease while the second run watches
    first.unlock()
    assert ".llmops-batch.lock" not in objects(uri)

    def lease_of(**holder) -> OutputDir:
        """A lease written by a holder that is not renewing it (killed), then a run that wants the folder."""
        stale = OutputDir(uri)
        stale._write(outputs.LOCK, json.dumps({"holder": "pid {pid} on host {host}".format(**holder), **holder,
                                               "token": "theirs", "renewed": time.time()}).encode())
        return OutputDir(uri)

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    # Bounded by what decides it, not by the wall clock: a holder known dead is taken over even while its lease
    # would stay fresh for a minute (waiting for it to go stale would trip the 30 s ceiling); a holder on
    # another host only once its lease is stale (1 s here).
    for holder, stale_s in (({"pid": int(dead.stdout), "host": socket.gethostname()}, 60.0),
                            ({"pid": 1, "host": "another-node"}, 1.0)):
        monkeypatch.setattr(outputs, "LEASE_STALE_S", stale_s)
        run = lease_of(**holder)
        started = time.monotonic()
        run.lock()
        assert time.monotonic() - started < 30, holder  # only catches a wait for the 60 s staleness (or a hang)
        assert json.loads(run.read_text(outputs.LOCK))["token"] == run._lease.token
        run.unlock()


@pytest.mark.unit
def test_an_unreachable_store_is_one_line_naming_the_location(job_files, env, monkeypatch):  # noqa: F811
    model, prompts, _ = job_files
    # Nothing listens on port 9; pyarrow's S3 client would retry for minutes by default.
    broken = {**env, "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x",
              "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}
    started = time.monotonic()
    proc = batch(prompts, "-o", "s3://nobucket/out", "--model", model, "--dry-run", env=broken)
    assert time.monotonic() - started < 60
    assert proc.returncode == 1, proc.stderr  # unreachable: a runtime failure, as on the input side
    assert proc.stderr.startswith("llmops: error: cannot reach the storage of s3://nobucket/out: ")
    assert "Traceback" not in proc.stderr and "AWS_ENDPOINT_URL" in proc.stderr


# --- a real engine -----------------------------------------------------------------------------------


@pytest.mark.engine
def test_a_job_from_the_bucket_killed_mid_way_and_rerun_writes_every_row_to_it_exactly_once(
        default_model_dir, bucket, s3_server, tmp_path, llmops_home):  # noqa: F811
    rows = 12
    local = write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "prompt": f"Count to {i}:"} for i in range(rows)])
    prompts = f"s3://{bucket}/inputs/in.jsonl"  # from the bucket and to it
    fs, path = filesystem(prompts)
    with fs.open_output_stream(path) as f:
        f.write(local.read_bytes())
    out = f"s3://{bucket}/jobs/killed"
    environ = s3_env({"LLMOPS_HOME": str(llmops_home)}, s3_server)
    args = ["batch", prompts, "-o", out, "--model", str(default_model_dir), "--max-tokens", "12",
            "--set", "chunk_rows=2", "--set", "engine.max_num_seqs=2", "--json"]
    import os

    first = subprocess.Popen([sys.executable, "-m", "llmops", *args], cwd=REPO, env={**os.environ, **environ},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    fs, root = filesystem(out)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and first.poll() is None:
        if len(list_files(fs, f"{root}/results", ".parquet")) >= 2:
            break
        time.sleep(0.5)
    assert first.poll() is None, first.communicate()[1]
    first.send_signal(signal.SIGKILL)
    first.communicate()
    committed = len(list_files(fs, f"{root}/results", ".parquet"))
    assert 2 <= committed < rows // 2

    second = subprocess.run([sys.executable, "-m", "llmops", *args], cwd=REPO, env={**os.environ, **environ},
                            capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr
    summary = json.loads(second.stdout)
    assert summary["output_dir"] == out and summary["rows_ok"] == rows
    assert summary["rows_skipped"] == 2 * committed
    table = pq.read_table(f"{root}/results", filesystem=fs)
    assert sorted(table.column("row").to_pylist()) == list(range(rows))  # every row exactly once
    assert all(table.column("generated_text").to_pylist())
    manifest = json.loads(fs.open_input_stream(f"{root}/manifest.json").read())
    assert manifest["status"] == "complete" and manifest["units_done"] == rows // 2
    assert ".llmops-batch.lock" not in objects(out)


@pytest.mark.unit
def test_two_engines_committing_the_same_unit_at_once_leave_every_row_once(bucket):  # noqa: F811
    """put_once checks, then uploads: two writers racing on one unit can both PUT (issue 25). Each PUT is a
    whole shard of the same rows, so the folder still holds every row exactly once."""
    import threading

    import pyarrow as pa

    from llmops.batch.identity import EngineIdentity, InputIdentity, JobIdentity, ModelIdentity
    from llmops.batch.outputs import UnitStats

    job = JobIdentity(input=InputIdentity(format="jsonl", files=[], digest="0"), model=ModelIdentity(name="m"),
                      sampling={}, engine=EngineIdentity(dtype="float32", max_model_len=8), chunk_rows=4)
    uri = f"s3://{bucket}/race"
    start = threading.Barrier(8)
    results = []

    def writer(n: int) -> None:
        table = pa.table({"row": [0, 1, 2, 3], "id": ["a", "b", "c", "d"], "generated_text": [f"w{n}"] * 4,
                          "error": pa.array([None] * 4, pa.string())})
        out = OutputDir(uri)
        start.wait()
        results.append(out.commit("00000-000000", table, UnitStats(rows=4, ok=4), job, writer=f"engine {n}"))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 8 and any(results)
    found = OutputDir(uri).committed({"00000-000000": 4}, job.key())
    assert list(found.done) == ["00000-000000"] and found.done["00000-000000"].rows == 4
    table = pq.read_table(f"{bucket}/race/results", filesystem=filesystem(uri)[0])
    assert sorted(table.column("row").to_pylist()) == [0, 1, 2, 3]  # every row once, whoever won
    assert len(set(table.column("generated_text").to_pylist())) == 1  # one writer's whole shard, not a mix
