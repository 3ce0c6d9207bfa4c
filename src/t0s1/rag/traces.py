"""``t0s1 rag traces``: a teacher's reasoning over retrieved sources, as s1K training rows.

For each question: retrieve ``k`` sources, pack them into the prompt the student will see
(``build_rag_messages`` with the student's tokenizer and context, so training and evaluation see
the same prompt), ask the teacher, and write one row in the s1K schema:

- ``question``: the whole user message (instructions, numbered sources, question), so that
  ``t0s1 prepare`` and ``t0s1 train`` take the file unchanged and the student learns to read sources;
- ``thinking_trajectories``: [the teacher's reasoning]; ``attempt``: its answer;
- ``solution``: the reference answer (or ""); ``cot_type`` "rag"; ``source_type`` ``SOURCE_TYPE``;
- ``metadata`` (a JSON string): the question's id and text, gold ids, the ids of the sources in
  prompt order, k, retriever, teacher and, with a reference answer, whether the answer matched it.

Rows are appended per batch. A question the teacher fails on (an error, no answer) and, with
``filter_correct``, one whose answer does not match the reference are written to the
``.rejected.jsonl`` file beside the output with the reason. A rerun skips the questions already
written and those rejected as incorrect, and asks again for the failed ones: nothing is lost.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from t0s1.errors import UserError
from t0s1.evaluation import grading
from t0s1.progress import ProgressBar
from t0s1.rag.answer import retrieve_sources
from t0s1.rag.prompt import build_rag_messages
from t0s1.rag.questions import JsonlLog, RagQuestion, RowProblem
from t0s1.rag.teacher import Teacher, TeacherReply, TeacherRequest

SOURCE_TYPE = "t0s1/rag-traces"
"""``source_type`` of every row ``rag traces`` writes."""

INCORRECT = "incorrect"
FAILED = "failed"


@dataclass
class TraceReport:
    """What a run did: counts, and the rows it skipped or rejected with the reasons."""

    out: Path
    questions: int
    already_done: int = 0
    written: int = 0
    incorrect: list[RowProblem] = field(default_factory=list)
    failed: list[RowProblem] = field(default_factory=list)
    skipped: list[RowProblem] = field(default_factory=list)  # bad rows of the question file

    def summary(self) -> str:
        lines = [
            f"{self.written} traces written to {self.out} ({self.already_done} there already); "
            f"{len(self.incorrect)} rejected as incorrect, {len(self.failed)} failed, "
            f"{len(self.skipped)} question rows skipped"
        ]
        for title, problems in (("failed (asked again on a rerun)", self.failed), ("skipped", self.skipped)):
            if problems:
                lines.append(f"{title}:")
                lines += [f"  line {p.line}{f' ({p.id})' if p.id else ''}: {p.reason}" for p in problems[:10]]
                if len(problems) > 10:
                    lines.append(f"  ... and {len(problems) - 10} more")
        return "\n".join(lines)


def rejected_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name.removesuffix(".jsonl") + ".rejected.jsonl")


def trace_key(row: dict) -> str:
    return json.loads(row["metadata"])["id"]


def settings_path(out: str | Path) -> Path:
    """The file beside the traces that records what they were made with (``NAME.settings.json``)."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".jsonl") + ".settings.json")


def write_traces(
    questions: list[RagQuestion],
    index,
    teacher: Teacher,
    out: str | Path,
    *,
    tokenizer,
    context_length: int,
    reserved_tokens: int,
    k: int = 5,
    retriever: str | None = None,
    filter_correct: bool = False,
    answer_kind: str = "exact",
    batch_size: int = 8,
    progress: bool = True,
) -> TraceReport:
    """Write (or resume) the traces of ``questions`` to ``out``; see the module docstring.
    ``reserved_tokens``: what the student's thinking and answer need (``reserve_tokens``)."""
    from t0s1.rag.retrievers import check_k

    from t0s1.evaluation.runner import check_run_key

    check_k(k)
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}.")
    grading.extract_answer("", answer_kind)  # an unknown kind fails before any work
    retriever_name = retriever or index.default_retriever
    # What the rows depend on: a rerun with other settings would append rows made otherwise.
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    check_run_key(settings_path(out), holds="traces made with other settings", key={
        "index_corpus_sha256": index.manifest.get("corpus_sha256"), "index_build_id": index.manifest.get("build_id"),
        "retriever": retriever_name, "k": k, "teacher": teacher.name,
        "reserved_tokens": reserved_tokens, "filter_correct": filter_correct, "answer_kind": answer_kind,
        # the student's tokenizer and context pack the sources
        "context_length": context_length, "student_tokenizer": getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__,
    }, later=("context_length", "student_tokenizer"))
    log = JsonlLog(out, trace_key)
    rejected = JsonlLog(rejected_path(out), lambda row: row["id"])
    final = {row["id"] for row in rejected.rows if row["kind"] == INCORRECT}
    report = TraceReport(Path(out), len(questions))
    todo = []
    for question in questions:
        if question.id in log or question.id in final:
            report.already_done += 1
        elif filter_correct and not question.answer:
            report.skipped.append(RowProblem(question.line, "no reference answer to check the trace against (--filter-correct)", question.id))
        else:
            todo.append(question)

    with ProgressBar(progress, len(todo), "traces") as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            requests = []
            for question in batch:
                hits = retrieve_sources(index, question.question, k, retriever)
                prompt = build_rag_messages(tokenizer, question.question, hits, context_length=context_length, reserved=reserved_tokens)
                requests.append(TeacherRequest(prompt.messages, question, tuple(prompt.sources)))
            replies = teacher.reply(requests)
            rows, rejects = [], []
            for question, request, reply in zip(batch, requests, replies, strict=True):
                if reply.error:
                    problem = RowProblem(question.line, reply.error, question.id)
                    report.failed.append(problem)
                    rejects.append({"id": question.id, "line": question.line, "kind": FAILED, "reason": reply.error})
                    continue
                correct = None
                if question.answer:
                    correct = grading.grade(reply.answer, grading.normalize_gold(question.answer, answer_kind), answer_kind).correct
                if filter_correct and not correct:
                    report.incorrect.append(RowProblem(question.line, "the answer does not match the reference", question.id))
                    rejects.append({"id": question.id, "line": question.line, "kind": INCORRECT, "reason": "answer does not match",
                                    "answer": reply.answer, "reference": question.answer})
                    continue
                rows.append(trace_row(question, request, reply, k=k, retriever=retriever_name, teacher=teacher.name, correct=correct))
            log.append(rows)
            rejected.append(rejects)
            report.written += len(rows)
            bar.advance(len(batch))
    return report


def model_context_length(model: str) -> int:
    """The context length of ``model`` (a name, directory or GGUF file) from its configuration,
    without loading weights: the student's context, which the sources are packed into."""
    from transformers import AutoConfig

    from t0s1.errors import UserError
    from t0s1.models import resolve_model_source

    source, gguf_file = resolve_model_source(model)
    try:
        config = AutoConfig.from_pretrained(source, **({"gguf_file": gguf_file} if gguf_file else {}))
    except (OSError, ValueError) as error:
        raise UserError(f"Could not read the configuration of {model!r}: {error}") from None
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None) or getattr(config.get_text_config(), key, None)
        if value:
            return int(value)
    raise UserError(f"The configuration of {model!r} gives no context length (max_position_embeddings).")


def trace_row(question: RagQuestion, request: TeacherRequest, reply: TeacherReply, *, k: int, retriever: str, teacher: str,
              correct: bool | None) -> dict:
    """One s1K row: the prompt's user message as the question, the teacher's thinking and answer."""
    metadata = {
        "id": question.id,
        "question": question.question,
        "gold_ids": list(question.gold_ids),
        "sources": [hit.doc_id for hit in request.sources],
        "k": k,
        "retriever": retriever,
        "teacher": teacher,
        "correct": correct,
    }
    return {
        "question": request.messages[-1]["content"],
        "solution": question.answer or "",
        "cot_type": "rag",
        "source_type": SOURCE_TYPE,
        "metadata": json.dumps(metadata, ensure_ascii=False),
        "cot": None,
        "thinking_trajectories": [reply.thinking],
        "attempt": reply.answer,
    }
