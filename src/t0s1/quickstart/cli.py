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
from t0s1.quickstart.problems import BUDGETS


def register(app: typer.Typer) -> None:
    app.command("quickstart")(quickstart_command)


@exit_on_user_error
def quickstart_command(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="Run directory (rerun to resume: finished steps are skipped; --num-test and --steps must stay as they were).")] = Path("runs/quickstart"),
    steps: Annotated[int | None, typer.Option(help="Training steps (default: recipes/quickstart.yaml).")] = None,
    num_test: Annotated[int, typer.Option(help="Held-out problems in the budget sweeps.")] = 100,
    budgets: Annotated[
        str, typer.Option(help="Thinking budgets of the sweeps, at least 2; the largest should leave room for the Waits.")
    ] = ",".join(map(str, BUDGETS)),
    threads: Annotated[
        int | None, typer.Option(help="CPU threads of torch and llama.cpp (default: PyTorch's; 1 helps on a busy machine).")
    ] = None,
    backend: Annotated[
        str,
        typer.Option(
            "--backend",
            help="Where the sweeps run: llamacpp (the trained model exported to GGUF: a GGUF file for llama.cpp, LM Studio "
            "and Ollama; its sweeps take about 0.6 of PyTorch's time on a CPU with AMX and about as long without, "
            "docs/quickstart.md) "
            "or transformers (PyTorch, no export).",
        ),
    ] = "llamacpp",
    quant: Annotated[str, typer.Option("--quant", help="GGUF type of the exported model (t0s1 export --quant; q8_0 runs on llama.cpp's AMX kernels where the CPU has them).")] = "q8_0",
    policies: Annotated[
        bool,
        typer.Option(
            "--policies/--no-policies",
            help="Last, compare test-time policies on the trained model (budget forcing, DeepConf over 4 traces, "
            "early exit; 16 problems, about a minute; docs/policies.md).",
        ),
    ] = True,
    rag: Annotated[
        bool,
        typer.Option(
            "--rag",
            help="The retrieval-augmented demo instead (docs/rag.md): a generated knowledge base, a bm25 index, traces over "
            "retrieved sources, LoRA SFT, then accuracy over sources x thinking budgets (its defaults: --out "
            "runs/quickstart-rag, --budgets 0,16,32,64, 20 training steps).",
        ),
    ] = False,
) -> None:
    """Generate problems, prepare them, LoRA-fine-tune SmolLM2-135M, export it to GGUF and sweep
    thinking budgets on llama.cpp.

    Every budget runs without "Wait" and with 1 and 2 Waits (num_ignore). Prints accuracy per
    budget for the base and the trained model, the s1 metrics (Control, Scaling, Performance) of
    each curve, what Wait fixed and broke, and the path of the plot.
    """
    if steps is not None and steps < 1:
        raise UserError(f"--steps must be a positive integer, got {steps}.")
    if num_test < 1:
        raise UserError(f"--num-test must be a positive integer, got {num_test}.")
    budget_list = sorted(set(parse_int_list(budgets, "--budgets")))
    from t0s1.export.quantize import check_quant
    from t0s1.quickstart.pipeline import BACKENDS

    if backend not in BACKENDS:
        raise UserError(f"--backend must be {' or '.join(BACKENDS)}, got {backend!r}.")
    quant = check_quant(quant)
    if len(budget_list) < 2:
        raise UserError(f"--budgets needs at least 2 different budgets for a curve, got {budgets!r}.")
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    if rag:
        from t0s1.rag.demo import quickstart_rag

        def given(name: str, value):  # the demo has its own defaults for the flags left out
            return None if ctx.get_parameter_source(name).name == "DEFAULT" else value

        if given("backend", backend) or given("quant", quant) or given("policies", policies) is not None:
            raise UserError("--backend, --quant and --policies are options of the arithmetic quickstart; --rag runs on the "
                            "transformers engine.")

        quickstart_rag(out=given("out", out), steps=steps, num_test=num_test, budgets=given("budgets", budget_list))
        return
    from t0s1.quickstart.pipeline import QuickstartSettings, run_quickstart

    settings = QuickstartSettings(out=out, steps=steps, num_test=num_test, budgets=budget_list, backend=backend, quant=quant,
                                  policies=policies)
    console = Console()
    outcome = run_quickstart(settings, console)
    print_summary(outcome, console)


def print_summary(outcome: dict, console: Console) -> None:
    from t0s1.quickstart.pipeline import TASK, curve_name

    trained = outcome["trained"]["tasks"][TASK.name]
    settings = {(s["max_thinking_tokens"], s["num_ignore"]): s for s in trained["settings"]}
    base = {s["max_thinking_tokens"]: s for s in outcome["base"]["tasks"][TASK.name]["settings"]}
    budgets = sorted({budget for budget, _ in settings})
    num_ignore = sorted({ignore for _, ignore in settings})

    table = Table(
        title=f"Accuracy % on {trained['examples']} held-out problems (average thinking tokens), greedy",
        caption=f"base: SmolLM2-135M-Instruct; the Wait columns: the trained model, num_ignore 0, 1, 2; on {outcome['engine']}",
    )
    table.add_column("thinking budget", justify="right")
    table.add_column("base", justify="right")
    for ignore in num_ignore:
        table.add_column(curve_name(ignore), justify="right")
    for budget in budgets:
        cells = [f"{settings[(budget, ignore)]['accuracy']:.0f} ({settings[(budget, ignore)]['avg_thinking_tokens']:.0f})" for ignore in num_ignore]
        base_entry = base.get(budget)
        table.add_row(str(budget), f"{base_entry['accuracy']:.0f}" if base_entry else "", *cells)
    console.print(table)

    metrics = Table(title=f"s1 metrics of the trained model's budget curves (Scaling in {SCALING_UNIT})")
    for column in ("curve", "Control %", "Scaling", "Performance %"):
        metrics.add_column(column, justify="left" if column == "curve" else "right")
    for name, summary in outcome["curves"].items():
        metrics.add_row(name, _number(summary.get("control"), 0), _number(summary.get("scaling"), 1), _number(summary.get("performance"), 1))
    console.print(metrics)

    for effect in outcome["wait"]:
        if effect.budget != budgets[-1]:
            continue
        line = (
            f"{curve_name(effect.num_ignore)} at budget {effect.budget}: {effect.accuracy_without_wait:.0f}% -> "
            f"{effect.accuracy:.0f}% ({effect.gain:+.0f} points; {effect.fixed} answers fixed, {effect.broken} broken)"
        )
        if effect.self_stopped:
            line += (
                f"; on the {effect.self_stopped} problems where the model stopped thinking on its own: "
                f"{effect.self_stopped_accuracy_without_wait:.0f}% -> {effect.self_stopped_accuracy:.0f}%"
            )
        console.print(line + ".")
    if outcome.get("policies"):
        from t0s1.quickstart.pipeline import POLICY_COMPARISON as c

        rows = Table(title=f"Test-time policies on the trained model: first {c['problems']} held-out problems, largest budget, "
                           f"{c['num_ignore']} Waits, temperature {c['temperature']}")
        for column in ("policy", "accuracy %", "total tokens", "tokens per correct", "seconds"):
            rows.add_column(column, justify="left" if column == "policy" else "right")
        for row in outcome["policies"]:
            rows.add_row(row["policy"], f"{row['accuracy']:.0f}", str(row["total_tokens"]), _number(row["tokens_per_correct"], 0),
                         _number(row["seconds"], 1))
        console.print(rows)
    timings = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in outcome["seconds"].items())
    console.print(f"Steps: {timings}.")
    console.print(f"Plot: {outcome['plot']}")


def _number(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"
