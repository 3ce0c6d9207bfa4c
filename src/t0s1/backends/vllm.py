"""The vLLM backend: offline inference with ``vllm.LLM`` (GPU only; ``pip install 't0s1[vllm]'``).

Budget forcing is driven from here (``client_forcing``): every round submits the token ids of
all unfinished sequences as ``{"prompt_token_ids": ids}`` prompts, one ``SamplingParams`` each
(``max_tokens`` = the rest of the budget, ``stop_token_ids`` = the end of thinking, ``min_tokens``
= 1 after an injected "Wait", ``allowed_token_ids`` = the tokenizer's vocabulary, because the
embedding matrix is often larger and vLLM rejects ids it cannot decode when they are re-fed).
vLLM's prefix caching keeps re-submission cheap.
"""

from __future__ import annotations

from collections.abc import Sequence

from t0s1.backends import Backend
from t0s1.backends.client_forcing import ClientForcing, Completion, Request
from t0s1.errors import UserError
from t0s1.forcing_rules import BudgetForcing, Prompt, Result, per_prompt_settings
from t0s1.profiles import detect_profile


def _import_vllm():
    try:
        import vllm
    except ImportError:
        raise UserError(
            "The vllm backend needs vLLM (Linux with a CUDA GPU): pip install 't0s1[vllm]'. "
            "Use --backend transformers on this machine."
        ) from None
    return vllm


class VLLMBackend(Backend):
    name = "vllm"

    def __init__(self, llm, *, model_name: str = "", reasoning_format=None, sampling_params_class=None):
        """``llm``: a ``vllm.LLM`` (or anything with its ``generate`` and ``get_tokenizer``)."""
        self.llm = llm
        self.model_name = model_name
        self.sampling_params_class = sampling_params_class or _import_vllm().SamplingParams
        tokenizer = llm.get_tokenizer()
        self.vocab_size = len(tokenizer)
        context = getattr(getattr(getattr(llm, "llm_engine", None), "model_config", None), "max_model_len", None)
        self.forcing = ClientForcing(tokenizer, detect_profile(tokenizer, reasoning_format).profile, self._complete, context_length=context)

    @classmethod
    def load(cls, model: str, *, dtype="auto", reasoning_format=None, trust_remote_code=False) -> VLLMBackend:
        vllm = _import_vllm()
        llm = vllm.LLM(model=model, dtype=dtype, trust_remote_code=trust_remote_code, enable_prefix_caching=True)
        return cls(llm, model_name=model, reasoning_format=reasoning_format, sampling_params_class=vllm.SamplingParams)

    def generate(self, prompts: Sequence[Prompt], budgets: BudgetForcing | Sequence[BudgetForcing]) -> list[Result]:
        return self.forcing.generate(list(prompts), per_prompt_settings(budgets, len(prompts)), chat_template_kwargs=self.chat_template_kwargs)

    def _complete(self, requests: list[Request]) -> list[Completion]:
        allowed = list(range(self.vocab_size))
        params = [
            self.sampling_params_class(
                max_tokens=request.max_tokens,
                min_tokens=request.min_tokens,
                stop_token_ids=list(request.stop_ids),
                temperature=request.settings.temperature,
                top_p=request.settings.top_p,
                seed=request.seed,
                skip_special_tokens=False,
                allowed_token_ids=allowed,
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
