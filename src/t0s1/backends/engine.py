"""The engine backends: the project's own budget forcing engine (``t0s1.forcing``) on a model that
``load_model`` loaded, with PyTorch (``transformers``) or llama.cpp (``llamacpp``, GGUF files)."""

from __future__ import annotations

from collections.abc import Sequence

from t0s1.backends.base import Backend
from t0s1.forcing import BudgetForcing, Prompt, Result, generate, generate_sweep
from t0s1.models import LoadedModel, load_model


class EngineBackend(Backend):
    """Budget forcing in this process, continuing every sequence from its KV cache; sweeps share
    the thinking. ``name`` is the model's runtime: ``transformers`` or ``llamacpp``."""

    def __init__(self, lm: LoadedModel):
        self.lm = lm
        self.model_name = lm.name
        self.name = lm.backend

    @classmethod
    def load(cls, model: str, *, backend: str = "auto", device="auto", dtype="auto", reasoning_format=None,
             trust_remote_code=False) -> EngineBackend:
        return cls(load_model(model, device=device, dtype=dtype, reasoning_format=reasoning_format,
                              trust_remote_code=trust_remote_code, backend=backend))

    def generate(self, prompts: Sequence[Prompt], budgets: BudgetForcing | Sequence[BudgetForcing]) -> list[Result]:
        return generate(self.lm, list(prompts), budgets, chat_template_kwargs=self.chat_template_kwargs)

    def sweep(self, prompts: Sequence[Prompt], settings: Sequence[BudgetForcing]) -> list[list[Result]]:
        """One thinking trace per prompt; every setting forks off it (``generate_sweep``)."""
        return generate_sweep(self.lm, list(prompts), list(settings), chat_template_kwargs=self.chat_template_kwargs)

    @property
    def shares_prefix(self) -> bool:
        return True
