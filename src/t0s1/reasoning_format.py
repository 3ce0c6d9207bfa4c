"""The one definition of how a model writes its reasoning: delimiters per model family.

prepare (training data), train (the saved chat template), generate (budget forcing) and serve
(separating reasoning from the answer) all read the delimiters from here.

- ChatML models (Qwen, SmolLM2, anything whose chat template uses ``<|im_start|>``) think
  between ``<|im_start|>think`` and ``<|im_start|>answer``, exactly as s1 does.
- Other models use ``<think>`` ... ``</think>`` (as t0 did for Gemma).
"""

from __future__ import annotations

from dataclasses import dataclass

from t0s1.errors import UserError

FORCED_ANSWER_PREFIX = "Final Answer:"
"""What budget forcing writes after the answer delimiter when the thinking budget runs out (s1)."""

ANSWER_PREFIX = "Answer: "
"""What s1 puts before a training answer that does not already contain "Answer:"."""


@dataclass(frozen=True)
class ReasoningFormat:
    """Delimiters around the thinking part of an assistant turn.

    The assistant turn is ``thinking_start + "\\n" + thinking + "\\n" + thinking_end + "\\n" + answer``.
    """

    name: str
    thinking_start: str
    thinking_end: str

    def assistant_content(self, thinking: str, answer: str) -> str:
        """The assistant message as s1 trains on it (thinking stripped, answer verbatim)."""
        return f"{self.thinking_start}\n{thinking.strip()}\n{self.thinking_end}\n{answer}"

    def forced_end(self, thinking_so_far: str) -> str:
        """Text appended when the thinking budget is reached (s1): close thinking, force an answer."""
        newline = "" if thinking_so_far.endswith("\n") else "\n"
        return f"{newline}{self.thinking_end}\n{FORCED_ANSWER_PREFIX}"

    def split(self, assistant_text: str) -> tuple[str, str]:
        """Split a whole assistant turn into (thinking, answer); no delimiters -> ("", text)."""
        text = assistant_text
        if self.thinking_start in text:
            text = text.split(self.thinking_start, 1)[1]
        elif self.thinking_end not in text:
            return "", assistant_text.strip()
        thinking, _, answer = text.partition(self.thinking_end)
        return thinking.strip(), answer.strip()


CHATML = ReasoningFormat("chatml", "<|im_start|>think", "<|im_start|>answer")
THINK_TAGS = ReasoningFormat("think-tags", "<think>", "</think>")
FORMATS = {fmt.name: fmt for fmt in (CHATML, THINK_TAGS)}


def reasoning_format_for(tokenizer, override: str | ReasoningFormat | None = None) -> ReasoningFormat:
    """The reasoning format of a model: the override if given, else by its chat template.

    ``override`` is a name (``chatml``, ``think-tags``), a ``ReasoningFormat``, or a custom pair
    written ``"START,END"`` (e.g. ``"<reasoning>,</reasoning>"``).
    """
    if isinstance(override, ReasoningFormat):
        return override
    if override:
        if override in FORMATS:
            return FORMATS[override]
        start, sep, end = override.partition(",")
        if not sep or not start.strip() or not end.strip():
            raise UserError(
                f"Unknown reasoning format {override!r}: use one of {sorted(FORMATS)} "
                "or a custom pair written 'START,END'."
            )
        return ReasoningFormat("custom", start.strip(), end.strip())
    template = getattr(tokenizer, "chat_template", None) or ""
    if "<|im_start|>" in template or "<|im_start|>" in tokenizer.get_vocab():
        return CHATML
    return THINK_TAGS
