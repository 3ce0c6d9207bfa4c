"""The slow reference for budget forcing: s1's own loop, which re-runs generation from scratch on the
whole id sequence after every intervention (one prompt at a time, ``model.generate``).

Written independently of the engine (only the prompt rendering is shared) so that comparing the
two checks the engine's batching, KV-cache continuation and bookkeeping, for every model profile:
s1's ``<|im_start|>think`` / ``<|im_start|>answer``, ``<think>`` / ``</think>`` (one token or
several ordinary ones), and templates that open the thinking in the generation prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from t0s1.forcing import BudgetForcing, render_prompt
from t0s1.models import LoadedModel


@dataclass
class ReferenceResult:
    thinking_token_ids: list[int]
    answer_token_ids: list[int]
    num_ignored: int
    hit_budget: bool


def _encode(lm: LoadedModel, text: str) -> list[int]:
    return lm.tokenizer(text, add_special_tokens=False).input_ids if text else []


class _TextWritten(StoppingCriteria):
    """Stop once the decoded tail of the generated ids contains ``text``."""

    def __init__(self, tokenizer, text: str, start: int):
        self.tokenizer, self.text, self.start = tokenizer, text, start

    def __call__(self, input_ids, scores, **kwargs):
        tail = self.tokenizer.decode(input_ids[0, self.start :][-12:], skip_special_tokens=False)
        return torch.tensor([self.text in tail])


def _continue(lm: LoadedModel, ids: list[int], *, max_new_tokens: int, stop: set[int], min_new_tokens: int = 0,
              stop_text: str | None = None):
    """Greedy continuation of ``ids`` from scratch; returns (new ids without the stop, stopped?)."""
    oov = list(range(len(lm.tokenizer), lm.model.config.vocab_size))
    criteria = StoppingCriteriaList([_TextWritten(lm.tokenizer, stop_text, len(ids))]) if stop_text else None
    out = lm.model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        do_sample=False,
        eos_token_id=sorted(stop),
        pad_token_id=lm.tokenizer.pad_token_id,
        suppress_tokens=oov or None,
        stopping_criteria=criteria,
    )
    new = out[0, len(ids) :].tolist()
    if new and new[-1] in stop:
        return new[:-1], True
    return new, False


def _end_of_turn(lm: LoadedModel) -> set[int]:
    tokenizer = lm.tokenizer
    ids = {tokenizer.eos_token_id}
    eos = lm.model.generation_config.eos_token_id
    ids |= {eos} if isinstance(eos, int) else set(eos or [])
    if "<|im_end|>" in tokenizer.get_vocab():
        ids.add(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    return ids - {None}


def reference_generate(lm: LoadedModel, prompt, settings: BudgetForcing, chat_template_kwargs: dict | None = None) -> ReferenceResult:
    profile, tokenizer = lm.profile, lm.tokenizer
    end_of_turn = _end_of_turn(lm)
    end_ids = _encode(lm, profile.thinking_end)
    special = set(tokenizer.added_tokens_decoder)
    one_token_end = len(end_ids) == 1 or end_ids[0] in special
    stop_thinking = end_of_turn | ({end_ids[0]} if one_token_end else set())
    written = None if one_token_end else profile.thinking_end
    rendered = render_prompt(lm, prompt, chat_template_kwargs)
    prompt_ids = rendered.ids
    if not rendered.thinking:  # thinking off: answer right after the prompt
        answer, _ = _continue(lm, prompt_ids, max_new_tokens=settings.max_answer_tokens, stop=end_of_turn)
        return ReferenceResult([], answer, 0, False)
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
        new, stopped = _continue(lm, prompt_ids + thinking, max_new_tokens=remaining, stop=stop_thinking,
                                 min_new_tokens=int(ban_stop), stop_text=written)
        thinking += new
        if written and written in tokenizer.decode(thinking[-12:], skip_special_tokens=False):
            # The model wrote the end delimiter in ordinary tokens: cut it out, keep the text before it.
            for count in range(1, len(thinking) + 1):
                text = tokenizer.decode(thinking[-count:], skip_special_tokens=False)
                if written in text:
                    thinking = thinking[:-count] + _encode(lm, text[: text.index(written)])
                    break
            stopped = True
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
        sequence = prompt_ids + thinking + end_ids
    else:
        last = tokenizer.decode(thinking[-1:]) if thinking else ""
        newline = "" if last.endswith("\n") or (not thinking and profile.prefilled) else "\n"
        phrase = profile.end_phrase if settings.end_phrase is None else settings.end_phrase
        prefix = profile.answer_prefix if settings.answer_prefix is None else settings.answer_prefix
        close = _encode(lm, newline + (f"{phrase}\n" if phrase else "")) + end_ids
        answer_prefix = _encode(lm, profile.after_end + prefix)
        sequence = prompt_ids + thinking + close + answer_prefix
    answer, _ = _continue(lm, sequence, max_new_tokens=settings.max_answer_tokens, stop=end_of_turn)
    return ReferenceResult(thinking, answer_prefix + answer, num_ignored, not stopped)
