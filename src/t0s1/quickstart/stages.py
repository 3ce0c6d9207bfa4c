"""What the two quickstarts (arithmetic, ``--rag``) share: timed stage headers, a training step that
is skipped when its model exists, the recipe's block size, and quiet library progress bars."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from rich.console import Console


class Stages:
    """Prints a rule per stage and records its wall time: ``stages.start("train", "3/5 ...")``,
    then ``stages.stop("train")``; ``stages.seconds`` maps each stage to its seconds."""

    def __init__(self, console: Console):
        self.console = console
        self.seconds: dict[str, float] = {}
        self._started: dict[str, float] = {}

    def start(self, name: str, title: str | None = None) -> None:
        if title:
            self.console.rule(f"[bold]{title}")
        self._started[name] = time.perf_counter()

    def stop(self, name: str) -> None:
        self.seconds[name] = round(time.perf_counter() - self._started[name], 1)


def recipe_max_length(recipe: str) -> int:
    """A shipped recipe's ``max_length``: prepare checks the traces against the same limit."""
    import yaml

    from t0s1.training.config import recipe_path

    return int(yaml.safe_load(recipe_path(recipe).read_text(encoding="utf-8"))["max_length"])


def train_unless_done(recipe: str, prepared: Path, model_dir: Path, steps: int | None, console: Console) -> None:
    """``t0s1 train RECIPE --dataset_name PREPARED --output_dir MODEL_DIR [--max_steps STEPS]``,
    skipped when ``MODEL_DIR`` holds a model (an interrupted run resumes from its checkpoint)."""
    if (model_dir / "config.json").exists():
        console.print(f"already trained: {model_dir}")
        return
    from t0s1.training.sft import main as train

    argv = [recipe, "--dataset_name", str(prepared), "--output_dir", str(model_dir)]
    if steps is not None:
        argv += ["--max_steps", str(steps)]
    train(argv)


@contextlib.contextmanager
def library_progress_bars_off():
    """Each stage shows one progress bar of its own (training steps, evaluated samples): the
    libraries' bars for loading weights and mapping datasets are switched off meanwhile."""
    import datasets
    from transformers.utils import logging as transformers_logging

    datasets_bars = datasets.is_progress_bar_enabled()
    transformers_bars = transformers_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if datasets_bars:
            datasets.enable_progress_bars()
        if transformers_bars:
            transformers_logging.enable_progress_bar()
