"""Recipes: a YAML file whose every key is a flag of TRL's own parser (as open-r1 recipes are).

Keys are TRL's and transformers' own names (``ScriptArguments``, ``SFTConfig``, ``ModelConfig``)
plus the few of ``T0S1Arguments``. ``t0s1 train RECIPE.yaml --key value ...`` overrides any key.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from t0s1.errors import UserError


@dataclass
class T0S1Arguments:
    """Recipe keys of t0-s1 itself (the rest belong to TRL and transformers)."""

    merge_lora: bool = field(
        default=False,
        metadata={"help": "With use_peft: save the base model with the LoRA weights merged in, not the adapter."},
    )
    effective_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Examples per optimizer step over all devices: sets gradient_accumulation_steps from the "
            "number of processes and per_device_train_batch_size (s1: 16)."
        },
    )
    reasoning_format: str | None = field(
        default=None,
        metadata={"help": "Delimiters when dataset_name is not prepared yet: chatml, think-tags or 'START,END'."},
    )
    on_overflow: str = field(
        default="truncate",
        metadata={"help": "Examples longer than max_length are truncated (the trainer keeps their start) or dropped."},
    )
    license: str | None = field(
        default=None, metadata={"help": "License written in the model card (default: the base model's, if known)."}
    )


def parser():
    from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser

    return TrlParser((ScriptArguments, SFTConfig, ModelConfig, T0S1Arguments), prog="t0s1 train")


def recipe_path(recipe: str) -> Path:
    """A recipe file, or the name of a shipped recipe (``quickstart``, ``t0-s1-3B``)."""
    path = Path(recipe).expanduser()
    if path.is_file():
        return path
    shipped = resources.files("t0s1") / "recipes" / f"{recipe.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return Path(str(shipped))
    names = sorted(p.name.removesuffix(".yaml") for p in (resources.files("t0s1") / "recipes").iterdir())
    raise UserError(f"No recipe at {recipe!r}. Give a YAML file or a shipped recipe: {', '.join(names)}.")


def device_precision_flags() -> list[str]:
    """Mixed precision follows the device: none on CPU (float32), bf16 where the GPU has it, else fp16.

    Appended after the recipe and the user's flags, because transformers refuses bf16 on a CPU."""
    import torch

    if not torch.cuda.is_available():
        return ["--bf16", "false", "--fp16", "false"]
    if not torch.cuda.is_bf16_supported():
        return ["--bf16", "false", "--fp16", "true"]
    return []


def parse_args(argv: list[str]):
    """``[RECIPE.yaml, --key, value, ...]`` -> (ScriptArguments, SFTConfig, ModelConfig, T0S1Arguments)."""
    argv = list(argv)
    if argv and not argv[0].startswith("-"):
        argv = ["--config", str(recipe_path(argv[0])), *argv[1:]]
    argv += device_precision_flags()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FutureWarning)
        try:
            script_args, training_args, model_args, ours = parser().parse_args_and_config(argv)
        except ValueError as error:  # unknown keys in the recipe or on the command line
            raise UserError(f"{error} Keys are TRL SFTConfig / ModelConfig / ScriptArguments names.") from None
    _pass_on_warnings(caught, argv)
    if not model_args.model_name_or_path:
        raise UserError("No model: set model_name_or_path in the recipe or pass --model_name_or_path.")
    if not script_args.dataset_name:
        raise UserError("No data: set dataset_name (a hub id or a directory written by `t0s1 prepare`).")
    if ours.on_overflow not in ("truncate", "drop"):
        raise UserError(f"on_overflow must be truncate or drop, got {ours.on_overflow!r}.")
    targets = model_args.lora_target_modules
    if isinstance(targets, list) and len(targets) == 1 and targets[0] == "all-linear":
        model_args.lora_target_modules = "all-linear"  # peft accepts the shortcut only as a string
    return script_args, training_args, model_args, ours


def _pass_on_warnings(caught, argv: list[str]) -> None:
    """Re-emit what parsing warned about, except transformers' "`gradient_checkpointing` is
    deprecated" when the key comes from TRL's own default (SFTConfig sets the old name) rather than
    from the recipe or the command line; there, it says which key to rename."""
    config = argv[argv.index("--config") + 1] if "--config" in argv else None
    written = " ".join(argv) + (Path(config).read_text(encoding="utf-8") if config and Path(config).is_file() else "")
    for warning in caught:
        message = str(warning.message)
        if "`gradient_checkpointing" in message and "deprecated" in message:
            if "gradient_checkpointing" not in written:
                continue
            message = ("`gradient_checkpointing` is named `activation_checkpointing` since transformers 5 "
                       "(and `gradient_checkpointing_kwargs` `activation_checkpointing_kwargs`): rename the key in the recipe.")
        warnings.warn_explicit(message, warning.category, warning.filename, warning.lineno)
