"""Reading JSONL files given by users: one JSON object per line, errors that name the line."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from t0s1.errors import UserError


def json_lines(path: str | Path) -> Iterator[tuple[int, dict | None, str | None]]:
    """``(line number, object, None)`` for each non-blank line of ``path`` that holds a JSON object,
    ``(line number, None, what is wrong)`` for each other one; a missing file is a ``UserError``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"No file at {path}.")
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield number, None, "not UTF-8 text"
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                yield number, None, f"not valid JSON ({error.msg})"
                continue
            if isinstance(row, dict):
                yield number, row, None
            else:
                yield number, None, f"expected a JSON object, got {type(row).__name__}"


def read_jsonl(path: str | Path, *, limit: int | None = None) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of ``path``, at most ``limit`` of them; the
    first line that is not a JSON object is a ``UserError`` naming it."""
    rows = []
    for number, row, problem in json_lines(path):
        if problem:
            raise UserError(f"{path}, line {number}: {problem}.")
        rows.append((number, row))
        if limit is not None and len(rows) >= limit:
            break
    return rows


def drop_partial_last_line(path: Path) -> str:
    """The complete lines of a JSONL file that a run may have been killed while appending to; a
    partial last line is removed from the file too, so appended rows start on a line of their own."""
    data = path.read_bytes()  # bytes: a kill may have cut a multi-byte character in two
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        os.truncate(path, len(complete))  # in place: a kill now cannot lose the complete lines
    return complete.decode("utf-8")
