"""The s1 metrics of test-time scaling (Control, Scaling, Performance), majority vote and pass@k.

Over a set of runs at different compute levels, with f = accuracy as a function of the average
number of thinking tokens (piecewise linear between the runs):

- Control: the share of samples whose thinking stayed within the run's budget, in percent.
- Scaling: the mean pairwise slope (f(b) - f(a)) / (b - a) over runs a < b. s1 gives no unit; here
  it is accuracy points (percent) per 1,000 thinking tokens (``SCALING_UNIT``).
- Performance: the best accuracy of any run, in percent.
"""

from __future__ import annotations

from collections import Counter
from itertools import combinations
from math import comb

SCALING_UNIT = "accuracy points (%) per 1,000 average thinking tokens"
TOTAL_SCALING_UNIT = "accuracy points (%) per 1,000 average total generated tokens (every trace and probe)"
"""The unit when test-time policies are compared: their runs are placed by every token they generate."""


def control(runs: list[tuple[float, int | None]]) -> float | None:
    """Percent of ``(thinking_tokens, budget)`` pairs within the budget (None: no limit). s1's
    Control takes one pair per run, its average thinking tokens; a run's own ``control`` field
    takes one per sample."""
    if not runs:
        return None
    within = sum(1 for tokens, budget in runs if budget is None or tokens <= budget)
    return 100.0 * within / len(runs)


def scaling(points: list[tuple[float, float]]) -> float | None:
    """Mean pairwise slope of (average thinking tokens, accuracy %) points, per 1,000 tokens.

    Pairs with the same average (no change in compute) have no slope and are left out; None when
    no pair is left.
    """
    slopes = []
    for (tokens_a, accuracy_a), (tokens_b, accuracy_b) in combinations(sorted(points), 2):
        if tokens_b > tokens_a:
            slopes.append((accuracy_b - accuracy_a) / (tokens_b - tokens_a) * 1000.0)
    return sum(slopes) / len(slopes) if slopes else None


def performance(points: list[tuple[float, float]]) -> float | None:
    return max((accuracy for _, accuracy in points), default=None)


def majority_answer(answers: list[str | None]) -> str | None:
    """The most frequent extracted answer (ties: the one seen first); None if none was extracted."""
    counts = Counter(answer for answer in answers if answer is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(answer for answer in answers if answer is not None and counts[answer] == best)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def summarize(points: list[tuple[float, float]], runs: list[tuple[float, int | None]] | None = None) -> dict:
    """Control, Scaling and Performance of one method's runs (``runs``: each one's average thinking
    tokens and budget, for Control), rounded for stable output."""
    return {
        "points": [[round(tokens, 4), round(accuracy, 4)] for tokens, accuracy in sorted(points)],
        "control": _round(control(runs)) if runs is not None else None,
        "scaling": _round(scaling(points)),
        "performance": _round(performance(points)),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
