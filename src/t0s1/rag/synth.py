"""``t0s1 rag synth-questions``: a teacher writes questions from documents, as t0 wrote its
evaluation questions.

Each document is put into a template (a text file the user can change; ``{title}``, ``{text}``,
``{count}`` and ``{id}`` are filled in, ``{{`` and ``}}`` are literal braces) and sent to the
teacher as one user message. Every ``Question: ...`` line of the reply with an ``Answer: ...`` line
after it becomes a row of a question file: ``id`` (a hash of the question), ``question``,
``answer``, ``gold_ids`` (the document's id) and ``teacher``, ready for ``rag eval`` and
``rag traces``.

- De-duplication: a question already in the output (after normalising case, punctuation and
  spacing) is not written again, from this document or any other.
- Resuming: rows are appended per batch; a rerun skips the documents that have questions in the
  output (or gave only duplicates) and asks again for the ones that failed.
- Failures (the teacher errs or writes no question) are counted, named and written to the
  ``.rejected.jsonl`` file beside the output.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from t0s1.errors import UserError
from t0s1.evaluation.grading import normalize_exact
from t0s1.rag.corpus import Document
from t0s1.rag.questions import JsonlLog, RowProblem, question_id
from t0s1.rag.teacher import Teacher, TeacherRequest
from t0s1.progress import ProgressBar
from t0s1.rag.traces import rejected_path

TEMPLATE_FIELDS = ("id", "title", "text", "count")
DEFAULT_TEMPLATE = "synth_questions.txt"
DUPLICATE = "duplicate"
FAILED = "failed"

_QUESTION = re.compile(r"^\W*(?:\d+\s*[.)]\s*)?\W*(?:question|q)\s*\d*\W*?\s*[:：]\s*(?:\*\*)?\s*(?P<text>.*)$", re.IGNORECASE)
_ANSWER = re.compile(r"^\W*(?:answer|a)\s*\d*\W*?\s*[:：]\s*(?:\*\*)?\s*(?P<text>.*)$", re.IGNORECASE)


def default_template_path() -> Path:
    return Path(str(resources.files("t0s1") / "rag" / "templates" / DEFAULT_TEMPLATE))


def load_template(path: str | Path | None = None) -> str:
    """The template text; a ``UserError`` for a missing file or a placeholder it cannot fill."""
    path = Path(path) if path is not None else default_template_path()
    if not path.is_file():
        raise UserError(f"No template at {path}. Start from a copy of {default_template_path()}.")
    text = path.read_text(encoding="utf-8")
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as error:
        raise UserError(f"The template {path} is not a valid template ({error}); write literal braces as {{{{ and }}}}.") from None
    unknown = sorted(names - set(TEMPLATE_FIELDS))
    if unknown:
        raise UserError(
            f"The template {path} has the placeholder(s) {', '.join('{' + n + '}' for n in unknown)}; "
            f"it may use {', '.join('{' + n + '}' for n in TEMPLATE_FIELDS)} (literal braces: {{{{ and }}}})."
        )
    if "text" not in names:
        raise UserError(f"The template {path} never shows the document: put {{text}} where its text goes.")
    return text


def parse_questions(reply: str) -> list[tuple[str, str]]:
    """(question, answer) pairs of a reply: a ``Question:`` line (``Q:``, ``1. Question:``,
    ``**Question 1:**`` ...) followed by an ``Answer:`` line."""
    pairs, question = [], None
    for line in reply.splitlines():
        if (match := _QUESTION.match(line)) and match.group("text").strip():
            question = match.group("text").strip().strip("*").strip()
        elif question and (match := _ANSWER.match(line)) and match.group("text").strip():
            pairs.append((question, match.group("text").strip().strip("*").strip()))
            question = None
    return pairs


@dataclass
class SynthReport:
    out: Path
    documents: int
    already_done: int = 0
    written: int = 0
    duplicates: int = 0
    failed: list[RowProblem] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"{self.written} questions written to {self.out} from {self.documents - self.already_done - len(self.failed)} "
            f"documents ({self.already_done} done before); {self.duplicates} duplicates dropped; "
            f"{len(self.failed)} documents failed"
        ]
        if self.failed:
            lines.append("failed (asked again on a rerun):")
            lines += [f"  document {p.line} ({p.id}): {p.reason}" for p in self.failed[:10]]
            if len(self.failed) > 10:
                lines.append(f"  ... and {len(self.failed) - 10} more")
        return "\n".join(lines)


def synth_questions(
    documents: list[Document],
    teacher: Teacher,
    out: str | Path,
    *,
    template: str | None = None,
    per_document: int = 3,
    batch_size: int = 8,
    progress: bool = True,
) -> SynthReport:
    """Write (or resume) questions about ``documents`` to ``out``; see the module docstring."""
    if per_document < 1:
        raise UserError(f"--per-document must be at least 1, got {per_document}.")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}.")
    template = load_template() if template is None else template
    log = JsonlLog(out, lambda row: row["id"])
    rejected = JsonlLog(rejected_path(out), lambda row: row["id"])
    done = {doc for row in log.rows for doc in row.get("gold_ids", [])}
    done |= {row["id"] for row in rejected.rows if row["kind"] == DUPLICATE}
    seen = {normalize_exact(row["question"]) for row in log.rows}
    report = SynthReport(Path(out), len(documents))
    todo = []
    for number, document in enumerate(documents, start=1):
        if document.id in done:
            report.already_done += 1
        else:
            todo.append((number, document))

    with ProgressBar(progress, len(todo), "questions") as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            requests = [TeacherRequest([{"role": "user", "content": fill(template, document, per_document)}]) for _, document in batch]
            rows, rejects = [], []
            for (number, document), reply in zip(batch, teacher.reply(requests), strict=True):
                pairs = parse_questions(reply.answer) if not reply.error else []
                reason = reply.error or (None if pairs else "the reply holds no 'Question: ... Answer: ...' pair")
                if reason:
                    report.failed.append(RowProblem(number, reason, document.id))
                    rejects.append({"id": document.id, "kind": FAILED, "reason": reason})
                    continue
                fresh = 0
                for question, answer in pairs[:per_document]:
                    key = normalize_exact(question)
                    if key in seen:
                        report.duplicates += 1
                        continue
                    seen.add(key)
                    fresh += 1
                    rows.append({"id": question_id(question), "question": question, "answer": answer,
                                 "gold_ids": [document.id], "teacher": teacher.name})
                if not fresh:
                    rejects.append({"id": document.id, "kind": DUPLICATE, "reason": "every question was a duplicate"})
            log.append(rows)
            rejected.append(rejects)
            report.written += len(rows)
            bar.advance(len(batch))
    return report


def fill(template: str, document: Document, count: int) -> str:
    return template.format(id=document.id, title=document.title, text=document.text.strip(), count=count)


def load_documents(source: str | Path, fields=None) -> list[Document]:
    """The documents of an index folder, or of a corpus file or folder (``load_corpus``)."""
    from t0s1.rag.corpus import load_corpus
    from t0s1.rag.store import MANIFEST_FILE, open_index

    path = Path(source)
    if path.is_dir() and (path / MANIFEST_FILE).is_file():
        index = open_index(path)
        return [index.document(i) for i in range(len(index))]
    return load_corpus(path, fields)
