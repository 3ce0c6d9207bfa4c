"""An OpenAI-compatible server with budget forcing: ``create_app(lm, defaults)``.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models`` (these need
``Authorization: Bearer KEY`` when the server has a key) and ``GET /health`` (a 503 once the
engine's worker is dead). The request and
reply models are declared in ``t0s1.serving.protocol``; ``/openapi.json`` lists every field. A
request sets the budget forcing of its own generation (``max_thinking_tokens`` or an alias,
``reasoning_effort``, ``num_ignore``, ``ignore_str``, ...); the server's defaults fill in the
rest. Replies carry the thinking apart from the answer (``reasoning`` and ``reasoning_content``),
``usage.completion_tokens_details.reasoning_tokens``, and per choice how the thinking ended.
Streams are server-sent events (``sse-starlette``): thinking deltas, answer deltas, a last chunk
with the finish reason, then ``data: [DONE]``.

Requests run continuously batched (``t0s1.serving.batcher``); ``n`` > 1 is n requests in that
batch (choice j sampled with seed + j), and a request with a test-time ``policy`` runs alone
between batches and answers with the trace that carries its vote. With a retrieval index
(``t0s1.rag``) a chat request is answered over the sources retrieved for its last message, and
the reply lists them (``sources``).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import signal
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace

import anyio
from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from t0s1.errors import UserError
from t0s1.forcing import BudgetForcing, RenderedPrompt, Result, render_prompt
from t0s1.forcing_rules import longest_token_chars
from t0s1.models import LoadedModel
from t0s1.policies import POLICIES, Policy, make_policy
from t0s1.policies.run import rows_at_once
from t0s1.serving.batcher import (
    Batcher,
    Continuation,
    EngineFailed,
    Job,
    ServerBusy,
    ServerShuttingDown,
    continuation_text,
    first_stop,
)
from t0s1.serving.protocol import (
    BODY_BYTES,
    DEFAULT_EFFORT_BUDGETS,
    DEFAULT_MAX_QUEUED,
    SEED_RANGE,
    THINKING_BUDGET_ALIASES,
    AssistantMessage,
    BudgetFields,
    BudgetForcingReport,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
    CompletionTokensDetails,
    ErrorResponse,
    FieldError,
    MAX_N,
    ModelCard,
    ModelList,
    PolicyReport,
    Source,
    Usage,
)
from t0s1.serving.ui import UIInfo, mount_ui

log = logging.getLogger("t0s1.serving")

POLICY_NAMES = tuple(POLICIES)
MAX_TRACES = MAX_N
"""The most traces of one policy request (a policy's default n included)."""

SEND_TIMEOUT_SECONDS = 60
"""A streamed reply whose client takes no event for this long (connected, not reading) is ended
and its generation stopped."""

DISCONNECT_POLL_SECONDS = 0.5
"""How often a waiting non-streamed request checks whether its client is still there."""

SHUTDOWN_GRACE_SECONDS = 5.0
"""At shutdown a stream may take this long to send its error event before it is cut."""

BUSY_RETRY_AFTER_SECONDS = 1
"""The Retry-After of a 503 for a full queue (OpenAI's clients wait that long and retry)."""

HTTP_ERROR_CODES = {413: "request_too_large"}
"""The ``code`` of the errors Starlette raises, where t0s1 has a name for them (one name whichever
way the error is found: a 413 from Content-Length or from the bytes counted)."""

SHOWN_VALUE_CHARS = 100
"""The most of a bad field's value that an error message repeats."""

SNIPPET_CHARS = 300
"""How much of a source's best chunk a reply shows."""

ERROR_RESPONSES = {
    400: {"model": ErrorResponse, "description": "A field that cannot be honoured; error.param names it."},
    401: {"model": ErrorResponse, "description": "A missing or wrong API key."},
    413: {"model": ErrorResponse, "description": f"A request body over {BODY_BYTES} bytes."},
    503: {"model": ErrorResponse, "description": "The server is busy (its queue is full: retry after the "
          "Retry-After header's seconds), shutting down, or its engine has failed."},
}


class APIError(Exception):
    """An error reply in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.retry_after = retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        return JSONResponse(self.body(), status_code=self.status, headers=headers or None)


def create_app(lm: LoadedModel, defaults: BudgetForcing | None = None, api_key: str | None = None,
               max_batch: int = 8, ui: bool = True, *, effort_budgets: dict[str, int | str] | None = None,
               index=None, rag_defaults=None, max_queued: int = DEFAULT_MAX_QUEUED) -> FastAPI:
    """The server for ``lm``. ``defaults``: budget forcing for fields a request leaves out (a
    request without a ``seed`` samples with a fresh one). ``api_key``: if set, every ``/v1``
    request needs ``Authorization: Bearer <api_key>``. ``max_batch``: the most sequences generated
    together; ``max_queued``: the most requests waiting for the batch (more are a 503 with
    Retry-After; a request with n choices takes n places). ``ui``: serve the web page at ``/`` (``t0s1.serving.ui``). ``effort_budgets``: the
    thinking budget of each ``reasoning_effort``. ``index``: a ``t0s1.rag.Index`` to retrieve
    sources from for chat requests, with ``rag_defaults`` (a ``RagRequest``) for requests that
    leave ``rag`` out."""
    from t0s1.rag import RagRequest

    defaults = defaults or BudgetForcing()
    efforts = {**DEFAULT_EFFORT_BUDGETS, **(effort_budgets or {})}
    batcher = Batcher(lm, max_batch, max_queued)
    prompt_chars = _prompt_chars_limit(lm)
    retrieval = _Retrieval(lm, index, rag_defaults or RagRequest()) if index is not None else None
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        restore_signals = _shut_down_on_exit_signals(batcher)
        try:
            yield
        finally:
            restore_signals()
            await asyncio.to_thread(batcher.stop)

    app = FastAPI(title="t0-s1 budget forcing server", version="2", lifespan=lifespan,
                  description="OpenAI-compatible chat and completions with budget forcing per request.")
    app.state.batcher = batcher
    app.state.lm = lm
    app.add_middleware(_BodyLimit, limit=BODY_BYTES)

    bearer = HTTPBearer(auto_error=False, description="The key the server was started with (--api-key).")

    def require_api_key(credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
        if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), api_key.encode()):
            raise APIError(401, "Missing or wrong API key: send the header 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return error.response()

    async def key_refused(request: Request) -> JSONResponse | None:
        """FastAPI parses a request's body before it runs the dependencies: a body it cannot parse
        must not tell a client without the key more than a 401 does."""
        if api_key is None or not request.url.path.startswith("/v1/"):
            return None
        try:
            require_api_key(await bearer(request))
        except APIError as refused:
            return refused.response()
        return None

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        return await key_refused(request) or _validation_error(error).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        refused = await key_refused(request) if error.status_code == 400 else None
        code = HTTP_ERROR_CODES.get(error.status_code, str(error.status_code))
        return refused or APIError(error.status_code, str(error.detail), code=code).response()

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception):
        log.exception("Unexpected error")
        return APIError(500, f"{type(error).__name__}: {error}", kind="server_error").response()

    keyed = [Security(require_api_key)] if api_key is not None else []  # on every /v1 route

    @app.get("/health", responses={503: {"description": "The engine's worker is dead (error says why): restart the server."}})
    async def health():
        """Open without a key: the model, the queue and the worker's counters; a 503 once the
        engine's worker is dead (the server then exits, for a supervisor to restart it)."""
        report = {"status": "ok", "model": lm.name, "queued": batcher.queued, "running": batcher.running,
                  "max_batch": batcher.max_batch, "max_queued": batcher.max_queued, "retrieval": retrieval is not None, **batcher.stats.to_dict()}
        if batcher.alive:
            return report
        reason = batcher.failure or "the engine's worker is not running"
        return JSONResponse({**report, "status": "failed", "error": str(reason)}, status_code=503)

    @app.get("/v1/models", dependencies=keyed, responses=ERROR_RESPONSES)
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=lm.name, created=created, max_model_len=lm.context_length)])

    @app.post("/v1/chat/completions", response_model=ChatCompletion, dependencies=keyed,
              responses={**ERROR_RESPONSES, 200: _streamed("ChatCompletionChunk", "A chat completion")})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        _refuse(body.stop, "stop", "stop is not taken by chat completions: the answer ends at the model's end of turn or "
                "max_tokens (/v1/completions takes stop for plain continuations).")
        _refuse(body.logprobs, "logprobs", "logprobs are not supported by this server.")
        _log_ignored(body)
        with _field_errors_as_400():
            template_kwargs = body.template_variables()
        settings = _settings(body, defaults, efforts, template_kwargs)
        policy = _policy(body, settings, lm, batcher.max_batch)
        messages, sources = body.template_messages(), None
        _check_prompt_chars(sum(len(message["content"]) for message in messages), prompt_chars, lm, "messages")
        rag = _rag_settings(body, retrieval)
        if rag is not None:
            messages, sources = await retrieval.prompt(messages, rag, settings)
        try:  # tokenizing a long prompt takes a while: not on the event loop, which serves every client
            prompt = await asyncio.to_thread(render_prompt, lm, messages, template_kwargs)
        except UserError as error:
            raise APIError(400, str(error), param="messages") from None
        jobs = _submit_all(batcher, body, prompt, settings, policy, prompt_field="messages")
        reply = _ChatReply(f"chatcmpl-{uuid.uuid4().hex}", lm.name, jobs, prompt, sources)
        if body.stream:
            return _event_stream(reply.stream(bool(body.stream_options and body.stream_options.include_usage)), jobs[0])
        if policy is not None:
            return _json(reply.voted(await _wait(jobs[0], request), bool(body.return_traces)))
        return _json(reply.whole(await _wait_all(jobs, request)))

    @app.post("/v1/completions", response_model=Completion, dependencies=keyed,
              responses={**ERROR_RESPONSES, 200: _streamed("Completion", "A completion")})
    async def completions(body: CompletionRequest, request: Request):
        _refuse(body.echo, "echo", "echo is not supported by this server.")
        _refuse(body.logprobs, "logprobs", "logprobs are not supported by this server.")
        _refuse(body.suffix, "suffix", "suffix is not supported by this server.")
        _log_ignored(body)
        if not body.text.strip():
            raise APIError(400, "prompt is empty: give the text to continue.", param="prompt")
        reply_id = f"cmpl-{uuid.uuid4().hex}"
        if body.plain_continuation:
            for name in ("policy", "policy_args", "return_traces"):
                _refuse(getattr(body, name), name, f"{name} cannot be combined with stop: a request with stop is a "
                        "plain continuation without budget forcing.")
            _refuse((body.n or 1) > 1, "n", "n > 1 is not supported together with stop (a plain continuation): send "
                    "one request per continuation.")
            _check_prompt_chars(len(body.text), prompt_chars, lm, "prompt")
            return await _plain_continuation(lm, batcher, reply_id, request, body, defaults, efforts)
        for name in ("min_tokens", "skip_special_tokens"):
            _refuse(getattr(body, name), name, f"{name} applies to plain continuations (a request with stop or "
                    "stop_token_ids); a budget-forced reply keeps the thinking and the answer apart instead.")
        settings = _settings(body, defaults, efforts)
        policy = _policy(body, settings, lm, batcher.max_batch)
        _check_prompt_chars(len(body.text), prompt_chars, lm, "prompt")
        prompt = await asyncio.to_thread(completion_prompt_ids, lm, body.text)
        jobs = _submit_all(batcher, body, prompt, settings, policy, prompt_field="prompt")
        reply = _CompletionReply(reply_id, lm.name, jobs, prompt)
        if body.stream:
            return _event_stream(reply.stream(bool(body.stream_options and body.stream_options.include_usage)), jobs[0])
        if policy is not None:
            return _json(reply.voted(await _wait(jobs[0], request), bool(body.return_traces)))
        return _json(reply.whole(await _wait_all(jobs, request)))

    _declare_stream_chunks(app, ChatCompletionChunk)
    _declare_model_limits(app, lm, retrieval=retrieval is not None)
    if ui:
        mount_ui(app, info=UIInfo.describe(lm, defaults, api_key_required=api_key is not None,
                                           retrieval=retrieval is not None))
    return app


def _prompt_chars_limit(lm: LoadedModel) -> int | None:
    """The most characters a prompt that fits the context can have: the context length x the
    longest entry of the vocabulary (a byte-level entry is at least as long as the text it
    decodes to). None: no context length known."""
    if not lm.context_length:
        return None
    return lm.context_length * longest_token_chars(lm.tokenizer)


def _check_prompt_chars(chars: int, limit: int | None, lm: LoadedModel, param: str) -> None:
    """A 400 at once for a prompt too long in characters to fit the context, before it is
    rendered and tokenized (megabytes of text take seconds of CPU to tokenize)."""
    if limit is not None and chars > limit:
        raise APIError(400, f"The prompt has {chars:,} characters: more than the model's context of {lm.context_length:,} "
                       "tokens can hold whatever the tokens (at most the vocabulary's longest entry each). Shorten it.",
                       param=param, code="context_length_exceeded")


def _streamed(chunk: str, whole: str) -> dict:
    """The OpenAPI description of a reply that is JSON, or with ``stream`` server-sent chunks."""
    return {"description": f"{whole}, or with stream: server-sent {chunk} events, then [DONE].",
            "content": {"text/event-stream": {"itemSchema": {"$ref": f"#/components/schemas/{chunk}"}}}}


def _declare_stream_chunks(app: FastAPI, *models) -> None:
    """Add the streamed chunk models to the schema's components: the ``text/event-stream``
    replies refer to them (``itemSchema``, as FastAPI's own SSE routes do)."""
    from pydantic.json_schema import models_json_schema

    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            _, definitions = models_json_schema([(model, "serialization") for model in models],
                                                ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, definition in definitions.get("$defs", {}).items():
                components.setdefault(name, definition)
        return app.openapi_schema

    app.openapi = openapi


def _declare_model_limits(app: FastAPI, lm: LoadedModel, *, retrieval: bool) -> None:
    """Add to the schema the limits that depend on the model: token counts up to its context,
    ``stop_token_ids`` within its vocabulary, and ``rag.k`` 0 on a server without an index (the
    server refuses anything beyond them with a 400)."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            components = build().get("components", {}).get("schemas", {})
            for name in ("ChatCompletionRequest", "CompletionRequest"):
                fields = components.get(name, {}).get("properties", {})
                for field in ("max_tokens", "max_completion_tokens", *THINKING_BUDGET_ALIASES):
                    for option in fields.get(field, {}).get("anyOf", []):
                        if option.get("type") == "integer" and lm.context_length:
                            option["maximum"] = lm.context_length
                for option in fields.get("stop_token_ids", {}).get("anyOf", []):
                    if option.get("type") == "array":
                        option["items"]["maximum"] = lm.vocab_size - 1
            if not retrieval and "RagRequest" in components:
                components["RagRequest"]["properties"]["k"]["maximum"] = 0
        return app.openapi_schema

    app.openapi = openapi


def _shut_down_on_exit_signals(batcher: Batcher):
    """On SIGTERM or Ctrl-C stop the running generations at once (within one decode step) and
    answer them, and what is queued, with an error; then let the server shut down as it would
    (uvicorn's graceful shutdown would otherwise wait for every generation to finish). Chains onto
    the handlers the server installed; only where signals can be handled (the main thread).
    Returns a function that puts the previous handlers back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {}
    for number in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(number)
        if not callable(handler):
            continue

        def shut_down(sig, frame, handler=handler):
            batcher.shutdown()
            handler(sig, frame)

        previous[number] = handler
        signal.signal(number, shut_down)

    def restore() -> None:
        for number, handler in previous.items():
            signal.signal(number, handler)

    return restore


@contextmanager
def serve_in_background(app: FastAPI, host: str = "127.0.0.1", port: int = 0, *, timeout: float = 60.0):
    """Run ``app`` with uvicorn in a background thread; yields the base URL (``http://host:port``).
    Port 0 picks a free port. The server stops when the block ends (running requests are answered
    with an error, as at any shutdown)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="t0s1-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"The server did not start on {host}:{port}.")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        batcher = getattr(app.state, "batcher", None)
        if batcher is not None:
            batcher.shutdown()
        server.should_exit = True
        thread.join(timeout)
        sock.close()


def completion_prompt_ids(lm: LoadedModel, prompt: str) -> RenderedPrompt:
    """Ids of a raw ``/v1/completions`` prompt: the text as the client rendered it, then the
    thinking delimiter (unless the prompt already ends with it). No chat template is applied; the
    tokenizer adds its special tokens (e.g. a BOS) as it does for any raw text."""
    start = lm.profile.thinking_start
    text = prompt if prompt.rstrip().endswith(start) else prompt + start
    return RenderedPrompt(text_prompt_ids(lm, text))


def text_prompt_ids(lm: LoadedModel, text: str) -> list[int]:
    """Ids of a ``/v1/completions`` prompt's text, as vLLM makes them: the tokenizer's special
    tokens added (a tokenizer that adds a BOS adds it)."""
    return list(lm.tokenizer(text).input_ids)


# ---- requests -------------------------------------------------------------------------------------


def _refuse(value, param: str, message: str) -> None:
    if value not in (None, False, "", []):
        raise APIError(400, message, param=param)


_warned: set[str] = set()
WARNED_NAMES = 256  # at most this many names remembered (clients choose them)


def _log_ignored(body: BudgetFields) -> None:
    """Undeclared fields that are not about thinking (other OpenAI options) are ignored, as other
    OpenAI-compatible servers ignore them; the server log says so once per name."""
    for name in body.ignored_fields():
        if name not in _warned and len(_warned) < WARNED_NAMES:
            _warned.add(name)
            log.warning("Ignoring the request field %r: this server does not use it.", name)


@contextmanager
def _field_errors_as_400():
    """A request field the checks refuse (``FieldError``) as a 400 naming it."""
    try:
        yield
    except FieldError as error:
        raise APIError(400, error.message, param=error.param, code=error.code) from None


def _settings(body: BudgetFields, defaults: BudgetForcing, efforts: dict, template_kwargs: dict | None = None) -> BudgetForcing:
    with _field_errors_as_400():
        return body.budget_forcing(defaults, efforts, template_kwargs)


def _budget_field(body: BudgetFields) -> str | None:
    """The field the client set the thinking budget with, if any."""
    for name in (*THINKING_BUDGET_ALIASES, "reasoning_effort"):
        if getattr(body, name) is not None:
            return name
    return None


def _submit(batcher: Batcher, body: BudgetFields, prompt: RenderedPrompt, settings: BudgetForcing, *, stream: bool,
            prompt_field: str, continuation: Continuation | None = None, policy: Policy | None = None) -> Job:
    """Queue the request; a prompt and budget that do not fit the context are a 400 here, before
    anything is streamed."""
    try:
        return batcher.submit(prompt, settings, stream=stream, continuation=continuation, policy=policy)
    except UserError as error:
        param = "max_tokens" if continuation is not None else _budget_field(body) or prompt_field
        raise APIError(400, str(error), param=param, code="context_length_exceeded") from None
    except ServerBusy as error:
        raise _busy(error) from None
    except ServerShuttingDown as error:
        raise APIError(503, str(error), code="server_shutting_down", kind="server_error") from None
    except EngineFailed as error:
        raise APIError(503, str(error), code="engine_failed", kind="server_error") from None


def _busy(error: ServerBusy) -> APIError:
    return APIError(503, str(error), code="server_busy", kind="server_error", retry_after=BUSY_RETRY_AFTER_SECONDS)


def _policy(body: BudgetFields, settings: BudgetForcing, lm: LoadedModel, max_batch: int) -> Policy | None:
    """The request's test-time policy (None: none); a 400 for what cannot run. ``n`` > 1 without
    a policy is n independent choices, which cannot be streamed."""
    if body.policy is None:
        for name in ("policy_args", "return_traces"):
            _refuse(getattr(body, name), name, f"{name} applies to a request with a policy; add policy (one of "
                    f"{', '.join(POLICY_NAMES)}) or leave {name} out.")
        _refuse(body.stream and (body.n or 1) > 1, "n", "n > 1 cannot be streamed: send stream false (the n choices "
                "come together) or one streamed request per choice.")
        return None
    _refuse(body.stream, "stream", f"stream is not supported with a policy: {body.policy} decides among its traces "
            "only once they end, so nothing can be sent before. Send stream false.")
    args = dict(body.policy_args or {})
    _refuse("n" in args, "policy_args", "give the number of traces as the request's n, not in policy_args.")
    try:  # checked with the request's n: a parameter may be valid only with it (deepconf's warm-up, m of k)
        policy = make_policy(body.policy, args, n=body.n)
    except UserError as error:
        about_n = str(error).startswith("n must") or "n=" in str(error)
        raise APIError(400, str(error), param="n" if about_n else "policy_args") from None
    if policy.n > MAX_TRACES:
        raise APIError(400, f"{body.policy} runs n={policy.n} traces; this server runs at most {MAX_TRACES}.", param="n")
    rows = rows_at_once(policy)
    if rows > max_batch:
        raise APIError(400, f"{body.policy} with n={policy.n} runs {rows} sequences at once; this server "
                       f"runs at most {max_batch} (its --max-batch): lower n.", param="n")
    if getattr(policy, "top_k", 0) > lm.vocab_size:
        raise APIError(400, f"{body.policy}: top_k={policy.top_k} is more candidates than the model's vocabulary of "
                       f"{lm.vocab_size} ids.", param="policy_args")
    if policy.parallel and policy.n > 1 and settings.greedy:
        raise APIError(400, f"policy {body.policy!r} with n={policy.n} needs sampling: greedy traces are all the same. "
                       "Give a temperature, e.g. temperature 0.6 and top_p 0.95 (DeepConf's and s1's settings).",
                       param="temperature")
    return policy


def _seeded(settings: BudgetForcing, count: int) -> BudgetForcing:
    """Sampled settings with a seed (a fresh one if the request has none), so that trace or choice
    j is sampled with seed + j and the reply can say which seed."""
    if settings.greedy:
        return settings
    seed = settings.seed if settings.seed is not None else secrets.randbits(63)
    if seed + count - 1 > SEED_RANGE["le"]:
        raise APIError(400, f"seed={seed} leaves no room for {count} seeds (seed + j up to seed + {count - 1} must be at "
                       f"most {SEED_RANGE['le']}): give a smaller seed.", param="seed")
    return replace(settings, seed=seed)


def _submit_all(batcher: Batcher, body: BudgetFields, prompt: RenderedPrompt, settings: BudgetForcing,
                policy: Policy | None, *, prompt_field: str) -> list[Job]:
    """One job with a policy (run alone), else ``n`` jobs in the batch (choice j: seed + j)."""
    if policy is not None:
        return [_submit(batcher, body, prompt, _seeded(settings, policy.n), stream=False, prompt_field=prompt_field,
                        policy=policy)]
    count = body.n or 1
    if count == 1:
        return [_submit(batcher, body, prompt, settings, stream=bool(body.stream), prompt_field=prompt_field)]
    settings = _seeded(settings, count)
    try:
        batcher.check_room(count)  # all n choices or none
    except ServerBusy as error:
        raise _busy(error) from None
    jobs: list[Job] = []
    try:
        for j in range(count):
            choice = settings if settings.greedy else replace(settings, seed=settings.seed + j)
            jobs.append(_submit(batcher, body, prompt, choice, stream=False, prompt_field=prompt_field))
    except APIError:
        for job in jobs:
            job.cancel()
        raise
    return jobs


def _validation_error(error: RequestValidationError) -> APIError:
    """FastAPI's validation errors as one OpenAI error naming the first field at fault."""
    errors = error.errors()
    first = errors[0] if errors else {}
    location = [part for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid" or not location or not isinstance(location[0], str):
        detail = first.get("ctx", {}).get("error") or first.get("msg", "invalid body")
        if first.get("type") == "json_invalid":
            return APIError(400, f"The request body is not valid JSON: {detail}.")
        return APIError(400, f"The request body must be a JSON object with the request's fields: {first.get('msg')}.")
    param = location[0]
    same_field = [e for e in errors if [p for p in e.get("loc", ()) if p != "body"][:1] == [param]]
    messages = list(dict.fromkeys(e["msg"] for e in same_field))
    where = ".".join(str(part) for part in location[: 1 if len(same_field) > 1 else None])
    got = first.get("input")
    shown = f" (got {_clipped(repr(got))})" if first.get("type") != "missing" and not isinstance(got, dict | list) else ""
    return APIError(400, f"{where}: {'; or '.join(messages)}{shown}.", param=param)


def _clipped(text: str, most: int = SHOWN_VALUE_CHARS) -> str:
    """``text`` cut to ``most`` characters, saying how long it was: an error never echoes a
    client's megabytes back."""
    return text if len(text) <= most else f"{text[:most]}... ({len(text):,} characters)"


# ---- retrieval ------------------------------------------------------------------------------------


class _Retrieval:
    """Sources for chat requests from a ``t0s1.rag`` index (docs/rag.md, "Calling it from a server")."""

    def __init__(self, lm: LoadedModel, index, defaults):
        self.lm, self.index, self.defaults = lm, index, defaults
        self.lock = threading.Lock()  # one search at a time: the index's embedder is one torch model

    async def prompt(self, messages: list[dict], rag, settings: BudgetForcing) -> tuple[list[dict], list[Source]]:
        """The conversation with the sources for its last (user) message, and those sources."""
        from t0s1.rag import build_rag_messages, reserve_tokens

        if messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
            raise APIError(400, "Retrieval searches for the last message, which must be a non-empty user message "
                           '(or send "rag": {"k": 0}).', param="messages")
        question = messages[-1]["content"]
        hits = await asyncio.to_thread(self._search, question, rag)
        try:
            packed = await asyncio.to_thread(  # tokenizing the packed prompt: not on the event loop
                build_rag_messages, self.lm.tokenizer, question, hits, context_length=self.lm.context_length,
                reserved=reserve_tokens(settings, self.lm.context_length), history=messages[:-1])
        except UserError as error:
            raise APIError(400, str(error), param="messages", code="context_length_exceeded") from None
        sources = [Source(number=n, **hit.to_dict(snippet_chars=SNIPPET_CHARS)) for n, hit in enumerate(packed.sources, 1)]
        return packed.messages, sources

    def _search(self, question: str, rag):
        from t0s1.rag import retrieve_sources

        with self.lock:
            try:
                return retrieve_sources(self.index, question, rag.k, rag.retriever)
            except UserError as error:
                raise APIError(400, str(error), param="rag") from None


def _rag_settings(body: ChatCompletionRequest, retrieval: _Retrieval | None):
    """The request's retrieval settings over the server's; None: no retrieval for this request."""
    if retrieval is None:
        if body.rag is not None and body.rag.k > 0:
            raise APIError(400, "rag: this server has no retrieval index (start it with --index DIR), so it cannot "
                           'retrieve sources; leave rag out or send {"k": 0}.', param="rag")
        return None
    rag = retrieval.defaults
    if body.rag is not None:
        rag = rag.model_copy(update={name: getattr(body.rag, name) for name in body.rag.model_fields_set})
    return rag if rag.k > 0 else None


def _cited(sources: list[Source] | None, answer: str) -> list[Source] | None:
    from t0s1.rag.prompt import cited_sources

    if not sources:
        return sources
    cited = set(cited_sources(answer, len(sources)))
    return [source.model_copy(update={"cited": source.number in cited}) for source in sources]


# ---- waiting for the engine -----------------------------------------------------------------------


class _ClientGone(Exception):
    pass


async def _wait_all(jobs: list[Job], request: Request) -> list[Result]:
    """Every job's result (they run together in the batch); if one fails, the others are cancelled."""
    try:
        return [await _wait(job, request) for job in jobs]
    except BaseException:
        for job in jobs:
            job.cancel()
        raise


async def _wait(job: Job, request: Request) -> Result:
    """The job's result; cancels the job if the client disconnects while it waits."""
    try:
        while True:
            try:
                kind, value = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_SECONDS)
            except TimeoutError:
                if await request.is_disconnected():
                    raise _ClientGone() from None
                continue
            if kind == "result":
                return value
            if kind == "error":
                raise _engine_error(value)
    except _ClientGone:
        job.cancel()
        raise APIError(499, "The client closed the request.", kind="client_closed") from None
    except asyncio.CancelledError:
        job.cancel()
        raise


def _engine_error(error: Exception) -> APIError:
    if isinstance(error, UserError):
        return APIError(400, str(error))
    if isinstance(error, ServerShuttingDown):
        return APIError(503, str(error), code="server_shutting_down", kind="server_error")
    if isinstance(error, EngineFailed):
        return APIError(503, str(error), code="engine_failed", kind="server_error")
    return APIError(500, f"Generation failed for this request: {type(error).__name__}: {error}", kind="server_error")


def _json(model) -> JSONResponse:
    return JSONResponse(model.model_dump(mode="json"))


def _event_stream(chunks, job: Job) -> EventSourceResponse:
    """Server-sent events: each chunk as JSON, an engine error as an ``{"error": ...}`` event, then
    ``[DONE]``. A client that disconnects cancels the stream, which cancels the job."""

    async def events():
        try:
            try:
                async for chunk in chunks:
                    yield {"data": chunk.model_dump_json()}
            except _StreamError as error:
                yield {"data": ErrorResponse.model_validate(error.error.body()).model_dump_json()}
            yield {"data": "[DONE]"}
        finally:
            job.cancel()  # stops the generation if the client left; a no-op once it has finished

    return EventSourceResponse(events(), sep="\n", headers={"Cache-Control": "no-cache"}, send_timeout=SEND_TIMEOUT_SECONDS,
                               shutdown_event=anyio.Event(), shutdown_grace_period=SHUTDOWN_GRACE_SECONDS)


async def _stream_events(job: Job):
    """The job's ("thinking" | "answer", text) events, then ("result", Result). Deltas that piled
    up while the client was behind go out as one. An engine error raises ``_StreamError``."""
    while True:
        pending = [await job.events.get()]
        while not job.events.empty():
            pending.append(job.events.get_nowait())
        for kind, value in _merge_deltas(pending):
            if kind == "error":
                raise _StreamError(_engine_error(value))
            yield kind, value
            if kind == "result":
                return


def _merge_deltas(events: list[tuple[str, object]]) -> list[tuple[str, object]]:
    """Consecutive text deltas of the same channel as one delta (fewer, larger chunks)."""
    merged: list[tuple[str, object]] = []
    for kind, value in events:
        if merged and kind in ("thinking", "answer") and merged[-1][0] == kind:
            merged[-1] = (kind, merged[-1][1] + value)
        else:
            merged.append((kind, value))
    return merged


class _StreamError(Exception):
    def __init__(self, error: APIError):
        super().__init__(error.message)
        self.error = error


# ---- replies --------------------------------------------------------------------------------------


def usage(result: Result) -> Usage:
    completion = result.thinking_tokens + result.answer_tokens
    return Usage(prompt_tokens=result.prompt_tokens, completion_tokens=completion,
                 total_tokens=result.prompt_tokens + completion,
                 completion_tokens_details=CompletionTokensDetails(reasoning_tokens=result.thinking_tokens))


def finish_reason(result: Result) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def budget_report(result: Result, job: Job, prompt: RenderedPrompt) -> BudgetForcingReport:
    """How the thinking ended: off (no thinking), budget (forced), context (never ended), natural."""
    if job.policy is not None:  # its traces ran on their own sequences: read the result alone
        still_thinking = result.finish_reason == "length" and not result.answer_tokens and not result.hit_budget
    else:
        still_thinking = job.sequence.thinking
    if not prompt.thinking:
        end = "off"
    elif result.hit_budget:
        end = "budget"
    elif still_thinking:
        end = "context"
    else:
        end = "natural"
    return BudgetForcingReport(thinking_end=end, thinking_tokens=result.thinking_tokens,
                               max_thinking_tokens=job.sequence.max_thinking, num_ignored=result.num_ignored,
                               hit_budget=result.hit_budget, answer_tokens=result.answer_tokens, seed=result.seed)


def total_usage(results: list[Result]) -> Usage:
    """The usage of n choices of one prompt: the prompt once, every choice's tokens."""
    thinking = sum(r.thinking_tokens for r in results)
    completion = thinking + sum(r.answer_tokens for r in results)
    return Usage(prompt_tokens=results[0].prompt_tokens, completion_tokens=completion,
                 total_tokens=results[0].prompt_tokens + completion,
                 completion_tokens_details=CompletionTokensDetails(reasoning_tokens=thinking))


def policy_usage(outcome) -> Usage:
    """A policy's usage: every token it generated (traces, probes, dropped branches); how many of
    them were thinking is not told apart, so no details."""
    prompt = outcome.result.prompt_tokens
    return Usage(prompt_tokens=prompt, completion_tokens=outcome.total_tokens, total_tokens=prompt + outcome.total_tokens)


def policy_report(outcome, policy: Policy, traces: bool) -> PolicyReport:
    return PolicyReport(policy=policy.label(), voted=outcome.voted, total_tokens=outcome.total_tokens,
                        probes=outcome.probes, traces=[t.to_dict() for t in outcome.traces] if traces else None)


class _Reply:
    def __init__(self, reply_id: str, model: str, jobs: list[Job], prompt: RenderedPrompt):
        self.id, self.model, self.jobs, self.prompt, self.created = reply_id, model, jobs, prompt, int(time.time())
        self.job = jobs[0]

    def envelope(self) -> dict:
        return {"id": self.id, "created": self.created, "model": self.model}

    def report(self, result: Result, job: Job | None = None) -> BudgetForcingReport:
        return budget_report(result, job or self.job, self.prompt)

    def voted(self, outcome, traces: bool):
        """A policy's reply: the trace that carries the vote, and how the policy decided."""
        reply = self.whole([outcome.result])
        reply.usage = policy_usage(outcome)
        reply.policy = policy_report(outcome, self.job.policy, traces)
        return reply


class _ChatReply(_Reply):
    def __init__(self, reply_id, model, job, prompt, sources: list[Source] | None):
        super().__init__(reply_id, model, job, prompt)
        self.sources = sources

    def whole(self, results: list[Result]) -> ChatCompletion:
        choices = []
        for index, (result, job) in enumerate(zip(results, self.jobs, strict=True)):
            message = AssistantMessage(content=result.answer, reasoning=result.thinking,
                                       reasoning_content=result.thinking, sources=_cited(self.sources, result.answer))
            choices.append(ChatChoice(index=index, message=message, finish_reason=finish_reason(result),
                                      budget_forcing=self.report(result, job)))
        return ChatCompletion(**self.envelope(), choices=choices, usage=total_usage(results),
                              budget_forcing=choices[0].budget_forcing)

    def chunk(self, delta: ChatDelta, **choice) -> ChatCompletionChunk:
        return ChatCompletionChunk(**self.envelope(), choices=[ChatChunkChoice(delta=delta, **choice)])

    async def stream(self, include_usage: bool):
        yield self.chunk(ChatDelta(role="assistant", content="", sources=self.sources))  # sources: known before generation
        async for kind, value in _stream_events(self.job):
            if kind == "thinking":
                yield self.chunk(ChatDelta(reasoning=value, reasoning_content=value))
            elif kind == "answer":
                yield self.chunk(ChatDelta(content=value))
            else:
                report = self.report(value)
                last = self.chunk(ChatDelta(sources=_cited(self.sources, value.answer)),
                                  finish_reason=finish_reason(value), budget_forcing=report)
                last.budget_forcing = report
                yield last
                if include_usage:
                    yield ChatCompletionChunk(**self.envelope(), choices=[], usage=usage(value))


class _CompletionReply(_Reply):
    def whole(self, results: list[Result]) -> Completion:
        choices = [CompletionChoice(index=index, text=result.answer, reasoning=result.thinking,
                                    reasoning_content=result.thinking, finish_reason=finish_reason(result),
                                    budget_forcing=self.report(result, job))
                   for index, (result, job) in enumerate(zip(results, self.jobs, strict=True))]
        return Completion(**self.envelope(), choices=choices, usage=total_usage(results),
                          budget_forcing=choices[0].budget_forcing)

    async def stream(self, include_usage: bool):
        async for kind, value in _stream_events(self.job):
            if kind == "thinking":
                yield Completion(**self.envelope(), choices=[CompletionChoice(text="", reasoning=value, reasoning_content=value)])
            elif kind == "answer":
                yield Completion(**self.envelope(), choices=[CompletionChoice(text=value)])
            else:
                report = self.report(value)
                choice = CompletionChoice(text="", finish_reason=finish_reason(value), budget_forcing=report)
                yield Completion(**self.envelope(), choices=[choice], budget_forcing=report)
                if include_usage:
                    yield Completion(**self.envelope(), choices=[], usage=usage(value))


async def _plain_continuation(lm, batcher, reply_id, request, body: CompletionRequest, defaults, efforts) -> JSONResponse:
    """A ``/v1/completions`` request with ``stop`` (or ``stop_token_ids``): continue the prompt as
    it is (no thinking delimiter, no forcing) for up to ``max_tokens`` tokens, until a stop id (the
    model's end of turn and end of thinking, or ``stop_token_ids`` with the end of turn) or a stop
    string. This is what client-side budget forcing (``t0s1 eval --backend openai``) asks of a
    server, one step at a time. vLLM's rules: prompt + ``max_tokens`` must fit the context; stop
    strings are found in the raw text as each token arrives, and the text ends before the first;
    ``usage`` counts every generated token, the one that stopped it included."""
    _refuse(body.stream, "stream", "stream is not supported together with stop (a plain continuation).")
    for name in (*THINKING_BUDGET_ALIASES, "reasoning_effort", "num_ignore", "ignore_str", "end_phrase", "answer_prefix"):
        _refuse(getattr(body, name), name, f"{name} cannot be combined with stop: a request with stop is a plain "
                "continuation without budget forcing.")
    settings = _settings(body, defaults, efforts)
    prompt = RenderedPrompt(await asyncio.to_thread(text_prompt_ids, lm, body.text))
    outside = sorted({token for token in body.stop_token_ids or () if token >= lm.vocab_size})
    if outside:
        raise APIError(400, f"stop_token_ids: {outside[:5]} {'is' if len(outside) == 1 else 'are'} not in the "
                       f"model's vocabulary of {lm.vocab_size} ids (0 to {lm.vocab_size - 1}).", param="stop_token_ids")
    continuation = Continuation(body.stop_strings, tuple(body.stop_token_ids) if body.stop_token_ids is not None else None,
                                body.min_tokens or 0, bool(body.skip_special_tokens),
                                _continuation_length(lm, body, len(prompt.ids), settings.max_answer_tokens))
    job = _submit(batcher, body, prompt, settings, stream=False, prompt_field="prompt", continuation=continuation)
    result = await _wait(job, request)
    text = continuation_text(lm.tokenizer, prompt.ids, result.thinking_token_ids,
                             skip_special_tokens=continuation.skip_special_tokens)
    cut = first_stop(text, continuation.stop)
    if cut >= 0:
        text = text[:cut]
    ended = not result.hit_budget and not job.sequence.thinking  # at a stop id, not the limit or a stop string
    choice = CompletionChoice(text=text, finish_reason="stop" if cut >= 0 or ended else "length")
    tokens = result.thinking_tokens + (ended and cut < 0)  # the stop id was generated too
    reply = Completion(id=reply_id, created=int(time.time()), model=lm.name, choices=[choice],
                       usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=tokens,
                                   total_tokens=result.prompt_tokens + tokens))
    return _json(reply)


def _continuation_length(lm, body: CompletionRequest, prompt_length: int, default: int) -> int:
    """A plain continuation's token limit, vLLM's rule: the prompt plus ``max_tokens`` must fit the
    context. Without ``max_tokens`` the server's default, cut to what the context leaves."""
    context = lm.context_length
    room = context - prompt_length if context else None
    sent = [(name, getattr(body, name)) for name in ("max_tokens", "max_completion_tokens") if getattr(body, name) is not None]
    if sent:
        name, value = sent[0]
        if room is not None and value > room:
            raise APIError(400, f"{name}={value} does not fit the model's context of {context} tokens with a "
                           f"{prompt_length}-token prompt (prompt + {name} must be at most {context}): use at most "
                           f"{max(room, 0)} or shorten the prompt.", param=name, code="context_length_exceeded")
        return value
    if room is not None and room < 1:
        raise APIError(400, f"The prompt has {prompt_length} tokens and fills the model's context of {context}: "
                       "shorten it.", param="prompt", code="context_length_exceeded")
    return min(default, room) if room is not None else default


class _BodyLimit:
    """Refuses a request body over ``limit`` bytes with a 413, before it is parsed: at once when
    its Content-Length says so, else as soon as the bytes received pass the limit."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise StarletteHTTPException(413, self._message())
            return message

        await self.app(scope, limited, send)

    def _message(self) -> str:
        return f"The request body is larger than this server takes ({self.limit} bytes): send less."

    async def _refuse(self, scope, receive, send):
        response = APIError(413, self._message(), code=HTTP_ERROR_CODES[413]).response()
        await response(scope, receive, send)
