"""`t0s1 quickstart --rag`: the generated knowledge base and its template teacher, and a shortened
run of every stage (knowledge base, index, traces, prepare, LoRA SFT, the grid of k x budgets)."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from t0s1.cli import app
from t0s1.errors import UserError
from t0s1.evaluation.grading import grade
from t0s1.rag.synthetic import KnowledgeBase

runner = CliRunner()


def test_knowledge_base_questions_need_one_or_two_documents_and_the_template_reasons_over_them():
    knowledge_base = KnowledgeBase(60, seed=1)
    by_id = knowledge_base.by_id
    assert len(by_id) == 60 and len({p.name.split()[0] for p in knowledge_base.people}) < 60  # shared first names
    questions = knowledge_base.questions(knowledge_base.people[:30], 40, seed=2, prefix="t")
    assert {q.kind for q in questions} == {"town", "goats", "sum"} and len({q.question for q in questions}) == 40
    assert len(knowledge_base.questions(knowledge_base.people[:5], 20, seed=2)) == 20  # every town and goats question
    with pytest.raises(UserError, match="at most 20 questions"):  # more would loop for ever looking for a new town question
        knowledge_base.questions(knowledge_base.people[:5], 21, seed=2)
    for question in questions:
        people = [by_id[doc] for doc in question.gold_ids]
        assert all(person.name in question.question for person in people)
        expected = people[0].town if question.kind == "town" else str(sum(person.goats for person in people))
        assert question.answer == expected and len(people) == (2 if question.kind == "sum" else 1)

    total = next(q for q in questions if q.kind == "sum")
    first, second = total.gold_ids
    sources = ["someone else", second, first]
    thinking, answer = knowledge_base.reasoning("sum", list(total.gold_ids), sources)
    lines = thinking.splitlines()
    # each fact is quoted from its source, cited by its number in the prompt, then combined
    assert lines[0] == f"[3] {by_id[first].text}" and lines[1] == f"[2] {by_id[second].text}"
    assert lines[2] == f"{by_id[first].goats} + {by_id[second].goats} = {total.answer}."
    assert answer == f"{total.answer} [3][2]" and grade(f"Answer: {answer}", total.answer, "exact").correct
    thinking, answer = knowledge_base.reasoning("sum", list(total.gold_ids), [first])
    assert "Inconclusive" in answer and second in thinking and first not in thinking


@pytest.mark.usefixtures("one_torch_thread")
def test_shortened_demo_runs_every_stage_and_resumes(tmp_path):
    out = tmp_path / "demo"
    args = ["quickstart", "--rag", "--out", str(out), "--steps", "2", "--num-test", "6", "--budgets", "0,16", "--threads", "1"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output

    corpus = [json.loads(line) for line in (out / "data" / "corpus.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (out / "data" / "test.jsonl").read_text().splitlines()]
    train = [json.loads(line) for line in (out / "data" / "train.jsonl").read_text().splitlines()]
    assert len(corpus) == 400 and len(test) == 6
    # held-out questions are about people no training question names
    assert not {doc for q in test for doc in q["gold_ids"]} & {doc for q in train for doc in q["gold_ids"]}
    traces = [json.loads(json.loads(line)["metadata"]) for line in (out / "data" / "traces.jsonl").read_text().splitlines()]
    assert len(traces) == len(train) and {meta["k"] for meta in traces} == {3}
    assert (out / "model" / "config.json").is_file() and (out / "index" / "manifest.json").is_file()

    results = json.loads((out / "eval" / "results.json").read_text())
    assert results["retrieval"]["p@5"] >= 0.9 and results["rag"]["questions"] == 6
    assert [(row["k"], row["max_thinking_tokens"]) for row in results["accuracy_by_k"]] == [
        (k, budget) for k in ("0", "1", "3", "gold") for budget in (0, 16)]
    output = " ".join(first.output.split())
    assert "gold sources" in output and re.search(r"Retrieval: k=\d at budget \d+ gets \d+% against \d+% without sources", output)
    assert (out / "eval" / "accuracy_vs_k.png").is_file() and "accuracy_vs_thinking.png" in output

    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    repeated = " ".join(again.output.split())
    assert "already trained" in repeated and "0 traces written" in repeated
    assert sum(int(n) for n in re.findall(r"\((\d+) there already\)", repeated)) == len(train)
    assert json.loads((out / "eval" / "results.json").read_text()) == results
