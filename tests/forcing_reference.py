"""The slow reference for budget forcing: s1's own loop, which re-runs generation from scratch on the
whole id sequence after every intervention (one prompt at a time, ``model.generate``).

Written independently of the engine (only the prompt rendering is shared) so that comparing the
two checks the engine's batching, KV-cache continuation and bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from t0s1.forcing import BudgetForcing, render_prompt
from t0s1.models import LoadedModel


@dataclass
class ReferenceResult:
    thinking_token_ids: list[int]
    answer_token_ids: list[int]
    num_ignored: int
    hit_budget: bool


def _encode(lm: LoadedModel, text: str) -> list[int]:
    return lm.tokenizer(text, add_special_tokens=False).input_ids


def _continue(lm: LoadedModel, ids: list[int], *, max_new_tokens: int, stop: set[int], min_new_tokens: int = 0):
    """Greedy continuation of ``ids`` from scratch; returns (new ids without the stop, stopped?)."""
    oov = list(range(len(lm.tokenizer), lm.model.config.vocab_size))
    out = lm.model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        do_sample=False,
        eos_token_id=sorted(stop),
        pad_token_id=lm.tokenizer.pad_token_id,
        suppress_tokens=oov or None,
    )
    new = out[0, len(ids) :].tolist()
    if new and new[-1] in stop:
        return new[:-1], True
    return new, False


def reference_generate(lm: LoadedModel, prompt: str, settings: BudgetForcing) -> ReferenceResult:
    im_start = lm.tokenizer.convert_tokens_to_ids("<|im_start|>")
    im_end = lm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    end_of_turn = {im_end, lm.tokenizer.eos_token_id}
    stop_thinking = end_of_turn | {im_start}
    prompt_ids = render_prompt(lm, prompt)
    ignore = _encode(lm, settings.ignore_str)
    budget = settings.max_thinking_tokens
    thinking: list[int] = []
    num_ignored = 0
    ban_stop = False
    while True:
        remaining = budget - len(thinking)
        if remaining <= 0:
            stopped = False
            break
        new, stopped = _continue(
            lm, prompt_ids + thinking, max_new_tokens=remaining, stop=stop_thinking, min_new_tokens=int(ban_stop)
        )
        thinking += new
        if not stopped:
            break  # the budget is spent
        if num_ignored < settings.num_ignore and len(thinking) + len(ignore) < budget:
            thinking += ignore
            num_ignored += 1
            ban_stop = True
            continue
        break
    if stopped:
        answer_prefix: list[int] = []
        sequence = prompt_ids + thinking + _encode(lm, "<|im_start|>answer")
    else:
        last = lm.tokenizer.decode(thinking[-1:]) if thinking else "<|im_start|>think"
        newline = "" if last.endswith("\n") else "\n"
        forced = _encode(lm, newline + "<|im_start|>answer\nFinal Answer:")
        answer_prefix = forced[forced.index(im_start) + len(_encode(lm, "<|im_start|>answer")) :]
        sequence = prompt_ids + thinking + forced
    answer, _ = _continue(lm, sequence, max_new_tokens=settings.max_answer_tokens, stop=end_of_turn)
    return ReferenceResult(thinking, answer_prefix + answer, num_ignored, not stopped)
