"""Test-time policies and ``n`` in the server: the real server on a free loopback port, driven by
the official ``openai`` client (raw HTTP where the client would refuse the request itself)."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import openai
import pytest

from t0s1 import BudgetForcing, generate
from t0s1.policies import make_policy
from t0s1.policies.run import generate_with_policy
from t0s1.forcing import render_prompt
from t0s1.serving.protocol import BODY_BYTES, MAX_N, PROMPT_CHARS
from t0s1.serving.server import create_app, serve_in_background

DEFAULTS = BudgetForcing(max_thinking_tokens=24, max_answer_tokens=8)
QUESTION = [{"role": "user", "content": "What is 2 + 3?"}]
SAMPLED = {"temperature": 0.8, "top_p": 0.95, "seed": 7}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def server(tiny_model, one_torch_thread):
    app = create_app(tiny_model, DEFAULTS, max_batch=10)
    with serve_in_background(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client


def chat(client, **fields):
    extra = {k: v for k, v in fields.items() if k not in ("temperature", "top_p", "seed", "n", "stream")}
    plain = {k: v for k, v in fields.items() if k in ("temperature", "top_p", "seed", "n", "stream")}
    return client.chat.completions.create(model="tiny", messages=QUESTION, extra_body=extra or None, **plain)


def alone(lm, policy, settings):
    """The same policy run alone, in Python, on the prompt the server renders."""
    prompt = render_prompt(lm, QUESTION)
    return generate_with_policy(lm, [prompt], settings, policy)[0]


def test_a_vote_replies_with_the_trace_that_carries_it(client, tiny_model):
    reply = chat(client, policy="vote", n=4, return_traces=True, **SAMPLED)
    [choice] = reply.choices
    report = reply.model_extra["policy"]
    expected = alone(tiny_model, make_policy("vote", n=4), BudgetForcing(max_thinking_tokens=24, max_answer_tokens=8,
                                                                          temperature=0.8, top_p=0.95, seed=7))
    assert (choice.message.reasoning_content, choice.message.content) == (expected.result.thinking, expected.result.answer)
    assert report["policy"] == "vote[n=4]" and report["voted"] == expected.voted
    assert report["total_tokens"] == expected.total_tokens == reply.usage.completion_tokens
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + expected.total_tokens
    assert [t["reply"] for t in report["traces"]] == [t.result.answer for t in expected.traces]
    assert len(report["traces"]) == 4 and {t["generated_tokens"] > 0 for t in report["traces"]} == {True}
    assert choice.model_extra["budget_forcing"]["seed"] in {7, 8, 9, 10}  # the voted trace's: seed + j


def test_traces_only_on_request_and_policy_args_reach_the_policy(client):
    reply = chat(client, policy="deepconf", n=4, policy_args={"window": 4, "keep_percent": 50, "top_k": 5}, **SAMPLED)
    report = reply.model_extra["policy"]
    assert "traces" not in report
    assert report["policy"] == "deepconf[n=4,top_k=5,window=4,keep_percent=50]"
    reply = chat(client, policy="deepconf", n=4, return_traces=True, policy_args={"window": 4, "top_k": 5}, **SAMPLED)
    traces = reply.model_extra["policy"]["traces"]
    assert all(t["confs"] for t in traces)  # DeepConf's per-token confidences
    assert any(t["confidence"] is not None for t in traces)


def test_a_one_trace_policy_on_completions(server, tiny_model):
    body = {"prompt": "2 + 3 =", "policy": "probe", "policy_args": {"interval": 4, "probe_tokens": 3}, "return_traces": True}
    reply = httpx.post(f"{server}/v1/completions", json=body, timeout=120).json()
    [choice] = reply["choices"]
    report = reply["policy"]
    assert report["policy"] == "probe[interval=4,probe_tokens=3]" and len(report["traces"]) == 1
    assert choice["text"] == report["traces"][0]["reply"]
    assert report["probes"] >= 1 and reply["usage"]["completion_tokens"] == report["total_tokens"]


def test_n_choices_are_independent_samples(client, tiny_model):
    reply = chat(client, n=3, **SAMPLED)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    seeds = [c.model_extra["budget_forcing"]["seed"] for c in reply.choices]
    assert seeds == [7, 8, 9]
    expected = [generate(tiny_model, [QUESTION], BudgetForcing(max_thinking_tokens=24, max_answer_tokens=8, temperature=0.8,
                                                               top_p=0.95, seed=s))[0] for s in seeds]
    assert [(c.message.reasoning_content, c.message.content) for c in reply.choices] == [
        (r.thinking, r.answer) for r in expected]
    assert reply.usage.completion_tokens == sum(r.thinking_tokens + r.answer_tokens for r in expected)
    unseeded = chat(client, n=2, temperature=0.8)
    first, second = (c.model_extra["budget_forcing"]["seed"] for c in unseeded.choices)
    assert second == first + 1


@pytest.mark.parametrize(("fields", "param", "says"), [
    ({"policy": "nope"}, "policy", "policy"),
    ({"policy": "vote", "policy_args": {"bogus": 1}, **SAMPLED}, "policy_args", "no parameter 'bogus'"),
    ({"policy": "deepconf", "policy_args": {"keep_percent": 150}, **SAMPLED}, "policy_args", "keep_percent"),
    ({"policy": "deepconf", "policy_args": {"bottom_percent": -1}, **SAMPLED}, "policy_args", "bottom_percent"),
    ({"policy": "vote", "n": 4}, "temperature", "needs sampling"),
    ({"policy": "vote", "n": 0, **SAMPLED}, "n", "n"),
    ({"n": MAX_N + 1}, "n", "n"),
    ({"policy": "budget", "n": 2, **SAMPLED}, "n", "one trace per prompt"),
    ({"policy": "vote", "stream": True, **SAMPLED}, "stream", "stream is not supported with a policy"),
    ({"n": 2, "stream": True, **SAMPLED}, "n", "cannot be streamed"),
    ({"return_traces": True}, "return_traces", "applies to a request with a policy"),
    ({"policy": "vote", "policy_args": {"n": 3}, **SAMPLED}, "policy_args", "request's n"),
    ({"policy": "deepconf", "policy_args": {"mode": "online"}, "n": 8, **SAMPLED}, "n", "warm-up"),
    ({"policy": "deepconf", "policy_args": {"top_k": 10**6}, **SAMPLED}, "policy_args", "is above 100"),
    ({"policy": "deepconf", "policy_args": {"keep_percent": "nan"}, **SAMPLED}, "policy_args", "keep_percent must be a number"),
    ({"policy": "vote", "policy_args": {"x": "y" * 65}, **SAMPLED}, "policy_args", "at most 64"),
    ({"policy": "vote", "n": 11, **SAMPLED}, "n", "its --max-batch"),
    ({"policy": "deepconf", "policy_args": {"mode": "online", "warmup": 12}, "n": 16, **SAMPLED}, "n", "runs 12 sequences at once"),
    ({"chat_template_kwargs": {"chat_template": "{{ 'x' * 10 }}"}}, "chat_template_kwargs.chat_template", "apply_chat_template"),
    ({"chat_template_kwargs": {"tools": [{"type": "function"}]}}, "chat_template_kwargs.tools", "not a template variable"),
    ({"chat_template_kwargs": {"note": "x" * 300}}, "chat_template_kwargs.note", "at most 256"),
    ({"chat_template_kwargs": {"deep": {"a": [1]}}}, "chat_template_kwargs.deep", "boolean, a number"),
    ({"chat_template_kwargs": {f"v{i}": 1 for i in range(17)}}, "chat_template_kwargs", "at most 16"),
])
def test_bad_input_is_a_400_that_says_why(server, fields, param, says):
    response = httpx.post(f"{server}/v1/chat/completions", json={"messages": QUESTION, **fields}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and says in error["message"], error


def test_parameters_are_checked_with_the_requests_n(client):
    """m = 9 of k = n = 10 traces is valid, though m = 9 would not be with the default n of 8."""
    reply = chat(client, policy="short-m-of-k", n=10, policy_args={"m": 9}, **SAMPLED)
    assert reply.model_extra["policy"]["policy"] == "short-m-of-k[n=10,m=9]"


def test_completions_refuse_a_policy_on_a_plain_continuation(server):
    for fields, param in [({"policy": "vote"}, "policy"), ({"n": 2}, "n")]:
        response = httpx.post(f"{server}/v1/completions", json={"prompt": "2 + 3 =", "stop": ["\n"], **fields}, timeout=60)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_limits_on_text_and_body(server):
    too_long = {"messages": [{"role": "user", "content": "x" * (PROMPT_CHARS + 1)}]}
    response = httpx.post(f"{server}/v1/chat/completions", json=too_long, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages", response.text
    response = httpx.post(f"{server}/v1/completions", json={"prompt": "y" * (PROMPT_CHARS + 1)}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt", response.text
    huge = b'{"prompt": "' + b"z" * BODY_BYTES + b'"}'
    response = httpx.post(f"{server}/v1/completions", content=huge, headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large", response.text

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(BODY_BYTES // 65536 + 1):
            yield b"z" * 65536
        yield b'"}'

    response = httpx.post(f"{server}/v1/completions", content=chunks(), headers={"Content-Type": "application/json"},
                          timeout=60)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large", response.text


def test_ordinary_requests_go_on_beside_a_policy_request(client, server, tiny_model):
    """A policy request runs alone between batches: ordinary requests before and after it are
    answered as they would be alone, and the server keeps serving."""
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        plain = [pool.submit(chat, client) for _ in range(2)]
        voted = pool.submit(chat, client, policy="vote", n=3, **SAMPLED)
        later = [pool.submit(chat, client) for _ in range(2)]
        replies = [f.result() for f in plain + later]
        assert voted.result().model_extra["policy"]["policy"] == "vote[n=3]"
    [expected] = generate(tiny_model, [QUESTION], DEFAULTS)
    for reply in replies:
        assert (reply.choices[0].message.reasoning_content, reply.choices[0].message.content) == (
            expected.thinking, expected.answer)
        assert "policy" not in reply.model_extra
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["running"] == 0 and health["queued"] == 0


def test_a_client_that_leaves_stops_its_policy_request(server):
    """A policy request whose client disconnects is stopped (counted as cancelled), and the
    next request is served."""
    before = httpx.get(f"{server}/health").json()["cancelled"]
    body = {"messages": QUESTION, "policy": "vote", "n": 8, "max_thinking_tokens": 1500, "max_tokens": 400,
            "num_ignore": 50, **SAMPLED}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server}/v1/chat/completions", json=body, timeout=0.5)
    deadline = time.monotonic() + 30
    while httpx.get(f"{server}/health").json()["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.2)
    health = httpx.get(f"{server}/health").json()
    assert health["cancelled"] == before + 1 and health["running"] == 0
    reply = httpx.post(f"{server}/v1/chat/completions", json={"messages": QUESTION}, timeout=60)
    assert reply.status_code == 200
