"""Backends: one small interface over the engines that run budget forcing.

- ``transformers`` and ``llamacpp``: the project's own engine (``t0s1.forcing``) on a PyTorch model
  or, for GGUF files, on llama.cpp; prefix-sharing sweeps. ``auto`` picks llama.cpp for a GGUF
  file (the embedded default included) when there is no GPU, transformers otherwise.
- ``vllm``: vLLM offline inference (GPU only; vLLM is an optional dependency).
- ``openai``: any OpenAI-compatible completions endpoint (``vllm serve``, ``t0s1 serve``), with
  budget forcing driven from the client, as t0 drove ``vllm serve``.

Every backend returns the engine's ``Result`` objects, so evaluation and serving treat them alike.
The vLLM and OpenAI backends re-submit the sequence after each intervention, as s1's engine did;
the decisions are the engine's own (``t0s1.forcing_rules``), driven by ``t0s1.backends.client_forcing``.
"""

from __future__ import annotations

from t0s1.backends.base import Backend
from t0s1.errors import UserError

ENGINE_BACKENDS = ("auto", "transformers", "llamacpp")
"""Backends that run the project's engine in this process (``auto``: llama.cpp for a GGUF file
without a GPU, else transformers; see ``t0s1.models.choose_backend``)."""
BACKENDS = (*ENGINE_BACKENDS, "vllm", "openai")


def make_backend(
    name: str,
    model: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    base_url: str | None = None,
    api_key: str | None = None,
    tokenizer: str | None = None,
    reasoning_format: str | None = None,
    trust_remote_code: bool = False,
    chat_template_kwargs: dict | None = None,
    context_length: int | None = None,
) -> Backend:
    """The backend called ``name`` for ``model`` (a model name, directory or served model name).
    ``context_length``: for ``openai``, the served model's context when its server does not say."""
    if context_length is not None and name != "openai":
        raise UserError(f"--context-length is for --backend openai; the {name} backend knows its model's context.")
    backend = _make_backend(name, model, device=device, dtype=dtype, base_url=base_url, api_key=api_key, tokenizer=tokenizer,
                            reasoning_format=reasoning_format, trust_remote_code=trust_remote_code,
                            context_length=context_length)
    backend.chat_template_kwargs = chat_template_kwargs
    return backend


def _make_backend(name, model, *, device, dtype, base_url, api_key, tokenizer, reasoning_format, trust_remote_code,
                  context_length) -> Backend:
    if name in ENGINE_BACKENDS:
        from t0s1.backends.engine import EngineBackend

        if base_url:
            raise UserError(f"--base-url is for --backend openai; the {name} backend runs the model here.")
        return EngineBackend.load(model, backend=name, device=device, dtype=dtype, reasoning_format=reasoning_format,
                                  trust_remote_code=trust_remote_code)
    if name == "vllm":
        from t0s1.backends.vllm import VLLMBackend

        return VLLMBackend.load(model, dtype=dtype, reasoning_format=reasoning_format, trust_remote_code=trust_remote_code)
    if name == "openai":
        from t0s1.backends.openai_compat import OpenAIBackend

        if not base_url:
            raise UserError("--backend openai needs --base-url, e.g. http://localhost:8000/v1 (vllm serve or t0s1 serve).")
        return OpenAIBackend.connect(
            base_url, model, api_key=api_key, tokenizer=tokenizer, reasoning_format=reasoning_format,
            trust_remote_code=trust_remote_code, context_length=context_length,
        )
    raise UserError(f"Unknown backend {name!r}; use one of {', '.join(BACKENDS)}.")
