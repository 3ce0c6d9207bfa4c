"""Reasoning problems the quickstart generates itself: no downloads, exact answers.

The family is *arithmetic chains*: "Start with 7. Add 5, multiply by 2, subtract 9, add 4. What is
the result?". The answer can only be reached by stepping through the operations, so the thinking
budget decides the accuracy: a budget that ends the thinking before the last step forces a guess,
a budget long enough to finish the trace lets the model read the result off its last line. That is
what makes test-time scaling visible on a 135M model in minutes.

Each trace writes one line per step (``7 + 5 = 12``) and some traces check a step again
("Wait, let me check: 12 * 2 = 24. Yes."), the s1 pattern that "Wait" extends at test time.

Problems are written in the s1K schema (``question``, ``solution``, ``cot_type``, ``source_type``,
``metadata``, ``cot``, ``thinking_trajectories``, ``attempt``) so ``t0s1 prepare`` reads them like
s1K itself. The split is seeded and the train and test questions are disjoint.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

SOURCE_TYPE = "t0s1/quickstart-arithmetic"
"""``source_type`` of every generated problem (s1K names the dataset a problem came from)."""

MIN_STEPS, MAX_STEPS = 2, 5
"""Operations per problem: the shortest chains finish within a small budget, the longest need
the largest one, so accuracy grows step by step with the budget."""

MAX_VALUE = 99
"""Every intermediate value stays in 0..MAX_VALUE: one- and two-digit arithmetic a 135M model can
learn in minutes."""

MAX_OPERAND = 9
"""Add and subtract single digits; multiply only by 2. Larger operands (up to 20, times 3) left
the trained 135M model at 40% on full traces: most errors were the arithmetic itself."""

CHECK_SHARE = 0.5
"""Share of traces that check a step again after "Wait" (the s1 self-verification pattern)."""

BUDGETS = (16, 32, 64, 128, 256)
"""Thinking budgets of the quickstart's sweeps: from a cut first pass to room for two Waits."""

_OPERATIONS = {
    "add": ("Add {n}", "+"),
    "subtract": ("subtract {n}", "-"),
    "multiply": ("multiply by {n}", "*"),
}


@dataclass(frozen=True)
class Step:
    operation: str  # "add", "subtract" or "multiply"
    operand: int
    before: int
    after: int

    @property
    def line(self) -> str:
        """The trace line of this step, e.g. ``12 * 2 = 24``."""
        return f"{self.before} {_OPERATIONS[self.operation][1]} {self.operand} = {self.after}"

    @property
    def instruction(self) -> str:
        """How the question words this step, e.g. ``multiply by 2``."""
        return _OPERATIONS[self.operation][0].format(n=self.operand).lower()


@dataclass(frozen=True)
class Problem:
    start: int
    steps: tuple[Step, ...]
    check: int | None  # index of the step the trace checks again after "Wait", or None

    @property
    def answer(self) -> int:
        return self.steps[-1].after

    @property
    def question(self) -> str:
        instructions = ", ".join(step.instruction for step in self.steps)
        return f"Start with {self.start}. {instructions[0].upper()}{instructions[1:]}. What is the result?"

    @property
    def thinking(self) -> str:
        lines = [step.line for step in self.steps]
        if self.check is not None:
            lines.append(f"Wait, let me check: {self.steps[self.check].line}. Yes.")
        lines.append(f"The result is {self.answer}.")
        return "\n".join(lines)

    def to_s1k(self) -> dict:
        """The problem as an s1K row: ``prepare`` trains on ``thinking_trajectories`` + ``attempt``."""
        return {
            "question": self.question,
            "solution": str(self.answer),
            "cot_type": "math",
            "source_type": SOURCE_TYPE,
            "metadata": json.dumps(
                {
                    "start": self.start,
                    "steps": [[step.operation, step.operand] for step in self.steps],
                    "num_steps": len(self.steps),
                }
            ),
            "cot": None,
            "thinking_trajectories": [self.thinking],
            "attempt": str(self.answer),
        }


def random_problem(rng: random.Random) -> Problem:
    """One arithmetic chain of MIN_STEPS..MAX_STEPS operations with values in 0..MAX_VALUE."""
    value = rng.randint(2, 20)
    start = value
    steps = []
    for _ in range(rng.randint(MIN_STEPS, MAX_STEPS)):
        choices = ["add"] * 2 + ["subtract"] * 2 + (["multiply"] if 1 < value <= MAX_VALUE // 2 else [])
        operation = rng.choice(choices)
        if operation == "add":
            operand = rng.randint(1, min(MAX_OPERAND, MAX_VALUE - value)) if value < MAX_VALUE else None
        elif operation == "subtract":
            operand = rng.randint(1, min(MAX_OPERAND, value)) if value > 0 else None
        else:
            operand = 2
        if operand is None:  # at a bound: go the other way
            operation, operand = ("subtract", rng.randint(1, MAX_OPERAND)) if value >= MAX_VALUE else ("add", rng.randint(1, MAX_OPERAND))
        after = {"add": value + operand, "subtract": value - operand, "multiply": value * operand}[operation]
        steps.append(Step(operation, operand, value, after))
        value = after
    check = rng.randrange(len(steps)) if rng.random() < CHECK_SHARE else None
    return Problem(start, tuple(steps), check)


def generate_problems(num_train: int = 2000, num_test: int = 100, *, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, test) rows in the s1K schema. The same seed gives the same rows; no question is in
    both splits (and none repeats within a split)."""
    if num_train < 0 or num_test < 0:
        raise ValueError(f"num_train and num_test must be >= 0, got {num_train} and {num_test}.")
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict] = []
    attempts = 0
    while len(rows) < num_train + num_test:
        attempts += 1
        if attempts > 100 * (num_train + num_test) + 1000:
            raise ValueError(f"Could not generate {num_train + num_test} distinct problems; ask for fewer.")
        problem = random_problem(rng)
        if problem.question in seen:
            continue
        seen.add(problem.question)
        rows.append(problem.to_s1k())
    # The test split is the first num_test rows, so growing num_train never changes the test set.
    return rows[num_test:], rows[:num_test]


def write_problems(out_dir: str | Path, num_train: int = 2000, num_test: int = 100, *, seed: int = 0) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` (s1K schema) to ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, test = generate_problems(num_train, num_test, seed=seed)
    paths = out / "train.jsonl", out / "test.jsonl"
    for path, rows in zip(paths, (train, test), strict=True):
        with path.open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    return paths
