"""The prompt over sources: numbering, the inconclusive path, packing into the context."""

from __future__ import annotations

import pydantic
import pytest

from t0s1.errors import UserError
from t0s1.forcing import BudgetForcing
from t0s1.rag.answer import RagRequest
from t0s1.rag.prompt import (
    DELIMITER_TOKENS,
    INCONCLUSIVE,
    build_rag_messages,
    cited_sources,
    is_inconclusive,
    reserve_tokens,
)
from t0s1.rag.retrievers import ChunkMatch, Hit


def make_hits(count: int, words: int = 60) -> list[Hit]:
    hits = []
    for i in range(count):
        text = " ".join(f"fact{i}_{j}" for j in range(words))
        hits.append(Hit(f"doc-{i}", f"Title {i}", text, 10.0 - i, [ChunkMatch(text[:40], 10.0 - i, 0, 40)], "bm25"))
    return hits


def token_count(tokenizer, messages) -> int:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def test_sources_are_numbered_best_first_then_the_question(tiny_model):
    hits = make_hits(3, words=5)
    prompt = build_rag_messages(tiny_model.tokenizer, "Which fact?", hits, context_length=100_000, reserved=100)
    content = prompt.messages[-1]["content"]
    positions = [content.index(f"[{n}] Title {n - 1} (score {10.0 - n + 1:.3f})") for n in (1, 2, 3)]
    assert positions == sorted(positions)
    assert content.rstrip().endswith("Question: Which fact?")
    assert INCONCLUSIVE in content and "[1]" in content.split("Sources:")[0]  # how to cite, and the way out
    assert prompt.sources == hits and prompt.dropped == 0
    assert prompt.prompt_tokens == token_count(tiny_model.tokenizer, prompt.messages)


def test_lowest_ranked_sources_are_dropped_first_to_fit_the_context(tiny_model):
    tokenizer = tiny_model.tokenizer
    hits = make_hits(6)
    full = build_rag_messages(tokenizer, "Which fact?", hits, context_length=1_000_000, reserved=0)
    context = full.prompt_tokens * 3 // 5 + 300
    prompt = build_rag_messages(tokenizer, "Which fact?", hits, context_length=context, reserved=300)
    assert 0 < prompt.dropped < 6
    assert prompt.sources == hits[: 6 - prompt.dropped]  # a prefix: the best ones stay
    assert prompt.prompt_tokens + 300 <= context
    one_more = build_rag_messages(tokenizer, "Which fact?", hits[: 7 - prompt.dropped], context_length=1_000_000, reserved=0)
    assert one_more.prompt_tokens + 300 > context  # it kept as many as fit


def test_a_question_that_cannot_fit_is_refused(tiny_model):
    with pytest.raises(UserError, match="no room"):
        build_rag_messages(tiny_model.tokenizer, "Which fact? " * 200, make_hits(2), context_length=300, reserved=100)


def test_a_long_document_is_given_as_its_best_chunks(tiny_model):
    long = make_hits(1, words=2000)[0]
    prompt = build_rag_messages(tiny_model.tokenizer, "Which fact?", [long], context_length=1_000_000, reserved=0, max_source_tokens=100)
    content = prompt.messages[-1]["content"]
    assert long.chunks[0].text.strip() in content and long.text not in content


def test_overlapping_best_chunks_are_one_passage_and_a_gap_is_marked(tiny_model):
    """Neighbouring chunks share their overlap: joined with "…" the shared words came twice and a
    gap was marked where there was none."""
    from t0s1.rag.prompt import source_content
    from t0s1.rag.retrievers import ChunkMatch

    text = " ".join(f"w{i}" for i in range(3000))
    at = {word: text.index(f" {word} ") + 1 for word in ("w100", "w200", "w250", "w400", "w500")}
    chunks = [ChunkMatch(text[at["w200"]:at["w400"]], 2.0, at["w200"], at["w400"]),  # best first, as hits give them
              ChunkMatch(text[at["w100"]:at["w250"]], 1.0, at["w100"], at["w250"]),
              ChunkMatch(text[at["w500"]:at["w500"] + 40], 0.5, at["w500"], at["w500"] + 40)]
    content = source_content(Hit("d", "T", text, 1.0, chunks, "bm25"), tiny_model.tokenizer, max_source_tokens=100)
    first, second = content.split("\n…\n")
    assert first == text[at["w100"]:at["w400"]].strip() and second.startswith("w500")
    assert content.split().count("w220") == 1


def test_a_long_document_without_chunks_is_given_as_its_beginning(tiny_model):
    """The gold ceiling's documents come without chunks: a long one is cut to max_source_tokens
    instead of filling the context (it was dropped, leaving a "gold" prompt with no sources)."""
    tokenizer = tiny_model.tokenizer
    [long] = make_hits(1, words=2000)
    whole = Hit(long.doc_id, long.title, long.text, long.score, [], "gold")
    prompt = build_rag_messages(tokenizer, "Which fact?", [whole], context_length=600, reserved=100, max_source_tokens=100)
    assert prompt.sources == [whole] and prompt.dropped == 0
    content = prompt.messages[-1]["content"]
    assert "fact0_0 " in content and "fact0_1999" not in content and "…" in content


def test_history_comes_before_the_sources_and_question(tiny_model):
    history = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."}]
    prompt = build_rag_messages(tiny_model.tokenizer, "Which fact?", make_hits(1), context_length=100_000, reserved=0, history=history)
    assert prompt.messages[:2] == history and prompt.messages[2]["content"].endswith("Which fact?")


def test_reserved_tokens_follow_the_budget():
    assert reserve_tokens(BudgetForcing(max_thinking_tokens=256, max_answer_tokens=64), 8192) == 256 + 64 + DELIMITER_TOKENS
    assert reserve_tokens(BudgetForcing(max_thinking_tokens="auto", max_answer_tokens=64), 8192) == 4096


def test_citations_and_inconclusive_answers_are_read_from_the_reply():
    assert cited_sources("As [2] says, and [1]; not [7] or [2] again.", 3) == [2, 1]
    assert is_inconclusive("The answer is Inconclusive: no source mentions it.")
    assert not is_inconclusive("It is asthma [1].")


def test_rag_request_declares_its_fields():
    assert RagRequest().k == 5 and RagRequest(k=0, retriever="hybrid").retriever == "hybrid"
    for bad in ({"k": -1}, {"retriever": "tfidf"}, {"top_k": 3}):
        with pytest.raises(pydantic.ValidationError):
            RagRequest(**bad)
