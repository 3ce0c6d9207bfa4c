"""The OpenAI-compatible server: the real server on a free loopback port, driven by the official
``openai`` client (and raw HTTP for malformed requests)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from t0s1 import BudgetForcing, UserError, generate
from t0s1.forcing import Engine, render_prompt
from t0s1.serving.server import create_app, serve_in_background

DEFAULTS = BudgetForcing(max_thinking_tokens=24, max_answer_tokens=8)
EFFORTS = {"low": 5, "medium": 12, "high": 30}
QUESTION = [{"role": "user", "content": "How many r are in raspberry?"}]
API_KEY = "test-key-123"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def server(tiny_model, one_torch_thread):
    app = create_app(tiny_model, DEFAULTS, max_batch=8, effort_budgets=EFFORTS)
    with serve_in_background(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client


def chat(client, messages=QUESTION, **extra_body):
    return client.chat.completions.create(model="tiny", messages=messages, extra_body=extra_body or None)


def stream_chat(client, messages=QUESTION, **extra_body):
    """(reasoning, content, order of channels, usage, finish reason, budget_forcing) of a streamed reply."""
    reasoning, content, channels, usage, finish, forcing = [], [], [], None, None, None
    stream = client.chat.completions.create(
        model="tiny", messages=messages, stream=True, stream_options={"include_usage": True}, extra_body=extra_body
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        forcing = (chunk.model_extra or {}).get("budget_forcing") or forcing
        for choice in chunk.choices:
            delta = choice.delta
            if getattr(delta, "reasoning_content", None):
                assert delta.reasoning == delta.reasoning_content
                reasoning.append(delta.reasoning_content)
                channels.append("thinking")
            if delta.content:
                content.append(delta.content)
                channels.append("answer")
            finish = choice.finish_reason or finish
    return "".join(reasoning), "".join(content), channels, usage, finish, forcing


def alone(lm, messages, **settings):
    """The same request run alone through ``t0s1.generate``."""
    return generate(lm, [messages], BudgetForcing(**{"max_thinking_tokens": 24, "max_answer_tokens": 8, **settings}))[0]


def assert_same(reply, result):
    message = reply.choices[0].message
    assert (message.reasoning_content, message.content) == (result.thinking, result.answer)
    forcing = reply.choices[0].model_extra["budget_forcing"]
    assert (forcing["thinking_tokens"], forcing["num_ignored"], forcing["hit_budget"]) == (
        result.thinking_tokens, result.num_ignored, result.hit_budget)


def test_models_and_health(server, client, tiny_model):
    [model] = client.models.list().data
    assert model.id == tiny_model.name and model.model_extra["max_model_len"] == tiny_model.context_length
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["max_batch"] == 8 and health["retrieval"] is False


def test_reply_separates_reasoning_from_answer(client):
    reply = chat(client)
    message = reply.choices[0].message
    assert message.reasoning_content and message.reasoning == message.reasoning_content
    assert isinstance(message.content, str) and message.content
    assert message.reasoning_content not in message.content
    details = reply.usage.completion_tokens_details
    forcing = reply.choices[0].model_extra["budget_forcing"]
    assert reply.model_extra["budget_forcing"] == forcing  # the top-level copy older clients read
    assert details.reasoning_tokens == forcing["thinking_tokens"] <= DEFAULTS.max_thinking_tokens
    assert forcing["max_thinking_tokens"] == DEFAULTS.max_thinking_tokens
    assert reply.usage.completion_tokens == forcing["thinking_tokens"] + forcing["answer_tokens"]
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_reply_equals_the_engine(client, tiny_model):
    expected = alone(tiny_model, QUESTION, max_thinking_tokens=40, num_ignore=1, max_answer_tokens=6)
    reply = chat(client, max_thinking_tokens=40, num_ignore=1, max_tokens=6)
    assert_same(reply, expected)
    assert reply.choices[0].finish_reason == ("length" if expected.finish_reason == "length" else "stop")


@pytest.mark.parametrize("extra", [{}, {"max_thinking_tokens": 40, "num_ignore": 1, "max_tokens": 6}])
def test_streamed_text_equals_the_reply(client, extra):
    reply = chat(client, **extra)
    reasoning, content, channels, usage, finish, forcing = stream_chat(client, **extra)
    message = reply.choices[0].message
    assert reasoning == message.reasoning_content
    assert content == message.content
    assert channels == sorted(channels, key=["thinking", "answer"].index)  # all thinking, then the answer
    assert usage.completion_tokens_details.reasoning_tokens == reply.usage.completion_tokens_details.reasoning_tokens
    assert finish == reply.choices[0].finish_reason
    assert forcing == reply.model_extra["budget_forcing"]


def test_streaming_decodes_incrementally(server, tiny_model, monkeypatch):
    """A streamed reply never decodes its whole text again at each step: the cost of a token does
    not grow with the text (the full decode runs a few times per reply, not once per token)."""
    tokenizer = tiny_model.tokenizer
    calls = []
    original = type(tokenizer).decode

    def counting_decode(self, ids, *args, **kwargs):
        calls.append(len(ids) if hasattr(ids, "__len__") else 1)
        return original(self, ids, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "decode", counting_decode)
    with openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0) as client:
        reasoning, content, *_, forcing = stream_chat(client, max_thinking_tokens=600, num_ignore=30, max_tokens=50)
    generated = forcing["thinking_tokens"] + forcing["answer_tokens"]
    assert generated > 300 and reasoning
    assert len(calls) <= 10, f"{len(calls)} full decodes for {generated} tokens"


def test_thinking_budget_caps_the_thinking_under_every_alias(client):
    reply = chat(client, max_thinking_tokens=5)
    assert reply.usage.completion_tokens_details.reasoning_tokens == 5
    forcing = reply.choices[0].model_extra["budget_forcing"]
    assert forcing["hit_budget"] and forcing["thinking_end"] == "budget"
    assert reply.choices[0].message.content.startswith("Final Answer:")
    for alias in ("thinking_budget", "thinking_token_budget", "thinking_budget_tokens"):
        assert chat(client, **{alias: 5}).choices[0].message == reply.choices[0].message, alias
    agreeing = chat(client, max_thinking_tokens=5, thinking_budget=5, chat_template_kwargs={"thinking_budget": 5})
    assert agreeing.choices[0].message == reply.choices[0].message
    effort = chat(client, reasoning_effort="low")  # the server's low budget: 5
    assert effort.choices[0].message == reply.choices[0].message
    assert chat(client, reasoning_effort="high").choices[0].model_extra["budget_forcing"]["max_thinking_tokens"] == 30


def test_wait_extends_the_thinking(client):
    plain = chat(client, max_thinking_tokens=60, num_ignore=0)
    extended = chat(client, max_thinking_tokens=60, num_ignore=1, ignore_str="Wait")
    first, second = (r.choices[0].model_extra["budget_forcing"] for r in (plain, extended))
    assert first["num_ignored"] == 0 and first["thinking_end"] == "natural"  # the thinking ended by itself
    assert second["num_ignored"] == 1
    thinking = extended.choices[0].message.reasoning_content
    assert thinking.startswith(plain.choices[0].message.reasoning_content) and "Wait" in thinking
    assert second["thinking_tokens"] > first["thinking_tokens"]


def test_thinking_switched_off_is_reported(client):
    off = chat(client, chat_template_kwargs={"enable_thinking": False}, max_thinking_tokens=0)
    forcing = off.choices[0].model_extra["budget_forcing"]
    assert forcing["thinking_end"] == "off" and forcing["thinking_tokens"] == 0
    assert off.choices[0].message.reasoning_content == "" and off.choices[0].message.content


def test_answer_tokens_follow_max_tokens(client):
    reply = chat(client, max_thinking_tokens=3, max_completion_tokens=2)
    assert reply.choices[0].model_extra["budget_forcing"]["answer_tokens"] <= 2


def test_sampled_requests_draw_their_own_seed_and_report_it(client, tiny_model):
    settings = {"max_thinking_tokens": 30, "max_tokens": 6, "temperature": 1.0}
    replies = [chat(client, **settings) for _ in range(3)]
    seeds = [r.choices[0].model_extra["budget_forcing"]["seed"] for r in replies]
    assert len(set(seeds)) == 3 and None not in seeds  # a fresh seed each, not the server's
    assert len({r.choices[0].message.reasoning_content for r in replies}) > 1
    for reply, seed in zip(replies, seeds, strict=True):  # the reported seed reproduces the reply alone
        assert_same(reply, alone(tiny_model, QUESTION, max_thinking_tokens=30, max_answer_tokens=6, temperature=1.0, seed=seed))
    again = chat(client, **settings, seed=seeds[0])
    assert again.choices[0].message == replies[0].choices[0].message
    assert chat(client).choices[0].model_extra["budget_forcing"]["seed"] is None  # greedy


def test_completions_take_raw_prompts(client, tiny_model):
    text = tiny_model.tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    chat_reply = chat(client, max_thinking_tokens=30)
    reply = client.completions.create(model="tiny", prompt=text, extra_body={"max_thinking_tokens": 30})
    choice = reply.choices[0]
    assert choice.text == chat_reply.choices[0].message.content
    assert choice.model_extra["reasoning_content"] == chat_reply.choices[0].message.reasoning_content
    streamed = client.completions.create(model="tiny", prompt=text, stream=True, extra_body={"max_thinking_tokens": 30})
    texts, reasoning = [], []
    for chunk in streamed:
        for part in chunk.choices:
            texts.append(part.text)
            reasoning.append((part.model_extra or {}).get("reasoning_content") or "")
    assert "".join(texts) == choice.text and "".join(reasoning) == choice.model_extra["reasoning_content"]


def test_concurrent_requests_keep_their_own_budgets(server, client, tiny_model):
    prompts = ["How many r are in raspberry?", "What is 12 + 35 * 2?", "Hi", "1+1?", "Count to three"]
    budgets = [(4, 0), (30, 1), (12, 0), (50, 2), (0, 0)]
    expected = [alone(tiny_model, [{"role": "user", "content": p}], max_thinking_tokens=b, num_ignore=k, max_answer_tokens=5)
                for p, (b, k) in zip(prompts, budgets, strict=True)]

    def ask(i):
        if i == len(prompts):  # a bad request in the same burst
            with pytest.raises(openai.BadRequestError):
                chat(client, max_thinking_tokens=-1)
            return None
        b, k = budgets[i]
        return chat(client, [{"role": "user", "content": prompts[i]}], max_thinking_tokens=b, num_ignore=k, max_tokens=5)

    with concurrent.futures.ThreadPoolExecutor(len(prompts) + 1) as pool:
        replies = list(pool.map(ask, range(len(prompts) + 1)))[:-1]
    for reply, result in zip(replies, expected, strict=True):
        assert_same(reply, result)
    assert httpx.get(f"{server}/health").json()["largest_batch"] > 1  # some ran together


def test_a_short_request_joins_a_running_long_one(server, tiny_model):
    """Continuous batching: a short request sent while a long one runs gets its first token before
    the long one finishes, and both replies equal their single-request results."""
    long_request = {"messages": QUESTION, "max_thinking_tokens": 1800, "num_ignore": 60, "max_tokens": 40}
    short_request = {"messages": [{"role": "user", "content": "Hi"}], "max_thinking_tokens": 6, "max_tokens": 3}
    events: dict[str, float] = {}
    long_started = threading.Event()

    def stream(name, body, started=None):
        thinking, answer = [], []
        with httpx.stream("POST", f"{server}/v1/chat/completions", json={**body, "stream": True}, timeout=120) as response:
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                delta = json.loads(line[6:])["choices"][0]["delta"] if json.loads(line[6:])["choices"] else {}
                if delta.get("reasoning_content") or delta.get("content"):
                    events.setdefault(f"{name} first token", time.monotonic())
                    if started is not None:
                        started.set()
                thinking.append(delta.get("reasoning_content") or "")
                answer.append(delta.get("content") or "")
        events[f"{name} done"] = time.monotonic()
        return "".join(thinking), "".join(answer)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        long_reply = pool.submit(stream, "long", long_request, long_started)
        assert long_started.wait(60)
        short_reply = pool.submit(stream, "short", short_request)
        long_text, short_text = long_reply.result(), short_reply.result()
    assert events["short first token"] < events["short done"] < events["long done"]
    for (thinking, answer), body in ((long_text, long_request), (short_text, short_request)):
        expected = alone(tiny_model, body["messages"], max_thinking_tokens=body["max_thinking_tokens"],
                         num_ignore=body.get("num_ignore", 0), max_answer_tokens=body["max_tokens"])
        assert (thinking, answer) == (expected.thinking, expected.answer)
    assert len(long_text[0]) > 10 * len(short_text[0])


def test_one_failing_request_fails_alone(server, client, tiny_model, monkeypatch):
    """A request whose own step raises gets a clear error; the requests beside it finish as if alone,
    and the server goes on serving."""
    sample = Engine._sample

    def failing_sample(self, row, logits, argmax):
        if row.sequence.settings.ignore_str == "Boom":
            raise RuntimeError("this request's sampling failed")
        return sample(self, row, logits, argmax)

    monkeypatch.setattr(Engine, "_sample", failing_sample)
    failed_before = httpx.get(f"{server}/health").json()["failed"]
    settings = [{"max_thinking_tokens": 60, "num_ignore": 1, "max_tokens": 6},
                {"max_thinking_tokens": 40, "num_ignore": 1, "max_tokens": 6, "ignore_str": "Boom"},
                {"max_thinking_tokens": 20, "max_tokens": 4}]

    def ask(extra):
        try:
            return chat(client, **extra)
        except openai.InternalServerError as error:
            return error

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        good, bad, other = pool.map(ask, settings)
    assert isinstance(bad, openai.InternalServerError)
    assert "this request's sampling failed" in bad.body["message"] and bad.body["type"] == "server_error"
    assert_same(good, alone(tiny_model, QUESTION, max_thinking_tokens=60, num_ignore=1, max_answer_tokens=6))
    assert_same(other, alone(tiny_model, QUESTION, max_thinking_tokens=20, max_answer_tokens=4))
    # Streamed, the error arrives as an error event, then [DONE].
    body = {"model": "tiny", "messages": QUESTION, "stream": True, "ignore_str": "Boom", "num_ignore": 1}
    lines = [line for line in httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60).text.splitlines() if line]
    assert "this request's sampling failed" in json.loads(lines[-2][6:])["error"]["message"] and lines[-1] == "data: [DONE]"
    assert httpx.get(f"{server}/health").json()["failed"] == failed_before + 2
    assert chat(client, max_thinking_tokens=2, max_tokens=2).choices[0].message.content  # still serving


def test_a_prompt_that_cannot_be_prefilled_fails_alone(server, client, tiny_model, monkeypatch):
    add = Engine.add

    def failing_add(self, sequences):
        if any("EXPLODE" in tiny_model.tokenizer.decode(s.prompt_ids) for s in sequences):
            raise RuntimeError("prefill failed")
        return add(self, sequences)

    monkeypatch.setattr(Engine, "add", failing_add)
    messages = [[{"role": "user", "content": text}] for text in ("Hi", "EXPLODE", "1+1?", "Count to three")]

    def ask(conversation):
        try:
            return chat(client, conversation, max_thinking_tokens=30, max_tokens=4)
        except openai.InternalServerError as error:
            return error

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(ask, messages))
    assert isinstance(replies[1], openai.InternalServerError) and "prefill failed" in replies[1].body["message"]
    for reply, conversation in zip(replies[::2] + replies[3:], messages[::2] + messages[3:], strict=True):
        assert_same(reply, alone(tiny_model, conversation, max_thinking_tokens=30, max_answer_tokens=4))


def test_disconnect_stops_the_generation(server):
    body = {"model": "tiny", "messages": QUESTION, "max_thinking_tokens": 1500, "max_tokens": 400,
            "num_ignore": 50, "stream": True}
    cancelled = httpx.get(f"{server}/health").json()["cancelled"]
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if "reasoning_content" in line:
                break  # the engine is generating this request; now hang up
    deadline = time.monotonic() + 20
    while httpx.get(f"{server}/health").json()["cancelled"] == cancelled:
        assert time.monotonic() < deadline, "the generation went on after the client left"
        time.sleep(0.2)
    # A non-streamed request whose client times out is cancelled too (long before it could end).
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server}/v1/chat/completions", json={**body, "stream": False}, timeout=0.3)
    deadline = time.monotonic() + 20
    while httpx.get(f"{server}/health").json()["cancelled"] < cancelled + 2:
        assert time.monotonic() < deadline, "the generation went on after the client left"
        time.sleep(0.2)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        ({"model": "tiny"}, "messages"),
        ({"model": "tiny", "messages": "hello"}, "messages"),
        ({"model": "tiny", "messages": [{"role": "user", "content": 3}]}, "messages"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "   "}]}, "messages"),
        ({"model": "tiny", "messages": QUESTION, "max_thinking_tokens": -5}, "max_thinking_tokens"),
        ({"model": "tiny", "messages": QUESTION, "thinking_budget": "lots"}, "thinking_budget"),
        ({"model": "tiny", "messages": QUESTION, "num_ignore": -1}, "num_ignore"),
        ({"model": "tiny", "messages": QUESTION, "max_tokens": 0}, "max_tokens"),
        ({"model": "tiny", "messages": QUESTION, "temperature": "hot"}, "temperature"),
        ({"model": "tiny", "messages": QUESTION, "stream": "yes"}, "stream"),
        ({"model": "tiny", "messages": QUESTION, "n": 65}, "n"),
        ({"model": "tiny", "messages": QUESTION, "stop": ["."]}, "stop"),
        ({"model": "tiny", "messages": QUESTION, "max_thinking_tokens": 5000}, "max_thinking_tokens"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "word " * 3000}]}, "messages"),
        ({"model": "tiny", "messages": QUESTION, "reasoning_effort": "extreme"}, "reasoning_effort"),
        ({"model": "tiny", "messages": QUESTION, "seed": 2**70}, "seed"),
        ({"model": "tiny", "messages": QUESTION, "rag": {"k": 3}}, "rag"),
    ],
)
def test_malformed_requests_get_400_and_the_server_goes_on(server, client, body, param):
    if isinstance(body, bytes):
        kwargs = {"content": body, "headers": {"content-type": "application/json"}}
    else:
        kwargs = {"json": body}
    response = httpx.post(f"{server}/v1/chat/completions", timeout=30, **kwargs)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error" and error["param"] == param
    assert set(error) == {"message", "type", "param", "code"}
    assert chat(client, max_thinking_tokens=2, max_tokens=2).choices[0].message.content  # still serving


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"max_thinking_tokens": 10, "thinking_budget": 20}, "thinking_budget", "disagree"),
        ({"thinking_token_budget": 10, "thinking_budget_tokens": "auto"}, "thinking_budget_tokens", "disagree"),
        ({"max_thinking_tokens": 100, "reasoning_effort": "low"}, "reasoning_effort", "disagree"),
        ({"thinking_budget": 8, "chat_template_kwargs": {"thinking_budget": 9}}, "chat_template_kwargs.thinking_budget", "disagree"),
        ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens", "disagree"),
        ({"max_thinking_tokens": 50, "chat_template_kwargs": {"enable_thinking": False}}, "max_thinking_tokens", "enable_thinking"),
        ({"num_ignore": 2, "chat_template_kwargs": {"enable_thinking": False}}, "num_ignore", "enable_thinking"),
        ({"thinking": {"type": "enabled", "budget_tokens": 100}}, "thinking", "refused rather than ignored"),
        ({"max_reasoning_tokens": 100}, "max_reasoning_tokens", "refused rather than ignored"),
        ({"reasoning": {"effort": "low"}}, "reasoning", "refused rather than ignored"),
        ({"enable_thinking": False}, "enable_thinking", "chat_template_kwargs"),
    ],
)
def test_contradicting_or_unknown_budget_fields_are_refused(client, extra, param, words):
    with pytest.raises(openai.BadRequestError) as refused:
        chat(client, **extra)
    assert refused.value.body["param"] == param and words in refused.value.body["message"]


def test_other_unknown_fields_are_ignored(client):
    plain = chat(client, max_thinking_tokens=6, max_tokens=3)
    extra = chat(client, max_thinking_tokens=6, max_tokens=3, presence_penalty=0, metadata={"a": "b"})
    assert extra.choices[0].message == plain.choices[0].message


def test_openapi_schema_declares_every_field(server):
    schema = httpx.get(f"{server}/openapi.json").json()
    components = schema["components"]["schemas"]
    chat_fields = components["ChatCompletionRequest"]["properties"]
    for name in ("messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stream",
                 "max_thinking_tokens", "thinking_budget", "thinking_token_budget", "thinking_budget_tokens",
                 "reasoning_effort", "num_ignore", "ignore_str", "chat_template_kwargs", "rag"):
        assert name in chat_fields, name
    assert "description" in chat_fields["thinking_token_budget"] and "vLLM" in chat_fields["thinking_token_budget"]["description"]
    assert {"stop", "stop_token_ids", "min_tokens", "skip_special_tokens"} <= set(components["CompletionRequest"]["properties"])
    report = components["BudgetForcingReport"]["properties"]
    assert report["thinking_end"]["enum"] == ["natural", "budget", "off", "context"]
    assert {"reasoning", "reasoning_content"} <= set(components["AssistantMessage"]["properties"])
    assert "ChatCompletionChunk" in components  # what a stream's events hold


def test_openai_client_sees_bad_requests(client):
    with pytest.raises(openai.BadRequestError, match="max_thinking_tokens"):
        chat(client, max_thinking_tokens=-1)
    with pytest.raises(openai.BadRequestError, match="context"):
        chat(client, max_thinking_tokens=10_000)


def test_unknown_route_is_an_openai_error(server):
    response = httpx.get(f"{server}/v1/nothing")
    assert response.status_code == 404 and response.json()["error"]["message"]


def test_api_key_is_required_when_set(tiny_model):
    app = create_app(tiny_model, DEFAULTS, api_key=API_KEY)
    with serve_in_background(app) as url:
        for key in ("wrong-key", f"{API_KEY}-not"):
            with openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0) as bad:
                with pytest.raises(openai.AuthenticationError):
                    chat(bad)
        response = httpx.post(f"{url}/v1/chat/completions", json={"messages": QUESTION})
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
        # The key is checked before the body: a malformed request without it is a 401, not a 400.
        malformed = httpx.post(f"{url}/v1/chat/completions", content=b"{", headers={"content-type": "application/json"})
        assert malformed.status_code == 401
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200
        schema = httpx.get(f"{url}/openapi.json").json()
        assert schema["paths"]["/v1/chat/completions"]["post"]["security"] == [{"HTTPBearer": []}]
        with openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0) as good:
            assert chat(good, max_thinking_tokens=3, max_tokens=2).choices[0].message.content


def test_shutdown_stops_running_work_within_a_step_and_answers_everyone(tiny_model):
    """Running and queued requests are answered with a 503 (non-streamed) or an error event
    (streamed); the engine takes at most one more decode step."""
    app = create_app(tiny_model, DEFAULTS, max_batch=2)
    batcher = app.state.batcher
    long = {"model": "tiny", "messages": QUESTION, "max_thinking_tokens": 1800, "num_ignore": 100, "max_tokens": 100}
    with serve_in_background(app) as url:
        streaming = threading.Event()

        def streamed():
            with httpx.stream("POST", f"{url}/v1/chat/completions", json={**long, "stream": True}, timeout=60) as response:
                lines = []
                for line in response.iter_lines():
                    lines.append(line)
                    streaming.set()
                return [line for line in lines if line]

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            stream = pool.submit(streamed)
            assert streaming.wait(60)
            running = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=long, timeout=60)
            while batcher.running < 2:
                time.sleep(0.01)
            queued = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=long, timeout=60)
            while batcher.queued < 1:
                time.sleep(0.01)
            steps = batcher.stats.steps
            batcher.shutdown()
            batcher._thread.join(30)
            assert batcher.stats.steps <= steps + 1
            for response in (running.result(), queued.result()):
                assert response.status_code == 503 and response.json()["error"]["code"] == "server_shutting_down"
            lines = stream.result()
            error = json.loads(lines[-2][6:])["error"]
            assert error["code"] == "server_shutting_down" and lines[-1] == "data: [DONE]"
        refused = httpx.post(f"{url}/v1/chat/completions", json=long, timeout=10)
        assert refused.status_code == 503


def test_a_loopback_server_without_a_key_answers_only_requests_addressed_to_this_machine(tiny_model_dir):
    """DNS rebinding: a page's request reaches 127.0.0.1 under its own name, which the Host header
    carries; a server open to this machine without --api-key refuses it."""
    from test_serve_faults import serve_process

    with serve_process(tiny_model_dir, "--max-thinking-tokens", "2", "--max-answer-tokens", "2") as (process, url):
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        assert httpx.get(f"{url.replace('127.0.0.1', 'localhost')}/v1/models", timeout=10).status_code == 200
        rebound = httpx.post(f"{url}/v1/chat/completions", json={"messages": QUESTION}, timeout=10,
                             headers={"Host": "attacker.example:80"})
        assert rebound.status_code == 400


def test_serve_command_binds_loopback_and_stops_on_sigterm(tiny_model_dir):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-c", "from t0s1.cli import main; main()", "serve", "--model", str(tiny_model_dir),
               "--port", str(port), "--max-thinking-tokens", "4", "--max-answer-tokens", "3", "--api-key", API_KEY,
               "--reasoning-effort-budgets", "low=2,medium=3,high=4"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read().decode()
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "t0s1 serve did not come up"
                time.sleep(0.3)
        with openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0) as client:
            reply = chat(client)
            assert reply.usage.completion_tokens_details.reasoning_tokens == 4  # the --max-thinking-tokens default
            assert chat(client, reasoning_effort="low").usage.completion_tokens_details.reasoning_tokens == 2
        # SIGTERM while a long reply streams: the client gets an error event, and the server exits.
        body = {"messages": QUESTION, "max_thinking_tokens": 1800, "num_ignore": 100, "max_tokens": 100, "stream": True}
        headers = {"Authorization": f"Bearer {API_KEY}"}
        lines, signalled = [], False
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60) as response:
            for line in response.iter_lines():
                lines.append(line)
                if "reasoning_content" in line and not signalled:
                    process.send_signal(signal.SIGTERM)
                    signalled = True
        lines = [line for line in lines if line]
        assert json.loads(lines[-2][6:])["error"]["code"] == "server_shutting_down" and lines[-1] == "data: [DONE]"
        process.wait(30)
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(30)


def test_completions_with_stop_are_plain_continuations(server, tiny_model):
    """What client-side budget forcing (``t0s1 eval --backend openai``) asks of a server."""
    question = "1+1?"
    [expected] = generate(tiny_model, [question], BudgetForcing(max_thinking_tokens=60, max_answer_tokens=2))
    assert not expected.hit_budget  # this thinking ends by itself
    prompt = tiny_model.tokenizer.decode(render_prompt(tiny_model, question).ids, skip_special_tokens=False)
    decode = tiny_model.tokenizer.decode
    thinking = decode(expected.thinking_token_ids, skip_special_tokens=False)
    with openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0) as client:
        stop = ["<|im_start|>", "<|im_end|>"]
        ended = client.completions.create(model="tiny", prompt=prompt, max_tokens=60, stop=stop)
        assert ended.choices[0].finish_reason == "stop"
        assert ended.choices[0].text == thinking
        cut = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, stop=["<|im_end|>"])
        assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 3
        assert cut.choices[0].text == decode(expected.thinking_token_ids[:3], skip_special_tokens=False)
        # A stop string inside the text ends it there.
        word = thinking[len(thinking) // 2 :][:3]
        at_word = client.completions.create(model="tiny", prompt=prompt, max_tokens=60, stop=[word])
        assert at_word.choices[0].finish_reason == "stop" and at_word.choices[0].text == thinking[: thinking.index(word)]
        # vLLM's fields: stop ids as ids (then only they and the end of turn stop it), min_tokens.
        start_id = tiny_model.tokenizer.convert_tokens_to_ids("<|im_start|>")
        by_id = client.completions.create(model="tiny", prompt=prompt, max_tokens=60,
                                          extra_body={"stop_token_ids": [start_id], "skip_special_tokens": False})
        assert by_id.choices[0].text == thinking and by_id.choices[0].finish_reason == "stop"
        with pytest.raises(openai.BadRequestError, match="num_ignore"):
            client.completions.create(model="tiny", prompt=prompt, stop=["x"], extra_body={"num_ignore": 1})
        with pytest.raises(openai.BadRequestError, match="plain continuations"):
            client.completions.create(model="tiny", prompt=prompt, extra_body={"min_tokens": 1})


@pytest.mark.slow
def test_client_side_forcing_against_the_server_equals_the_engine(smollm2):
    """``t0s1 eval --backend openai --base-url .../v1`` pointed at ``t0s1 serve``."""
    from t0s1.backends.openai_compat import OpenAIBackend, adds_bos

    prompts = ["How many r are in raspberry?", "What is 12 + 35 * 2?"]
    settings = BudgetForcing(max_thinking_tokens=40, num_ignore=1, max_answer_tokens=8)
    expected = generate(smollm2, prompts, settings)
    with serve_in_background(create_app(smollm2)) as url:
        backend = OpenAIBackend.connect(f"{url}/v1", "smollm2", tokenizer="smollm2-135m-instruct", api_key="x")
        assert backend.context_length == smollm2.context_length  # read from the server's /v1/models
        results = backend.generate(prompts, settings)
    for got, want in zip(results, expected, strict=True):
        assert (got.thinking, got.answer, got.num_ignored, got.hit_budget) == (
            want.thinking, want.answer, want.num_ignored, want.hit_budget)


class CompletionsDouble:
    """``openai.OpenAI()`` with ``completions.create`` answering from a script and recording each
    request; ``refuse``: the first request that carries these fields is refused, as the OpenAI API
    refuses fields it does not know."""

    def __init__(self, replies, refuse=()):
        self.replies, self.refuse, self.requests = list(replies), set(refuse), []
        self.completions = self

    def create(self, **request):
        self.requests.append(request)
        unknown = self.refuse & set(request.get("extra_body") or {})
        if unknown:
            response = httpx.Response(400, request=httpx.Request("POST", "http://server/v1/completions"))
            raise openai.BadRequestError(f"Unrecognized request argument supplied: {sorted(unknown)[0]}", response=response, body=None)
        text, finish = self.replies.pop(0)
        return type("Reply", (), {"choices": [type("Choice", (), {"text": text, "finish_reason": finish})()]})()


def test_openai_backend_sends_vllm_sampling_fields(tiny_model):
    from t0s1.backends.openai_compat import OpenAIBackend, adds_bos

    client = CompletionsDouble([("Let me count", "stop"), (" one", "stop"), (" 82", "stop")])
    backend = OpenAIBackend(client, "m", tiny_model.tokenizer, concurrency=1)
    result = backend.generate(["What is 12 + 35 * 2?"], BudgetForcing(max_thinking_tokens=100, num_ignore=1, max_answer_tokens=9))
    first, after_wait, answer = (request["extra_body"] for request in client.requests)
    start, end = (tiny_model.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>"))
    assert set(first["stop_token_ids"]) == {start, end} and first["min_tokens"] == 0
    assert first["skip_special_tokens"] is False
    assert after_wait["min_tokens"] == 1  # no stop right after the injected "Wait"
    assert answer["stop_token_ids"] == [end] and answer["min_tokens"] == 0  # the answer ends at the end of turn only
    assert result[0].num_ignored == 1 and backend.sampling_fields is True
    # A server that did not refuse the fields may still ignore them (llama.cpp's server, Ollama):
    # the stop ids keep going as strings too, after the first request as before it.
    assert all("<|im_start|>" in request["stop"] for request in client.requests[:2])


def test_openai_backend_bounds_what_the_server_sends_back(tiny_model, monkeypatch):
    """The reply is the server's: a text far longer than max_tokens is cut before it is tokenized
    (10 MB took seconds and gigabytes), and a reply of the wrong shape is a clear error, not a
    traceback from the tokenizer."""
    from t0s1.backends import openai_compat
    from t0s1.backends.openai_compat import OpenAIBackend
    from t0s1.forcing_rules import longest_token_chars

    encoded = []
    encode = openai_compat.encode
    monkeypatch.setattr(openai_compat, "encode", lambda tokenizer, text: encoded.append(len(text)) or encode(tokenizer, text))
    settings = BudgetForcing(max_thinking_tokens=20, max_answer_tokens=5)
    client = CompletionsDouble([("think " * 2_000_000, "length"), ("answer " * 1_000_000, "length")])
    [result] = OpenAIBackend(client, "m", tiny_model.tokenizer, concurrency=1).generate(["What is 12 + 35 * 2?"], settings)
    assert result.thinking_tokens == 20 and result.answer_tokens == 5
    longest = longest_token_chars(tiny_model.tokenizer)
    assert encoded == [20 * longest, 5 * longest]  # not the 12 MB and 7 MB sent
    for text, finish in ((123, "stop"), (["a", "b"], "stop"), ({"text": "a"}, "stop"), ("fine", 7)):
        backend = OpenAIBackend(CompletionsDouble([(text, finish)]), "m", tiny_model.tokenizer, concurrency=1)
        with pytest.raises(UserError, match="The completions endpoint failed for model 'm': TypeError"):
            backend.generate(["Hi"], settings)


def test_a_server_that_never_answers_fails_after_the_timeout_it_was_given(tiny_model_dir, monkeypatch):
    """A server that takes the connection and never answers held each request for the OpenAI
    client's 600 s, three times: T0S1_REQUEST_TIMEOUT bounds it."""
    import socket
    import threading
    import time

    from t0s1.backends.openai_compat import OpenAIBackend

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held, stop = [], threading.Event()

    def accept_and_stay_silent():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept_and_stay_silent, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("T0S1_REQUEST_TIMEOUT", "0.5")
        started = time.monotonic()
        backend = OpenAIBackend.connect(f"http://127.0.0.1:{listener.getsockname()[1]}/v1", "m", tokenizer=str(tiny_model_dir))
        with pytest.raises(UserError, match="The completions endpoint failed for model 'm': APITimeoutError"):
            backend.generate(["Hi"], BudgetForcing(max_thinking_tokens=4, max_answer_tokens=2))
        assert time.monotonic() - started < 30 and len(held) >= 2  # tried again, within a bounded time
        monkeypatch.setenv("T0S1_REQUEST_TIMEOUT", "soon")
        with pytest.raises(UserError, match="T0S1_REQUEST_TIMEOUT must be a positive number of seconds"):
            OpenAIBackend.connect("http://127.0.0.1:9/v1", "m", tokenizer=str(tiny_model_dir))
    finally:
        stop.set()
        thread.join(5)
        for connection in held:
            connection.close()
        listener.close()


def test_a_model_list_of_the_wrong_shape_gives_no_context_length_rather_than_a_traceback():
    from t0s1.backends.openai_compat import served_model_card

    def client(*cards):
        listing = type("Listing", (), {"data": list(cards)})()
        return type("Client", (), {"models": type("Models", (), {"list": staticmethod(lambda: listing)})()})()

    def card(**fields):
        return type("Card", (), {"model_extra": fields.pop("extra", {}), **fields})()

    assert served_model_card(client("m"), "m") == (None, None)  # cards that are strings: skipped
    assert served_model_card(client(card(id="m", extra={"max_model_len": True})), "m") == (None, None)
    assert served_model_card(client(card(id="m", owned_by="vllm", extra={"max_model_len": 4096})), "m") == (4096, "vllm")


class ScriptedServer:
    """``completions.create`` of a server that answers each request by what it asks (thinking or
    answer), safe to call from several threads; ``refuse``: fields it refuses with a 400 (the
    first round's requests meet at a barrier first, so they are all in flight when the first 400
    comes back); ``longest``: the longest prompt + max_tokens it takes (vLLM's rule)."""

    def __init__(self, thinking, answer, *, refuse=(), together=1, longest=None, tokenizer=None):
        self.thinking, self.answer, self.refuse = list(thinking), answer, set(refuse)
        self.barrier = threading.Barrier(together) if together > 1 else None
        self.longest, self.tokenizer = longest, tokenizer
        self.requests, self.lock = [], threading.Lock()
        self.completions = self

    def create(self, **request):
        with self.lock:
            self.requests.append(request)
            first_round = len(self.requests) <= (self.barrier.parties if self.barrier else 1)
        if self.longest is not None:
            size = len(self.tokenizer(request["prompt"], add_special_tokens=False).input_ids) + request["max_tokens"]
            if size > self.longest:
                raise openai.BadRequestError(f"prompt + max_tokens = {size} is more than {self.longest}",
                                             response=httpx.Response(400, request=httpx.Request("POST", "http://s/v1")), body=None)
        if self.barrier is not None and first_round and request.get("extra_body"):
            self.barrier.wait(timeout=10)
        unknown = self.refuse & set(request.get("extra_body") or {})
        if unknown:
            time.sleep(0.05)
            raise openai.BadRequestError(f"Unrecognized request argument supplied: {sorted(unknown)[0]}",
                                         response=httpx.Response(400, request=httpx.Request("POST", "http://s/v1")), body=None)
        answering = request["prompt"].rstrip().endswith("<|im_start|>answer") or "Final Answer" in request["prompt"][-40:]
        with self.lock:
            text, finish = self.answer if answering else (self.thinking.pop(0) if len(self.thinking) > 1 else self.thinking[0])
        return type("Reply", (), {"choices": [type("Choice", (), {"text": text, "finish_reason": finish})()]})()


def test_openai_backend_learns_a_refusal_once_while_requests_are_in_flight(tiny_model):
    """Four prompts at once to a server that refuses vLLM's fields: every request of the first round
    is refused; each is sent again without them (one failed the whole call before)."""
    from t0s1.backends.openai_compat import OpenAIBackend, adds_bos

    server = ScriptedServer([("Let me count", "stop")], (" 82", "stop"), refuse={"stop_token_ids"}, together=4)
    backend = OpenAIBackend(server, "m", tiny_model.tokenizer, concurrency=4)
    results = backend.generate([f"What is {i} + 1?" for i in range(4)], BudgetForcing(max_thinking_tokens=100, max_answer_tokens=9))
    assert backend.sampling_fields is False and [r.answer for r in results] == ["82"] * 4


def test_openai_backend_asks_again_when_the_reply_reencodes_to_fewer_tokens_and_fits_the_context(tiny_model):
    """A server that wrote the budget's 20 tokens in pieces that re-encode to 10 says "length": the
    thinking is not over (it was ended with no answer); the next request asks for the rest, then
    the forced end and the answer. A request never asks past the context (vLLM refuses it)."""
    from t0s1.backends.openai_compat import OpenAIBackend, adds_bos

    tokenizer = tiny_model.tokenizer
    piece = " one"
    assert len(tokenizer(piece * 10, add_special_tokens=False).input_ids) == 10
    server = ScriptedServer([(piece * 10, "length")], (" 82", "stop"), longest=160, tokenizer=tokenizer)
    backend = OpenAIBackend(server, "m", tokenizer, concurrency=1, context_length=160, sampling_fields=True)
    [result] = backend.generate(["What is 12 + 35 * 2?"], BudgetForcing(max_thinking_tokens=20, max_answer_tokens=512))
    assert result.hit_budget and result.thinking_tokens == 20 and "82" in result.answer
    assert [r["max_tokens"] for r in server.requests][:2] == [20, 10]
    prompt_length = len(tokenizer(server.requests[-1]["prompt"], add_special_tokens=False).input_ids)
    assert server.requests[-1]["max_tokens"] == 160 - prompt_length < 512  # the answer's request within the context


def test_openai_backend_drops_the_fields_a_server_refuses(tiny_model):
    from t0s1.backends.openai_compat import OpenAIBackend, adds_bos

    client = CompletionsDouble([("Let me count", "stop"), (" 82", "stop")], refuse={"stop_token_ids", "min_tokens"})
    backend = OpenAIBackend(client, "m", tiny_model.tokenizer, concurrency=1)
    [result] = backend.generate(["What is 12 + 35 * 2?"], BudgetForcing(max_thinking_tokens=100, max_answer_tokens=9))
    assert backend.sampling_fields is False and result.answer == "82"
    assert [bool(r.get("extra_body")) for r in client.requests] == [True, False, False]  # refused once, then plain
    assert all("<|im_start|>" in r["stop"] for r in client.requests[1:2])  # the stop strings still end the thinking


def test_openai_backend_reads_the_context_length_from_the_server(server, tiny_model, tiny_model_dir):
    from t0s1.backends.openai_compat import OpenAIBackend, adds_bos

    backend = OpenAIBackend.connect(f"{server}/v1", "tiny", tokenizer=str(tiny_model_dir))
    assert backend.context_length == tiny_model.context_length and backend.sampling_fields is True
    assert OpenAIBackend.connect(f"{server}/v1", "tiny", tokenizer=str(tiny_model_dir), context_length=512).context_length == 512
    with pytest.raises(UserError, match="context length"):
        OpenAIBackend.connect(f"{server}/v1", "tiny", tokenizer=str(tiny_model_dir), context_length=0)


# ---- plain continuations as vLLM answers them -------------------------------------------------------

CONTINUED = "How many r are in raspberry? Let me count"


def continuation(server, **body) -> dict:
    response = httpx.post(f"{server}/v1/completions", json={"model": "tiny", "prompt": CONTINUED, **body}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_stop_strings_are_found_in_the_raw_text_as_each_token_arrives(server):
    """vLLM's rule: the text ends before the first stop string, found as soon as the token that
    completes it arrives (leading and trailing whitespace included); usage counts up to that token."""
    # The greedy continuation token by token, without stop strings (only the end of turn stops it).
    texts = [continuation(server, max_tokens=k, stop_token_ids=[])["choices"][0]["text"] for k in range(1, 21)]
    stops = {texts[0][0], " ", "\n", texts[-1][-3:], texts[5][2:6]}
    assert texts[0][0].isspace() or " " in texts[-1]  # whitespace is among the stops tried
    for stop in stops:
        if not stop or stop not in texts[-1]:
            continue
        tokens = next(k for k, text in enumerate(texts, 1) if stop in text)  # the token that completes it
        reply = continuation(server, max_tokens=20, stop=[stop, "never written"], stop_token_ids=[])
        assert reply["choices"][0]["text"] == texts[-1][: texts[-1].index(stop)], stop
        assert reply["choices"][0]["finish_reason"] == "stop"
        assert reply["usage"]["completion_tokens"] == tokens, stop


def test_stop_token_ids_outside_the_vocabulary_are_a_400(server, tiny_model):
    for ids in ([tiny_model.vocab_size], [3, tiny_model.vocab_size + 30], [2**40]):
        response = httpx.post(f"{server}/v1/completions", json={"prompt": CONTINUED, "stop_token_ids": ids}, timeout=30)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "stop_token_ids" and "vocabulary" in response.json()["error"]["message"]


def test_plain_continuations_fit_when_prompt_and_max_tokens_fit_the_context(server, tiny_model):
    """vLLM's rule, prompt + max_tokens <= context; a refusal names the field the client sent."""
    prompt_length = len(tiny_model.tokenizer(CONTINUED).input_ids)
    room = tiny_model.context_length - prompt_length
    stop = {"stop": ["<|im_start|>", "<|im_end|>"]}
    assert continuation(server, max_tokens=room, **stop)["choices"][0]["finish_reason"] in ("stop", "length")
    for name in ("max_tokens", "max_completion_tokens"):
        response = httpx.post(f"{server}/v1/completions", json={"prompt": CONTINUED, name: room + 1, **stop}, timeout=30)
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["param"] == name and error["code"] == "context_length_exceeded" and str(room) in error["message"]
        assert "max_thinking_tokens" not in error["message"]


def test_explicit_stop_token_ids_do_not_stop_at_a_written_end_of_thinking(tiny_model_dir):
    """With ``stop_token_ids`` only those ids and the end of turn stop a plain continuation (vLLM);
    ``</think>`` written in ordinary tokens is text like any other."""
    from t0s1.forcing import RenderedPrompt
    from t0s1.models import load_model
    from t0s1.serving.batcher import Batcher, Continuation

    lm = load_model(str(tiny_model_dir), device="cpu", reasoning_format="think")
    assert lm.rules.written_end == "</think>"  # ordinary tokens for this tokenizer
    prompt = RenderedPrompt(lm.tokenizer("Count: ").input_ids)
    settings = BudgetForcing(max_thinking_tokens=50, max_answer_tokens=1)
    for stop_ids, ends in (((), False), (None, True)):  # explicit ids; none: the model's end of thinking stops it
        sequence = Batcher(lm)._continuation_sequence(0, prompt, settings, Continuation(stop_token_ids=stop_ids, max_tokens=50))
        for token in lm.tokenizer("one </think> two", add_special_tokens=False).input_ids:
            if sequence.thinking:
                sequence.accept(token)
        assert sequence.thinking != ends


@pytest.mark.parametrize(
    ("field", "value"),
    [("end_phrase", "x" * 4097), ("answer_prefix", "y" * 4097), ("ignore_str", "z" * 4097), ("model", "m" * 257),
     ("stop", ["s" * 1025]), ("stop", [str(i) for i in range(17)]), ("stop_token_ids", list(range(257)))],
)
def test_request_strings_longer_than_their_limit_are_a_400(server, field, value):
    endpoint = "completions" if field.startswith("stop") else "chat/completions"
    body = {"prompt": CONTINUED} if endpoint == "completions" else {"messages": QUESTION}
    response = httpx.post(f"{server}/v1/{endpoint}", json={**body, field: value}, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == field, response.text
    schema = httpx.get(f"{server}/openapi.json").json()["components"]["schemas"]
    declared = json.dumps(schema["CompletionRequest" if endpoint == "completions" else "ChatCompletionRequest"]["properties"][field])
    assert "maxLength" in declared or "maxItems" in declared
    assert len(response.content) < 2048  # the value is not echoed whole


def test_a_prompt_too_long_in_characters_is_refused_before_it_is_tokenized(server, tiny_model, monkeypatch):
    """Tokenizing megabytes of text takes seconds of CPU; a prompt with more characters than the
    context can hold (its length x the vocabulary's longest entry) is a 400 before that."""
    from t0s1.serving import server as module

    limit = module._prompt_chars_limit(tiny_model)
    rendered = []
    render = module.render_prompt
    monkeypatch.setattr(module, "render_prompt", lambda *args: rendered.append(1) or render(*args))
    long = [{"role": "user", "content": "x" * (limit // 2 + 1)}] * 2
    response = httpx.post(f"{server}/v1/chat/completions", json={"messages": long}, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    assert f"{limit + 2:,} characters" in response.json()["error"]["message"] and rendered == []
    response = httpx.post(f"{server}/v1/completions", json={"prompt": "y" * (limit + 1)}, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    response = httpx.post(f"{server}/v1/completions", json={"prompt": "y" * (limit + 1), "stop": ["\n"]}, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    assert httpx.post(f"{server}/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 2}, timeout=60).status_code == 200
    assert rendered == [1]


def test_an_error_never_echoes_a_huge_value_back(server):
    """A 400 names the bad value, cut to its first characters: a 7 MB model name came back whole."""
    response = httpx.post(f"{server}/v1/chat/completions", json={"messages": QUESTION, "model": "m" * 1_000_000}, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "model"
    message = response.json()["error"]["message"]
    assert "mmmm" in message and "(1,000,002 characters)" in message and len(response.content) < 2048


def test_openai_backend_loses_no_stop_when_the_server_takes_stop_ids(tiny_model):
    """Stop ids go as ids to a server that takes them (no 4-string cap to cut them); to one that
    does not, as at most 4 strings, those that end the thinking before the end-of-turn ones."""
    from t0s1.backends.client_forcing import Request
    from t0s1.backends.openai_compat import OpenAIBackend, stop_strings

    tokenizer = tiny_model.tokenizer
    start, end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>"))
    others = [tokenizer.convert_tokens_to_ids(t) for t in ("a", "b", "c", "d")]
    request = Request([1, 2], 5, sorted([*others, end, start]), 0, BudgetForcing(), None, stop_text="</think>")
    assert stop_strings(tokenizer, request, {end}, ids_sent=True) == ["</think>"]
    assert stop_strings(tokenizer, request, {end}, ids_sent=False) == ["</think>", "<|im_start|>", "a", "b"]
    client = CompletionsDouble([("Let me count", "stop"), (" 82", "stop")])
    backend = OpenAIBackend(client, "m", tokenizer, concurrency=1, sampling_fields=True)
    backend.generate(["What is 12 + 35 * 2?"], BudgetForcing(max_thinking_tokens=100, max_answer_tokens=9))
    assert all(r["stop"] == [] and r["extra_body"]["stop_token_ids"] for r in client.requests)


def test_client_side_forcing_sees_an_ignored_end_written_in_ordinary_tokens_even_at_the_same_length():
    """SmolLM2 writes `</think>` as 3 ordinary tokens; ignoring it cuts them and appends "\\nWait"
    (2 ids) after the space before it (1 id): the sequence's length is what it would have been.
    What the backend generated after the delimiter (the answer) must not be taken as thinking after
    the Wait: the next request continues from the Wait."""
    from transformers import AutoTokenizer

    from t0s1.backends.client_forcing import ClientForcing, Completion
    from t0s1.models import embedded_model_dir
    from t0s1.profiles import profile_by_name

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())

    def encode(text):
        return tokenizer(text, add_special_tokens=False).input_ids

    assert len(encode(" </think>")) == 3 and len(encode("\nWait")) == 2
    replies = iter([("Let me see </think> The answer is 42", False), (" so it is 42</think>", False), (" 42", True)])

    def complete(requests):
        return [Completion(encode(text)[: request.max_tokens], stopped) for request, (text, stopped) in zip(requests, replies)]

    forcing = ClientForcing(tokenizer, profile_by_name("think"), complete, context_length=None)
    settings = BudgetForcing(max_thinking_tokens=40, num_ignore=1, ignore_str="\nWait", max_answer_tokens=5)
    [result] = forcing.generate(["What is 6 * 7?"], [settings])
    assert (result.thinking, result.answer, result.num_ignored) == ("Let me see \nWait so it is 42", "42", 1)


def test_openai_backend_sends_one_bos_to_a_server_that_adds_it(tmp_path, tiny_model_dir, monkeypatch):
    """A tokenizer that adds a BOS (Llama 3, DeepSeek-R1-Distill-Llama) and a chat template that
    writes one: the server adds its own to the text it is sent, so the client leaves the template's
    out. A real server then starts every request's prompt with one BOS: the engine's prompt ids."""
    import shutil

    from tokenizers import processors
    from transformers import AutoTokenizer

    from t0s1.backends.openai_compat import OpenAIBackend, adds_bos
    from t0s1.models import load_model
    from t0s1.serving import server as served

    folder = tmp_path / "with-bos"
    shutil.copytree(tiny_model_dir, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.bos_token = bos = "<|endoftext|>"  # not <|im_start|>, which every ChatML turn starts with
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_token_id)]
    )
    tokenizer.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    tokenizer.save_pretrained(folder)
    lm = load_model(str(folder), device="cpu")
    bos_id = lm.tokenizer.bos_token_id
    assert adds_bos(lm.tokenizer) == bos_id
    rendered = list(render_prompt(lm, "What is 12 + 35 * 2?").ids)
    assert rendered[:2] == [bos_id, lm.tokenizer.convert_tokens_to_ids("<|im_start|>")]  # one BOS, from the template

    received = []  # the prompt ids the server made of each request's text

    def recording(model, text):
        ids = text_prompt_ids(model, text)
        received.append(ids)
        return ids

    text_prompt_ids = served.text_prompt_ids
    monkeypatch.setattr(served, "text_prompt_ids", recording)
    with serve_in_background(create_app(lm, DEFAULTS, max_batch=4)) as url:
        backend = OpenAIBackend.connect(f"{url}/v1", "tiny", tokenizer=str(folder))
        backend.generate(["What is 12 + 35 * 2?"], BudgetForcing(max_thinking_tokens=24, num_ignore=1, max_answer_tokens=6))
    assert len(received) >= 2 and received[0] == rendered
    assert all(ids[:1] == [bos_id] and ids[1:2] != [bos_id] for ids in received)
