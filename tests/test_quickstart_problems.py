"""The quickstart's own problems: seeded, disjoint splits, correct answers, the s1K schema."""

from __future__ import annotations

import json
import re

import pytest

from t0s1.quickstart.problems import (
    MAX_STEPS,
    MAX_VALUE,
    MIN_STEPS,
    SOURCE_TYPE,
    generate_problems,
    write_problems,
)

S1K_COLUMNS = {"question", "solution", "cot_type", "source_type", "metadata", "cot", "thinking_trajectories", "attempt"}


def evaluate_question(question: str) -> int:
    """Recompute the answer from the question text alone, independently of the generator."""
    match = re.fullmatch(r"Start with (\d+)\. (.+)\. What is the result\?", question)
    assert match, question
    value = int(match.group(1))
    for instruction in match.group(2).lower().split(", "):
        operation, operand = re.fullmatch(r"(add|subtract|multiply by) (\d+)", instruction).groups()
        operand = int(operand)
        value = {"add": value + operand, "subtract": value - operand, "multiply by": value * operand}[operation]
        assert 0 <= value <= MAX_VALUE, question
    return value


def test_same_seed_same_problems_and_other_seed_other_problems():
    assert generate_problems(50, 10, seed=3) == generate_problems(50, 10, seed=3)
    assert generate_problems(50, 10, seed=3) != generate_problems(50, 10, seed=4)


def test_split_sizes_and_no_question_in_both_splits():
    train, test = generate_problems(500, 100, seed=0)
    assert (len(train), len(test)) == (500, 100)
    train_questions = {row["question"] for row in train}
    test_questions = {row["question"] for row in test}
    assert len(train_questions) == 500 and len(test_questions) == 100
    assert not train_questions & test_questions


def test_test_split_does_not_change_with_the_train_size():
    assert generate_problems(10, 30, seed=1)[1] == generate_problems(400, 30, seed=1)[1]


def test_answers_match_the_questions():
    train, test = generate_problems(300, 50, seed=7)
    for row in train + test:
        assert int(row["solution"]) == evaluate_question(row["question"])
        assert row["attempt"] == row["solution"]


def test_traces_step_through_every_operation_and_end_with_the_answer():
    train, _ = generate_problems(300, 0, seed=2)
    for row in train:
        (trace,) = row["thinking_trajectories"]
        lines = trace.splitlines()
        steps = [line for line in lines if re.fullmatch(r"\d+ [-+*] \d+ = \d+", line)]
        assert MIN_STEPS <= len(steps) <= MAX_STEPS
        assert len(steps) == json.loads(row["metadata"])["num_steps"]
        for line in steps:  # every written step is true arithmetic
            a, operator, b, _, result = line.split()
            assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[operator] == int(result)
        assert steps[-1].endswith(f"= {row['solution']}")
        assert lines[-1] == f"The result is {row['solution']}."


def test_some_traces_check_themselves_after_wait():
    train, _ = generate_problems(400, 0, seed=0)
    checked = [row for row in train if "Wait, let me check:" in row["thinking_trajectories"][0]]
    assert 0.3 < len(checked) / len(train) < 0.7
    for row in checked:
        lines = row["thinking_trajectories"][0].splitlines()
        check = next(line for line in lines if line.startswith("Wait"))
        rechecked = check.removeprefix("Wait, let me check: ").removesuffix(". Yes.")
        assert rechecked in lines  # it checks a step the trace actually wrote


def test_rows_follow_the_s1k_schema(tmp_path):
    train_path, test_path = write_problems(tmp_path, 20, 5, seed=0)
    for path, size in ((train_path, 20), (test_path, 5)):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(rows) == size
        for row in rows:
            assert set(row) == S1K_COLUMNS
            assert isinstance(row["thinking_trajectories"], list)
            assert all(isinstance(part, str) and part for part in row["thinking_trajectories"])
            assert row["source_type"] == SOURCE_TYPE and row["cot_type"] == "math" and row["cot"] is None
            assert isinstance(json.loads(row["metadata"]), dict)
    assert [json.loads(line) for line in test_path.read_text().splitlines()] == generate_problems(20, 5, seed=0)[1]


def test_the_datasets_library_reads_the_files(tmp_path):
    datasets = pytest.importorskip("datasets")
    train_path, _ = write_problems(tmp_path, 8, 2, seed=0)
    dataset = datasets.load_dataset("json", data_files=str(train_path), split="train")
    assert len(dataset) == 8 and set(dataset.column_names) == S1K_COLUMNS


@pytest.mark.parametrize(
    ("answer", "correct"),
    [
        ("Answer: 19", True),
        ("Final Answer: 19", True),
        ("Final Answer: The result is 19.", True),
        ("Answer: 3\nAnswer: 19", True),
        ("Final Answer: 18", False),
        ("no number", False),
        ("", False),
    ],
)
def test_the_evaluation_grader_reads_quickstart_answers(answer, correct):
    """The quickstart is graded by the evaluation stage's number grader, as its task says."""
    from t0s1.evaluation.grading import grade
    from t0s1.quickstart.pipeline import TASK

    assert grade(answer, "19", TASK.answer_kind).correct is correct
