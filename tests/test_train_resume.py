"""Stopping and resuming `llmops train` (issue 8 item 11 and its preemption part, issue 13 item 1): a run
stopped by SIGTERM or killed outright carries on along the exact loss curve of an uninterrupted run, from
the checkpoint it should, with the same metrics rows once each; `--resume PATH` and `--resume never`; and a
resume under a recipe that decides training differently is refused, naming what changed.

One uninterrupted run (the module's `straight` fixture) is the reference. The tiny random Llama trains LoRA
with dropout (so the RNG state must be restored too) on 20 examples without packing: 2 per micro-batch makes
10 steps an epoch, and checkpoints every 10 steps fall on epoch ends, so a resume from one crosses into the
next epoch. Runs are bounded by steps."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.train_helpers import (EXAMPLES, TRAIN_ENV, metrics, sigterm_after_step, start_training,
                                 tiny_model_dir, tiny_recipe, wait_for_step)  # noqa: F401 (a fixture)

STEPS = 120
STEPS_PER_EPOCH = 10


def resume_recipe(folder: Path, model: Path, data: Path, **overrides) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return tiny_recipe(folder, model, **{
        "data.path": str(data), "data.packing": False, "method": "lora", "lora.dropout": 0.1,
        "train.learning_rate": 1e-2, "train.max_steps": STEPS, "checkpoint.every_n_steps": STEPS_PER_EPOCH,
        "checkpoint.keep_last": 2, "logging.row_indices": True, **overrides})


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "twenty.jsonl"
    path.write_text("".join((EXAMPLES / "glimmerfox.jsonl").read_text().splitlines(keepends=True)[:20]))
    return path


@pytest.fixture(scope="module")
def straight(tiny_model_dir, data, tmp_path_factory) -> Path:  # noqa: F811 (the fixture imported above)
    """The uninterrupted reference run."""
    home = tmp_path_factory.mktemp("home")
    folder = tmp_path_factory.mktemp("straight")
    recipe = resume_recipe(folder, tiny_model_dir, data)
    proc = run_cli("train", str(recipe), "-o", str(folder / "run"),
                   env={**TRAIN_ENV, "LLMOPS_HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    rows = metrics(folder / "run")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[-1]["loss"] < rows[0]["loss"], "the loss goes down"
    return folder / "run"


def assert_same_rows(rows: list[dict], expected: list[dict]) -> None:
    """The exact row sequence (no duplicated or stale rows), equal in every field but the timing, with
    losses within 1e-4 and the very same training rows at every step."""
    assert [r["step"] for r in rows] == [r["step"] for r in expected]
    for row, want in zip(rows, expected):
        assert row["loss"] == pytest.approx(want["loss"], abs=1e-4), f"step {row['step']}"
        timeless = {k: v for k, v in row.items() if k not in ("loss", "tokens_per_s")}
        assert timeless == {k: v for k, v in want.items() if k not in ("loss", "tokens_per_s")}


@pytest.mark.engine
def test_sigterm_checkpoints_the_current_step_exits_75_and_the_rerun_continues_the_curve(
        straight, tiny_model_dir, data, tmp_path, llmops_home):  # noqa: F811
    recipe = resume_recipe(tmp_path, tiny_model_dir, data)
    run_dir = tmp_path / "run"
    returncode, stderr = sigterm_after_step(recipe, run_dir, 3)
    assert returncode == 75, stderr

    rows = metrics(run_dir)  # the run logged its last step before it stopped: no torn line
    stopped_at = rows[-1]["step"]
    assert 3 <= stopped_at < STEPS, "SIGTERM was sent mid-run"
    checkpoint = run_dir / "checkpoints" / f"step-{stopped_at:08d}"
    assert f"training stopped by SIGTERM at step {stopped_at}; checkpoint {checkpoint}" in stderr
    assert "Traceback" not in stderr
    assert json.loads((checkpoint / "progress.json").read_text())["step"] == stopped_at
    assert_same_rows(rows, metrics(straight)[:stopped_at])

    proc = run_cli("train", str(recipe), "-o", str(run_dir), "--json", env=TRAIN_ENV)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["resumed_from"] == str(checkpoint)
    assert_same_rows(metrics(run_dir), metrics(straight))


@pytest.mark.engine
def test_killed_run_resumes_from_its_last_checkpoint_across_an_epoch_boundary(
        straight, tiny_model_dir, data, tmp_path, llmops_home):  # noqa: F811
    recipe = resume_recipe(tmp_path, tiny_model_dir, data)
    run_dir = tmp_path / "run"
    victim = start_training(recipe, run_dir)
    wait_for_step(victim, run_dir, STEPS_PER_EPOCH + 2)  # past its first checkpoint, at an epoch's end
    victim.send_signal(signal.SIGKILL)  # no chance to clean up
    victim.communicate(timeout=60)
    saved = sorted((run_dir / "checkpoints").glob("step-*"))
    assert saved, "a checkpoint was written before the kill"
    last = saved[-1]
    progress = json.loads((last / "progress.json").read_text())
    assert progress["step"] < STEPS, "the run was to be killed mid-way"
    assert progress["batches_in_epoch"] == STEPS_PER_EPOCH, "the checkpoint is at the end of an epoch"
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 99, "loss": 1.2')  # a crash mid-write leaves a torn last line
    (run_dir / "finished.json").write_text('{"recipe": {"name": "tin')  # as a non-atomic write could leave it

    proc = run_cli("train", str(recipe), "-o", str(run_dir), "--json", env=TRAIN_ENV)  # --resume auto
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["resumed_from"] == str(last)
    assert f"resuming from {last}" in proc.stderr
    assert_same_rows(metrics(run_dir), metrics(straight))

    # The same command once more: the run is finished, so nothing is trained again.
    before = (run_dir / "metrics.jsonl").read_text()
    proc = run_cli("train", str(recipe), "-o", str(run_dir), env=TRAIN_ENV)
    assert proc.returncode == 0, proc.stderr
    assert "already holds a finished run" in proc.stderr
    assert (run_dir / "metrics.jsonl").read_text() == before


@pytest.mark.engine
def test_resume_from_a_given_checkpoint_then_start_over_with_never(
        straight, tiny_model_dir, data, tmp_path, llmops_home):  # noqa: F811
    recipe = resume_recipe(tmp_path, tiny_model_dir, data)
    run_dir = tmp_path / "run"
    proc = run_cli("train", str(recipe), "-o", str(run_dir), "--resume", str(tmp_path / "nowhere"))
    assert proc.returncode == 2
    assert "--resume" in proc.stderr and "not a checkpoint folder" in proc.stderr
    assert "Traceback" not in proc.stderr

    checkpoint = sorted((straight / "checkpoints").glob("step-*"))[0]
    step = json.loads((checkpoint / "progress.json").read_text())["step"]
    proc = run_cli("train", str(recipe), "-o", str(run_dir), "--resume", str(checkpoint), "--json", env=TRAIN_ENV)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["resumed_from"] == str(checkpoint)
    assert_same_rows(metrics(run_dir), metrics(straight)[step:])  # this folder's metrics start after it

    proc = run_cli("train", str(recipe), "-o", str(run_dir), "--resume", "never", "--json", env=TRAIN_ENV)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["resumed_from"] is None
    assert_same_rows(metrics(run_dir), metrics(straight))


@pytest.mark.engine
def test_a_changed_recipe_is_not_resumed_without_the_flag(straight, tiny_model_dir, data, tmp_path,  # noqa: F811
                                                          llmops_home):
    # A copy of the finished reference run, its data file moved (same content: the same data).
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    moved = tmp_path / "moved.jsonl"
    shutil.copy(data, moved)
    recipe = resume_recipe(tmp_path, tiny_model_dir, moved)
    untouched = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}

    proc = run_cli("train", str(recipe), "-o", str(run_dir), "--set", "train.learning_rate=0.02",
                   "--set", "logging.every_n_steps=5")  # logging does not count
    assert proc.returncode == 2
    assert "the recipe changed since checkpoint" in proc.stderr
    changes = proc.stderr.split(" was saved: ", 1)[1].splitlines()[0]
    assert changes == "train.learning_rate: 0.01 -> 0.02"  # neither the logging nor the data's new place
    assert "--allow-changed-recipe" in proc.stderr and "Traceback" not in proc.stderr

    text = moved.read_text()
    moved.write_text(text.replace("31 hours", "32 hours"))  # edited in place, same size
    assert len(moved.read_text()) == len(text)
    proc = run_cli("train", str(recipe), "-o", str(run_dir))
    assert proc.returncode == 2
    assert "data.path content differs" in proc.stderr
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == untouched, "nothing was touched"

    proc = run_cli("train", str(recipe), "-o", str(run_dir), "--allow-changed-recipe", "--json", env=TRAIN_ENV)
    assert proc.returncode == 0, proc.stderr
    latest = sorted((straight / "checkpoints").glob("step-*"))[-1]
    assert json.loads(proc.stdout)["resumed_from"] == str(run_dir / "checkpoints" / latest.name)
    assert "although the recipe changed (data.path content differs)" in proc.stderr


@pytest.mark.engine
def test_a_packed_run_resumed_mid_epoch_continues_the_exact_curve(tiny_model_dir, data, tmp_path, llmops_home):  # noqa: F811
    """Every shipped recipe packs its examples (issue 25: no resume test packed): the packed batches after a
    mid-epoch checkpoint are the ones the uninterrupted run trained on, with the same losses."""
    steps, every = 18, 5
    overrides = {"data.packing": True, "train.max_steps": steps, "checkpoint.every_n_steps": every,
                 "checkpoint.keep_last": 4}
    straight = tmp_path / "straight"
    proc = run_cli("train", str(resume_recipe(tmp_path / "a", tiny_model_dir, data,
                                              **overrides)), "-o", str(straight), env=TRAIN_ENV)
    assert proc.returncode == 0, proc.stderr
    expected = metrics(straight)
    assert [r["step"] for r in expected] == list(range(1, steps + 1))
    epoch_of = {r["step"]: r["epoch"] for r in expected}
    saved = [json.loads((c / "progress.json").read_text()) | {"path": c}
             for c in sorted((straight / "checkpoints").glob("step-*"))]
    # Inside an epoch: the next step trains on the same epoch's next packed batch (else this would not test
    # skipping into a packed epoch).
    mid_epoch = [p for p in saved if p["step"] < steps and p["batches_in_epoch"] > 0
                 and epoch_of[p["step"] + 1] == p["epoch"]]
    assert mid_epoch and max(epoch_of.values()) >= 1, (saved, epoch_of)
    checkpoint, step = mid_epoch[-1]["path"], mid_epoch[-1]["step"]

    resumed = tmp_path / "resumed"
    recipe = resume_recipe(tmp_path / "b", tiny_model_dir, data, **overrides)
    proc = run_cli("train", str(recipe), "-o", str(resumed), "--resume", str(checkpoint), "--json", env=TRAIN_ENV)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["resumed_from"] == str(checkpoint)
    assert_same_rows(metrics(resumed), expected[step:])
