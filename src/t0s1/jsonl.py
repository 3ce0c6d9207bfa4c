"""Reading JSONL files given by users: one JSON object per line, errors that name the line."""

from __future__ import annotations

import json
from pathlib import Path

from t0s1.errors import UserError


def read_jsonl(path: str | Path, *, limit: int | None = None) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of ``path``, at most ``limit`` of them."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"No file at {path}.")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}, line {number}: not valid JSON ({error.msg}).") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}.")
            rows.append((number, row))
            if limit is not None and len(rows) >= limit:
                break
    return rows
