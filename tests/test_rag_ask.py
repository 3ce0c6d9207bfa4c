"""`t0s1 rag ask` and `t0s1.rag.ask` on the embedded SmolLM2, with short budgets."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from t0s1.cli import app
from t0s1.forcing import BudgetForcing
from t0s1.rag.answer import ask, ask_many
from t0s1.rag.embedders import load_embedder
from t0s1.rag.store import build_index, open_index
from t0s1.rag.synthetic import make_corpus, to_t0_rows

pytestmark = pytest.mark.slow
runner = CliRunner()
BUDGET = ["--max-thinking-tokens", "16", "--max-answer-tokens", "12"]


@pytest.fixture(scope="module")
def corpus():
    return make_corpus(30, seed=5)


@pytest.fixture(scope="module")
def bm25_index(tmp_path_factory, corpus):
    documents, _ = corpus
    folder = tmp_path_factory.mktemp("ask")
    path = folder / "conditions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in to_t0_rows(documents)))
    result = runner.invoke(app, ["index", "build", str(path), "--out", str(folder / "index")])
    assert result.exit_code == 0, result.output
    return folder / "index"


def test_rag_ask_json_has_answer_thinking_budget_and_sources(one_torch_thread, bm25_index, corpus):
    _, queries = corpus
    question = queries[0].text  # names the condition: bm25 ranks it first
    result = runner.invoke(app, ["rag", "ask", question, "--index", str(bm25_index), "--k", "3", "--json", *BUDGET])
    assert result.exit_code == 0, result.output
    reply = json.loads(result.stdout)
    assert reply["question"] == question
    assert isinstance(reply["answer"], str) and isinstance(reply["thinking"], str)
    assert reply["max_thinking_tokens"] == 16 and reply["thinking_budget"] == 16 and reply["max_answer_tokens"] == 12
    assert reply["thinking_tokens"] <= 16 and reply["answer_tokens"] <= 12
    assert reply["retrieved_sources"] == 3 and reply["dropped_sources"] == 0
    sources = reply["sources"]
    assert [s["number"] for s in sources] == [1, 2, 3]
    assert sources[0]["id"] == queries[0].doc_id and sources[0]["title"] == queries[0].doc_id
    assert all({"id", "title", "score", "snippet", "cited"} <= set(s) for s in sources)
    assert sources[0]["score"] >= sources[1]["score"] >= sources[2]["score"]


def test_rag_ask_prints_the_answer_and_names_its_sources(one_torch_thread, bm25_index, corpus):
    _, queries = corpus
    result = runner.invoke(app, ["rag", "ask", queries[2].text, "--index", str(bm25_index), "--k", "2", *BUDGET])
    assert result.exit_code == 0, result.output
    assert "Answer" in result.output and "Sources (bm25, 2 retrieved)" in result.output
    assert f"[1] {queries[2].doc_id}" in result.output


def test_a_second_ask_does_not_embed_the_corpus_again(one_torch_thread, tmp_path, corpus, smollm2):
    documents, queries = corpus
    embedder = load_embedder()
    build_index(documents, tmp_path / "index", retriever="hybrid", embedder=embedder, progress=False)
    embedded = []
    original = embedder.encode
    embedder.encode = lambda texts, **kwargs: embedded.append(len(texts)) or original(texts, **kwargs)
    settings = BudgetForcing(max_thinking_tokens=8, max_answer_tokens=8)
    for question in (queries[1].text, queries[3].text):
        index = open_index(tmp_path / "index")  # as a new `rag ask` would
        index.use_embedder(embedder)
        reply = ask(smollm2, index, question, settings, k=2)
        assert len(reply.sources) == 2 and reply.sources[0].retriever == "hybrid"
    assert embedded == [1, 1]  # one question each time, never the chunks


def test_ask_many_batches_questions_and_keeps_their_sources_apart(one_torch_thread, bm25_index, corpus, smollm2):
    _, queries = corpus
    named = [q for q in queries if q.style == "named"][:3]
    replies = ask_many(smollm2, open_index(bm25_index), [q.text for q in named], BudgetForcing(8, max_answer_tokens=8), k=1)
    assert [r.sources[0].doc_id for r in replies] == [q.doc_id for q in named]
    assert [r.question for r in replies] == [q.text for q in named]
    assert all(r.thinking_budget == 8 and r.result.thinking_tokens <= 8 for r in replies)
