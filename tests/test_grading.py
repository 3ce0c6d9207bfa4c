"""Grading: fidelity on each benchmark's own references, and a table of tricky pairs."""

from __future__ import annotations

import json

import pytest

from t0s1.errors import UserError
from t0s1.evaluation import grading
from t0s1.evaluation.tasks import get_task


def _rows(directory, name):
    with (directory / name).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


# ---- fidelity on the references --------------------------------------------------------------


def test_math500_reference_solutions_grade_correct(shared_data_dir):
    task = get_task("math500")
    rows = _rows(shared_data_dir, "math500.jsonl")
    assert len(rows) == 500
    verdicts = {row["unique_id"]: task.grade(row["solution"], row["answer"]) for row in rows}
    wrong = [(uid, verdict.extracted, verdict.gold) for uid, verdict in verdicts.items() if not verdict.correct]
    assert len(wrong) <= 2, wrong  # >= 99.5 %


def test_math500_references_survive_rewriting(shared_data_dir):
    """The gold answers, written as a model would ("Final Answer:" with $...$), still match."""
    task = get_task("math500")
    examples = task.load(shared_data_dir)
    wrong = [e.id for e in examples if not task.grade(f"Final Answer: ${e.gold}$", e.gold).correct]
    assert len(wrong) <= 2, wrong


def test_gsm8k_reference_solutions_grade_correct(shared_data_dir):
    task = get_task("gsm8k")
    rows = _rows(shared_data_dir, "gsm8k_test.jsonl")
    assert len(rows) == 1319
    wrong = [row["id"] for row in rows if not task.grade(row["answer"], row["final_answer"]).correct]
    assert wrong == []
    # The gold read from a hub-style solution ("#### 2,125") is the same number.
    assert grading.normalize_gold("so 2,125 in all\n#### 2,125", "number") == "2125"


def test_odd_integer_golds_and_answers_are_compared_not_crashed_on():
    """A benchmark file's gold of inf, NaN or 1e999999999999 raised (or built a trillion-digit
    integer); they are kept as written and match nothing but themselves as text."""
    assert grading.normalize_gold("025", "integer") == "25" and grading.normalize_gold("3.0", "integer") == "3"
    for gold in ("inf", "NaN", "1e999999999999", "-Infinity"):
        assert grading.normalize_gold(gold, "integer") == gold
        assert not grading.answers_match(gold, gold, "integer")  # not an AIME integer (0 to 999)
    assert grading.answers_match("7", grading.normalize_gold("7.000", "integer"), "integer")


@pytest.mark.parametrize("name", ["aime24", "aime24_nofigures", "aime25"])
def test_aime_answers_in_every_written_form_grade_correct(shared_data_dir, name):
    task = get_task(name)
    examples = task.load(shared_data_dir)
    assert len(examples) == 30
    for example in examples:
        for output in (f"\\boxed{{{example.gold}}}", f"Final Answer: {example.gold}", f"The answer is {example.gold}."):
            verdict = task.grade(output, example.gold)
            assert verdict.correct, (example.id, output)
            assert verdict.extracted == example.gold
        assert not task.grade(f"\\boxed{{{int(example.gold) + 1}}}", example.gold).correct


def test_gpqa_gold_letter_grades_correct_and_others_wrong(shared_data_dir):
    task = get_task("gpqa_diamond")
    examples = task.load(shared_data_dir)
    assert len(examples) == 198
    for example in examples:
        assert task.grade(f"Answer: ({example.gold})", example.gold).correct
        assert task.grade(f"\\boxed{{{example.gold}}}", example.gold).correct
        other = next(letter for letter in "ABCD" if letter != example.gold)
        assert not task.grade(f"The answer is {other}.", example.gold).correct


# ---- tricky pairs ----------------------------------------------------------------------------

MATH_PAIRS = [
    # (output, gold, correct)
    ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", True),
    ("\\boxed{0.5}", "\\frac12", True),
    ("Final Answer: $\\frac{14}{3}$", "\\frac{14}{3}", True),
    ("\\boxed{4.5}", "\\frac{9}{2}", True),
    ("\\boxed{\\frac{9}{2}}", "4.5", True),
    ("\\boxed{0.33}", "\\frac{1}{3}", False),
    ("\\boxed{(-\\infty, 3]}", "(-\\infty,3]", True),
    ("\\boxed{(-\\infty, 3)}", "(-\\infty,3]", False),
    ("\\boxed{[2,5)}", "[2, 5)", True),
    ("\\boxed{90^\\circ}", "90", True),
    ("\\boxed{90}", "90^\\circ", True),
    ("\\boxed{5\\text{ cm}}", "5", True),
    ("\\boxed{\\$18}", "18", True),
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", True),
    ("Answer: Evelyn", "\\text{Evelyn}", True),
    ("\\boxed{\\text{(C)}}", "\\text{(C)}", True),
    ("\\boxed{\\text{Bob}}", "\\text{Evelyn}", False),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", True),
    ("\\boxed{3, 5}", "3, 5", True),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", True),
    ("The answer is 7.", "7", True),
    ("First 3, then 4, so the result is 12", "12", True),  # last number
    ("\\boxed{13}", "12", False),  # plainly wrong
    ("", "12", False),  # empty output
    ("I do not know.", "12", False),
    ("<|im_start|>think\nmaybe 12\n<|im_start|>answer\nFinal Answer: 13", "12", False),  # the answer part counts
]


@pytest.mark.parametrize(("output", "gold", "correct"), MATH_PAIRS)
def test_math_pairs(output, gold, correct):
    verdict = get_task("math500").grade(output, gold)
    assert verdict.correct is correct, verdict
    assert verdict.gold == gold


@pytest.mark.parametrize(
    ("output", "gold", "kind", "correct"),
    [
        ("Final Answer: 025", "25", "integer", True),
        ("\\boxed{1000}", "0", "integer", False),  # AIME answers are 0-999
        ("\\boxed{25.5}", "25", "integer", False),
        ("So she makes $18 every day.", "18", "number", True),
        ("Answer: 1,250 dollars", "1250", "number", True),
        ("\\boxed{18.00}", "18", "number", True),
        ("The answer is -3", "-3", "number", True),
        ("The answer is 19", "18", "number", False),
        ("", "18", "number", False),
        ("Final Answer: (B) the second option", "B", "choice", True),
        ("\\boxed{\\text{C}}", "C", "choice", True),
        ("Comparing the options, (A) fails, so D) is right.", "D", "choice", True),
        ("Answer: A", "B", "choice", False),
        ("no letter here", "B", "choice", False),
    ],
)
def test_other_kinds(output, gold, kind, correct):
    verdict = grading.grade(output, gold, kind)
    assert verdict.correct is correct, verdict


def test_empty_output_extracts_nothing():
    for kind in grading.ANSWER_KINDS:
        assert grading.extract_answer("", kind) is None
        assert grading.extract_answer("   \n", kind) is None


def test_extraction_order_boxed_then_marker_then_last_number():
    assert grading.extract_answer("Answer: 3. Later: \\boxed{4}", "math") == "4"
    assert grading.extract_answer("We get 5 and 6. Final Answer: 7 apples, from 5", "number") == "7"
    assert grading.extract_answer("We get 5 and 6.", "number") == "6"
    assert grading.last_boxed("\\boxed{\\frac{1}{\\sqrt{2}}} end") == "\\frac{1}{\\sqrt{2}}"


def test_unknown_kind_is_a_user_error():
    with pytest.raises(UserError, match="answer kind"):
        grading.grade("1", "1", "float")
