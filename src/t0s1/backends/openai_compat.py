"""The OpenAI-compatible backend: budget forcing driven from the client over ``/v1/completions``.

This is how t0 drove ``vllm serve``: the client renders the prompt with the model's chat template,
asks for thinking until a stop or the rest of the budget, appends "Wait" or the answer delimiter
itself (``client_forcing``) and re-submits. A completions endpoint returns text, so the text is
encoded with the model's tokenizer (``--tokenizer``, default: the model name) to count tokens;
token counts can differ by a token from the server's where text re-tokenises differently.

Where the server takes vLLM's sampling fields (vLLM, SGLang, ``t0s1 serve``) each request also
sends ``stop_token_ids`` (so a special-token delimiter such as ``<|im_start|>`` stops the thinking
even though the server leaves special tokens out of its text by default), ``min_tokens`` (1 after
an injected "Wait": s1's rule that the next token may not end the thinking) and
``skip_special_tokens: false`` (special tokens the model writes stay in the text, so re-encoding
it gives the same ids). A server that refuses them (the OpenAI API does) gets plain requests: stop
strings only, and a stop right after a "Wait" then counts as another end of thinking.

The context length (for ``"auto"`` and the budget checks) comes from the caller, else from the
server's ``GET /v1/models`` (``max_model_len``, as vLLM, SGLang and ``t0s1 serve`` report it).

A BOS token. Servers tokenize a text prompt as the tokenizer does by default (vLLM's
``add_special_tokens``, llama.cpp's ``add_bos``, ``t0s1 serve``), so a tokenizer that adds a BOS adds
one to the prompt; chat templates of such models (Llama 3, DeepSeek-R1-Distill-Llama) write it too.
The rendered prompt's leading BOS is therefore left out of the text sent, and the server's makes it
one, as the engine sees it.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from t0s1.backends.base import Backend
from t0s1.backends.client_forcing import ClientForcing, Completion, Request
from t0s1.errors import UserError
from t0s1.forcing_rules import BudgetForcing, Prompt, Result, encode, longest_token_chars, per_prompt_settings
from t0s1.profiles import detect_profile

SAMPLING_FIELDS = ("stop_token_ids", "min_tokens", "skip_special_tokens")
"""vLLM's extra sampling fields of a completions request (SGLang and ``t0s1 serve`` take them too)."""

SERVERS_WITH_SAMPLING_FIELDS = ("vllm", "sglang", "t0s1")
"""``owned_by`` of ``/v1/models`` for servers known to take ``SAMPLING_FIELDS``."""

MAX_STOP_STRINGS = 4
"""The OpenAI API takes at most 4 stop strings."""

TIMEOUT_SETTING = "T0S1_REQUEST_TIMEOUT"
"""Environment variable: seconds a request to the server may take (default 600, the OpenAI
client's; a long generation on a slow server needs more). Each request is tried 3 times."""
CONNECT_TIMEOUT_SECONDS = 10.0
MAX_RETRIES = 2


def request_timeout():
    """The OpenAI client's timeout: ``T0S1_REQUEST_TIMEOUT`` seconds (600 unset) to answer, 10 to
    connect; a ``UserError`` for a value that is not a positive number of seconds."""
    import httpx

    raw = os.environ.get(TIMEOUT_SETTING, "").strip()
    try:
        seconds = float(raw) if raw else 600.0
    except ValueError:
        seconds = 0.0  # refused below
    if not (math.isfinite(seconds) and seconds > 0):
        raise UserError(f"{TIMEOUT_SETTING} must be a positive number of seconds, got {raw!r}.")
    return httpx.Timeout(seconds, connect=min(CONNECT_TIMEOUT_SECONDS, seconds))


class OpenAIBackend(Backend):
    name = "openai"

    def __init__(self, client, model: str, tokenizer, *, reasoning_format=None, context_length: int | None = None,
                 concurrency: int = 16, sampling_fields: bool | None = None):
        """``client``: an ``openai.OpenAI`` (or anything with ``completions.create``).
        ``sampling_fields``: send ``SAMPLING_FIELDS``; None: try them, and drop them for good if
        the server refuses them."""
        self.client = client
        self.model_name = model
        self.tokenizer = tokenizer
        self.concurrency = concurrency
        self.sampling_fields = sampling_fields
        # Known to act on the fields (a vLLM, SGLang or t0s1 server, or the caller says so): then
        # the stop ids go as ids only. A server that merely did not refuse them may ignore them
        # (llama.cpp's server, Ollama), so it keeps getting the stop strings too.
        self._fields_act = sampling_fields is True
        self._lock = threading.Lock()
        self._bos_added = adds_bos(tokenizer)
        self._longest_token_chars = longest_token_chars(tokenizer)
        self.forcing = ClientForcing(tokenizer, detect_profile(tokenizer, reasoning_format).profile, self._complete, context_length=context_length)

    @property
    def context_length(self) -> int | None:
        return self.forcing.context_length

    @classmethod
    def connect(cls, base_url: str, model: str, *, api_key=None, tokenizer=None, reasoning_format=None, trust_remote_code=False,
                context_length: int | None = None) -> OpenAIBackend:
        """A backend for ``model`` served at ``base_url``. ``context_length``: the model's context
        in tokens (default: what the server's ``/v1/models`` reports, if it does)."""
        import openai
        from transformers import AutoTokenizer

        from t0s1.models import EMBEDDED_MODEL, embedded_model_dir

        if context_length is not None and (isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 1):
            raise UserError(f"The context length must be a positive number of tokens, got {context_length!r}.")
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
        client = openai.OpenAI(base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY",
                               timeout=request_timeout(), max_retries=MAX_RETRIES)
        served_length, owner = served_model_card(client, model)
        sampling_fields = True if owner in SERVERS_WITH_SAMPLING_FIELDS else None
        return cls(client, model, local_tokenizer, reasoning_format=reasoning_format,
                   context_length=context_length or served_length, sampling_fields=sampling_fields)

    def generate(self, prompts: Sequence[Prompt], budgets: BudgetForcing | Sequence[BudgetForcing]) -> list[Result]:
        return self.forcing.generate(list(prompts), per_prompt_settings(budgets, len(prompts)), chat_template_kwargs=self.chat_template_kwargs)

    def _complete(self, requests: list[Request]) -> list[Completion]:
        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(requests)))) as pool:
            return list(pool.map(self._complete_one, requests))

    def _complete_one(self, request: Request) -> Completion:
        import openai

        decode = self.tokenizer.decode
        stop = stop_strings(self.tokenizer, request, self.forcing.rules.end_of_turn, ids_sent=self._fields_act)
        prompt_ids = request.ids
        if self._bos_added is not None and prompt_ids[:1] == [self._bos_added]:
            prompt_ids = prompt_ids[1:]  # the server adds it when it tokenizes the text
        fields = {
            "model": self.model_name,
            "prompt": decode(prompt_ids, skip_special_tokens=False),
            "max_tokens": request.max_tokens,
            "temperature": request.settings.temperature,
            "top_p": request.settings.top_p,
            "seed": request.seed,
            "stop": stop,
        }
        sampling = {"stop_token_ids": list(request.stop_ids), "min_tokens": request.min_tokens, "skip_special_tokens": False}
        with_fields = self.sampling_fields is not False  # read once: other threads may learn the answer meanwhile
        try:
            try:
                response = self.client.completions.create(**fields, extra_body=sampling if with_fields else None)
            except openai.BadRequestError as error:
                # Refused for the fields while the server's answer was unknown (this request's, or
                # one sent beside it): plain requests from now on.
                if not with_fields or self.sampling_fields is True or not any(name in str(error) for name in SAMPLING_FIELDS):
                    raise
                with self._lock:
                    self.sampling_fields = False
                response = self.client.completions.create(**fields)
            else:
                if with_fields and self.sampling_fields is None:
                    with self._lock:
                        self.sampling_fields = True
            choice = response.choices[0]
            text, finish_reason = choice.text, choice.finish_reason
            if not isinstance(text, str) or not (finish_reason is None or isinstance(finish_reason, str)):
                raise TypeError(f"the choice's text is {type(text).__name__} and its finish_reason "
                                f"{type(finish_reason).__name__}; a completion has a string and a string or null")
        except Exception as error:  # connection refused, 404 model, an empty or malformed reply, ...: say which server
            raise UserError(f"The completions endpoint failed for model {self.model_name!r}: {type(error).__name__}: {error}") from None
        # At most max_tokens of the longest token's characters: a reply far longer than asked for is
        # not tokenized whole (a server's 10 MB took seconds and gigabytes).
        text = text[: request.max_tokens * self._longest_token_chars]
        ids = encode(self.tokenizer, text)[: request.max_tokens]
        return Completion(ids, stopped=finish_reason == "stop")


def adds_bos(tokenizer) -> int | None:
    """The BOS id ``tokenizer`` puts before a text it encodes with its special tokens, as servers
    encode a completions prompt (None: it adds none, as Qwen's and SmolLM2's)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = list(tokenizer("1", add_special_tokens=True).input_ids)
    return bos if ids[:1] == [bos] else None


def stop_strings(tokenizer, request: Request, end_of_turn, *, ids_sent: bool) -> list[str]:
    """The ``stop`` strings of a request. A server that takes ``stop_token_ids`` gets the stop ids
    as ids, so only a delimiter written in ordinary tokens goes as a string: nothing is dropped.
    Otherwise the stop ids go as strings too, at most ``MAX_STOP_STRINGS`` (the OpenAI API's limit):
    the written delimiter, then the ids that end the thinking, then the end-of-turn ids (which the
    server stops at by itself, so those are the ones left out when there are more than 4)."""
    stop = [request.stop_text] if request.stop_text else []
    if ids_sent:
        return stop
    ordered = sorted(request.stop_ids, key=lambda token: (token in end_of_turn, token))
    stop += [text for text in (tokenizer.decode([token]) for token in ordered) if text and text not in stop]
    return stop[:MAX_STOP_STRINGS]


def served_model_card(client, model: str) -> tuple[int | None, str | None]:
    """(context length, owner) of ``model`` as the server's ``GET /v1/models`` lists it (the only
    model, if the names differ); Nones where the server does not say."""
    try:
        cards = [card for card in client.models.list().data if isinstance(getattr(card, "id", None), str)]
    except Exception:  # noqa: BLE001 - a server without /v1/models, or a list that is not one: the caller's flag is the only source
        return None, None
    card = next((c for c in cards if c.id == model), cards[0] if len(cards) == 1 else None)
    if card is None:
        return None, None
    extra = card.model_extra or {}
    length = extra.get("max_model_len")
    owner = getattr(card, "owned_by", None)
    valid = isinstance(length, int) and not isinstance(length, bool) and length > 0
    return (length if valid else None), (owner if isinstance(owner, str) else None)
