"""Tracking and the picture of a run: `logging.log_with` (TensorBoard, MLflow) checked at validation and
written offline into the run folder by a real run (engine), and `llmops train show RUN` over a hand-written
metrics file (unit) and a real run's (engine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmops.errors import ConfigError
from tests.conftest import run_cli
from tests.train_helpers import TRAIN_ENV, metrics, tiny_model_dir, tiny_recipe, write_recipe  # noqa: F401

# Twelve logged steps with falling loss, evaluations at 4, 8 and 12, and a torn last line (a crash mid-write).
HAND_WRITTEN = [
    *({"step": s, "epoch": 0, "loss": round(3.0 * 0.9 ** s, 4), "lr": 1e-3 * (1 - s / 12), "tokens": 90,
       "num_processes": 1} for s in range(1, 13)),
]
EVALS = {4: 2.5, 8: 2.1, 12: 1.9}


@pytest.fixture()
def run_dir(tmp_path) -> Path:
    rows = []
    for row in HAND_WRITTEN:
        rows.append(row)
        if row["step"] in EVALS:
            rows.append({"step": row["step"], "eval_loss": EVALS[row["step"]]})
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 13, "lo')
    return folder


# --- train show (unit) --------------------------------------------------------------------------------


@pytest.mark.unit
def test_show_json_gives_the_numbers(run_dir):
    proc = run_cli("train", "show", str(run_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    curves = json.loads(proc.stdout)
    assert curves["steps"] == list(range(1, 13))
    assert curves["loss"] == [r["loss"] for r in HAND_WRITTEN]
    assert curves["lr"] == [r["lr"] for r in HAND_WRITTEN]
    assert curves["eval_steps"] == [4, 8, 12] and curves["eval_loss"] == [2.5, 2.1, 1.9]


@pytest.mark.unit
def test_show_piped_prints_tab_separated_numbers_without_a_picture(run_dir):
    proc = run_cli("train", "show", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split("\t") == ["step", "loss", "eval_loss", "lr"]
    assert len(lines) == 13  # header + one line per step; the torn line is skipped
    assert lines[4].split("\t") == ["4", f"{3.0 * 0.9 ** 4:.4f}".rstrip("0"), "2.5", f"{1e-3 * (1 - 4 / 12):.6g}"]
    assert lines[3].split("\t")[2] == ""  # no evaluation at step 3
    assert "┤" not in proc.stdout  # no axes: a script reading stdout gets numbers only


@pytest.mark.unit
def test_show_on_a_terminal_draws_both_curves(run_dir):
    # FORCE_COLOR makes rich treat stdout as a terminal, as when a person runs the command.
    proc = run_cli("train", "show", str(run_dir), env={"FORCE_COLOR": "1", "COLUMNS": "90"})
    assert proc.returncode == 0, proc.stderr
    picture, summary = proc.stdout.rstrip("\n").rsplit("\n", 1)
    assert "run: loss (line), eval loss (o)" in picture
    assert "step" in picture and "┤" in picture  # axes with ticks
    assert picture.count("o") >= 3 + picture.count("loss (o)")  # the three evaluations (plus the title's)
    assert "\x1b[" not in picture  # no colours: reads the same on any background and in a log
    assert summary == "12 logged steps up to step 12, loss 2.7000 -> 0.8473, eval loss 1.9000 at step 12"


@pytest.mark.unit
def test_plot_marks_lower_loss_lower_on_the_picture(run_dir):
    from llmops.train.report import plot_curves, read_curves

    rows = plot_curves(read_curves(run_dir), "run", width=60, height=16).splitlines()
    canvas = [r.split("┤", 1)[-1].split("│", 1)[-1] for r in rows[2:-4]]  # plot rows, without the y axis
    drawn = [(i, line) for i, line in enumerate(canvas) if line.strip(" │")]
    first_row = min(i for i, line in drawn if any(c not in " │o" for c in line[:5]))
    last_row = max(i for i, line in drawn if any(c not in " │o" for c in line.rstrip(" │")[-3:]))
    assert first_row < last_row, "the curve starts high (top) and ends low (bottom)"


@pytest.mark.unit
def test_show_of_a_folder_without_metrics_exits_2_in_one_line(tmp_path, llmops_home):
    proc = run_cli("train", "show", str(tmp_path / "nowhere"))
    assert proc.returncode == 2
    assert "no metrics.jsonl" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.unit
def test_show_finds_a_run_by_its_name(run_dir, llmops_home):
    runs = llmops_home / "runs"
    runs.mkdir(parents=True)
    run_dir.rename(runs / "glimmer")
    proc = run_cli("train", "show", "glimmer", "--json", env={"LLMOPS_HOME": str(llmops_home)})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["run_dir"] == str(runs / "glimmer")


# --- trackers: validation (unit) ----------------------------------------------------------------------


@pytest.mark.unit
def test_a_missing_tracker_package_is_a_config_error_saying_how_to_install_it(tmp_path, monkeypatch):
    import importlib.util

    from llmops.train.recipe import load_recipe

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    recipe = write_recipe(tmp_path / "r.yaml", **{"logging.log_with": ["tensorboard", "mlflow"]})
    with pytest.raises(ConfigError) as caught:
        load_recipe(recipe)
    assert caught.value.exit_code == 2
    (path, message), = caught.value.problems
    assert path == "logging.log_with"
    assert "mlflow not installed" in message and "pip install 'llmops[track]'" in message
    assert "mlflow-skinny" in message and "tensorboard" not in message.split(":")[0]


@pytest.mark.unit
def test_an_unknown_tracker_names_the_choices(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", **{"logging.log_with": ["wandb"]})
    proc = run_cli("train", "validate", str(recipe))
    assert proc.returncode == 2
    assert "logging.log_with" in proc.stderr and "'tensorboard' or 'mlflow'" in proc.stderr


# --- a real run (engine) ------------------------------------------------------------------------------


@pytest.mark.engine
def test_a_run_logs_to_tensorboard_and_mlflow_in_its_folder_and_shows_its_curves(tiny_model_dir, tmp_path,
                                                                               llmops_home):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = tiny_recipe(tmp_path, tiny_model_dir, **{"train.max_steps": 6, "data.eval_fraction": 0.1,
                                                      "eval.every_n_steps": 3,
                                                      "logging.log_with": ["tensorboard", "mlflow"]})
    run = tmp_path / "run"
    proc = run_cli("train", str(recipe), "-o", str(run), "--json", env=TRAIN_ENV)
    assert proc.returncode == 0, proc.stderr
    json.loads(proc.stdout)  # stdout holds the summary alone: no picture when stderr is not a terminal
    rows = metrics(run)
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    evals = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    assert sorted(losses) == list(range(1, 7)) and sorted(evals) == [3, 6]

    # TensorBoard: RUN/tensorboard/NAME holds the event file with every logged number.
    events = EventAccumulator(str(run / "tensorboard" / "tiny-test"))
    events.Reload()
    tb_loss = {e.step: e.value for e in events.Scalars("loss")}
    assert tb_loss.keys() == losses.keys()
    assert all(tb_loss[s] == pytest.approx(losses[s], abs=1e-5) for s in losses)
    assert {e.step: round(e.value, 5) for e in events.Scalars("eval_loss")} == pytest.approx(evals, abs=1e-5)

    # MLflow: a file store at RUN/mlruns; each metric is a file of "timestamp value step" lines.
    loss_files = list((run / "mlruns").glob("*/*/metrics/loss"))
    assert len(loss_files) == 1, loss_files
    logged = {int(step): float(value) for _, value, step in
              (line.split() for line in loss_files[0].read_text().splitlines())}
    assert logged == pytest.approx(losses, abs=1e-5)
    assert (loss_files[0].parent / "eval_loss").is_file()

    proc = run_cli("train", "show", str(run), "--json")
    assert proc.returncode == 0, proc.stderr
    curves = json.loads(proc.stdout)
    assert dict(zip(curves["steps"], curves["loss"])) == losses
    assert dict(zip(curves["eval_steps"], curves["eval_loss"])) == evals


@pytest.mark.engine
def test_a_resumed_run_continues_its_tracker_curves_and_draws_them_on_a_terminal(tiny_model_dir, tmp_path,
                                                                                 llmops_home):
    """Killed (SIGKILL) after step 3 with checkpoints every 2 steps, then rerun: TensorBoard drops what the
    killed run logged past its last checkpoint (`purge_step`), so every step reads once with the resumed
    value, and MLflow continues the same run. The rerun, on a terminal, draws the curves on stderr."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.train_helpers import start_training, wait_for_step

    recipe = tiny_recipe(tmp_path, tiny_model_dir, **{"train.max_steps": 8, "checkpoint.every_n_steps": 2,
                                                      "logging.log_with": ["tensorboard", "mlflow"]})
    run = tmp_path / "run"
    victim = start_training(recipe, run)
    wait_for_step(victim, run, 3)
    victim.kill()
    victim.communicate(timeout=60)
    assert list((run / "checkpoints").glob("step-*")), "killed after its first checkpoint"
    # FORCE_COLOR: rich takes stderr for a terminal, as when a person watches the run.
    proc = run_cli("train", str(recipe), "-o", str(run), env={**TRAIN_ENV, "FORCE_COLOR": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "tiny-test: loss (line), eval loss (o)" in proc.stderr and "┤" in proc.stderr
    assert "┤" not in proc.stdout
    losses = {r["step"]: r["loss"] for r in metrics(run) if "loss" in r}
    assert sorted(losses) == list(range(1, 9))

    events = EventAccumulator(str(run / "tensorboard" / "tiny-test"))
    events.Reload()
    tb = [(e.step, e.value) for e in events.Scalars("loss")]
    assert [step for step, _ in tb] == list(range(1, 9))
    assert dict(tb) == pytest.approx(losses, abs=1e-5)

    loss_files = list((run / "mlruns").glob("*/*/metrics/loss"))
    assert len(loss_files) == 1, "the rerun continues the interrupted MLflow run"
    last_by_step = {int(step): float(value) for _, value, step in
                    (line.split() for line in loss_files[0].read_text().splitlines())}
    assert last_by_step == pytest.approx(losses, abs=1e-5)


@pytest.mark.unit
def test_a_diverging_run_is_shown_and_said_not_crashed(tmp_path):
    """A NaN loss (what a diverging run logs) aborted `train show` on a terminal (exit 134, std::bad_alloc in
    the plotting library); a null, list or string loss was `unexpected error` (issue 25)."""
    folder = tmp_path / "run"
    folder.mkdir()
    rows = [*({"step": s, "loss": 2.0 - 0.1 * s, "lr": 1e-3} for s in range(1, 6)), {"step": 6, "loss": float("nan")},
            {"step": 7, "loss": None}, {"step": 8, "loss": [1]}, {"step": 9, "loss": "x"},
            {"step": 9, "eval_loss": float("inf")}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    drawn = run_cli("train", "show", str(folder), env={"FORCE_COLOR": "1", "COLUMNS": "90"})
    assert drawn.returncode == 0, drawn.stderr
    summary = drawn.stdout.rstrip("\n").rsplit("\n", 1)[-1]
    assert summary.startswith("5 logged steps up to step 5") and "not a finite number from step 6 (nan)" in summary
    assert "diverged" in summary
    numbers = run_cli("train", "show", str(folder), "--json")
    assert numbers.returncode == 0, numbers.stderr
    curves = json.loads(numbers.stdout)
    assert curves["steps"] == [1, 2, 3, 4, 5] and [b["step"] for b in curves["not_finite"]] == [6, 7, 8, 9, 9]
    piped = run_cli("train", "show", str(folder))
    assert piped.returncode == 0 and len(piped.stdout.splitlines()) == 6
