"""The transformers releases t0s1 runs on: the oldest one, and the keyword a model's ``forward``
takes the KV cache under (it changed in 5.24).

Both ``t0s1.models`` (which refuses a model the engine cannot drive when it loads it) and
``t0s1.forcing`` (whose runner passes the cache on every step) need these facts, so they live in a
module of their own that imports nothing of the project but its errors.
"""

from __future__ import annotations

import inspect
import weakref

from t0s1.errors import UserError

TRANSFORMERS_FLOOR = "5.16.1"
"""The oldest transformers the tests run on (the vLLM tests, as vLLM requires it); pyproject.toml's floor."""

CACHE_ARGUMENTS = ("cache", "past_key_values")
"""The names a model's ``forward`` takes the KV cache under: ``cache`` from transformers 5.24,
``past_key_values`` before. Each release ignores the other name silently (``**kwargs``), so the
engine reads which one the model's own signature has (``cache_argument``)."""

_cache_arguments: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cache_argument(model) -> str:
    """The keyword ``model.forward`` takes the KV cache under (one of ``CACHE_ARGUMENTS``), read
    from its signature once per model. A model that takes neither is refused with the fix."""
    name = _cache_arguments.get(model)
    if name is None:
        check_takes_cache(model)
        parameters = inspect.signature(model.forward).parameters
        name = _cache_arguments[model] = next(n for n in CACHE_ARGUMENTS if n in parameters)
    return name


def check_takes_cache(model) -> None:
    """The engine continues every sequence from its KV cache; a model whose forward takes it under
    no name the engine knows would silently see one token per step. Refuse it with the fix."""
    import transformers

    parameters = inspect.signature(model.forward).parameters
    if not any(name in parameters for name in CACHE_ARGUMENTS):
        raise UserError(
            f"{type(model).__name__}.forward (transformers {transformers.__version__}) takes the KV cache under none of "
            f"{', '.join(CACHE_ARGUMENTS)}, so budget forcing cannot continue from it. Install transformers>={TRANSFORMERS_FLOOR}: "
            f"pip install 'transformers>={TRANSFORMERS_FLOOR}'."
        )
