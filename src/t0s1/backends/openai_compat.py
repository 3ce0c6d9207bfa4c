"""The OpenAI-compatible backend: budget forcing driven from the client over ``/v1/completions``.

This is how t0 drove ``vllm serve``: the client renders the prompt with the model's chat template,
asks for thinking until a stop string or the rest of the budget, appends "Wait" or the answer
delimiter itself (``client_forcing``) and re-submits. A completions endpoint returns text, so the
text is encoded with the model's tokenizer (``--tokenizer``, default: the model name) to count
tokens; token counts can differ by a token from the server's where text re-tokenises differently.
The completions API has no ``min_tokens``, so a stop right after an injected "Wait" counts as
another end of thinking (it uses up one more ignore).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from t0s1.backends import Backend
from t0s1.backends.client_forcing import ClientForcing, Completion, Request
from t0s1.errors import UserError
from t0s1.forcing_rules import BudgetForcing, Prompt, Result, encode, per_prompt_settings
from t0s1.profiles import detect_profile


class OpenAIBackend(Backend):
    name = "openai"

    def __init__(self, client, model: str, tokenizer, *, reasoning_format=None, context_length: int | None = None, concurrency: int = 16):
        """``client``: an ``openai.OpenAI`` (or anything with ``completions.create``)."""
        self.client = client
        self.model_name = model
        self.tokenizer = tokenizer
        self.concurrency = concurrency
        self.forcing = ClientForcing(tokenizer, detect_profile(tokenizer, reasoning_format).profile, self._complete, context_length=context_length)

    @classmethod
    def connect(cls, base_url: str, model: str, *, api_key=None, tokenizer=None, reasoning_format=None, trust_remote_code=False) -> OpenAIBackend:
        import openai
        from transformers import AutoTokenizer

        from t0s1.models import EMBEDDED_MODEL, embedded_model_dir

        source = tokenizer or model
        if source == EMBEDDED_MODEL:
            source = str(embedded_model_dir())
        try:
            local_tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as error:
            raise UserError(
                f"The openai backend needs the model's tokenizer to render prompts and count tokens; "
                f"could not load it from {source!r} ({error}). Pass --tokenizer DIR_OR_HUB_ID."
            ) from None
        client = openai.OpenAI(base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY")
        return cls(client, model, local_tokenizer, reasoning_format=reasoning_format)

    def generate(self, prompts: Sequence[Prompt], budgets: BudgetForcing | Sequence[BudgetForcing]) -> list[Result]:
        return self.forcing.generate(list(prompts), per_prompt_settings(budgets, len(prompts)), chat_template_kwargs=self.chat_template_kwargs)

    def _complete(self, requests: list[Request]) -> list[Completion]:
        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(requests)))) as pool:
            return list(pool.map(self._complete_one, requests))

    def _complete_one(self, request: Request) -> Completion:
        decode = self.tokenizer.decode
        stop = [decode([token]) for token in request.stop_ids]
        if request.stop_text:
            stop.insert(0, request.stop_text)
        try:
            response = self.client.completions.create(
                model=self.model_name,
                prompt=decode(request.ids, skip_special_tokens=False),
                max_tokens=request.max_tokens,
                temperature=request.settings.temperature,
                top_p=request.settings.top_p,
                seed=request.seed,
                stop=stop[:4],  # the OpenAI API takes at most 4 stop strings
            )
        except Exception as error:  # connection refused, 404 model, ...: say which server
            raise UserError(f"The completions endpoint failed for model {self.model_name!r}: {type(error).__name__}: {error}") from None
        choice = response.choices[0]
        ids = encode(self.tokenizer, choice.text)[: request.max_tokens]
        return Completion(ids, stopped=choice.finish_reason == "stop")
