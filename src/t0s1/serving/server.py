"""An OpenAI-compatible server with budget forcing: ``create_app(lm, defaults)``.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``GET /health``. Besides the usual OpenAI fields a request may set the budget forcing of its own
generation: ``max_thinking_tokens`` (alias ``thinking_budget``; an integer or "auto"),
``num_ignore`` and ``ignore_str``; the server's defaults fill in the rest. ``max_tokens`` (or
``max_completion_tokens``) caps the answer, after the thinking.

Replies carry the thinking apart from the answer, as vLLM and DeepSeek do: ``reasoning_content``
(and ``reasoning``) beside ``content``, and ``usage.completion_tokens_details.reasoning_tokens``.
A streamed reply sends the thinking deltas, then the answer deltas, then ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from t0s1.errors import UserError
from t0s1.forcing import BudgetForcing, RenderedPrompt, Result, render_prompt, resolve_budget
from t0s1.models import LoadedModel
from t0s1.serving.batcher import Batcher, Job
from t0s1.serving.ui import UIInfo, mount_ui

DISCONNECT_POLL_SECONDS = 0.5
"""How often a waiting non-streamed request checks whether its client is still there."""

# Request field -> BudgetForcing field. Budget fields are validated by BudgetForcing itself.
BUDGET_FIELDS = {
    "max_thinking_tokens": "max_thinking_tokens",
    "thinking_budget": "max_thinking_tokens",
    "num_ignore": "num_ignore",
    "ignore_str": "ignore_str",
    "max_completion_tokens": "max_answer_tokens",
    "max_tokens": "max_answer_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "end_phrase": "end_phrase",
    "answer_prefix": "answer_prefix",
}


class APIError(Exception):
    """An error reply in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def create_app(lm: LoadedModel, defaults: BudgetForcing | None = None, api_key: str | None = None,
               max_batch: int = 8, ui: bool = True) -> FastAPI:
    """The server for ``lm``. ``defaults``: budget forcing for fields a request leaves out.
    ``api_key``: if set, every ``/v1`` request needs ``Authorization: Bearer <api_key>``.
    ``ui``: serve the web page at ``/`` (``t0s1.serving.ui``)."""
    defaults = defaults or BudgetForcing()
    batcher = Batcher(lm, max_batch)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        try:
            yield
        finally:
            await asyncio.to_thread(batcher.stop)

    app = FastAPI(title="t0-s1 budget forcing server", lifespan=lifespan)
    app.state.batcher = batcher
    app.state.lm = lm

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        return APIError(error.status_code, str(error.detail), code=str(error.status_code)).response()

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception):
        return APIError(500, f"{type(error).__name__}: {error}", kind="server_error").response()

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Missing or wrong API key: send the header 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": lm.name, "queued": batcher.queued, "max_batch": batcher.max_batch,
                **batcher.stats.to_dict()}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": lm.name, "object": "model", "created": created,
                                             "owned_by": "t0s1", "max_model_len": lm.context_length}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        body = await _json_body(request)
        messages = _messages(body.get("messages"))
        if _stop_strings(body) is not None:
            raise APIError(400, "stop is not supported by chat completions: the answer ends at the model's end of "
                           "turn or max_tokens (/v1/completions takes stop for plain continuations).", param="stop")
        budget, stream, include_usage = _common_fields(body, defaults)
        template_kwargs = body.get("chat_template_kwargs")
        if template_kwargs is not None and not isinstance(template_kwargs, dict):
            raise APIError(400, "chat_template_kwargs must be an object, e.g. {\"enable_thinking\": false}.",
                           param="chat_template_kwargs")
        try:
            prompt_ids = render_prompt(lm, messages, template_kwargs)
        except UserError as error:
            raise APIError(400, str(error), param="messages") from None
        _check_context(lm, budget, prompt_ids)
        job = batcher.submit(prompt_ids, budget, stream=stream)
        reply = _Reply("chat.completion", f"chatcmpl-{uuid.uuid4().hex}", lm.name)
        if stream:
            return _event_stream(reply.chat_stream(job, include_usage), job)
        return reply.chat(await _wait(job, request))

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        body = await _json_body(request)
        prompt = _prompt_text(body.get("prompt"))
        for name in ("echo", "logprobs", "suffix"):
            if body.get(name) not in (None, False):
                raise APIError(400, f"{name} is not supported by this server.", param=name)
        budget, stream, include_usage = _common_fields(body, defaults)
        reply = _Reply("text_completion", f"cmpl-{uuid.uuid4().hex}", lm.name)
        stop = _stop_strings(body)
        if stop is not None:
            return await _plain_continuation(lm, batcher, reply, request, body, prompt, budget, stop, stream)
        prompt_ids = completion_prompt_ids(lm, prompt)
        _check_context(lm, budget, prompt_ids)
        job = batcher.submit(prompt_ids, budget, stream=stream)
        if stream:
            return _event_stream(reply.completion_stream(job, include_usage), job)
        return reply.completion(await _wait(job, request))

    if ui:
        mount_ui(app, info=UIInfo.describe(lm, defaults, api_key_required=api_key is not None))
    return app


@contextmanager
def serve_in_background(app: FastAPI, host: str = "127.0.0.1", port: int = 0, *, timeout: float = 60.0):
    """Run ``app`` with uvicorn in a background thread; yields the base URL (``http://host:port``).
    Port 0 picks a free port. The server stops when the block ends."""
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
        server.should_exit = True
        thread.join(timeout)
        sock.close()


def completion_prompt_ids(lm: LoadedModel, prompt: str) -> RenderedPrompt:
    """Ids of a raw ``/v1/completions`` prompt: the text as the client rendered it, then the
    thinking delimiter (unless the prompt already ends with it). No chat template is applied; the
    tokenizer adds its special tokens (e.g. a BOS) as it does for any raw text."""
    start = lm.profile.thinking_start
    text = prompt if prompt.rstrip().endswith(start) else prompt + start
    return RenderedPrompt(list(lm.tokenizer(text).input_ids))


async def _plain_continuation(lm, batcher, reply, request, body, prompt, budget, stop, stream) -> dict:
    """A ``/v1/completions`` request with ``stop``: continue the prompt as it is (no thinking
    delimiter, no forcing) for up to ``max_tokens`` tokens, until the model's end of turn, the
    start of the answer delimiter or a stop string. This is what client-side budget forcing
    (``t0s1 eval --backend openai``) asks of a server, one step at a time."""
    if stream:
        raise APIError(400, "stream is not supported together with stop (a plain continuation).", param="stream")
    for name in ("max_thinking_tokens", "thinking_budget", "num_ignore", "ignore_str"):
        if body.get(name) is not None:
            raise APIError(400, f"{name} cannot be combined with stop: a request with stop is a plain continuation "
                           "without budget forcing.", param=name)
    length = budget.max_answer_tokens
    settings = replace(budget, max_thinking_tokens=length, num_ignore=0, max_answer_tokens=1)
    prompt_ids = list(lm.tokenizer(prompt).input_ids)
    try:
        resolve_budget(lm, settings, len(prompt_ids))
    except UserError:
        room = lm.context_length - len(prompt_ids)
        raise APIError(400, f"The prompt ({len(prompt_ids)} tokens) and max_tokens={length} exceed the model's "
                       f"context of {lm.context_length} tokens; ask for fewer than {room} tokens.",
                       param="max_tokens", code="context_length_exceeded") from None
    job = batcher.submit(prompt_ids, settings, stream=False, stop=stop)
    result = await _wait(job, request)
    text = lm.tokenizer.decode(result.thinking_token_ids, skip_special_tokens=False)
    cut = min((text.find(s) for s in stop if s in text), default=-1)
    if cut >= 0:
        text = text[:cut]
    # The thinking phase ended at a stop token (not the budget, not the context) iff the answer began.
    ended = not result.hit_budget and (result.answer_tokens > 0 or result.finish_reason != "length")
    finish = "stop" if cut >= 0 or ended else "length"
    tokens = result.thinking_tokens
    choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": tokens,
             "total_tokens": result.prompt_tokens + tokens}
    return reply._envelope("text_completion", [choice], usage)


def _stop_strings(body: dict) -> tuple[str, ...] | None:
    stop = body.get("stop")
    if stop in (None, "", []):
        return None
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "stop must be a string or a list of non-empty strings.", param="stop")
    return tuple(stop)


# ---- parsing requests --------------------------------------------------------------------------


async def _json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise APIError(400, f"The request body is not valid JSON: {error}.") from None
    if not isinstance(body, dict):
        raise APIError(400, f"The request body must be a JSON object, got {type(body).__name__}.")
    return body


def _common_fields(body: dict, defaults: BudgetForcing) -> tuple[BudgetForcing, bool, bool]:
    """(budget forcing, stream?, include usage in the stream?) from the fields both endpoints share."""
    n = body.get("n")
    if n is not None and n != 1:
        raise APIError(400, f"n={n!r} is not supported: this server returns one choice per request.", param="n")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise APIError(400, f"stream must be true or false, got {stream!r}.", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "stream_options must be an object.", param="stream_options")
    return budget_from_request(body, defaults), stream, bool(options.get("include_usage"))


def budget_from_request(body: dict, defaults: BudgetForcing) -> BudgetForcing:
    """The request's budget forcing: its fields over the server's defaults (null = default)."""
    if body.get("thinking_budget") is not None and body.get("max_thinking_tokens") is not None:
        raise APIError(400, "Give max_thinking_tokens or its alias thinking_budget, not both.",
                       param="thinking_budget")
    changes, sent_as = {}, {}
    for name, settings_field in BUDGET_FIELDS.items():
        value = body.get(name)
        if value is not None and settings_field not in changes:
            changes[settings_field] = value
            sent_as[settings_field] = name
    try:
        return replace(defaults, **changes)
    except UserError as error:
        message = str(error)
        settings_field = message.split(" ", 1)[0]
        param = sent_as.get(settings_field, settings_field)
        if param != settings_field:
            message = f"{param}: {message}"
        raise APIError(400, message, param=param) from None


def _messages(messages) -> list[dict]:
    """OpenAI chat messages -> ``{"role", "content": str}`` for the chat template."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {'role': ..., 'content': ...} objects.",
                       param="messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a string 'role'.", param="messages")
        role = "system" if message["role"] == "developer" else message["role"]
        converted = {"role": role, "content": _text_content(message.get("content"), f"messages[{i}].content")}
        # Earlier thinking of an assistant turn: the chat template decides whether to keep it.
        reasoning = message.get("reasoning_content") or message.get("reasoning")
        if reasoning is not None:
            if not isinstance(reasoning, str):
                raise APIError(400, f"messages[{i}].reasoning_content must be a string.", param="messages")
            converted["reasoning_content"] = reasoning
        out.append(converted)
    return out


def _text_content(content, where: str) -> str:
    """A message's content: a string, or a list of text parts (joined); null is empty."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"{where}: only text parts ({{'type': 'text', 'text': ...}}) are supported.",
                               param="messages")
            texts.append(part["text"])
        return "".join(texts)
    raise APIError(400, f"{where} must be a string or a list of text parts, got {type(content).__name__}.",
                   param="messages")


def _prompt_text(prompt) -> str:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise APIError(400, "prompt must be a string (one prompt per request; token ids are not supported).",
                       param="prompt")
    if not prompt.strip():
        raise APIError(400, "prompt is empty: give the text to continue.", param="prompt")
    return prompt


def _check_context(lm: LoadedModel, budget: BudgetForcing, prompt: RenderedPrompt) -> None:
    """Refuse, before queueing, a request whose prompt and thinking budget exceed the context."""
    try:
        resolve_budget(lm, budget if prompt.thinking else replace(budget, max_thinking_tokens=0), len(prompt.ids))
    except UserError as error:
        raise APIError(400, str(error), param="max_thinking_tokens", code="context_length_exceeded") from None


# ---- waiting for the engine --------------------------------------------------------------------


class _ClientGone(Exception):
    pass


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
    return APIError(500, f"Generation failed: {type(error).__name__}: {error}", kind="server_error")


def _event_stream(chunks, job: Job) -> StreamingResponse:
    """Server-sent events; a disconnect cancels the stream's task, which cancels the job."""

    async def events():
        try:
            try:
                async for chunk in chunks:
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            except _StreamError as error:
                yield f"data: {json.dumps(error.error.body(), ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # stops the generation if the client left; a no-op once it has finished

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _Reply:
    """Builds replies (whole or chunked) of one request in OpenAI's shapes."""

    def __init__(self, kind: str, reply_id: str, model: str):
        self.kind, self.id, self.model, self.created = kind, reply_id, model, int(time.time())

    def _envelope(self, object_name: str, choices: list, usage: dict | None = None) -> dict:
        out = {"id": self.id, "object": object_name, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    @staticmethod
    def usage(result: Result) -> dict:
        completion = result.thinking_tokens + result.answer_tokens
        return {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": result.prompt_tokens + completion,
            "completion_tokens_details": {"reasoning_tokens": result.thinking_tokens},
        }

    @staticmethod
    def budget_forcing(result: Result) -> dict:
        """What budget forcing did (a t0s1 extension of the reply)."""
        return {"thinking_tokens": result.thinking_tokens, "answer_tokens": result.answer_tokens,
                "num_ignored": result.num_ignored, "hit_budget": result.hit_budget}

    @staticmethod
    def finish_reason(result: Result) -> str:
        return "length" if result.finish_reason == "length" else "stop"

    # chat.completion

    def chat(self, result: Result) -> dict:
        message = {"role": "assistant", "content": result.answer,
                   "reasoning_content": result.thinking, "reasoning": result.thinking}
        choice = {"index": 0, "message": message, "finish_reason": self.finish_reason(result), "logprobs": None}
        out = self._envelope("chat.completion", [choice], self.usage(result))
        out["budget_forcing"] = self.budget_forcing(result)
        return out

    async def chat_stream(self, job: Job, include_usage: bool):
        def chunk(delta: dict, finish_reason: str | None = None) -> dict:
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            return self._envelope("chat.completion.chunk", [choice])

        yield chunk({"role": "assistant", "content": ""})
        async for kind, value in _stream_events(job):
            if kind == "thinking":
                yield chunk({"reasoning_content": value, "reasoning": value})
            elif kind == "answer":
                yield chunk({"content": value})
            else:
                last = chunk({}, self.finish_reason(value))
                last["budget_forcing"] = self.budget_forcing(value)
                yield last
                if include_usage:
                    yield self._envelope("chat.completion.chunk", [], self.usage(value))

    # text_completion

    def completion(self, result: Result) -> dict:
        choice = {"index": 0, "text": result.answer, "reasoning_content": result.thinking,
                  "reasoning": result.thinking, "finish_reason": self.finish_reason(result), "logprobs": None}
        out = self._envelope("text_completion", [choice], self.usage(result))
        out["budget_forcing"] = self.budget_forcing(result)
        return out

    async def completion_stream(self, job: Job, include_usage: bool):
        def chunk(text: str, reasoning: str | None = None, finish_reason: str | None = None) -> dict:
            choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
            if reasoning is not None:
                choice["reasoning_content"] = choice["reasoning"] = reasoning
            return self._envelope("text_completion", [choice])

        async for kind, value in _stream_events(job):
            if kind == "thinking":
                yield chunk("", reasoning=value)
            elif kind == "answer":
                yield chunk(value)
            else:
                last = chunk("", finish_reason=self.finish_reason(value))
                last["budget_forcing"] = self.budget_forcing(value)
                yield last
                if include_usage:
                    yield self._envelope("text_completion", [], self.usage(value))


async def _stream_events(job: Job):
    """The job's ("thinking" | "answer", text) events, then ("result", Result). An engine error
    after the reply has started goes to the client as an ``{"error": ...}`` event."""
    pending = []
    while True:
        pending.append(await job.events.get())
        while not job.events.empty():  # the client is behind: send what has piled up at once
            pending.append(job.events.get_nowait())
        for kind, value in _merge_deltas(pending):
            if kind == "error":
                raise _StreamError(_engine_error(value))
            yield kind, value
            if kind == "result":
                return
        pending = []


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
