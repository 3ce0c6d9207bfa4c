"""Reasoning over sources: retrieve, pack the sources into the prompt, think with budget forcing.

``ask(lm, index, question, settings)`` does the whole path for one question and
``ask_many`` for a batch (one ``generate`` call). A server or chat does the same in two calls it
can interleave with its own batching: ``retrieve_sources`` then ``build_rag_messages`` (see
docs/rag.md, "Calling it from a server").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from t0s1.errors import UserError
from t0s1.forcing import BudgetForcing, DeltaCallback, Result, generate, resolve_budget
from t0s1.rag.prompt import RagPrompt, build_rag_messages, cited_sources, is_inconclusive, reserve_tokens
from t0s1.rag.retrievers import Hit, Retriever, check_k
from t0s1.rag.store import Index


MAX_REQUEST_SOURCES = 64
"""Sources a request (or a server's default) may ask for: each is searched, packed and tokenized."""


class RagRequest(BaseModel):
    """Retrieval settings of one request (the ``rag`` object of a chat request's extra body)."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(5, ge=0, le=MAX_REQUEST_SOURCES, description="How many sources to retrieve; 0 turns retrieval off "
                   f"(at most {MAX_REQUEST_SOURCES}).")
    retriever: Literal["bm25", "dense", "hybrid"] | None = Field(
        None, description="bm25, dense or hybrid (reciprocal rank fusion); default: the one the index was built for."
    )


def retrieve_sources(index: Index, query: str, k: int = 5, retriever: str | Retriever | None = None) -> list[Hit]:
    """The ``k`` best documents for ``query``, best first (``k = 0``: none). ``retriever``: a
    name, or a ``Retriever`` (e.g. a ``RerankedRetriever``); default: the index's own."""
    k = check_k(k)
    if k == 0:
        return []
    if isinstance(retriever, Retriever):
        return retriever.search(query, k)
    return index.search(query, k, retriever)


@dataclass
class RagAnswer:
    """A reply reasoned over sources: the generation ``result`` and the ``prompt`` it came from
    (its ``sources`` are the ones the model saw, numbered from 1)."""

    prompt: RagPrompt
    result: Result
    settings: BudgetForcing
    thinking_budget: int
    retrieved: int

    @property
    def question(self) -> str:
        return self.prompt.question

    @property
    def answer(self) -> str:
        return self.result.answer

    @property
    def thinking(self) -> str:
        return self.result.thinking

    @property
    def sources(self) -> list[Hit]:
        return self.prompt.sources

    @property
    def cited(self) -> list[int]:
        """Numbers of the sources the answer cites as ``[n]``."""
        return cited_sources(self.result.answer, len(self.sources))

    @property
    def inconclusive(self) -> bool:
        return is_inconclusive(self.result.answer)

    def source_dicts(self, snippet_chars: int = 300) -> list[dict]:
        cited = set(self.cited)
        return [
            {"number": i, **hit.to_dict(snippet_chars=snippet_chars), "cited": i in cited}
            for i, hit in enumerate(self.sources, start=1)
        ]

    def to_dict(self) -> dict:
        return {
            "question": self.question,
            **self.result.to_dict(),
            "max_thinking_tokens": self.settings.max_thinking_tokens,
            "thinking_budget": self.thinking_budget,
            "num_ignore": self.settings.num_ignore,
            "max_answer_tokens": self.settings.max_answer_tokens,
            "sources": self.source_dicts(),
            "retrieved_sources": self.retrieved,
            "dropped_sources": self.prompt.dropped,
            "cited": self.cited,
            "inconclusive": self.inconclusive,
        }


def ask(
    lm,
    index: Index,
    question: str,
    settings: BudgetForcing | None = None,
    *,
    k: int = 5,
    retriever: str | Retriever | None = None,
    on_delta: DeltaCallback | None = None,
) -> RagAnswer:
    """Answer one question from the ``k`` best sources of ``index`` with budget forcing."""
    return ask_many(lm, index, [question], settings, k=k, retriever=retriever, on_delta=on_delta)[0]


def ask_many(
    lm,
    index: Index,
    questions: Sequence[str],
    settings: BudgetForcing | None = None,
    *,
    k: int = 5,
    retriever: str | Retriever | None = None,
    on_delta: DeltaCallback | None = None,
    progress: bool = False,
) -> list[RagAnswer]:
    """``ask`` for many questions, generated as one batch."""
    if isinstance(questions, str):
        raise UserError("ask_many takes a list of questions; use ask for one.")
    settings = settings or BudgetForcing()
    reserved = reserve_tokens(settings, lm.context_length)
    prompts, retrieved = [], []
    for question in questions:
        if not isinstance(question, str) or not question.strip():
            raise UserError("A question is empty: give the question to answer.")
        hits = retrieve_sources(index, question, k, retriever)
        retrieved.append(len(hits))
        prompts.append(build_rag_messages(lm.tokenizer, question, hits, context_length=lm.context_length, reserved=reserved))
    results = generate(lm, [prompt.messages for prompt in prompts], settings, on_delta=on_delta, progress=progress)
    # The engine sizes an "auto" budget by the call's longest prompt.
    budget = resolve_budget(lm, settings, max(result.prompt_tokens for result in results))
    return [
        RagAnswer(prompt, result, settings, budget, count)
        for prompt, result, count in zip(prompts, results, retrieved, strict=True)
    ]
