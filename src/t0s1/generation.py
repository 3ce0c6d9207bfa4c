"""``t0s1.generate``: budget forcing alone, or a test-time policy over it."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from t0s1.errors import UserError
from t0s1.forcing import DeltaCallback
from t0s1.forcing import generate as generate_with_budget
from t0s1.forcing_rules import BudgetForcing, Prompt
from t0s1.policies import Policy, make_policy
from t0s1.policies.run import generate_with_policy


def generate(
    lm,
    prompts: Sequence[Prompt],
    budget: BudgetForcing | Sequence[BudgetForcing] | None = None,
    *,
    policy: Policy | str | None = None,
    chat_template_kwargs: dict | None = None,
    on_delta: DeltaCallback | None = None,
    is_cancelled: Callable[[int], bool] | None = None,
    progress: bool = False,
):
    """Generate with budget forcing for every prompt (``t0s1.forcing.generate``: one ``Result``
    per prompt). With ``policy`` (a ``t0s1.policies.Policy`` or a name such as "deepconf"), run that
    test-time policy over budget forcing instead: one ``PolicyResult`` per prompt (the voted
    answer, every trace, the tokens spent)."""
    if policy is None:
        return generate_with_budget(lm, prompts, budget, chat_template_kwargs=chat_template_kwargs, on_delta=on_delta,
                                    is_cancelled=is_cancelled, progress=progress)
    if on_delta is not None or is_cancelled is not None:
        raise UserError("on_delta and is_cancelled are not available with a policy: its traces are decided together.")
    if not (budget is None or isinstance(budget, BudgetForcing)):
        raise UserError("With a policy give one BudgetForcing for every prompt (trace j of each is sampled with seed + j).")
    chosen = make_policy(policy) if isinstance(policy, str) else policy
    return generate_with_policy(lm, prompts, budget, chosen, chat_template_kwargs=chat_template_kwargs, progress=progress)
