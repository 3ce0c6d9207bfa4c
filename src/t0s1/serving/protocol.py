"""The API of ``t0s1 serve``, declared: request and reply models in pydantic, so that
``/openapi.json`` describes every field (and FastAPI validates them).

The standard OpenAI fields sit beside the budget forcing extensions, each with its default and
its meaning. The thinking budget answers to the names the other engines use
(``THINKING_BUDGET_ALIASES``, ``reasoning_effort``, ``chat_template_kwargs``), and
``BudgetFields.budget_forcing`` turns them into one ``BudgetForcing``: aliases that disagree, a
budget-like field this server does not know, or thinking asked for while the template switches it
off are refused with a ``FieldError`` naming the field, never ignored.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from t0s1.errors import UserError
from t0s1.forcing import BudgetForcing
from t0s1.profiles import THINKING_SWITCH
from t0s1.rag import RagRequest

THINKING_BUDGET_ALIASES = ("max_thinking_tokens", "thinking_budget", "thinking_token_budget", "thinking_budget_tokens")
"""Names of the thinking budget: ours (and s1's), Qwen / SGLang, vLLM, llama.cpp's server."""

REASONING_EFFORTS = ("low", "medium", "high")
DEFAULT_EFFORT_BUDGETS: dict[str, int | str] = {"low": 256, "medium": 1024, "high": 4096}
"""``reasoning_effort`` -> thinking budget, unless the server is started with other budgets."""

# A request field whose name says it is about thinking or its budget, but which this server does
# not declare: refused rather than ignored (a misplaced budget is the peers' most common complaint).
BUDGET_LIKE = re.compile(r"think|reason|budget|effort|ignore|wait", re.IGNORECASE)

REQUEST_FIELD = {"max_answer_tokens": "max_tokens"}
"""The request field of a ``BudgetForcing`` field whose name differs."""

SEED_RANGE = {"ge": -(2**63), "le": 2**64 - 1}  # what torch.Generator.manual_seed takes
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
ThinkingBudget = NonNegativeInt | Literal["auto"]


class FieldError(Exception):
    """A request field that cannot be honoured: ``param`` names it (OpenAI's ``error.param``)."""

    def __init__(self, param: str, message: str, *, code: str | None = None):
        super().__init__(message)
        self.param, self.message, self.code = param, message, code


def _budget_description(peer: str) -> str:
    return f"Alias of max_thinking_tokens ({peer}). Aliases given together must agree."


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    include_usage: bool = Field(False, description="Send a last chunk with the usage (and no choices).")


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """A message of the conversation. Earlier thinking of an assistant turn may come as
    ``reasoning_content`` or ``reasoning``; the chat template decides whether the model sees it."""

    model_config = ConfigDict(strict=True, extra="allow")

    role: str = Field(description="system, developer (as system), user or assistant.")
    content: str | list[TextPart] | None = Field(None, description="A string or a list of text parts (joined); null is empty.")
    reasoning_content: str | None = None
    reasoning: str | None = Field(None, description="Alias of reasoning_content (vLLM's name).")

    def for_template(self) -> dict:
        """``{"role", "content"[, "reasoning_content"]}`` as the chat template reads it."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        message = {"role": "system" if self.role == "developer" else self.role, "content": content or ""}
        reasoning = self.reasoning_content if self.reasoning_content is not None else self.reasoning
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        return message


class BudgetFields(BaseModel):
    """The fields both endpoints share: sampling, streaming and budget forcing. Left out (or null),
    a field takes the server's default."""

    model_config = ConfigDict(strict=True, extra="allow")

    model: str | None = Field(None, description="Any name: the server serves one model.")
    max_tokens: PositiveInt | None = Field(None, description="The most answer tokens, after the thinking.")
    max_completion_tokens: PositiveInt | None = Field(None, description="Alias of max_tokens (OpenAI's newer name).")
    temperature: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = Field(
        None, description="0 is greedy decoding.")
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    seed: Annotated[int, Field(**SEED_RANGE)] | None = Field(
        None, description="Seeds sampling; without one a sampled request draws a fresh seed (reported in the reply).")
    n: Annotated[int, Field(ge=1, le=1)] | None = Field(None, description="Choices per request: only 1.")
    stream: bool | None = Field(False, description="Server-sent events: the thinking, then the answer, then [DONE].")
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="Accepted and ignored.")
    max_thinking_tokens: ThinkingBudget | None = Field(
        None, description='Thinking budget in tokens (injected Waits included), or "auto": the context minus the '
        "prompt minus 100.")
    thinking_budget: ThinkingBudget | None = Field(None, description=_budget_description("Qwen, SGLang"))
    thinking_token_budget: ThinkingBudget | None = Field(None, description=_budget_description("vLLM"))
    thinking_budget_tokens: ThinkingBudget | None = Field(None, description=_budget_description("llama.cpp server"))
    reasoning_effort: Literal["low", "medium", "high"] | None = Field(
        None, description="A thinking budget by name (OpenAI, Ollama): the budgets the server was started with.")
    num_ignore: NonNegativeInt | None = Field(
        None, description="How many times the end of thinking is ignored and ignore_str appended (s1's Wait).")
    ignore_str: str | None = Field(None, description='Appended when the end of thinking is ignored (default "Wait").')
    end_phrase: str | None = Field(None, description="Written before the end of thinking when the budget forces it.")
    answer_prefix: str | None = Field(None, description='Written after a forced end of thinking (s1: "Final Answer:").')

    def ignored_fields(self) -> list[str]:
        """Undeclared fields that are not about thinking (other OpenAI options): ignored."""
        return sorted(name for name in (self.model_extra or {}) if not BUDGET_LIKE.search(name))

    def check_unknown_budget_fields(self) -> None:
        for name in sorted(self.model_extra or {}):
            if BUDGET_LIKE.search(name):
                raise FieldError(name, f"{name} is not a field this server knows, and it looks like a thinking setting: "
                                 "it is refused rather than ignored. The thinking budget is max_thinking_tokens (or "
                                 f"{', '.join(THINKING_BUDGET_ALIASES[1:])}, reasoning_effort); Waits are num_ignore and "
                                 "ignore_str; enable_thinking goes in chat_template_kwargs.")

    def budget_forcing(self, defaults: BudgetForcing, effort_budgets: dict[str, int | str],
                       template_kwargs: dict | None = None) -> BudgetForcing:
        """The request's settings over the server's ``defaults``; ``template_kwargs`` (the chat
        template's) may carry a budget alias and ``enable_thinking``."""
        self.check_unknown_budget_fields()
        template_kwargs = template_kwargs or {}
        given = [(name, getattr(self, name)) for name in THINKING_BUDGET_ALIASES if getattr(self, name) is not None]
        for name in THINKING_BUDGET_ALIASES:
            if template_kwargs.get(name) is not None:
                value = template_kwargs[name]
                if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                    raise FieldError(f"chat_template_kwargs.{name}", f"chat_template_kwargs.{name} must be a non-negative "
                                     f"integer or 'auto', got {value!r}.")
                given.append((f"chat_template_kwargs.{name}", value))
        if self.reasoning_effort is not None:
            given.append(("reasoning_effort", effort_budgets[self.reasoning_effort]))
        for name, value in given[1:]:
            if value != given[0][1]:
                shown = [f"{n}={v!r}" for n, v in given]
                raise FieldError(name, f"{' and '.join(shown)} disagree: they all set the thinking budget; give one.")
        answer = [(name, getattr(self, name)) for name in ("max_tokens", "max_completion_tokens") if getattr(self, name) is not None]
        if len(answer) == 2 and answer[0][1] != answer[1][1]:
            raise FieldError("max_completion_tokens", f"max_tokens={answer[0][1]} and max_completion_tokens={answer[1][1]} "
                             "disagree: both cap the answer; give one.")
        if template_kwargs.get(THINKING_SWITCH) is False:
            asks = [(n, v) for n, v in given if v != 0] + ([("num_ignore", self.num_ignore)] if self.num_ignore else [])
            if asks:
                name, value = asks[0]
                raise FieldError(name, f"{name}={value!r} asks for thinking, but chat_template_kwargs.{THINKING_SWITCH} "
                                 "is false: drop one of them.")
        changes = {
            "max_thinking_tokens": given[0][1] if given else None,
            "max_answer_tokens": answer[0][1] if answer else None,
            **{name: getattr(self, name) for name in ("num_ignore", "ignore_str", "temperature", "top_p", "end_phrase", "answer_prefix")},
        }
        # A request without a seed samples with a fresh one, whatever the server's default.
        settings = replace(defaults, seed=self.seed)
        try:
            return replace(settings, **{name: value for name, value in changes.items() if value is not None})
        except UserError as error:  # a value the fields' types let through but BudgetForcing refuses
            settings_field = str(error).split(" ", 1)[0]
            raise FieldError(REQUEST_FIELD.get(settings_field, settings_field), str(error)) from None


class ChatCompletionRequest(BudgetFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description='Passed to the chat template, e.g. {"enable_thinking": false}; a thinking budget alias here '
        "counts as one too.")
    stop: str | list[str] | None = Field(None, description="Not taken by chat: the answer ends at the end of turn or "
                                         "max_tokens (a 400 if set; /v1/completions takes stop).")
    logprobs: bool | None = Field(None, description="Not supported (a 400 if true).")
    rag: RagRequest | None = Field(None, description='Retrieval for this request, on a server started with --index '
                                   '(e.g. {"k": 5, "retriever": "hybrid"}; k = 0: none).')

    def template_messages(self) -> list[dict]:
        return [message.for_template() for message in self.messages]


class CompletionRequest(BudgetFields):
    """``POST /v1/completions``: raw text, no chat template. Without ``stop`` (or
    ``stop_token_ids``) budget forcing from the prompt plus the thinking delimiter; with them a plain
    continuation, as client-side budget forcing asks of a server."""

    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] = Field(
        description="The text to continue (one prompt per request).")
    stop: str | list[str] | None = Field(None, description="Stop strings: the request is a plain continuation.")
    stop_token_ids: list[NonNegativeInt] | None = Field(
        None, description="A plain continuation stops at these ids and the model's end of turn (vLLM's field).")
    min_tokens: Annotated[int, Field(ge=0, le=1)] | None = Field(
        None, description="1: the first token of a plain continuation may not be a stop id (after an injected Wait).")
    skip_special_tokens: bool | None = Field(None, description="Drop special tokens from a plain continuation's text (default false).")
    echo: bool | None = Field(None, description="Not supported (a 400 if true).")
    logprobs: int | None = Field(None, description="Not supported (a 400 if set).")
    suffix: str | None = Field(None, description="Not supported (a 400 if set).")

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    @property
    def stop_strings(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stop if s)

    @property
    def plain_continuation(self) -> bool:
        return bool(self.stop_strings) or self.stop_token_ids is not None


# ---- replies --------------------------------------------------------------------------------------


def _omitted_when_null(description: str | None = None):
    return Field(None, description=description, exclude_if=lambda value: value is None)


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = Field(description="Thinking and answer tokens.")
    total_tokens: int
    completion_tokens_details: CompletionTokensDetails | None = None


class BudgetForcingReport(BaseModel):
    """How the thinking of one choice went (a t0s1 extension)."""

    thinking_end: Literal["natural", "budget", "off", "context"] = Field(
        description="natural: the model ended it (after the Waits); budget: the budget cut it and forced the end; "
        "off: no thinking (the template switched it off); context: the context ran out while thinking.")
    thinking_tokens: int = Field(description="Thinking tokens, injected ones included.")
    max_thinking_tokens: int = Field(description='The budget this request had ("auto" resolved).')
    num_ignored: int = Field(description="How many times the end of thinking was ignored (Waits injected).")
    hit_budget: bool
    answer_tokens: int
    seed: int | None = Field(None, description="The sampling seed (null under greedy decoding).")


class Source(BaseModel):
    """A retrieved document the model was shown, numbered as the prompt cites it ([n])."""

    model_config = ConfigDict(extra="allow")

    number: int
    id: str
    title: str
    score: float
    snippet: str
    retriever: str = ""
    cited: bool | None = _omitted_when_null("Whether the answer cites it (known once the answer is complete).")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str = Field(description="The answer.")
    reasoning: str = Field(description="The thinking (vLLM's name).")
    reasoning_content: str = Field(description="The thinking (DeepSeek's, SGLang's, llama.cpp's name).")
    sources: list[Source] | None = _omitted_when_null("The retrieved sources (a server started with --index).")


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None
    budget_forcing: BudgetForcingReport


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    budget_forcing: BudgetForcingReport = Field(description="The first choice's (kept for older clients).")


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = _omitted_when_null()
    content: str | None = _omitted_when_null()
    reasoning: str | None = _omitted_when_null()
    reasoning_content: str | None = _omitted_when_null()
    sources: list[Source] | None = _omitted_when_null("In the first chunk, and again in the last with cited marked.")


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None
    budget_forcing: BudgetForcingReport | None = _omitted_when_null("In the last chunk.")


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = _omitted_when_null("In a last chunk without choices, with stream_options.include_usage.")
    budget_forcing: BudgetForcingReport | None = _omitted_when_null("In the last chunk with choices.")


class CompletionChoice(BaseModel):
    index: int = 0
    text: str = Field(description="The answer (or a plain continuation's text).")
    reasoning: str | None = _omitted_when_null("The thinking.")
    reasoning_content: str | None = _omitted_when_null("The thinking.")
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None
    budget_forcing: BudgetForcingReport | None = _omitted_when_null()


class Completion(BaseModel):
    """A ``/v1/completions`` reply, whole or (``stream``) one chunk of it."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = _omitted_when_null()
    budget_forcing: BudgetForcingReport | None = _omitted_when_null()


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "t0s1"
    max_model_len: int | None = Field(None, description="The model's context length in tokens.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error, in OpenAI's shape."""

    error: ErrorBody
