"""``t0s1 quickstart``: the whole s1 loop on the embedded model, offline, on a CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from t0s1.cli_support import exit_on_user_error, parse_int_list
from t0s1.errors import UserError
from t0s1.evaluation.metrics import SCALING_UNIT


def register(app: typer.Typer) -> None:
    app.command("quickstart")(quickstart_command)


@exit_on_user_error
def quickstart_command(
    out: Annotated[Path, typer.Option(help="Run directory (rerun to resume: finished steps are skipped).")] = Path("runs/quickstart"),
    steps: Annotated[int | None, typer.Option(help="Training steps (default: recipes/quickstart.yaml).")] = None,
    num_test: Annotated[int, typer.Option(help="Held-out problems in the budget sweep.")] = 100,
    budgets: Annotated[str, typer.Option(help="Thinking budgets of the sweep (at least 4 for the table).")] = "16,32,48,64",
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: PyTorch's; 1 helps on a busy machine).")] = None,
) -> None:
    """Generate problems, prepare them, LoRA-fine-tune SmolLM2-135M and sweep thinking budgets.

    Prints accuracy per thinking budget with and without "Wait" for the trained model beside the
    base model, the s1 metrics (Control, Scaling, Performance) and the path of the plot.
    """
    from t0s1.quickstart.pipeline import QuickstartSettings, run_quickstart

    if steps is not None and steps < 1:
        raise UserError(f"--steps must be a positive integer, got {steps}.")
    if num_test < 1:
        raise UserError(f"--num-test must be a positive integer, got {num_test}.")
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    settings = QuickstartSettings(out=out, steps=steps, num_test=num_test, budgets=parse_int_list(budgets, "--budgets"))
    console = Console()
    outcome = run_quickstart(settings, console)
    print_summary(outcome, console)


def print_summary(outcome: dict, console: Console) -> None:
    from t0s1.quickstart.pipeline import TASK

    trained = outcome["trained"]["tasks"][TASK.name]
    base = {s["max_thinking_tokens"]: s for s in outcome["base"]["tasks"][TASK.name]["settings"]}
    table = Table(title=f"{TASK.name}: {trained['examples']} held-out problems, greedy")
    table.add_column("thinking budget", justify="right")
    table.add_column("Wait x", justify="right")
    table.add_column("trained: accuracy %", justify="right")
    table.add_column("trained: avg thinking tokens", justify="right")
    table.add_column("base model: accuracy %", justify="right")
    for setting in trained["settings"]:
        base_entry = base.get(setting["max_thinking_tokens"]) if setting["num_ignore"] == 0 else None
        table.add_row(
            str(setting["max_thinking_tokens"]),
            str(setting["num_ignore"]),
            f"{setting['accuracy']:.1f}",
            f"{setting['avg_thinking_tokens']:.1f}",
            f"{base_entry['accuracy']:.1f}" if base_entry else "",
        )
    console.print(table)
    metrics = Table(title=f"s1 metrics of the trained model (Scaling in {SCALING_UNIT})")
    for column in ("method", "Control %", "Scaling", "Performance %"):
        metrics.add_column(column, justify="right" if column != "method" else "left")
    for name, summary in trained["methods"].items():
        control = summary.get("control")
        metrics.add_row(
            name,
            f"{control:.0f}" if control is not None else "",
            f"{summary['scaling']:.1f}" if summary.get("scaling") is not None else "",
            f"{summary['performance']:.1f}" if summary.get("performance") is not None else "",
        )
    console.print(metrics)
    timings = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in outcome["seconds"].items())
    console.print(f"Steps: {timings}.")
    console.print(f"Plot: {outcome['plot']}")
