"""Answer extraction and grading, one function per answer kind.

Extraction, for every kind: the answer part of the output (after the answer delimiter when the
whole turn is given), then the last ``\\boxed{...}``, else the text after the last "Final Answer:" /
"Answer:" / "the answer is", else the last number.

- ``math`` (MATH500): the extracted text and the gold answer are parsed by math-verify and compared
  symbolically (fractions, decimals, intervals, sets, units and degrees normalised); when
  math-verify cannot parse one side, normalised strings are compared (text answers).
- ``integer`` (AIME): an integer 0-999, compared as integers (``025`` equals ``25``).
- ``number`` (GSM8K): a number, commas, currency and units dropped, compared numerically.
- ``choice`` (GPQA): a letter A-D.
- ``exact`` (short text answers, e.g. retrieval-augmented questions): exact match after SQuAD's
  normalisation (lowercase, no punctuation, no articles, single spaces), with citations such as
  ``[2]`` removed; the answer is the boxed text, else the rest of the "Answer:" line, else the
  first line.

s1 had MATH answers judged by gpt-4o-mini; ``t0s1.evaluation.judge`` offers that as an option.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import asdict, dataclass
from decimal import Decimal, InvalidOperation

from t0s1.errors import UserError
from t0s1.profiles import PROFILES

ANSWER_KINDS = ("math", "integer", "number", "choice", "exact")

_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
# "Final Answer:", "Answer:", "the final answer is", "the answer is" (s1 extracts after "Answer:").
_MARKER = re.compile(r"(?:final\s+answer|answer)\s*(?::|is\b|=)", re.IGNORECASE)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


@dataclass(frozen=True)
class Verdict:
    """What grading one output found: the extracted answer (None: none found), gold, verdict."""

    extracted: str | None
    gold: str
    correct: bool

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Extraction


def answer_part(output: str) -> str:
    """The answer part of a whole assistant turn: the text after the last answer delimiter of any
    known model profile (the thinking may mention numbers that are not the answer)."""
    for profile in PROFILES.values():
        if profile.thinking_end in output:
            return output.rsplit(profile.thinking_end, 1)[1]
    return output


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
    return None


def after_marker(text: str) -> str | None:
    """The text after the last answer marker ("Final Answer:", "Answer:", "the answer is"), up to
    the end of its line; None when there is no marker or nothing follows it."""
    matches = list(_MARKER.finditer(text))
    for match in reversed(matches):
        rest = text[match.end() :].strip()
        if rest:
            line = rest.splitlines()[0].strip()
            return line or None
    return None


def last_number(text: str) -> str | None:
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def extract_answer(output: str, kind: str) -> str | None:
    """The answer an output gives, as text; None when it gives none."""
    _check_kind(kind)
    text = answer_part(output or "")
    if not text.strip():
        return None
    if kind == "choice":
        return _extract_choice(text)
    if kind == "exact":
        candidate = last_boxed(text) or after_marker(text) or next(line for line in text.splitlines() if line.strip())
        return candidate.strip()
    candidate = last_boxed(text)
    if candidate is None:
        candidate = after_marker(text)
    if candidate is None:
        return last_number(text)
    if kind in ("integer", "number"):
        return _first_number(candidate)
    return _clean_math(candidate) or None


def _first_number(text: str) -> str | None:
    numbers = _NUMBER.findall(text.replace("{,}", ","))
    return numbers[0] if numbers else None


def _clean_math(text: str) -> str:
    """A math answer without the sentence around it: ``$...$`` content, no trailing period."""
    text = text.strip()
    inline = re.findall(r"(?<!\\)\$\$?(.+?)(?<!\\)\$\$?", text)  # \$ is a dollar sign, not math
    if inline:
        text = inline[-1]
    text = re.sub(r"^\\\(|\\\)$|^\\\[|\\\]$", "", text.strip())
    return text.strip().rstrip(".").strip()


def _extract_choice(text: str) -> str | None:
    boxed = last_boxed(text)
    if boxed is not None:
        letter = re.search(r"\b([A-D])\b", re.sub(r"\\text\{([^}]*)\}", r"\1", boxed))
        if letter:
            return letter.group(1)
    marked = after_marker(text)
    if marked is not None:
        letter = re.match(r"[\s*(\[{$\\textbf]*\(?([A-D])\b", marked)
        if letter:
            return letter.group(1)
    # An option written as "(C)" or "C)" at the end of the reasoning.
    options = re.findall(r"\(([A-D])\)|\b([A-D])\)", text)
    if options:
        first, second = options[-1]
        return first or second
    return None


# --------------------------------------------------------------------------------------------
# Grading


def normalize_gold(raw: str, kind: str) -> str:
    """The gold answer as the grader compares it (GSM8K solutions keep only what follows ####)."""
    _check_kind(kind)
    gold = raw.strip()
    if kind == "number":
        if "####" in gold:
            gold = gold.rsplit("####", 1)[1].strip()
        return gold.replace(",", "")
    if kind == "integer":
        value = _as_decimal(gold)
        # finite and of at most 64 digits: int() of 1e999999999999 would build a trillion digits
        whole = value is not None and value.is_finite() and value.adjusted() < 64 and value == value.to_integral_value()
        return str(int(value)) if whole else gold
    if kind == "choice":
        return gold.upper()
    return gold


def grade(output: str, gold: str, kind: str) -> Verdict:
    """Grade one output: extract its answer and compare it with ``gold``."""
    extracted = extract_answer(output, kind)
    return Verdict(extracted=extracted, gold=gold, correct=extracted is not None and answers_match(extracted, gold, kind))


def answers_match(extracted: str, gold: str, kind: str) -> bool:
    """Whether an extracted answer equals the gold answer under the kind's rules."""
    _check_kind(kind)
    if kind == "choice":
        return extracted.strip().upper() == gold.strip().upper()
    if kind == "exact":
        return normalize_exact(extracted) == normalize_exact(gold)
    if kind in ("integer", "number"):
        value, reference = _as_decimal(extracted), _as_decimal(gold)
        if value is None or reference is None:
            return False
        if kind == "integer" and not (value.is_finite() and 0 <= value <= 999 and value == value.to_integral_value()):
            return False
        return value == reference
    return math_equal(extracted, gold)


def math_equal(extracted: str, gold: str) -> bool:
    """Symbolic equality with math-verify, else equality of normalised strings."""
    if _normalize_text(extracted) == _normalize_text(gold):
        return True
    from math_verify import parse, verify

    # math-verify's timeouts use signals, which only the main thread may set.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns when timeouts are off
    try:
        gold_parsed = parse(_as_latex(gold), parsing_timeout=timeout)
        pred_parsed = parse(_as_latex(extracted), parsing_timeout=timeout)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))
    except Exception:  # math-verify raises on odd inputs: that is not a match
        return False


def normalize_exact(text: str) -> str:
    """SQuAD's answer normalisation, and citations (``[2]``, ``[1][3]``) removed."""
    text = re.sub(r"\[\d+(?:\s*,\s*\d+)*\]", " ", text).lower()
    text = re.sub(r"[^\w\s]", " ", text)
    text = re.sub(r"\b(?:a|an|the)\b", " ", text)
    return " ".join(text.split())


def _as_latex(text: str) -> str:
    return text if re.search(r"(?<!\\)\$", text) else f"${text}$"


def _as_decimal(text: str) -> Decimal | None:
    text = text.strip().replace(",", "").replace("\\$", "").replace("$", "").rstrip(".")
    text = re.sub(r"\\%|%", "", text)
    try:
        return Decimal(text)
    except InvalidOperation:
        number = _first_number(text)
        if number is None:
            return None
        try:
            return Decimal(number.replace(",", ""))
        except InvalidOperation:
            return None


def _normalize_text(text: str) -> str:
    """A loose canonical form for answers math-verify does not parse (words, named options)."""
    text = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^}]*)\}", r"\1", text)
    text = re.sub(r"\\[dt]frac", r"\\frac", text)
    text = re.sub(r"\\left|\\right|\\!|\\,|\\;|\\ |\$", "", text)
    text = text.replace("^\\circ", "").replace("^{\\circ}", "")
    return re.sub(r"\s+", "", text).rstrip(".").lower()


def _check_kind(kind: str) -> None:
    if kind not in ANSWER_KINDS:
        raise UserError(f"Unknown answer kind {kind!r}; use one of {', '.join(ANSWER_KINDS)}.")
