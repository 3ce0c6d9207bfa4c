"""Teachers: the models that write questions (``rag synth-questions``) and reasoning traces over
retrieved sources (``rag traces``).

- ``OpenAITeacher``: any OpenAI-compatible chat endpoint (``t0s1 serve``, ``vllm serve``, a hosted
  API), through the official ``openai`` client. The reasoning is read from the reply's
  ``reasoning_content`` (t0s1 serve, vLLM, DeepSeek) or ``reasoning`` field, else from a
  ``<think>...</think>`` block at the start of the content.
- ``LocalTeacher``: a model run here by the budget forcing engine (``t0s1.generate``).

A teacher answers a batch of ``TeacherRequest`` with one ``TeacherReply`` each. A request that
fails (the endpoint refused it, the reply holds no answer) gets a reply whose ``error`` says why,
so one bad row never stops a file halfway.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from t0s1.errors import UserError
from t0s1.forcing import BudgetForcing
from t0s1.profiles import THINK
from t0s1.rag.questions import RagQuestion
from t0s1.rag.retrievers import Hit


@dataclass(frozen=True)
class TeacherRequest:
    """What a teacher is asked: chat ``messages``; the ``question`` and numbered ``sources`` they
    were made from (a teacher that knows the facts reads these instead of the text)."""

    messages: list[dict]
    question: RagQuestion | None = None
    sources: tuple[Hit, ...] = ()


@dataclass(frozen=True)
class TeacherReply:
    thinking: str = ""
    answer: str = ""
    error: str | None = None


class Teacher(ABC):
    name: str = "teacher"

    @abstractmethod
    def reply(self, requests: list[TeacherRequest]) -> list[TeacherReply]:
        """One reply per request, in order; failures are replies with an ``error``."""


def split_reasoning(content: str, reasoning: str | None = None) -> tuple[str, str]:
    """(thinking, answer) of a chat reply: the separate reasoning field when the server gives
    one, else a ``<think>...</think>`` block in the content (the ``think`` profile's delimiters)."""
    if reasoning and reasoning.strip():
        return reasoning.strip(), THINK.split(content)[1] if THINK.thinking_end in content else content.strip()
    return THINK.split(content)


_BARE_PREFIX = re.compile(r"^\W*(?:final\s+)?answer\s*:?\W*$", re.IGNORECASE)


MAX_REPLY_CHARS = 1_000_000
"""The longest teacher reply taken (thinking and answer together); a longer one is an error reply."""


def checked_reply(thinking: str, answer: str, *, cut: bool = False) -> TeacherReply:
    """The reply, or an error when it holds no answer (nothing, or only "Final Answer:"), when its
    answer was ``cut`` by the token limit (a sentence broken off would be trained on as the answer),
    or when it is longer than ``MAX_REPLY_CHARS``."""
    if len(thinking) + len(answer) > MAX_REPLY_CHARS:
        return TeacherReply(error=f"the teacher's reply has {len(thinking) + len(answer):,} characters; at most "
                                  f"{MAX_REPLY_CHARS:,} are taken")
    if cut and answer.strip():
        return TeacherReply(thinking, "", "the teacher's answer was cut by its token limit (finish_reason length): "
                                          "raise the teacher's max tokens")
    if not answer.strip() or _BARE_PREFIX.match(answer):
        reason = "the teacher's reply holds no answer" + (" (only thinking: it may have run out of tokens)" if thinking else "")
        return TeacherReply(thinking, "", reason)
    return TeacherReply(thinking.strip(), answer.strip())


class OpenAITeacher(Teacher):
    """A model behind an OpenAI-compatible ``/v1/chat/completions``.

    ``budget``: t0s1 serve's budget forcing fields for the teacher's thinking (``max_thinking_tokens``,
    ``num_ignore``), sent as extra body fields only when given (other servers may refuse them).
    """

    def __init__(
        self,
        model: str,
        base_url: str,
        api_key: str | None = None,
        *,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        budget: dict | None = None,
        concurrency: int = 8,
        timeout: float = 600.0,
        client=None,
    ):
        import openai

        self.name = model
        self.model, self.max_tokens, self.temperature = model, max_tokens, temperature
        self.budget = {key: value for key, value in (budget or {}).items() if value is not None}
        self.concurrency = max(1, concurrency)
        self.client = client or openai.OpenAI(
            base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY", timeout=timeout, max_retries=2
        )

    def reply(self, requests: list[TeacherRequest]) -> list[TeacherReply]:
        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests))) as pool:
            return list(pool.map(self._one, requests))

    def _one(self, request: TeacherRequest) -> TeacherReply:
        import openai

        options = {"temperature": self.temperature}
        if self.max_tokens is not None:
            options["max_tokens"] = self.max_tokens
        try:
            response = self.client.chat.completions.create(
                model=self.model, messages=request.messages, extra_body=self.budget or None, **options
            )
        except openai.APIConnectionError as error:
            return TeacherReply(error=f"could not reach the teacher ({error})")
        except openai.APIError as error:
            return TeacherReply(error=f"the teacher's endpoint refused the request ({type(error).__name__}: {_first_line(error)})")
        if not response.choices:
            return TeacherReply(error="the teacher's reply has no choices")
        choice = response.choices[0]
        message = choice.message
        reasoning = getattr(message, "reasoning_content", None) or getattr(message, "reasoning", None)
        thinking, answer = split_reasoning(message.content or "", reasoning if isinstance(reasoning, str) else None)
        return checked_reply(thinking, answer, cut=choice.finish_reason == "length")


class LocalTeacher(Teacher):
    """A model loaded here (``t0s1.load_model``), generating with budget forcing in batches."""

    def __init__(self, lm, settings: BudgetForcing | None = None, *, batch_size: int = 8):
        self.lm, self.settings = lm, settings or BudgetForcing()
        self.name, self.batch_size = lm.name, max(1, batch_size)

    def reply(self, requests: list[TeacherRequest]) -> list[TeacherReply]:
        from t0s1.forcing import generate

        replies = []
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start : start + self.batch_size]
            try:
                results = generate(self.lm, [request.messages for request in batch], self.settings)
            except UserError as error:  # e.g. one prompt too long for the model: retry one by one
                if len(batch) == 1:
                    replies.append(TeacherReply(error=str(error)))
                    continue
                replies += [self.reply([request])[0] for request in batch]
                continue
            replies += [checked_reply(result.thinking, result.answer, cut=result.finish_reason == "length") for result in results]
        return replies


def make_teacher(
    model: str,
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    settings: BudgetForcing | None = None,
    budget_fields: dict | None = None,
    max_tokens: int | None = None,
    temperature: float = 0.0,
    device: str = "auto",
    dtype: str = "auto",
    reasoning_format: str | None = None,
) -> Teacher:
    """An ``OpenAITeacher`` when ``base_url`` is given, else a ``LocalTeacher`` loading ``model``."""
    if base_url:
        return OpenAITeacher(model, base_url, api_key, max_tokens=max_tokens, temperature=temperature, budget=budget_fields)
    from t0s1.models import load_model

    return LocalTeacher(load_model(model, device=device, dtype=dtype, reasoning_format=reasoning_format), settings)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__
