"""The API of ``t0s1 serve``, declared: request and reply models in pydantic, so that
``/openapi.json`` describes every field (and FastAPI validates them).

The standard OpenAI fields sit beside the budget forcing extensions, each with its default and
its meaning. The thinking budget answers to the names the other engines use
(``THINKING_BUDGET_ALIASES``, ``reasoning_effort``, ``chat_template_kwargs``), and
``BudgetFields.budget_forcing`` turns them into one ``BudgetForcing``: aliases that disagree, a
budget-like field this server does not know, or thinking asked for while the template switches it
off are refused with a ``FieldError`` naming the field, never ignored. Strings and lists a request
brings have length limits (``TEXT_CHARS``, ``PROMPT_CHARS``, ``MESSAGES``, ...), declared with the
fields; the whole body has one too (``BODY_BYTES``, checked by the server before it parses it).

A test-time policy (``policy``, ``policy_args``, ``n``, ``return_traces``; ``t0s1.policies``)
answers with the trace that carries the vote, and a ``policy`` report beside the choice.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import replace
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, field_validator

from t0s1.errors import UserError
from t0s1.forcing import BudgetForcing
from t0s1.policies import POLICIES
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


def _integral(value):
    """JSON Schema's integer: 5.0 is 5 (the fields are strict otherwise: no strings, no booleans)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def Integer(**bounds):  # noqa: N802 - a type
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


PositiveInt = Integer(ge=1)
NonNegativeInt = Integer(ge=0)
ThinkingBudget = NonNegativeInt | Literal["auto"]

# Limits on what a request may hold (a 400 beyond them): the server keeps nothing of a request once
# it is answered, and these bound what one request costs to encode and match.
TEXT_CHARS = 4096
"""The longest ignore_str, end_phrase or answer_prefix, in characters."""
STOP_STRINGS, STOP_CHARS, STOP_TOKEN_IDS = 16, 1024, 256
"""The most stop strings, the longest stop string (characters) and the most stop_token_ids."""
NAME_CHARS = 256
"""The longest model or user name."""
PROMPT_CHARS = 1_048_576
"""The longest prompt, message content (or text part) or earlier reasoning, in characters."""
MESSAGES, CONTENT_PARTS = 1024, 256
"""The most messages of a conversation and text parts of one message."""
BODY_BYTES = 8 * 1024 * 1024
"""The largest request body in bytes (a 413 beyond; the server counts before it parses)."""
MAX_N = 64
"""The most choices (``n``) of one request, or traces of one policy."""
DEFAULT_MAX_QUEUED = 256
"""Requests that may wait for the batch (``t0s1 serve --max-queued``; a request with n choices
takes n places); more are a 503 with Retry-After. Each holds its prompt's ids, so what the queue
holds is bounded by this x the context length."""
POLICY_ARGS, POLICY_ARG_CHARS = 16, 64
"""The most policy_args, and the longest policy_args name or string value."""

RequestText = Annotated[str, Field(max_length=TEXT_CHARS)]
PromptText = Annotated[str, Field(max_length=PROMPT_CHARS)]
Text = Annotated[str, Field(max_length=PROMPT_CHARS),
                 WithJsonSchema({"type": "string", "pattern": r"\S", "maxLength": PROMPT_CHARS})]
"""A string the server needs some text in (not only whitespace), at most ``PROMPT_CHARS`` long."""
Name = Annotated[str, Field(max_length=NAME_CHARS)]
StopString = Annotated[str, Field(max_length=STOP_CHARS)]


def refused_unless(*allowed, description: str):
    """The schema of a field the server refuses unless it is one of ``allowed`` (``None`` among
    them): validation takes any value of the field's type, so the refusal can say why."""
    return WithJsonSchema({"enum": list(allowed), "description": description})


TEMPLATE_VARIABLES = 16
"""Entries of a request's ``chat_template_kwargs`` at most."""


@functools.cache
def _template_parameters() -> frozenset[str]:
    """The parameters of transformers' ``apply_chat_template`` (the release installed)."""
    import inspect

    from transformers import PreTrainedTokenizerBase

    return frozenset(inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters) - {"self", "kwargs"}


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
    text: PromptText


class ChatMessage(BaseModel):
    """A message of the conversation. Earlier thinking of an assistant turn may come as
    ``reasoning_content`` or ``reasoning``; the chat template decides whether the model sees it."""

    model_config = ConfigDict(strict=True, extra="allow", json_schema_extra={"required": ["role", "content"]})

    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="system, developer (as system), user or assistant.")
    content: Annotated[PromptText | Annotated[list[TextPart], Field(max_length=CONTENT_PARTS)] | None, WithJsonSchema({
        "anyOf": [{"type": "string", "pattern": r"\S", "maxLength": PROMPT_CHARS},
                  {"type": "array", "minItems": 1, "maxItems": CONTENT_PARTS, "items": {
                      "type": "object", "required": ["type", "text"],
                      "properties": {"type": {"const": "text"},
                                     "text": {"type": "string", "pattern": r"\S", "maxLength": PROMPT_CHARS}}}}],
        "description": "A string or a list of text parts (joined). The server also takes null or empty content "
                       "(an empty message) as long as one message of the conversation holds some text."})] = None
    reasoning_content: PromptText | None = None
    reasoning: PromptText | None = Field(None, description="Alias of reasoning_content (vLLM's name).")

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

    model: Name | None = Field(None, description="Any name: the server serves one model.")
    max_tokens: PositiveInt | None = Field(None, description="The most answer tokens, after the thinking.")
    max_completion_tokens: PositiveInt | None = Field(None, description="Alias of max_tokens (OpenAI's newer name).")
    temperature: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = Field(
        None, description="0 is greedy decoding.")
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    seed: Integer(**SEED_RANGE) | None = Field(
        None, description="Seeds sampling; without one a sampled request draws a fresh seed (reported in the reply).")
    n: Integer(ge=1, le=MAX_N) | None = Field(
        None, description="Without a policy: this many independent choices (sampled with seed + j; not streamed). "
        "With a policy: its number of traces (default: the policy's).")
    policy: Literal[tuple(POLICIES)] | None = Field(
        None, description="A test-time policy (docs/policies.md): the reply is the trace that carries its vote, "
        "usage counts every generated token, and the policy field reports the vote. Not streamed.")
    policy_args: Annotated[dict[Annotated[str, Field(max_length=POLICY_ARG_CHARS)],
                                int | Annotated[float, Field(allow_inf_nan=False)]
                                | Annotated[str, Field(max_length=POLICY_ARG_CHARS)]],
                           Field(max_length=POLICY_ARGS)] | None = Field(
        None, description='The policy\'s parameters by their papers\' names, e.g. {"mode": "online", "warmup": 4}.')
    return_traces: bool | None = Field(None, description="With a policy: every trace in policy.traces.")
    stream: bool | None = Field(False, description="Server-sent events: the thinking, then the answer, then [DONE].")
    stream_options: StreamOptions | None = None
    user: Name | None = Field(None, description="Accepted and ignored.")
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
    ignore_str: RequestText | None = Field(None, description='Appended when the end of thinking is ignored (default "Wait").')
    end_phrase: RequestText | None = Field(None, description="Written before the end of thinking when the budget forces it.")
    answer_prefix: RequestText | None = Field(None, description='Written after a forced end of thinking (s1: "Final Answer:").')

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

    messages: list[ChatMessage] = Field(min_length=1, max_length=MESSAGES)
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description='Passed to the chat template, e.g. {"enable_thinking": false}; a thinking budget alias here '
        "counts as one too.")
    stop: Annotated[str | list[str] | None, refused_unless(None, description="Not taken by chat: the answer ends at the end "
                    "of turn or max_tokens (a 400 if set; /v1/completions takes stop).")] = None
    logprobs: Annotated[bool | None, refused_unless(False, None, description="Not supported (a 400 if true).")] = None
    rag: RagRequest | None = Field(None, description='Retrieval for this request, on a server started with --index '
                                   '(e.g. {"k": 5, "retriever": "hybrid"}; k = 0: none).')

    def template_messages(self) -> list[dict]:
        return [message.for_template() for message in self.messages]

    def template_variables(self) -> dict | None:
        """``chat_template_kwargs``, checked: they become variables of the chat template and
        nothing else. ``apply_chat_template``'s own parameters are refused (``chat_template``
        would run a client's Jinja on the server, ``tools`` and ``documents`` grow the prompt
        unchecked), and so are values other than short scalars."""
        kwargs = self.chat_template_kwargs
        if kwargs is None:
            return None
        if len(kwargs) > TEMPLATE_VARIABLES:
            raise FieldError("chat_template_kwargs", f"chat_template_kwargs has {len(kwargs)} entries; at most "
                             f"{TEMPLATE_VARIABLES} are taken.")
        for name, value in kwargs.items():
            where = f"chat_template_kwargs.{name}"[:NAME_CHARS]
            if name in _template_parameters():
                raise FieldError(where, f"chat_template_kwargs.{name} is a parameter of the tokenizer's "
                                 "apply_chat_template, not a template variable: it is not taken from a request.")
            if len(name) > NAME_CHARS or not (value is None or isinstance(value, bool | int | float)
                                              or isinstance(value, str) and len(value) <= NAME_CHARS):
                raise FieldError(where, f"chat_template_kwargs.{name[:NAME_CHARS]} must be a short name with a "
                                 f"boolean, a number, null or a string of at most {NAME_CHARS} characters.")
        return kwargs


class CompletionRequest(BudgetFields):
    """``POST /v1/completions``: raw text, no chat template. Without ``stop`` (or
    ``stop_token_ids``) budget forcing from the prompt plus the thinking delimiter; with them a plain
    continuation, as client-side budget forcing asks of a server."""

    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=1)] = Field(
        description="The text to continue (one prompt per request; not only whitespace).")
    stop: StopString | Annotated[list[StopString], Field(max_length=STOP_STRINGS)] | None = Field(
        None, description="Stop strings: the request is a plain continuation. Found in the raw text as it is "
        "generated; the text ends before the first.")
    stop_token_ids: Annotated[list[NonNegativeInt], Field(max_length=STOP_TOKEN_IDS)] | None = Field(
        None, description="A plain continuation stops at these ids and the model's end of turn (vLLM's field); ids "
        "of the model's vocabulary.")
    min_tokens: Integer(ge=0, le=1) | None = Field(
        None, description="1: the first token of a plain continuation may not be a stop id (after an injected Wait).")
    skip_special_tokens: bool | None = Field(None, description="Drop special tokens from a plain continuation's text (default false).")
    echo: Annotated[bool | None, refused_unless(False, None, description="Not supported (a 400 if true).")] = None
    logprobs: Annotated[int | None, refused_unless(None, description="Not supported (a 400 if set).")] = None
    suffix: Annotated[str | None, refused_unless(None, description="Not supported (a 400 if set).")] = None

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


class TraceReport(BaseModel):
    """One trace of a policy's run."""

    model_config = ConfigDict(extra="allow")

    answer: str | None = Field(description="The answer extracted from the trace's reply (read as a math answer).")
    thinking_tokens: int
    answer_tokens: int
    generated_tokens: int = Field(description="Tokens the model generated for this trace.")
    stopped_early: bool = Field(description="Stopped by the policy (DeepConf online, short-m@k).")
    voted: bool = Field(description="Whether it took part in the vote.")
    confidence: float | None = Field(description="The score its vote used (null: unweighted).")
    confs: list[float | None] | None = Field(description="DeepConf's per-token confidences (when it computes them).")
    finish_reason: str
    num_ignored: int
    hit_budget: bool
    thinking: str
    reply: str = Field(description="Its answer text.")

    @field_validator("confidence", mode="before")
    @classmethod
    def _finite(cls, value):
        return value if value is None or math.isfinite(value) else None  # JSON has no inf

    @field_validator("confs", mode="before")
    @classmethod
    def _finite_list(cls, values):
        return None if values is None else [v if v is None or math.isfinite(v) else None for v in values]


class PolicyReport(BaseModel):
    """How a test-time policy decided (a t0s1 extension, with ``policy``)."""

    policy: str = Field(description="Its name and every parameter that differs from its default, e.g. "
                        "deepconf[n=8,mode=online].")
    voted: str | None = Field(description="The winning extracted answer (null: no trace gave one).")
    total_tokens: int = Field(description="Every token generated: all traces, probes and dropped branches.")
    probes: int = Field(description="Side branches started (trial answers, probes).")
    traces: list[TraceReport] | None = _omitted_when_null("With return_traces: every trace.")


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
    policy: PolicyReport | None = _omitted_when_null("With a policy: how it decided.")


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
    policy: PolicyReport | None = _omitted_when_null("With a policy: how it decided.")


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
