"""A test model whose output you choose: it writes a given list of token ids, token by token.

``ScriptedLM`` has what the engine reads (a tokenizer, a profile, the forcing rules, a context
length, ``new_runner``); its runner's logits pick the next id from a table ``{context: id}``
(the context being every id fed so far, the prompt included), and the end of turn where the table
has nothing. ``ScriptedLM.write(prompt, settings, script)`` builds the table that makes the model
write ``script`` under ``settings``: the rules are driven as an engine drives them (a token is
sampled only when nothing is left to feed; a stop id that the rules ban right after an ignore
string is replaced by ``filler``), and each sampled token is recorded against the ids before it.
The model is a plain function of its context, so every engine (and every consumer of the
streamed text) runs it unchanged.
"""

from __future__ import annotations

import torch

from t0s1.forcing_rules import BudgetForcing, ForcingRules, RenderedPrompt
from t0s1.profiles import ModelProfile

CONTEXT_LENGTH = 4096


class ScriptedLM:
    def __init__(self, tokenizer, profile: ModelProfile, *, name: str = "scripted"):
        self.tokenizer = tokenizer
        self.profile = profile
        self.name = name
        self.backend = "scripted"
        self.rules = ForcingRules(tokenizer, profile, context_length=CONTEXT_LENGTH)
        self.context_length = CONTEXT_LENGTH
        self.vocab_size = len(tokenizer)
        self.end_of_turn = min(self.rules.end_of_turn)
        self.filler = tokenizer(" so", add_special_tokens=False).input_ids[0]
        self.table: dict[tuple[int, ...], int] = {}

    def write(self, prompt: RenderedPrompt, settings: BudgetForcing, script: list[int]) -> None:
        """Make the model write ``script`` (then the end of turn) after ``prompt`` under ``settings``."""
        sequence = self.rules.sequence(0, prompt, settings)
        tokens = iter(script)
        while not sequence.done:
            token = next(tokens, self.end_of_turn)
            if token in sequence.banned_ids():
                token = self.filler
            self.table[tuple(sequence.ids)] = token
            sequence.accept(token)
            sequence.take_rewind()

    def next_token(self, context: list[int]) -> int:
        return self.table.get(tuple(context), self.end_of_turn)

    def new_runner(self, rows: int | None = None, length: int | None = None) -> ScriptedRunner:
        return ScriptedRunner(self)


class ScriptedRunner:
    """The engine's runner interface over a ``ScriptedLM``: one context per slot."""

    def __init__(self, lm: ScriptedLM):
        self.lm = lm
        self.contexts: dict[int, list[int]] = {}
        self.next_slot = 0

    def _logits(self, slots: list[int]) -> torch.Tensor:
        logits = torch.zeros((len(slots), self.lm.vocab_size))
        for b, slot in enumerate(slots):
            logits[b, self.lm.next_token(self.contexts[slot])] = 10.0
        return logits

    def add(self, prompts: list[list[int]]) -> tuple[list[int], torch.Tensor]:
        slots = []
        for prompt in prompts:
            slots.append(self.next_slot)
            self.contexts[self.next_slot] = list(prompt)
            self.next_slot += 1
        return slots, self._logits(slots)

    def step(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        for slot, token in zip(slots, tokens, strict=True):
            self.contexts[slot].append(token)
        return self._logits(slots)

    def fork(self, slot: int) -> int:
        self.contexts[self.next_slot] = list(self.contexts[slot])
        self.next_slot += 1
        return self.next_slot - 1

    def rollback(self, slot: int, count: int) -> None:
        del self.contexts[slot][len(self.contexts[slot]) - count :]

    def release(self, slot: int) -> None:
        self.contexts.pop(slot)

    def close(self) -> None:
        self.contexts.clear()
