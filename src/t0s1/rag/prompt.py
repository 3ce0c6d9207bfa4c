"""The prompt that makes a model reason over retrieved sources.

One user message: the instructions (answer from the sources, cite them by number, say
"inconclusive" when none answers), the numbered sources (``[1] Title (score 0.83)`` then the
text), then the question. Sources are packed best first so that the prompt, the thinking budget
and the answer fit the model's context; when they do not, the lowest-ranked sources are dropped
first and the count of dropped ones is reported. A source longer than ``max_source_tokens`` is
given as its best chunks instead of the whole document.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from t0s1.errors import UserError
from t0s1.forcing import BudgetForcing
from t0s1.rag.retrievers import Hit

INCONCLUSIVE = "inconclusive"
"""What the model is told to answer when no source answers the question (t0's evaluation
accepts it as an answer)."""

INSTRUCTIONS = (
    "Answer the question using the numbered sources below. Cite the sources you use by their "
    "numbers in square brackets, e.g. [1]. If none of the sources answers the question, say that "
    f"the answer is {INCONCLUSIVE} and why."
)

DELIMITER_TOKENS = 32
"""Room kept for what the engine adds around the thinking (its start and forced-end delimiters)."""

MAX_SOURCE_TOKENS = 768
"""A source document longer than this (in the generator's tokens) is given as its best chunks."""


@dataclass
class RagPrompt:
    """A packed prompt: ``messages`` for ``t0s1.generate``; ``sources`` are the hits it holds,
    numbered from 1 in this order; ``dropped`` lowest-ranked hits did not fit."""

    messages: list[dict]
    sources: list[Hit]
    dropped: int
    prompt_tokens: int
    question: str = ""
    reserved_tokens: int = 0


def reserve_tokens(settings: BudgetForcing, context_length: int) -> int:
    """Tokens to keep free after the prompt: the thinking budget, the answer and the delimiters.

    With ``max_thinking_tokens="auto"`` the thinking takes whatever the prompt leaves, so the
    sources may fill at most half of the context."""
    answer = settings.max_answer_tokens + DELIMITER_TOKENS
    if settings.max_thinking_tokens == "auto":
        return max(context_length // 2, answer)
    return settings.max_thinking_tokens + answer


def format_source(number: int, hit: Hit, content: str) -> str:
    return f"[{number}] {hit.title} (score {hit.score:.3f})\n{content.strip()}"


def source_content(hit: Hit, tokenizer, max_source_tokens: int = MAX_SOURCE_TOKENS) -> str:
    """The whole document, or when it is longer than ``max_source_tokens``: its best chunks (in
    document order; chunks that overlap are joined into one passage, "…" marks a gap), or its
    beginning for a document given without chunks (a gold document of the ceiling run), so one long
    document cannot push every source out of the prompt."""
    ids = tokenizer(hit.text, add_special_tokens=False).input_ids
    if len(ids) <= max_source_tokens:
        return hit.text
    if not hit.chunks:
        return tokenizer.decode(ids[:max_source_tokens], skip_special_tokens=True).rstrip("\ufffd").rstrip() + "\n…"
    spans: list[list[int]] = []  # the chunks' spans in document order, overlapping or touching ones merged
    for chunk in sorted(hit.chunks, key=lambda chunk: chunk.start):
        if spans and chunk.start <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], chunk.end)
        else:
            spans.append([chunk.start, chunk.end])
    return "\n…\n".join(hit.text[start:end].strip() for start, end in spans)


def user_message(question: str, sources: list[str]) -> str:
    body = "\n\n".join(sources) if sources else "(no sources were found)"
    return f"{INSTRUCTIONS}\n\nSources:\n\n{body}\n\nQuestion: {question.strip()}"


def build_rag_messages(
    tokenizer,
    question: str,
    hits: list[Hit],
    *,
    context_length: int,
    reserved: int,
    history: list[dict] | None = None,
    max_source_tokens: int = MAX_SOURCE_TOKENS,
) -> RagPrompt:
    """Chat messages asking ``question`` over ``hits`` (best first), packed to leave ``reserved``
    tokens of ``context_length`` free (see ``reserve_tokens``). ``history``: earlier messages of
    a conversation; the sources and question become the last user message.

    A ``UserError`` if the question (with the history) does not fit even without sources."""
    if not isinstance(question, str) or not question.strip():
        raise UserError("The question is empty: give the question to answer.")
    history = list(history or [])
    contents = [source_content(hit, tokenizer, max_source_tokens) for hit in hits]
    room = context_length - reserved

    def render(count: int) -> tuple[list[dict], int]:
        formatted = [format_source(i + 1, hit, text) for i, (hit, text) in enumerate(zip(hits[:count], contents))]
        messages = history + [{"role": "user", "content": user_message(question, formatted)}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return messages, len(tokenizer(text, add_special_tokens=False).input_ids)

    # The most sources that fit, best first: the prompt grows with each source, so a binary search
    # renders it about log2(len(hits)) times (a long conversation with many sources took seconds).
    count = len(hits)
    messages, length = render(count)
    if length > room and count > 0:
        fits, over = 0, count  # render(fits) is tried below; render(over) is too long
        while over - fits > 1:
            middle = (fits + over) // 2
            if render(middle)[1] <= room:
                fits = middle
            else:
                over = middle
        count = fits
        messages, length = render(count)
    if length > room:
        raise UserError(
            f"The question{' and the conversation' if history else ''} take {length} tokens; with {reserved} tokens kept for "
            f"thinking and answer, the model's context of {context_length} has no room. Shorten it or lower the budget."
        )
    return RagPrompt(messages, list(hits[:count]), len(hits) - count, length, question, reserved)


_CITATION = re.compile(r"\[(\d+)\]")


def cited_sources(text: str, num_sources: int) -> list[int]:
    """The source numbers cited in ``text`` as ``[n]`` (in order of first citation, valid ones)."""
    numbers = []
    for match in _CITATION.finditer(text):
        number = int(match.group(1))
        if 1 <= number <= num_sources and number not in numbers:
            numbers.append(number)
    return numbers


def is_inconclusive(answer: str) -> bool:
    return INCONCLUSIVE in answer.lower()
