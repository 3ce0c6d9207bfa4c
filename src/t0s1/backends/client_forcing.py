"""Budget forcing driven from outside the model: re-submit the sequence after each intervention.

This is how s1's engine used vLLM and how t0 drove ``vllm serve``: ask for thinking until a stop
token or the rest of the budget, and hand what came back to the same decisions the engine makes
(``t0s1.forcing_rules.Sequence``): it appends the ignore string and asks again, closes the thinking
(the end delimiter, or the forced end when the budget ran out), and finally asks for the answer.

A backend supplies ``complete(requests) -> completions``: one continuation per request, all of a
round at once (vLLM batches them, the OpenAI backend sends them concurrently). Token ids are
concatenated, never re-tokenised, where the backend returns ids.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from t0s1.forcing_rules import BudgetForcing, ForcingRules, RenderedPrompt, Result, render_prompt_ids
from t0s1.forcing_rules import Sequence as ForcedSequence
from t0s1.profiles import ModelProfile


@dataclass
class Request:
    """Continue ``ids`` for at most ``max_tokens`` tokens, stopping at any of ``stop_ids`` (or, for
    a delimiter written in ordinary tokens, at ``stop_text``).

    min_tokens=1 forbids a stop token as the first token (after an injected ignore string).
    seed: the sampling seed of this request (None under greedy decoding).
    """

    ids: list[int]
    max_tokens: int
    stop_ids: list[int]
    min_tokens: int
    settings: BudgetForcing
    seed: int | None
    stop_text: str | None = None


@dataclass
class Completion:
    """The generated ids without the stop token; ``stopped``: ended on a stop token."""

    ids: list[int]
    stopped: bool


Complete = Callable[[list[Request]], list[Completion]]


class ClientForcing:
    """The s1 rules over a ``complete`` function. ``tokenizer`` renders prompts and decodes."""

    def __init__(self, tokenizer, profile: ModelProfile, complete: Complete, *, context_length: int | None, generation_config=None):
        self.tokenizer = tokenizer
        self.profile = profile
        self.complete = complete
        self.rules = ForcingRules(tokenizer, profile, generation_config, context_length=context_length)

    @property
    def context_length(self) -> int | None:
        return self.rules.context_length

    def render(self, prompt, chat_template_kwargs: dict | None = None) -> RenderedPrompt:
        """Chat template with the generation prompt, then the thinking start (as the engine)."""
        return render_prompt_ids(self.tokenizer, self.profile, prompt, chat_template_kwargs)

    def generate(self, prompts: Sequence, budgets: Sequence[BudgetForcing], *, chat_template_kwargs: dict | None = None) -> list[Result]:
        started = time.perf_counter()
        sequences = [
            self.rules.sequence(i, self.render(prompt, chat_template_kwargs), settings)
            for i, (prompt, settings) in enumerate(zip(prompts, budgets, strict=True))
        ]
        finished_at = {}
        while True:
            for s in sequences:  # no room left in the context: what a server would refuse to continue
                if not s.done and self.context_length is not None and len(s.ids) >= self.context_length:
                    s.finish_reason = "length"
                    finished_at[s.index] = time.perf_counter() - started
            active = [s for s in sequences if not s.done]
            if not active:
                break
            completions = self.complete([self._request(s) for s in active])
            for sequence, completion in zip(active, completions, strict=True):
                self._take(sequence, completion)
                if sequence.done:
                    finished_at[sequence.index] = time.perf_counter() - started
        return [s.result(finished_at.get(s.index, 0.0)) for s in sequences]

    def _request(self, s: ForcedSequence) -> Request:
        seed = None if s.settings.greedy else s.settings.seed
        stop_text = self.rules.written_end if s.thinking else None
        max_tokens = s.tokens_left()
        if self.context_length is not None:  # prompt + max_tokens within the context, as vLLM requires
            max_tokens = min(max_tokens, self.context_length - len(s.ids))
        return Request(list(s.ids), max_tokens, sorted(s.stop_ids()), int(s.ban_stop), s.settings, seed, stop_text)

    def _take(self, s: ForcedSequence, completion: Completion) -> None:
        """Hand the continuation to the rules, token by token, until they intervene (what the
        backend generated after that point is not part of the sequence)."""
        for token in completion.ids:
            expected = len(s.ids) + 1
            phase, ignored = s.thinking, s.num_ignored
            s.accept(token)
            rewound = s.take_rewind()  # the next request re-submits ``s.ids`` as they are now
            # An intervention: the phase changed, an end was ignored (a written delimiter cut and
            # the ignore string appended can leave the length as it was), or ids were added or cut.
            if s.done or s.thinking != phase or s.num_ignored != ignored or rewound is not None or len(s.ids) != expected:
                return
        if completion.stopped:
            s.accept_stop()
        elif not completion.ids and not s.done:
            s.finish_reason = "length"  # nothing more came back: the backend ran out of context
        # Otherwise the backend stopped at its max_tokens with tokens left here: the text it returned
        # may re-encode to fewer ids than it generated. The next round asks for the rest (the
        # context check above ends a sequence that has no room left).
