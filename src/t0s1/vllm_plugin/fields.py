"""The per-request budget fields of the vLLM plugin, read from a request's ``SamplingParams``.

t0s1's names travel in ``vllm_xargs`` (the ``openai`` client's ``extra_body={"vllm_xargs": {...}}``),
which vLLM hands to logits processors as ``SamplingParams.extra_args``; vLLM's own
``thinking_token_budget`` is a top-level request field. No vLLM import here: these are plain
checks over dicts, shared by the frontend (``validate_params``: a 400) and the engine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from t0s1.errors import UserError
from t0s1.forcing_rules import BudgetForcing

FIELDS = ("max_thinking_tokens", "num_ignore", "ignore_str", "max_answer_tokens", "end_phrase", "answer_prefix")
"""t0s1's fields in ``vllm_xargs`` (``BudgetForcing``'s names)."""

VLLM_BUDGET = "thinking_token_budget"
"""vLLM's own name of the thinking budget (a top-level request field; also accepted in vllm_xargs)."""

MOVED_BUDGET = "t0s1_thinking_token_budget"
"""Where the frontend moves a top-level ``thinking_token_budget`` that t0s1 serves (see
``logits_processor.BudgetForcingLogitsProcessor.validate_params``)."""

# A vllm_xargs key that says it is about thinking or its budget but is not one of ours: refused
# rather than ignored (a misplaced budget is the most common complaint about thinking budgets).
BUDGET_LIKE = re.compile(r"think|reason|budget|effort|ignore|wait|answer_tokens", re.IGNORECASE)


class FieldError(ValueError):
    """A request field the plugin cannot honour; vLLM turns a ValueError from ``validate_params``
    into a 400."""


@dataclass(frozen=True)
class RequestBudget:
    """What one request asked for: the settings, and whether the budget was given at all (a
    request with only ``num_ignore`` thinks as long as the context allows)."""

    settings: BudgetForcing
    budget_given: bool


def request_budget(extra_args: dict | None, thinking_token_budget: int | None = None) -> RequestBudget | None:
    """The budget forcing a request asks for, or None (a plain vLLM request). Raises FieldError
    for an unknown budget-like field, a bad value, or budget aliases that disagree."""
    extra = dict(extra_args or {})
    moved = extra.pop(MOVED_BUDGET, None)
    if moved is not None:
        thinking_token_budget = moved
    unknown = sorted(name for name in extra if name not in FIELDS and name != VLLM_BUDGET and BUDGET_LIKE.search(name))
    if unknown:
        raise FieldError(
            f"vllm_xargs.{unknown[0]} is not a field t0s1's budget forcing knows, and it looks like a thinking setting: "
            f"it is refused rather than ignored. Use {', '.join(FIELDS)} in vllm_xargs, or vLLM's top-level "
            f"{VLLM_BUDGET}."
        )
    given = {name: extra[name] for name in FIELDS if extra.get(name) is not None}
    budgets = [(f"vllm_xargs.{name}", extra[name]) for name in ("max_thinking_tokens", VLLM_BUDGET) if extra.get(name) is not None]
    if thinking_token_budget is not None:
        budgets.append((VLLM_BUDGET, thinking_token_budget))
    for name, value in budgets[1:]:
        if value != budgets[0][1]:
            shown = " and ".join(f"{n}={v!r}" for n, v in budgets)
            raise FieldError(f"{shown} disagree: they all set the thinking budget; give one.")
    if not given and not budgets:
        return None
    if budgets:
        given["max_thinking_tokens"] = budgets[0][1]
    for name in ("num_ignore", "max_answer_tokens"):
        value = given.get(name)
        if isinstance(value, float) and value.is_integer():  # JSON numbers may arrive as 3.0
            given[name] = int(value)
    if isinstance(given.get("max_thinking_tokens"), float) and given["max_thinking_tokens"].is_integer():
        given["max_thinking_tokens"] = int(given["max_thinking_tokens"])
    budget_given = "max_thinking_tokens" in given
    given.setdefault("max_thinking_tokens", "auto")
    # No answer cap unless one is asked for: the request's max_tokens bounds the reply, as in plain vLLM.
    given.setdefault("max_answer_tokens", UNCAPPED_ANSWER)
    try:
        return RequestBudget(BudgetForcing(**given), budget_given)
    except UserError as error:
        raise FieldError(f"{error} (in vllm_xargs, or {VLLM_BUDGET})") from None


UNCAPPED_ANSWER = 2**31 - 1
"""``max_answer_tokens`` of a request that gives none: the request's ``max_tokens`` ends the answer."""


#: vLLM sampling fields that act after the processor has chosen the token, with their no-op values.
AFTER_THE_CHOICE = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "min_p": 0.0}


def check_sampling(params) -> None:
    """Refuse sampling fields a budget-forced request would ignore: the processor draws the token
    itself (the engine's rule), and vLLM applies its penalties and ``min_p`` after it, to a row
    with one possible token."""
    for name, neutral in AFTER_THE_CHOICE.items():
        value = getattr(params, name, neutral)
        if value is not None and value != neutral:
            raise FieldError(f"{name}={value!r} has no effect on a budget-forced request: t0s1 chooses each token before "
                             f"vLLM applies it. Leave {name} out, or send the request without budget fields.")

