"""Decontamination as in s1: drop a training question that shares an 8-gram with a benchmark question.

Benchmark questions come from the evaluation task registry (``t0s1.evaluation.tasks``), so that
training and evaluation read exactly the same benchmark files (local data dir first, hub otherwise).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from t0s1.errors import UserError

NGRAM = 8
DEFAULT_BENCHMARKS = ("math500", "aime24", "gpqa_diamond")

_WORD = re.compile(r"[^\W_]+")
"""A word: letters and digits (``a_1`` and ``a_{1}`` are both the words a, 1)."""
_LATEX_COMMAND = re.compile(r"\\([A-Za-z]+)")
LATEX_SPELLINGS = {"dfrac": "frac", "tfrac": "frac", "dbinom": "binom", "tbinom": "binom", "le": "leq", "ge": "geq"}
"""LaTeX commands written several ways for one thing: compared as one word."""
LATEX_LAYOUT = frozenset({"left", "right", "displaystyle", "textstyle", "mathrm", "mathbf", "mathit", "text", "textbf",
                          "textit", "operatorname", "quad", "qquad"})
"""LaTeX commands that only set out the text: not words."""


SHORT_MIN = 4
"""Benchmark questions shorter than NGRAM words are found inside training questions from this many words."""


def words(text: str) -> list[str]:
    """The words of ``text`` as decontamination compares them: NFKC-normalised (``ﬁ`` is ``fi``,
    full-width digits are digits), case-folded, punctuation ignored, a LaTeX command one word under
    one spelling (``\\dbinom`` and ``\\binom`` are binom) and layout commands (``\\left``,
    ``\\text``, ...) none."""

    def command(match: re.Match) -> str:
        name = match.group(1)
        return "" if name in LATEX_LAYOUT else f" {LATEX_SPELLINGS.get(name, name)} "

    return _WORD.findall(_LATEX_COMMAND.sub(command, unicodedata.normalize("NFKC", text)).casefold())


def ngrams(text: str, n: int = NGRAM) -> list[tuple[str, ...]]:
    """Word n-grams of ``text`` (``words``). A text of fewer than ``n`` words has one: all its
    words (a short question is then found whole)."""
    found = words(text)
    if 0 < len(found) < n:
        return [tuple(found)]
    return _runs(found, n)


def _runs(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


@dataclass(frozen=True)
class Contamination:
    """A training row dropped because it shares ``ngram`` with ``benchmark`` example ``benchmark_id``."""

    row: int
    benchmark: str
    benchmark_id: str
    ngram: str

    def to_dict(self) -> dict:
        return {"row": self.row, "benchmark": self.benchmark, "benchmark_id": self.benchmark_id, "ngram": self.ngram}


class BenchmarkIndex:
    """Every 8-gram of the benchmark questions -> (benchmark, example id) of its first occurrence."""

    def __init__(self, benchmarks: dict[str, list[tuple[str, str]]]):
        self.sizes = {name: len(questions) for name, questions in benchmarks.items()}
        self._owner: dict[tuple[str, ...], tuple[str, str]] = {}
        for name, questions in benchmarks.items():
            for example_id, question in questions:
                for gram in ngrams(question):
                    self._owner.setdefault(gram, (name, example_id))
        # Benchmark questions shorter than NGRAM words: a training question holding all their words
        # in a row overlaps them.
        # (Of at least SHORT_MIN words: a question of one or two words is matched only whole.)
        self._short_lengths = sorted({len(gram) for gram in self._owner if SHORT_MIN <= len(gram) < NGRAM})

    @classmethod
    def load(cls, names: list[str], data_dir: str | None = None) -> BenchmarkIndex:
        try:
            from t0s1.evaluation.tasks import get_task
        except ImportError as error:
            raise UserError(
                f"Decontamination needs the evaluation task registry (t0s1.evaluation.tasks), which could "
                f"not be imported ({error})."
            ) from None
        benchmarks = {}
        for name in names:
            task = get_task(name)  # raises UserError naming the known tasks
            examples = task.load(data_dir=data_dir)
            benchmarks[name] = [(str(example.id), example.question) for example in examples]
        return cls(benchmarks)

    def match(self, row: int, question: str) -> Contamination | None:
        grams = ngrams(question)
        question_words = words(question) if self._short_lengths else []
        for length in self._short_lengths:
            grams += _runs(question_words, length)
        for gram in grams:
            owner = self._owner.get(gram)
            if owner:
                return Contamination(row, owner[0], owner[1], " ".join(gram))
        return None


def parse_benchmarks(value: str | None) -> list[str]:
    """``"math500,aime24"`` -> ``["math500", "aime24"]``; ``"none"`` or empty -> ``[]``."""
    if not value or value.strip().lower() in ("none", "no", "false"):
        return []
    return [name.strip() for name in value.split(",") if name.strip()]
