"""Budget forcing driven from outside the model: re-submit the sequence after each intervention.

This is how s1's engine used vLLM and how t0 drove ``vllm serve``: ask for thinking until a stop
token or the rest of the budget, then decide (``BudgetForcing.may_ignore``) whether to append the
ignore string and ask again, or to close the thinking (the answer delimiter, or
``ReasoningFormat.forced_end`` when the budget ran out), and finally ask for the answer.

A backend supplies ``complete(requests) -> completions``: one continuation per request, all of a
round at once (vLLM batches them, the OpenAI backend sends them concurrently). Token ids are
concatenated, never re-tokenised, where the backend returns ids.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from t0s1.forcing import (
    BudgetForcing,
    Result,
    StopRule,
    encode,
    find_ids,
    ids_after,
    render_prompt_ids,
)
from t0s1.reasoning_format import ReasoningFormat


@dataclass
class Request:
    """Continue ``ids`` for at most ``max_tokens`` tokens, stopping at any of ``stop_ids``.

    min_tokens=1 forbids a stop token as the first token (after an injected ignore string).
    seed: the sampling seed of this request (None under greedy decoding).
    """

    ids: list[int]
    max_tokens: int
    stop_ids: list[int]
    min_tokens: int
    settings: BudgetForcing
    seed: int | None


@dataclass
class Completion:
    """The generated ids without the stop token; ``stopped``: ended on a stop token."""

    ids: list[int]
    stopped: bool


Complete = Callable[[list[Request]], list[Completion]]


@dataclass
class _Sequence:
    prompt_ids: list[int]
    settings: BudgetForcing
    max_thinking: int
    seed: int | None
    thinking_ids: list[int] = field(default_factory=list)
    close_ids: list[int] = field(default_factory=list)  # delimiter (and forced "Final Answer:")
    forced_answer_ids: list[int] = field(default_factory=list)  # "Final Answer:" part of the result
    answer_ids: list[int] = field(default_factory=list)
    num_ignored: int = 0
    hit_budget: bool = False
    min_tokens: int = 0
    phase: str = "thinking"  # thinking -> answer -> done
    finish_reason: str | None = None
    seconds: float = 0.0


class ClientForcing:
    """The s1 rules over a ``complete`` function. ``tokenizer`` renders prompts and decodes."""

    def __init__(self, tokenizer, reasoning_format: ReasoningFormat, complete: Complete, *, context_length: int | None, vocab_size: int | None = None):
        self.tokenizer = tokenizer
        self.format = reasoning_format
        self.complete = complete
        self.context_length = context_length
        rule = StopRule.for_tokenizer(tokenizer, reasoning_format)  # the engine's own stop rule
        self.end_ids = set(rule.end_of_turn)
        self.answer_delimiter = list(rule.answer_delimiter)
        self.stop_ids = sorted(rule.stop_ids)
        self.written_delimiter = list(rule.written_delimiter) if rule.written_delimiter else None

    def encode(self, text: str) -> list[int]:
        return encode(self.tokenizer, text)

    def render(self, prompt) -> list[int]:
        """Chat template with the generation prompt, then the thinking delimiter (as the engine)."""
        return render_prompt_ids(self.tokenizer, self.format, prompt)

    def resolve_budget(self, settings: BudgetForcing, prompt_length: int) -> int:
        return settings.thinking_budget(
            prompt_length=prompt_length,
            context_length=self.context_length,
            forced_end_length=len(self.encode(self.format.forced_end(""))),
        )

    def generate(self, prompts: Sequence, budgets: Sequence[BudgetForcing]) -> list[Result]:
        started = time.perf_counter()
        rendered = [self.render(prompt) for prompt in prompts]
        longest = max((len(ids) for ids in rendered), default=0)  # "auto" is set by the longest prompt (s1)
        sequences = []
        for ids, settings in zip(rendered, budgets, strict=True):
            seed = None if settings.greedy else settings.seed
            sequences.append(_Sequence(ids, settings, self.resolve_budget(settings, longest), seed))
        for sequence in sequences:
            if sequence.max_thinking == 0:
                self._force_answer(sequence)
        while True:
            active = [s for s in sequences if s.phase != "done"]
            if not active:
                break
            completions = self.complete([self._request(s) for s in active])
            for sequence, completion in zip(active, completions, strict=True):
                if sequence.phase == "thinking":
                    self._think(sequence, completion)
                else:
                    self._answer(sequence, completion)
                if sequence.phase == "done":
                    sequence.seconds = time.perf_counter() - started
        return [self._result(s) for s in sequences]

    # ---- one round for one sequence -----------------------------------------------------------

    def _request(self, s: _Sequence) -> Request:
        if s.phase == "thinking":
            ids = s.prompt_ids + s.thinking_ids
            return Request(ids, s.max_thinking - len(s.thinking_ids), self.stop_ids, s.min_tokens, s.settings, s.seed)
        ids = s.prompt_ids + s.thinking_ids + s.close_ids + s.answer_ids
        return Request(ids, s.settings.max_answer_tokens, sorted(self.end_ids), 0, s.settings, s.seed)

    def _think(self, s: _Sequence, completion: Completion) -> None:
        s.thinking_ids += completion.ids
        s.min_tokens = 0
        written = self.written_delimiter
        end = find_ids(s.thinking_ids, written) if written else None
        if end is not None:
            # The model wrote the (multi-token) delimiter itself: the thinking ends there.
            s.thinking_ids, s.close_ids, s.phase = s.thinking_ids[:end], list(written), "answer"
            return
        if completion.stopped:
            may_ignore = s.settings.may_ignore(
                thinking_tokens=len(s.thinking_ids),
                num_ignored=s.num_ignored,
                ignore_length=len(self._ignore_ids(s.settings)),
                max_thinking=s.max_thinking,
            )
            if may_ignore:
                s.thinking_ids += self._ignore_ids(s.settings)
                s.num_ignored += 1
                s.min_tokens = 1  # the next token may not end the thinking again
            else:
                s.close_ids, s.phase = list(self.answer_delimiter), "answer"
        elif len(s.thinking_ids) >= s.max_thinking:
            self._force_answer(s)
        else:
            s.phase, s.finish_reason = "done", "length"  # the backend ran out of context

    def _force_answer(self, s: _Sequence) -> None:
        last = self.tokenizer.decode(s.thinking_ids[-1:]) if s.thinking_ids else ""
        s.close_ids = self.encode(self.format.forced_end(last))
        s.forced_answer_ids = ids_after(s.close_ids, self.answer_delimiter)
        s.hit_budget, s.phase = True, "answer"

    def _answer(self, s: _Sequence, completion: Completion) -> None:
        s.answer_ids += completion.ids
        s.phase = "done"
        s.finish_reason = "stop" if completion.stopped else "length"

    def _ignore_ids(self, settings: BudgetForcing) -> list[int]:
        return self.encode(settings.ignore_str) if settings.ignore_str else []

    def _result(self, s: _Sequence) -> Result:
        decode = self.tokenizer.decode
        answer_ids = s.forced_answer_ids + s.answer_ids
        return Result(
            thinking=decode(s.thinking_ids, skip_special_tokens=False).strip(),
            answer=decode(answer_ids, skip_special_tokens=False).strip(),
            thinking_tokens=len(s.thinking_ids),
            answer_tokens=len(s.answer_ids),
            num_ignored=s.num_ignored,
            hit_budget=s.hit_budget,
            finish_reason=s.finish_reason or "length",
            prompt_tokens=len(s.prompt_ids),
            seconds=s.seconds,
            thinking_token_ids=list(s.thinking_ids),
            answer_token_ids=answer_ids,
        )
