"""Retrieval in ``t0s1 serve --index`` and ``t0s1 chat --index``: a bm25 index over a generated
corpus, the tiny model; every reply equals the same question answered over the same sources alone."""

from __future__ import annotations

import io
import json

import httpx
import pytest
from rich.console import Console
from typer.testing import CliRunner

from t0s1 import BudgetForcing, generate
from t0s1.cli import app as cli
from t0s1.rag import RagRequest, build_index, build_rag_messages, open_index, reserve_tokens, retrieve_sources
from t0s1.rag.synthetic import make_corpus
from t0s1.serving.chat import run_chat
from t0s1.serving.server import create_app, serve_in_background

SETTINGS = BudgetForcing(max_thinking_tokens=12, max_answer_tokens=6)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def corpus():
    return make_corpus(30, seed=3)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, corpus):
    documents, _ = corpus
    path = tmp_path_factory.mktemp("serve-rag") / "index"
    build_index(documents, path, retriever="bm25", progress=False)
    return path


@pytest.fixture(scope="module")
def server(tiny_model, index_dir, one_torch_thread):
    app = create_app(tiny_model, SETTINGS, index=open_index(index_dir), rag_defaults=RagRequest(k=2))
    with serve_in_background(app) as url:
        yield url


def named_question(corpus, i: int = 0):
    _, queries = corpus
    return [q for q in queries if q.style == "named"][i]


def alone_over_sources(lm, index_dir, messages, k, settings=SETTINGS):
    """The same question answered alone over the same sources: (result, source ids)."""
    index = open_index(index_dir)
    question = messages[-1]["content"]
    hits = retrieve_sources(index, question, k)
    packed = build_rag_messages(lm.tokenizer, question, hits, context_length=lm.context_length,
                                reserved=reserve_tokens(settings, lm.context_length), history=messages[:-1])
    [result] = generate(lm, [packed.messages], settings)
    return result, [hit.doc_id for hit in packed.sources]


def post(url, body):
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def test_replies_carry_the_sources_they_were_answered_over(server, tiny_model, index_dir, corpus):
    query = named_question(corpus)
    messages = [{"role": "user", "content": query.text}]
    reply = post(server, {"messages": messages, "rag": {"k": 3}}).json()
    message = reply["choices"][0]["message"]
    sources = message["sources"]
    assert [s["number"] for s in sources] == [1, 2, 3] and sources[0]["id"] == query.doc_id
    assert all({"id", "title", "score", "snippet", "retriever", "cited"} <= set(s) for s in sources)
    assert sources[0]["score"] >= sources[1]["score"] >= sources[2]["score"]
    expected, ids = alone_over_sources(tiny_model, index_dir, messages, 3)
    assert [s["id"] for s in sources] == ids
    assert (message["reasoning_content"], message["content"]) == (expected.thinking, expected.answer)
    default = post(server, {"messages": messages}).json()  # the server's --k: 2
    assert len(default["choices"][0]["message"]["sources"]) == 2


def test_streamed_sources_come_first_and_the_text_equals_the_reply(server, corpus):
    query = named_question(corpus, 1)
    body = {"messages": [{"role": "user", "content": query.text}], "rag": {"k": 2, "retriever": "bm25"}}
    whole = post(server, body).json()["choices"][0]["message"]
    chunks = []
    with httpx.stream("POST", f"{server}/v1/chat/completions", json={**body, "stream": True}, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:]))
    deltas = [choice["delta"] for chunk in chunks for choice in chunk["choices"]]
    assert [s["id"] for s in deltas[0]["sources"]] == [s["id"] for s in whole["sources"]]  # before any text
    assert "cited" not in deltas[0]["sources"][0]  # not known yet
    assert deltas[-1]["sources"] == whole["sources"]  # again at the end, cited marked
    assert "".join(d.get("reasoning_content", "") for d in deltas) == whole["reasoning_content"]
    assert "".join(d.get("content", "") for d in deltas) == whole["content"]


def test_k_zero_turns_retrieval_off(server, tiny_model, corpus):
    messages = [{"role": "user", "content": named_question(corpus).text}]
    reply = post(server, {"messages": messages, "rag": {"k": 0}}).json()["choices"][0]["message"]
    assert "sources" not in reply
    [expected] = generate(tiny_model, [messages], SETTINGS)
    assert (reply["reasoning_content"], reply["content"]) == (expected.thinking, expected.answer)


@pytest.mark.parametrize(
    ("rag", "messages", "param"),
    [
        ({"k": -1}, None, "rag"),
        ({"k": 65}, None, "rag"),  # each source is searched, packed and tokenized: at most 64
        ({"k": 2, "retriever": "dense"}, None, "rag"),  # a bm25 index
        ({"k": 2, "rerank": True}, None, "rag"),
        ({"k": 2}, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "messages"),
    ],
)
def test_bad_retrieval_requests_are_400(server, corpus, rag, messages, param):
    messages = messages or [{"role": "user", "content": named_question(corpus).text}]
    response = post(server, {"messages": messages, "rag": rag})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_the_page_is_told_replies_carry_sources(server):
    assert httpx.get(f"{server}/ui/info").json()["retrieval"] is True
    assert httpx.get(f"{server}/health").json()["retrieval"] is True


def test_chat_with_an_index_shows_the_sources(tiny_model, index_dir, corpus):
    query = named_question(corpus, 2)
    output = io.StringIO()
    console = Console(file=output, width=200, force_terminal=False, color_system=None)
    lines = iter([query.text, "/exit"])
    messages = run_chat(tiny_model, SETTINGS, read_line=lambda prompt: next(lines), console=console,
                        index=open_index(index_dir), rag=RagRequest(k=2))
    text = output.getvalue()
    assert "sources" in text and f"[1] {query.doc_id}" in text and "cited:" in text
    assert messages[0] == {"role": "user", "content": query.text}  # the question as typed, not the packed prompt
    expected, _ = alone_over_sources(tiny_model, index_dir, [messages[0]], 2)
    assert messages[1]["content"] == expected.answer


def test_serve_and_chat_refuse_a_missing_index(tiny_model_dir, tmp_path):
    for command in ("serve", "chat"):
        result = CliRunner().invoke(cli, [command, "--model", str(tiny_model_dir), "--index", str(tmp_path / "nothing")])
        assert result.exit_code == 2, result.output
        assert "nothing" in result.output
    result = CliRunner().invoke(cli, ["serve", "--model", str(tiny_model_dir), "--retriever", "bm25"])
    assert result.exit_code == 2 and "--index" in result.output


def test_chat_command_with_an_index(tiny_model_dir, index_dir, corpus):
    query = named_question(corpus, 3)
    result = CliRunner().invoke(cli, ["chat", "--model", str(tiny_model_dir), "--index", str(index_dir), "--k", "1",
                                      "--max-thinking-tokens", "6", "--max-answer-tokens", "3"], input=f"{query.text}\n/exit\n")
    assert result.exit_code == 0, result.output
    assert f"[1] {query.doc_id}" in result.output
