"""The OpenAI-compatible server: the real server on a free loopback port, driven by the official
``openai`` client (and raw HTTP for malformed requests)."""

from __future__ import annotations

import concurrent.futures
import os
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from t0s1 import BudgetForcing, generate
from t0s1.forcing import render_prompt
from t0s1.serving.server import create_app, serve_in_background

DEFAULTS = BudgetForcing(max_thinking_tokens=24, max_answer_tokens=8)
QUESTION = [{"role": "user", "content": "How many r are in raspberry?"}]
API_KEY = "test-key-123"


@pytest.fixture(scope="module")
def server(tiny_model):
    app = create_app(tiny_model, DEFAULTS, max_batch=8)
    with serve_in_background(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client


def chat(client, messages=QUESTION, **extra_body):
    return client.chat.completions.create(model="tiny", messages=messages, extra_body=extra_body or None)


def stream_chat(client, messages=QUESTION, **extra_body):
    """(reasoning, content, final chunk extras, usage, order of channels) of a streamed reply."""
    reasoning, content, channels, usage, finish = [], [], [], None, None
    stream = client.chat.completions.create(
        model="tiny", messages=messages, stream=True, stream_options={"include_usage": True}, extra_body=extra_body
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
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
    return "".join(reasoning), "".join(content), channels, usage, finish


def test_models_and_health(server, client, tiny_model):
    [model] = client.models.list().data
    assert model.id == tiny_model.name
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["max_batch"] == 8


def test_reply_separates_reasoning_from_answer(client):
    reply = chat(client)
    message = reply.choices[0].message
    assert message.reasoning_content and message.reasoning == message.reasoning_content
    assert isinstance(message.content, str) and message.content
    assert message.reasoning_content not in message.content
    details = reply.usage.completion_tokens_details
    forcing = reply.model_extra["budget_forcing"]
    assert details.reasoning_tokens == forcing["thinking_tokens"] <= DEFAULTS.max_thinking_tokens
    assert reply.usage.completion_tokens == forcing["thinking_tokens"] + forcing["answer_tokens"]
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_reply_equals_the_engine(client, tiny_model):
    settings = BudgetForcing(max_thinking_tokens=40, num_ignore=1, max_answer_tokens=6)
    [expected] = generate(tiny_model, [QUESTION], settings)
    reply = chat(client, max_thinking_tokens=40, num_ignore=1, max_tokens=6)
    assert reply.choices[0].message.reasoning_content == expected.thinking
    assert reply.choices[0].message.content == expected.answer
    assert reply.choices[0].finish_reason == ("length" if expected.finish_reason == "length" else "stop")


@pytest.mark.parametrize("extra", [{}, {"max_thinking_tokens": 40, "num_ignore": 1, "max_tokens": 6}])
def test_streamed_text_equals_the_reply(client, extra):
    reply = chat(client, **extra)
    reasoning, content, channels, usage, finish = stream_chat(client, **extra)
    message = reply.choices[0].message
    assert reasoning == message.reasoning_content
    assert content == message.content
    assert channels == sorted(channels, key=["thinking", "answer"].index)  # all thinking, then the answer
    assert usage.completion_tokens_details.reasoning_tokens == reply.usage.completion_tokens_details.reasoning_tokens
    assert finish == reply.choices[0].finish_reason


def test_thinking_budget_caps_the_thinking(client):
    reply = chat(client, max_thinking_tokens=5)
    assert reply.usage.completion_tokens_details.reasoning_tokens == 5
    assert reply.model_extra["budget_forcing"]["hit_budget"]
    assert reply.choices[0].message.content.startswith("Final Answer:")
    alias = chat(client, thinking_budget=5)
    assert alias.choices[0].message == reply.choices[0].message


def test_wait_extends_the_thinking(client):
    plain = chat(client, max_thinking_tokens=60, num_ignore=0)
    extended = chat(client, max_thinking_tokens=60, num_ignore=1, ignore_str="Wait")
    assert plain.model_extra["budget_forcing"]["num_ignored"] == 0
    assert not plain.model_extra["budget_forcing"]["hit_budget"]  # the thinking ended by itself
    assert extended.model_extra["budget_forcing"]["num_ignored"] == 1
    thinking = extended.choices[0].message.reasoning_content
    assert thinking.startswith(plain.choices[0].message.reasoning_content) and "Wait" in thinking
    tokens = [r.usage.completion_tokens_details.reasoning_tokens for r in (plain, extended)]
    assert tokens[1] > tokens[0]


def test_answer_tokens_follow_max_tokens(client):
    reply = chat(client, max_thinking_tokens=3, max_completion_tokens=2)
    assert reply.model_extra["budget_forcing"]["answer_tokens"] <= 2


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
    expected = [
        generate(tiny_model, [p], BudgetForcing(max_thinking_tokens=b, num_ignore=k, max_answer_tokens=5))[0]
        for p, (b, k) in zip(prompts, budgets, strict=True)
    ]

    def ask(i):
        if i == len(prompts):  # a bad request in the same burst
            with pytest.raises(openai.BadRequestError):
                chat(client, max_thinking_tokens=-1)
            return None
        b, k = budgets[i]
        messages = [{"role": "user", "content": prompts[i]}]
        return chat(client, messages, max_thinking_tokens=b, num_ignore=k, max_tokens=5)

    batches_before = httpx.get(f"{server}/health").json()["batches"]
    with concurrent.futures.ThreadPoolExecutor(len(prompts) + 1) as pool:
        replies = list(pool.map(ask, range(len(prompts) + 1)))[:-1]
    for reply, result, (budget, _) in zip(replies, expected, budgets, strict=True):
        forcing = reply.model_extra["budget_forcing"]
        assert forcing["thinking_tokens"] == result.thinking_tokens <= budget
        assert forcing["num_ignored"] == result.num_ignored
        assert reply.choices[0].message.reasoning_content == result.thinking
        assert reply.choices[0].message.content == result.answer
    assert httpx.get(f"{server}/health").json()["batches"] - batches_before < len(prompts)  # some were batched


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
    # A non-streamed request whose client times out is cancelled too.
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server}/v1/chat/completions", json={**body, "stream": False}, timeout=1.0)
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
        ({"model": "tiny", "messages": QUESTION, "n": 2}, "n"),
        ({"model": "tiny", "messages": QUESTION, "stop": ["."]}, "stop"),
        ({"model": "tiny", "messages": QUESTION, "max_thinking_tokens": 5000}, "max_thinking_tokens"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "word " * 3000}]}, "max_thinking_tokens"),
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
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200
        with openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0) as good:
            assert chat(good, max_thinking_tokens=3, max_tokens=2).choices[0].message.content


def test_serve_command_binds_loopback(tiny_model_dir):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-c", "from t0s1.cli import main; main()", "serve", "--model", str(tiny_model_dir),
               "--port", str(port), "--max-thinking-tokens", "4", "--max-answer-tokens", "3", "--api-key", API_KEY]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read().decode()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "t0s1 serve did not come up"
                time.sleep(0.3)
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, max_retries=0) as client:
            reply = chat(client)
        assert reply.usage.completion_tokens_details.reasoning_tokens == 4  # the --max-thinking-tokens default
    finally:
        process.terminate()
        process.wait(30)


def test_completions_with_stop_are_plain_continuations(server, tiny_model):
    """What client-side budget forcing (``t0s1 eval --backend openai``) asks of a server."""
    question = "1+1?"
    [expected] = generate(tiny_model, [question], BudgetForcing(max_thinking_tokens=60, max_answer_tokens=2))
    assert not expected.hit_budget  # this thinking ends by itself
    prompt = tiny_model.tokenizer.decode(render_prompt(tiny_model, question).ids, skip_special_tokens=False)
    decode = tiny_model.tokenizer.decode
    with openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0) as client:
        stop = ["<|im_start|>", "<|im_end|>"]
        ended = client.completions.create(model="tiny", prompt=prompt, max_tokens=60, stop=stop)
        assert ended.choices[0].finish_reason == "stop"
        assert ended.choices[0].text == decode(expected.thinking_token_ids, skip_special_tokens=False)
        cut = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, stop=["<|im_end|>"])
        assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 3
        assert cut.choices[0].text == decode(expected.thinking_token_ids[:3], skip_special_tokens=False)
        with pytest.raises(openai.BadRequestError, match="num_ignore"):
            client.completions.create(model="tiny", prompt=prompt, stop=["x"], extra_body={"num_ignore": 1})


@pytest.mark.slow
def test_client_side_forcing_against_the_server_equals_the_engine(smollm2):
    """``t0s1 eval --backend openai --base-url .../v1`` pointed at ``t0s1 serve``."""
    from t0s1.backends.openai_compat import OpenAIBackend

    prompts = ["How many r are in raspberry?", "What is 12 + 35 * 2?"]
    settings = BudgetForcing(max_thinking_tokens=40, num_ignore=1, max_answer_tokens=8)
    expected = generate(smollm2, prompts, settings)
    with serve_in_background(create_app(smollm2)) as url, openai.OpenAI(base_url=f"{url}/v1", api_key="x") as client:
        backend = OpenAIBackend(client, "smollm2", smollm2.tokenizer, context_length=smollm2.context_length)
        results = backend.generate(prompts, settings)
    for got, want in zip(results, expected, strict=True):
        assert (got.thinking, got.answer, got.num_ignored, got.hit_budget) == (
            want.thinking, want.answer, want.num_ignored, want.hit_budget)
