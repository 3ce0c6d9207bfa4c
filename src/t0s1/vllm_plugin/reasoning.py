"""The ``t0s1`` reasoning parser of ``vllm serve``: ``reasoning`` apart from ``content``.

``vllm serve MODEL --reasoning-parser t0s1`` splits each reply at the delimiters of the served
model's t0s1 profile: s1's ``<|im_start|>think`` / ``<|im_start|>answer``, or ``<think>`` /
``</think>`` (templates that open the thinking themselves, and hybrids with ``enable_thinking``,
included). The profile is t0s1's detection on the served model's tokenizer; a model whose format
cannot be told fails at start-up, naming it.

The split is one function of the reply's text (``split_reply``), the same whole or streamed: the
reasoning is what follows the thinking start up to the end delimiter, the content what follows
the end delimiter, both stripped (as t0s1's ``Result.thinking`` and ``Result.answer``). A reply
that does not start with the thinking start is all content, unless the prompt left the thinking
open. The parser asks vLLM to keep special tokens in the text, since s1's delimiters are special.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from vllm.entrypoints.generate.base.protocol import DeltaMessage
from vllm.reasoning.abs_reasoning_parsers import ReasoningParser

from t0s1.profiles import THINKING_SWITCH, ModelProfile
from t0s1.vllm_plugin.served_model import served_model, served_model_for
from t0s1.vllm_plugin.split import StreamSplit, split_reply

ACTIVE = False
"""Set once this process has built a t0s1 parser: the server runs with ``--reasoning-parser t0s1``."""


class T0S1ReasoningParser(ReasoningParser):
    """vLLM's ``ReasoningParser`` over t0s1's profiles (registered as ``t0s1``)."""

    def __init__(self, tokenizer, *args, **kwargs):
        global ACTIVE
        super().__init__(tokenizer, *args, **kwargs)
        model_config = kwargs.get("model_config")
        if model_config is not None:
            self.model = served_model_for(model_config)
        else:
            self.model = served_model(getattr(tokenizer, "name_or_path", None) or str(tokenizer))
        ACTIVE = True
        self.profile: ModelProfile = self.model.profile
        template_kwargs = kwargs.get("chat_template_kwargs") or {}
        self.thinking_off = template_kwargs.get(THINKING_SWITCH) is False
        # Whether the prompt leaves the thinking open: known from the prompt when streaming
        # (adjust_initial_state_from_prompt), else from the profile.
        self.thinking_open = self.profile.prefilled and not self.thinking_off
        self.start_ids = self.model.rules.ids(self.profile.thinking_start)
        self.end_ids = list(self.model.rules.end_delimiter)
        self._stream: StreamSplit | None = None  # the API server's streamed split, from the first delta

    # vLLM's own thinking budget stays off: t0s1's logits processor serves thinking_token_budget.
    @property
    def reasoning_start_str(self) -> str | None:
        return None

    @property
    def reasoning_end_str(self) -> str | None:
        return None

    def adjust_request(self, request):
        request.skip_special_tokens = False  # s1's delimiters start with the special <|im_start|>
        return request

    def adjust_initial_state_from_prompt(self, prompt_token_ids: Sequence[int]) -> None:
        tail = self.model.tokenizer.decode(list(prompt_token_ids)[-32:], skip_special_tokens=False)
        self.thinking_open = tail.rstrip().endswith(self.profile.thinking_start)

    # ---- on ids (the prompt, structured outputs, usage) ---------------------------------------

    def _decode(self, ids: Sequence[int]) -> str:
        return self.model.tokenizer.decode([i for i in ids if i >= 0], skip_special_tokens=False)

    def is_reasoning_end(self, input_ids: Sequence[int]) -> bool:
        """Whether the prompt ``input_ids`` closed the thinking itself (a hybrid template with
        thinking off): it ends with the end delimiter. vLLM asks this of prompts only; earlier turns
        of a conversation may hold delimiters of their own."""
        text = self._decode(list(input_ids)[-16:])
        return text.rstrip().endswith(self.profile.thinking_end)

    def is_reasoning_end_streaming(self, input_ids: Sequence[int], delta_ids: Iterable[int]) -> bool:
        if self._stream is not None:  # the API server's parser: what the text split found
            return self._stream.ended
        delta = list(delta_ids)
        window = list(input_ids)[-(len(delta) + len(self.end_ids) + 2) :]
        return self.profile.thinking_end in self._decode(window)

    def extract_content_ids(self, input_ids: list[int]) -> list[int]:
        at = _find(input_ids, self.end_ids)
        return list(input_ids[at + len(self.end_ids) :]) if at >= 0 else []

    def count_reasoning_tokens(self, token_ids: Sequence[int]) -> int:
        ids = list(token_ids)
        if ids[: len(self.start_ids)] == self.start_ids:
            begin = len(self.start_ids)
        elif self.thinking_open:
            begin = 0
        else:
            return 0
        end = _find(ids, self.end_ids, begin)
        return (end if end >= 0 else len(ids)) - begin

    # ---- on text --------------------------------------------------------------------------------

    def extract_reasoning(self, model_output: str, request) -> tuple[str | None, str | None]:
        return split_reply(model_output, self.profile, thinking_open=self.thinking_open)

    def extract_reasoning_streaming(self, previous_text, current_text, delta_text, previous_token_ids,
                                    current_token_ids, delta_token_ids) -> DeltaMessage | None:
        """The new part of the split of ``current_text``: text that could still turn out to be a
        delimiter, and trailing whitespace, wait for more. Once the end delimiter and the first
        content are there, the reasoning is over (vLLM streams the rest as content itself). Each
        delta costs time in proportion to its own length (``StreamSplit``), not the reply's."""
        if self._stream is None:
            self._stream = StreamSplit(self.profile, thinking_open=self.thinking_open)
        delta_reasoning, delta_content = self._stream.feed(current_text)
        if not delta_reasoning and not delta_content:
            return None
        return DeltaMessage(reasoning=delta_reasoning or None, content=delta_content or None)


def _find(ids: Sequence[int], pattern: list[int], start: int = 0) -> int:
    for at in range(start, len(ids) - len(pattern) + 1):
        if list(ids[at : at + len(pattern)]) == pattern:
            return at
    return -1
