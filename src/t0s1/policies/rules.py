"""The decision rules of the test-time policies: small pure functions over numbers and answers.

Every function here is what one paper's rule computes, with nothing about models, tensors or
engines, so each can be checked against the paper's own code on the same numbers:

- DeepConf (arXiv 2508.15260): token confidence, sliding-window group confidence, a trace's score
  (lowest group, bottom-percent groups, tail, mean), the top-percent filter and the weighted vote;
  the online threshold from warm-up traces and the consensus that stops sampling.
- DEER (arXiv 2504.15895): the confidence of a trial answer from its tokens' max probabilities.
- Dynasor-CoT (arXiv 2412.20993): probes that agree, are non-empty and do not hedge.
- short-m@k (arXiv 2505.17813): the vote among the first m traces to finish.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

# ------------------------------------------------------------------------------------------------
# DeepConf


def token_confidence(top_logprobs: Sequence[float]) -> float:
    """Minus the mean log-probability of the top-k candidates of one step (rounded to 3 places,
    as DeepConf does): high when the model is sure, low when the mass is spread."""
    if not len(top_logprobs):
        raise ValueError("a token's confidence needs at least one log-probability")
    return round(-float(np.mean(top_logprobs, dtype=np.float64)), 3)  # float32 rows summed as float64, as lists were


def group_confidences(confs: Sequence[float], window: int) -> list[float]:
    """Sliding-window means of the token confidences (rounded to 3 places); a trace shorter than the
    window is one group, its mean; an empty trace has the single group 0."""
    if not confs:
        return [0.0]
    if len(confs) < window:
        return [sum(confs) / len(confs)]
    # Each window summed on its own, left to right, as DeepConf does: a running sum differs in the
    # last bit, which moves the rounding of means that fall on a half (frequent with 3-place inputs).
    return [round(sum(confs[i : i + window]) / window, 3) for i in range(len(confs) - window + 1)]


def lowest_group_confidence(confs: Sequence[float], window: int) -> float:
    """A trace's lowest group confidence: what DeepConf online compares with its threshold."""
    return min(group_confidences(confs, window))


def _window_means(confs: Sequence[float], window: int) -> list[float]:
    sums = np.cumsum([0.0, *confs])
    return list((sums[window:] - sums[:-window]) / window)


def trace_confidence(confs: Sequence[float], kind: str = "bottom", *, window: int = 2048, bottom_percent: float = 10.0) -> float:
    """The score of one trace from its token confidences, by ``kind``:

    - ``"lowest"``: the lowest sliding-window mean;
    - ``"bottom"``: the mean of the lowest ``bottom_percent`` % of the window means;
    - ``"tail"``: the mean of the last ``window`` tokens;
    - ``"mean"``: the mean of all tokens.
    An empty trace scores 0; a trace shorter than the window is scored by its mean (lowest, bottom).
    """
    if not confs:
        return 0.0
    if kind == "mean":
        return float(np.mean(confs))
    if kind == "tail":
        return float(np.mean(confs[-window:]))
    if kind not in ("lowest", "bottom"):
        raise ValueError(f"unknown confidence kind {kind!r}: use lowest, bottom, tail or mean")
    if len(confs) < window:
        return float(np.mean(confs))
    means = _window_means(confs, window)
    if kind == "lowest":
        return float(min(means))
    count = max(1, int(len(means) * bottom_percent / 100))
    if count == 1:
        return float(min(means))
    return float(np.mean(np.partition(means, count - 1)[:count]))


def keep_top(confidences: Sequence[float], keep_percent: float) -> list[bool]:
    """Which traces DeepConf's filter keeps: those at or above the ``100 - keep_percent``
    percentile of the confidences (ties at the threshold are all kept)."""
    if not confidences:
        return []
    threshold = np.percentile(confidences, 100 - keep_percent)
    return [c >= threshold for c in confidences]


def warmup_threshold(lowest_groups: Sequence[float], keep_percent: float) -> float:
    """DeepConf online: the stopping threshold set by the warm-up traces, the ``100 -
    keep_percent`` percentile of their lowest group confidences (keep 90%: the 10th percentile)."""
    if not lowest_groups:
        raise ValueError("the warm-up produced no trace")
    return float(np.percentile(lowest_groups, 100 - keep_percent))


# ------------------------------------------------------------------------------------------------
# Votes


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most frequent answer among those given (None: no answer, not a vote); the first seen
    wins a tie."""
    given = [a for a in answers if a is not None]
    return Counter(given).most_common(1)[0][0] if given else None


def weighted_vote(answers: Sequence[str | None], weights: Sequence[float]) -> str | None:
    """The answer with the largest total weight (DeepConf: the traces' confidences)."""
    totals: dict[str, float] = {}
    for answer, weight in zip(answers, weights, strict=True):
        if answer is not None:
            totals[answer] = totals.get(answer, 0.0) + float(weight)
    return max(totals, key=totals.__getitem__) if totals else None


def consensus(answers: Sequence[str | None], weights: Sequence[float] | None = None) -> float:
    """The share of the (weighted) vote that its winner holds, 0 when no trace answered; DeepConf
    online stops sampling once this passes its tau."""
    weights = [1.0] * len(answers) if weights is None else weights
    totals: dict[str, float] = {}
    for answer, weight in zip(answers, weights, strict=True):
        if answer is not None:
            totals[answer] = totals.get(answer, 0.0) + float(weight)
    whole = sum(totals.values())
    return max(totals.values()) / whole if whole > 0 else 0.0


def short_m_of_k_vote(answers: Sequence[str | None], lengths: Sequence[int], m: int) -> str | None:
    """short-m@k: among the ``m`` shortest traces (the first m to finish when all run in parallel),
    the majority answer; a tie goes to the answer whose traces are shortest on average."""
    order = sorted(range(len(answers)), key=lambda i: (lengths[i], i))[:m]
    counts = Counter(answers[i] for i in order if answers[i] is not None)
    if not counts:
        return None
    best = max(counts.values())
    tied = [a for a, c in counts.items() if c == best]

    def mean_length(answer: str) -> float:
        own = [lengths[i] for i in order if answers[i] == answer]
        return sum(own) / len(own)

    return min(tied, key=mean_length)


# ------------------------------------------------------------------------------------------------
# DEER: the trial answer's confidence


def trial_confidence(token_probabilities: Sequence[float], kind: str = "geometric") -> float:
    """The confidence of a trial answer from the max-token probability at each of its steps, from
    the second token on (as DEER does: the first follows the forced answer prefix): ``"geometric"``
    mean (the default of DEER's confidence function, ``avg2``), arithmetic ``"mean"`` (``avg1``, the
    default of DEER's command line, which its published scripts run) or ``"min"``. A trial of one
    token uses it. docs/policies.md says why geometric is t0s1's default."""
    probabilities = list(token_probabilities[1:]) or list(token_probabilities[:1])
    if not probabilities:
        return 0.0
    if kind == "geometric":
        return math.exp(sum(math.log(max(p, 1e-10)) for p in probabilities) / len(probabilities))
    if kind == "mean":
        return sum(probabilities) / len(probabilities)
    if kind == "min":
        return min(probabilities)
    raise ValueError(f"unknown trial confidence {kind!r}: use geometric, mean or min")


# ------------------------------------------------------------------------------------------------
# Dynasor-CoT: probes that agree

HEDGE_WORDS = ("wait", "hold", "but", "okay", "no", "hmm")
"""Dynasor's uncertain words: a probe that says one of them hedges (matched as whole words here,
so "know" or "note" do not count)."""

_HEDGE = re.compile(r"\b(?:" + "|".join(HEDGE_WORDS) + r")\b", re.IGNORECASE)


def hedges(probe_text: str) -> bool:
    return _HEDGE.search(probe_text) is not None


def probes_agree(answers: Sequence[str | None], texts: Sequence[str], needed: int) -> bool:
    """Dynasor's exit rule: the last ``needed`` probes gave the same non-empty answer and none of
    them hedges."""
    if needed < 1 or len(answers) < needed:
        return False
    last, last_texts = answers[-needed:], texts[-needed:]
    if any(not a for a in last) or len(set(last)) != 1:
        return False
    return not any(hedges(text) for text in last_texts)
