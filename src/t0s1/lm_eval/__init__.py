"""Budget forcing inside lm-evaluation-harness (``pip install 't0s1[lm-eval]'``).

- ``T0S1LM``: the harness model registered as ``t0s1`` (``model.py``); importing it registers it.
- ``TASKS_DIR``: the ``t0s1_*`` task configs (``tasks/``), s1's benchmarks asked and graded
  as ``t0s1 eval`` asks and grades them; ``task_manager()`` indexes them.
- ``t0s1 lm-eval``: the harness's command line with both (``cli.py``).

From Python::

    import lm_eval
    from t0s1.lm_eval import T0S1LM, task_manager

    lm = T0S1LM(pretrained="smollm2-135m-instruct", max_tokens_thinking=1024, thinking_n_ignore=1)
    results = lm_eval.simple_evaluate(model=lm, tasks=["t0s1_gsm8k"], task_manager=task_manager(data_dir="data"))

This module imports nothing from the harness until ``T0S1LM`` is used, so ``t0s1`` commands do
not pay for it.
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"

def task_manager(data_dir: str | Path | None = None, *, include_defaults: bool = True, include_path=None):
    """A harness ``TaskManager`` that knows the ``t0s1_*`` tasks (and the harness's own unless
    ``include_defaults=False``, which skips indexing thousands of configs). ``data_dir``: where
    the tasks read their files (default: ``$T0S1_DATA_DIR``, else the hub)."""
    from lm_eval.tasks import TaskManager

    paths = [TASKS_DIR, *([include_path] if isinstance(include_path, str | Path) else include_path or [])]
    metadata = {"data_dir": str(data_dir)} if data_dir is not None else None
    return TaskManager(include_path=[str(path) for path in paths], include_defaults=include_defaults, metadata=metadata)


def __getattr__(name: str):
    if name == "T0S1LM":
        from t0s1.lm_eval.model import T0S1LM

        return T0S1LM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["T0S1LM", "TASKS_DIR", "task_manager"]
