"""The ``t0s1`` command line: one sub-command per stage of the pipeline.

Each stage module owns its commands and adds them through ``register(app)``; this file only
assembles them and turns ``UserError`` into a one-line message with exit code 2.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="t0s1",
    help=(
        "t0-s1: make small language models reason better with test-time compute.\n\n"
        "prepare -> train -> generate (budget forcing) -> eval / serve. "
        "Every command works offline on the embedded default model smollm2-135m-instruct."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

STAGES = (
    "t0s1.generation_cli",
    "t0s1.data.cli",
    "t0s1.training.cli",
    "t0s1.export.cli",
    "t0s1.evaluation.cli",
    "t0s1.lm_eval.cli",
    "t0s1.serving.cli",
    "t0s1.rag.cli",
    "t0s1.quickstart.cli",
)

for _stage in STAGES:
    importlib.import_module(_stage).register(app)


def main() -> None:
    app()
