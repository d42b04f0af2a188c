"""A picture of a run from its `metrics.jsonl`: the loss and eval-loss curves, drawn in the terminal with
plotext (`llmops train show RUN`, and at the end of `llmops train`), and the same numbers for scripts."""

from __future__ import annotations

from pathlib import Path

from llmops.errors import UsageError

METRICS = "metrics.jsonl"


def find_run(run: str | Path) -> Path:
    """A run folder given by path, or by the name it trained under (`$LLMOPS_HOME/runs/NAME`, the default)."""
    from llmops.paths import llmops_home

    for folder in (Path(run).expanduser(), llmops_home() / "runs" / str(run)):
        if (folder / METRICS).is_file():
            return folder.resolve()
    raise UsageError(f"{run}: no {METRICS} there, nor a run of that name under {llmops_home() / 'runs'}",
                     "give a run folder (`llmops train RECIPE -o RUN` writes one) that has logged a step")


def read_curves(run_dir: Path) -> dict:
    """The logged steps with their loss and learning rate, and the evaluated steps with their eval loss.

    Only finite numbers are points: a diverging run logs NaN, which crashed the plotting library (the
    process aborted with std::bad_alloc), and a hand-edited file may hold anything. The steps whose loss is
    not a finite number are listed under `not_finite` instead, and the summary says the run diverged."""
    from llmops.train.loop import read_jsonl

    rows = [r for r in read_jsonl(Path(run_dir) / METRICS) if isinstance(r, dict) and _is_number(r.get("step"))]
    steps = [r for r in rows if "loss" in r and _is_finite(r["loss"])]
    evals = [r for r in rows if "eval_loss" in r and _is_finite(r["eval_loss"])]
    bad = [{"step": r["step"], key: r[key] if isinstance(r[key], (str, type(None))) else str(r[key])}
           for r in rows for key in ("loss", "eval_loss") if key in r and not _is_finite(r[key])]
    return {"run_dir": str(run_dir), "steps": [r["step"] for r in steps], "loss": [r["loss"] for r in steps],
            "lr": [r.get("lr") if _is_finite(r.get("lr")) else None for r in steps],
            "eval_steps": [r["step"] for r in evals], "eval_loss": [r["eval_loss"] for r in evals],
            "not_finite": bad}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(value) -> bool:
    import math

    return _is_number(value) and math.isfinite(value)


def plot_curves(curves: dict, title: str, width: int = 80, height: int = 20) -> str:
    """The loss (a line) and the eval loss (o) against the step, as text for a terminal (no colours, so the
    picture reads the same on dark and light backgrounds and in a log file)."""
    try:
        import plotext
    except ImportError:
        raise UsageError("drawing the curves needs plotext", "pip install 'llmops[train]' (or plotext); "
                         "--json gives the numbers without it") from None
    figure = plotext.figure
    figure.clear()
    if curves["steps"]:
        figure.draw(figure.signal(curves["steps"], curves["loss"]).lines())
    if curves["eval_steps"]:
        figure.draw(figure.signal(curves["eval_steps"], curves["eval_loss"], marker="o"))
    # The legend box covers the start of the curve, where the loss is highest: the title says it instead.
    figure.legend(active=False)
    figure.plot_size(width, height).title(f"{title}: loss (line), eval loss (o)").label("step", axis="x")
    return figure.build().string(colorless=True)


def summary(curves: dict) -> str:
    """One line: how far the loss went, and the last eval loss."""
    bad = curves.get("not_finite") or []
    diverged = (f"the loss is not a finite number from step {bad[0]['step']} "
                f"({next(v for k, v in bad[0].items() if k != 'step')}): the run diverged; lower the learning "
                "rate or check the data" if bad else "")
    if not curves["steps"]:
        return diverged or "no training steps logged yet"
    parts = [f"{len(curves['steps'])} logged steps up to step {curves['steps'][-1]}",
             f"loss {curves['loss'][0]:.4f} -> {curves['loss'][-1]:.4f}"]
    if curves["eval_steps"]:
        parts.append(f"eval loss {curves['eval_loss'][-1]:.4f} at step {curves['eval_steps'][-1]}")
    return ", ".join(parts + ([diverged] if diverged else []))


def rows_by_step(curves: dict) -> list[tuple]:
    """(step, loss, eval_loss, lr) per step that has any of them; blanks are None."""
    by_step: dict[int, list] = {}
    for step, loss, lr in zip(curves["steps"], curves["loss"], curves["lr"]):
        by_step.setdefault(step, [None, None, None])[0::2] = [loss, lr]
    for step, eval_loss in zip(curves["eval_steps"], curves["eval_loss"]):
        by_step.setdefault(step, [None, None, None])[1] = eval_loss
    return [(step, *values) for step, values in sorted(by_step.items())]
