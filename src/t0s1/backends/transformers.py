"""The transformers backend: the project's budget forcing engine, ``t0s1.forcing``."""

from __future__ import annotations

from collections.abc import Sequence

from t0s1.backends import Backend
from t0s1.forcing import BudgetForcing, Prompt, Result, generate, generate_sweep
from t0s1.models import LoadedModel, load_model


class TransformersBackend(Backend):
    name = "transformers"

    def __init__(self, lm: LoadedModel):
        self.lm = lm
        self.model_name = lm.name

    @classmethod
    def load(cls, model: str, *, device="auto", dtype="auto", reasoning_format=None, trust_remote_code=False) -> TransformersBackend:
        return cls(load_model(model, device=device, dtype=dtype, reasoning_format=reasoning_format, trust_remote_code=trust_remote_code))

    def generate(self, prompts: Sequence[Prompt], budgets: BudgetForcing | Sequence[BudgetForcing]) -> list[Result]:
        return generate(self.lm, list(prompts), budgets, chat_template_kwargs=self.chat_template_kwargs)

    def sweep(self, prompts: Sequence[Prompt], settings: Sequence[BudgetForcing]) -> list[list[Result]]:
        """One thinking trace per prompt; every setting forks off it (``generate_sweep``)."""
        return generate_sweep(self.lm, list(prompts), list(settings), chat_template_kwargs=self.chat_template_kwargs)

    @property
    def shares_prefix(self) -> bool:
        return True
