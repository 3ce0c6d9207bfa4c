"""One request of a vLLM batch under budget forcing: a t0s1 ``Sequence`` kept in step with vLLM.

A logits processor sees the logits of the next token before vLLM samples it, and can only narrow
what vLLM may sample. So the row decides the next token itself, and lets vLLM sample only that:

- an id the rules already decided (the thinking start, an ignore string, a delimiter, the forced
  end) is forced;
- otherwise the model's own choice is taken from the logits (the argmax under greedy decoding,
  a draw from the same distribution under sampling). When that choice is the end of the thinking,
  the rules decide before it is emitted: with ignores left the end token is masked and the ignore
  string forced in its place, else the end delimiter is forced. Under greedy decoding this is
  exactly what t0s1's engine does after sampling the end token.

The decision is committed to the ``Sequence`` only when vLLM's output list has grown by it (a step
can be dropped, e.g. a chunk of a long prefill), so every vLLM step and every decision stay paired.
The output list may hold -1 placeholders (asynchronous scheduling): the row never needs to read a
token it decided itself, and checks the real ids when they are there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from t0s1.forcing_rules import ForcingRules, RenderedPrompt, Sequence

logger = logging.getLogger(__name__)

Choose = Callable[[frozenset], int]
"""``choose(banned)``: the model's next token from this row's logits, never one of ``banned``."""


@dataclass
class _Pending:
    token: int  # what vLLM is made to emit
    sequence: Sequence | None  # the state after it (None: the current one, advanced by ``model``)
    model: int | None = None  # a token of the model to accept on commit
    offset: int | None = None  # the new offset between vLLM's positions and the sequence's


class ForcedRow:
    """Budget forcing for one request. ``output`` is vLLM's live list of the request's output ids."""

    def __init__(self, rules: ForcingRules, sequence: Sequence, *, prompt_length: int, output: list[int], end_ids: list[int]):
        self.rules = rules
        self.sequence = sequence
        self.prompt_length = prompt_length  # vLLM's prompt (the sequence may add the thinking start)
        self.output = output
        self.end_ids = end_ids  # what ends the request in vLLM (forced when the answer is capped)
        self.confirmed = 0  # output entries accounted for
        self.offset = 0  # vLLM position - sequence position (a written end delimiter shifts them)
        self.pending: _Pending | None = None
        self.detached = False
        # How the model's own tokens are chosen (set by the logits processor from the request).
        self.greedy = True
        self.params = None
        self.generator = None

    @classmethod
    def start(cls, rules: ForcingRules, settings, prompt_ids: list[int], output: list[int], *, max_thinking_for: Callable,
              end_ids: list[int]) -> ForcedRow:
        """A row for a request whose prompt is ``prompt_ids`` (what vLLM rendered). The thinking
        start is forced first unless the prompt opened the thinking itself, or closed it."""
        prompt = rendered_prompt(rules, prompt_ids)
        max_thinking = max_thinking_for(settings, len(prompt.ids)) if prompt.thinking else 0
        sequence = Sequence(rules, 0, settings, max_thinking, prompt)
        row = cls(rules, sequence, prompt_length=len(prompt_ids), output=output, end_ids=end_ids)
        row.replay()  # a resumed request brings the ids it generated before
        return row

    # ---- vLLM emitted what was decided ----------------------------------------------------------

    def sync(self) -> None:
        """Account for the output ids vLLM added since the last decision."""
        count = len(self.output)
        if self.pending is not None:
            pending, self.pending = self.pending, None
            if count > self.confirmed:
                real = self.output[self.confirmed]
                if real not in (-1, pending.token):
                    self._detach(f"vLLM emitted {real} where budget forcing decided {pending.token}")
                    return
                self._commit(pending)
                self.confirmed += 1
        self.replay()

    def replay(self) -> None:
        """Output ids that no decision of this row produced (a request re-added after preemption):
        take them as the model's, as the engine would have."""
        while self.confirmed < len(self.output) and not self.detached:
            token = self.output[self.confirmed]
            if token < 0:
                self._detach("an output id is not known yet for a request the plugin has not followed")
                return
            position = self.prompt_length + self.confirmed - self.offset
            sequence = self.sequence
            if position < len(sequence.ids):
                if sequence.ids[position] != token:
                    self._detach(f"the output holds {token} where budget forcing decided {sequence.ids[position]}")
                    return
            elif sequence.done:
                pass
            else:
                sequence.accept(token)
                if sequence.take_rewind() is not None:
                    self.offset = self.prompt_length + self.confirmed + 1 - len(sequence.ids)
            self.confirmed += 1

    def _commit(self, pending: _Pending) -> None:
        if pending.sequence is not None:
            self.sequence = pending.sequence
        elif pending.model is not None:
            self.sequence.accept(pending.model)
        if pending.offset is not None:
            self.offset = pending.offset

    def _detach(self, why: str) -> None:
        logger.warning("t0s1 budget forcing stops for a request: %s; vLLM goes on without it.", why)
        self.detached = True

    # ---- the next token -------------------------------------------------------------------------

    def decide(self, choose: Choose) -> int | None:
        """The id vLLM must emit next, or None (leave the row alone)."""
        self.pending = None
        if self.detached:
            return None
        sequence = self.sequence
        position = self.prompt_length + self.confirmed - self.offset
        if sequence.done:
            last = self.output[-1] if self.output else None
            if last in self.end_ids:
                return None
            return self.end_ids[0]  # the answer reached max_answer_tokens (or the model ended it): end the request
        if position < len(sequence.ids):
            self.pending = _Pending(sequence.ids[position], None)
            return self.pending.token
        token = choose(sequence.banned_ids())
        if sequence.thinking and (token in self.rules.stop_ids or self._completes_written_end(token)):
            self.pending = self._end_of_thinking(token, position, choose)
        else:
            self.pending = _Pending(token, None, model=token)
        return self.pending.token

    def _completes_written_end(self, token: int) -> bool:
        if self.rules.written_end is None:
            return False
        return self.rules.written_end_at(self.sequence.thinking_ids + [token]) is not None

    def _end_of_thinking(self, token: int, position: int, choose: Choose) -> _Pending:
        """The model ends its thinking with ``token``: let the rules decide on a copy, and emit the
        first id of what they appended (the ignore string or the end delimiter) instead."""
        after = _copy(self.sequence)
        after.accept(token)
        rewound = after.take_rewind()
        vllm_position = self.prompt_length + self.confirmed
        if rewound is None:
            if len(after.ids) > position:
                return _Pending(after.ids[position], after)
            # An empty ignore string: the model goes on thinking with the end token banned.
            following = choose(after.banned_ids())
            after.accept(following)
            return _Pending(following, after)
        # An end delimiter written in ordinary tokens: vLLM cannot take back the pieces already
        # emitted, so they stay in the reply. At a natural end the last piece is emitted and stands
        # for the delimiter; when the end is ignored the last piece is replaced by the ignore string.
        if after.thinking:
            start = len(after.ids) - len(self.rules.ignore_ids(after.settings))
            if start < len(after.ids):
                return _Pending(after.ids[start], after, offset=vllm_position - start)
        return _Pending(token, after, offset=vllm_position + 1 - len(after.ids))


def _copy(sequence: Sequence) -> Sequence:
    """A copy of ``sequence`` that can be advanced without touching it."""
    copy = Sequence.__new__(Sequence)
    copy.__dict__.update(sequence.__dict__)
    copy.ids, copy.thinking_ids, copy.answer_ids = list(sequence.ids), list(sequence.thinking_ids), list(sequence.answer_ids)
    copy.riders = list(sequence.riders)
    copy.streams = None
    return copy


def rendered_prompt(rules: ForcingRules, prompt_ids: list[int]) -> RenderedPrompt:
    """vLLM's prompt as the engine would have rendered it: the thinking start appended unless the
    template already opened the thinking, or closed it (``render_prompt_ids``'s rule, on ids)."""
    from t0s1.forcing_rules import _ends_with

    profile = rules.profile
    tail = rules.tokenizer.decode(prompt_ids[-32:], skip_special_tokens=False)
    if _ends_with(tail, profile.thinking_end):
        return RenderedPrompt(list(prompt_ids), thinking=False)
    if _ends_with(tail, profile.thinking_start):
        return RenderedPrompt(list(prompt_ids))
    return RenderedPrompt(list(prompt_ids) + rules.ids(profile.thinking_start))
