"""``t0s1 train RECIPE.yaml [--key value ...] [--gguf QUANT]``: every recipe key is also a flag;
``--gguf`` exports the trained model to GGUF at the end (``t0s1 export``)."""

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
    gguf: Annotated[
        str | None,
        typer.Option(
            "--gguf",
            help="After training, export the model to OUTPUT_DIR.<QUANT>.gguf for llama.cpp (QUANT: f16, q8_0, "
            "q4_k_m, ...; see t0s1 export).",
        ),
    ] = None,
) -> None:
    """Fine-tune a model with a recipe (TRL SFT, loss on the assistant part only).

    Any recipe key can be overridden: --max_steps 100 --learning_rate 1e-4 --output_dir DIR.
    Multi-GPU: accelerate launch --config_file configs/fsdp.yaml -m t0s1.training RECIPE.yaml
    (then t0s1 export OUTPUT_DIR for a GGUF file).
    """
    from t0s1.training.sft import main

    if gguf is not None:
        from t0s1.export.quantize import check_quant

        gguf = check_quant(gguf)  # before hours of training, not after
    trainer = main([recipe, *ctx.args])
    if gguf is not None and trainer.is_world_process_zero():
        from t0s1.export import default_gguf_path, export_gguf

        output_dir = trainer.args.output_dir
        result = export_gguf(output_dir, default_gguf_path(output_dir, gguf), gguf, overwrite=True,
                             log=lambda message: print(f"[t0s1 train] {message}", flush=True))
        print(f"[t0s1 train] {result.summary()}", flush=True)
