"""``t0s1 train RECIPE.yaml [--key value ...]``: every recipe key is also a flag."""

from __future__ import annotations

from typing import Annotated

import typer

from t0s1.cli_support import exit_on_user_error


def register(app: typer.Typer) -> None:
    app.command(
        "train",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )(train_command)


@exit_on_user_error
def train_command(
    ctx: typer.Context,
    recipe: Annotated[
        str, typer.Argument(help="A recipe YAML file or a shipped recipe name (quickstart, t0-s1-3B, ...).")
    ],
) -> None:
    """Fine-tune a model with a recipe (TRL SFT, loss on the assistant part only).

    Any recipe key can be overridden: --max_steps 100 --learning_rate 1e-4 --output_dir DIR.
    Multi-GPU: accelerate launch --config_file configs/fsdp.yaml -m t0s1.training RECIPE.yaml
    """
    from t0s1.training.sft import main

    main([recipe, *ctx.args])
