"""``t0s1 export MODEL_DIR --gguf OUT.gguf [--quant q8_0] [--ollama] [--overwrite]``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from t0s1.cli_support import exit_on_user_error
from t0s1.export.quantize import QUANT_TYPES


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)


@exit_on_user_error
def export_command(
    model_dir: Annotated[Path, typer.Argument(help="A directory t0s1 train wrote: full weights, or a LoRA adapter (merged first).")],
    gguf: Annotated[
        Path | None, typer.Option("--gguf", help="The GGUF file to write (default: MODEL_DIR.<quant>.gguf, beside the directory).")
    ] = None,
    quant: Annotated[str, typer.Option("--quant", help=f"Quant type: {', '.join(QUANT_TYPES)}.")] = "q8_0",
    ollama: Annotated[bool, typer.Option("--ollama", help="Also write an Ollama Modelfile beside the GGUF file.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the GGUF file if it exists.")] = False,
    base_model: Annotated[
        str | None,
        typer.Option("--base-model", help="For a LoRA adapter: its base model, if adapter_config.json names one that is not here."),
    ] = None,
) -> None:
    """Export a trained model to one GGUF file for llama.cpp, LM Studio and Ollama.

    The file keeps the chat template, the special tokens and the reasoning profile, so
    `t0s1 generate --model OUT.gguf` runs it with budget forcing on llama.cpp (several times the
    speed of the transformers engine on a CPU). Quantization is llama.cpp's own.
    """
    from rich.console import Console

    from t0s1.export.exporter import default_gguf_path, export_gguf

    console = Console(stderr=True)
    out = gguf if gguf is not None else default_gguf_path(model_dir, quant)
    result = export_gguf(model_dir, out, quant, ollama=ollama, overwrite=overwrite, base_model=base_model,
                         log=lambda message: console.print(message, highlight=False))
    typer.echo(result.summary())
