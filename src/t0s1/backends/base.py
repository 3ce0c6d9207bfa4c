"""The interface every backend implements (``t0s1.backends`` picks one by name).

It lives apart from the package's ``__init__`` so that the backends import it without importing the
factory that imports them: every arrow between the backends points one way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from t0s1.forcing import BudgetForcing, Prompt, Result


class Backend(ABC):
    """Generate with budget forcing. Subclasses implement ``generate``; ``sweep`` defaults to one
    ``generate`` call per setting (the transformers backend shares the thinking prefix instead)."""

    name: str = "backend"
    model_name: str = ""
    chat_template_kwargs: dict | None = None
    """Passed to the chat template of every prompt (e.g. ``{"enable_thinking": False}``)."""

    @abstractmethod
    def generate(self, prompts: Sequence[Prompt], budgets: BudgetForcing | Sequence[BudgetForcing]) -> list[Result]:
        """One result per prompt; ``budgets`` is one setting, or one per prompt."""

    def sweep(self, prompts: Sequence[Prompt], settings: Sequence[BudgetForcing]) -> list[list[Result]]:
        """``results[prompt][setting]`` for greedy settings that differ in budget or num_ignore."""
        per_setting = [self.generate(prompts, setting) for setting in settings]
        return [[per_setting[j][i] for j in range(len(settings))] for i in range(len(prompts))]

    @property
    def shares_prefix(self) -> bool:
        """Whether ``sweep`` costs about as much as its largest setting alone."""
        return False
