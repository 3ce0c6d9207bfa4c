"""Properties of the server over generated input: replies independent of their neighbours
(hypothesis), and the OpenAPI schema fuzzed (schemathesis): no 5xx, auth on every route but the
open ones, the server still serving afterwards."""

from __future__ import annotations

import concurrent.futures
import json
import re
import subprocess
import sys
from dataclasses import replace

import httpx
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from t0s1 import BudgetForcing, generate
from t0s1.forcing import Engine
from t0s1.serving.server import create_app, serve_in_background

API_KEY = "fuzz-key"
OPEN_PATHS = {"/health", "/ui/info"}  # no key needed: they say nothing a key protects
QUESTIONS = ["How many r are in raspberry?", "What is 12 + 35 * 2?", "Hi", "1+1?", "Wait, count again."]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_model_float64(tiny_model_dir):
    """The tiny model in float64. In float32 a row's logits depend on the rows batched with it (about
    1e-5 apart: other kernels, other summation orders), and over thousands of random tokens a
    near-tie sometimes flips the choice; in float64 they agree to the last bit, so what the test
    compares is the scheduling alone (masks, positions, joins, seeds)."""
    from t0s1.models import load_model

    return load_model(str(tiny_model_dir), device="cpu", dtype=torch.float64)


@pytest.fixture(scope="module")
def server(tiny_model_float64, one_torch_thread):
    with serve_in_background(create_app(tiny_model_float64, BudgetForcing(max_thinking_tokens=16, max_answer_tokens=4))) as url:
        yield url


# ---- every reply equals the same request run alone --------------------------------------------------

requests = st.fixed_dictionaries(
    {
        "question": st.sampled_from(QUESTIONS) | st.text("abcdefg xyz?+=0123456789", min_size=1, max_size=30).filter(str.strip),
        "max_thinking_tokens": st.integers(0, 80) | st.just("auto"),
        "num_ignore": st.integers(0, 2),
        "max_tokens": st.integers(1, 8),
        "temperature": st.sampled_from([0.0, 0.7]),
        "seed": st.none() | st.integers(0, 2**32),
        "stream": st.booleans(),
    }
)


def ask(url: str, request: dict) -> tuple[str, str, dict]:
    """(thinking, answer, budget_forcing) of one chat request, streamed or not."""
    body = {"messages": [{"role": "user", "content": request["question"]}],
            **{key: value for key, value in request.items() if key != "question"}}
    if not request["stream"]:
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()
        choice = reply["choices"][0]
        return choice["message"]["reasoning_content"], choice["message"]["content"], choice["budget_forcing"]
    thinking, answer, forcing = [], [], None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    thinking.append(choice["delta"].get("reasoning_content") or "")
                    answer.append(choice["delta"].get("content") or "")
                    forcing = choice.get("budget_forcing") or forcing
    return "".join(thinking), "".join(answer), forcing


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(requests, min_size=2, max_size=5))
def test_every_reply_equals_the_request_run_alone(server, tiny_model_float64, batch):
    with concurrent.futures.ThreadPoolExecutor(len(batch)) as pool:
        replies = list(pool.map(lambda request: ask(server, request), batch))
    for request, (thinking, answer, forcing) in zip(batch, replies, strict=True):
        sampled = request["temperature"] > 0
        assert (forcing["seed"] is not None) == sampled
        if sampled and request["seed"] is not None:
            assert forcing["seed"] == request["seed"]
        settings_alone = BudgetForcing(max_thinking_tokens=request["max_thinking_tokens"], num_ignore=request["num_ignore"],
                                       max_answer_tokens=request["max_tokens"], temperature=request["temperature"],
                                       seed=forcing["seed"] if sampled else 0)
        [expected] = generate(tiny_model_float64, [request["question"]], settings_alone)
        assert (thinking, answer) == (expected.thinking, expected.answer), request
        assert (forcing["thinking_tokens"], forcing["num_ignored"], forcing["hit_budget"], forcing["answer_tokens"]) == (
            expected.thinking_tokens, expected.num_ignored, expected.hit_budget, expected.answer_tokens)


# ---- the OpenAPI schema, fuzzed ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_server(tiny_model, one_torch_thread):
    app = create_app(tiny_model, BudgetForcing(max_thinking_tokens=8, max_answer_tokens=4), api_key=API_KEY)
    with serve_in_background(app) as url:
        yield url


@pytest.fixture(scope="module")
def api_schema(keyed_server):
    return schemathesis.openapi.from_url(f"{keyed_server}/openapi.json")


@pytest.fixture(scope="module")
def short_generations():
    """Caps every sequence at 64 thinking and 16 answer tokens, whatever the fuzzer asks (the
    engine's ``add`` wrapped; the server's own checks run unchanged), so that the fuzzing stays quick."""
    add = Engine.add

    def capped_add(self, sequences):
        for sequence in sequences:
            sequence.max_thinking = min(sequence.max_thinking, 64)
            sequence.settings = replace(sequence.settings, max_answer_tokens=min(sequence.settings.max_answer_tokens, 16))
        return add(self, sequences)

    Engine.add = capped_add
    yield
    Engine.add = add


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzzed_requests_never_get_a_server_error(api_schema, short_generations, mode):
    """Requests generated from /openapi.json, valid ones and (NEGATIVE) ones that break it: never
    a 5xx; and without the key every route but the open ones is a 401."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {operation.path for operation in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models"}
    for operation in operations:
        if mode is GenerationMode.NEGATIVE and not operation.body:
            continue  # nothing to break in a request without a body

        @settings(max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(mode))
        def fuzz(case):
            response = case.call(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
            assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:500]}"
            unauthorized = case.call(headers={"Authorization": "Bearer wrong"}, timeout=60)
            if case.path in OPEN_PATHS:
                assert unauthorized.status_code < 500
            else:
                assert unauthorized.status_code == 401, f"{case.method} {case.path} answered without the key"

        fuzz()


def test_the_fuzzed_server_still_serves(keyed_server, api_schema):
    health = httpx.get(f"{keyed_server}/health").json()
    assert health["status"] == "ok" and health["running"] == 0 and health["queued"] == 0
    reply = httpx.post(f"{keyed_server}/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                       json={"messages": [{"role": "user", "content": "Hi"}]}, timeout=60)
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] is not None
    paths = api_schema.raw_schema["paths"]
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models"} <= set(paths)
    for path, operations in paths.items():  # every route but the open ones declares the key
        for operation in operations.values():
            assert ("security" in operation) == (path not in OPEN_PATHS), path


def test_schemathesis_finds_no_server_error_and_no_schema_mismatch(keyed_server, short_generations, tmp_path):
    """``schemathesis run`` over /openapi.json, as a user would run it (over 500 generated requests):
    no 5xx, and no "schema validation mismatch" (the declared schema no looser than what the server
    takes: every operation serves some of the requests generated as valid)."""
    command = [sys.executable, "-m", "schemathesis.cli", "run", f"{keyed_server}/openapi.json", "--max-examples", "60",
               "--checks", "not_a_server_error", "--header", f"Authorization: Bearer {API_KEY}", "--seed", "22",
               "--generation-database", "none", "--no-color", "--request-timeout", "60"]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    said = run.stdout + run.stderr
    assert run.returncode == 0, said[-3000:]
    assert "validation mismatch" not in said.lower() and "WARNINGS" not in said, said[-3000:]
    generated = int(re.search(r"(\d+) generated", said).group(1))
    assert generated >= 500, said[-3000:]
