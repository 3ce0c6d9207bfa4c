"""Question files and the JSONL files the rag commands append to.

A question file is JSONL, one question per line: ``question`` (the text), ``gold_ids`` (the ids of
the documents that answer it: a list, or one id as a string), ``answer`` (the reference answer, for
grading) and optionally ``id`` (else one is derived from the question's text, so it stays the same
when lines move). Other fields are kept as ``meta``.

A row that cannot be used (not JSON, an empty question, a gold id the index does not hold, a
repeated id, ...) is skipped and reported with its line number and the reason: the rest of the
file is still used, and the report gives the count.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from t0s1.errors import UserError
from t0s1.files import writing
from t0s1.jsonl import drop_partial_last_line, json_lines


@dataclass(frozen=True)
class RagQuestion:
    """One question with the documents that answer it and its reference answer."""

    id: str
    question: str
    gold_ids: tuple[str, ...] = ()
    answer: str | None = None
    line: int = 0
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RowProblem:
    """A row that was skipped: where it is and why."""

    line: int
    reason: str
    id: str | None = None

    def to_dict(self) -> dict:
        return {"line": self.line, "id": self.id, "reason": self.reason}


@dataclass
class QuestionFile:
    path: Path
    questions: list[RagQuestion]
    problems: list[RowProblem]

    def report(self, shown: int = 10) -> str:
        """One line per skipped row (the first ``shown``) and the count; "" when none was skipped."""
        if not self.problems:
            return ""
        lines = [f"{self.path}: {len(self.problems)} of {len(self.questions) + len(self.problems)} rows skipped:"]
        lines += [f"  line {p.line}: {p.reason}" for p in self.problems[:shown]]
        if len(self.problems) > shown:
            lines.append(f"  ... and {len(self.problems) - shown} more")
        return "\n".join(lines)


def question_id(question: str) -> str:
    """The id of a question that has none: a hash of its text."""
    return "q-" + hashlib.sha256(question.strip().encode("utf-8")).hexdigest()[:12]


def read_json_lines(path: str | Path) -> tuple[list[tuple[int, dict]], list[RowProblem]]:
    """(line number, object) for every non-blank line that holds a JSON object, and a problem for
    every other line (nothing is raised for a bad row)."""
    rows, problems = [], []
    for number, row, problem in json_lines(path):
        if problem:
            problems.append(RowProblem(number, problem))
        else:
            rows.append((number, row))
    return rows, problems


def read_questions(
    path: str | Path, *, index=None, need_gold: bool = False, need_answer: bool = False, limit: int | None = None
) -> QuestionFile:
    """The usable questions of ``path`` and the problems of the others. ``index``: gold ids must
    be documents of it. ``need_gold`` / ``need_answer``: a row without gold ids / an answer is a
    problem."""
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be a positive integer, got {limit}.")
    rows, problems = read_json_lines(path)
    questions: list[RagQuestion] = []
    seen: dict[str, int] = {}
    for number, row in rows:
        if limit is not None and len(questions) >= limit:
            break
        question = row.get("question")
        given_id = row.get("id")
        if not isinstance(question, str) or not question.strip():
            problems.append(RowProblem(number, "the question is empty or missing (field `question`, a string)",
                                       None if given_id is None else str(given_id)))
            continue
        qid = str(given_id) if given_id is not None and str(given_id).strip() else question_id(question)
        reason = _row_problem(row, index, need_gold, need_answer)
        if reason is None and qid in seen:
            reason = f"the id {qid!r} is used by line {seen[qid]} already"
        if reason is not None:
            problems.append(RowProblem(number, reason, qid))
            continue
        seen[qid] = number
        gold = row.get("gold_ids")
        answer = row.get("answer")
        meta = {key: value for key, value in row.items() if key not in ("id", "question", "gold_ids", "answer")}
        questions.append(
            RagQuestion(qid, question.strip(), _gold_tuple(gold), None if answer is None else str(answer).strip(), number, meta)
        )
    problems.sort(key=lambda problem: problem.line)
    if not questions:
        detail = "; ".join(f"line {p.line}: {p.reason}" for p in problems[:3])
        raise UserError(f"{path} holds no usable question{f' ({detail})' if detail else ''}. Each line needs `question`"
                        f"{', `gold_ids`' if need_gold else ''}{' and `answer`' if need_answer else ''}.")
    return QuestionFile(Path(path), questions, problems)


def _gold_tuple(gold) -> tuple[str, ...]:
    """The gold ids as strings, each once (a repeat would show its source twice in the prompt)."""
    if gold is None:
        return ()
    return (gold,) if isinstance(gold, str) else tuple(dict.fromkeys(str(doc) for doc in gold))


def _row_problem(row: dict, index, need_gold: bool, need_answer: bool) -> str | None:
    gold = row.get("gold_ids")
    if gold is not None and not (
        isinstance(gold, str) and gold or isinstance(gold, list) and all(isinstance(d, str | int) and str(d) for d in gold)
    ):
        return f"`gold_ids` must be a document id or a list of them, got {json.dumps(gold)[:80]}"
    if need_gold and not _gold_tuple(gold):
        return "no gold document ids (field `gold_ids`)"
    if index is not None:
        missing = [doc for doc in _gold_tuple(gold) if index.position(doc) is None]
        if missing:
            return f"gold id {', '.join(map(repr, missing))} is not a document of the index"
    answer = row.get("answer")
    if answer is not None and not isinstance(answer, str | int | float):
        return f"`answer` must be text or a number, got {json.dumps(answer)[:80]}"
    if need_answer and (answer is None or not str(answer).strip()):
        return "no reference answer (field `answer`)"
    return None


class JsonlLog:
    """A JSONL output written row by row and resumed: the rows already in the file are read (a
    last line cut by a kill is dropped), new rows are appended and flushed, so a rerun skips what
    is done and loses nothing."""

    def __init__(self, path: str | Path, key: Callable[[dict], str]):
        self.path, self.key = Path(path), key
        self.keys: set[str] = set()
        self.rows: list[dict] = []
        if self.path.exists():
            try:
                complete = drop_partial_last_line(self.path)
            except UnicodeDecodeError:
                raise UserError(f"{self.path} is not UTF-8 text: not a file this command wrote; choose another output file.") from None
            for number, line in enumerate(complete.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    self.keys.add(key(row))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UserError(f"{self.path}, line {number}: not a row this command wrote; choose another output file.") from None
                self.rows.append(row)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch()

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def __len__(self) -> int:
        return len(self.rows)

    def append(self, rows: Iterable[dict]) -> None:
        rows = list(rows)
        if not rows:
            return
        with writing(self.path, "The rows written before are kept (a torn last line is dropped on resume)."):
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
                handle.flush()
                os.fsync(handle.fileno())
        for row in rows:
            self.keys.add(self.key(row))
            self.rows.append(row)
