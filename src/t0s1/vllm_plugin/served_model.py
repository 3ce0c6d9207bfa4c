"""The served model as t0s1 sees it: its tokenizer (transformers), its reasoning profile, its rules.

Both halves of the plugin need it: the logits processor (engine process) and the reasoning parser
(API server process). The profile comes from t0s1's detection (``t0s1.profiles.detect_profile``) on
the served model's tokenizer, or from ``T0S1_REASONING_FORMAT`` (a profile name, or "START,END").
"""

from __future__ import annotations

import os
from functools import lru_cache

from t0s1.errors import UserError
from t0s1.forcing_rules import ForcingRules
from t0s1.profiles import Detection, detect_profile

FORMAT_VARIABLE = "T0S1_REASONING_FORMAT"


class ServedModel:
    def __init__(self, name: str, tokenizer, detection: Detection, rules: ForcingRules):
        self.name, self.tokenizer, self.detection, self.rules = name, tokenizer, detection, rules

    @property
    def profile(self):
        return self.detection.profile


@lru_cache(maxsize=8)
def served_model(path: str, revision: str | None = None, trust_remote_code: bool = False, context_length: int | None = None) -> ServedModel:
    """The tokenizer, profile and forcing rules of the model (or tokenizer) at ``path``. Raises
    UserError, naming the model, when its reasoning format cannot be told."""
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    override = os.environ.get(FORMAT_VARIABLE) or None
    try:
        detection = detect_profile(tokenizer, override)
    except UserError as error:
        raise UserError(
            f"t0s1 cannot tell the reasoning format of the served model {path!r}: {error} "
            f"Set {FORMAT_VARIABLE} (s1, think, think-hybrid, think-prefilled, or 'START,END') to serve it with t0s1."
        ) from None
    try:
        generation_config = GenerationConfig.from_pretrained(path, revision=revision)
    except (OSError, ValueError):  # a model without generation_config.json
        generation_config = None
    rules = ForcingRules(tokenizer, detection.profile, generation_config, context_length=context_length)
    return ServedModel(path, tokenizer, detection, rules)


def served_model_for(model_config) -> ServedModel:
    """``served_model`` for a vLLM ``ModelConfig``."""
    return served_model(
        model_config.tokenizer,
        getattr(model_config, "tokenizer_revision", None),
        bool(getattr(model_config, "trust_remote_code", False)),
        getattr(model_config, "max_model_len", None),
    )
