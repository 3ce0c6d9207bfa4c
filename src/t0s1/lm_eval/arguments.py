"""The generation arguments of the ``t0s1`` harness model: s1's names and ours, one setting each.

``--model_args`` sets the defaults and each request's ``gen_kwargs`` (the task's
``generation_kwargs`` merged with ``--gen_kwargs``) overrides them. Both become one
``BudgetForcing``; an argument the engine does not know is an error, never ignored.

The harness's own arguments keep their meaning for the answer: ``until`` cuts the answer at the
first stop string, ``max_gen_toks`` caps the answer tokens (the thinking has its own budget).
Decoding follows s1's fork and the harness's vLLM model: ``temperature`` decides (0 is greedy),
so ``--gen_kwargs temperature=0.6`` samples even where a task config says ``do_sample: false``.
"""

from __future__ import annotations

from dataclasses import fields, replace

from t0s1.errors import UserError
from t0s1.forcing import BudgetForcing

S1_NAMES = {
    "max_tokens_thinking": "max_thinking_tokens",
    "thinking_n_ignore": "num_ignore",
    "thinking_n_ignore_str": "ignore_str",
    "max_gen_toks": "max_answer_tokens",  # the harness's own name for the answer's token cap
}
"""s1's fork's (and the harness's) names for ``BudgetForcing`` settings; every field of
``BudgetForcing`` is also accepted under its own name."""

SYNONYMS = {
    field.name: (field.name, *[s1 for s1, ours in S1_NAMES.items() if ours == field.name]) for field in fields(BudgetForcing)
}
"""Each ``BudgetForcing`` field and the names that set it: ours, then s1's / the harness's."""

_INTEGER_FIELDS = ("num_ignore", "max_answer_tokens", "seed")

_DELIMITERS = "the delimiters come from the chat template; set them with model_args reasoning_format=s1, think, ... or 'START,END'"
S1_ONLY = {
    "thinking_start": _DELIMITERS,
    "thinking_end": _DELIMITERS,
    "until_thinking": "the thinking stops at the model's own answer delimiter and end-of-turn tokens",
    "until_thinking_2": "the thinking stops at the model's own answer delimiter and end-of-turn tokens",
    "temperature_thinking": "one temperature applies to the thinking and the answer",
    "min_tokens_thinking": "after an ignored end of thinking the next token may not end it again; there is no other minimum",
    "rejection_sample": "rejection sampling is not supported",
}
"""s1's fork's arguments that t0s1 does not take, and why (an error says so)."""


def names(*, requests: bool) -> list[str]:
    """Every argument name accepted in model_args (``requests=False``) or in gen_kwargs."""
    accepted = [name for aliases in SYNONYMS.values() for name in aliases]
    return accepted + ["until", "do_sample"] if requests else accepted


def budget_from_arguments(arguments: dict, defaults: BudgetForcing, *, requests: bool) -> BudgetForcing:
    """``defaults`` with the settings named in ``arguments`` (s1's names or ours).

    ``requests``: the arguments are a request's gen_kwargs (else model_args, which take no
    ``until`` or ``do_sample``). ``until`` is read by ``stop_strings``; ``do_sample`` is only
    checked: ``temperature`` decides.
    """
    where = "gen_kwargs" if requests else "--model_args"
    unknown = [key for key in arguments if key not in names(requests=requests)]
    if unknown:
        raise UserError(_unknown_message(unknown, where, requests=requests))
    overrides = {}
    for field, aliases in SYNONYMS.items():
        given = {alias: arguments[alias] for alias in aliases if alias in arguments}
        if len({repr(value) for value in given.values()}) > 1:
            written = " and ".join(f"{alias}={value!r}" for alias, value in given.items())
            raise UserError(f"{where}: {written} set the same thing ({field}); give one of them.")
        if given:
            overrides[field] = _coerce(field, next(iter(given.values())))
    budget = replace(defaults, **overrides)
    if arguments.get("do_sample") is True and budget.greedy:
        raise UserError(f"{where}: do_sample=True with temperature 0 is greedy decoding; give a temperature > 0 to sample.")
    if arguments.get("do_sample") not in (None, True, False):
        raise UserError(f"{where}: do_sample must be true or false, got {arguments['do_sample']!r}.")
    return budget


def stop_strings(gen_kwargs: dict) -> list[str]:
    """The request's ``until`` as a list of non-empty strings (they cut the answer)."""
    until = gen_kwargs.get("until")
    if until is None:
        return []
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, list | tuple) or not all(isinstance(s, str) for s in until):
        raise UserError(f"gen_kwargs: until must be a string or a list of strings, got {until!r}.")
    return [s for s in until if s]


def _coerce(field: str, value):
    """Numbers typed on a command line may arrive as text ("1024"): read them as numbers."""
    if isinstance(value, str) and field in (*_INTEGER_FIELDS, "max_thinking_tokens"):
        text = value.strip()
        if field == "max_thinking_tokens" and text.lower() == "auto":
            return "auto"
        if text.lstrip("-").isdigit():
            return int(text)
    if isinstance(value, str) and field in ("temperature", "top_p"):
        try:
            return float(value)
        except ValueError:
            pass
    return value  # BudgetForcing checks the value and names the setting if it is wrong


def _unknown_message(unknown: list[str], where: str, *, requests: bool) -> str:
    lines = []
    for key in unknown:
        reason = S1_ONLY.get(key)
        lines.append(f"{key} ({reason})" if reason else key)
    accepted = ", ".join(names(requests=requests))
    return f"{where}: unknown argument(s) for the t0s1 model: {'; '.join(lines)}. Accepted: {accepted}."
