"""`llmops train RECIPE`: fine-tune with accelerate from a validated recipe; `llmops train validate RECIPE`
checks a recipe without loading anything; `llmops train recipes` lists the shipped ones; `llmops train show RUN`
draws a run's loss curves."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from llmops.cli import _output as out
from llmops.cli._options import DryRunOpt, JsonOpt, OutputOpt, SetOpt


class _RunByDefault(TyperGroup):
    """`llmops train RECIPE ...` means `llmops train run RECIPE ...`; the other subcommands stay commands."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(cls=_RunByDefault, no_args_is_help=True,
                  help="Fine-tune a model from a recipe: `llmops train RECIPE.yaml` (or a shipped recipe's name).")

RecipeArg = Annotated[str, typer.Argument(metavar="RECIPE", show_default=False,
                                          help="Recipe YAML file, or the name of a shipped recipe (`llmops train "
                                               "recipes`).")]



@app.command("run")
def run_command(
    recipe: RecipeArg,
    set_: SetOpt = None,
    output: OutputOpt = None,
    resume: Annotated[str, typer.Option(
        help="auto: continue from the latest checkpoint in the run folder; never: start over; "
             "or a checkpoint folder.")] = "auto",
    allow_changed_recipe: Annotated[bool, typer.Option(
        "--allow-changed-recipe",
        help="Resume even if the checkpoint was saved under a recipe that decides training differently "
             "(other data, hyperparameters, model...); without it such a resume exits 2.")] = False,
    dry_run: DryRunOpt = False,
    json: JsonOpt = False,
) -> None:
    """Train as RECIPE says (the default command: `llmops train RECIPE`), then register the result.

    SIGTERM saves a checkpoint at the current step and exits 75: rerun the same command to continue."""
    from llmops.train.launch import plan_recipe, run
    from llmops.train.recipe import load_recipe

    run_plan = plan_recipe(load_recipe(recipe, set_), output=output)
    if dry_run:
        estimate = _estimate(run_plan)
        if json:
            out.print_json({**run_plan.to_dict(), "estimate": estimate.to_dict() if estimate else None})
            return
        plan = dict(run_plan.plan)
        notes = plan.pop("notes", ())
        r = run_plan.recipe
        out.key_values(f"train plan for {r.name}", [
            ("base model", f"{run_plan.base_model} ({r.model})"), ("run folder", run_plan.run_dir),
            *plan.items(), ("micro-batch x accumulation x processes",
                            f"{r.train.micro_batch_size} x {r.train.gradient_accumulation_steps} x "
                            f"{run_plan.total_processes}"),
            *(("why", n) for n in notes)])
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in run_plan.env.items())
        out.result((env + " " if env else "") + shlex.join(run_plan.command) if run_plan.command
                   else "(one process: trains inside llmops, no accelerate launch)")
        if estimate is not None:
            from llmops.estimate import load_prices

            price = load_prices(examples=False).get("this")
            out.key_values("Estimate", estimate.lines(price[0] if price else None))
        return
    summary = run(run_plan, resume=resume, allow_changed_recipe=allow_changed_recipe, log=out.log)
    _draw_on_stderr(run_plan.recipe.name, run_plan.run_dir)
    if json:
        out.print_json(summary)
        return
    out.key_values(f"trained {run_plan.recipe.name}", summary.items())


def _estimate(run_plan):
    """How long the planned run takes (`llmops.estimate`); None, with the reason logged, when it cannot say."""
    from llmops.estimate import estimate_run
    from llmops.hardware import detect
    from llmops.plan import model_facts
    from llmops.registry import resolve

    try:
        return estimate_run(run_plan, detect(), model_facts(resolve(run_plan.base_model)))
    except Exception as e:  # an estimate is information: it never stops a dry run
        out.log(f"llmops train: no estimate: {e}")
        return None


@app.command("validate")
def validate_command(recipe: RecipeArg, set_: SetOpt = None, json: JsonOpt = False) -> None:
    """Check RECIPE (schema, data files and their columns) without loading a model or downloading anything."""
    from llmops.train.recipe import load_recipe

    config = load_recipe(recipe, set_)
    if json:
        out.print_json(config.model_dump(mode="json"))
        return
    out.result(f"{recipe}: ok ({config.method} fine-tune of {config.model}, registered as {config.name!r})")


@app.command("recipes")
def recipes_command(json: JsonOpt = False) -> None:
    """List the recipes shipped with llmops."""
    from llmops.train.recipe import shipped_recipes

    found = shipped_recipes()
    if json:
        out.print_json({name: str(path) for name, path in found.items()})
        return
    out.table("Recipes", ["name", "command"], [(name, _command_line(path)) for name, path in found.items()])


@app.command("show")
def show_command(
    run: Annotated[str, typer.Argument(metavar="RUN", show_default=False,
                                       help="Run folder, or the name of a run under $LLMOPS_HOME/runs.")],
    json: JsonOpt = False,
) -> None:
    """Draw the loss and eval-loss curves of a run (finished or not). Piped, it prints the numbers as
    tab-separated columns (step, loss, eval_loss, lr); --json gives them as lists."""
    from llmops.train import report

    run_dir = report.find_run(run)
    curves = report.read_curves(run_dir)
    if json:
        out.print_json(curves)
    elif out.stdout.is_terminal:
        out.result(report.plot_curves(curves, run_dir.name, width=min(out.stdout.width, 100)))
        out.result(report.summary(curves))
    else:
        out.table(None, ["step", "loss", "eval_loss", "lr"],
                  [[None if v is None else f"{v:.6g}" for v in row] for row in report.rows_by_step(curves)])


def _draw_on_stderr(title: str, run_dir: Path) -> None:
    """The loss curves after a run, for the person watching: stderr, and only when it is a terminal (stdout
    keeps the run's summary for scripts)."""
    from llmops.errors import UsageError
    from llmops.train import report

    if not out.stderr.is_terminal or not (run_dir / report.METRICS).is_file():
        return
    try:
        picture = report.plot_curves(report.read_curves(run_dir), title, width=min(out.stderr.width, 100))
    except UsageError as e:  # plotext missing: the run itself succeeded
        out.log(f"(no loss picture: {e.message}; `llmops train show {run_dir}` draws it later)")
        return
    out.stderr.print(picture, markup=False, highlight=False)


def _command_line(path: Path) -> str:
    """The command from the recipe's header comment."""
    for line in path.read_text().splitlines():
        if line.startswith("#") and "llmops train" in line:
            return line.lstrip("# ").strip()
    return ""
