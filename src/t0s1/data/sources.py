"""Reading reasoning traces: s1K, s1K-1.1, their ``_tokenized`` variants, and generic files.

A source is a hub id (``simplescaling/s1K``, ``simplescaling/s1K-1.1`` and the ``_tokenized``
variants), a directory written by ``Dataset.save_to_disk``, a directory of JSONL / Parquet files,
or a single ``.jsonl`` / ``.json`` / ``.parquet`` file. The schema is recognised from the columns
(see docs/s1-reference.md); a generic file has ``question``, ``thinking`` and ``answer`` columns,
whose names can be changed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from t0s1.errors import UserError
from t0s1.jsonl import read_jsonl

TRAJECTORIES = ("deepseek", "gemini")
"""s1K-1.1 holds two traces per question; s1.1 trains on the DeepSeek-R1 one."""

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class Trace:
    """One training example: a question with its thinking and answer, or an already rendered text."""

    row: int
    question: str = ""
    thinking: str = ""
    answer: str = ""
    text: str | None = None  # the ``text`` column of a ``_tokenized`` source


@dataclass(frozen=True)
class Traces:
    source: str
    schema: str  # "s1K", "s1K-1.1 (deepseek)", "tokenized" or "generic"
    traces: list[Trace]


def load_traces(
    dataset: str,
    *,
    split: str = "train",
    trajectory: str | None = None,
    question_column: str = "question",
    thinking_column: str = "thinking",
    answer_column: str = "answer",
    config: str | None = None,
) -> Traces:
    """Read ``dataset`` and turn every row into a ``Trace``; bad rows raise ``UserError``.
    ``config``: the configuration of a hub dataset that has several."""
    if trajectory is not None and trajectory not in TRAJECTORIES:
        raise UserError(f"Unknown trajectory {trajectory!r}: use one of {', '.join(TRAJECTORIES)}.")
    rows, columns = read_rows(dataset, split, config)
    if not rows:
        raise UserError(f"The dataset {dataset!r} is empty: it has no rows to train on.")
    if "deepseek_thinking_trajectory" in columns or "gemini_thinking_trajectory" in columns:
        chosen = trajectory or "deepseek"
        schema = f"s1K-1.1 ({chosen})"
        fields = ("question", f"{chosen}_thinking_trajectory", f"{chosen}_attempt")
    elif "thinking_trajectories" in columns:
        if trajectory == "deepseek":
            raise UserError(
                f"{dataset!r} has the s1K schema, whose traces all come from Gemini: drop --trajectory "
                "or use s1K-1.1 for DeepSeek-R1 traces."
            )
        schema, fields = "s1K", ("question", "thinking_trajectories", "attempt")
    elif "text" in columns and question_column not in columns:
        schema, fields = "tokenized", ("text",)
    else:
        schema, fields = "generic", (question_column, thinking_column, answer_column)
    if trajectory is not None and schema in ("tokenized", "generic"):
        raise UserError(f"--trajectory chooses between the traces of s1K-1.1 (deepseek, gemini); {dataset!r} has the "
                        f"{schema} schema, with one trace per row: leave --trajectory out.")
    for name in fields:
        if name not in columns:
            hint = {"generic": " Name the columns with --question-column / --thinking-column / --answer-column."}
            raise UserError(
                f"The dataset {dataset!r} ({schema} schema) has no column {name!r}. "
                f"Columns found: {', '.join(columns)}.{hint.get(schema, '')}"
            )
    traces = [_to_trace(index, row, fields, schema) for index, row in enumerate(rows)]
    return Traces(dataset, schema, traces)


def _to_trace(index: int, row: dict, fields: tuple[str, ...], schema: str) -> Trace:
    values = []
    for name in fields:
        value = row.get(name)
        if name == "thinking_trajectories" and isinstance(value, list | tuple):
            if not all(isinstance(part, str) for part in value):
                raise UserError(f"Row {index}: column {name!r} must be a list of strings, got {value!r:.80}.")
            value = "\n".join(value)  # s1 joins the trajectory pieces with newlines
        if not isinstance(value, str):
            raise UserError(
                f"Row {index}: column {name!r} must be a string, got {type(value).__name__} ({value!r:.80})."
            )
        values.append(value)
    if schema == "tokenized":
        return Trace(index, text=values[0])
    question, thinking, answer = values
    return Trace(index, question, thinking, answer)


def read_rows(dataset: str, split: str = "train", config: str | None = None) -> tuple[list[dict], list[str]]:
    """All rows of a dataset as Python dicts (values keep their own type), and its column names.
    ``config``: the configuration of a hub dataset (local data has none)."""
    path = Path(dataset).expanduser()
    if config and path.exists():
        raise UserError(f"dataset_config {config!r} names a configuration of a hub dataset; {dataset!r} is local: leave it out.")
    if path.is_file():
        return _read_files([path])
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return _as_rows(_load_saved(path, split))
        files = sorted(p for p in path.rglob("*") if p.suffix in FILE_SUFFIXES and p.is_file())
        if not files:
            raise UserError(
                f"{dataset!r} is a directory but holds neither a saved dataset nor "
                f"{' / '.join(FILE_SUFFIXES)} files."
            )
        return _read_files(files)
    if dataset.startswith((".", "/", "~")) or dataset.endswith(FILE_SUFFIXES) or dataset.count("/") != 1:
        raise UserError(f"No dataset at {dataset!r}: the path does not exist (and it is not a hub id 'owner/name').")
    return _as_rows(_load_hub(dataset, split, config))


def _read_files(files: list[Path]) -> tuple[list[dict], list[str]]:
    rows: list[dict] = []
    for file in files:
        if file.suffix == ".parquet":
            import pyarrow
            import pyarrow.parquet as pq

            try:
                rows.extend(pq.read_table(file).to_pylist())
            except (pyarrow.ArrowException, OSError) as error:
                raise UserError(f"{file} is not a readable Parquet file ({error}).") from None
        elif file.suffix == ".jsonl":
            rows.extend(row for _, row in read_jsonl(file))
        else:  # .json: a list of objects, or one object per line
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except UnicodeDecodeError:
                raise UserError(f"{file} is not UTF-8 text.") from None
            except json.JSONDecodeError:
                data = [row for _, row in read_jsonl(file)]
            if isinstance(data, dict):
                data = [data]
            if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
                raise UserError(f"{file} holds neither JSON objects nor a list of them.")
            rows.extend(data)
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    return rows, list(columns)


def _load_saved(path: Path, split: str):
    from datasets import DatasetDict, load_from_disk

    loaded = load_from_disk(str(path))
    if isinstance(loaded, DatasetDict):
        return _pick_split(loaded, split, str(path))
    return loaded


def _load_hub(dataset_id: str, split: str, config: str | None = None):
    from datasets import DatasetDict, load_dataset

    try:
        loaded = load_dataset(dataset_id, config)
    except Exception as error:  # offline, unknown id, gated...: the user can act on the message
        raise UserError(
            f"Could not load {dataset_id!r} from the hub ({type(error).__name__}: {error}). Offline? "
            "Download it elsewhere (datasets.load_dataset(...).save_to_disk(DIR)) and give DIR, or a JSONL / "
            "Parquet file."
        ) from None
    return _pick_split(loaded, split, dataset_id) if isinstance(loaded, DatasetDict) else loaded


def _pick_split(dataset_dict, split: str, name: str):
    if split in dataset_dict:
        return dataset_dict[split]
    if len(dataset_dict) == 1:
        return next(iter(dataset_dict.values()))
    raise UserError(f"{name!r} has no split {split!r}; splits found: {', '.join(dataset_dict)}.")


def _as_rows(dataset) -> tuple[list[dict], list[str]]:
    return dataset.to_list(), list(dataset.column_names)
