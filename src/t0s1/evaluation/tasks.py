"""The benchmark registry: one small definition per task (data source, prompt, answer kind).

A task is data, as in lm-evaluation-harness: where the questions come from (a local JSONL file in
the data directory, else a Hugging Face dataset), which fields hold the id, question and gold
answer, how the prompt is written and how an output is graded (``t0s1.evaluation.grading``).

The data directory is ``--data-dir`` or ``$T0S1_DATA_DIR``; nothing else is searched. Its files are
the ones described in ``shared/data/README.md`` (``math500.jsonl``, ``aime24.jsonl``, ...).

Prompts follow s1: the bare question. GPQA shows the question and the options A-D, shuffled with
a seed fixed per question, so every run and every backend sees the same order.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from t0s1.errors import UserError
from t0s1.evaluation import grading
from t0s1.jsonl import read_jsonl

DATA_DIR_ENV = "T0S1_DATA_DIR"
CHOICE_LETTERS = "ABCD"


@dataclass(frozen=True)
class Example:
    """One benchmark question, ready to prompt and grade.

    id: the task's own id (MATH500 ``unique_id``, AIME ``2024-I-1``, GPQA Record ID, ...).
    question: the question as the dataset writes it (GPQA: without the options).
    prompt: what the model is asked (s1: the bare question; GPQA: question and options A-D).
    gold: the reference answer as the grader compares it (GPQA: the letter of the correct option).
    meta: task-specific extras (GPQA: the shuffled options; MATH500: subject and level).
    """

    id: str
    question: str
    prompt: str
    gold: str
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Source:
    """Where a task's rows come from and which fields hold what.

    fields maps the roles ``id``, ``question``, ``gold`` (and for multiple choice ``correct`` and
    ``incorrect``) to field names; a tuple of names is read as a list. A missing ``id`` role
    numbers the rows (``<task>-0``, ``<task>-1``, ...).
    """

    fields: dict
    extra: tuple[str, ...] = ()  # fields copied into Example.meta when present


@dataclass(frozen=True)
class Task:
    """A benchmark: data source, prompt and grader.

    answer_kind: how outputs are graded, one of ``grading.ANSWER_KINDS``: ``math`` (math-verify),
    ``integer`` (AIME, 0-999), ``number`` (GSM8K) or ``choice`` (GPQA letter).
    """

    name: str
    description: str
    hub_id: str
    split: str
    local_file: str
    answer_kind: str
    local: Source
    hub: Source
    hub_config: str | None = None
    multiple_choice: bool = False

    # ---- data -----------------------------------------------------------------------------

    def load(self, data_dir: str | Path | None = None, limit: int | None = None) -> list[Example]:
        """The task's examples in dataset order (the first ``limit`` if given).

        Reads ``<data_dir>/<local_file>`` (data_dir: the argument, else ``$T0S1_DATA_DIR``) when it
        exists, else the Hugging Face dataset ``hub_id``.
        """
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise UserError(f"limit must be a positive integer, got {limit!r}.")
        directory = resolve_data_dir(data_dir)
        path = directory / self.local_file if directory is not None else None
        if path is not None and path.is_file():
            rows, source = [row for _, row in read_jsonl(path, limit=limit)], self.local
        else:
            rows, source = self._load_hub(limit, missing_local=path), self.hub
        if not rows:
            where = path if path is not None and path.is_file() else f"the dataset {self.hub_id!r}"
            raise UserError(f"Task {self.name}: {where} holds no questions.")
        examples = [self._example(row, source, i) for i, row in enumerate(rows)]
        seen = set()
        for example in examples:
            if example.id in seen:
                raise UserError(f"Task {self.name}: the id {example.id!r} occurs twice; ids must be unique.")
            seen.add(example.id)
        return examples

    def _load_hub(self, limit: int | None, missing_local: Path | None) -> list[dict]:
        where = (
            f"There is no {self.local_file} in {missing_local.parent}"
            if missing_local is not None
            else f"No data directory is set (--data-dir or ${DATA_DIR_ENV})"
        )
        try:
            import datasets

            dataset = datasets.load_dataset(self.hub_id, self.hub_config, split=self.split)
        except Exception as error:  # offline, gated, renamed: all mean "use local files"
            raise UserError(
                f"{where}, and the dataset {self.hub_id!r} could not be loaded from the Hugging Face hub "
                f"({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}). "
                f"Pass --data-dir DIR (or set ${DATA_DIR_ENV}) to a folder holding {self.local_file}."
            ) from None
        if limit is not None:
            dataset = dataset.select(range(min(limit, len(dataset))))
        return [dict(row) for row in dataset]

    def _example(self, row: dict, source: Source, index: int) -> Example:
        def get(role: str):
            names = source.fields[role]
            try:
                if isinstance(names, tuple):
                    return [row[name] for name in names]
                return row[names]
            except KeyError as missing:
                raise UserError(
                    f"Task {self.name}: row {index + 1} has no field {missing.args[0]!r} "
                    f"(fields: {sorted(row)}). Is the file the right benchmark?"
                ) from None

        def text(role: str, what: str) -> str:
            value = get(role)
            if value is None or (isinstance(value, str) and not value.strip()) or isinstance(value, dict | list):
                raise UserError(f"Task {self.name}: row {index + 1} has no {what} (its {source.fields[role]!r} is "
                                f"{str(value)[:60]!r}). Is the file the right benchmark?")
            return str(value).strip()

        example_id = str(get("id")) if "id" in source.fields else f"{self.name}-{index}"
        question = text("question", "question")
        meta = {name: row[name] for name in source.extra if name in row}
        if self.multiple_choice:
            incorrect = get("incorrect")
            try:
                if isinstance(incorrect, str):  # a list stored as text
                    incorrect = json.loads(incorrect)
                if not isinstance(incorrect, list) or not incorrect or not all(isinstance(o, str | int | float) for o in incorrect):
                    raise TypeError
            except (json.JSONDecodeError, TypeError):
                raise UserError(f"Task {self.name}: row {index + 1}: {source.fields['incorrect']!r} must be a list of the "
                                f"wrong options, got {str(incorrect)[:60]!r}.") from None
            options, gold = shuffle_options(example_id, text("correct", "correct option"), [str(o).strip() for o in incorrect])
            meta["options"] = options
            prompt = multiple_choice_prompt(question, options)
        else:
            gold = grading.normalize_gold(text("gold", "gold answer"), self.answer_kind)
            prompt = question
        return Example(id=example_id, question=question, prompt=prompt, gold=gold, meta=meta)

    # ---- grading --------------------------------------------------------------------------

    def extract(self, output: str) -> str | None:
        """The answer an output gives, as a string (None: no answer found)."""
        return grading.extract_answer(output, self.answer_kind)

    def grade(self, output: str, gold: str) -> grading.Verdict:
        """Grade one output against the gold answer: extracted answer, gold and verdict."""
        return grading.grade(output, gold, self.answer_kind)

    def grade_example(self, example: Example, output: str) -> grading.Verdict:
        """Grade one output for ``example``: what the evaluation runner calls (a task whose
        verdict depends on more than the gold answer reads the example's ``meta``)."""
        return self.grade(output, example.gold)


def shuffle_options(question_id: str, correct: str, incorrect: list[str]) -> tuple[dict[str, str], str]:
    """Options A-D in an order fixed by the question id; returns ({letter: option}, correct letter).

    ``random.Random`` seeded with a string is stable across Python runs and platforms.
    """
    if len(incorrect) != 3:
        raise UserError(f"Question {question_id!r} needs exactly 3 incorrect options, got {len(incorrect)}.")
    order = [correct, *incorrect]
    positions = list(range(4))
    random.Random(f"t0s1-gpqa:{question_id}").shuffle(positions)
    options = {CHOICE_LETTERS[slot]: order[i] for slot, i in enumerate(positions)}
    gold = CHOICE_LETTERS[positions.index(0)]
    return options, gold


def multiple_choice_prompt(question: str, options: dict[str, str]) -> str:
    """The question and the options, one per line, as s1's GPQA prompt shows them."""
    lines = [question, ""] + [f"{letter}) {text}" for letter, text in options.items()]
    return "\n".join(lines)


def resolve_data_dir(data_dir: str | Path | None = None) -> Path | None:
    """The benchmark data directory: ``data_dir``, else ``$T0S1_DATA_DIR``, else None (hub)."""
    value = data_dir if data_dir not in (None, "") else os.environ.get(DATA_DIR_ENV) or None
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        origin = "--data-dir" if data_dir not in (None, "") else f"${DATA_DIR_ENV}"
        raise UserError(f"The data directory {str(value)!r} (from {origin}) does not exist or is not a folder.")
    return path


_AIME_LOCAL = Source({"id": "id", "question": "problem", "gold": "answer"}, extra=("year", "contest", "problem_number", "has_figure"))
_MATHARENA_HUB = Source({"id": "problem_idx", "question": "problem", "gold": "answer"})

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            name="aime24",
            description="AIME 2024 I+II, 30 problems, official wording with figures (MathArena)",
            hub_id="MathArena/aime_2024",
            split="train",
            local_file="aime24.jsonl",
            answer_kind="integer",
            local=_AIME_LOCAL,
            hub=_MATHARENA_HUB,
        ),
        Task(
            name="aime24_nofigures",
            description="AIME 2024, 30 problems, the set s1 reports (simplescaling/aime24_nofigures)",
            hub_id="simplescaling/aime24_nofigures",
            split="train",
            local_file="aime24_s1_nofigures.jsonl",
            answer_kind="integer",
            local=_AIME_LOCAL,
            hub=Source({"id": "id", "question": "problem", "gold": "answer"}, extra=("url",)),
        ),
        Task(
            name="aime25",
            description="AIME 2025 I+II, 30 problems, official wording with figures (MathArena)",
            hub_id="MathArena/aime_2025",
            split="train",
            local_file="aime25.jsonl",
            answer_kind="integer",
            local=_AIME_LOCAL,
            hub=_MATHARENA_HUB,
        ),
        Task(
            name="math500",
            description="MATH500 (PRM800K test split), 500 problems, graded with math-verify",
            hub_id="HuggingFaceH4/MATH-500",
            split="test",
            local_file="math500.jsonl",
            answer_kind="math",
            local=Source({"id": "unique_id", "question": "problem", "gold": "answer"}, extra=("subject", "level")),
            hub=Source({"id": "unique_id", "question": "problem", "gold": "answer"}, extra=("subject", "level")),
        ),
        Task(
            name="gpqa_diamond",
            description="GPQA Diamond, 198 multiple-choice science questions (options shuffled per question)",
            hub_id="Idavidrein/gpqa",
            hub_config="gpqa_diamond",
            split="train",
            local_file="gpqa_diamond.jsonl",
            answer_kind="choice",
            multiple_choice=True,
            local=Source(
                {"id": "id", "question": "question", "correct": "correct_answer", "incorrect": "incorrect_answers"},
                extra=("domain", "subdomain"),
            ),
            hub=Source(
                {
                    "id": "Record ID",
                    "question": "Question",
                    "correct": "Correct Answer",
                    "incorrect": ("Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"),
                },
            ),
        ),
        Task(
            name="gsm8k",
            description="GSM8K test, 1319 grade-school word problems, numeric answer",
            hub_id="openai/gsm8k",
            hub_config="main",
            split="test",
            local_file="gsm8k_test.jsonl",
            answer_kind="number",
            local=Source({"id": "id", "question": "question", "gold": "final_answer"}),
            # The hub rows have no id and the answer is the solution ending in "#### N".
            hub=Source({"question": "question", "gold": "answer"}),
        ),
    )
}


def get_task(name: str) -> Task:
    """The task called ``name``; a UserError naming the known tasks otherwise."""
    try:
        return TASKS[name.strip()]
    except (KeyError, AttributeError):
        raise UserError(f"Unknown task {name!r}. Known tasks: {', '.join(TASKS)}.") from None


def parse_task_list(text: str) -> list[Task]:
    """Tasks from a comma-separated list (``math500,aime24``), in order, without repeats."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise UserError(f"No task given. Known tasks: {', '.join(TASKS)}.")
    return [get_task(name) for name in dict.fromkeys(names)]

