"""Data and grading of the ``t0s1_*`` harness tasks: both come from t0s1's task registry
(``t0s1.evaluation.tasks``), so the harness asks the questions ``t0s1 eval`` asks, in the same
order, and grades the answers as ``t0s1 grade`` does."""

from __future__ import annotations

import json

import datasets

from t0s1.evaluation.tasks import get_task


def load_dataset(task: str, data_dir: str | None = None, **_metadata) -> datasets.DatasetDict:
    """The task's examples as the harness's ``test`` split: ``<data_dir>/<file>`` (data_dir:
    ``--metadata data_dir=DIR``, else ``$T0S1_DATA_DIR``), else the hub dataset.

    The harness passes every model argument and metadata entry here as well (``_metadata``).
    """
    rows = [
        {
            "task": task,
            "id": example.id,
            "question": example.question,
            "prompt": example.prompt,
            "gold": example.gold,
            "meta": json.dumps(example.meta, ensure_ascii=False),
        }
        for example in get_task(task).load(data_dir or None)
    ]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def process_results(doc: dict, results: list[str]) -> dict:
    """Exact match of the first response: t0s1's grader for the task's answer kind, on the
    answer part of the turn (after the answer delimiter)."""
    verdict = get_task(doc["task"]).grade(results[0], doc["gold"])
    return {"exact_match": int(verdict.correct)}
